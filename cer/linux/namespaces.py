"""unshare, setns, mount and host names: the syscalls that build and tear down namespaces.

Every function acts on the calling thread only. They are meant for a dedicated thread that creates
one namespace and then ends: a thread that has unshared must never serve anything else.
"""

import ctypes
import os

from cer.linux.flags import (  # noqa: F401 - the flags this module's callers pass to its functions
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_FS, CLONE_NEWCGROUP, CLONE_NEWPID, CLONE_NEWNET, MS_RDONLY,
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME,
    MS_STRICTATIME, MOUNT_FLAGS, MNT_DETACH, CLONE_FLAGS, NAMESPACE_TYPES,
)
from cer.linux.libc import check, libc

# open_tree(2) and move_mount(2): a bind taken as a detached mount in one mount namespace can be attached in
# another (a path bind cannot cross namespaces). Numbers are the same on every architecture since 5.2.
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "open_tree": 428, "move_mount": 429},
    "aarch64": {"pivot_root": 41, "open_tree": 428, "move_mount": 429},
}.get(os.uname().machine, {"open_tree": 428, "move_mount": 429})

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


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (glibc has no wrapper); ``pivot_root(".", ".")`` from inside the new root stacks the old
    root on it, to be detached with ``umount(".", MNT_DETACH)``."""
    number = _SYSCALLS.get("pivot_root")
    if number is None:
        raise OSError(38, f"pivot_root: no syscall number known for {os.uname().machine}")
    check(libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()), "pivot_root", new_root)


def open_tree(path: str) -> int:
    """A detached bind of ``path`` (not recursive) as an fd, attachable in any mount namespace with
    :func:`move_mount`; close it when done (an unattached tree goes with its last fd)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
    return check(libc.syscall(ctypes.c_long(_SYSCALLS["open_tree"]), ctypes.c_int(_AT_FDCWD), path.encode(),
                              ctypes.c_uint(flags)), "open_tree", path)


def move_mount(tree_fd: int, target: str) -> None:
    """Attach the detached mount ``tree_fd`` (from :func:`open_tree`) at ``target``."""
    check(libc.syscall(ctypes.c_long(_SYSCALLS["move_mount"]), ctypes.c_int(tree_fd), b"", ctypes.c_int(_AT_FDCWD),
                       target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), "move_mount to", target)
