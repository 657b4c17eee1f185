"""Safe, streaming extraction of a checkpoint's CRIU archive, and the directory it lands in.

The archive comes from outside (whoever made the checkpoint image) and cer runs as root, so
``extract_tar`` writes only regular files and directories, every one strictly below the target:
no absolute names, no ``..``, no links of any kind (so nothing can lead out), no devices, fifos or
sparse files, no set-id bits. It never needs more of the archive than the descriptor's size, checks
every member's declared size against what is left of it before writing, and checks the archive's
digest at the end: an archive that fails any of this raises ``ArchiveError`` and leaves only what it
wrote inside the target, which the caller removes.

``extract_once`` puts the result at ``BASE/KEY/`` so that a half-done extraction can never pass for a
whole one: it extracts into a temporary directory beside it, writes the ready marker last, and
renames the directory into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import secrets
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from loguru import logger

READY_MARKER = ".cer-ready"
"""Written into an extracted checkpoint directory last; holds the archive's digest."""

_PARTIAL = ".partial-"
_OLD = ".old-"
_COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_TYPE_NAMES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


class ArchiveError(Exception):
    """The archive is unsafe, corrupt, larger than its descriptor says, or not what its digest says."""


class Cancelled(Exception):
    """The extraction was asked to stop (the daemon is stopping)."""


@dataclass
class Progress:
    """How far an extraction is; written by the extracting thread, read by anyone."""

    done: int = 0
    total: int = 0


