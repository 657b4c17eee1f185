"""cer.criu.checkpoint: the IPC and UTS contents of real checkpoints, checked against crit, and
every way a checkpoint directory can be wrong."""

import base64
import dataclasses
import hashlib
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402

from cer.criu import criu_pb2 as pb  # noqa: E402
from cer.criu.checkpoint import read_checkpoint  # noqa: E402
from cer.criu.images import (  # noqa: E402
    IDS,
    IMG_COMMON_MAGIC,
    INVENTORY,
    IPCNS_MSG,
    IPCNS_SEM,
    IPCNS_SHM,
    PAGEMAP,
    read_single_entry,
)
from cer.errors import ImageError  # noqa: E402

PAGE = 4096
# What each ipc_var_entry field is, as a sysctl (CRIU's ipc_ns.c, ipc_sysctl_req()).
SYSCTL_OF_FIELD = {
    "sem_ctls": "kernel.sem", "msg_ctlmax": "kernel.msgmax", "msg_ctlmnb": "kernel.msgmnb",
    "msg_ctlmni": "kernel.msgmni", "shm_ctlmax": "kernel.shmmax", "shm_ctlall": "kernel.shmall",
    "shm_ctlmni": "kernel.shmmni", "shm_rmid_forced": "kernel.shm_rmid_forced",
    "mq_queues_max": "fs.mqueue.queues_max", "mq_msg_max": "fs.mqueue.msg_max",
    "mq_msgsize_max": "fs.mqueue.msgsize_max", "mq_msg_default": "fs.mqueue.msg_default",
    "mq_msgsize_default": "fs.mqueue.msgsize_default", "msg_next_id": "kernel.msg_next_id",
    "sem_next_id": "kernel.sem_next_id", "shm_next_id": "kernel.shm_next_id",
}


def owner(obj) -> dict:
    return {"id": obj.id, "key": obj.key, "mode": obj.mode, "uid": obj.uid, "gid": obj.gid}


def crit_owner(entry: dict) -> dict:
    desc = entry["desc"]
    return {k: desc[k] for k in ("id", "key", "mode", "uid", "gid")}


