"""The Linux syscalls cer needs that Python 3.11's os module lacks, behind one small package."""
