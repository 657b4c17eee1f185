"""The "mnt" view transform (bytes in, bytes out) and the restore plan's JSON, on a real runc + CRIU 4 checkpoint;
crit (Debian's CRIU tools) is the independent decoder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from cer.criu import criu_pb2 as pb  # noqa: E402
from cer.criu.checkpoint import read_checkpoint_mounts  # noqa: E402
from cer.criu.images import IDS, INVENTORY, PSTREE, encode_image, read_single_entry  # noqa: E402
from cer.criu.mntview import RESTORE_PLAN_NAME, mnt_view, root_task_pid, share_mount_namespace  # noqa: E402
from cer.errors import ImageError  # noqa: E402
from cer.mounting import decode_plan, encode_plan  # noqa: E402
from cer.mounts import plan_document, plan_mounts, restore_plan_document  # noqa: E402
from cer.restore_mounts import PLAN_NAME  # noqa: E402


def crit(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "image.img"
    path.write_bytes(data)
    return json.loads(subprocess.run(["crit", "decode", "-i", str(path)], check=True, capture_output=True,
                                     timeout=30).stdout)


def images(checkpoint) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in checkpoint.images.iterdir() if path.suffix == ".img"}


def test_the_inventory_says_crius_mount_namespace_was_the_tasks_and_nothing_else_changes(plain_checkpoint, tmp_path):
    files = images(plain_checkpoint)
    pid = root_task_pid(files["pstree.img"])
    rewritten = share_mount_namespace(files["inventory.img"], files[f"ids-{pid}.img"])
    before, after = crit(files["inventory.img"], tmp_path), crit(rewritten, tmp_path)
    task = crit(files[f"ids-{pid}.img"], tmp_path)["entries"][0]
    assert before["entries"][0]["root_ids"]["mnt_ns_id"] != task["mnt_ns_id"]
    assert after["entries"][0]["root_ids"]["mnt_ns_id"] == task["mnt_ns_id"]
    before["entries"][0]["root_ids"]["mnt_ns_id"] = task["mnt_ns_id"]
    assert after == before
    # Pure: the same bytes give the same bytes, and the whole view is that file (plus the restore's plan).
    view = mnt_view(files.__getitem__, {"root_flags": 0, "problems": [], "steps": []})
    assert view.keys() == {"inventory.img", RESTORE_PLAN_NAME} and view["inventory.img"] == rewritten
    assert decode_plan(view[RESTORE_PLAN_NAME]).steps == ()
    assert share_mount_namespace(rewritten, files[f"ids-{pid}.img"]) == rewritten


def test_fields_cers_schema_does_not_know_are_kept(plain_checkpoint):
    files = images(plain_checkpoint)
    pid = root_task_pid(files["pstree.img"])
    unknown = b"\x9a\x01\x03abc"  # field 19, length-delimited: a field of a newer CRIU
    inventory = read_single_entry("inventory.img", INVENTORY, files["inventory.img"])
    inventory.MergeFromString(unknown)
    rewritten = share_mount_namespace(encode_image(INVENTORY, [inventory]), files[f"ids-{pid}.img"])
    assert unknown in rewritten


def test_images_round_trip_through_the_encoder(plain_checkpoint):
    files = images(plain_checkpoint)
    for name, image_type in (("inventory.img", INVENTORY), (f"ids-{root_task_pid(files['pstree.img'])}.img", IDS)):
        entry = read_single_entry(name, image_type, files[name])
        assert encode_image(image_type, [entry]) == files[name]
    with pytest.raises(TypeError, match="task_kobj_ids_entry in an image of inventory_entry"):
        encode_image(INVENTORY, [pb.task_kobj_ids_entry(vm_id=1, files_id=1, fs_id=1, sighand_id=1)])


@pytest.mark.parametrize("damage, message", [
    (lambda f, pid: {**f, "inventory.img": f["inventory.img"][:-3]}, r"inventory.img: at offset \d+: entry"),
    (lambda f, pid: {**f, "inventory.img": b"\x19\x43\x56\x54" + f["inventory.img"]}, "inventory.img"),
    (lambda f, pid: {**f, f"ids-{pid}.img": encode_image(IDS, [pb.task_kobj_ids_entry(
        vm_id=1, files_id=1, fs_id=1, sighand_id=1)])}, "no mnt_ns_id"),
    (lambda f, pid: {**f, "pstree.img": encode_image(PSTREE, [])}, "no task in the process tree"),
    (lambda f, pid: {**f, "inventory.img": b""}, "empty file"),
], ids=["truncated", "wrong-magic", "no-mnt-ns-id", "empty-pstree", "empty-inventory"])
def test_malformed_images_are_refused_with_a_clear_error(plain_checkpoint, damage, message):
    files = images(plain_checkpoint)
    broken = damage(files, root_task_pid(files["pstree.img"]))
    with pytest.raises(ImageError, match=message):
        mnt_view(broken.__getitem__)


def test_the_restore_plan_survives_its_file(container_checkpoint):
    tree = read_checkpoint_mounts(container_checkpoint.images)
    document = restore_plan_document(tree)
    assert PLAN_NAME == RESTORE_PLAN_NAME
    # The external bind at /data is the pool's to make: no problem for a restore, and not among its steps.
    assert document["problems"] == [] and "/data" not in {step["entry"]["mountpoint"] for step in document["steps"]}
    plan = decode_plan(encode_plan(document))
    deferred = plan_mounts(tree, container_checkpoint.external).deferred
    assert [(s.entry.mountpoint, s.entry.fstype, s.entry.flags, s.action, s.source, s.deferred) for s in plan.steps] \
        == [(s.entry.mountpoint, s.entry.fstype, s.entry.flags, s.action, s.source, s.deferred) for s in deferred]
    assert [s.entry.describe() for s in plan.steps] == [s.entry.describe() for s in deferred]
    cgroup_tmpfs = next(s for s in plan.steps if s.entry.mountpoint == "/sys/fs/cgroup")
    original = next(s for s in deferred if s.entry.mountpoint == "/sys/fs/cgroup")
    assert [(e.name, e.kind, e.mode, e.link, e.data) for e in cgroup_tmpfs.contents.entries] == \
        [(e.name, e.kind, e.mode, e.link, e.data) for e in original.contents.entries]
    assert plan_document(plan_mounts(tree, {}))["problems"]  # without the placeholders /data is one
    for damaged in (b"", b"{}", encode_plan(document)[:-9], b"cer mount plan 1\n" + b"\x00" * 8):
        with pytest.raises(ValueError, match="plan of cer's mounts"):
            decode_plan(damaged)
