"""cer.criu.views: what an image view holds, how it is made, and what it refuses."""

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402

from cer.criu import criu_pb2 as pb  # noqa: E402
from cer.criu.checkpoint import VMA_AREA_SYSVIPC, attached_shm_ids, read_checkpoint  # noqa: E402
from cer.criu.images import IPCNS_MSG, IPCNS_SEM, IPCNS_SHM, MM, ImageReader, read_entries  # noqa: E402
from cer.criu.views import (  # noqa: E402
    TRANSFORMS,
    image_header,
    images_digest,
    ipc_transform,
    make_view,
    view_key,
    view_kinds,
)
from cer.errors import ImageError, ViewError  # noqa: E402

SAMPLE = criu_support.SAMPLE_DIR / "checkpoint"
SAMPLE_IPC_NS = 10  # ipcns-*-10.img: the sample's root IPC namespace


def attach(checkpoint: Path, shmid: int) -> None:
    """Make the sample's task look as if it had shm segment ``shmid`` attached at dump time: a
    VMA_AREA_SYSVIPC vma, as CRIU records one, added to its mm image."""
    (mm,) = read_entries(checkpoint / "mm-1.img", MM)
    mm.vmas.add(start=0x7F0000000000, end=0x7F0000001000, pgoff=0, shmid=shmid, prot=3, flags=1,
                status=VMA_AREA_SYSVIPC | 1, fd=-1)
    raw = mm.SerializeToString()
    (checkpoint / "mm-1.img").write_bytes(image_header(MM) + struct.pack("<I", len(raw)) + raw)


def shm_ids(path: Path) -> list[int]:
    with ImageReader(path, IPCNS_SHM) as image:
        return [entry.desc.id for entry in image.entries()]


def test_a_sample_without_attached_segments_gets_empty_ipc_images():
    assert attached_shm_ids(SAMPLE) == frozenset()
    rewritten = ipc_transform(SAMPLE)
    assert rewritten == {
        f"ipcns-shm-{SAMPLE_IPC_NS}.img": image_header(IPCNS_SHM),
        f"ipcns-sem-{SAMPLE_IPC_NS}.img": image_header(IPCNS_SEM),
        f"ipcns-msg-{SAMPLE_IPC_NS}.img": image_header(IPCNS_MSG),
    }


def test_attached_segments_stay_in_the_view_and_out_of_the_prefill(sample_copy):
    attach(sample_copy, 8)
    assert attached_shm_ids(sample_copy) == {8}
    ipc = read_checkpoint(sample_copy).ipc
    assert ipc.attached_shm == {8}
    assert [segment.id for segment in ipc.shm] == [7, 8]
    assert [segment.id for segment in ipc.prefill().shm] == [7]
    assert ipc.prefill().sem == ipc.sem and ipc.prefill().msg == ipc.msg

    view = sample_copy.parent / "views" / "ipc"
    make_view(sample_copy, view, ["ipc"])
    assert shm_ids(view / f"ipcns-shm-{SAMPLE_IPC_NS}.img") == [8]
    # The kept entry is the original's, byte for byte, and its pages are the checkpoint's own file.
    original = (sample_copy / f"ipcns-shm-{SAMPLE_IPC_NS}.img").read_bytes()
    kept = (view / f"ipcns-shm-{SAMPLE_IPC_NS}.img").read_bytes()
    assert kept[8:] in original
    assert os.stat(view / "pagemap-shmem-8.img").st_ino == os.stat(sample_copy / "pagemap-shmem-8.img").st_ino


def test_an_attached_id_of_another_namespace_is_not_taken_for_one_of_the_root_namespace(sample_copy):
    attach(sample_copy, 99)
    assert attached_shm_ids(sample_copy) == {99}
    assert read_checkpoint(sample_copy).ipc.attached_shm == frozenset()


def test_a_view_is_hard_links_except_the_rewritten_files_and_is_read_only(tmp_path):
    view = tmp_path / "views" / "ipc"
    make_view(SAMPLE, view, ["ipc"])
    names = sorted(os.listdir(view))
    assert names == sorted(os.listdir(SAMPLE))
    rewritten = set(ipc_transform(SAMPLE))
    for name in names:
        same = os.stat(view / name).st_ino == os.stat(SAMPLE / name).st_ino
        assert same == (name not in rewritten), name
    assert os.stat(view).st_mode & 0o777 == 0o555
    assert all(os.stat(view / name).st_mode & 0o222 == 0 for name in rewritten)
    assert not [name for name in os.listdir(view.parent) if name.startswith(".building")]
    # What CRIU reads of it is a valid, empty image.
    assert read_entries(view / f"ipcns-sem-{SAMPLE_IPC_NS}.img", IPCNS_SEM) == []


