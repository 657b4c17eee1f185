"""Reading the contents of a checkpoint's tmpfs mounts: ``tmpfs-dev-<dev>.tar.gz.img``.

CRIU stores each tmpfs superblock it dumps as a gzipped GNU tar of the mount's root (made by
``tar --create --gzip --one-file-system --check-links --preserve-permissions --sparse
--numeric-owner``), named by the superblock's device as the mount entry's ``root_dev`` records it
(``tmpfs-<mnt id>.tar.gz.img`` in CRIU before 3.x).

The archive comes from whoever made the checkpoint and cer restores it as root into every pooled
mount namespace, so :func:`read_tmpfs_image` reads it once, completely, into frozen
:class:`TmpfsEntry` values (the files' bytes too when they are few, see :data:`INLINE_BYTES`; else
:func:`entries_with_data` reads them from the archive again as each namespace is filled) and refuses
(``ImageError`` naming the file and the offset in the uncompressed tar) anything that could reach outside
the mount it is restored into:

- names are relative: no absolute names, no ``..``; every entry's directory is the root or a
  directory listed before it, never a symbolic link or a file, so nothing is ever created through
  a link (link targets are kept as they are: a link is only created, never followed);
- a hard link names a regular file listed before it in the same archive;
- devices are read as they are (a privileged container's /dev holds the host's): which ones may be
  created, and where, is the mount plan's call (:mod:`cer.mounts` allows only the character devices a
  container runtime makes in /dev: null, zero, full, random, urandom, tty);
- sizes: the file bytes of one archive, its entry count and the uncompressed stream are bounded
  before anything is allocated, so a gzip bomb or a sparse file claiming terabytes stops early.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from cer.criu.images import ImageFile, RawImage
from cer.errors import ImageError

MAX_TMPFS_BYTES = 64 << 20
"""File bytes one tmpfs archive may hold (sparse files count at their full size)."""
INLINE_BYTES = 256 << 10
"""Up to this many file bytes an archive's files are kept in memory, written into each namespace from
there; beyond it, each fill decompresses the archive again and copies its files as they come (memory that
does not grow with the number of pools, for some CPU per fill)."""
_COPY_CHUNK = 1 << 20
MAX_TMPFS_ENTRIES = 16384
MAX_NAME = 4096
MAX_COMPONENT = 255

_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_KINDS = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "chardev",
          tarfile.BLKTYPE: "blockdev", tarfile.FIFOTYPE: "fifo", **{t: "file" for t in _REGULAR_TYPES}}
# Headers, long names and padding around the file bytes: generous, still bounded.
_STREAM_OVERHEAD_PER_ENTRY = 4 * tarfile.BLOCKSIZE


@dataclass(frozen=True)
class TmpfsEntry:
    """One member of a tmpfs archive, checked. ``name`` is relative to the mount ("" for its root);
    ``kind`` is dir, file, symlink, hardlink, chardev, blockdev or fifo; ``link`` the target of a
    symlink or the name of the file a hard link shares; ``device`` (major, minor) of a device."""

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    data: bytes = field(default=b"", repr=False)
    link: str = ""
    device: tuple[int, int] | None = None
    size: int = 0  # a file's length, also when its bytes are left in the archive


@dataclass(frozen=True)
class TmpfsContents:
    """What one tmpfs held: the mount root's own mode, owner and time (``root``, None when the
    archive does not list it) and every entry below it, directories before what they hold."""

    image: str
    root: TmpfsEntry | None
    entries: tuple[TmpfsEntry, ...]
    size: int  # file bytes
    source: ImageFile | None = None
    """The archive, when the files' bytes were left in it (more than :data:`INLINE_BYTES`)."""

    @property
    def devices(self) -> tuple[TmpfsEntry, ...]:
        return tuple(entry for entry in self.entries if entry.kind in ("chardev", "blockdev"))


def tmpfs_image_names(root_dev: int, mnt_id: int) -> tuple[str, str]:
    """The names CRIU gives a tmpfs archive: by superblock device (CRIU 3+), else by mount id."""
    return f"tmpfs-dev-{root_dev}.tar.gz.img", f"tmpfs-{mnt_id}.tar.gz.img"


