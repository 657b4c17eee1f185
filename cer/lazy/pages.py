"""The pages a lazy restore still lacks, task by task, and where in the checkpoint each one is.

For every task of the checkpoint (pstree.img), the pagemap entries that CRIU marked lazy (PE_LAZY: private
anonymous memory, which ``criu restore --lazy-pages`` leaves to the page server) become :class:`Ranges` of
missing pages, split where a VMA of mm-<pid>.img ends because one UFFDIO_COPY may not cross VMAs. Each range
remembers its address at dump time (``image``): the process may move a range (mremap) before it is served.
The bytes come from the task's pages-<id>.img, mapped read-only and shared (:class:`PagesFile`): every
server of a checkpoint reads the same page cache, nothing is copied per restore.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import stat
from dataclasses import dataclass

from cer.criu import images
from cer.criu.images import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT
from cer.errors import ImageError
from cer.linux.libc import libc

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class PagesFile:
    """A pages-<id>.img mapped read-only: ``address`` is where its first byte is in this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(path, 0, "not a regular file")
            self.size = st.st_size
            if self.size == 0:
                self.address = 0
                return
            # MAP_POPULATE: the page tables are filled while the server waits as a spare, not during a restore.
            address = libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, 0)
            if address in (None, _MAP_FAILED):
                raise ImageError(path, 0, f"cannot map: {os.strerror(ctypes.get_errno())}")
            self.address = address
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.address:
            libc.munmap(self.address, self.size)
            self.address = 0


class Ranges:
    """Disjoint page ranges ``[start, end)``, each with the address its first page had at dump time, sorted by
    start. Everything here is page-aligned."""

    def __init__(self, items: list[list[int]] | None = None) -> None:
        self._items = items or []  # [start, end, image]
        self._starts = [item[0] for item in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> Ranges:
        return Ranges([list(item) for item in self._items])

    @property
    def pages(self) -> int:
        return sum(end - start for start, end, _image in self._items) // PAGE_SIZE

    def first(self) -> tuple[int, int, int] | None:
        return tuple(self._items[0]) if self._items else None

    def find(self, address: int) -> tuple[int, int, int] | None:
        """The range holding ``address``, or None."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and address < self._items[index][1]:
            return tuple(self._items[index])
        return None

    def next_within(self, start: int, end: int) -> tuple[int, int] | None:
        """The first part of ``[start, end)`` that one range here covers, or None."""
        if start >= end:
            return None
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        while index < len(self._items):
            low, high, _image = self._items[index]
            if low >= end:
                return None
            if high > start:
                return max(low, start), min(high, end)
            index += 1
        return None

    def take(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Remove ``[start, end)`` and return the pieces of it that were here, as ``(start, end, image)``."""
        taken = []
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        while index < len(self._items):
            item = self._items[index]
            low, high, image = item
            if low >= end:
                break
            if high <= start:
                index += 1
                continue
            cut_low, cut_high = max(low, start), min(high, end)
            taken.append((cut_low, cut_high, image + cut_low - low))
            pieces = []
            if low < cut_low:
                pieces.append([low, cut_low, image])
            if cut_high < high:
                pieces.append([cut_high, high, image + cut_high - low])
            self._items[index:index + 1] = pieces
            self._starts[index:index + 1] = [piece[0] for piece in pieces]
            index += len(pieces)
        return taken

    def insert(self, start: int, end: int, image: int) -> None:
        """Add a range that overlaps none here."""
        index = bisect.bisect_left(self._starts, start)
        self._items.insert(index, [start, end, image])
        self._starts.insert(index, start)

    def move(self, source: int, target: int, length: int) -> None:
        """What mremap did: the pages of ``[source, source + length)`` now live at ``target``."""
        moved = self.take(source, source + length)
        self.take(target, target + length)  # whatever was mapped there is gone
        for low, high, image in moved:
            self.insert(low - source + target, high - source + target, image)


@dataclass
class TaskImage:
    """What a checkpoint says about one task's lazy memory: its missing ranges at the start of a restore, and
    for each pagemap entry where in which pages file its bytes are."""

    pid: int
    ranges: Ranges
    pages: PagesFile
    _entry_starts: list[int]
    _entries: list[tuple[int, int, int]]  # image start, image end, offset in the pages file

    def source(self, image: int, length: int) -> int | None:
        """The address in this process of the bytes of ``[image, image + length)``, or None when they do not lie
        in one lazy pagemap entry (the caller split them wrong, or the image does not have them)."""
        index = bisect.bisect_right(self._entry_starts, image) - 1
        if index < 0:
            return None
        start, end, offset = self._entries[index]
        if image + length > end:
            return None
        return self.pages.address + offset + image - start


def load_checkpoint(directory: str) -> dict[int, TaskImage]:
    """Every task of the checkpoint in ``directory``, by pid. ImageError when an image is missing, garbled, or
    needs what this server does not do (pages in a parent checkpoint)."""
    files: dict[int, PagesFile] = {}
    tasks = {}
    try:
        for entry in images.read_entries(os.path.join(directory, "pstree.img"), images.PSTREE):
            tasks[entry.pid] = _load_task(directory, entry.pid, files)
    except BaseException:
        for file in files.values():
            file.close()
        raise
    if not tasks:
        raise ImageError(os.path.join(directory, "pstree.img"), 0, "no tasks")
    return tasks


def _load_task(directory: str, pid: int, files: dict[int, PagesFile]) -> TaskImage:
    pagemap_path = os.path.join(directory, f"pagemap-{pid}.img")
    head, entries = images.read_pagemap(pagemap_path)
    vmas = images.read_single_entry(os.path.join(directory, f"mm-{pid}.img"), images.MM).vmas
    if head.pages_id not in files:
        files[head.pages_id] = PagesFile(os.path.join(directory, f"pages-{head.pages_id}.img"))
    pages = files[head.pages_id]
    offset = 0
    lazy: list[tuple[int, int, int]] = []
    previous_end = 0
    for entry in entries:
        count = images.pagemap_nr_pages(entry)
        flags = images.pagemap_flags(entry)
        start, length = entry.vaddr, count * PAGE_SIZE
        if start % PAGE_SIZE or start < previous_end:
            raise ImageError(pagemap_path, 0, f"pagemap entry at {start:#x} is unaligned or out of order")
        previous_end = start + length
        if flags & PE_PARENT:
            if flags & PE_LAZY:
                raise ImageError(pagemap_path, 0, "lazy pages in a parent checkpoint: cer's lazy-pages server does "
                                                  "not read those (restore with criu lazy-pages)")
            continue
        if not flags & PE_PRESENT:
            continue  # zero pages: not in the pages file, a fault there gets a zero page
        if flags & PE_LAZY:
            lazy.append((start, start + length, offset))
        offset += length
    if offset > pages.size:
        raise ImageError(pages.path, pages.size, f"the pagemap of task {pid} needs {offset} bytes, the file has "
                                                 f"{pages.size}")
    items = []
    vma_index = 0
    spans = sorted((vma.start, vma.end) for vma in vmas)
    for start, end, _offset in lazy:
        while start < end:
            while vma_index < len(spans) and spans[vma_index][1] <= start:
                vma_index += 1
            if vma_index == len(spans) or spans[vma_index][0] > start:
                raise ImageError(pagemap_path, 0, f"lazy pages at {start:#x} lie in no VMA of mm-{pid}.img")
            high = min(end, spans[vma_index][1])
            items.append([start, high, start])
            start = high
    return TaskImage(pid, Ranges(items), pages, [entry[0] for entry in lazy], lazy)
