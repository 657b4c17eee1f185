"""cer.criu.mountpoints and cer.criu.tmpfs: a real runc + CRIU 4 checkpoint against crit and against what the
container saw, and hostile images and archives."""

import gzip
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402

from cer.criu import criu_pb2 as pb  # noqa: E402
from cer.criu.checkpoint import read_checkpoint  # noqa: E402
from cer.criu.images import IMG_COMMON_MAGIC, MNTS, read_entries  # noqa: E402
from cer.criu.mountpoints import MAX_MOUNTS, read_mount_tree  # noqa: E402
from cer.criu.tmpfs import read_tmpfs_image  # noqa: E402
from cer.errors import ImageError  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def mountpoints_image(checkpoint) -> Path:
    (path,) = checkpoint.images.glob("mountpoints-*.img")
    return path


# --------------------------------------------------------------------------- the real checkpoint

@pytest.mark.slow
def test_mount_entries_equal_what_crit_and_patched_pycriu_decode(container_checkpoint):
    """Every field of every mnt_entry of runc's checkpoint, by name, as Debian's crit and the patched pycriu
    decode them (their schema is CRIU's own mnt.proto)."""
    path = mountpoints_image(container_checkpoint)
    crit = shutil.which("crit")
    if crit is None:
        pytest.fail("crit is not installed (Debian package criu): run contrib/install-deps")
    result = subprocess.run([crit, "decode", "-i", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    by_crit = json.loads(result.stdout)["entries"]
    by_pycriu = criu_support.decode_image(path)["entries"]
    ours = []
    for entry in read_entries(path, MNTS):
        ours.append({field.name: value for field, value in entry.ListFields()})
    assert ours == by_crit == by_pycriu
    assert len(ours) >= 20  # proc, dev, pts, shm, mqueue, sys, cgroups, run, tmp, data, masks, ro paths


@pytest.mark.slow
def test_the_mount_tree_of_a_runc_container(container_checkpoint):
    """Parents first, one root at /, the mounts the container's config and runc made, the host bind with its key."""
    tree = read_checkpoint(container_checkpoint.images).mounts
    assert tree is not None and tree.root.mountpoint == "/"
    seen = {tree.root.mnt_id}
    for entry in tree.mounts:
        assert entry.parent_mnt_id in seen, f"{entry.describe()} comes before its parent"
        seen.add(entry.mnt_id)
    by_target = {entry.mountpoint: entry for entry in tree.mounts}
    expected = {"/proc": "proc", "/dev": "tmpfs", "/dev/pts": "devpts", "/dev/shm": "tmpfs", "/dev/mqueue": "mqueue",
                "/sys": "sysfs", "/run": "tmpfs", "/tmp": "tmpfs", "/proc/sys": "proc", "/proc/keys": "tmpfs",
                "/proc/acpi": "tmpfs", "/sys/firmware": "tmpfs", "/sys/fs/cgroup": "tmpfs"}
    assert {target: by_target[target].fstype for target in expected} == expected
    assert by_target["/data"].ext_key == "/data" and by_target["/data"].root == str(container_checkpoint.hostdata)
    assert by_target["/proc/keys"].ext_key == "/dev/null" and by_target["/proc/keys"].root == "/null"
    assert by_target["/proc/keys"].root_dev == by_target["/dev"].root_dev  # runc binds the container's /dev/null
    assert "newinstance" in by_target["/dev/pts"].options and "ptmxmode=666" in by_target["/dev/pts"].options
    assert by_target["/sys"].flags & 1 and by_target["/sys"].sb_flags & 1  # read-only
    # Every tmpfs shown whole has its contents, read once per superblock.
    wholes = {e.root_dev for e in tree.mounts if e.fstype == "tmpfs" and e.root == "/" and e.ext_key is None}
    assert {dev for dev, _ in tree.tmpfs} == wholes


@pytest.mark.slow
def test_tmpfs_contents_equal_the_running_containers_files(container_checkpoint):
    """What the reader got from each tmpfs archive is what the container had in that mount while it ran."""
    tree = read_checkpoint(container_checkpoint.images).mounts
    by_target = {entry.mountpoint: entry for entry in tree.mounts}
    for target in ("/dev", "/dev/shm", "/run", "/tmp"):
        contents = tree.contents(by_target[target].root_dev)
        live = container_checkpoint.tmpfs[target]
        top = contents.root
        read = {"/": {"kind": "dir", "mode": oct(top.mode), "uid": top.uid, "gid": top.gid}}
        links = {}
        for entry in contents.entries:
            row = {"kind": entry.kind, "mode": oct(entry.mode), "uid": entry.uid, "gid": entry.gid}
            if entry.kind == "file":
                row["sha256"] = __import__("hashlib").sha256(entry.data).hexdigest()
            elif entry.kind == "symlink":
                row["target"] = entry.link
            elif entry.kind == "chardev":
                row["device"] = list(entry.device)
            elif entry.kind == "hardlink":
                links["/" + entry.name] = "/" + entry.link
            read["/" + entry.name] = row
        for name, source in links.items():
            read[name] = dict(read[source])
        expected = {}
        for name, row in live.items():
            if row["kind"] == "mountpoint":
                # A mount below this one: the archive holds the directory under it.
                expected[name] = {"kind": "dir"}
                continue
            kept = ("kind", "mode", "uid", "gid", "sha256", "target", "device")
            expected[name] = {key: value for key, value in row.items() if key in kept}
        for name in expected:
            if expected[name] == {"kind": "dir"}:
                read[name] = {"kind": read[name]["kind"]}
        assert read == expected, target
    run = tree.contents(by_target["/run"].root_dev)
    names = {entry.name: entry for entry in run.entries}
    assert names["cer/sub/data.bin"].data == bytes((i * 31 + 7) & 0xFF for i in range(65536))
    assert (names["cer/sub/data.bin"].uid, names["cer/sub/data.bin"].mode) == (1000, 0o600)
    assert {names["cer/hard"].kind, names["cer/state.txt"].kind} == {"file", "hardlink"}
    tmp = tree.contents(by_target["/tmp"].root_dev)
    assert [(e.name, e.mtime_ns) for e in tmp.entries] == [("cer-tmp", 1_000_000_000 * 1_000_000_000)]


def test_a_checkpoint_without_a_mount_namespace_has_no_mount_tree():
    """The sample checkpoints (criu dump of a process sharing the host's mount namespace)."""
    assert read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint").mounts is None


# --------------------------------------------------------------------------- hostile mountpoints images

def write_mounts(path: Path, entries) -> Path:
    out = bytearray(struct.pack("<II", IMG_COMMON_MAGIC, MNTS.magic))
    for entry in entries:
        raw = entry.SerializeToString()
        out += struct.pack("<I", len(raw)) + raw
    path.write_bytes(bytes(out))
    return path


def mnt(mnt_id, parent, mountpoint, fstype=5, root="/", dev=None, **extra):
    return pb.mnt_entry(fstype=fstype, mnt_id=mnt_id, root_dev=dev if dev is not None else mnt_id, parent_mnt_id=parent,
                        flags=extra.pop("flags", 0x200000), root=root, mountpoint=mountpoint,
                        source=extra.pop("source", "tmpfs"), options=extra.pop("options", ""), **extra)


def empty_tar(path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("./")
        info.type = tarfile.DIRTYPE
        info.mode = 0o1777
        archive.addfile(info)
    path.write_bytes(gzip.compress(buffer.getvalue()))


def test_a_well_formed_tree_is_ordered_parents_first(tmp_path):
    write_mounts(tmp_path / "mountpoints-9.img", [
        mnt(12, 11, "/dev/shm"), mnt(11, 10, "./dev"), mnt(10, 1, "/", fstype=0), mnt(13, 10, "/tmp")])
    for dev in (11, 12, 13):
        empty_tar(tmp_path / f"tmpfs-dev-{dev}.tar.gz.img")
    tree = read_mount_tree(tmp_path, 9)
    assert tree.root.mnt_id == 10
    assert [(e.mnt_id, e.mountpoint) for e in tree.mounts] == [(11, "/dev"), (13, "/tmp"), (12, "/dev/shm")]


def test_a_sibling_inside_another_sibling_comes_first(tmp_path):
    """/a/b with the root as parent was mounted before /a covered it, whatever the (reused) mount ids say."""
    write_mounts(tmp_path / "mountpoints-9.img", [
        mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a", fstype=1), mnt(30, 10, "/a/b", fstype=1),
        mnt(12, 10, "/c", fstype=1)])
    assert [e.mountpoint for e in read_mount_tree(tmp_path, 9).mounts] == ["/a/b", "/a", "/c"]


@pytest.mark.parametrize("entries, problem", [
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a"), mnt(11, 10, "/b")], "appears twice"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 2, "/a")], "mounts without a parent here"),
    ([mnt(10, 1, "/x", fstype=0)], "one root mount at '/'"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 12, "/a"), mnt(12, 11, "/a/b")], "not reachable from the root"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a/../../etc")], "without '..'"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "relative")], "not an absolute path"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a", root="../x")], "root '../x'"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a", flags=0x4000)], "unknown mount flags 0x4000"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a", sb_flags=0x100)], "unknown superblock flags"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a", fstype=99)], "unknown fstype 99"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a"), mnt(12, 11, "/b")], "is not below its parent"),
    ([mnt(10, 1, "/", fstype=0), mnt(11, 10, "/a")], "tmpfs-dev-11.tar.gz.img: at offset 0: missing"),
])
def test_malformed_mount_trees_are_refused(tmp_path, entries, problem):
    write_mounts(tmp_path / "mountpoints-9.img", entries)
    with pytest.raises(ImageError, match=problem.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as caught:
        read_mount_tree(tmp_path, 9)
    assert str(tmp_path) in str(caught.value)


def test_too_many_mounts_are_refused_before_reading_on(tmp_path):
    entries = [mnt(10, 1, "/", fstype=0)] + [mnt(11 + i, 10, f"/m{i}", fstype=1) for i in range(MAX_MOUNTS)]
    write_mounts(tmp_path / "mountpoints-9.img", entries)
    with pytest.raises(ImageError, match=f"more than {MAX_MOUNTS} mounts"):
        read_mount_tree(tmp_path, 9)


def test_a_truncated_mountpoints_image_names_the_offset(tmp_path):
    path = write_mounts(tmp_path / "mountpoints-9.img", [mnt(10, 1, "/", fstype=0), mnt(11, 10, "/proc", fstype=1)])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ImageError, match=r"mountpoints-9\.img: at offset \d+: entry of \d+ bytes"):
        read_mount_tree(tmp_path, 9)


