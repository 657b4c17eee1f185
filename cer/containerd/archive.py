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
import os
import queue
import secrets
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loguru import logger

from cer.errors import ArchiveError, Cancelled
from cer.files import open_regular_file, remove_entry

READY_MARKER = ".cer-ready"
"""Written into an extracted checkpoint directory last; holds the archive's digest."""

BLOCK = tarfile.BLOCKSIZE
# PAX and GNU long-name headers hold a few names and numbers; anything bigger is not one.
_MAX_EXTENDED_HEADER = 1 << 20
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


@dataclass
class Progress:
    """How far an extraction is; written by the extracting thread, read by anyone."""

    done: int = 0
    total: int = 0
    seconds: float | None = None
    """How long the last whole extraction took (streaming, writing, syncing), once there was one."""


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

    The stream is read (and hashed) by a thread of its own while this one parses and writes, so
    receiving, hashing and writing overlap. Headers are parsed by tarfile.TarInfo.frombuf; the
    extended headers a CRIU archive may carry (PAX, GNU long names) are handled here.
    """
    reader = _ChunkReader(chunks, size, digest, cancel, progress)  # before the fd: it refuses bad digests
    root_fd = os.open(target, _DIR_FLAGS)
    directories = _Directories(root_fd)
    written: list[str] = []
    with reader as stream:
        try:
            while True:
                member = _next_member(stream, size)
                if member is None:
                    break
                parts = _safe_parts(member.name)
                if member.isdir():
                    if parts:
                        directories.open(parts, member.mode)
                    stream.skip(member.size)
                    continue
                if member.type not in _REGULAR_TYPES:
                    kind = _TYPE_NAMES.get(member.type, f"of tar type {member.type!r}")
                    raise ArchiveError(f"member {member.name!r} is {kind}: only regular files and directories are allowed")
                if not parts:
                    raise ArchiveError(f"member {member.name!r} names no file")
                parent = directories.open(parts[:-1])
                _write_member(stream, member, parent, parts[-1])
                written.append("/".join(parts))
            stream.finish()
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


def ready_digest(directory: str, dir_fd: int | None = None) -> str | None:
    """The digest in ``directory``'s ready marker; None when it is not a whole extraction."""
    try:
        fd = open_regular_file(os.path.join(directory, READY_MARKER), dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", "replace").strip() or None
    finally:
        os.close(fd)


def remove_stale(base: str, keep: Iterable[str]) -> list[str]:
    """Remove from ``base`` whatever is not a whole extraction named in ``keep``; returns the names removed.

    By fd, never following a link: ``base`` itself must be a directory, not a link to one.
    """
    keep = set(keep)
    try:
        base_fd = os.open(base, _DIR_FLAGS)
    except FileNotFoundError:
        return []
    removed = []
    try:
        for name in sorted(os.listdir(base_fd)):
            if name in keep and stat.S_ISDIR(os.stat(name, dir_fd=base_fd, follow_symlinks=False).st_mode) \
                    and ready_digest(name, dir_fd=base_fd):
                continue
            try:
                remove_entry(base_fd, name)
            except OSError as error:
                logger.warning("cannot remove {}: {}", os.path.join(base, name), error)
            removed.append(name)
    finally:
        os.close(base_fd)
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


def _next_member(stream: _ChunkReader, size: int) -> tarfile.TarInfo | None:
    """The next member's header, extended headers applied; None at the archive's end."""
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        block = stream.read_exact(BLOCK, allow_eof=True)
        if block is None or block.count(0) == BLOCK:
            return None  # end of archive (two zero blocks, or a stream that simply ends)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            raise ArchiveError(f"not a valid tar archive at byte {stream.position - BLOCK}: {error}") from None
        data_size = info.size
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if data_size > _MAX_EXTENDED_HEADER:
                raise ArchiveError(f"an extended header of {data_size} bytes is larger than {_MAX_EXTENDED_HEADER}")
            data = stream.read_exact(data_size)
            stream.skip(_padding(data_size))
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = bytes(data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                pass  # a link target: links are refused anyway, on the member it belongs to
            else:
                records = _pax_records(bytes(data))
                if info.type == tarfile.XGLTYPE:
                    if {"path", "size"} & records.keys():
                        raise ArchiveError("a global PAX header sets path or size for every member")
                else:
                    pax.update(records)
            continue
        if any(key.startswith("GNU.sparse") for key in pax):
            raise ArchiveError(f"member {info.name!r} is a sparse file: only regular files and directories are allowed")
        if long_name is not None:
            info.name = long_name.rstrip("/") if info.isdir() else long_name
        if "path" in pax:
            info.name = pax["path"].rstrip("/") if info.isdir() else pax["path"]
        if "size" in pax:
            try:
                info.size = int(pax["size"])
            except ValueError:
                raise ArchiveError(f"member {info.name!r} has an invalid PAX size {pax['size']!r}") from None
        if info.size < 0:
            raise ArchiveError(f"member {info.name!r} has a negative size")
        left = size - stream.position
        if info.size > left:
            raise ArchiveError(f"member {info.name!r} declares {info.size} bytes, more than the {left} left of the archive")
        return info


def _pax_records(data: bytes) -> dict[str, str]:
    """PAX extended header records: "LENGTH KEY=VALUE\\n", LENGTH counting the whole record."""
    records = {}
    position = 0
    while position < len(data):
        if data[position] == 0:
            break  # NUL padding
        space = data.find(b" ", position, position + 20)
        try:
            length = int(data[position:space]) if space > position else 0
        except ValueError:
            length = 0
        end = position + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise ArchiveError("a PAX header holds a malformed record")
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if not equals:
            raise ArchiveError("a PAX header holds a record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position = end
    return records


def _padding(size: int) -> int:
    return -size % BLOCK


def _write_member(stream: _ChunkReader, member: tarfile.TarInfo, parent: int, name: str) -> None:
    try:
        fd = os.open(name, _FILE_FLAGS, (member.mode & 0o777) | 0o600, dir_fd=parent)
    except FileExistsError:
        raise ArchiveError(f"member {member.name!r} appears twice in the archive") from None
    except OSError as error:
        raise ArchiveError(f"cannot create {member.name!r}: {error.strerror}") from None
    try:
        left = member.size
        while left:
            view = stream.read_some(left)
            if view is None:
                raise ArchiveError(f"the archive ends inside member {member.name!r}")
            left -= len(view)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    stream.skip(_padding(member.size))


class _ChunkReader:
    """The archive's bytes, received (and hashed, and counted against ``size``) by a thread of its own.

    The consumer takes memoryviews of the received chunks, so member data goes from the gRPC message to
    the file without another copy. Use as a context manager: leaving it stops the receiving thread.
    """

    _QUEUE = 16

    def __init__(self, chunks, size, digest, cancel, progress) -> None:
        if digest and not digest.startswith("sha256:"):
            raise ArchiveError(f"cannot check digest {digest!r}: only sha256 is supported")
        self._chunks = chunks
        self._size = size
        self._digest = digest
        self._cancel = cancel
        self._progress = progress or Progress()
        self._progress.total = size
        self._queue: queue.Queue = queue.Queue(self._QUEUE)
        self._stop = threading.Event()
        self._pending = memoryview(b"")
        self._ended = False
        self._received_digest: str | None = None
        self.position = 0
        self._thread = threading.Thread(target=self._receive, name="cer-archive-reader", daemon=True)

    def __enter__(self) -> _ChunkReader:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # unblock a receiving thread waiting to put
            except queue.Empty:
                pass
        self._thread.join()

    def _receive(self) -> None:
        hasher = hashlib.sha256() if self._digest else None
        received = 0
        iterator = iter(self._chunks)
        try:
            for chunk in iterator:
                if self._stop.is_set():
                    return
                received += len(chunk)
                if received > self._size:
                    raise ArchiveError(f"the archive is longer than the {self._size} bytes its descriptor gives")
                if hasher is not None:
                    hasher.update(chunk)
                self._put(chunk)
            if hasher is not None:
                self._received_digest = f"sha256:{hasher.hexdigest()}"
            self._put(None)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a gRPC read stream is cancelled when its generator is closed

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _fill(self) -> bool:
        """Make sure some bytes are pending; False at the end of the stream."""
        while not self._pending:
            if self._ended:
                return False
            self.check_cancel()
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                self._ended = True
                return False
            if isinstance(item, BaseException):
                raise item
            self._pending = memoryview(item)
        return True

    def read_some(self, limit: int) -> memoryview | None:
        """Up to ``limit`` bytes (at least one), as a view of a received chunk; None at the end."""
        if not self._fill():
            return None
        view = self._pending[:limit]
        self._pending = self._pending[len(view):]
        self.position += len(view)
        self._progress.done = self.position
        return view

    def read_exact(self, count: int, allow_eof: bool = False) -> bytes | None:
        parts = []
        left = count
        while left:
            view = self.read_some(left)
            if view is None:
                if allow_eof and left == count:
                    return None
                raise ArchiveError(f"the archive ends {left} bytes short of a {count}-byte block at byte {self.position}")
            parts.append(view)
            left -= len(view)
        return b"".join(parts)

    def skip(self, count: int) -> None:
        while count:
            view = self.read_some(count)
            if view is None:
                raise ArchiveError(f"the archive ends {count} bytes early")
            count -= len(view)

    def check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the extraction was cancelled")

    def finish(self) -> None:
        """Read what follows the archive's end marker (padding), then check size and digest."""
        while self.read_some(_COPY_CHUNK) is not None:
            pass
        if self.position != self._size:
            raise ArchiveError(f"the archive is {self.position} bytes, its descriptor says {self._size}")
        if self._digest and self._received_digest != self._digest:
            raise ArchiveError(f"the archive's digest is {self._received_digest}, not {self._digest}")


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
