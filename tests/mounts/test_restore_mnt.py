"""A container restored by stock runc and CRIU 4.1.1 into one of cer's pooled mount namespaces (issue 12, items 3
and 6, mounts part).

The checkpoint is tests/mounts/mount-workload.c run by real runc: 27 mounts (the overlay-able root, /proc with
runc's read-only and masked paths, /dev with devpts, shm and mqueue, /sys with the cgroup v1 hierarchies, /run
and /tmp tmpfs) and files in its tmpfs mounts, two of them open, its cwd in one. It is restored through
``contrib/ctr-wrapper --runtime runc --external-ns mnt`` (plus ipc and uts): the mount entry of the bundle
carries cer's namespace, the images are cer's "mnt" view, and the CRIU option cer answers (the action script)
goes into a CRIU configuration file named by the ``org.criu.config`` annotation. runc, CRIU or gcc missing is a
failure, not a skip.
"""

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import serving_daemon, short_tempdir, wait_for

import mounts_support
import runc_support
from mounts_support import FILLED_TMPFS, container_mount_table, host_mount_changes, host_mounts, tmpfs_digest
from runc_support import RuntimeSupportError

from cer.criu.views import images_digest
from cer.mounting import decode_plan
from cer.protocol.methods import CheckpointPut, CheckpointRestore, NamespacePut
from cer.references import CheckpointRef

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "mounts"


@pytest.fixture
def cer(plain_checkpoint):
    with serving_daemon({"containerd_checkpoints": [{"name": NAME, "capacity": 1, "path": str(plain_checkpoint.images),
                                                     "rootfs": str(plain_checkpoint.rootfs)}]}) as daemon:
        yield daemon


@pytest.fixture
def work():
    path = short_tempdir("cer-mnt-restore-")
    previous = os.environ.get("CER_WRAPPER_WORKDIR")
    os.environ["CER_WRAPPER_WORKDIR"] = str(path / "wrapper")
    try:
        with runc_support.private_runc() as runc:
            yield path, runc
    finally:
        if previous is None:
            del os.environ["CER_WRAPPER_WORKDIR"]
        else:
            os.environ["CER_WRAPPER_WORKDIR"] = previous
        subprocess.run(["rm", "-rf", str(path)], timeout=60)


def restore_bundle(checkpoint, directory: Path, namespaces: dict[str, str] | None = None) -> Path:
    """The container's bundle for a restore: its config, root.path a copy of its rootfs (runc makes mount points
    there), ``namespaces`` (runc's type names) joined at the given paths."""
    directory.mkdir(parents=True)
    shutil.copytree(checkpoint.rootfs, directory / "rootfs", symlinks=True)
    config = json.loads(json.dumps(checkpoint.config))
    config["root"]["path"] = str(directory / "rootfs")
    # No CRIU configuration file unless named: runc would read the host-wide /etc/criu/runc.conf otherwise,
    # which other tests on this machine may be editing (ctr-wrapper's containerd path).
    config.setdefault("annotations", {})["org.criu.config"] = ""
    for entry in config["linux"]["namespaces"]:
        if namespaces and entry["type"] in namespaces:
            entry["path"] = namespaces[entry["type"]]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def workload_check(pid: int, timeout: float = 30) -> str:
    """Ask the workload to check its open files, cwd and /proc; its report."""
    report = Path(f"/proc/{pid}/root/run/cer/check")
    report.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    return wait_for(lambda: report.exists() and report.read_text(), timeout, 0.01, f"process {pid}'s check")


def test_a_restore_joins_cers_mount_namespace_with_the_containers_whole_tree(cer, plain_checkpoint, work):
    path, runc = work
    before = host_mounts()
    assert len(plain_checkpoint.mounts) >= 20
    bundle = restore_bundle(plain_checkpoint, path / "bundle")
    # The bundle names CRIU options of its own: the wrapper keeps them, ahead of cer's.
    (path / "own.conf").write_text("weak-sysctls\n")
    config = json.loads((bundle / "config.json").read_text())
    config.setdefault("annotations", {})["org.criu.config"] = str(path / "own.conf")
    (bundle / "config.json").write_text(json.dumps(config))
    container_id = f"cer-mnt-{uuid.uuid4().hex[:8]}"
    restored = runc_support.restore_through_wrapper(cer.endpoint, runc, bundle, "--external-ns", "mnt", "--external-ns",
                                                    "ipc", "--external-ns", "uts", "--external-checkpoint", NAME,
                                                    container_id)
    pid = restored["pid"]

    # Its mount namespace is cer's (and so are its IPC and UTS ones).
    for ns_type in ("mnt", "ipc", "uts"):
        assert os.stat(f"/proc/{pid}/ns/{ns_type}").st_ino == os.stat(restored["namespaces"][ns_type]).st_ino, ns_type
    # Its root is the pool's overlay, with the namespace's own upper layer.
    with open(f"/proc/{pid}/mountinfo") as file:
        root = next(line for line in file if line.split()[4] == "/")
    bundles = cer.root / "bundles"
    assert " - overlay overlay " in root and f"upperdir={bundles}/" in root, root
    # The whole mount table is the original container's: every mount, type and option; the root aside (the
    # original's was the bundle's directory on the host's filesystem, read-only: now a read-only overlay).
    table = container_mount_table(pid)
    assert sorted(table[1:]) == sorted(plain_checkpoint.mounts[1:])
    assert table[0][:2] == ("/", "overlay") and table[0][2].startswith("ro,")
    # The files in its tmpfs mounts are what they were, and the files it had open are open.
    for tmpfs in FILLED_TMPFS:
        assert tmpfs_digest(f"/proc/{pid}/root{tmpfs}") == plain_checkpoint.tmpfs[tmpfs], tmpfs
    assert os.readlink(f"/proc/{pid}/fd/3") == "/run/cer/state.txt"
    assert os.readlink(f"/proc/{pid}/fd/4") == "/dev/shm/cer-shm"
    assert os.readlink(f"/proc/{pid}/cwd") == "/run/cer/sub"
    # The workload itself: its fds read what it wrote, its cwd is there, and its /proc is its own (it is pid 1).
    assert workload_check(pid) == "ok\n"
    assert host_mount_changes(before, cer.root) == []

    runc.delete(container_id)
    wait_for(lambda: cer.pool(NAME)["types"]["mnt"]["in_use"] == 0, what="cer to take its mount namespace back")
    assert cer.status()["checkpoints"][f"default/{NAME}"]["users"] == 0
    wait_for(lambda: len(os.listdir(bundles)) == cer.pool(NAME)["types"]["mnt"]["idle"], 20,
             what="the used namespace's bundle to go")
    assert host_mount_changes(before, cer.root) == []


