"""SysV IPC through ctypes, and filling a fresh IPC namespace with a checkpoint's objects.

Everything here acts on the IPC namespace of the calling thread: the /proc/sys/kernel and
/proc/sys/fs/mqueue files of the IPC sysctls resolve to the namespace of the thread that opens
them, and so do the shm/sem/msg calls. :func:`populate_ipc_namespace` is meant for a dedicated
thread that has just called ``unshare(CLONE_NEWIPC)``.

Structure layouts are glibc's on x86_64 (bits/ipc-perm.h and bits/types/struct_*id_ds.h).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from ctypes import POINTER, c_int, c_long, c_size_t, c_uint32, c_ulong, c_ushort, c_void_p
from types import MappingProxyType
from typing import TYPE_CHECKING

from cer.errors import IpcPopulateError
from cer.linux.libc import check, libc
from cer.linux.namespaces import CLONE_NEWIPC, unshare

if TYPE_CHECKING:
    from cer.criu.checkpoint import IpcContents, MessageQueue, SemaphoreSet, ShmSegment, SysctlValue


IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_NOWAIT = 0o4000
IPC_RMID = 0
IPC_SET = 1
IPC_STAT = 2
SETALL = 17
# Only the permission bits go through *get and IPC_SET; the kernel keeps the rest of mode for
# its own state (SHM_DEST, SHM_LOCKED).
PERMISSION_BITS = 0o777

# The per-IPC-namespace sysctls cer sets, named as sysctl(8) names them. kernel.auto_msgmni is
# left out: since Linux 4.0 it reads 0 and writing it does nothing.
IPC_SYSCTLS = (
    "kernel.sem",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.shmmax",
    "kernel.shmall",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
    "fs.mqueue.queues_max",
    "fs.mqueue.msg_max",
    "fs.mqueue.msgsize_max",
    "fs.mqueue.msg_default",
    "fs.mqueue.msgsize_default",
    "kernel.msg_next_id",
    "kernel.sem_next_id",
    "kernel.shm_next_id",
)
# Each *get consumes its next_id sysctl (the kernel resets it to -1), so a checkpoint's own
# values are written after every object exists.
NEXT_ID_SYSCTLS = {"shm": "kernel.shm_next_id", "sem": "kernel.sem_next_id", "msg": "kernel.msg_next_id"}


class IpcPerm(ctypes.Structure):
    _fields_ = [
        ("key", c_int),
        ("uid", c_uint32),
        ("gid", c_uint32),
        ("cuid", c_uint32),
        ("cgid", c_uint32),
        ("mode", c_uint32),
        ("seq", c_ushort),
        ("_pad2", c_ushort),
        ("_reserved1", c_ulong),
        ("_reserved2", c_ulong),
    ]


class ShmidDs(ctypes.Structure):
    _fields_ = [
        ("shm_perm", IpcPerm),
        ("shm_segsz", c_size_t),
        ("shm_atime", c_long),
        ("shm_dtime", c_long),
        ("shm_ctime", c_long),
        ("shm_cpid", c_int),
        ("shm_lpid", c_int),
        ("shm_nattch", c_ulong),
        ("_reserved5", c_ulong),
        ("_reserved6", c_ulong),
    ]


class SemidDs(ctypes.Structure):
    _fields_ = [
        ("sem_perm", IpcPerm),
        ("sem_otime", c_long),
        ("_sem_otime_high", c_ulong),
        ("sem_ctime", c_long),
        ("_sem_ctime_high", c_ulong),
        ("sem_nsems", c_ulong),
        ("_reserved3", c_ulong),
        ("_reserved4", c_ulong),
    ]


class MsqidDs(ctypes.Structure):
    _fields_ = [
        ("msg_perm", IpcPerm),
        ("msg_stime", c_long),
        ("msg_rtime", c_long),
        ("msg_ctime", c_long),
        ("msg_cbytes", c_ulong),
        ("msg_qnum", c_ulong),
        ("msg_qbytes", c_ulong),
        ("msg_lspid", c_int),
        ("msg_lrpid", c_int),
        ("_reserved4", c_ulong),
        ("_reserved5", c_ulong),
    ]


def _libc_function(name: str, restype, *argtypes):
    # Own prototypes instead of setting argtypes on the shared libc handle, which other modules
    # configure for their own functions.
    return ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)((name, libc))


_shmget = _libc_function("shmget", c_int, c_int, c_size_t, c_int)
_shmat = _libc_function("shmat", c_void_p, c_int, c_void_p, c_int)
_shmdt = _libc_function("shmdt", c_int, c_void_p)
_shmctl = _libc_function("shmctl", c_int, c_int, c_int, POINTER(ShmidDs))
_semget = _libc_function("semget", c_int, c_int, c_int, c_int)
# semctl is variadic; on x86_64 its fourth argument (union semun) travels like a pointer.
_semctl = _libc_function("semctl", c_int, c_int, c_int, c_int, c_void_p)
_msgget = _libc_function("msgget", c_int, c_int, c_int)
_msgsnd = _libc_function("msgsnd", c_int, c_int, c_void_p, c_size_t, c_int)
_msgctl = _libc_function("msgctl", c_int, c_int, c_int, POINTER(MsqidDs))

_SHMAT_FAILED = ctypes.c_void_p(-1).value
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def key_t(key: int) -> int:
    """The signed 32-bit key_t of a key, which CRIU records as unsigned."""
    return ctypes.c_int32(key).value


def shmget(key: int, size: int, flags: int) -> int:
    return check(_shmget(key_t(key), size, flags), f"shmget(key={key:#x}, size={size})")


def shmat(shmid: int, flags: int = 0) -> int:
    """Attach segment ``shmid`` anywhere; returns its address."""
    address = _shmat(shmid, None, flags)
    if address == _SHMAT_FAILED:
        check(-1, f"shmat(shm id {shmid})")
    return address


def shmdt(address: int) -> None:
    check(_shmdt(address), "shmdt")


def shmctl(shmid: int, command: int, buffer: ShmidDs | None = None) -> int:
    return check(_shmctl(shmid, command, buffer), f"shmctl(shm id {shmid}, {command})")


def semget(key: int, nsems: int, flags: int) -> int:
    return check(_semget(key_t(key), nsems, flags), f"semget(key={key:#x}, nsems={nsems})")


def semctl(semid: int, semnum: int, command: int, argument: ctypes.Structure | ctypes.Array | None = None) -> int:
    pointer = ctypes.cast(ctypes.pointer(argument), c_void_p) if argument is not None else None
    return check(_semctl(semid, semnum, command, pointer), f"semctl(sem id {semid}, {command})")


def msgget(key: int, flags: int) -> int:
    return check(_msgget(key_t(key), flags), f"msgget(key={key:#x})")


def msgsnd(msqid: int, mtype: int, text: bytes, flags: int = IPC_NOWAIT) -> None:
    """Queue one message; ``mtype`` must be positive."""
    buffer = ctypes.create_string_buffer(struct.pack("=q", mtype) + text)
    check(_msgsnd(msqid, buffer, len(text), flags), f"msgsnd(msg id {msqid}, type {mtype}, {len(text)} bytes)")


def msgctl(msqid: int, command: int, buffer: MsqidDs | None = None) -> int:
    return check(_msgctl(msqid, command, buffer), f"msgctl(msg id {msqid}, {command})")


def sysctl_path(name: str) -> str:
    """The /proc/sys file of a sysctl named like ``kernel.shmmax``."""
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctl(name: str) -> SysctlValue:
    """A sysctl of the calling thread's namespaces: one integer, or a tuple when it holds several."""
    with open(sysctl_path(name), "rb") as f:
        values = tuple(int(word) for word in f.read().split())
    return values[0] if len(values) == 1 else values


