"""Reading CRIU image files: the magic header, size-prefixed protobuf entries and raw payloads.

An image file (criu.org/Images; CRIU's lib/pycriu/images/images.py reads them likewise) is::

    IMAGE   ::= [IMG_COMMON_MAGIC] TYPE_MAGIC { ENTRY }      (u32 little-endian magics)
    ENTRY   ::= SIZE MESSAGE [PAYLOAD]                       (SIZE: u32 little-endian)

Only inventory.img lacks the common magic. PAYLOAD is raw data some entry types carry after the
message (SysV shm bytes, semaphore values, message texts), its length given by the message and
padded as the writer pads it. pages-*.img files are raw pages without any header.

Every read is checked against what the file holds before anything is allocated, so a truncated,
corrupt or hostile image raises :class:`~cer.errors.ImageError` naming the file and the offset
instead of crashing, hanging or allocating what a garbled length claims.
"""

from __future__ import annotations

import errno
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from google.protobuf.message import DecodeError, Message

from cer.criu import criu_pb2 as pb
from cer.errors import ImageError, UnsafePathError
from cer.files import open_regular_file

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940

# The largest protobuf entry accepted. The entries cer reads are tens of bytes; mount entries,
# the largest planned, carry a few paths and an option string. A bigger size field is corruption.
MAX_ENTRY_SIZE = 1 << 20

_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class ImageType:
    """One kind of CRIU image: its name as crit prints it, its magic and its entries' message."""

    name: str
    magic: int
    entry: type[Message]
    common_magic: bool = True  # False: the type magic alone opens the file (inventory.img)


INVENTORY = ImageType("INVENTORY", 0x58313116, pb.inventory_entry, common_magic=False)
PSTREE = ImageType("PSTREE", 0x50273030, pb.pstree_entry)
IDS = ImageType("IDS", 0x54432030, pb.task_kobj_ids_entry)
UTSNS = ImageType("UTSNS", 0x54473203, pb.utsns_entry)
IPC_VAR = ImageType("IPC_VAR", 0x53115007, pb.ipc_var_entry)
IPCNS_SHM = ImageType("IPCNS_SHM", 0x46283044, pb.ipc_shm_entry)
IPCNS_MSG = ImageType("IPCNS_MSG", 0x55453737, pb.ipc_msg_entry)
IPCNS_SEM = ImageType("IPCNS_SEM", 0x59573019, pb.ipc_sem_entry)
# The first entry of a pagemap is a pagemap_head; every later one a pagemap_entry.
PAGEMAP = ImageType("PAGEMAP", 0x56084025, pb.pagemap_entry)
MNTS = ImageType("MNTS", 0x55563928, pb.mnt_entry)
MM = ImageType("MM", 0x57492820, pb.mm_entry)

IMAGE_TYPES = (INVENTORY, PSTREE, IDS, UTSNS, IPC_VAR, IPCNS_SHM, IPCNS_MSG, IPCNS_SEM, PAGEMAP, MNTS, MM)
_BY_MAGIC = {t.magic: t for t in IMAGE_TYPES}


