"""cer.linux.sysv: filling a fresh IPC namespace, checked against what CRIU's own restore builds."""

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402

from cer.criu.checkpoint import IpcContents, MessageQueue, SemaphoreSet, ShmSegment, read_checkpoint  # noqa: E402
from cer.errors import IpcPopulateError  # noqa: E402
from cer.linux import sysv  # noqa: E402
from cer.linux.libc import check, libc  # noqa: E402
from cer.linux.sysv import (  # noqa: E402
    fresh_ipc_sysctls,
    is_fresh_ipc_namespace,
    populate_ipc_namespace,
    read_ipc_sysctls,
)

SAMPLE = criu_support.SAMPLE_DIR / "checkpoint"


def set_uts(uts) -> None:
    for call, name in ((libc.sethostname, uts.nodename), (libc.setdomainname, uts.domainname)):
        raw = name.encode("utf-8", "surrogateescape")
        check(call(raw, len(raw)), "sethostname/setdomainname")


def comparable(description: dict) -> dict:
    """An inspector description without what differs between any two namespaces (their inodes)."""
    return {k: v for k, v in description.items() if k != "ns"}


def require_criu() -> None:
    if criu_support.criu_binary() is None:
        pytest.fail("no working CRIU 4 at /usr/local/sbin/criu: run contrib/install-deps")


# --------------------------------------------------------------------------- the proof


def populate_and_compare(in_fresh_namespaces, checkpoint: Path) -> dict:
    contents = read_checkpoint(checkpoint)

    def build():
        populate_ipc_namespace(contents.ipc)
        set_uts(contents.uts)

    ours = in_fresh_namespaces(build)
    mine = criu_support.inspect_namespaces(ours.ipc, ours.uts)
    theirs = criu_support.restore_and_inspect(checkpoint)
    assert mine["ns"]["ipc"] != theirs["ns"]["ipc"]
    for key in ("hostname", "domainname", "sysctls", "shm", "sem", "msg"):
        assert mine[key] == theirs[key], key
    return theirs


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sample_populates_like_criu_restores(in_fresh_namespaces):
    """Object by object (ids, keys, modes, owners, shm bytes, semaphore values, messages in order),
    every sysctl and the host names: populate + sethostname build what `criu restore` builds."""
    require_criu()
    theirs = populate_and_compare(in_fresh_namespaces, SAMPLE)
    assert criu_support.differences(theirs, criu_support.expected_namespace()) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_live_dump_populates_like_criu_restores(in_fresh_namespaces, tmp_path):
    require_criu()
    criu_support.dump_live_workload(tmp_path / "images", hostname="cer-proof", domainname="proof.example")
    theirs = populate_and_compare(in_fresh_namespaces, tmp_path / "images")
    assert theirs["hostname"] == "cer-proof" and len(theirs["shm"]) == 2 and len(theirs["msg"][0]["messages"]) == 4


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_empty_ipc_sample_is_a_fresh_namespace(in_fresh_namespaces):
    """populate of the empty-IPC sample writes nothing and equals what CRIU restores."""
    require_criu()
    contents = read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint-empty-ipc")
    assert is_fresh_ipc_namespace(contents.ipc)
    populate_and_compare(in_fresh_namespaces, criu_support.SAMPLE_DIR / "checkpoint-empty-ipc")


# --------------------------------------------------------------------------- namespaces


