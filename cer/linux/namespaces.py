"""unshare, setns, mount and host names: the syscalls that build and tear down namespaces.

Every function acts on the calling thread only. They are meant for a dedicated thread that creates
one namespace and then ends: a thread that has unshared must never serve anything else.
"""

import ctypes
import os

from cer.linux.libc import check, libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_FS = 0x00000200

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# Namespace type names as the protocol and /proc/*/ns/ spell them, with their clone flags.
CLONE_FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "mnt": CLONE_NEWNS}
NAMESPACE_TYPES = tuple(CLONE_FLAGS)

libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
libc.unshare.argtypes = [ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), "setns")


def open_thread_namespace(ns_type: str) -> int:
    """Open the calling thread's namespace of ``ns_type``; the fd keeps it alive after the thread ends.

    /proc/self/ns is the main thread's: a worker thread that unshared must use /proc/thread-self.
    """
    return os.open(f"/proc/thread-self/ns/{ns_type}", os.O_RDONLY | os.O_CLOEXEC)


def sethostname(name: str) -> None:
    # A name read from an image that was not UTF-8 comes back with surrogate escapes: give the bytes back.
    raw = name.encode(errors="surrogateescape")
    check(libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode(errors="surrogateescape")
    check(libc.setdomainname(raw, len(raw)), "setdomainname")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    check(
        libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} on",
        target,
    )


def umount(target: str, flags: int = 0) -> None:
    check(libc.umount2(target.encode(), flags), "umount", target)


def make_mounts_private() -> None:
    """Stop mount events propagating between this thread's new mount namespace and the host's."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def namespace_inode(path: str) -> int:
    """The inode that identifies a namespace, as ``ls -iL /proc/PID/ns/TYPE`` shows it."""
    return os.stat(path).st_ino