@dataclass(frozen=True)
class ImageFile:
    """A regular file of an image directory as it was when cer read it. cer keeps where data lie in it,
    not the data: :meth:`reopen` opens it again to read them, and refuses a file that has changed since."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> "ImageFile":
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def reopen(self) -> int:
        """An fd of the file, read-only; OSError when it cannot be opened or is no longer the file that was read."""
        try:
            fd = open_regular_file(self.path)
        except OSError as e:
            raise OSError(e.errno, f"{self.path}: {e.strerror}", self.path) from None
        if ImageFile.of(self.path, os.fstat(fd)) != self:
            os.close(fd)
            raise OSError(errno.ESTALE, f"{self.path}: the file changed after the checkpoint was read (reload the "
                          "configuration)", self.path)
        return fd


class RawImage:
    """A regular file read with every read checked against its size: a pages-<id>.img as is,
    and the base of :class:`ImageReader`. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], data: bytes | None = None) -> None:
        """Open the file at ``path``, or read ``data`` (``path`` then only names it in errors)."""
        self.path = str(path)
        self.offset = 0
        if data is not None:
            self._file = io.BytesIO(data)
            self.size = len(data)
            self.identity = None  # no file to reopen
            return
        try:
            # CRIU writes regular files, never links: a FIFO or a link planted in an image directory is refused.
            fd = open_regular_file(self.path)
        except UnsafePathError as e:
            raise ImageError(self.path, 0, e.strerror) from e
        except OSError as e:
            raise ImageError(self.path, 0, f"cannot open: {e.strerror}") from e
        st = os.fstat(fd)
        self.identity = ImageFile.of(self.path, st)
        # Buffered: read(n) returns n bytes unless the file ends, however large n (one read(2)
        # stops at 2 GiB), into one allocation.
        self._file = os.fdopen(fd, "rb")
        self.size = st.st_size

    def close(self) -> None:
        self._file.close()

    @property
    def file(self) -> BinaryIO:
        """The open file, for payloads in a framing of their own (a tmpfs tar): whoever reads it
        bounds what it reads."""
        return self._file

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def remaining(self) -> int:
        return self.size - self.offset

    def error(self, problem: str, offset: int | None = None) -> ImageError:
        return ImageError(self.path, self.offset if offset is None else offset, problem)

    def read_exact(self, length: int, what: str) -> bytes:
        """Read ``length`` bytes at the current offset, or fail before allocating anything."""
        if length > self.remaining:
            raise self.error(f"{what}: needs {length} bytes, the file ends {self.remaining} bytes later")
        data = self._file.read(length) if length else b""
        if len(data) != length:  # the file shrank under us
            raise self.error(f"{what}: the file ends {len(data)} bytes later")
        self.offset += length
        return data

    def read_at(self, offset: int, length: int, what: str) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.error(f"{what}: bytes {offset}..{offset + length} lie beyond the end ({self.size})", offset)
        self._file.seek(offset)
        self.offset = offset
        return self.read_exact(length, what)


