"""What cer rebuilds from a checkpoint directory: the root task's IPC, UTS and mount namespaces.

:func:`read_checkpoint` reads them into frozen dataclasses that are safe to hand between actors
and threads; :func:`cer.linux.sysv.populate_ipc_namespace` turns an :class:`IpcContents` back
into a live IPC namespace, :mod:`cer.mounts` a :class:`~cer.criu.mountpoints.MountTree` into mounts.
This is data only: what a fresh namespace of this kernel holds, and whether a checkpoint's differs, is
decided by the namespace layer (:func:`cer.linux.sysv.is_fresh_ipc_namespace`), which makes the syscalls.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from cer.criu import criu_pb2 as pb
from cer.criu.images import (
    IDS,
    INVENTORY,
    IPC_VAR,
    IPCNS_MSG,
    IPCNS_SEM,
    IPCNS_SHM,
    MM,
    PAGE_SIZE,
    PAGEMAP,
    PE_PRESENT,
    PSTREE,
    UTSNS,
    ImageFile,
    ImageReader,
    ImageType,
    RawImage,
    pagemap_flags,
    pagemap_nr_pages,
    read_single_entry,
    text,
)
from cer.criu.mountpoints import MountTree, read_mount_tree
from cer.errors import ImageError

# The image set version every CRIU since 1.x writes (CRTOOLS_IMAGES_V1_1 in criu/include/magic.h).
IMAGES_VERSION = 2
# vma_entry.status of a SysV shm attachment (criu/include/image.h); its shmid is the segment's id.
VMA_AREA_SYSVIPC = 1 << 10

# ipc_var_entry fields and the sysctl each one records, as CRIU's ipc_sysctl_req() pairs them.
# auto_msgmni is left out: Linux ignores it since 4.0.
IPC_VAR_SYSCTLS = (
    ("sem_ctls", "kernel.sem"),
    ("msg_ctlmax", "kernel.msgmax"),
    ("msg_ctlmnb", "kernel.msgmnb"),
    ("msg_ctlmni", "kernel.msgmni"),
    ("shm_ctlmax", "kernel.shmmax"),
    ("shm_ctlall", "kernel.shmall"),
    ("shm_ctlmni", "kernel.shmmni"),
    ("shm_rmid_forced", "kernel.shm_rmid_forced"),
    ("mq_queues_max", "fs.mqueue.queues_max"),
    ("mq_msg_max", "fs.mqueue.msg_max"),
    ("mq_msgsize_max", "fs.mqueue.msgsize_max"),
    ("mq_msg_default", "fs.mqueue.msg_default"),
    ("mq_msgsize_default", "fs.mqueue.msgsize_default"),
    ("msg_next_id", "kernel.msg_next_id"),
    ("sem_next_id", "kernel.sem_next_id"),
    ("shm_next_id", "kernel.shm_next_id"),
)
SEM_CTLS_COUNT = 4  # kernel.sem: semmsl, semmns, semopm, semmni

SysctlValue = int | tuple[int, ...]
"""A recorded sysctl's value: one integer, or a tuple for one that holds several (kernel.sem)."""


@dataclass(frozen=True)
class UtsContents:
    """The host and domain name of a checkpoint's UTS namespace.

    Bytes that are not UTF-8 are kept as surrogate escapes: encode with
    ``"surrogateescape"`` to get the recorded bytes back.
    """

    nodename: str
    domainname: str


@dataclass(frozen=True)
class ShmPages:
    """Where a segment's dumped pages lie in an image file, not the pages themselves: ``runs`` of
    ``(offset in the segment, length, offset in source)``. What no run covers was never written before the
    dump: a fresh segment reads zero there, and filling it costs nothing (CRIU's restore leaves it alone too).
    ``source`` is None when no run is left."""

    source: ImageFile | None
    runs: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.runs and self.source is None:
            raise ValueError("pages to copy need the file they lie in")
        if any(start < 0 or length <= 0 or offset < 0 for start, length, offset in self.runs):
            raise ValueError(f"runs must have non-negative offsets and positive lengths: {self.runs}")

    @property
    def nbytes(self) -> int:
        """The bytes a fill writes."""
        return sum(length for _, length, _ in self.runs)


