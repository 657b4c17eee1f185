"""Pool, factory and extractor actors in this process: namespaces are real, and nothing leaks."""

import os
import shutil
import subprocess

import pytest
from conftest import SAMPLE, host_mounts, open_fds, wait_for

from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.actors import pool as pool_module
from cer.actors.pool import PoolActor, PoolPeers, PoolSettings
from cer.actors.watcher import ProcessWatcher
from cer.config import CheckpointEntry
from cer.errors import Exhausted, NotFound, Unavailable
from cer.references import CheckpointRef

TYPES = ("ipc", "uts", "mnt")


@pytest.fixture
def bundles(tmp_path):
    path = tmp_path / "bundles"
    path.mkdir()
    return path


class Started:
    """A pool with its own factory, extractor and process watcher, stopped in the daemon's order."""

    def __init__(self, bundles, capacity=2, rootfs=SAMPLE / "rootfs", cold_timeout=5.0, path=SAMPLE / "checkpoint",
                 lease_timeout=300.0, creation_slots=4, max_capacity=None):
        self.refs = [NamespaceFactory.start(str(bundles), creation_slots), CheckpointExtractor.start(), ProcessWatcher.start()]
        peers = PoolPeers(*(ref.proxy() for ref in self.refs))
        entry = CheckpointEntry(
            CheckpointRef("sample"), capacity, str(path), str(rootfs) if rootfs else None, max_capacity
        )
        self.refs.append(PoolActor.start(entry, peers, PoolSettings(cold_timeout, lease_timeout)))
        self.pool = self.refs[-1].proxy()

    def stop(self):
        # The pool hands its namespaces to the factory, which stops last.
        for ref in reversed(self.refs):
            ref.stop(block=True, timeout=30)


def start_pool(bundles, **kwargs):
    started = Started(bundles, **kwargs)
    return started, started.pool


def wait_full(pool, types=TYPES, timeout=20):
    def full():
        status = pool.status().get(timeout=5)
        return status if all(status["types"][t]["idle"] >= status["capacity"] for t in types) else None

    return wait_for(full, timeout, what="the pool to fill")


def test_get_put_cycles_leak_no_fd_mount_or_bundle(bundles):
    fds_before, mounts_before = open_fds(), host_mounts()
    started, pool = start_pool(bundles)
    wait_full(pool)
    for _ in range(20):
        for ns_type in TYPES:
            lease = pool.get(ns_type).get(timeout=5).get(timeout=10)
            assert os.path.exists(lease.namespace.path)
            pool.put(ns_type, lease.namespace.namespace_id).get(timeout=5)
    status = wait_full(pool)
    assert all(status["types"][t]["in_use"] == 0 for t in TYPES)
    # Tear-downs of the put ones run in the factory's threads: wait for the bundles of the 2 idle to be all.
    wait_for(lambda: len(os.listdir(bundles)) == 2, 10, what="torn-down bundles to go")
    started.stop()
    assert os.listdir(bundles) == []
    assert host_mounts() == mounts_before
    # No fd the test opened is left. (Fds open before may close meanwhile: an earlier test's gRPC channels
    # end their pollers in their own time.)
    wait_for(lambda: not open_fds() - fds_before, 5, what="the fds to close")


def test_a_namespace_handed_out_is_never_handed_out_again(bundles):
    started, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    # Holding our own fd of every namespace we were given keeps it alive, so the kernel cannot reuse its
    # inode number: a namespace handed out twice would show up as an inode seen before.
    held: dict[int, int] = {}
    for _ in range(15):
        lease = pool.get("uts").get(timeout=5).get(timeout=10)
        fd = os.open(lease.namespace.path, os.O_RDONLY)
        inode = os.fstat(fd).st_ino
        assert inode not in held
        held[inode] = fd
        pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    with pytest.raises(NotFound):
        pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    for fd in held.values():
        os.close(fd)
    started.stop()