def test_only_regular_files_reach_a_view(sample_copy, tmp_path):
    (sample_copy / "planted-link").symlink_to("/etc/shadow")
    (sample_copy / "planted-dir").mkdir()
    os.mkfifo(sample_copy / "planted-fifo")
    view = tmp_path / "v" / "ipc"
    make_view(sample_copy, view, ["ipc"])
    assert not {"planted-link", "planted-dir", "planted-fifo"} & set(os.listdir(view))


def test_a_view_left_from_before_is_replaced(tmp_path):
    view = tmp_path / "v" / "ipc"
    view.mkdir(parents=True)
    (view / "stale.img").write_bytes(b"old")
    make_view(SAMPLE, view, ["ipc"])
    assert "stale.img" not in os.listdir(view)


def test_images_on_another_filesystem_are_refused_not_copied():
    """Views are hard links: a checkpoint on another filesystem than the view is a clear error."""
    shm_dir = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        checkpoint = shm_dir / "checkpoint"
        shutil.copytree(SAMPLE, checkpoint)
        assert os.stat(checkpoint).st_dev != os.stat(tempfile.gettempdir()).st_dev
        target_parent = Path(tempfile.mkdtemp())
        try:
            with pytest.raises(ViewError, match="another filesystem"):
                make_view(checkpoint, target_parent / "v" / "ipc", ["ipc"])
            assert os.listdir(target_parent / "v") == []  # nothing half-made left
        finally:
            shutil.rmtree(target_parent)
    finally:
        shutil.rmtree(shm_dir)


def test_a_broken_image_is_a_view_error(sample_copy, tmp_path):
    (sample_copy / f"ipcns-shm-{SAMPLE_IPC_NS}.img").write_bytes(image_header(IPCNS_SHM) + b"\xff\xff\xff\x7f")
    with pytest.raises(ViewError, match="ipcns-shm"):
        make_view(sample_copy, tmp_path / "v" / "ipc", ["ipc"])
    assert not (tmp_path / "v" / "ipc").exists()


def test_keys_and_kinds():
    assert view_key([]) == ""
    assert view_key(["ipc", "ipc"]) == "ipc"
    assert view_kinds(["uts", "ipc", "mnt"]) == tuple(sorted({"ipc", "mnt"} & set(TRANSFORMS)))
    with pytest.raises(ValueError, match="no view of kind 'pid'"):
        view_key(["pid"])


def test_the_digest_names_a_dump_not_a_directory(tmp_path, sample_copy):
    assert images_digest(sample_copy) == images_digest(SAMPLE)
    assert images_digest(SAMPLE) != images_digest(criu_support.SAMPLE_DIR / "checkpoint-empty-ipc")
    assert images_digest(SAMPLE).startswith("sha256:") and len(images_digest(SAMPLE)) == 71


def test_the_digest_refuses_what_is_not_an_identity_image(sample_copy):
    (sample_copy / "pstree.img").unlink()
    (sample_copy / "pstree.img").symlink_to(SAMPLE / "pstree.img")
    with pytest.raises(ImageError, match="a symlink"):
        images_digest(sample_copy)
    (sample_copy / "pstree.img").unlink()
    os.mkfifo(sample_copy / "pstree.img")
    with pytest.raises(ImageError, match="not a regular file"):
        images_digest(sample_copy)
    (sample_copy / "pstree.img").unlink()
    with open(sample_copy / "pstree.img", "wb") as file:
        file.truncate(2 << 20)
    with pytest.raises(ImageError, match="more than an identity image"):
        images_digest(sample_copy)


@pytest.mark.slow
def test_crit_reads_the_view_the_same_as_the_checkpoint(tmp_path, crit):
    """An independent decoder finds the view's rewritten images well-formed."""
    view = tmp_path / "v" / "ipc"
    make_view(SAMPLE, view, ["ipc"])
    for kind in ("sem", "msg"):
        assert crit(view / f"ipcns-{kind}-{SAMPLE_IPC_NS}.img")["entries"] == []
    assert subprocess.run(["crit", "decode", "-i", str(view / "pstree.img")], capture_output=True, timeout=60).returncode == 0
    assert pb.mm_entry  # the reader's schema has the mm image