def test_is_fresh_ipc_namespace():
    """The empty-IPC sample matches a fresh namespace; the sample and any change to the empty one do not."""
    empty = read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint-empty-ipc").ipc
    assert is_fresh_ipc_namespace(empty)
    assert not is_fresh_ipc_namespace(read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint").ipc)

    def changed(name, value):
        return dataclasses.replace(empty, sysctls=tuple((n, value if n == name else v) for n, v in empty.sysctls))

    assert not is_fresh_ipc_namespace(changed("kernel.msgmax", 8193))
    assert not is_fresh_ipc_namespace(changed("kernel.sem", (32000, 1024000000, 500, 31999)))
    assert not is_fresh_ipc_namespace(changed("fs.mqueue.msg_default", 9))
    assert not is_fresh_ipc_namespace(dataclasses.replace(empty, sysctls=empty.sysctls + (("kernel.shm_next_id", 7),)))
    assert not is_fresh_ipc_namespace(dataclasses.replace(empty, sem=(SemaphoreSet(0, 1, 0o600, 0, 0, (0,)),)))
    assert not is_fresh_ipc_namespace(dataclasses.replace(empty, msg=(MessageQueue(0, 1, 0o600, 0, 0, 16384, ()),)))
    assert not is_fresh_ipc_namespace(dataclasses.replace(empty, shm=(ShmSegment(0, 1, 0o600, 0, 0, 1, b"\0"),)))
    assert is_fresh_ipc_namespace(IpcContents())  # nothing recorded, nothing to differ


def test_fresh_sysctls_are_a_new_namespaces():
    """The is_fresh_ipc_namespace baseline equals a namespace made by unshare(1) and read by the inspector."""
    fresh = criu_support.inspect_fresh_namespaces()["sysctls"]
    assert dict(fresh_ipc_sysctls()) == {
        name: tuple(fresh[name]) if isinstance(fresh[name], list) else fresh[name] for name in sysv.IPC_SYSCTLS}


def test_acts_on_the_threads_namespace_only(in_fresh_namespaces):
    host_before = read_ipc_sysctls()
    host_objects = criu_support.inspect_namespaces(None, None)
    contents = IpcContents(
        sysctls=(("kernel.msgmax", 12345), ("kernel.sem", (250, 32000, 32, 128)), ("fs.mqueue.queues_max", 77),
                 ("kernel.shmmax", 1 << 30)),
        shm=(ShmSegment(id=3, key=0x5EED, mode=0o600, uid=0, gid=0, size=4096, data=b"s" * 4096),),
    )
    made = in_fresh_namespaces(lambda: populate_ipc_namespace(contents))
    inside = criu_support.inspect_namespaces(made.ipc, None)
    wanted = {"kernel.msgmax": 12345, "kernel.sem": [250, 32000, 32, 128], "fs.mqueue.queues_max": 77,
              "kernel.shmmax": 1 << 30}
    assert {name: inside["sysctls"][name] for name in wanted} == wanted
    assert [s["id"] for s in inside["shm"]] == [3]
    assert read_ipc_sysctls() == host_before
    assert criu_support.inspect_namespaces(None, None)["shm"] == host_objects["shm"]


def test_exact_ids_keys_owners_and_next_ids(in_fresh_namespaces):
    """Ids far apart, keys past 2**31 (key_t is signed), IPC_PRIVATE, odd sizes, owners, and the
    recorded next_id sysctls, which hold after every object was made."""
    data = os.urandom(10000)
    contents = IpcContents(
        sysctls=(("kernel.shm_next_id", 4242), ("kernel.msg_next_id", 99)),
        shm=(ShmSegment(id=32768 + 5, key=0xDEADBEEF, mode=0o1640, uid=1000, gid=1001, size=10000, data=data),
             ShmSegment(id=0, key=0, mode=0o666, uid=0, gid=0, size=1, data=b"\x7f")),
        sem=(SemaphoreSet(id=7, key=0x80000000, mode=0o400, uid=5, gid=6, values=(0, 1, 32767)),),
        msg=(MessageQueue(id=65536 * 3 + 2, key=0x1, mode=0o622, uid=7, gid=8, qbytes=16384,
                          messages=((3, b""), (1, b"\0" * 10), (2**63 - 1, b"max type"))),),
    )

    def build():
        populate_ipc_namespace(contents)
        ds = sysv.MsqidDs()
        sysv.msgctl(contents.msg[0].id, sysv.IPC_STAT, ds)
        return ds.msg_qbytes, ds.msg_qnum

    made = in_fresh_namespaces(build)
    assert made.result == (16384, 3)
    inside = criu_support.inspect_namespaces(made.ipc, None)
    shm = [(s["id"], s["key"] & 0xFFFFFFFF, s["mode"], s["uid"], s["gid"], s["size"], s["sha256"])
           for s in inside["shm"]]
    assert shm == [
        (0, 0, 0o666, 0, 0, 1, hashlib.sha256(b"\x7f").hexdigest()),
        (32773, 0xDEADBEEF, 0o640, 1000, 1001, 10000, hashlib.sha256(data).hexdigest())]
    assert [(s["id"], s["key"] & 0xFFFFFFFF, s["mode"], s["uid"], s["gid"], s["values"]) for s in inside["sem"]] == [
        (7, 0x80000000, 0o400, 5, 6, [0, 1, 32767])]
    assert [(q["id"], q["mode"], q["uid"], q["gid"], q["messages"]) for q in inside["msg"]] == [
        (196610, 0o622, 7, 8, [(3, b""), (1, b"\0" * 10), (2**63 - 1, b"max type")])]
    assert (inside["sysctls"]["kernel.shm_next_id"], inside["sysctls"]["kernel.msg_next_id"],
            inside["sysctls"]["kernel.sem_next_id"]) == (4242, 99, -1)


def test_messages_beyond_criu_limits(in_fresh_namespaces):
    """A message longer than CRIU's 8 KiB restore buffer, and a queue whose byte limit was lowered
    below what it holds: all messages arrive, and the recorded limit is the one left in place."""
    big = os.urandom(20000)
    queue = MessageQueue(id=4, key=0x44, mode=0o600, uid=0, gid=0, qbytes=100, messages=((9, big), (1, b"tail")))
    contents = IpcContents(sysctls=(("kernel.msgmax", 65536),), msg=(queue,))

    def build():
        populate_ipc_namespace(contents)
        ds = sysv.MsqidDs()
        sysv.msgctl(4, sysv.IPC_STAT, ds)
        return ds.msg_qbytes, ds.msg_cbytes

    made = in_fresh_namespaces(build)
    assert made.result == (100, 20004)
    assert criu_support.inspect_namespaces(made.ipc, None)["msg"][0]["messages"] == [(9, big), (1, b"tail")]


def refuse_map_files(monkeypatch) -> None:
    """Make /proc/self/map_files unopenable for sysv, as it is without CAP_SYS_ADMIN."""
    real_open = os.open

    def no_map_files(path, *args, **kwargs):
        if "/map_files/" in str(path):
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sysv.os, "open", no_map_files)