def test_namespace_ids_are_not_reused_right_after_a_put(bundles):
    started, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    ids = []
    for _ in range(10):
        lease = pool.get("ipc").get(timeout=5).get(timeout=10)
        ids.append(lease.namespace.namespace_id)
        pool.put("ipc", lease.namespace.namespace_id).get(timeout=5)
    assert len(set(ids)) == len(ids)
    started.stop()


def test_creation_failures_are_reported_answered_and_retried_until_the_cause_goes(bundles, tmp_path):
    rootfs = tmp_path / "rootfs"
    shutil.copytree(SAMPLE / "rootfs", rootfs)
    started, pool = start_pool(bundles, capacity=1, rootfs=rootfs, cold_timeout=3)
    wait_full(pool)
    shutil.rmtree(rootfs)  # every mnt creation fails from now on
    lease = pool.get("mnt").get(timeout=5).get(timeout=10)  # the idle one is still good
    with pytest.raises(Exhausted, match="creating a mnt namespace failed"):
        pool.get("mnt").get(timeout=5).get(timeout=10)
    status = pool.status().get(timeout=5)
    assert status["state"] == "failing"
    assert "mnt" in status["last_error"]
    assert status["types"]["mnt"]["failures"] >= 1
    # The other types go on being served.
    assert pool.get("uts").get(timeout=5).get(timeout=10).namespace.ns_type == "uts"
    # Nothing half-built is left (a retry in progress has its bundle only while it runs).
    wait_for(lambda: os.listdir(bundles) == [os.path.basename(lease.namespace.bundle)], 5, what="failed bundles to go")
    shutil.copytree(SAMPLE / "rootfs", rootfs)  # the cause goes away
    status = wait_full(pool, ("mnt",), timeout=30)
    assert status["state"] == "ready" and status["last_error"] is None
    started.stop()
    assert os.listdir(bundles) == []


def test_a_cold_get_that_cannot_be_served_in_time_is_exhausted(bundles):
    # A factory with no creation slots never builds: the pool must still answer within its cold timeout.
    started, pool = start_pool(bundles, capacity=1, rootfs=None, cold_timeout=0.3, creation_slots=0)
    wait_for(lambda: pool.status().get(timeout=5)["state"] == "ready", 10)
    with pytest.raises(Exhausted, match="was ready within 0.3 s"):
        pool.get("uts").get(timeout=5).get(timeout=5)
    assert pool.status().get(timeout=5)["types"]["uts"]["waiting"] == 0
    started.stop()


def test_a_broken_checkpoint_fails_its_pool_only(bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(SAMPLE / "checkpoint", broken)
    shm_image = next(broken.glob("ipcns-shm-*.img"))
    shm_image.write_bytes(shm_image.read_bytes()[:20])
    started, pool = start_pool(bundles, path=broken)
    wait_for(lambda: pool.status().get(timeout=5)["state"] == "failed", 10)
    status = pool.status().get(timeout=5)
    assert shm_image.name in status["last_error"]
    with pytest.raises(Unavailable, match="unusable"):
        pool.get("uts").get(timeout=5)
    started.stop()


def test_a_namespace_bound_to_a_process_comes_back_when_it_exits(bundles):
    started, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lease = pool.get("ipc").get(timeout=5).get(timeout=10)
        pool.bind("ipc", lease.namespace.namespace_id, holder.pid).get(timeout=5)
        status = pool.status().get(timeout=5)["types"]["ipc"]
        assert (status["in_use"], status["bound"]) == (1, 1)
        holder.kill()
        holder.wait(5)
        wait_for(lambda: pool.status().get(timeout=5)["types"]["ipc"]["in_use"] == 0, 10, what="the release")
        wait_for(lambda: not os.path.exists(lease.namespace.path), 5, what="the fd to close")
        with pytest.raises(NotFound):
            pool.put("ipc", lease.namespace.namespace_id).get(timeout=5)
    finally:
        holder.kill()
        started.stop()


def test_binding_again_moves_the_namespace_to_the_new_process(bundles):
    started, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    first, second = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        lease = pool.get("uts").get(timeout=5).get(timeout=10)
        namespace_id = lease.namespace.namespace_id
        pool.bind("uts", namespace_id, first.pid).get(timeout=5)
        pool.bind("uts", namespace_id, second.pid).get(timeout=5)
        first.kill()
        first.wait(5)
        # The first holder's exit no longer counts.
        assert pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 1
        second.kill()
        second.wait(5)
        wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 0, 10, what="the release")
    finally:
        first.kill()
        second.kill()
        started.stop()


