"""checkpoint.restore and checkpoint.get with a view, against a real daemon: one request takes what a
restore needs, all or nothing; views are made once, counted, removed with their checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, sample_config, short_tempdir, start_daemon, wait_for

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "criu"))

import criu_support  # noqa: E402
from test_views import attach  # noqa: E402

from cer.criu.views import images_digest  # noqa: E402
from cer.errors import BadRequest, NotFound, Unavailable  # noqa: E402
from cer.protocol.client import Client  # noqa: E402
from cer.protocol.methods import (  # noqa: E402
    AdminReload,
    CheckpointGet,
    CheckpointPut,
    CheckpointRestore,
)
from cer.references import CheckpointRef  # noqa: E402

SAMPLE_REF = CheckpointRef("sample")


@pytest.fixture
def holder():
    """A process to bind namespaces to."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def users(daemon, name: str = "sample") -> int:
    return daemon.status()["checkpoints"][f"default/{name}"]["users"]


def in_use(daemon, name: str = "sample") -> dict:
    return {t: v["in_use"] for t, v in daemon.pool(name)["types"].items()}


def test_one_request_takes_a_view_and_bound_namespaces(daemon, holder):
    daemon.wait_full("sample")
    reply = daemon.call(CheckpointRestore(SAMPLE_REF, ("ipc", "uts"), holder.pid))
    assert reply["ref"] == SAMPLE_REF.to_wire() and reply["criu_config"] == []
    images = Path(reply["images"])
    assert images.parent.parent == daemon.root / "views" and images.name == "ipc"
    assert sorted(os.listdir(images)) == sorted(os.listdir(SAMPLE / "checkpoint"))
    assert os.stat(images / "pages-1.img").st_ino == os.stat(SAMPLE / "checkpoint" / "pages-1.img").st_ino
    ipc = reply["namespaces"]["ipc"]
    assert ipc["info"]["ipc"] == {"shm": [7, 8], "sem": [3], "msg": [5], "left_to_restore": [], "view": "ipc"}
    assert ipc["info"]["ipc_default"] is False
    assert set(reply["namespaces"]) == {"ipc", "uts"}
    assert users(daemon) == 1
    assert daemon.pool("sample")["types"]["ipc"]["bound"] == 1

    # Bound from the start: the holder's exit brings both namespaces back, and the images' user.
    holder.kill()
    holder.wait()
    wait_for(lambda: in_use(daemon) == {"ipc": 0, "uts": 0, "mnt": 0}, what="the namespaces to come back")
    assert not os.path.exists(ipc["path"])
    wait_for(lambda: users(daemon) == 0, what="the checkpoint user to come back")
    with pytest.raises(NotFound, match="no outstanding get"):
        daemon.call(CheckpointPut(SAMPLE_REF))


def test_a_put_before_the_holders_exit_is_not_counted_twice(daemon, holder):
    daemon.wait_full("sample")
    daemon.call(CheckpointRestore(SAMPLE_REF, ("uts",), holder.pid))
    daemon.call(CheckpointGet(SAMPLE_REF))  # a user bound to nobody
    assert users(daemon) == 2
    assert daemon.call(CheckpointPut(SAMPLE_REF)) == {"users": 1}
    watched = daemon.status()["watched_holders"]
    holder.kill()
    holder.wait()
    wait_for(lambda: daemon.status()["watched_holders"] == watched - 1, what="the holder's uts namespace to come back")
    assert users(daemon) == 1  # the get's user: the put ended the restore's
    assert daemon.call(CheckpointPut(SAMPLE_REF)) == {"users": 0}


def test_a_view_is_made_once_and_shared(daemon, holder):
    daemon.wait_full("sample")
    first = daemon.call(CheckpointRestore(SAMPLE_REF, ("ipc",), holder.pid))
    made = os.stat(first["images"]).st_ino
    second = daemon.call(CheckpointRestore(SAMPLE_REF, ("ipc",), holder.pid))
    by_get = daemon.call(CheckpointGet(SAMPLE_REF, ("ipc",)))["path"]
    assert first["images"] == second["images"] == by_get and os.stat(by_get).st_ino == made
    assert users(daemon) == 3
    assert daemon.status()["checkpoints"]["default/sample"]["views"] == ["ipc"]
    # Without a type that changes images, the checkpoint's own directory.
    plain = daemon.call(CheckpointRestore(SAMPLE_REF, ("uts",), holder.pid))
    assert plain["images"] == str(SAMPLE / "checkpoint")
    for _ in range(4):
        daemon.call(CheckpointPut(SAMPLE_REF))
    assert users(daemon) == 0