class ImageReader(RawImage):
    """An open CRIU image, its magic checked, read entry by entry.

    ``ImageReader(path, IPCNS_SEM)`` insists on that type; ``ImageReader(path)`` accepts any type
    of :data:`IMAGE_TYPES` and tells which in :attr:`type`. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str], image_type: ImageType | None = None,
                 data: bytes | None = None) -> None:
        super().__init__(path, data)
        try:
            self.type = self._read_magic(image_type)
        except BaseException:
            self.close()
            raise

    def _read_magic(self, expected: ImageType | None) -> ImageType:
        if self.size == 0:
            raise self.error("empty file, not a CRIU image")
        (magic,) = _U32.unpack(self.read_exact(4, "magic"))
        if magic == IMG_SERVICE_MAGIC:
            raise self.error("a CRIU service file (stats, irmap cache), not an image this reader knows", 0)
        if magic == IMG_COMMON_MAGIC:
            (magic,) = _U32.unpack(self.read_exact(4, "image type magic"))
            found = _BY_MAGIC.get(magic)
            if found is None or not found.common_magic:
                raise self.error(f"unknown image type magic {magic:#010x}", self.offset - 4)
        else:
            found = _BY_MAGIC.get(magic)
            if found is None or found.common_magic:
                raise self.error(f"unknown magic {magic:#010x}: not a CRIU image this reader knows", 0)
        if expected is not None and found is not expected:
            raise self.error(f"an image of type {found.name}, not {expected.name}", 0)
        return found

    def read_entry(self, message_type: type[Message] | None = None) -> Message | None:
        """Parse the next entry as ``message_type`` (default: the image type's), None at the end."""
        if self.remaining == 0:
            return None
        start = self.offset
        (size,) = _U32.unpack(self.read_exact(4, "entry size"))
        if size > MAX_ENTRY_SIZE:
            raise self.error(f"entry size {size} exceeds the limit of {MAX_ENTRY_SIZE} bytes", start)
        if size > self.remaining:
            raise self.error(f"entry of {size} bytes: the file ends {self.remaining} bytes after its size", start)
        raw = self.read_exact(size, "entry")
        message = (message_type or self.type.entry)()
        try:
            message.ParseFromString(raw)
        except (DecodeError, ValueError, RuntimeError) as e:
            raise self.error(f"garbled {message.DESCRIPTOR.name} entry: {e}", start) from e
        if not message.IsInitialized():
            missing = ", ".join(message.FindInitializationErrors())
            raise self.error(f"{message.DESCRIPTOR.name} entry lacks required fields: {missing}", start)
        return message

    def read_payload(self, length: int, align: int, what: str) -> bytes:
        """Read the ``length`` raw bytes that follow an entry, and skip their padding to ``align``."""
        padded = -(-length // align) * align
        if padded > self.remaining:
            raise self.error(f"{what}: needs {padded} bytes, the file ends {self.remaining} bytes later")
        data = self.read_exact(length, what)
        self.read_exact(padded - length, f"{what} padding")
        return data

    def skip_payload(self, length: int, align: int, what: str) -> int:
        """Step over the ``length`` raw bytes that follow an entry and their padding; return where they start."""
        padded = -(-length // align) * align
        if padded > self.remaining:
            raise self.error(f"{what}: needs {padded} bytes, the file ends {self.remaining} bytes later")
        start = self.offset
        self.offset += padded
        self._file.seek(self.offset)
        return start

    def entries(self) -> Iterator[Message]:
        """Every remaining entry, parsed as the image type's message."""
        while (entry := self.read_entry()) is not None:
            yield entry

    def entries_with_offsets(self) -> Iterator[tuple[int, Message]]:
        """Every remaining entry with the offset its size word starts at (for errors that point at it, or to copy
        it byte for byte). The caller may read an entry's payload before it asks for the next entry."""
        while True:
            offset = self.offset
            entry = self.read_entry()
            if entry is None:
                return
            yield offset, entry


def text(value: str | bytes) -> str:
    """A proto2 string field as str: the upb runtime hands out one that is not UTF-8 as bytes."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def read_entries(path: str | os.PathLike[str], image_type: ImageType) -> list[Message]:
    """All entries of an image that carries no payloads."""
    with ImageReader(path, image_type) as image:
        return list(image.entries())


def read_single_entry(path: str | os.PathLike[str], image_type: ImageType, data: bytes | None = None) -> Message:
    """The one entry of an image that holds exactly one (inventory, ids, utsns, ipcns-var); from ``data`` when
    given (``path`` then names it in errors)."""
    with ImageReader(path, image_type, data) as image:
        entry = image.read_entry()
        if entry is None:
            raise image.error(f"no {image_type.entry.DESCRIPTOR.name} entry")
        if image.remaining:
            raise image.error("unexpected data after the only entry")
        return entry


def encode_image(image_type: ImageType, entries: list[Message]) -> bytes:
    """An image file holding ``entries`` (messages of the type's entry, no payloads), framed as CRIU writes it."""
    magics = (IMG_COMMON_MAGIC, image_type.magic) if image_type.common_magic else (image_type.magic,)
    parts = [_U32.pack(magic) for magic in magics]
    for entry in entries:
        if not isinstance(entry, image_type.entry):
            raise TypeError(f"a {type(entry).__name__} in an image of {image_type.entry.DESCRIPTOR.name} entries")
        raw = entry.SerializeToString()
        parts += [_U32.pack(len(raw)), raw]
    return b"".join(parts)


def read_pagemap(path: str | os.PathLike[str]) -> tuple[pb.pagemap_head, list[pb.pagemap_entry]]:
    """A pagemap image: its head (which names the pages image) and its entries."""
    with ImageReader(path, PAGEMAP) as image:
        head = image.read_entry(pb.pagemap_head)
        if head is None:
            raise image.error("no pagemap_head entry")
        return head, list(image.entries())


# pages-*.img hold pages of the dumping machine, x86_64 for cer.
PAGE_SIZE = 4096
# pagemap_entry.flags (criu/include/pagemap.h)
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2


def pagemap_nr_pages(entry: pb.pagemap_entry) -> int:
    """The page count of a pagemap entry, wherever the writing CRIU version put it."""
    return entry.nr_pages if entry.HasField("nr_pages") else entry.compat_nr_pages


def pagemap_flags(entry: pb.pagemap_entry) -> int:
    """A pagemap entry's flags; CRIU versions before flags existed wrote only whether the pages are the parent's."""
    return entry.flags if entry.HasField("flags") else (PE_PARENT if entry.in_parent else PE_PRESENT)