def read_tmpfs_image(path: str | os.PathLike[str], max_bytes: int = MAX_TMPFS_BYTES,
                     max_entries: int = MAX_TMPFS_ENTRIES, inline_bytes: int = INLINE_BYTES) -> TmpfsContents:
    """Read and check a tmpfs archive; see the module docstring for what is refused."""
    path = str(path)
    with RawImage(path) as raw:
        reader = _ArchiveReader(path, max_bytes, max_entries, inline_bytes)
        with _members(raw.file, path, max_bytes, max_entries) as archive:
            for member in archive:
                reader.add(member, archive)
        entries = tuple(reader.entries)
        if reader.size > inline_bytes:
            entries = tuple(replace(entry, data=b"") for entry in entries)
            return TmpfsContents(path, reader.root, entries, reader.size, source=raw.identity)
        return TmpfsContents(image=path, root=reader.root, entries=entries, size=reader.size)


@contextlib.contextmanager
def _members(file: BinaryIO, path: str, max_bytes: int, max_entries: int):
    """The archive's members, one pass ("r|": no seeking back; tarfile parses GNU and PAX long names and
    sparse maps), any failure to read it an ImageError at its uncompressed offset."""
    stream = _BoundedStream(gzip.GzipFile(fileobj=file, mode="rb"), path,
                            max_bytes + max_entries * _STREAM_OVERHEAD_PER_ENTRY + (1 << 20))
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            yield archive
    except ImageError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, OverflowError) as e:
        raise ImageError(path, stream.position, f"not a readable gzipped tar (uncompressed offset): {e}") from e


def entries_with_data(contents: TmpfsContents) -> Iterator[tuple[TmpfsEntry, bytes | BinaryIO]]:
    """Each entry of ``contents`` in order, with its file's bytes: the kept bytes, or (for an archive whose
    files were left in it) a stream of them read from the archive as it is decompressed again; a stream is
    valid until the next entry. Raises ImageError when the archive is no longer the one that was read."""
    if contents.source is None:
        for entry in contents.entries:
            yield entry, entry.data
        return
    fd = contents.source.reopen()  # OSError naming the file when it changed or went
    with os.fdopen(fd, "rb") as file:
        expected = iter(contents.entries)
        with _members(file, contents.image, contents.size, len(contents.entries) + 1) as archive:
            for member in archive:
                name = "/".join(part for part in member.name.split("/") if part not in ("", "."))
                if name == "":
                    continue
                entry = next(expected, None)
                if entry is None or entry.name != name or (entry.kind == "file" and member.size != entry.size):
                    raise ImageError(contents.image, member.offset, "the archive changed after it was read")
                yield entry, (archive.extractfile(member) if entry.kind == "file" and entry.size else b"")
        if next(expected, None) is not None:
            raise ImageError(contents.image, 0, "the archive changed after it was read: it ends early")