def test_the_images_digest_names_the_checkpoint(daemon, holder):
    daemon.wait_full("sample")
    digest = images_digest(SAMPLE / "checkpoint")
    reply = daemon.call(CheckpointRestore(None, ("uts",), holder.pid, digest))
    assert reply["ref"] == SAMPLE_REF.to_wire()
    assert daemon.call(CheckpointRestore(SAMPLE_REF, (), holder.pid, digest))["ref"] == SAMPLE_REF.to_wire()
    with pytest.raises(NotFound, match="does not have the images"):
        daemon.call(CheckpointRestore(CheckpointRef("sample-empty-ipc"), ("uts",), holder.pid, digest))
    started = time.monotonic()
    with pytest.raises(NotFound, match="holds no checkpoint with images"):
        daemon.call(CheckpointRestore(None, ("ipc", "uts"), holder.pid, "sha256:" + "0" * 64))
    assert time.monotonic() - started < 1.0
    assert in_use(daemon)["uts"] == 1 and in_use(daemon)["ipc"] == 0


def test_all_or_nothing(daemon, holder):
    """A part that cannot be had gives back what was taken before it."""
    daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
    with pytest.raises(BadRequest, match="no mnt namespaces"):
        daemon.call(CheckpointRestore(CheckpointRef("sample-empty-ipc"), ("ipc", "mnt", "uts"), holder.pid))
    wait_for(lambda: in_use(daemon, "sample-empty-ipc") == {"ipc": 0, "uts": 0, "mnt": 0}, what="namespaces back")
    assert users(daemon, "sample-empty-ipc") == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(NotFound, match="not running"):
        daemon.call(CheckpointRestore(SAMPLE_REF, ("ipc", "uts"), dead.pid))
    assert users(daemon) == 0 and in_use(daemon) == {"ipc": 0, "uts": 0, "mnt": 0}


MALFORMED = [
    ({"types": ["ipc"], "holder_pid": 1}, "ref"),
    ({"ref": {"name": "sample"}, "types": ["pid"], "holder_pid": 1}, "types must be a list of distinct names"),
    ({"ref": {"name": "sample"}, "types": ["ipc", "ipc"], "holder_pid": 1}, "types must be a list"),
    ({"ref": {"name": "sample"}, "types": "ipc", "holder_pid": 1}, "types must be a list"),
    ({"ref": {"name": "sample"}, "types": [["ipc"]], "holder_pid": 1}, "types must be a list"),
    ({"ref": {"name": "sample"}, "types": ["ipc"]}, "holder_pid must be a whole number"),
    ({"ref": {"name": "sample"}, "types": ["ipc"], "holder_pid": 0}, "holder_pid"),
    ({"ref": {"name": "sample"}, "types": ["ipc"], "holder_pid": True}, "holder_pid"),
    ({"images_digest": "sha256:" + "A" * 64, "types": [], "holder_pid": 1}, "images_digest must be"),
    ({"images_digest": "/etc/passwd", "types": [], "holder_pid": 1}, "images_digest must be"),
    ({"images_digest": 7, "types": [], "holder_pid": 1}, "images_digest must be"),
    ({"ref": {"name": "sample"}, "types": [], "holder_pid": 1, "path": "/"}, "unknown fields: path"),
]


