"""Files and directories that come from outside, opened so that they cannot block, mislead or redirect cer.

cer runs as root and reads files that others can place: configuration files, CRIU image directories,
extracted checkpoints. Every such file is opened here:

- non-blocking, so that a FIFO (or a device) planted where a file is expected fails at once instead of
  holding a request thread, and with it a reload or the daemon's shutdown, until someone opens the
  other end;
- without following a symbolic link unless the caller expects one (a configuration file may be a link,
  as Kubernetes config maps are; an image file has no reason to be);
- checked with ``fstat`` to be a regular file before a byte is read.

ROOT, the directory cer keeps its state in and cleans up at start-up, must be one that no other user
can change: :func:`open_private_directory` refuses one that another user owns or can write, or that
lies below a directory another user can write; :func:`remove_entry` removes what is in it by fd,
without following links.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from cer.errors import UnsafePathError

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Symbolic links followed while resolving a path, as the kernel's own limit (MAXSYMLINKS).
_MAX_LINKS = 40


def open_regular_file(path: str | os.PathLike[str], *, follow_links: bool = False, dir_fd: int | None = None) -> int:
    """Open ``path`` read-only, non-blocking, close-on-exec; return the fd of a regular file.

    Raises :class:`OSError` when it cannot be opened and :class:`UnsafePathError` when it is not a regular
    file, or (without ``follow_links``) a symbolic link.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_links and os.path.islink(_joined(path, dir_fd)):
            raise UnsafePathError(os.fspath(path), "a symbolic link, not a regular file", errno.ELOOP) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePathError(os.fspath(path), f"{_kind(mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike[str], limit: int, *, follow_links: bool = False) -> bytes:
    """Up to ``limit`` + 1 bytes of the regular file ``path`` (one more than allowed tells the caller it is too
    large), opened as :func:`open_regular_file` does."""
    fd = open_regular_file(path, follow_links=follow_links)
    with os.fdopen(fd, "rb") as file:
        return file.read(limit + 1)


def _joined(path: str | os.PathLike[str], dir_fd: int | None) -> str:
    path = os.fspath(path)
    return path if dir_fd is None or os.path.isabs(path) else f"/proc/self/fd/{dir_fd}/{path}"


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))
    for test, name in kinds:
        if test(mode):
            return name
    return f"a file of mode {mode:#o}"


# -- ROOT ------------------------------------------------------------------------------------------------


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _others_can_change(st: os.stat_result) -> bool:
    """Whether a user other than the owner can add, remove or rename entries: group or other write
    permission, unless the sticky bit limits that to entries they own (as in /tmp)."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not st.st_mode & stat.S_ISVTX


def open_private_directory(path: str | os.PathLike[str], mode: int = 0o700) -> int:
    """Open (creating it if need be) the directory ``path`` that only root may change, and return its fd.

    Every directory on the way, and every symbolic link followed, must be owned by root (or the daemon's
    user) and unwritable by others (the sticky bit excepted): otherwise another user could move a part of
    the path and make cer work, as root, somewhere else. The directory itself must be owned by root (or the
    daemon's user); its mode is then set to ``mode``, whatever an earlier owner left.
    Raises :class:`UnsafePathError` naming the directory that fails, :class:`OSError` for the rest.
    """
    path = os.path.abspath(os.fspath(path))
    fd = os.open("/", _DIRECTORY_FLAGS)
    try:
        _check_parent("/", os.fstat(fd))
        where = "/"
        parts = [part for part in path.split("/") if part]
        links = 0
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                # Resolved as the kernel would, from the directory reached so far (already checked).
                parent = os.open("..", _DIRECTORY_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, where = parent, os.path.dirname(where)
                continue
            candidate = os.path.join(where, name)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(name, mode, dir_fd=fd)  # as os.makedirs would, in a directory checked already
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                # The link sits in a directory only root can change; who owns the link matters as much.
                links += 1
                if links > _MAX_LINKS:
                    raise UnsafePathError(path, "too many symbolic links", errno.ELOOP)
                if not _trusted_owner(st.st_uid):
                    raise UnsafePathError(candidate, f"a symbolic link owned by uid {st.st_uid}, not root", errno.EPERM)
                target = os.readlink(name, dir_fd=fd)
                parts = [part for part in target.split("/") if part] + parts
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = os.open("/", _DIRECTORY_FLAGS), "/"
                continue
            child = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd, where = child, candidate
            st = os.fstat(fd)
            if parts:
                _check_parent(where, st)
        final = os.fstat(fd)
        if not _trusted_owner(final.st_uid):
            raise UnsafePathError(where, f"owned by uid {final.st_uid}: cer keeps its state only in a directory "
                                  "root owns", errno.EPERM)
        os.fchmod(fd, mode)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_parent(where: str, st: os.stat_result) -> None:
    if not _trusted_owner(st.st_uid):
        raise UnsafePathError(where, f"owned by uid {st.st_uid}: another user could move what lies below it",
                              errno.EPERM)
    if _others_can_change(st):
        raise UnsafePathError(where, f"mode {stat.S_IMODE(st.st_mode):o}: other users can write it (and it is not "
                              "sticky), so they could move what lies below it", errno.EPERM)


def remove_entry(dir_fd: int, name: str) -> bool:
    """Remove ``name`` from the directory ``dir_fd``, a whole tree if it is a directory, never following a
    link (a link is removed, not what it points to). Returns False when there was nothing to remove."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        # With dir_fd, shutil.rmtree walks by fd and checks each directory it enters is the one it saw.
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def remove_unless_directory(dir_fd: int, name: str) -> bool:
    """Remove ``name`` from the directory ``dir_fd`` unless it is a real directory (a link to one is
    removed); returns True when something was removed."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    os.unlink(name, dir_fd=dir_fd)
    return True
