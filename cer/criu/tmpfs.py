"""Reading the contents of a checkpoint's tmpfs mounts: ``tmpfs-dev-<dev>.tar.gz.img``.

CRIU stores each tmpfs superblock it dumps as a gzipped GNU tar of the mount's root (made by
``tar --create --gzip --one-file-system --check-links --preserve-permissions --sparse
--numeric-owner``), named by the superblock's device as the mount entry's ``root_dev`` records it
(``tmpfs-<mnt id>.tar.gz.img`` in CRIU before 3.x).

The archive comes from whoever made the checkpoint and cer restores it as root into every pooled
mount namespace, so :func:`read_tmpfs_image` reads it once, completely, into frozen
:class:`TmpfsEntry` values and refuses (``ImageError`` naming the file and the offset in the
uncompressed tar) anything that could reach outside the mount it is restored into:

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

import gzip
import io
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field

from cer.criu.images import RawImage
from cer.errors import ImageError
# ALLOWED_DEVICES: the character devices runc (and the OCI runtime spec's default set) creates in a container's
# /dev, the only ones cer makes; defined beside the code that makes them, which an action script imports alone.
from cer.mounting import ALLOWED_DEVICES, allowed_device  # noqa: F401

MAX_TMPFS_BYTES = 64 << 20
"""File bytes one tmpfs archive may hold (sparse files count at their full size): the contents are
kept in memory by the pool and written into every namespace it builds."""
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


@dataclass(frozen=True)
class TmpfsContents:
    """What one tmpfs held: the mount root's own mode, owner and time (``root``, None when the
    archive does not list it) and every entry below it, directories before what they hold."""

    image: str
    root: TmpfsEntry | None
    entries: tuple[TmpfsEntry, ...]
    size: int  # file bytes

    @property
    def devices(self) -> tuple[TmpfsEntry, ...]:
        return tuple(entry for entry in self.entries if entry.kind in ("chardev", "blockdev"))


def tmpfs_image_names(root_dev: int, mnt_id: int) -> tuple[str, str]:
    """The names CRIU gives a tmpfs archive: by superblock device (CRIU 3+), else by mount id."""
    return f"tmpfs-dev-{root_dev}.tar.gz.img", f"tmpfs-{mnt_id}.tar.gz.img"


def read_tmpfs_image(path: str | os.PathLike[str], max_bytes: int = MAX_TMPFS_BYTES,
                     max_entries: int = MAX_TMPFS_ENTRIES) -> TmpfsContents:
    """Read and check a tmpfs archive; see the module docstring for what is refused."""
    path = str(path)
    with RawImage(path) as raw:
        stream = _BoundedStream(gzip.GzipFile(fileobj=raw.file, mode="rb"), path,
                                max_bytes + max_entries * _STREAM_OVERHEAD_PER_ENTRY + (1 << 20))
        reader = _ArchiveReader(path, stream, max_bytes, max_entries)
        try:
            # "r|": one pass, no seeking back; tarfile parses GNU and PAX long names and sparse maps.
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    reader.add(member, archive)
        except ImageError:
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, OverflowError) as e:
            raise ImageError(path, stream.position, f"not a readable gzipped tar (uncompressed offset): {e}") from e
        return TmpfsContents(image=path, root=reader.root, entries=tuple(reader.entries), size=reader.size)


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
    def __init__(self, path: str, stream: _BoundedStream, max_bytes: int, max_entries: int) -> None:
        self.path = path
        self.stream = stream
        self.max_bytes = max_bytes
        self.max_entries = max_entries
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
            data = archive.extractfile(member).read() if member.size else b""
            if len(data) != member.size:
                raise self.error(member, f"holds {len(data)} bytes, its header says {member.size}")
            self.size += len(data)
            return TmpfsEntry(name, kind, data=data, **common)
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
