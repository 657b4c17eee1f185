"""Whether this kernel gives CRIU's lazy restores what they need: userfaultfd with the non-cooperative events.

The same test as ``criu check --feature uffd-noncoop`` (CRIU's kerndat: the kernel must report the fork,
remap, remove and unmap events), done in-process with two syscalls instead of a CRIU run.
"""

import ctypes
import errno
import os

from cer.linux.libc import libc

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355}
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_NONCOOPERATIVE = {"fork": 1 << 1, "remap": 1 << 2, "remove": 1 << 3, "unmap": 1 << 6}


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


def lazy_pages_unsupported() -> str | None:
    """None when CRIU can restore lazily here; else why not, in words for an operator."""
    number = _SYS_USERFAULTFD.get(os.uname().machine)
    if number is None:
        return f"cer does not know the userfaultfd syscall on {os.uname().machine}"
    fd = libc.syscall(number, ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        err = ctypes.get_errno()
        why = {
            errno.ENOSYS: "the kernel has no userfaultfd (CONFIG_USERFAULTFD), or a seccomp filter hides it",
            errno.EPERM: "CRIU's non-cooperative mode needs CAP_SYS_PTRACE (or vm.unprivileged_userfaultfd=1)",
        }.get(err, "")
        return f"userfaultfd(2) failed: {os.strerror(err)}" + (f"; {why}" if why else "")
    try:
        api = _UffdioApi(api=_UFFD_API, features=0)
        if libc.ioctl(fd, ctypes.c_ulong(_UFFDIO_API), ctypes.byref(api)) < 0:
            return f"UFFDIO_API failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(fd)
    missing = [name for name, bit in _NONCOOPERATIVE.items() if not api.features & bit]
    if missing:
        return f"the kernel's userfaultfd lacks the non-cooperative events CRIU needs ({', '.join(missing)})"
    return None


_UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
_UFFDIO_COPY_MODE_DONTWAKE = 1
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("copy", ctypes.c_int64)]


def registered_page(uffd: int, address: int) -> bool:
    """Whether the page at ``address`` of the memory ``uffd`` serves (another process's) lies in a mapping
    registered with a userfaultfd, asked without touching that memory.

    A UFFDIO_COPY from source address 0, which is never mapped here: the kernel looks the destination up
    first (ENOENT: no registered mapping there) and only then reads the source, which fails (EFAULT) before
    any page is installed. OSError for anything else (ESRCH: that memory is gone; EAGAIN: it is being
    remapped right now).
    """
    request = _UffdioCopy(dst=address - address % _PAGE, src=0, len=_PAGE, mode=_UFFDIO_COPY_MODE_DONTWAKE)
    if libc.ioctl(uffd, ctypes.c_ulong(_UFFDIO_COPY), ctypes.byref(request)) == 0:
        raise OSError(errno.EIO, "UFFDIO_COPY from address 0 copied a page")
    err = ctypes.get_errno()
    if err == errno.EFAULT:
        return True
    if err in (errno.ENOENT, errno.EINVAL):
        return False
    raise OSError(err, f"UFFDIO_COPY probe at {address:#x}: {os.strerror(err)}")