@dataclass(frozen=True)
class ShmSegment:
    """A SysV shared memory segment. ``key`` is the 32-bit key as CRIU records it (unsigned);
    ``mode`` is the recorded ipc_perm mode, of which the permission bits are restored.
    ``data`` is its contents: ``size`` bytes, or (as :func:`read_checkpoint` gives it) a
    :class:`ShmPages` naming where the dumped pages lie in the image. ``hugetlb_flag`` is CRIU's
    shmget flag for a segment backed by huge pages (SHM_HUGETLB and the page size), 0 otherwise."""

    id: int
    key: int
    mode: int
    uid: int
    gid: int
    size: int
    data: bytes | ShmPages = field(repr=False)
    hugetlb_flag: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.data, ShmPages):
            end = max((start + length for start, length, _ in self.data.runs), default=0)
            if end > self.size:
                raise ValueError(f"shm segment {self.id}: pages up to byte {end} for a size of {self.size}")
        elif len(self.data) != self.size:
            raise ValueError(f"shm segment {self.id}: {len(self.data)} bytes of data for a size of {self.size}")

    def read_bytes(self) -> bytes:
        """The whole contents as bytes, zeros where no page was dumped: for checks and tools. Filling a
        namespace never builds them (it copies the runs from the image file)."""
        if not isinstance(self.data, ShmPages):
            return self.data
        contents = bytearray(self.size)
        if self.data.runs:
            fd = self.data.source.reopen()
            try:
                for start, length, source_offset in self.data.runs:
                    contents[start:start + length] = os.pread(fd, length, source_offset)
            finally:
                os.close(fd)
        return bytes(contents)

    @property
    def prefill_bytes(self) -> int:
        """The memory a namespace holding it costs once filled: the bytes written, or the whole segment when
        it is backed by huge pages (which shmget reserves at once)."""
        if self.hugetlb_flag:
            return self.size
        return self.data.nbytes if isinstance(self.data, ShmPages) else len(self.data)


@dataclass(frozen=True)
class SemaphoreSet:
    """A SysV semaphore set and its semaphores' values."""

    id: int
    key: int
    mode: int
    uid: int
    gid: int
    values: tuple[int, ...]


@dataclass(frozen=True)
class MessageQueue:
    """A SysV message queue, its byte limit and its queued ``(mtype, text)`` messages in order."""

    id: int
    key: int
    mode: int
    uid: int
    gid: int
    qbytes: int
    messages: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class IpcContents:
    """A checkpoint's IPC namespace: its sysctls as ``(name, value)`` pairs, named like
    ``kernel.msgmax`` and valued an int or, for kernel.sem, a tuple; and its SysV objects."""

    sysctls: tuple[tuple[str, SysctlValue], ...] = ()
    shm: tuple[ShmSegment, ...] = ()
    sem: tuple[SemaphoreSet, ...] = ()
    msg: tuple[MessageQueue, ...] = ()
    # Ids of the segments some task had attached at dump time. Stock CRIU maps an attached segment
    # only if it created it from the images itself, so a namespace that a restore joins must not
    # hold these (see cer.criu.views).
    attached_shm: frozenset[int] = frozenset()

    def prefill(self) -> IpcContents:
        """What a pooled namespace that a stock CRIU restore joins holds: everything but the attached
        segments, which the restore creates from its image view."""
        if not self.attached_shm:
            return self
        return replace(self, shm=tuple(segment for segment in self.shm if segment.id not in self.attached_shm))

    @property
    def prefill_bytes(self) -> int:
        """The memory one namespace filled with these objects costs: shm pages written and queued messages."""
        return sum(segment.prefill_bytes for segment in self.shm) + sum(
            len(text) for queue in self.msg for _, text in queue.messages)


@dataclass(frozen=True)
class CheckpointContents:
    """The namespaces of a checkpoint's root task that cer rebuilds. None: the checkpoint holds
    no such namespace (the root task shared the dumping host's; a ``criu dump`` of a process tree
    that shares the host's mount namespace writes no mountpoints image)."""

    ipc: IpcContents | None
    uts: UtsContents | None
    mounts: MountTree | None = None
    # Why the mount tree could not be read (a corrupt mountpoints image, a hostile or oversized tmpfs
    # archive): that fails the checkpoint's mount namespaces, not its IPC and UTS ones.
    mounts_error: str | None = None


