"""The daemon as users run it: `cer start` in its own process, real namespaces, requests over ZeroMQ."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import SAMPLE, host_mounts, sample_config, short_tempdir, start_daemon, wait_for

import mounts_support

from cer.errors import BadRequest, NotFound, Unavailable
from cer.protocol.methods import (
    CheckpointGet,
    CheckpointPut,
    NamespaceGet,
    NamespacePut,
    NamespaceUpdate,
)
from cer.references import CheckpointRef

SAMPLE_REF = CheckpointRef("sample")


def nsenter(*args: str) -> str:
    return subprocess.run(["nsenter", *args], check=True, capture_output=True, text=True, timeout=10).stdout


def test_uts_namespace_is_joinable_and_named_like_the_checkpoint(daemon):
    daemon.wait_full("sample")
    reply = daemon.call(NamespaceGet("uts", SAMPLE_REF))
    assert reply["path"] == f"/proc/{daemon.process.pid}/fd/{reply['namespace_id']}"
    assert reply["info"]["cold"] is False
    assert nsenter(f"--uts={reply['path']}", "hostname").strip() == "cer-sample"
    assert nsenter(f"--uts={reply['path']}", "domainname").strip() == "cer.example"
    assert os.stat(reply["path"]).st_ino != os.stat("/proc/self/ns/uts").st_ino


def test_ipc_namespace_is_joinable_and_not_the_hosts(daemon):
    daemon.wait_full("sample")
    reply = daemon.call(NamespaceGet("ipc", SAMPLE_REF))
    assert os.stat(reply["path"]).st_ino != os.stat("/proc/self/ns/ipc").st_ino
    segments = nsenter(f"--ipc={reply['path']}", "cat", "/proc/sysvipc/shm").splitlines()[1:]
    assert len(segments) == 2  # the sample checkpoint's two shm segments
    assert reply["info"]["ipc_default"] is False


def test_mnt_namespace_shows_the_rootfs_and_stays_out_of_the_host(daemon):
    before = host_mounts()
    daemon.wait_full("sample")
    reply = daemon.call(NamespaceGet("mnt", SAMPLE_REF))
    # The namespace's root is the container's (pivoted into the overlay); its bundle holds the upper layer.
    assert reply["info"]["rootfs"] == "/" and reply["info"]["bundle"].startswith(str(daemon.root / "bundles"))
    motd = mounts_support.read_file(reply["path"], "/etc/motd").decode()
    assert motd == (SAMPLE / "rootfs" / "etc" / "motd").read_text()
    # Writes land in the bundle's upper layer, never in the shared lower layer.
    mounts_support.write_file(reply["path"], "/etc/motd", b"changed\n")
    assert (SAMPLE / "rootfs" / "etc" / "motd").read_text() != "changed\n"
    assert (Path(reply["info"]["bundle"]) / "upper" / "etc" / "motd").read_text() == "changed\n"
    assert host_mounts() == before
    assert not os.listdir(Path(reply["info"]["bundle"]) / "rootfs")  # the host sees the bare mount point


def test_concurrent_gets_never_share_a_namespace(daemon):
    daemon.wait_full("sample")
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def take(ns_type: str) -> None:
        try:
            with daemon.client() as client:
                for _ in range(6):
                    reply = client.call(NamespaceGet(ns_type, SAMPLE_REF))
                    results.append((ns_type, os.stat(reply["path"]).st_ino, reply["namespace_id"]))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=take, args=(t,)) for t in ("ipc", "uts", "mnt") for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(results) == 54
    assert len({(t, inode) for t, inode, _ in results}) == 54
    assert len({(t, nid) for t, _, nid in results}) == 54
    pool = daemon.pool("sample")
    assert all(pool["types"][t]["in_use"] == 18 for t in ("ipc", "uts", "mnt"))
    assert sum(pool["types"][t]["cold_gets"] for t in ("ipc", "uts", "mnt")) > 0


def test_put_destroys_the_namespace_and_a_second_put_is_refused(daemon):
    daemon.wait_full("sample")
    for ns_type in ("ipc", "uts", "mnt"):
        reply = daemon.call(NamespaceGet(ns_type, SAMPLE_REF))
        bundle = reply["info"].get("bundle")
        daemon.call(NamespacePut(ns_type, reply["namespace_id"], reply["pid"]))
        wait_for(lambda: not os.path.exists(reply["path"]), 5, what="the namespace fd to close")
        if bundle:
            wait_for(lambda: not os.path.exists(bundle), 5, what="the bundle to go")
        with pytest.raises(NotFound):
            daemon.call(NamespacePut(ns_type, reply["namespace_id"]))
    pool = daemon.wait_full("sample")
    assert all(pool["types"][t]["in_use"] == 0 for t in ("ipc", "uts", "mnt"))


def test_warm_gets_are_booked_bound_and_given_back_like_any_other(daemon):
    pool = daemon.wait_full("sample")
    warm_before = pool["types"]["uts"]["warm_gets"]
    holder = subprocess.Popen(["sleep", "60"])
    try:
        unbound = daemon.call(NamespaceGet("uts", SAMPLE_REF))
        bound = daemon.call(NamespaceGet("uts", SAMPLE_REF, holder_pid=holder.pid))
        assert not unbound["info"]["cold"] and not bound["info"]["cold"]
        assert unbound["namespace_id"] != bound["namespace_id"]
        uts = wait_for(lambda: (t := daemon.pool("sample")["types"]["uts"])["in_use"] == 2 and t, 5, what="the books")
        assert (uts["bound"], uts["warm_gets"]) == (1, warm_before + 2)
        daemon.call(NamespacePut("uts", unbound["namespace_id"], unbound["pid"]))
        wait_for(lambda: not os.path.exists(unbound["path"]), 5, what="the put namespace to close")
        with pytest.raises(NotFound):
            daemon.call(NamespacePut("uts", unbound["namespace_id"]))
        holder.kill()
        holder.wait(5)
        wait_for(lambda: daemon.pool("sample")["types"]["uts"]["in_use"] == 0, 10, what="the bound one to come back")
        with pytest.raises(NotFound):  # it came back by itself: its put is refused, not taken twice
            daemon.call(NamespacePut("uts", bound["namespace_id"]))
        gone = subprocess.Popen(["true"])
        gone.wait(5)
        with pytest.raises(NotFound, match="is not running"):
            daemon.call(NamespaceGet("uts", SAMPLE_REF, holder_pid=gone.pid))
    finally:
        holder.kill()


def test_put_of_a_namespace_from_another_daemon_run_is_a_clear_error(daemon):
    with pytest.raises(NotFound, match="no longer running"):
        daemon.call(NamespacePut("uts", 1024, daemon.process.pid + 1))


def test_update_grows_shrinks_and_creates_pools(daemon):
    daemon.wait_full("sample")
    assert daemon.call(NamespaceUpdate(SAMPLE_REF, 5)) == {"created": False}
    assert daemon.wait_full("sample")["types"]["uts"]["idle"] == 5
    daemon.call(NamespaceUpdate(SAMPLE_REF, 1))
    pool = daemon.pool("sample")
    assert all(pool["types"][t]["idle"] == 1 for t in ("ipc", "uts", "mnt"))

    new_ref = CheckpointRef("from-containerd", "k8s.io")
    assert daemon.call(NamespaceUpdate(new_ref, 3)) == {"created": True}
    # Until the extractor's first word the pool says loading; then it waits for containerd.
    pool = wait_for(lambda: (p := daemon.pool("from-containerd"))["state"] == "unavailable" and p, 10)
    assert pool["capacity"] == 3
    with pytest.raises(Unavailable, match="containerd"):
        daemon.call(NamespaceGet("uts", new_ref))


def test_an_empty_pool_serves_a_cold_get(daemon):
    daemon.wait_full("sample")
    daemon.call(NamespaceUpdate(SAMPLE_REF, 0))
    reply = daemon.call(NamespaceGet("mnt", SAMPLE_REF))
    assert reply["info"]["cold"] is True
    assert mounts_support.read_file(reply["path"], "/etc/hostname").strip() == b"cer-sample"
    assert daemon.pool("sample")["types"]["mnt"]["cold_gets"] == 1


def test_a_checkpoint_without_rootfs_has_no_mnt_namespaces(daemon):
    daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
    with pytest.raises(BadRequest, match="has no mnt namespaces: its entry has no rootfs"):
        daemon.call(NamespaceGet("mnt", CheckpointRef("sample-empty-ipc")))


def test_extra_refs_pick_the_checkpoint_that_holds_ipc_objects():
    config = sample_config()
    config["containerd_checkpoints"].append({"name": "sample", "namespace": "other", "path": str(SAMPLE / "checkpoint")})
    running = start_daemon(config)
    try:
        running.wait_full("sample-empty-ipc", types=("ipc", "uts"))
        reply = running.call(NamespaceGet("ipc", CheckpointRef("sample-empty-ipc"), (SAMPLE_REF,)))
        assert reply["info"]["ref"]["name"] == "sample"
        assert reply["info"]["ipc_default"] is False
        with pytest.raises(BadRequest, match="cannot hold them all"):
            running.call(NamespaceGet("ipc", SAMPLE_REF, (CheckpointRef("sample", "other"),)))
    finally:
        assert running.stop() == 0


def test_checkpoint_get_and_put_count_users(daemon):
    assert daemon.call(CheckpointGet(SAMPLE_REF)) == {"path": str(SAMPLE / "checkpoint")}
    assert daemon.call(CheckpointGet(SAMPLE_REF))["path"] == str(SAMPLE / "checkpoint")
    assert daemon.call(CheckpointPut(SAMPLE_REF)) == {"users": 1}
    assert daemon.call(CheckpointPut(SAMPLE_REF)) == {"users": 0}
    with pytest.raises(NotFound):
        daemon.call(CheckpointPut(SAMPLE_REF))
    with pytest.raises(NotFound):
        daemon.call(CheckpointGet(CheckpointRef("nope")))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_nothing_behind(signum):
    before = host_mounts()
    running = start_daemon(sample_config())
    running.wait_full("sample")
    held = running.call(NamespaceGet("mnt", SAMPLE_REF))
    assert os.path.isdir(held["info"]["bundle"])
    assert running.stop(signum) == 0
    output = running.output()
    assert "still handed out at shutdown" in output
    assert sorted(os.listdir(running.root)) == []
    assert host_mounts() == before


@pytest.mark.timeout(90)
def test_the_pools_share_the_pool_threads_however_many_pools_there_are():
    entries = [{"name": f"many-{index}", "capacity": 1, "path": str(SAMPLE / "checkpoint")} for index in range(30)]
    running = start_daemon({"containerd_checkpoints": entries}, "--pool-threads", "2")
    try:
        wait_for(lambda: sum(pool["state"] == "ready" for pool in running.status()["pools"]) == 30, 30,
                 what="the 30 pools to load")

        def threads() -> int:
            return int(Path(f"/proc/{running.process.pid}/status").read_text().split("Threads:")[1].split()[0])

        # 18 with no pool at all, and the factory's while it builds; a thread per pool made it 48 or more.
        wait_for(lambda: threads() < 30, 20, what="fewer threads than pools")
    finally:
        assert running.stop() == 0
    loaded = [line for line in running.output().splitlines() if "checkpoint loaded" in line]
    assert len(loaded) == 30
    assert all(" cer-pools-1: " in line or " cer-pools-2: " in line for line in loaded), loaded


def test_a_killed_daemon_leaves_bundles_that_the_next_run_removes():
    running = start_daemon(sample_config())
    running.wait_full("sample")
    bundles = running.root / "bundles"
    assert os.listdir(bundles)
    running.stop(signal.SIGKILL)
    assert os.listdir(bundles)  # what kill -9 leaves
    again = start_daemon(sample_config(), root=running.root)
    try:
        pool = again.wait_full("sample")
        assert pool["types"]["mnt"]["idle"] == 2
        assert len(os.listdir(bundles)) == 2
        assert all(name.startswith(f"{again.process.pid}-") for name in os.listdir(bundles))
        assert "removing bundles left by an earlier run" in again.output()
    finally:
        assert again.stop() == 0


def test_a_second_daemon_on_the_same_root_is_refused(daemon):
    second = start_daemon(sample_config(), root=daemon.root, wait=False)
    assert second.process.wait(20) != 0
    assert "another cer daemon is running" in second.output()
    assert daemon.status()["pools"]  # the first one goes on serving


@pytest.mark.timeout(120)
@pytest.mark.parametrize("empty_ipc", [False, True], ids=["ipc-objects", "empty-ipc"])
def test_pooled_namespaces_hold_what_criu_restores_from_a_live_dump(empty_ipc):
    """Dump a live workload with CRIU 4 now, serve it, and compare with CRIU's own restore of it."""
    import criu_support

    images = short_tempdir() / "images"
    images.mkdir()
    criu_support.dump_live_workload(images, empty_ipc=empty_ipc)
    restored = criu_support.restore_and_inspect(images)
    daemon = start_daemon({"containerd_checkpoints": [{"name": "live", "capacity": 1, "path": str(images)}]})
    try:
        daemon.wait_full("live", types=("ipc", "uts"))
        ref = CheckpointRef("live")
        ipc, uts = daemon.call(NamespaceGet("ipc", ref)), daemon.call(NamespaceGet("uts", ref))
        pooled = criu_support.inspect_namespaces(ipc["path"], uts["path"])
        assert ipc["info"]["ipc_default"] is empty_ipc
    finally:
        assert daemon.stop() == 0
    for field in ("hostname", "domainname", "shm", "sem", "msg"):
        assert pooled[field] == restored[field], field
    assert {k: pooled["sysctls"][k] for k in restored["sysctls"]} == restored["sysctls"]
    if not empty_ipc:
        assert len(pooled["shm"]) == 2 and pooled["sem"] and pooled["msg"]