def crit_shm_bytes(crit, directory: Path, shmid: int, size: int) -> bytes:
    """A segment's bytes as crit's pagemap decoding and the raw pages file say."""
    pagemap = crit(directory / f"pagemap-shmem-{shmid}.img")["entries"]
    pages = (directory / f"pages-{pagemap[0]['pages_id']}.img").read_bytes() if len(pagemap) > 1 else b""
    data, used = bytearray(-(-size // PAGE) * PAGE), 0
    for entry in pagemap[1:]:
        assert entry["flags"] & 4  # PE_PRESENT
        length = entry["nr_pages"] * PAGE
        data[entry["vaddr"]:entry["vaddr"] + length] = pages[used:used + length]
        used += length
    return bytes(data[:size])


# --------------------------------------------------------------------------- real checkpoints


@pytest.mark.slow
def test_contents_match_crit(checkpoint_dir, crit, decode_patched):
    """Everything read_checkpoint returns, object by object, against crit's decoding of the root
    task's namespace images (found through crit too: pstree.img, then ids-<pid>.img)."""
    contents = read_checkpoint(checkpoint_dir)
    root_pid = crit(checkpoint_dir / "pstree.img")["entries"][0]["pid"]
    ids = crit(checkpoint_dir / f"ids-{root_pid}.img")["entries"][0]
    ipc_id, uts_id = ids["ipc_ns_id"], ids["uts_ns_id"]

    uts = crit(checkpoint_dir / f"utsns-{uts_id}.img")["entries"][0]
    assert (contents.uts.nodename, contents.uts.domainname) == (uts["nodename"], uts["domainname"])

    var = crit(checkpoint_dir / f"ipcns-var-{ipc_id}.img")["entries"][0]
    expected = [(SYSCTL_OF_FIELD[k], tuple(v) if isinstance(v, list) else v)
                for k, v in var.items() if k in SYSCTL_OF_FIELD]
    assert sorted(contents.ipc.sysctls) == sorted(expected)
    assert "auto_msgmni" in var  # recorded, and deliberately not a sysctl cer sets

    def decoded(kind: str, decode=crit) -> list:
        path = checkpoint_dir / f"ipcns-{kind}-{ipc_id}.img"
        return decode(path)["entries"] if path.exists() else []  # CRIU writes no empty images

    shm = decoded("shm", decode_patched)
    assert [(owner(s), s.size) for s in contents.ipc.shm] == [(crit_owner(e), e["size"]) for e in shm]
    for segment in contents.ipc.shm:
        expected_bytes = crit_shm_bytes(crit, checkpoint_dir, segment.id, segment.size)
        assert hashlib.sha256(segment.read_bytes()).digest() == hashlib.sha256(expected_bytes).digest(), segment.id

    sem = decoded("sem")
    assert [(owner(s), s.values) for s in contents.ipc.sem] == [(crit_owner(e), tuple(e["extra"])) for e in sem]

    msg = decoded("msg")
    assert [(owner(q), q.qbytes, q.messages) for q in contents.ipc.msg] == [
        (crit_owner(e), e["qbytes"],
         tuple((h["mtype"], base64.b64decode(text)) for h, text in zip(e["extra"][::2], e["extra"][1::2], strict=True)))
        for e in msg]


def test_sample_holds_what_the_workload_made():
    """The shipped sample, read, is what contrib/sample/ipc-workload.c created."""
    expected = criu_support.expected_namespace()
    contents = read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint")
    assert (contents.uts.nodename, contents.uts.domainname) == (expected["hostname"], expected["domainname"])
    sysctls = dict(contents.ipc.sysctls)
    assert {name: sysctls[name] for name in expected["sysctls"]} == {
        name: tuple(v) if isinstance(v, list) else v for name, v in expected["sysctls"].items()}
    shm = [{**owner(s), "size": s.size, "sha256": hashlib.sha256(s.read_bytes()).hexdigest()} for s in contents.ipc.shm]
    assert shm == expected["shm"]
    assert [{**owner(s), "values": list(s.values)} for s in contents.ipc.sem] == expected["sem"]
    assert [{**owner(q), "messages": list(q.messages)} for q in contents.ipc.msg] == expected["msg"]


# --------------------------------------------------------------------------- which namespace


def write_ids(path: Path, **changes) -> None:
    ids = read_single_entry(path, IDS)
    for name, value in changes.items():
        setattr(ids, name, value)
    raw = ids.SerializeToString()
    path.write_bytes(struct.pack("<III", IMG_COMMON_MAGIC, IDS.magic, len(raw)) + raw)


def with_shm_bytes(contents):
    """``contents`` with each shm segment's pages read into bytes: two copies of one image directory then
    compare equal (a segment otherwise names the file its pages lie in)."""
    shm = tuple(dataclasses.replace(segment, data=segment.read_bytes()) for segment in contents.ipc.shm)
    return dataclasses.replace(contents, ipc=dataclasses.replace(contents.ipc, shm=shm))


def host_ids(directory: Path):
    return read_single_entry(directory / "inventory.img", INVENTORY).root_ids


def test_root_task_namespace_among_several(sample_copy):
    """With images of other namespaces beside them, the root task's (ids-<root pid>.img) are read."""
    original = read_checkpoint(sample_copy)
    for name in ("ipcns-var", "ipcns-shm", "ipcns-sem", "ipcns-msg"):
        (sample_copy / f"{name}-99.img").write_bytes((sample_copy / f"{name}-10.img").read_bytes())
    (sample_copy / "ipcns-sem-99.img").unlink()
    other_uts = criu_support.SAMPLE_DIR / "checkpoint-empty-ipc" / "utsns-11.img"
    (sample_copy / "utsns-98.img").write_bytes(other_uts.read_bytes())
    assert with_shm_bytes(read_checkpoint(sample_copy)) == with_shm_bytes(original)

    write_ids(sample_copy / "ids-1.img", ipc_ns_id=99, uts_ns_id=98)
    swapped = read_checkpoint(sample_copy)
    assert swapped.ipc.sem == () and swapped.ipc.shm == original.ipc.shm
    assert swapped.uts.nodename == "cer-sample-empty"


def test_several_namespaces_and_no_ids_image_is_ambiguous(sample_copy):
    (sample_copy / "ipcns-var-99.img").write_bytes((sample_copy / "ipcns-var-10.img").read_bytes())
    (sample_copy / "ids-1.img").unlink()
    with pytest.raises(ImageError, match=r"ipc namespace images for ids \[10, 99\] and no ids image"):
        read_checkpoint(sample_copy)
    (sample_copy / "ipcns-var-99.img").unlink()
    assert with_shm_bytes(read_checkpoint(sample_copy)) == with_shm_bytes(read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint"))


def test_root_task_in_the_dumping_hosts_namespaces(sample_copy):
    """A root task that kept the host's IPC/UTS namespaces has no namespace to rebuild."""
    host = host_ids(sample_copy)
    write_ids(sample_copy / "ids-1.img", ipc_ns_id=host.ipc_ns_id, uts_ns_id=host.uts_ns_id)
    contents = read_checkpoint(sample_copy)
    assert (contents.ipc, contents.uts) == (None, None)


def test_root_task_namespace_without_images(sample_copy):
    write_ids(sample_copy / "ids-1.img", ipc_ns_id=12)
    with pytest.raises(ImageError, match=r"images exist for ids \[10\], but not for the root task's namespace 12"):
        read_checkpoint(sample_copy)


def test_not_a_checkpoint(tmp_path, sample_copy):
    with pytest.raises(ImageError) as caught:
        read_checkpoint(tmp_path / "nowhere")
    assert caught.value.path == str(tmp_path / "nowhere" / "inventory.img")
    inventory = read_single_entry(sample_copy / "inventory.img", INVENTORY)
    inventory.img_version = 1
    raw = inventory.SerializeToString()
    (sample_copy / "inventory.img").write_bytes(struct.pack("<II", INVENTORY.magic, len(raw)) + raw)
    with pytest.raises(ImageError, match="image set version 1"):
        read_checkpoint(sample_copy)


# --------------------------------------------------------------------------- payload formats


def desc(id: int, key: int = 0x1234, mode: int = 0o640) -> pb.ipc_desc_entry:
    return pb.ipc_desc_entry(key=key, uid=1, gid=2, cuid=0, cgid=0, mode=mode, id=id)


def test_inline_shm_contents_of_older_criu(sample_copy, make_image, decode_patched):
    """Before pagemaps, the bytes followed the entry, padded to 4 (pycriu's reader agrees)."""
    path = make_image(sample_copy / "ipcns-shm-10.img", IPCNS_SHM, [
        pb.ipc_shm_entry(desc=desc(3), size=10), b"0123456789\0\0",
        pb.ipc_shm_entry(desc=desc(4, key=0xFFFFFFFF), size=8, in_pagemaps=False), b"abcdefgh",
    ])
    shm = read_checkpoint(sample_copy).ipc.shm
    assert [(s.id, s.key, s.read_bytes()) for s in shm] == [(3, 0x1234, b"0123456789"), (4, 0xFFFFFFFF, b"abcdefgh")]
    extras = [base64.b64decode(e["extra"]) for e in decode_patched(path)["entries"]]
    assert extras == [s.read_bytes() for s in shm]


def shm_entry(shmid: int, size: int) -> pb.ipc_shm_entry:
    return pb.ipc_shm_entry(desc=desc(shmid), size=size, in_pagemaps=True)


@pytest.mark.slow
def test_payloads_padded_as_crit_writes_them(sample_copy, crit_encode):
    """Semaphore values and message texts padded to 8 bytes, with lengths that make the padding
    matter, written by crit from JSON. (crit 3.17 cannot encode shm contents: see
    test_inline_shm_contents_of_older_criu for their padding to 4.)"""

    def json_desc(id):
        return {"key": 0x100 + id, "uid": 3, "gid": 4, "cuid": 0, "cgid": 0, "mode": 0o600, "id": id}

    sems = [(1, [1, 2, 3]), (2, [9]), (3, [5, 6, 7, 8, 32767])]
    sem_entries = [{"desc": json_desc(i), "nsems": len(v), "extra": v} for i, v in sems]
    crit_encode({"magic": "IPCNS_SEM", "entries": sem_entries}, sample_copy / "ipcns-sem-10.img")
    texts = [(1, b"x" * 9), (2, b""), (3, b"abc"), (4, b"y" * 17)]
    extra = [item for mtype, text in texts
             for item in ({"mtype": mtype, "msize": len(text)}, base64.b64encode(text).decode())]
    crit_encode({"magic": "IPCNS_MSG", "entries": [
        {"desc": json_desc(5), "qbytes": 16384, "qnum": 4, "extra": extra},
        {"desc": json_desc(6), "qbytes": 100, "qnum": 1, "extra": extra[:2]}]}, sample_copy / "ipcns-msg-10.img")

    ipc = read_checkpoint(sample_copy).ipc
    assert [(s.id, s.key, s.uid, s.gid, s.values) for s in ipc.sem] == [(i, 0x100 + i, 3, 4, tuple(v)) for i, v in sems]
    assert [(q.id, q.qbytes, q.messages) for q in ipc.msg] == [(5, 16384, tuple(texts)), (6, 100, tuple(texts[:1]))]


def write_shmem_pagemap(make_image, directory: Path, shmid: int, entries, pages: bytes, pages_id: int = 77):
    make_image(directory / f"pagemap-shmem-{shmid}.img", PAGEMAP, [pb.pagemap_head(pages_id=pages_id), *entries])
    (directory / f"pages-{pages_id}.img").write_bytes(pages)


def test_pagemap_holes_read_as_zeros(sample_copy, make_image):
    """Pages a pagemap leaves out are zeros; the segment ends mid-page; CRIU 4.2's page count."""
    size = 5 * PAGE + 100
    make_image(sample_copy / "ipcns-shm-10.img", IPCNS_SHM, [shm_entry(7, size)])
    a, b, c = (bytes([x]) * PAGE for x in b"abc")
    write_shmem_pagemap(make_image, sample_copy, 7, [
        pb.pagemap_entry(vaddr=PAGE, compat_nr_pages=2, flags=4),
        pb.pagemap_entry(vaddr=5 * PAGE, compat_nr_pages=0, nr_pages=1, flags=4),
    ], a + b + c)
    (segment,) = read_checkpoint(sample_copy).ipc.shm
    assert segment.read_bytes() == bytes(PAGE) + a + b + bytes(2 * PAGE) + c[:100]


@pytest.mark.parametrize("entries, problem", [
    ([pb.pagemap_entry(vaddr=PAGE, compat_nr_pages=1, flags=1)], "in a parent checkpoint"),
    ([pb.pagemap_entry(vaddr=PAGE, compat_nr_pages=1, in_parent=True)], "in a parent checkpoint"),
    ([pb.pagemap_entry(vaddr=PAGE, compat_nr_pages=1, flags=2)], "lazy-pages"),
    ([pb.pagemap_entry(vaddr=100, compat_nr_pages=1, flags=4)], "unaligned"),
    ([pb.pagemap_entry(vaddr=0, compat_nr_pages=3, flags=4)], "beyond the segment"),
    ([pb.pagemap_entry(vaddr=PAGE, compat_nr_pages=1, flags=4), pb.pagemap_entry(vaddr=0, compat_nr_pages=1, flags=4)],
     "out of order"),
    ([pb.pagemap_entry(vaddr=0, compat_nr_pages=0, nr_pages=1 << 50, flags=4)], "beyond the segment"),
])
def test_bad_pagemaps(sample_copy, make_image, entries, problem):
    make_image(sample_copy / "ipcns-shm-10.img", IPCNS_SHM, [shm_entry(7, 2 * PAGE)])
    write_shmem_pagemap(make_image, sample_copy, 7, entries, bytes(2 * PAGE))
    with pytest.raises(ImageError, match=problem) as caught:
        read_checkpoint(sample_copy)
    assert caught.value.path == str(sample_copy / "pagemap-shmem-7.img")


def test_missing_or_short_pages(sample_copy):
    (sample_copy / "pages-3.img").write_bytes(bytes(PAGE))
    with pytest.raises(ImageError, match="segment 8: maps 2097152 bytes of pages, pages-3.img holds 4096") as caught:
        read_checkpoint(sample_copy)
    assert caught.value.path == str(sample_copy / "pagemap-shmem-8.img")
    (sample_copy / "pages-3.img").unlink()
    with pytest.raises(ImageError, match="cannot open") as caught:
        read_checkpoint(sample_copy)
    assert caught.value.path == str(sample_copy / "pages-3.img")
    (sample_copy / "pagemap-shmem-8.img").unlink()
    with pytest.raises(ImageError, match="cannot open") as caught:
        read_checkpoint(sample_copy)
    assert caught.value.path == str(sample_copy / "pagemap-shmem-8.img")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("image_type, entries, problem", [
    (IPCNS_SEM, [pb.ipc_sem_entry(desc=desc(1), nsems=0xFFFFFFFF)], "values of semaphore set 1: needs 8589934592"),
    (IPCNS_SHM, [pb.ipc_shm_entry(desc=desc(1), size=1 << 63)], "contents of shm segment 1: needs 9223372036854775808"),
    (IPCNS_SHM, [pb.ipc_shm_entry(desc=desc(1), size=1 << 20)], "contents of shm segment 1: needs"),
    (IPCNS_MSG, [pb.ipc_msg_entry(desc=desc(1), qbytes=1, qnum=0xFFFFFFFF), pb.ipc_msg(mtype=1, msize=1), b"x" * 8],
     "4294967295 messages recorded, the file ends after 1"),
    (IPCNS_MSG, [pb.ipc_msg_entry(desc=desc(1), qbytes=1, qnum=1), pb.ipc_msg(mtype=1, msize=0xFFFFFFFF)],
     "text of message 0 of queue 1: needs"),
    (IPCNS_SEM, [pb.ipc_sem_entry(desc=desc(1), nsems=3), b"\1\0\2\0\3\0"], "padding|needs 8 bytes"),
])
def test_huge_or_missing_payloads(sample_copy, make_image, image_type, entries, problem):
    """Payload lengths taken from entries are checked against the file before anything is read."""
    kind = {IPCNS_SEM: "sem", IPCNS_SHM: "shm", IPCNS_MSG: "msg"}[image_type]
    path = make_image(sample_copy / f"ipcns-{kind}-10.img", image_type, entries)
    started = time.monotonic()
    with pytest.raises(ImageError, match=problem) as caught:
        read_checkpoint(sample_copy)
    assert caught.value.path == str(path)
    assert time.monotonic() - started < 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["ipcns-shm-10.img", "ipcns-sem-10.img", "ipcns-msg-10.img", "ipcns-var-10.img",
                                  "utsns-11.img", "ids-1.img", "pstree.img", "inventory.img", "pagemap-shmem-8.img"])
def test_truncated_images_of_a_checkpoint(sample_copy, name):
    """Each image cut at every offset: an ImageError naming that image, or (cut between
    objects) a prefix of the objects; never another exception."""
    path = sample_copy / name
    data = path.read_bytes()
    full = read_checkpoint(sample_copy)
    started = time.monotonic()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        try:
            contents = read_checkpoint(sample_copy)
        except ImageError as e:
            assert e.path == str(path) and 0 <= e.offset <= cut, (cut, e)
        else:
            assert name.startswith(("ipcns-shm", "ipcns-sem", "ipcns-msg")), cut
            for kind in ("shm", "sem", "msg"):
                got, want = getattr(contents.ipc, kind), getattr(full.ipc, kind)
                assert got == want[: len(got)], (cut, kind)
            assert contents != full
    assert time.monotonic() - started < 30


