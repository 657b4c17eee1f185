"""Pool, factory and extractor actors in this process: namespaces are real, and nothing leaks."""

import os
import shutil

import pytest
from conftest import SAMPLE, host_mounts, open_fds, wait_for

from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.actors.pool import PoolActor
from cer.config import CheckpointEntry
from cer.errors import Exhausted, NotFound, Unavailable
from cer.references import CheckpointRef

TYPES = ("ipc", "uts", "mnt")


@pytest.fixture
def bundles(tmp_path):
    path = tmp_path / "bundles"
    path.mkdir()
    return path


def start_pool(bundles, capacity=2, rootfs=SAMPLE / "rootfs", cold_timeout=5.0, path=SAMPLE / "checkpoint"):
    factory = NamespaceFactory.start(str(bundles), 4)
    extractor = CheckpointExtractor.start()
    entry = CheckpointEntry(CheckpointRef("sample"), capacity, str(path), str(rootfs) if rootfs else None)
    pool = PoolActor.start(entry, factory.proxy(), extractor.proxy(), cold_timeout).proxy()
    return factory, extractor, pool


def wait_full(pool, types=TYPES, timeout=20):
    def full():
        status = pool.status().get(timeout=5)
        return status if all(status["types"][t]["idle"] >= status["capacity"] for t in types) else None

    return wait_for(full, timeout, what="the pool to fill")


def stop_all(factory, extractor, pool):
    """Stop in the daemon's order: the pool hands its namespaces to the factory, which stops last."""
    for actor in (pool.actor_ref, extractor, factory):
        actor.stop(block=True, timeout=30)


def test_get_put_cycles_leak_no_fd_mount_or_bundle(bundles):
    fds_before, mounts_before = open_fds(), host_mounts()
    factory, extractor, pool = start_pool(bundles)
    wait_full(pool)
    for _ in range(20):
        for ns_type in TYPES:
            lease = pool.get(ns_type).get(timeout=5).get(timeout=10)
            assert os.path.exists(lease.namespace.path)
            pool.put(ns_type, lease.namespace.namespace_id).get(timeout=5)
    status = wait_full(pool)
    assert all(status["types"][t]["in_use"] == 0 for t in TYPES)
    assert len(os.listdir(bundles)) == 2
    stop_all(factory, extractor, pool)
    assert os.listdir(bundles) == []
    assert host_mounts() == mounts_before
    wait_for(lambda: open_fds() == fds_before, 5, what="the fds to close")


def test_a_namespace_handed_out_is_never_handed_out_again(bundles):
    factory, extractor, pool = start_pool(bundles, capacity=1)
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
    stop_all(factory, extractor, pool)


def test_namespace_ids_are_not_reused_right_after_a_put(bundles):
    factory, extractor, pool = start_pool(bundles, capacity=1)
    wait_full(pool)
    ids = []
    for _ in range(10):
        lease = pool.get("ipc").get(timeout=5).get(timeout=10)
        ids.append(lease.namespace.namespace_id)
        pool.put("ipc", lease.namespace.namespace_id).get(timeout=5)
    assert len(set(ids)) == len(ids)
    stop_all(factory, extractor, pool)


def test_creation_failures_are_reported_answered_and_retried_until_the_cause_goes(bundles, tmp_path):
    rootfs = tmp_path / "rootfs"
    shutil.copytree(SAMPLE / "rootfs", rootfs)
    factory, extractor, pool = start_pool(bundles, capacity=1, rootfs=rootfs, cold_timeout=3)
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
    assert os.listdir(bundles) == [os.path.basename(lease.namespace.bundle)]  # nothing half-built is left
    shutil.copytree(SAMPLE / "rootfs", rootfs)  # the cause goes away
    status = wait_full(pool, ("mnt",), timeout=30)
    assert status["state"] == "ready" and status["last_error"] is None
    stop_all(factory, extractor, pool)
    assert os.listdir(bundles) == []


def test_a_cold_get_that_cannot_be_served_in_time_is_exhausted(bundles):
    # A factory with no creation slots never builds: the pool must still answer within its cold timeout.
    factory = NamespaceFactory.start(str(bundles), 0)
    extractor = CheckpointExtractor.start()
    entry = CheckpointEntry(CheckpointRef("sample"), 1, str(SAMPLE / "checkpoint"), None)
    pool = PoolActor.start(entry, factory.proxy(), extractor.proxy(), 0.3).proxy()
    wait_for(lambda: pool.status().get(timeout=5)["state"] == "ready", 10)
    with pytest.raises(Exhausted, match="was ready within 0.3 s"):
        pool.get("uts").get(timeout=5).get(timeout=5)
    assert pool.status().get(timeout=5)["types"]["uts"]["waiting"] == 0
    stop_all(factory, extractor, pool)


def test_a_broken_checkpoint_fails_its_pool_only(bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(SAMPLE / "checkpoint", broken)
    shm_image = next(broken.glob("ipcns-shm-*.img"))
    shm_image.write_bytes(shm_image.read_bytes()[:20])
    factory, extractor, pool = start_pool(bundles, path=broken)
    wait_for(lambda: pool.status().get(timeout=5)["state"] == "failed", 10)
    status = pool.status().get(timeout=5)
    assert shm_image.name in status["last_error"]
    with pytest.raises(Unavailable, match="unusable"):
        pool.get("uts").get(timeout=5)
    stop_all(factory, extractor, pool)