def read_checkpoint(directory: str | os.PathLike[str]) -> CheckpointContents:
    """Read the root task's IPC, UTS and mount namespaces from a CRIU image directory.

    Raises :class:`~cer.errors.ImageError` when the directory is no CRIU image set, an image is
    truncated or corrupt, or which namespace belongs to the root task cannot be told; an unreadable
    mount tree is reported in ``mounts_error`` instead.
    """
    directory = Path(directory)
    root, host = _task_and_host_ids(directory)
    ipc_id = _root_namespace_image(directory, "ipc", r"ipcns-var-(\d+)\.img", root, host)
    uts_id = _root_namespace_image(directory, "uts", r"utsns-(\d+)\.img", root, host)
    mounts, mounts_error = _read_root_mounts(directory, root, host)
    return CheckpointContents(
        ipc=None if ipc_id is None else _read_ipc(directory, ipc_id, attached_shm_ids(directory)),
        uts=None if uts_id is None else _read_uts(directory / f"utsns-{uts_id}.img"),
        mounts=mounts,
        mounts_error=mounts_error,
    )


def read_checkpoint_mounts(directory: str | os.PathLike[str]) -> MountTree | None:
    """The root task's mount tree alone (None: it has none), as :func:`read_checkpoint` reads it, without the
    IPC objects' bytes; an unreadable tree raises :class:`~cer.errors.ImageError`."""
    directory = Path(directory)
    mounts, mounts_error = _read_root_mounts(directory, *_task_and_host_ids(directory))
    if mounts_error is not None:
        raise ImageError(str(directory), 0, mounts_error)
    return mounts


def _task_and_host_ids(directory: Path) -> tuple[pb.task_kobj_ids_entry | None, pb.task_kobj_ids_entry | None]:
    """The root task's ids and the dumping CRIU's own (inventory.img), the version checked."""
    inventory = read_single_entry(directory / "inventory.img", INVENTORY)
    if inventory.img_version != IMAGES_VERSION:
        raise ImageError(str(directory / "inventory.img"), 0, f"image set version {inventory.img_version}, "
                         f"only version {IMAGES_VERSION} is supported")
    return _root_task_ids(directory), (inventory.root_ids if inventory.HasField("root_ids") else None)


def _read_root_mounts(directory: Path, root, host) -> tuple[MountTree | None, str | None]:
    mnt_id = _root_namespace_image(directory, "mnt", r"mountpoints-(\d+)\.img", root, host)
    if mnt_id is None:
        return None, None
    try:
        return read_mount_tree(directory, mnt_id), None
    except ImageError as error:
        return None, str(error)


def root_ipc_namespace_id(directory: str | os.PathLike[str]) -> int | None:
    """The id that names the root task's ipcns-*-<id>.img files; None when it has none (it shared the
    dumping host's IPC namespace)."""
    directory = Path(directory)
    return _root_namespace_image(directory, "ipc", r"ipcns-var-(\d+)\.img", *_task_and_host_ids(directory))


def attached_shm_ids(directory: str | os.PathLike[str]) -> frozenset[int]:
    """The SysV shm segments that any task of the checkpoint had attached at dump time.

    Every mm-<id>.img is read (threads share one; each process has its own): a vma with
    VMA_AREA_SYSVIPC in its status maps the segment whose id is its shmid.
    """
    directory = Path(directory)
    found = set()
    for name in sorted(os.listdir(directory)):
        if re.fullmatch(r"mm-\d+\.img", name):
            with ImageReader(directory / name, MM) as image:
                while (entry := image.read_entry()) is not None:
                    found.update(vma.shmid for vma in entry.vmas if vma.status & VMA_AREA_SYSVIPC)
    return frozenset(found)


def _root_task_ids(directory: Path) -> pb.task_kobj_ids_entry | None:
    """The root task's ids (pstree.img names the root task first), None for images without
    ids files."""
    pstree = directory / "pstree.img"
    with ImageReader(pstree, PSTREE) as image:
        root = image.read_entry()
        if root is None:
            raise image.error("no task in the process tree")
    ids = directory / f"ids-{root.pid}.img"
    return read_single_entry(ids, IDS) if ids.exists() else None


