"""The Linux syscalls cer needs that Python 3.11's os module lacks, behind one small package.

Every module here but ``flags`` loads ctypes and makes syscalls; ``flags`` holds the flag numbers and
namespace type names alone, for the layers that only name them (the protocol, the client, the CRIU reader).
"""
