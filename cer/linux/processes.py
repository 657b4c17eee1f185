"""pidfds: a handle on a process that becomes readable when the process exits, and never names another.

Unlike a pid, a pidfd cannot be recycled for a new process, so watching one is race-free.
"""

import ctypes

from cer.linux.libc import check, libc

_SYS_PIDFD_OPEN = 434  # the same number on every architecture (added in Linux 5.3)

libc.syscall.restype = ctypes.c_long


def pidfd_open(pid: int) -> int:
    """Open a pidfd for ``pid``; OSError(ESRCH) when no such process runs."""
    return check(libc.syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0)), f"pidfd_open {pid}")
