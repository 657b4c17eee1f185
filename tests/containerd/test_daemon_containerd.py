"""A real cer daemon serving checkpoints from a real containerd (started by the tests, see conftest.py).

The checkpoint is made by ``ctr c checkpoint --rw --image --task`` from a running container of the
sample IPC workload whose rw layer was changed; cer must extract exactly its CRIU archive, build the
root filesystem with those changes, and serve all three namespace types from it.
"""

import hashlib
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import SAMPLE, start_daemon, wait_for

import containerd_support
import criu_support
import mounts_support
from cer.errors import Unavailable
from cer.protocol.methods import CheckpointGet, CheckpointPut, NamespaceGet
from cer.references import CheckpointRef

MARKER = ".cer-ready"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def containerd_daemon(containerd, entries, root=None):
    config = {"containerd_checkpoints": entries, "default_capacity": 1}
    return start_daemon(config, "--containerd-address", containerd.address, "--containerd-timeout", "5", root=root)


def nsenter(*args: str) -> bytes:
    return subprocess.run(["nsenter", *args], capture_output=True, check=True, timeout=30).stdout


def cer_leftovers(containerd) -> list[str]:
    return [key for key in containerd.snapshot_keys() + containerd.lease_ids() if key.startswith("cer-")]


def test_a_containerd_checkpoint_is_extracted_and_served_with_its_rootfs(running, checkpoint):
    ref = CheckpointRef(checkpoint.name)
    daemon = containerd_daemon(running, [{"name": checkpoint.name, "namespace": "default", "capacity": 1}])
    try:
        daemon.wait_full(checkpoint.name, timeout=60)

        # The CRIU images: exactly the files of the archive in containerd's content store.
        path = Path(daemon.call(CheckpointGet(ref))["path"])
        assert path == daemon.root / "checkpoint" / ref.key
        expected = containerd_support.tar_digests(running.content(checkpoint.criu_digest))
        assert "inventory.img" in expected and "pstree.img" in expected
        assert containerd_support.tree_digests(path, exclude=(MARKER,)) == expected
        assert (path / MARKER).read_text().strip() == checkpoint.criu_digest
        assert daemon.call(CheckpointPut(ref)) == {"users": 0}

        # IPC and UTS namespaces hold what the checkpointed container's did.
        ipc = daemon.call(NamespaceGet("ipc", ref))
        uts = daemon.call(NamespaceGet("uts", ref))
        seen = criu_support.inspect_namespaces(ipc["path"], uts["path"])
        assert [len(checkpoint.live[kind]) for kind in ("shm", "sem", "msg")] == [1, 1, 1]
        assert criu_support.differences(seen, checkpoint.live) == []
        assert nsenter(f"--uts={uts['path']}", "hostname").decode().strip() == "cer-ctd-test"

        # The mount namespace's root: the image's files with the container's rw-layer changes on top.
        mnt = daemon.call(NamespaceGet("mnt", ref))
        rootfs = mnt["info"]["rootfs"]  # "/": the namespace's root is the container's
        listing = mounts_support.list_directory(mnt["path"], f"{rootfs}/etc")
        assert sorted(listing) == ["cer-image-file", "cer-new-file", "cer-untouched"]
        for name, data in {**checkpoint.changed_files, "etc/cer-untouched": checkpoint.image_files["etc/cer-untouched"]}.items():
            assert mounts_support.read_file(mnt["path"], f"{rootfs}/{name}") == data
        workload = mounts_support.read_file(mnt["path"], f"{rootfs}/{containerd_support.WORKLOAD_PATH}")
        built = running.dir / "build" / "container-ipc-workload"
        assert hashlib.sha256(workload).digest() == hashlib.sha256(built.read_bytes()).digest()
        # The pool's namespaces each have their own upper layer: a write there reaches no snapshot.
        mounts_support.write_file(mnt["path"], f"{rootfs}/etc/cer-untouched", b"scribble\n")
        status = daemon.status()
        lower = status["checkpoints"][str(ref)]["rootfs"].split(":")
        assert len(lower) == 2 and all(layer.startswith(str(running.snapshots_dir)) for layer in lower)
        assert all(Path(layer, "etc/cer-untouched").read_bytes() != b"scribble\n" for layer in lower if Path(layer, "etc/cer-untouched").exists())
        assert status["checkpoints"][str(ref)]["state"] == "ready"
        assert f"cer-{ref.key[:16]}" in running.lease_ids()
    finally:
        assert daemon.stop() == 0, daemon.output()
    # Shutdown removes cer's snapshots and lease from containerd; the extraction stays for the next start.
    assert cer_leftovers(running) == []
    assert (daemon.root / "checkpoint" / ref.key / MARKER).exists()