def write_sysctl(name: str, value: SysctlValue) -> None:
    """Set a sysctl of the calling thread's namespaces."""
    text = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
    path = sysctl_path(name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"cannot set sysctl {name} to {text}: {e.strerror}", path) from e


def read_ipc_sysctls() -> dict[str, SysctlValue | None]:
    """Every IPC sysctl of the calling thread's IPC namespace; None for one this kernel lacks."""
    values: dict[str, SysctlValue | None] = {}
    for name in IPC_SYSCTLS:
        try:
            values[name] = read_sysctl(name)
        except FileNotFoundError:
            values[name] = None
    return values


@functools.cache
def fresh_ipc_sysctls() -> Mapping[str, SysctlValue | None]:
    """The IPC sysctls a new IPC namespace starts with on this kernel, read once.

    They are compile-time defaults of the kernel, not copies of the parent namespace's values,
    so one look inside a throwaway namespace (made in a thread of its own) holds for all.
    """
    outcome: list = []

    def probe() -> None:
        try:
            unshare(CLONE_NEWIPC)
            outcome.append(read_ipc_sysctls())
        except BaseException as e:  # handed to the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=probe, name="cer-fresh-ipc-sysctls")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return MappingProxyType(outcome[0])


def is_fresh_ipc_namespace(contents: IpcContents) -> bool:
    """True when a fresh IPC namespace of this kernel already is ``contents``: no objects, and every
    recorded sysctl at a fresh namespace's value (:func:`fresh_ipc_sysctls`, probed once)."""
    if contents.shm or contents.sem or contents.msg:
        return False
    fresh = fresh_ipc_sysctls()
    return all(fresh.get(name) == value for name, value in contents.sysctls)


