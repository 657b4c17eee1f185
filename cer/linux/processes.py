"""pidfds: a handle on a process that becomes readable when the process exits, and never names another;
and the kills and waits done through them.

Unlike a pid, a pidfd cannot be recycled for a new process, so watching one is race-free.
"""

import ctypes
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterable

from cer.linux.libc import check, libc

_SYS_PIDFD_OPEN = 434  # the same number on every architecture (added in Linux 5.3)



def pidfd_open(pid: int) -> int:
    """Open a pidfd for ``pid``; ProcessLookupError (ESRCH) when no process has that id.

    A pid comes from outside: a thread's id (the kernel answers ENOENT: a pidfd names a whole process) and
    ids that cannot name a process (0, negative: EINVAL; past a C int, which ctypes would silently wrap onto
    another pid) are no process either, not an internal error.
    """
    if not 0 < pid < 2**31:
        raise ProcessLookupError(errno.ESRCH, f"pidfd_open {pid}: not a process id")
    try:
        return check(libc.syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0)), f"pidfd_open {pid}")
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"pidfd_open {pid}: a thread, not a process") from None


_SYS_PIDFD_GETFD = 438  # Linux 5.6


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate, in this process and close-on-exec, of fd ``target_fd`` of the process behind ``pidfd``.

    Both then refer to the same open file: for a userfaultfd, the kernel keeps it (and the page faults it
    handles) alive until the last of them is closed.
    """
    return check(
        libc.syscall(_SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(target_fd), ctypes.c_uint(0)),
        f"pidfd_getfd {target_fd}",
    )


_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "ppc64le": 354, "s390x": 343}
_KCMP_FILE = 0


def same_open_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether fd ``fd1`` of ``pid1`` and fd ``fd2`` of ``pid2`` are the same open file (kcmp(2)), e.g. a
    duplicate this process took earlier; OSError when either is gone."""
    number = _SYS_KCMP[os.uname().machine]
    result = check(
        libc.syscall(number, ctypes.c_int(pid1), ctypes.c_int(pid2), ctypes.c_int(_KCMP_FILE),
                     ctypes.c_ulong(fd1), ctypes.c_ulong(fd2)),
        f"kcmp {pid1}:{fd1} {pid2}:{fd2}",
    )
    return result == 0


def kill_process(pidfd: int) -> bool:
    """SIGKILL the process behind ``pidfd``; False when it had exited already."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def kill_process_group(pgid: int) -> None:
    """SIGKILL process group ``pgid``, if any of it is left. Only for a group led by a child of this process
    not reaped yet: until then its pid, hence the group's id, cannot name anyone else."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def has_exited(pidfd: int, timeout: float = 0.0) -> bool:
    """Whether the process behind ``pidfd`` exits within ``timeout`` seconds (0: has exited already)."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def wait_exited(pidfds: Iterable[int], timeout: float, clock: Callable[[], float] = time.monotonic) -> set[int]:
    """Wait, for all at once, up to ``timeout`` seconds for the processes behind ``pidfds`` to exit; the
    pidfds of those that did."""
    waiting = set(pidfds)
    exited: set[int] = set()
    deadline = clock() + timeout
    while waiting:
        ready = select.select(list(waiting), [], [], max(0.0, deadline - clock()))[0]
        exited.update(ready)
        waiting.difference_update(ready)
        if not ready and clock() >= deadline:
            break
    return exited