def _root_namespace_image(
    directory: Path,
    kind: str,
    pattern: str,
    root: pb.task_kobj_ids_entry | None,
    host: pb.task_kobj_ids_entry | None,
) -> int | None:
    """The id naming the root task's ``kind`` namespace images, None when there are none for it.

    Namespace images are named by CRIU's namespace ids, which ids-<pid>.img gives per task;
    inventory.img's root_ids are the dumping CRIU's own, so a root task with the same id shared
    the host's namespace and has none.
    """
    found = sorted(int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(pattern, name)))
    field_name = f"{kind}_ns_id"
    if root is not None and root.HasField(field_name):
        wanted = getattr(root, field_name)
        if wanted in found:
            return wanted
        shares_host = host is not None and host.HasField(field_name) and getattr(host, field_name) == wanted
        if found and not shares_host:
            raise ImageError(str(directory), 0, f"{kind} namespace images exist for ids {found}, "
                             f"but not for the root task's namespace {wanted}")
        return None
    if len(found) > 1:
        raise ImageError(str(directory), 0, f"{kind} namespace images for ids {found} and no ids image "
                         "of the root task to tell which one is its")
    return found[0] if found else None


@contextlib.contextmanager
def _optional_image(path: Path, image_type: ImageType) -> Iterator[ImageReader | _NoEntries]:
    """An image that CRIU leaves out when it would hold no entry (as for an IPC namespace without
    shm segments): a missing file reads as an empty one."""
    if not path.exists():
        yield _NoEntries()
        return
    with ImageReader(path, image_type) as image:
        yield image


class _NoEntries:
    def read_entry(self) -> None:
        return None


def _read_uts(path: Path) -> UtsContents:
    entry = read_single_entry(path, UTSNS)
    return UtsContents(nodename=text(entry.nodename), domainname=text(entry.domainname))


def _read_ipc(directory: Path, ns_id: int, attached_shm: frozenset[int]) -> IpcContents:
    var_path = directory / f"ipcns-var-{ns_id}.img"
    shm = _read_shm(directory, directory / f"ipcns-shm-{ns_id}.img")
    return IpcContents(
        attached_shm=attached_shm & {segment.id for segment in shm},
        sysctls=_sysctls(var_path, read_single_entry(var_path, IPC_VAR)),
        shm=shm,
        sem=_read_sem(directory / f"ipcns-sem-{ns_id}.img"),
        msg=_read_msg(directory / f"ipcns-msg-{ns_id}.img"),
    )


def _sysctls(path: Path, var: pb.ipc_var_entry) -> tuple[tuple[str, SysctlValue], ...]:
    if len(var.sem_ctls) not in (0, SEM_CTLS_COUNT):
        raise ImageError(str(path), 0, f"sem_ctls holds {len(var.sem_ctls)} values, kernel.sem takes {SEM_CTLS_COUNT}")
    sysctls = []
    for field_name, sysctl in IPC_VAR_SYSCTLS:
        if field_name == "sem_ctls":
            if var.sem_ctls:
                sysctls.append((sysctl, tuple(var.sem_ctls)))
        elif var.HasField(field_name):
            sysctls.append((sysctl, getattr(var, field_name)))
    return tuple(sysctls)


def _owner(desc: pb.ipc_desc_entry) -> dict[str, int]:
    return {"id": desc.id, "key": desc.key, "mode": desc.mode, "uid": desc.uid, "gid": desc.gid}


def _read_shm(directory: Path, path: Path) -> tuple[ShmSegment, ...]:
    segments = []
    with _optional_image(path, IPCNS_SHM) as image:
        while (entry := image.read_entry()) is not None:
            shmid = entry.desc.id
            if entry.in_pagemaps:
                data = _read_shmem_pages(directory, shmid, entry.size)
            else:
                # CRIU before 3.x wrote the bytes inline, padded to 4 (ipc_ns.c, dump_ipc_shm_pages).
                start = image.skip_payload(entry.size, 4, f"contents of shm segment {shmid}")
                data = ShmPages(image.identity, ((0, entry.size, start),) if entry.size else ())
            segments.append(ShmSegment(**_owner(entry.desc), size=entry.size, data=data,
                                       hugetlb_flag=entry.hugetlb_flag))
    return tuple(segments)


