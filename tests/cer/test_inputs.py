"""Issue 15, findings 4-6, against a real daemon: what a checkpoint image, a planted file or a ROOT that
someone else can change may cost or make cer do."""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import criu_support
import pytest
from conftest import SAMPLE, sample_config, short_tempdir, start_daemon, wait_for

from cer.errors import BadRequest
from cer.protocol.methods import AdminReload, AdminStatus, NamespaceGet, NamespacePut, NamespaceUpdate
from cer.references import CheckpointRef

# A uid no account uses; setpriv runs the attacker's commands as it.
UNPRIVILEGED_UID = 54321


def as_unprivileged(*command: str) -> None:
    subprocess.run(["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups",
                    *command], check=True, timeout=30)


def shm_of(namespace_path: str) -> list[tuple[int, int, int]]:
    """(id, size, resident bytes) of each shm segment of the IPC namespace at ``namespace_path``."""
    table = subprocess.run(["nsenter", f"--ipc={namespace_path}", "cat", "/proc/sysvipc/shm"],
                           capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()
    header = table[0].split()
    rows = [dict(zip(header, line.split())) for line in table[1:]]
    return [(int(row["shmid"]), int(row["size"]), int(row["rss"])) for row in rows]


# -- finding 4: what an image may cost ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_pages_absent_from_an_image_cost_nothing_and_pools_share_one_budget(tmp_path):
    """A 52-byte image declaring a 1 GiB segment with no pages once made every pooled IPC namespace hold
    1 GiB. Now it costs nothing; a checkpoint whose pages do cost is held to the daemon's pre-fill budget,
    which refuses a pool (status) and a resize (reply) that would pass it, and lets one in that fits."""
    huge = criu_support.sparse_shm_checkpoint(tmp_path / "huge", 1 << 30)
    assert sum(p.stat().st_size for p in (huge / "ipcns-shm-10.img", huge / "pagemap-shmem-7.img")) < 64
    paged = criu_support.sparse_shm_checkpoint(tmp_path / "paged", 1 << 20, {n: bytes([n]) * 4096 for n in range(16)})
    config = {"containerd_checkpoints": [
        {"name": "huge", "capacity": 3, "path": str(huge)},
        {"name": "paged", "capacity": 2, "path": str(paged)},
    ]}
    daemon = start_daemon(config, "--prefill-budget", "100K")
    try:
        pool = daemon.wait_full("huge", types=("ipc",), timeout=30)
        message_bytes = pool["ipc_prefill_bytes"]  # the sample's queued messages, the only cost left
        assert message_bytes < 1024
        lease = daemon.call(NamespaceGet("ipc", CheckpointRef("huge")))
        assert shm_of(lease["path"]) == [(7, 1 << 30, 0)]
        daemon.call(NamespacePut("ipc", lease["namespace_id"]))

        # 2 x (64 KiB + messages) does not fit in 100 KiB: the pool says why and builds nothing.
        paged_pool = wait_for(lambda: (p := daemon.pool("paged"))["state"] == "failed" and p, 20, 0.05, "paged to fail")
        assert "pre-fill budget" in paged_pool["last_error"] and "cer start --prefill-budget" in paged_pool["last_error"]
        assert paged_pool["types"]["ipc"]["idle"] == 0 and paged_pool["types"]["ipc"]["building"] == 0

        # One fits: the pool recovers and fills, with only its 16 pages resident.
        daemon.call(NamespaceUpdate(CheckpointRef("paged"), 1))
        daemon.wait_full("paged", types=("ipc",), timeout=30)
        lease = daemon.call(NamespaceGet("ipc", CheckpointRef("paged")))
        assert shm_of(lease["path"]) == [(7, 1 << 20, 16 * 4096)]
        daemon.call(NamespacePut("ipc", lease["namespace_id"]))

        # Growing past the budget is refused in the reply, and the pool keeps its size.
        with pytest.raises(BadRequest, match="pre-fill budget"):
            daemon.call(NamespaceUpdate(CheckpointRef("paged"), 3))
        assert daemon.pool("paged")["capacity"] == 1 and daemon.pool("paged")["state"] == "ready"

        # So is a reload that would: the reply says why.
        config["containerd_checkpoints"][1]["capacity"] = 3
        daemon.config.write_text(json.dumps(config))
        with pytest.raises(BadRequest, match="pre-fill budget"):
            daemon.call(AdminReload())
        assert daemon.pool("paged")["capacity"] == 1 and daemon.pool("huge")["state"] == "ready"
    finally:
        assert daemon.stop() == 0, daemon.output()


# -- finding 5: files that are not files ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_an_image_or_the_config_blocks_no_request_and_no_shutdown(tmp_path):
    """A FIFO as inventory.img once held every worker in a blocking open(): reloads hung, admin.status timed
    out, SIGTERM did nothing. Each reload now answers with what is wrong, at once, and the daemon stops."""
    images = tmp_path / "images"
    shutil.copytree(SAMPLE / "checkpoint", images)
    config = sample_config()
    config["containerd_checkpoints"].append({"name": "planted", "capacity": 1, "path": str(images)})
    daemon = start_daemon(config)
    try:
        (images / "inventory.img").unlink()
        os.mkfifo(images / "inventory.img")
        answers: list = []

        def reload() -> None:
            try:
                answers.append(daemon.call(AdminReload()))
            except Exception as error:  # the answer we want
                answers.append(error)

        threads = [threading.Thread(target=reload) for _ in range(8)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert len(answers) == 8 and time.monotonic() - started < 10
        assert all(isinstance(a, BadRequest) and "a FIFO, not a regular file" in str(a) for a in answers), answers
        assert daemon.call(AdminStatus())["pools"]

        # The configuration file itself replaced by a FIFO: the same.
        daemon.config.unlink()
        os.mkfifo(daemon.config)
        with pytest.raises(BadRequest, match="a FIFO, not a regular file"):
            daemon.call(AdminReload())
    finally:
        started = time.monotonic()
        try:
            code = daemon.stop(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait(10)
            pytest.fail("SIGTERM did not stop the daemon")
        assert code == 0, daemon.output()
        assert time.monotonic() - started < 15


# -- finding 6: a ROOT someone else can change -------------------------------------------------------------------


def refused(root: Path) -> str:
    """Start a daemon on ``root`` that must refuse to run; its output. One that runs is stopped and fails the test."""
    daemon = start_daemon(sample_config(), root=root, wait=False)
    try:
        code = daemon.process.wait(30)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)
    assert code != 0, daemon.output()
    return daemon.output()


def planted_victim() -> Path:
    victim = short_tempdir("cer-victim-")
    (victim / "precious").write_text("root's file")
    return victim


@pytest.mark.timeout(60)
def test_a_root_another_user_owns_is_refused_and_nothing_outside_it_is_deleted():
    """The issue's attack: a user who owns ROOT plants ROOT/checkpoint -> /elsewhere; cer's start-up
    clean-up deleted /elsewhere's files as root. Now cer refuses that ROOT and touches nothing."""
    victim = planted_victim()
    base = short_tempdir()
    os.chmod(base, 0o755)  # as /var/lib: root's, and others may pass through
    root = base / "root"
    root.mkdir(mode=0o755)
    os.chown(root, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    as_unprivileged("ln", "-s", str(victim), str(root / "checkpoint"))
    assert f"owned by uid {UNPRIVILEGED_UID}" in refused(root)
    assert (victim / "precious").read_text() == "root's file"
    assert os.readlink(root / "checkpoint") == str(victim)  # left as it was: cer did not act in it


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parent_mode, parent_owner, problem", [
    (0o777, 0, "other users can write it"),
    (0o755, UNPRIVILEGED_UID, f"owned by uid {UNPRIVILEGED_UID}"),
])
def test_a_root_below_a_directory_another_user_can_change_is_refused(parent_mode, parent_owner, problem):
    """Whoever can rename entries of a parent can swap ROOT for their own directory or a link."""
    parent = short_tempdir() / "parent"
    parent.mkdir()
    os.chmod(parent, parent_mode)
    os.chown(parent, parent_owner, parent_owner)
    output = refused(parent / "root")
    assert problem in output and str(parent) in output


@pytest.mark.timeout(60)
def test_a_root_reached_through_a_link_another_user_owns_is_refused():
    base = short_tempdir()
    real = base / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, base / "link")
    os.lchown(base / "link", UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    assert "a symbolic link owned by uid" in refused(base / "link")


@pytest.mark.timeout(60)
def test_links_left_in_a_root_only_root_can_change_are_removed_never_followed():
    """In a ROOT root owns, links at the places cer cleans up (bundles, checkpoint, lazy) and inside them
    are removed, and what they point to is left alone; a sticky /tmp above ROOT is fine."""
    victim = planted_victim()
    root = short_tempdir() / "root"
    root.mkdir(mode=0o700)
    for name in ("bundles", "checkpoint", "lazy"):
        os.symlink(victim, root / name)
    daemon = start_daemon(sample_config(), root=root)
    try:
        for name in ("bundles", "checkpoint", "lazy"):
            assert not (root / name).is_symlink()
        assert (victim / "precious").read_text() == "root's file"
    finally:
        assert daemon.stop() == 0, daemon.output()
    # Inside the directories cer cleans: a link to the victim is removed, not followed.
    (root / "checkpoint").mkdir(exist_ok=True)
    os.symlink(victim, root / "checkpoint" / "stale")
    os.symlink(victim, root / "bundles")
    daemon = start_daemon(sample_config(), root=root)
    try:
        assert not os.path.lexists(root / "checkpoint" / "stale")
        assert (victim / "precious").read_text() == "root's file"
    finally:
        assert daemon.stop() == 0, daemon.output()