def test_binding_to_a_process_that_is_gone_is_refused(bundles):
    started, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    gone = subprocess.Popen(["true"])
    gone.wait(5)
    lease = pool.get("uts").get(timeout=5).get(timeout=10)
    with pytest.raises(NotFound, match=f"process {gone.pid} is not running"):
        pool.bind("uts", lease.namespace.namespace_id, gone.pid).get(timeout=5)
    with pytest.raises(NotFound):
        pool.bind("uts", 99999, os.getpid()).get(timeout=5)
    started.stop()


def test_a_namespace_neither_put_nor_bound_is_reported_overdue_and_kept(bundles):
    started, pool = start_pool(bundles, capacity=1, lease_timeout=0.2)
    wait_full(pool)
    lease = pool.get("uts").get(timeout=5).get(timeout=10)
    status = wait_for(lambda: (s := pool.status().get(timeout=5)["types"]["uts"])["overdue"] == 1 and s, 5)
    assert status["in_use"] == 1
    assert os.path.exists(lease.namespace.path)  # reported, never silently reclaimed
    pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    assert pool.status().get(timeout=5)["types"]["uts"]["overdue"] == 0
    started.stop()


def test_a_get_with_a_holder_is_bound_from_the_start_warm_or_cold(bundles):
    started, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        warm = pool.get("uts", holder.pid).get(timeout=5).get(timeout=10)
        pool.set_capacity(0).get(timeout=5)  # nothing idle any more: the next get is built for it
        cold = pool.get("uts", holder.pid).get(timeout=5).get(timeout=10)
        assert (warm.cold, cold.cold) == (False, True)
        assert pool.status().get(timeout=5)["types"]["uts"]["bound"] == 2
        holder.kill()
        holder.wait(5)
        wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 0, 10, what="both to come back")
        with pytest.raises(NotFound, match="is not running"):
            pool.get("uts", holder.pid).get(timeout=5)
    finally:
        holder.kill()
        started.stop()


def test_an_adaptive_pool_follows_a_burst_up_and_back_down(bundles, monkeypatch):
    monkeypatch.setattr(pool_module._Demand, "WINDOW", 2)  # a burst is forgotten after 2 s, not a minute
    monkeypatch.setattr(pool_module, "_ADAPT_SECONDS", 0.2)
    started, pool = start_pool(bundles, capacity=1, rootfs=None, max_capacity=5)
    wait_full(pool, ("uts",))
    leases = [pool.get("uts").get(timeout=5).get(timeout=10) for _ in range(8)]  # a burst of 8 in one second
    status = pool.status().get(timeout=5)["types"]["uts"]
    assert status["target"] == 5  # the busiest second, held to the ceiling
    assert status["cold_gets"] >= 1
    for lease in leases:
        pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["idle"] == 5, 10, what="the pool to grow to 5")
    # The burst ages out: back to the floor, and the idle ones above it are destroyed.
    wait_for(lambda: (t := pool.status().get(timeout=5)["types"]["uts"])["target"] == 1 and t["idle"] == 1, 10,
             what="the pool to shrink back")
    assert pool.status().get(timeout=5)["types"]["ipc"]["target"] == 1  # no demand for ipc: never grew
    started.stop()


def test_a_fixed_pool_ignores_demand(bundles):
    started, pool = start_pool(bundles, capacity=2, rootfs=None)
    wait_full(pool, ("uts",))
    for _ in range(6):
        pool.get("uts").get(timeout=5).get(timeout=10)
    status = pool.status().get(timeout=5)
    assert status["types"]["uts"]["target"] == 2 and status["max_capacity"] is None
    started.stop()