@pytest.mark.parametrize("map_files", [True, False], ids=["write", "memmove"])
def test_shm_bytes_through_either_copy(in_fresh_namespaces, monkeypatch, map_files):
    """The segment's shmem file written through map_files, or (where that cannot be opened, as
    without CAP_SYS_ADMIN) a memmove into the mapping: the same bytes, the size unchanged."""
    if not map_files:
        refuse_map_files(monkeypatch)
    writes = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(sysv.os, "pwrite", lambda *args: writes.append(args[2]) or real_pwrite(*args))
    data = os.urandom(3 * 1024 * 1024 + 5)
    contents = IpcContents(shm=(ShmSegment(id=1, key=0, mode=0o600, uid=0, gid=0, size=len(data), data=data),))
    made = in_fresh_namespaces(lambda: populate_ipc_namespace(contents))
    (segment,) = criu_support.inspect_namespaces(made.ipc, None)["shm"]
    assert (segment["size"], segment["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert bool(writes) == map_files


def segment_memory(shmid: int) -> tuple[int, int]:
    """(size, resident bytes) of a segment of the calling thread's IPC namespace, as the kernel reports them."""
    with open("/proc/sysvipc/shm") as table:
        header = table.readline().split()
        for line in table:
            row = dict(zip(header, line.split()))
            if int(row["shmid"]) == shmid:
                return int(row["size"]), int(row["rss"])
    raise AssertionError(f"no shm segment {shmid}")


@pytest.mark.timeout(60)
def test_pages_absent_from_the_image_cost_nothing(in_fresh_namespaces, tmp_path):
    """Issue 15, finding 4: a 1 GiB segment whose pagemap holds two pages costs two pages per namespace
    (a fresh segment is zero and unbacked until written, as CRIU's restore leaves it), not 1 GiB."""
    a, b = os.urandom(4096), os.urandom(4096)
    contents = read_checkpoint(criu_support.sparse_shm_checkpoint(tmp_path / "images", 1 << 30, {3: a, 200_000: b})).ipc
    (segment,) = contents.shm
    assert segment.prefill_bytes == 2 * 4096
    assert contents.prefill_bytes == 2 * 4096 + sum(len(text) for queue in contents.msg for _, text in queue.messages)

    def build():
        populate_ipc_namespace(contents)
        address = sysv.shmat(7)
        try:
            pages = ctypes.string_at(address + 3 * 4096, 4096), ctypes.string_at(address + 200_000 * 4096, 4096)
        finally:
            sysv.shmdt(address)
        return segment_memory(7), pages

    made = in_fresh_namespaces(build)
    (size, resident), pages = made.result
    assert size == 1 << 30
    assert resident == 2 * 4096
    assert pages == (a, b)


@pytest.mark.timeout(60)
def test_an_empty_pagemap_fills_nothing(in_fresh_namespaces, tmp_path):
    contents = read_checkpoint(criu_support.sparse_shm_checkpoint(tmp_path / "images", 1 << 30)).ipc
    assert [segment.prefill_bytes for segment in contents.shm] == [0]
    made = in_fresh_namespaces(lambda: (populate_ipc_namespace(contents), segment_memory(7))[1])
    assert made.result == (1 << 30, 0)


@pytest.mark.parametrize("map_files", [True, False], ids=["sendfile", "read-into-mapping"])
def test_image_pages_through_either_copy(in_fresh_namespaces, monkeypatch, map_files):
    """Pages copied from the image file into the segment's shmem file, or (where that cannot be opened) read
    into the mapping: the bytes CRIU dumped, and nothing of them held in this process."""
    if not map_files:
        refuse_map_files(monkeypatch)
    contents = read_checkpoint(SAMPLE).ipc
    made = in_fresh_namespaces(lambda: populate_ipc_namespace(contents))
    shm = {segment["id"]: segment for segment in criu_support.inspect_namespaces(made.ipc, None)["shm"]}
    for segment in contents.shm:
        assert shm[segment.id]["sha256"] == hashlib.sha256(segment.read_bytes()).hexdigest()


def test_an_image_changed_after_it_was_read_is_refused(in_fresh_namespaces, tmp_path):
    images = criu_support.sparse_shm_checkpoint(tmp_path / "images", 1 << 20, {0: b"a" * 4096})
    contents = read_checkpoint(images).ipc
    (images / "pages-900.img").write_bytes(b"b" * 4096)  # rewritten in place: a new mtime
    with pytest.raises(IpcPopulateError, match=r"shm segment id 7 .*pages-900.img: the file changed after the checkpoint was read"):
        in_fresh_namespaces(lambda: populate_ipc_namespace(contents))


# --------------------------------------------------------------------------- failures


def objects(**kinds) -> IpcContents:
    return IpcContents(**{kind: (obj,) for kind, obj in kinds.items()})


@pytest.mark.parametrize("contents, errno_, names", [
    (objects(sem=SemaphoreSet(id=3, key=0x33, mode=0o600, uid=0, gid=0, values=(40000,))), 34,
     "semaphore set id 3 (key 0x33)"),
    (objects(sem=SemaphoreSet(id=3, key=0x33, mode=0o600, uid=0, gid=0, values=(70000,))), 34, "semaphore set id 3"),
    (objects(msg=MessageQueue(id=2, key=0x22, mode=0o600, uid=0, gid=0, qbytes=10, messages=((0, b"x"),))), 22,
     "message queue id 2 (key 0x22)"),
    (objects(msg=MessageQueue(id=2, key=0x22, mode=0o600, uid=0, gid=0, qbytes=10, messages=((2**64 - 1, b"x"),))), 22,
     "message queue id 2"),
    (IpcContents(sysctls=(("kernel.shmmax", 4096),),
                 shm=(ShmSegment(id=1, key=0x11, mode=0o600, uid=0, gid=0, size=8192, data=bytes(8192)),)), 22,
     "shm segment id 1 (key 0x11)"),
    (objects(shm=ShmSegment(id=2**31, key=0x11, mode=0o600, uid=0, gid=0, size=1, data=b"x")), 22,
     "shm segment id 2147483648 (key 0x11): cannot set sysctl kernel.shm_next_id"),
    (IpcContents(sysctls=(("kernel.msgmax", -5),)), 22, "kernel.msgmax"),
])
def test_failures_name_the_object(in_fresh_namespaces, contents, errno_, names):
    with pytest.raises(OSError) as caught:
        in_fresh_namespaces(lambda: populate_ipc_namespace(contents))
    assert names in str(caught.value)
    if errno_ is not None:
        assert caught.value.errno == errno_


def test_an_id_taken_twice_fails(in_fresh_namespaces):
    contents = read_checkpoint(SAMPLE).ipc

    def twice():
        populate_ipc_namespace(contents)
        populate_ipc_namespace(contents)

    with pytest.raises(IpcPopulateError, match=r"shm segment id 7 \(key 0x43455201\).*File exists") as caught:
        in_fresh_namespaces(twice)
    assert caught.value.errno == 17


def test_unknown_sysctls_are_refused_before_anything_is_written(in_fresh_namespaces):
    contents = IpcContents(sysctls=(("kernel.msgmax", 9000), ("kernel.core_pattern", 1)))

    def attempt():
        with pytest.raises(ValueError, match="kernel.core_pattern"):
            populate_ipc_namespace(contents)
        return read_ipc_sysctls()["kernel.msgmax"]

    assert in_fresh_namespaces(attempt).result == fresh_ipc_sysctls()["kernel.msgmax"] != 9000


# --------------------------------------------------------------------------- ctypes layouts


LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/sem.h>
#include <sys/msg.h>
#define F(s, f) printf(#s " " #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define S(s) printf(#s " sizeof %zu %zu\n", sizeof(struct s), sizeof(struct s))
int main(void) {
    S(ipc_perm); F(ipc_perm, __key); F(ipc_perm, uid); F(ipc_perm, gid); F(ipc_perm, cuid); F(ipc_perm, cgid);
    F(ipc_perm, mode); F(ipc_perm, __seq);
    S(shmid_ds); F(shmid_ds, shm_perm); F(shmid_ds, shm_segsz); F(shmid_ds, shm_atime); F(shmid_ds, shm_dtime);
    F(shmid_ds, shm_ctime); F(shmid_ds, shm_cpid); F(shmid_ds, shm_lpid); F(shmid_ds, shm_nattch);
    S(semid_ds); F(semid_ds, sem_perm); F(semid_ds, sem_otime); F(semid_ds, sem_ctime); F(semid_ds, sem_nsems);
    S(msqid_ds); F(msqid_ds, msg_perm); F(msqid_ds, msg_stime); F(msqid_ds, msg_rtime); F(msqid_ds, msg_ctime);
    F(msqid_ds, __msg_cbytes); F(msqid_ds, msg_qnum); F(msqid_ds, msg_qbytes); F(msqid_ds, msg_lspid);
    F(msqid_ds, msg_lrpid);
    return 0;
}
"""
CTYPES_OF = {"ipc_perm": sysv.IpcPerm, "shmid_ds": sysv.ShmidDs, "semid_ds": sysv.SemidDs, "msqid_ds": sysv.MsqidDs}
RENAMED_FIELDS = {"__key": "key", "__seq": "seq", "__msg_cbytes": "msg_cbytes"}


def test_struct_layouts_match_glibc(tmp_path):
    """Every field cer reads or writes sits where glibc's headers put it, at the same size."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.fail("no C compiler (gcc): run contrib/install-deps")
    (tmp_path / "layout.c").write_text(LAYOUT_PROGRAM)
    subprocess.run([cc, "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")], check=True, timeout=60)
    output = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True, timeout=10).stdout
    checked = 0
    for line in output.splitlines():
        struct_name, field_name, offset, size = line.split()
        structure = CTYPES_OF[struct_name]
        if field_name == "sizeof":
            assert ctypes.sizeof(structure) == int(size), struct_name
        else:
            field = getattr(structure, RENAMED_FIELDS.get(field_name, field_name))
            assert (field.offset, field.size) == (int(offset), int(size)), f"{struct_name}.{field_name}"
        checked += 1
    assert checked == 32