# --------------------------------------------------------------------------- hostile tmpfs archives

def member(name, kind=tarfile.REGTYPE, data=b"", **attributes):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = attributes.pop("mode", 0o644)
    for key, value in attributes.items():
        setattr(info, key, value)
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def archive(path: Path, members, *, root: bool = True) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if root:
            tar.addfile(*member("./", tarfile.DIRTYPE, mode=0o755))
        for info, data in members:
            tar.addfile(info, data)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


@pytest.mark.parametrize("members, problem", [
    ([member("/etc/passwd", data=b"x")], "absolute name '/etc/passwd'"),
    ([member("./../outside", data=b"x")], "leads out through '..'"),
    ([member("a/../../x", data=b"x")], "leads out through '..'"),
    # A link pointing out, then a file written "through" it.
    ([member("./out", tarfile.SYMTYPE, linkname="/etc"), member("./out/cron.d", tarfile.DIRTYPE)],
     "its directory 'out' is a symlink: nothing may be created through it"),
    ([member("./out", tarfile.SYMTYPE, linkname="../.."), member("./out/x", data=b"x")],
     "its directory 'out' is a symlink"),
    ([member("./file", data=b"x"), member("./file/x", data=b"x")], "its directory 'file' is a file"),
    ([member("./missing/x", data=b"x")], "its directory 'missing' is not listed before it"),
    ([member("./passwd", tarfile.LNKTYPE, linkname="/etc/passwd")], "absolute name '/etc/passwd'"),
    ([member("./passwd", tarfile.LNKTYPE, linkname="../etc/passwd")], "leads out through '..'"),
    ([member("./l", tarfile.SYMTYPE, linkname="/etc/shadow"), member("./h", tarfile.LNKTYPE, linkname="./l")],
     "a hard link to './l', which is not a regular file"),
    ([member("./h", tarfile.LNKTYPE, linkname="./later"), member("./later", data=b"x")],
     "not a regular file listed before it"),
    ([member("./volume", b"V")], "unsupported member type b'V'"),
    ([member("./x", data=b"1"), member("./x", data=b"2")], "listed twice"),
    ([member("./" + "a" * 256, data=b"x")], "longer than 255 bytes"),
    ([member("./user", data=b"x", uid=1 << 40)], "uid"),
    ([member("./dir", tarfile.DIRTYPE), member("./", tarfile.DIRTYPE)], "listed once and first"),
])
def test_hostile_archives_are_refused_naming_the_member(tmp_path, members, problem):
    path = archive(tmp_path / "tmpfs-dev-5.tar.gz.img", members)
    with pytest.raises(ImageError) as caught:
        read_tmpfs_image(path)
    message = str(caught.value)
    assert problem in message and str(path) in message and "at offset" in message