def populate_ipc_namespace(contents: IpcContents) -> None:
    """Re-create a checkpoint's IPC namespace in the calling thread's fresh IPC namespace.

    Call it from a dedicated thread right after ``unshare(CLONE_NEWIPC)``: sysctls that already
    hold a fresh namespace's value are not written. Sets the recorded sysctls first (so limits
    such as msgmax and shmmax are the checkpoint's while objects are made), then makes every shm
    segment, semaphore set and message queue with its recorded id, key, mode, owner and contents
    (kernel.msgmnb and kernel.msgmax are raised meanwhile where a queue needs more), and finally
    the recorded *_next_id sysctls. A failure raises an OSError naming the object.
    """
    fresh = fresh_ipc_sysctls()
    unknown = [name for name, _ in contents.sysctls if name not in fresh]
    if unknown:
        raise ValueError(f"not an IPC sysctl cer sets: {', '.join(unknown)}")
    next_ids = set(NEXT_ID_SYSCTLS.values())
    for name, value in contents.sysctls:
        if name not in next_ids and value != fresh[name]:
            write_sysctl(name, value)

    for segment in contents.shm:
        _create_shm(segment)
    with _message_limits_raised(contents, fresh):
        for queue in contents.msg:
            _create_msg(queue)
    for sem_set in contents.sem:
        _create_sem(sem_set)

    for name, value in contents.sysctls:
        if name in next_ids:
            write_sysctl(name, value)


@contextlib.contextmanager
def _message_limits_raised(contents: IpcContents, fresh: Mapping[str, SysctlValue | None]) -> Iterator[None]:
    """Raise kernel.msgmnb and kernel.msgmax while the queues are filled, where the namespace's
    own are below a queue's byte limit or a message's length, then put them back.

    A queue may hold more than these limits allow today (they were lowered after the messages
    were queued, or the queue's limit was raised with CAP_SYS_RESOURCE), and without
    CAP_SYS_RESOURCE (which this daemon may well lack) IPC_SET refuses a qbytes above msgmnb.
    """
    needed = {
        "kernel.msgmnb": max((max(q.qbytes, _queued_bytes(q)) for q in contents.msg), default=0),
        "kernel.msgmax": max((len(text) for q in contents.msg for _, text in q.messages), default=0),
    }
    recorded = dict(contents.sysctls)
    restore = {}
    for name, value in needed.items():
        own = recorded.get(name, fresh[name])
        if value > own:
            write_sysctl(name, value)
            restore[name] = own
    yield
    for name, value in restore.items():
        write_sysctl(name, value)


def _queued_bytes(queue: MessageQueue) -> int:
    return sum(len(text) for _, text in queue.messages)


def _created(kind: str, wanted: int, create) -> int:
    """Run ``create`` with the kernel told to hand out id ``wanted`` next, and check it did."""
    write_sysctl(NEXT_ID_SYSCTLS[kind], wanted)
    got = create()
    if got != wanted:
        raise IpcPopulateError(errno.EEXIST, f"{kind} id {wanted}: the kernel gave id {got} instead")
    return got


def _failed(kind: str, obj, e: OSError) -> IpcPopulateError:
    return IpcPopulateError(e.errno, f"cannot re-create {kind} id {obj.id} (key {obj.key:#x}): {e.strerror or e}")


def _set_perm(perm: IpcPerm, obj) -> None:
    perm.uid = obj.uid
    perm.gid = obj.gid
    perm.mode = obj.mode & PERMISSION_BITS