@pytest.mark.parametrize("params, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_restores_are_refused_and_the_daemon_keeps_serving(daemon, params, message):
    with Client(daemon.endpoint, timeout=10) as client:
        with pytest.raises(BadRequest, match=message):
            client.request("checkpoint", "restore", params)
    assert users(daemon) == 0 and daemon.status()["pools"]


@pytest.mark.parametrize("view", [["pid"], "ipc", ["ipc", "ipc"], [1], {"ipc": 1}])
def test_malformed_views_are_refused(daemon, view):
    with Client(daemon.endpoint, timeout=10) as client:
        with pytest.raises(BadRequest, match="view must be a list of distinct names from ipc"):
            client.request("checkpoint", "get", {"ref": {"name": "sample"}, "view": view})


def test_views_go_with_their_checkpoint_and_the_daemon(daemon, holder):
    daemon.wait_full("sample")
    daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
    kept = daemon.call(CheckpointGet(SAMPLE_REF, ("ipc",)))["path"]
    gone = daemon.call(CheckpointGet(CheckpointRef("sample-empty-ipc"), ("ipc",)))["path"]
    daemon.call(CheckpointPut(CheckpointRef("sample-empty-ipc")))
    config = sample_config()
    del config["containerd_checkpoints"][1]
    daemon.config.write_text(json.dumps(config))
    assert daemon.call(AdminReload())["removed"] == ["default/sample-empty-ipc"]
    wait_for(lambda: not os.path.exists(os.path.dirname(gone)), what="the removed checkpoint's views to go")
    assert os.path.isdir(kept)
    assert os.path.exists(SAMPLE / "checkpoint-empty-ipc" / "pstree.img")  # links removed, never the files
    assert daemon.stop() == 0
    assert not (daemon.root / "views").exists()


def test_an_earlier_daemons_views_are_removed_at_start():
    root = short_tempdir() / "root"
    stale = root / "views" / ("0" * 64) / "ipc"
    stale.mkdir(parents=True)
    os.chmod(root, 0o700)
    running = start_daemon(sample_config(), root=root)
    try:
        assert not stale.exists()
    finally:
        assert running.stop() == 0
        shutil.rmtree(root.parent)


def test_images_on_another_filesystem_are_refused_clearly(holder):
    shm_dir = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        shutil.copytree(SAMPLE / "checkpoint", shm_dir / "checkpoint")
        config = {"containerd_checkpoints": [{"name": "elsewhere", "capacity": 1, "path": str(shm_dir / "checkpoint")}]}
        running = start_daemon(config)
        try:
            running.wait_full("elsewhere", types=("ipc", "uts"))
            with pytest.raises(Unavailable, match="another filesystem"):
                running.call(CheckpointRestore(CheckpointRef("elsewhere"), ("ipc", "uts"), holder.pid))
            assert users(running, "elsewhere") == 0
            assert in_use(running, "elsewhere") == {"ipc": 0, "uts": 0, "mnt": 0}
            # Without a view the images are served as they are.
            assert running.call(CheckpointRestore(CheckpointRef("elsewhere"), ("uts",), holder.pid))["images"] == \
                str(shm_dir / "checkpoint")
        finally:
            assert running.stop() == 0
    finally:
        shutil.rmtree(shm_dir)


def test_an_attached_segment_is_left_out_of_the_pooled_namespace(holder):
    """The pooled IPC namespace holds every object but the segments attached at dump time, which the view
    keeps for CRIU to create."""
    place = short_tempdir()
    checkpoint = place / "checkpoint"
    shutil.copytree(SAMPLE / "checkpoint", checkpoint)
    attach(checkpoint, 8)
    running = start_daemon({"containerd_checkpoints": [{"name": "attached", "capacity": 1, "path": str(checkpoint)}]})
    try:
        running.wait_full("attached", types=("ipc", "uts"))
        reply = running.call(CheckpointRestore(CheckpointRef("attached"), ("ipc",), holder.pid))
        info = reply["namespaces"]["ipc"]["info"]["ipc"]
        assert info == {"shm": [7], "sem": [3], "msg": [5], "left_to_restore": [8], "view": "ipc"}
        seen = criu_support.inspect_namespaces(reply["namespaces"]["ipc"]["path"], None)
        assert [segment["id"] for segment in seen["shm"]] == [7]
        assert [s["id"] for s in seen["sem"]] == [3] and [q["id"] for q in seen["msg"]] == [5]
    finally:
        assert running.stop() == 0
        shutil.rmtree(place)