def test_a_root_that_is_no_directory_is_refused(tmp_path):
    path = archive(tmp_path / "t.img", [member("./", data=b"")], root=False)
    with pytest.raises(ImageError, match="root must be a directory"):
        read_tmpfs_image(path)


def test_sizes_are_bounded_before_reading(tmp_path):
    path = archive(tmp_path / "t.img", [member("./big", data=b"\0" * 5000)])
    with pytest.raises(ImageError, match="5000 bytes: the archive's files would exceed 4096 bytes"):
        read_tmpfs_image(path, max_bytes=4096)
    path = archive(tmp_path / "t.img", [member(f"./f{i}", data=b"") for i in range(20)])
    with pytest.raises(ImageError, match="more than 10 entries"):
        read_tmpfs_image(path, max_entries=10)


def test_a_gzip_bomb_stops_at_the_stream_bound(tmp_path):
    """A GNU long-name header claiming 64 MiB of name, zeros that gzip to 64 KiB: tarfile would read it all
    into memory; the uncompressed stream is refused once past its bound instead."""
    path = tmp_path / "bomb.img"
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = 64 << 20
    with gzip.open(path, "wb") as out:
        out.write(header.tobuf(format=tarfile.GNU_FORMAT))
        for _ in range(64):
            out.write(b"a" * (1 << 20))
    with pytest.raises(ImageError, match=r"at offset \d+: the uncompressed archive exceeds \d+ bytes"):
        read_tmpfs_image(path, max_bytes=1 << 20, max_entries=4)