def _create_shm(segment: ShmSegment) -> None:
    try:
        flags = (segment.mode & PERMISSION_BITS) | IPC_CREAT | IPC_EXCL | segment.hugetlb_flag
        shmid = _created("shm", segment.id, lambda: shmget(segment.key, segment.size, flags))
        ds = ShmidDs()
        _set_perm(ds.shm_perm, segment)
        shmctl(shmid, IPC_SET, ds)
        if isinstance(segment.data, bytes):
            if segment.data:
                _fill_shm(shmid, segment.size, lambda fd, address: _write_bytes(fd, address, segment.data))
        elif segment.data.runs:
            source = segment.data.source.reopen()
            try:
                _fill_shm(shmid, segment.size, lambda fd, address: _copy_runs(source, fd, address, segment.data.runs))
            finally:
                os.close(source)
    except OSError as e:
        raise _failed("shm segment", segment, e) from e


def _fill_shm(shmid: int, size: int, fill) -> None:
    """Attach segment ``shmid`` and call ``fill(fd, address)``: ``fd`` is its shmem file open for writing,
    None where there is none to write to (a hugetlb segment takes no write(); map_files is root only), and
    ``address`` where it is mapped. A write into the file is about twice as fast as a copy into the
    mapping: no page fault per page, no zeroing of pages about to be overwritten."""
    address = shmat(shmid)
    mapped = -(-size // _PAGE_SIZE) * _PAGE_SIZE
    try:
        try:
            fd = os.open(f"/proc/self/map_files/{address:x}-{address + mapped:x}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            fd = None
        try:
            fill(fd, address)
        finally:
            if fd is not None:
                os.close(fd)
    finally:
        shmdt(address)


def _write_bytes(fd: int | None, address: int, data: bytes) -> None:
    if fd is not None:
        view = memoryview(data)
        offset = 0
        try:
            while offset < len(view):
                offset += os.pwrite(fd, view[offset:], offset)
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    ctypes.memmove(address, data, len(data))


def _copy_runs(source: int, fd: int | None, address: int, runs: tuple[tuple[int, int, int], ...]) -> None:
    """Copy each ``(offset in the segment, length, offset in source)`` run from the image file ``source``
    into the segment, kernel to kernel: nothing of it passes through this process's memory, and pages
    no run names are never touched (they stay unbacked)."""
    for start, length, source_offset in runs:
        done = 0
        if fd is not None:
            try:
                os.lseek(fd, start, os.SEEK_SET)
                while done < length:
                    sent = os.sendfile(fd, source, source_offset + done, length - done)
                    if not sent:
                        raise OSError(errno.ESTALE, "the image file ends early (it changed after it was read)")
                    done += sent
                continue
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fd = None  # hugetlb: read straight into the mapping instead
        while done < length:
            window = (ctypes.c_char * (length - done)).from_address(address + start + done)
            got = os.preadv(source, [window], source_offset + done)
            if not got:
                raise OSError(errno.ESTALE, "the image file ends early (it changed after it was read)")
            done += got


def _create_msg(queue: MessageQueue) -> None:
    try:
        flags = (queue.mode & PERMISSION_BITS) | IPC_CREAT | IPC_EXCL
        msqid = _created("msg", queue.id, lambda: msgget(queue.key, flags))
        ds = MsqidDs()
        _set_perm(ds.msg_perm, queue)
        # Room for every message first: the recorded limit may have been lowered below what the
        # queue held, which the kernel allows for queued messages but not for new ones.
        ds.msg_qbytes = max(queue.qbytes, _queued_bytes(queue))
        msgctl(msqid, IPC_SET, ds)
        for mtype, text in queue.messages:
            msgsnd(msqid, mtype, text)
        if ds.msg_qbytes != queue.qbytes:
            ds.msg_qbytes = queue.qbytes
            msgctl(msqid, IPC_SET, ds)
    except (OSError, struct.error) as e:
        if isinstance(e, struct.error):
            e = OSError(errno.EINVAL, f"message type out of range: {e}")
        raise _failed("message queue", queue, e) from e


def _create_sem(sem_set: SemaphoreSet) -> None:
    try:
        flags = (sem_set.mode & PERMISSION_BITS) | IPC_CREAT | IPC_EXCL
        nsems = len(sem_set.values)
        if not all(0 <= value <= 0xFFFF for value in sem_set.values):
            raise OSError(errno.ERANGE, f"semaphore values out of range: {sem_set.values}")
        semid = _created("sem", sem_set.id, lambda: semget(sem_set.key, nsems, flags))
        ds = SemidDs()
        _set_perm(ds.sem_perm, sem_set)
        semctl(semid, 0, IPC_SET, ds)
        semctl(semid, 0, SETALL, (c_ushort * nsems)(*sem_set.values))
    except OSError as e:
        raise _failed("semaphore set", sem_set, e) from e