def test_a_restart_reuses_the_extraction_and_removes_stale_ones(running, checkpoint):
    ref = CheckpointRef(checkpoint.name)
    entries = [{"name": checkpoint.name, "capacity": 1}]
    first = containerd_daemon(running, entries)
    try:
        first.wait_full(checkpoint.name, timeout=60)
    finally:
        assert first.stop() == 0, first.output()
    extraction = first.root / "checkpoint" / ref.key
    inode = extraction.stat().st_ino
    # What a killed daemon or an old configuration leaves: a partial extraction, another checkpoint's.
    stale = [first.root / "checkpoint" / f".partial-{ref.key}-0badc0de", first.root / "checkpoint" / ("ab" * 32)]
    for directory in stale:
        directory.mkdir()
        (directory / "inventory.img").write_bytes(b"x")
    (stale[1] / MARKER).write_text("sha256:" + "0" * 64)

    again = containerd_daemon(running, entries, root=first.root)
    try:
        again.wait_full(checkpoint.name, timeout=60)
        assert extraction.stat().st_ino == inode  # not extracted a second time
        assert sorted(os.listdir(first.root / "checkpoint")) == [ref.key]
    finally:
        assert again.stop() == 0, again.output()


def test_an_unknown_checkpoint_fails_its_pool_and_the_others_serve(running, checkpoint):
    missing = f"no-such-checkpoint-{secrets.token_hex(3)}"
    entries = [
        {"name": missing, "namespace": "default"},
        {"name": checkpoint.name, "namespace": "elsewhere"},  # the name exists, but in another namespace
        {"name": "sample", "path": str(SAMPLE / "checkpoint"), "rootfs": str(SAMPLE / "rootfs")},
    ]
    daemon = containerd_daemon(running, entries)
    try:
        daemon.wait_full("sample")
        pool = wait_for(lambda: (p := daemon.pool(missing))["state"] == "failed" and p, 30, what="the pool to fail")
        assert f"there is no checkpoint image {missing!r} in containerd namespace 'default'" in pool["last_error"]
        other = next(p for p in daemon.status()["pools"] if p["ref"]["labels"]["namespace"] == "elsewhere")
        assert other["state"] == "failed" and "namespace 'elsewhere'" in other["last_error"]
        with pytest.raises(Unavailable, match="unusable"):
            daemon.call(NamespaceGet("uts", CheckpointRef(missing)))
        with pytest.raises(Unavailable, match="there is no checkpoint image"):
            daemon.call(CheckpointGet(CheckpointRef(missing)))
        reply = daemon.call(NamespaceGet("uts", CheckpointRef("sample")))
        assert nsenter(f"--uts={reply['path']}", "hostname").decode().strip() == "cer-sample"
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_containerd_down_at_start_then_up(running, checkpoint):
    ref = CheckpointRef(checkpoint.name)
    running.stop()
    daemon = containerd_daemon(running, [{"name": checkpoint.name, "capacity": 1},
                                         {"name": "sample", "path": str(SAMPLE / "checkpoint")}])
    try:
        pool = wait_for(lambda: "waiting for containerd" in ((p := daemon.pool(checkpoint.name))["last_error"] or "") and p,
                        20, what="the pool to wait for containerd")
        assert pool["state"] == "unavailable"
        assert running.address in pool["last_error"]
        with pytest.raises(Unavailable, match="waiting for containerd"):
            daemon.call(NamespaceGet("uts", ref))
        with pytest.raises(Unavailable, match="waiting for containerd"):
            daemon.call(CheckpointGet(ref))
        daemon.wait_full("sample", types=("ipc", "uts"))  # path entries serve meanwhile
        # It keeps trying with backoff, and takes containerd as soon as it is back.
        wait_for(lambda: daemon.status()["checkpoints"][str(ref)]["attempts"] >= 2, 20, what="a second attempt")
        running.start()
        daemon.wait_full(checkpoint.name, timeout=60)
        assert daemon.call(CheckpointGet(ref))["path"] == str(daemon.root / "checkpoint" / ref.key)
    finally:
        running.start()
        assert daemon.stop() == 0, daemon.output()
    assert cer_leftovers(running) == []


def test_a_base_image_that_is_not_unpacked_is_unpacked(running, checkpoint):
    chain_id = checkpoint.image.chain_id
    running.ctr("snapshots", "rm", chain_id)
    assert chain_id not in running.snapshot_keys()
    ref = CheckpointRef(checkpoint.name)
    daemon = containerd_daemon(running, [{"name": checkpoint.name, "capacity": 1}])
    try:
        daemon.wait_full(checkpoint.name, timeout=60)
        assert chain_id in running.snapshot_keys()
        mnt = daemon.call(NamespaceGet("mnt", ref))
        rootfs = mnt["info"]["rootfs"]
        assert mounts_support.read_file(mnt["path"], f"{rootfs}/etc/cer-untouched") == b"left alone\n"
        assert mounts_support.read_file(mnt["path"], f"{rootfs}/etc/cer-new-file") == b"made in the container\n"
    finally:
        assert daemon.stop() == 0, daemon.output()
    # Like containerd's own unpacker, cer labels the image config so the snapshot outlives its lease.
    assert cer_leftovers(running) == []
    assert chain_id in running.snapshot_keys()