def test_without_the_view_stock_criu_rebuilds_the_tree_and_fails(cer, plain_checkpoint, work):
    """Why the view exists: told to join cer's mount namespace with the checkpoint's own images, CRIU 4.1.1
    still restores the mount tree (CLONE_NEWNS stays in its mask) and the restore fails."""
    path, runc = work
    taken = cer.call(CheckpointRestore(None, ("mnt",), os.getpid(), images_digest(plain_checkpoint.images)))
    mnt = taken["namespaces"]["mnt"]
    try:
        assert taken["criu_config"] and taken["criu_config"][0].startswith("action-script ")
        bundle = restore_bundle(plain_checkpoint, path / "bundle", {"mount": mnt["path"]})
        # CRIU 4.1.1: "Unable to mount tmpfs in /tmp/.criu.mntns.XXXXXX: No such file or directory",
        # "mnt-v2: Failed to create empty mntns", "Restoring FAILED".
        with pytest.raises(RuntimeSupportError, match=r"(?s)Failed to create empty mntns.*Restoring FAILED"):
            runc.restore(f"cer-mnt-{uuid.uuid4().hex[:8]}", bundle, plain_checkpoint.images)
    finally:
        cer.call(NamespacePut("mnt", mnt["namespace_id"], mnt["pid"]))
        cer.call(CheckpointPut(CheckpointRef(NAME)))


def test_a_failing_action_script_aborts_the_restore(cer, plain_checkpoint, work):
    """The action script runs at post-restore, before the tasks resume: when it fails (here: the plan in the
    images is damaged) CRIU aborts, and no container runs with the temporary /proc."""
    path, runc = work
    taken = cer.call(CheckpointRestore(CheckpointRef(NAME), ("mnt",), os.getpid()))
    mnt = taken["namespaces"]["mnt"]
    try:
        images = path / "images"
        shutil.copytree(taken["images"], images)
        (images / "restore-mounts.plan").chmod(0o644)
        (images / "restore-mounts.plan").write_bytes(b"cer mount plan 1\n\x00damaged")
        (path / "criu.conf").write_text("".join(f"{line}\n" for line in taken["criu_config"]))
        bundle = restore_bundle(plain_checkpoint, path / "bundle", {"mount": mnt["path"]})
        config = json.loads((bundle / "config.json").read_text())
        config["annotations"]["org.criu.config"] = str(path / "criu.conf")
        (bundle / "config.json").write_text(json.dumps(config))
        container_id = f"cer-mnt-{uuid.uuid4().hex[:8]}"
        with pytest.raises(RuntimeSupportError, match=r"(?s)post-restore script.*Restoring FAILED"):
            runc.restore(container_id, bundle, images)
        assert container_id not in runc.containers()
    finally:
        cer.call(NamespacePut("mnt", mnt["namespace_id"], mnt["pid"]))
        cer.call(CheckpointPut(CheckpointRef(NAME)))


def test_the_view_carries_the_inventory_rewrite_and_the_restores_mount_plan(cer, plain_checkpoint):
    taken = cer.call(CheckpointRestore(CheckpointRef(NAME), ("mnt",), os.getpid()))
    mnt = taken["namespaces"]["mnt"]
    try:
        view = Path(taken["images"])
        decoded = mounts_support.run(["crit", "decode", "-i", str(view / "inventory.img")], 30).stdout
        original = mounts_support.run(["crit", "decode", "-i", str(plain_checkpoint.images / "inventory.img")], 30).stdout
        ids = json.loads(mounts_support.run(["crit", "decode", "-i", str(next(view.glob("ids-*.img")))], 30).stdout)
        decoded, original = json.loads(decoded), json.loads(original)
        assert decoded["entries"][0]["root_ids"]["mnt_ns_id"] == ids["entries"][0]["mnt_ns_id"]
        original["entries"][0]["root_ids"]["mnt_ns_id"] = ids["entries"][0]["mnt_ns_id"]
        assert decoded == original  # nothing else changed
        plan = decode_plan((view / "restore-mounts.plan").read_bytes())
        assert {step.entry.mountpoint for step in plan.steps} >= {"/proc", "/sys", "/dev/mqueue", "/sys/fs/cgroup",
                                                                   "/proc/sys"}
        assert plan.problems == ()
        # Every other file is the checkpoint's own, hard-linked.
        for image in view.iterdir():
            if image.name not in ("inventory.img", "restore-mounts.plan"):
                assert image.stat().st_ino == (plain_checkpoint.images / image.name).stat().st_ino, image.name
    finally:
        cer.call(NamespacePut("mnt", mnt["namespace_id"], mnt["pid"]))
        cer.call(CheckpointPut(CheckpointRef(NAME)))
