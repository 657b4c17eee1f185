"""Pool, factory and extractor actors in this process: namespaces are real, and nothing leaks."""

import os
import shutil
import subprocess
import threading

import pykka
import pytest
from conftest import SAMPLE, host_mounts, open_fds, wait_for

from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.actors.pool import PoolActor, PoolPeers, PoolSettings, Shelves
from cer.actors.timers import ManualTimers, default_timers
from cer.actors.told import MESSAGE_FAILURES
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
                 lease_timeout=300.0, creation_slots=4, max_capacity=None, timers=None, shelves=None):
        self.refs = [NamespaceFactory.start(str(bundles), creation_slots), CheckpointExtractor.start(), ProcessWatcher.start()]
        peers = PoolPeers(*(ref.proxy() for ref in self.refs), timers or default_timers(), shelves)
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
    timers = ManualTimers()
    started, pool = start_pool(bundles, capacity=1, rootfs=None, cold_timeout=0.3, creation_slots=0, timers=timers)
    wait_for(lambda: pool.status().get(timeout=5)["state"] == "ready", 10)
    pending = pool.get("uts").get(timeout=5)
    timers.advance(0.29)
    with pytest.raises(pykka.Timeout):
        pending.get(timeout=0.2)  # not yet: its time is the pool's clock, not the wall's
    timers.advance(0.02)
    with pytest.raises(Exhausted, match="was ready within 0.3 s"):
        pending.get(timeout=5)
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


def test_an_adaptive_pool_follows_a_burst_up_and_back_down(bundles):
    timers = ManualTimers()  # the pool's minute of memory passes when the test says so
    started, pool = start_pool(bundles, capacity=1, rootfs=None, max_capacity=5, timers=timers)
    wait_full(pool, ("uts",))
    leases = [pool.get("uts").get(timeout=5).get(timeout=10) for _ in range(8)]  # a burst of 8 in one second
    status = pool.status().get(timeout=5)["types"]["uts"]
    assert status["target"] == 5  # the busiest second, held to the ceiling
    assert status["cold_gets"] >= 1
    for lease in leases:
        pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    timers.advance(1.0)  # the refill after the puts
    wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["idle"] == 5, 10, what="the pool to grow to 5")
    # The burst ages out: back to the floor, and the idle ones above it are destroyed.
    timers.advance(70.0)
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


def test_refills_wait_for_the_timer_and_build_for_every_get_at_once(bundles):
    timers = ManualTimers()
    started, pool = start_pool(bundles, capacity=4, rootfs=None, timers=timers)
    factory = started.refs[0].proxy()
    wait_full(pool, ("uts",))
    created = factory.status().get(timeout=5)["created"]
    for _ in range(3):
        pool.get("uts").get(timeout=5).get(timeout=5)
    status = pool.status().get(timeout=5)["types"]["uts"]
    assert (status["idle"], status["building"]) == (1, 0)  # nothing built while the gets come
    assert factory.status().get(timeout=5)["created"] == created
    timers.advance(0.005)  # one below half the target: the pool refills almost at once
    wait_full(pool, ("uts",))
    assert factory.status().get(timeout=5)["created"] == created + 3
    started.stop()


def test_pools_run_no_threads_of_their_own(bundles):
    timers = ManualTimers()
    started, pool = start_pool(bundles, capacity=0, rootfs=None, timers=timers)
    wait_for(lambda: pool.status().get(timeout=5)["state"] == "ready", 10)
    before = threading.active_count()
    peers = PoolPeers(*(ref.proxy() for ref in started.refs[:3]), timers)
    pools = [PoolActor.start(CheckpointEntry(CheckpointRef(f"p{index}"), 0, str(SAMPLE / "checkpoint")), peers, PoolSettings())
             for index in range(10)]
    try:
        wait_for(lambda: all(p.proxy().status().get(timeout=5)["state"] == "ready" for p in pools), 20)
        wait_for(lambda: threading.active_count() <= before, 5, what="the loaders to end")
        # Not even a thread of their own: the pools share their dispatcher's threads, which ran the first one already.
        assert threading.active_count() == before
    finally:
        for actor in pools:
            actor.stop(block=True, timeout=30)
        started.stop()


def shelf_pool(bundles, **kwargs):
    shelves = Shelves()
    started, pool = start_pool(bundles, rootfs=None, shelves=shelves, **kwargs)
    wait_full(pool, ("uts",))
    return started, pool, shelves, shelves.find(CheckpointRef("sample"), "uts")