class _BoundedStream(io.RawIOBase):
    """The uncompressed tar, refused once it grows beyond ``limit`` bytes."""

    def __init__(self, inner: gzip.GzipFile, path: str, limit: int) -> None:
        self._inner = inner
        self._path = path
        self._limit = limit
        self.position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._limit - self.position + 1
        data = self._inner.read(min(size, self._limit - self.position + 1))
        self.position += len(data)
        if self.position > self._limit:
            raise ImageError(self._path, self.position, f"the uncompressed archive exceeds {self._limit} bytes")
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ArchiveReader:
    def __init__(self, path: str, max_bytes: int, max_entries: int, inline_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.inline_bytes = inline_bytes
        self.root: TmpfsEntry | None = None
        self.entries: list[TmpfsEntry] = []
        self.kinds: dict[str, str] = {}
        self.size = 0

    def error(self, member: tarfile.TarInfo, problem: str) -> ImageError:
        return ImageError(self.path, member.offset, f"tar member {member.name!r}: {problem}")

    def add(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        kind = _KINDS.get(member.type)
        if kind is None:
            raise self.error(member, f"unsupported member type {member.type!r}")
        if len(self.entries) >= self.max_entries:
            raise self.error(member, f"more than {self.max_entries} entries")
        name = self.relative(member, member.name)
        common = {"mode": stat.S_IMODE(member.mode), "uid": self.ident(member, member.uid, "uid"),
                  "gid": self.ident(member, member.gid, "gid"), "mtime_ns": self.mtime(member)}
        if name == "":
            if kind != "dir" or self.root is not None or self.entries:
                raise self.error(member, "the archive's root must be a directory, listed once and first")
            self.root = TmpfsEntry(name, kind, **common)
            return
        if name in self.kinds:
            raise self.error(member, "listed twice")
        parent = name.rpartition("/")[0]
        if parent and self.kinds.get(parent) != "dir":
            found = self.kinds.get(parent)
            raise self.error(member, f"its directory {parent!r} is " +
                             (f"a {found}: nothing may be created through it" if found else "not listed before it"))
        entry = self.entry(member, archive, name, kind, common)
        self.kinds[name] = kind
        self.entries.append(entry)

    def entry(self, member: tarfile.TarInfo, archive: tarfile.TarFile, name: str, kind: str,
              common: dict) -> TmpfsEntry:
        if kind == "file":
            if member.size > self.max_bytes - self.size:
                raise self.error(member, f"{member.size} bytes: the archive's files would exceed "
                                 f"{self.max_bytes} bytes")
            kept, length = [], 0
            if member.size:
                source = archive.extractfile(member)
                while chunk := source.read(_COPY_CHUNK):
                    length += len(chunk)
                    if self.size + length <= self.inline_bytes:  # past it, the bytes stay in the archive
                        kept.append(chunk)
            if length != member.size:
                raise self.error(member, f"holds {length} bytes, its header says {member.size}")
            self.size += length
            data = b"".join(kept) if self.size <= self.inline_bytes else b""
            return TmpfsEntry(name, kind, data=data, size=length, **common)
        if kind == "symlink":
            if not member.linkname or len(member.linkname) > MAX_NAME or "\0" in member.linkname:
                raise self.error(member, "a symbolic link without a usable target")
            return TmpfsEntry(name, kind, link=member.linkname, **common)
        if kind == "hardlink":
            target = self.relative(member, member.linkname)
            if self.kinds.get(target) != "file":
                raise self.error(member, f"a hard link to {member.linkname!r}, which is not a regular file "
                                 "listed before it")
            return TmpfsEntry(name, kind, link=target, **common)
        if kind in ("chardev", "blockdev"):
            return TmpfsEntry(name, kind, device=(member.devmajor, member.devminor), **common)
        return TmpfsEntry(name, kind, **common)  # dir, fifo

    def relative(self, member: tarfile.TarInfo, name: str) -> str:
        if name.startswith("/"):
            raise self.error(member, f"absolute name {name!r}")
        if len(name) > MAX_NAME or "\0" in name:
            raise self.error(member, "name too long or not a path")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.error(member, f"name {name!r} leads out through '..'")
        if any(len(part.encode(errors="surrogateescape")) > MAX_COMPONENT for part in parts):
            raise self.error(member, f"a component of {name!r} is longer than {MAX_COMPONENT} bytes")
        return "/".join(parts)

    def ident(self, member: tarfile.TarInfo, value: int, what: str) -> int:
        if not 0 <= value < (1 << 32) - 1:
            raise self.error(member, f"{what} {value} out of range")
        return value

    def mtime(self, member: tarfile.TarInfo) -> int:
        try:
            mtime = member.mtime
            ns = int(mtime * 1_000_000_000) if isinstance(mtime, float) else int(mtime) * 1_000_000_000
        except (OverflowError, ValueError):
            raise self.error(member, f"modification time {member.mtime!r} is not a time") from None
        if not -(1 << 62) < ns < (1 << 62):
            raise self.error(member, f"modification time {member.mtime!r} out of range")
        return ns
