"""A real daemon pooling mount namespaces for runc + CRIU 4 checkpoints: get, put, shutdown, kill -9."""

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import mounts_support  # noqa: E402
from cer.protocol.methods import NamespaceGet, NamespacePut  # noqa: E402
from conftest import short_tempdir, start_daemon, wait_for  # noqa: E402
from mounts_support import host_mount_changes, host_mounts, mount_table, tmpfs_digest  # noqa: E402

from cer.errors import Exhausted  # noqa: E402
from cer.references import CheckpointRef  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PLAIN = CheckpointRef("runc-plain")
BIND = CheckpointRef("runc-bind")


def config(plain, bound) -> dict:
    return {"containerd_checkpoints": [
        {"name": PLAIN.name, "capacity": 2, "path": str(plain.images), "rootfs": str(plain.rootfs)},
        {"name": BIND.name, "capacity": 1, "path": str(bound.images), "rootfs": str(bound.rootfs)},
    ]}


def test_get_put_and_shutdown(plain_checkpoint, container_checkpoint):
    """A handed-out namespace holds the container's mounts and files; put and SIGTERM leave the host's table
    as it was and no bundle behind."""
    before = host_mounts()
    daemon = start_daemon(config(plain_checkpoint, container_checkpoint))
    try:
        daemon.wait_full(PLAIN.name)
        reply = daemon.call(NamespaceGet("mnt", PLAIN))
        bundle, rootfs = reply["info"]["bundle"], reply["info"]["rootfs"]
        assert rootfs == "/"  # the namespace's root is the container's
        table = mount_table(reply["path"], rootfs)
        assert {"/dev", "/dev/pts", "/dev/shm", "/run", "/tmp"} <= {row[0] for row in table}
        # What the restore mounts is not there: /proc holds only the sysctls CRIU writes meanwhile.
        assert not {"/sys", "/dev/mqueue"} & {row[0] for row in table}
        assert [row[:2] for row in table if row[0].startswith("/proc")] == [("/proc", "tmpfs"), ("/proc/sys", "proc")]
        by_target = {row[0]: row for row in plain_checkpoint.mounts}
        for row in table:
            if row[0] != "/" and not row[0].startswith("/proc"):
                assert row == by_target[row[0]]
        assert tmpfs_digest(rootfs + "/run", reply["path"]) == plain_checkpoint.tmpfs["/run"]
        assert host_mount_changes(before, daemon.root) == []

        daemon.call(NamespacePut("mnt", reply["namespace_id"], reply["pid"]))
        wait_for(lambda: not os.path.exists(bundle), 10, what="the bundle to go")
        assert host_mount_changes(before, daemon.root) == []
        # Idle ones and a handed-out one at shutdown.
        daemon.wait_full(PLAIN.name, types=("mnt",))
        daemon.call(NamespaceGet("mnt", PLAIN))
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    assert host_mount_changes(before, daemon.root) == []
    assert not (daemon.root / "bundles").exists()


def test_an_external_bind_without_a_host_path_fails_the_mount_namespaces_only(plain_checkpoint, container_checkpoint):
    daemon = start_daemon(config(plain_checkpoint, container_checkpoint))
    try:
        def filled() -> bool:
            types = daemon.pool(BIND.name)["types"]
            return types["ipc"]["idle"] >= 1 and types["uts"]["idle"] >= 1

        wait_for(filled, 20, what="the IPC and UTS namespaces of a pool whose mount namespaces fail")
        with pytest.raises(Exhausted, match=r"mount /data \(unsupported, mount id \d+\): an external bind mount "
                                            r"\(key '/data'\) and no host path is configured"):
            daemon.call(NamespaceGet("mnt", BIND))
        pool = daemon.pool(BIND.name)
        assert "mount /data" in pool["last_error"]
        assert daemon.call(NamespaceGet("uts", BIND))["info"]["cold"] is False
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_a_restart_after_kill_9_removes_the_stale_bundles(plain_checkpoint, container_checkpoint):
    before = host_mounts()
    root = short_tempdir() / "root"
    first = start_daemon(config(plain_checkpoint, container_checkpoint), root=root)
    first.wait_full(PLAIN.name, types=("mnt",))
    handed_out = first.call(NamespaceGet("mnt", PLAIN))
    stale = set(os.listdir(root / "bundles"))
    assert stale and os.path.basename(handed_out["info"]["bundle"]) in stale
    first.stop(signal.SIGKILL)
    second = start_daemon(config(plain_checkpoint, container_checkpoint), root=root)
    try:
        second.wait_full(PLAIN.name, types=("mnt",))
        assert not stale & set(os.listdir(root / "bundles"))
        assert host_mount_changes(before, root) == []
    finally:
        assert second.stop() == 0, second.output()
    assert host_mount_changes(before, root) == []
    mounts_support.run(["rm", "-rf", str(root.parent)])