def test_a_namespace_taken_off_the_shelf_is_booked_by_its_pool_once_reported(bundles):
    started, pool, shelves, shelf = shelf_pool(bundles, capacity=2)
    lease = shelf.take()
    assert (lease.cold, lease.ipc_default) == (False, pool.ipc_default().get(timeout=5))
    assert pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 0  # not reported yet
    shelves.report()
    status = pool.status().get(timeout=5)["types"]["uts"]
    assert (status["in_use"], status["warm_gets"]) == (1, 1)
    assert shelves.give_back("uts", lease.namespace.namespace_id)
    assert pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 1  # answered, not reported yet
    shelves.report()
    wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 0, 5, what="the put")
    assert not shelves.give_back("uts", lease.namespace.namespace_id)  # known no more: the pool refuses it
    with pytest.raises(NotFound):
        pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    started.stop()
    assert shelves.find(CheckpointRef("sample"), "uts") is None  # a stopped pool's shelves are withdrawn


def test_a_namespace_taken_with_a_holder_comes_back_when_it_exits(bundles):
    started, pool, shelves, shelf = shelf_pool(bundles, capacity=2)
    holder = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait(5)
    try:
        with pytest.raises(NotFound, match="is not running"):
            shelf.take(gone.pid)
        assert len(shelf.idle) == 2  # a refused take takes nothing
        lease = shelf.take(holder.pid)
        shelves.report()
        assert pool.status().get(timeout=5)["types"]["uts"]["bound"] == 1
        holder.kill()
        holder.wait(5)
        wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 0, 10, what="the release")
        assert not shelves.give_back("uts", lease.namespace.namespace_id)  # released: a put must ask the pool
    finally:
        holder.kill()
        started.stop()


def test_the_shelf_and_the_pool_never_hand_out_one_namespace_twice(bundles):
    started, pool, shelves, shelf = shelf_pool(bundles, capacity=30)
    taken: list[int] = []

    def take_all():
        while (lease := shelf.take()) is not None:
            taken.append(lease.namespace.namespace_id)

    thread = threading.Thread(target=take_all)
    thread.start()
    got = [pool.get("uts").get(timeout=5).get(timeout=10).namespace.namespace_id for _ in range(15)]
    thread.join(10)
    shelves.report()
    assert len(set(taken + got)) == len(taken) + len(got)
    assert pool.status().get(timeout=5)["types"]["uts"]["in_use"] == len(taken) + len(got)
    started.stop()


def test_a_told_message_that_fails_is_logged_counted_and_the_pool_lives_on(bundles):
    started, pool = start_pool(bundles, capacity=1, rootfs=None)
    wait_full(pool, ("uts",))

    def failures():
        return sum(item["count"] for item in MESSAGE_FAILURES.snapshot()
                   if (item["actor"], item["message"]) == ("PoolActor", "holder_exited"))

    before = failures()
    pool.holder_exited.defer(("no-such-type", 1), 1)  # a tell nobody waits for, that raises
    wait_for(lambda: failures() == before + 1, 5, what="the failure to be counted")
    assert started.refs[-1].is_alive()
    assert pool.status().get(timeout=5)["state"] == "ready"
    started.stop()


class RetiredPools(pykka.ThreadingActor):
    """Stands in for the supervisor: records which pools told it they retired."""

    def __init__(self) -> None:
        super().__init__()
        self.retired: list[str] = []

    def pool_retired(self, ref, urn) -> None:
        self.retired.append(str(ref))

    def names(self) -> list[str]:
        return self.retired


def test_a_retired_pool_waits_for_a_take_not_yet_reported_and_its_put(bundles):
    started, pool, shelves, shelf = shelf_pool(bundles, capacity=2)
    supervisor = RetiredPools.start()
    try:
        lease = shelf.take()  # taken by the frontend, not reported yet
        pool.retire(supervisor.proxy()).get(timeout=5)
        assert shelves.find(CheckpointRef("sample"), "uts") is None
        assert started.refs[-1].is_alive()  # nothing is booked as out, but a report is on its way
        shelves.report()
        status = pool.status().get(timeout=5)
        assert (status["state"], status["types"]["uts"]["in_use"]) == ("retired", 1)
        assert shelves.give_back("uts", lease.namespace.namespace_id)
        shelves.report()
        wait_for(lambda: supervisor.proxy().names().get(timeout=5) == ["default/sample"], 5, what="the pool to retire")
        wait_for(lambda: not started.refs[-1].is_alive(), 5, what="the pool to stop")
    finally:
        supervisor.stop()
        started.stop()