def extract_tar(
    chunks: Iterable[bytes],
    target: str,
    size: int,
    digest: str | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Extract the plain tar archive streamed as ``chunks`` into the existing directory ``target``.

    ``size`` is the archive's size as its descriptor gives it: the stream may not be longer, and no
    member may declare more than what is left. ``digest`` ("sha256:HEX"), when given, is checked
    once the whole stream is read. Returns the names of the regular files written, in archive order.
    """
    stream = _CheckedStream(chunks, size, digest, cancel, progress)
    written: list[str] = []
    root_fd = os.open(target, _DIR_FLAGS)
    directories = _Directories(root_fd)
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, _COPY_CHUNK), mode="r|", bufsize=_COPY_CHUNK) as archive:
            while True:
                try:
                    member = archive.next()
                except tarfile.TarError as error:
                    raise ArchiveError(f"not a valid tar archive: {error}") from None
                if member is None:
                    break
                parts = _safe_parts(member.name)
                if member.isdir():
                    if parts:
                        directories.open(parts, member.mode)
                    continue
                if member.type not in _REGULAR_TYPES or member.issparse():
                    kind = _TYPE_NAMES.get(member.type, f"of tar type {member.type!r}")
                    raise ArchiveError(f"member {member.name!r} is {kind}: only regular files and directories are allowed")
                if not parts:
                    raise ArchiveError(f"member {member.name!r} names no file")
                left = size - member.offset_data
                if member.size > left:
                    raise ArchiveError(
                        f"member {member.name!r} declares {member.size} bytes, more than the {left} left of the archive"
                    )
                parent = directories.open(parts[:-1])
                _write_member(archive, member, parent, parts[-1], stream)
                written.append("/".join(parts))
            stream.drain()
    except tarfile.TarError as error:
        raise ArchiveError(f"not a valid tar archive: {error}") from None
    finally:
        directories.close()
        os.close(root_fd)
    return written


def extract_once(
    base: str,
    key: str,
    digest: str,
    extract: Callable[[str], object],
) -> str:
    """``BASE/KEY``, extracted by ``extract(temporary_directory)`` unless it is already there whole.

    Whole means: its ready marker names ``digest``. A directory for another digest (the checkpoint
    was made again under the same name) is replaced; a temporary directory is removed when
    ``extract`` raises.
    """
    final = os.path.join(base, key)
    if ready_digest(final) == digest:
        return final
    os.makedirs(base, mode=0o700, exist_ok=True)
    partial = os.path.join(base, f"{_PARTIAL}{key}-{secrets.token_hex(4)}")
    os.mkdir(partial, 0o700)
    try:
        extract(partial)
        _sync_filesystem(partial)
        _write_marker(partial, digest)
        if os.path.lexists(final):
            old = os.path.join(base, f"{_OLD}{key}-{secrets.token_hex(4)}")
            os.rename(final, old)
            _remove(old)
        os.rename(partial, final)
    except BaseException:
        _remove(partial)
        raise
    return final


def ready_digest(directory: str) -> str | None:
    """The digest in ``directory``'s ready marker; None when it is not a whole extraction."""
    try:
        fd = os.open(os.path.join(directory, READY_MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", "replace").strip() or None
    finally:
        os.close(fd)


def remove_stale(base: str, keep: Iterable[str]) -> list[str]:
    """Remove from ``base`` whatever is not a whole extraction named in ``keep``; returns the names removed."""
    keep = set(keep)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(base, name)
        if name in keep and not os.path.islink(path) and os.path.isdir(path) and ready_digest(path):
            continue
        _remove(path)
        removed.append(name)
    return removed


def remove_extraction(base: str, key: str) -> None:
    _remove(os.path.join(base, key))


# -- internals ------------------------------------------------------------------------------------------


def _safe_parts(name: str) -> list[str]:
    """The path components of a member name, refusing any that could lead out of the target."""
    if "\0" in name:
        raise ArchiveError(f"member {name!r} has a NUL in its name")
    if name.startswith("/"):
        raise ArchiveError(f"member {name!r} has an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r} has '..' in its name")
    return parts


class _Directories:
    """Open directory fds below the target, each reached one component at a time without following links."""

    _MAX_OPEN = 64

    def __init__(self, root_fd: int) -> None:
        self._root_fd = root_fd
        self._open: dict[tuple[str, ...], int] = {}

    def open(self, parts: list[str], mode: int = 0o755) -> int:
        key = tuple(parts)
        if not key:
            return self._root_fd
        if key in self._open:
            return self._open[key]
        parent = self.open(parts[:-1])
        name = parts[-1]
        try:
            os.mkdir(name, (mode & 0o777) | 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as error:
            raise ArchiveError(f"{'/'.join(parts)} is not a directory of the archive: {error.strerror}") from None
        if len(self._open) >= self._MAX_OPEN:
            self.close()
        self._open[key] = fd
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, parent: int, name: str, stream: _CheckedStream) -> None:
    try:
        fd = os.open(name, _FILE_FLAGS, (member.mode & 0o777) | 0o600, dir_fd=parent)
    except FileExistsError:
        raise ArchiveError(f"member {member.name!r} appears twice in the archive") from None
    except OSError as error:
        raise ArchiveError(f"cannot create {member.name!r}: {error.strerror}") from None
    try:
        source = archive.extractfile(member)
        left = member.size
        while left:
            data = source.read(min(left, _COPY_CHUNK))
            if not data:
                raise ArchiveError(f"the archive ends inside member {member.name!r}")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            left -= len(data)
            stream.check_cancel()
    finally:
        os.close(fd)


class _CheckedStream(io.RawIOBase):
    """The archive's bytes from an iterator of chunks: counted, bounded by ``size``, hashed."""

    def __init__(self, chunks, size, digest, cancel, progress) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")
        self._size = size
        self._digest = digest
        self._hash = hashlib.sha256() if digest else None
        if digest and not digest.startswith("sha256:"):
            raise ArchiveError(f"cannot check digest {digest!r}: only sha256 is supported")
        self._cancel = cancel
        self._progress = progress or Progress()
        self._progress.total = size
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            self.check_cancel()
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            if self._hash is not None:
                self._hash.update(chunk)
            self._pending = memoryview(chunk)
            self.consumed += len(chunk)
            self._progress.done = self.consumed
            if self.consumed > self._size:
                raise ArchiveError(f"the archive is longer than the {self._size} bytes its descriptor gives")
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the extraction was cancelled")

    def drain(self) -> None:
        """Read what follows the archive's end marker (padding), then check size and digest."""
        self._pending = memoryview(b"")
        while self.readinto(bytearray(_COPY_CHUNK)):
            self._pending = memoryview(b"")
        if self.consumed != self._size:
            raise ArchiveError(f"the archive is {self.consumed} bytes, its descriptor says {self._size}")
        if self._hash is not None and f"sha256:{self._hash.hexdigest()}" != self._digest:
            raise ArchiveError(f"the archive's digest is sha256:{self._hash.hexdigest()}, not {self._digest}")


def _write_marker(directory: str, digest: str) -> None:
    fd = os.open(os.path.join(directory, READY_MARKER), _FILE_FLAGS, 0o600)
    try:
        os.write(fd, f"{digest}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _sync_filesystem(directory: str) -> None:
    # The marker must never reach the disk before the files it vouches for: one syncfs(2) of the
    # file system the extraction is on (not the whole machine's, as sync(2) would).
    fd = os.open(directory, _DIR_FLAGS)
    try:
        if _libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs: {os.strerror(error)}", directory)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("cannot remove {}: {}", path, error)