def test_a_sparse_file_claiming_more_than_the_limit_is_refused(tmp_path):
    """GNU tar --sparse stores holes as a map: the file's full size counts."""
    source = tmp_path / "source"
    source.mkdir()
    with open(source / "sparse", "wb") as file:
        file.truncate(1 << 30)
        file.write(b"start")
    path = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--create", "--gzip", "--sparse", "--file", str(path), "-C", str(source), "."], check=True,
                   timeout=60)
    assert path.stat().st_size < 1 << 16
    with pytest.raises(ImageError, match="1073741824 bytes: the archive's files would exceed"):
        read_tmpfs_image(path)


def test_a_small_sparse_file_reads_with_its_holes(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    with open(source / "sparse", "wb") as file:
        file.seek(100_000)
        file.write(b"end")
    path = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--create", "--gzip", "--sparse", "--numeric-owner", "--file", str(path), "-C", str(source),
                    "."], check=True, timeout=60)
    (entry,) = read_tmpfs_image(path).entries
    assert entry.data == b"\0" * 100_000 + b"end"


@pytest.mark.parametrize("raw", [b"", b"not gzip at all", gzip.compress(b"\x01" * 700), gzip.compress(b"x")[:-6]])
def test_garbage_is_an_image_error(tmp_path, raw):
    path = tmp_path / "t.img"
    path.write_bytes(raw)
    with pytest.raises(ImageError, match=str(path)):
        read_tmpfs_image(path)


def test_what_is_allowed_reads_back_exactly(tmp_path):
    path = archive(tmp_path / "t.img", [
        member("./d", tarfile.DIRTYPE, mode=0o2750, uid=5, gid=6, mtime=1234),
        member("./d/f", data=b"hello", mode=0o4755, uid=7, gid=8, mtime=99),
        member("./d/h", tarfile.LNKTYPE, linkname="d/f"),
        member("./l", tarfile.SYMTYPE, linkname="/proc/self/fd"),
        member("./null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        member("./fifo", tarfile.FIFOTYPE, mode=0o600),
        member("./sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
    ])
    contents = read_tmpfs_image(path)
    rows = [(e.name, e.kind, oct(e.mode), e.uid, e.gid, e.data, e.link, e.device) for e in contents.entries]
    assert rows == [
        ("d", "dir", "0o2750", 5, 6, b"", "", None),
        ("d/f", "file", "0o4755", 7, 8, b"hello", "", None),
        ("d/h", "hardlink", "0o644", 0, 0, b"", "d/f", None),
        ("l", "symlink", "0o644", 0, 0, b"", "/proc/self/fd", None),
        ("null", "chardev", "0o666", 0, 0, b"", "", (1, 3)),
        ("fifo", "fifo", "0o600", 0, 0, b"", "", None),
        ("sda", "blockdev", "0o660", 0, 0, b"", "", (8, 0)),
    ]
    assert contents.entries[1].mtime_ns == 99 * 10**9 and contents.size == 5
    # Devices are read as they are; cer.mounts decides (and refuses the block device: test_plan).
    assert [device.name for device in contents.devices] == ["null", "sda"]


@pytest.mark.slow
def test_an_unreadable_mount_tree_fails_the_mount_namespaces_only(container_checkpoint, tmp_path):
    """A hostile tmpfs archive in a copy of the real checkpoint: IPC and UTS are read, the mount tree is an error
    naming the archive."""
    images = tmp_path / "images"
    shutil.copytree(container_checkpoint.images, images)
    tree = read_checkpoint(images).mounts
    run = next(entry for entry in tree.mounts if entry.mountpoint == "/run")
    archive(images / f"tmpfs-dev-{run.root_dev}.tar.gz.img", [member("../escape", data=b"x")])
    contents = read_checkpoint(images)
    assert contents.mounts is None and contents.uts is not None and contents.ipc is not None
    assert f"tmpfs-dev-{run.root_dev}.tar.gz.img: at offset" in contents.mounts_error
    assert "leads out through '..'" in contents.mounts_error