def _read_shmem_pages(directory: Path, shmid: int, size: int) -> ShmPages:
    """Where a segment's pages lie, from pagemap-shmem-<shmid>.img and its pages image. Ranges the pagemap
    leaves out were never touched: they get no run."""
    mapped = -(-size // PAGE_SIZE) * PAGE_SIZE
    # (offset in the segment, length, offset in the pages image), merged where contiguous.
    runs: list[list] = []
    position = pages_offset = 0
    with ImageReader(directory / f"pagemap-shmem-{shmid}.img", PAGEMAP) as pagemap:
        head = pagemap.read_entry(pb.pagemap_head)
        if head is None:
            raise pagemap.error("no pagemap_head entry")
        while True:
            offset = pagemap.offset
            entry = pagemap.read_entry()
            if entry is None:
                break
            start, length = entry.vaddr, pagemap_nr_pages(entry) * PAGE_SIZE
            flags = pagemap_flags(entry)
            if start % PAGE_SIZE or start < position or start + length > mapped:
                raise pagemap.error(f"pages {start:#x}+{length:#x} are unaligned, out of order or beyond the "
                                    f"segment's {size} bytes", offset)
            if not flags & PE_PRESENT:
                raise pagemap.error(f"pages {start:#x}+{length:#x} are not in this image (flags {flags:#x}: in a "
                                    "parent checkpoint or left to a lazy-pages server)", offset)
            _add_run(runs, start, length, pages_offset)
            position = start + length
            pages_offset += length

        pages_path = directory / f"pages-{head.pages_id}.img"
        if not pages_offset and not pages_path.exists():
            return ShmPages(None)  # never touched: CRIU may leave the empty pages image out
        with RawImage(pages_path) as pages:
            # A pages image belongs to one pagemap: pages beyond those it maps mean a pagemap
            # cut short, which would otherwise read as zeros.
            if pages.size != pages_offset:
                raise pagemap.error(f"shm segment {shmid}: maps {pages_offset} bytes of pages, "
                                    f"{pages_path.name} holds {pages.size}")
            source = pages.identity
    if runs and runs[-1][0] + runs[-1][1] > size:
        runs[-1][1] = size - runs[-1][0]  # the segment's last page reaches past its size
    return ShmPages(source if runs else None, tuple(tuple(run) for run in runs))


def _add_run(runs: list[list], start: int, length: int, source: int) -> None:
    if not length:
        return
    if runs:
        last_start, last_length, last_source = runs[-1]
        if last_start + last_length == start and last_source + last_length == source:
            runs[-1][1] += length
            return
    runs.append([start, length, source])


def _read_sem(path: Path) -> tuple[SemaphoreSet, ...]:
    sets = []
    with _optional_image(path, IPCNS_SEM) as image:
        while (entry := image.read_entry()) is not None:
            nsems = entry.nsems
            raw = image.read_payload(2 * nsems, 8, f"values of semaphore set {entry.desc.id}")
            sets.append(SemaphoreSet(**_owner(entry.desc), values=struct.unpack(f"<{nsems}H", raw)))
    return tuple(sets)


def _read_msg(path: Path) -> tuple[MessageQueue, ...]:
    queues = []
    with _optional_image(path, IPCNS_MSG) as image:
        while (entry := image.read_entry()) is not None:
            msqid = entry.desc.id
            messages = []
            for index in range(entry.qnum):
                message = image.read_entry(pb.ipc_msg)
                if message is None:
                    raise image.error(f"message queue {msqid}: {entry.qnum} messages recorded, "
                                      f"the file ends after {index}")
                text = image.read_payload(message.msize, 8, f"text of message {index} of queue {msqid}")
                messages.append((message.mtype, text))
            queues.append(MessageQueue(**_owner(entry.desc), qbytes=entry.qbytes, messages=tuple(messages)))
    return tuple(queues)
