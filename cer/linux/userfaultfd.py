"""userfaultfd(2) for lazy restores: whether this kernel gives them what they need, and what a page server uses.

``lazy_pages_unsupported`` asks whether userfaultfd has the non-cooperative events CRIU needs (the same test
as ``criu check --feature uffd-noncoop``, done in-process with two syscalls instead of a CRIU run);
``parse_message`` and ``PageFiller`` are what cer's lazy-pages server (cer.lazy.server) reads and answers;
``registered_page`` asks whether an address lies in a mapping registered with a userfaultfd.
"""

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

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


# -- serving pages: the messages a userfaultfd delivers and the ioctls that answer them ------------------
# linux/userfaultfd.h. Every message is 32 bytes: the event (u8), 7 reserved bytes, a 24-byte union.

MESSAGE_SIZE = 32
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16
EVENT_NAMES = {EVENT_PAGEFAULT: "pagefault", EVENT_FORK: "fork", EVENT_REMAP: "remap", EVENT_REMOVE: "remove",
               EVENT_UNMAP: "unmap"}

_UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)
_UFFDIO_WAKE = 0x8010AA02  # _IOR(0xAA, 0x02, struct uffdio_range)
_UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
_UFFDIO_ZEROPAGE = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
_UFFDIO_COPY_MODE_DONTWAKE = 1
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MESSAGE = struct.Struct("<B7x24s")
_PAGEFAULT = struct.Struct("<QQ8x")  # flags, address (then the thread id, with a feature CRIU does not ask for)
_FORK = struct.Struct("<I20x")
_REMAP = struct.Struct("<QQQ")  # from, to, len
_RANGE = struct.Struct("<QQ8x")  # start, end (remove and unmap)


@dataclass(frozen=True)
class Message:
    """One event read from a userfaultfd. ``address``: the faulting address (pagefault); ``fd``: the child's
    new userfaultfd, already installed in the reader (fork); ``start``/``end``: the range removed or unmapped
    (remove, unmap); ``source``/``start``/``end``: where a range moved from and to (remap, ``end`` the end of
    its new place)."""

    event: int
    address: int = 0
    flags: int = 0
    fd: int = -1
    source: int = 0
    start: int = 0
    end: int = 0

    @property
    def name(self) -> str:
        return EVENT_NAMES.get(self.event, f"event {self.event:#x}")


def parse_message(raw: bytes) -> Message:
    """A message as read from a userfaultfd; ValueError for a short one or an event cer does not know."""
    if len(raw) != MESSAGE_SIZE:
        raise ValueError(f"a userfaultfd message has {MESSAGE_SIZE} bytes, not {len(raw)}")
    event, arg = _MESSAGE.unpack(raw)
    if event == EVENT_PAGEFAULT:
        flags, address = _PAGEFAULT.unpack(arg)
        return Message(event, address=address, flags=flags)
    if event == EVENT_FORK:
        return Message(event, fd=_FORK.unpack(arg)[0])
    if event == EVENT_REMAP:
        source, target, length = _REMAP.unpack(arg)
        return Message(event, source=source, start=target, end=target + length)
    if event in (EVENT_REMOVE, EVENT_UNMAP):
        start, end = _RANGE.unpack(arg)
        return Message(event, start=start, end=end)
    raise ValueError(f"unknown userfaultfd event {event:#x}")


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("copy", ctypes.c_int64)]


class _ZeroPage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class PageFiller:
    """The ioctls that answer one userfaultfd (whose API the restoring CRIU has negotiated already).

    ``copy`` and ``zero`` return ``(bytes done, errno)``: the kernel may do part of a range and then stop (the
    range changed under it: EAGAIN while a non-cooperative event is pending, ENOENT where the VMA is gone,
    EEXIST where a page is present already, ESRCH once the process has exited); 0 for errno when all was done.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._copy = _Copy()
        self._zero = _ZeroPage()
        self._range = _Range()
        self._ioctl = libc.ioctl

    def copy(self, destination: int, source: int, length: int) -> tuple[int, int]:
        request = self._copy
        request.dst, request.src, request.len, request.mode, request.copy = destination, source, length, 0, 0
        if self._ioctl(self.fd, ctypes.c_ulong(_UFFDIO_COPY), ctypes.byref(request)) == 0:
            return length, 0
        err = ctypes.get_errno()
        return max(0, request.copy), err

    def zero(self, start: int, length: int) -> tuple[int, int]:
        request = self._zero
        request.range.start, request.range.len, request.mode, request.zeropage = start, length, 0, 0
        if self._ioctl(self.fd, ctypes.c_ulong(_UFFDIO_ZEROPAGE), ctypes.byref(request)) == 0:
            return length, 0
        err = ctypes.get_errno()
        return max(0, request.zeropage), err

    def unregister(self, start: int, length: int) -> int:
        """0, or the errno (ENOMEM once the process has gone)."""
        self._range.start, self._range.len = start, length
        if self._ioctl(self.fd, ctypes.c_ulong(_UFFDIO_UNREGISTER), ctypes.byref(self._range)) == 0:
            return 0
        return ctypes.get_errno()

    def wake(self, start: int, length: int) -> int:
        self._range.start, self._range.len = start, length
        if self._ioctl(self.fd, ctypes.c_ulong(_UFFDIO_WAKE), ctypes.byref(self._range)) == 0:
            return 0
        return ctypes.get_errno()


def registered_page(uffd: int, address: int) -> bool:
    """Whether the page at ``address`` of the memory ``uffd`` serves (another process's) lies in a mapping
    registered with a userfaultfd, asked without touching that memory.

    A UFFDIO_COPY from source address 0, which is never mapped here: the kernel looks the destination up
    first (ENOENT: no registered mapping there) and only then reads the source, which fails (EFAULT) before
    any page is installed. OSError for anything else (ESRCH: that memory is gone; EAGAIN: it is being
    remapped right now).
    """
    request = _Copy(dst=address - address % _PAGE, src=0, len=_PAGE, mode=_UFFDIO_COPY_MODE_DONTWAKE)
    if libc.ioctl(uffd, ctypes.c_ulong(_UFFDIO_COPY), ctypes.byref(request)) == 0:
        raise OSError(errno.EIO, "UFFDIO_COPY from address 0 copied a page")
    err = ctypes.get_errno()
    if err == errno.EFAULT:
        return True
    if err in (errno.ENOENT, errno.EINVAL):
        return False
    raise OSError(err, f"UFFDIO_COPY probe at {address:#x}: {os.strerror(err)}")

