"""Faults while building namespaces or in actors: the pool reports, recovers, and leaves nothing half-built."""

import os
import resource

import mounts_support
import pykka
import pytest
from conftest import SAMPLE, host_mounts, wait_for

from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.actors.pool import PoolPeers, PoolSettings
from cer.actors.supervisor import Supervisor
from cer.actors.watcher import ProcessWatcher
from cer.config import CheckpointEntry, Config
from cer.criu.checkpoint import IpcContents, ShmSegment
from cer.pooled_namespaces import Recipe
from cer.references import CheckpointRef


class Collector(pykka.ThreadingActor):
    """Stands in for a pool: records what the factory hands over, and destroys it."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory
        self.results = []

    def namespace_created(self, ns_type, namespace, error, seconds):
        self.results.append((namespace, error))
        if namespace is not None:
            self.factory.destroy(namespace)

    def collected(self):
        return list(self.results)


@pytest.fixture
def factory(tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    ref = NamespaceFactory.start(str(bundles), 2)
    yield ref.proxy(), bundles
    ref.stop(block=True, timeout=30)
    assert os.listdir(bundles) == []


def build_one(factory_proxy, ns_type, recipe):
    collector = Collector.start(factory_proxy).proxy()
    factory_proxy.create(ns_type, recipe, collector)
    results = wait_for(lambda: collector.collected().get(timeout=5), 20, what="the creation to finish")
    collector.actor_ref.stop()
    return results[0]


def test_enospc_from_the_kernel_is_reported_not_handed_out(factory):
    proxy, _ = factory
    segment = lambda shmid: ShmSegment(id=shmid, key=0x100 + shmid, mode=0o600, uid=0, gid=0, size=4096, data=bytes(4096))
    # One segment allowed per namespace, two asked for: shmget fails with ENOSPC.
    recipe = Recipe(ipc=IpcContents(sysctls=(("kernel.shmmni", 1),), shm=(segment(1), segment(2))))
    namespace, error = build_one(proxy, "ipc", recipe)
    assert namespace is None
    assert "No space left on device" in str(error) or "ENOSPC" in str(error), error
    assert proxy.status().get(timeout=5)["live"] == 0


def test_running_out_of_fds_is_reported_and_the_next_creation_works(factory):
    proxy, _ = factory
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
    try:
        namespace, error = build_one(proxy, "uts", Recipe())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert namespace is None and isinstance(error, OSError), error
    namespace, error = build_one(proxy, "uts", Recipe())
    assert error is None and namespace is not None


def test_a_creation_thread_that_dies_still_answers_its_pool(factory):
    proxy, bundles = factory

    class Exploding:
        """Recipe data whose every use ends the thread, as if it were torn down mid-build."""

        def __getattr__(self, name):
            raise SystemExit("thread torn down")

    mounts_before = host_mounts()
    namespace, error = build_one(proxy, "ipc", Recipe(ipc=Exploding()))
    assert namespace is None and isinstance(error, SystemExit)
    namespace, error = build_one(proxy, "mnt", Recipe(rootfs="/nonexistent/lower"))
    assert namespace is None and "mount overlay" in str(error)
    assert os.listdir(bundles) == []  # the half-built bundle went with the failure
    assert host_mounts() == mounts_before


def test_a_mount_namespace_that_fails_after_changing_its_root_leaves_no_bundle(factory):
    """As a build that pivots into the rootfs (issue 12) and fails after: the bundle is removed from the
    daemon's mount namespace, not looked for under the thread's new root."""
    proxy, bundles = factory

    class PivotsThenFails:
        """A mount plan that, once the overlay is up, moves the thread's root into it and fails."""

        def __getattr__(self, name):
            os.chroot(os.path.join(str(bundles), os.listdir(bundles)[0], "rootfs"))
            raise OSError(5, "failed after the root moved")

    mounts_before = mounts_support.host_mounts()
    namespace, error = build_one(proxy, "mnt", Recipe(rootfs=str(SAMPLE / "rootfs"), mounts=PivotsThenFails()))
    assert namespace is None and "failed after the root moved" in str(error)
    assert os.listdir(bundles) == []
    assert mounts_support.host_mount_changes(mounts_before, bundles) == []
    namespace, error = build_one(proxy, "mnt", Recipe(rootfs=str(SAMPLE / "rootfs")))
    assert error is None and namespace is not None


class Keeper(pykka.ThreadingActor):
    """Stands in for a pool that keeps what it gets; notes whether ``watched`` still exists at each delivery."""

    def __init__(self, watched=None):
        super().__init__()
        self.watched = watched
        self.results = []

    def namespace_created(self, ns_type, namespace, error, seconds):
        self.results.append((namespace, error, self.watched is not None and os.path.exists(self.watched)))

    def collected(self):
        return list(self.results)


def test_a_slow_tear_down_never_holds_up_creations(tmp_path):
    """How long removing a bundle takes depends on what the container wrote in it: creations, with one slot,
    go on meanwhile."""
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    factory = NamespaceFactory.start(str(bundles), 1).proxy()
    keeper = Keeper.start().proxy()
    factory.create("mnt", Recipe(rootfs=str(SAMPLE / "rootfs")), keeper)
    ((namespace, error, _),) = wait_for(lambda: keeper.collected().get(timeout=5), 20, what="the mnt namespace")
    assert error is None
    for name in range(2000):  # the container's writes land in the bundle's upper layer
        os.mkdir(os.path.join(namespace.bundle, "upper", str(name)))
    watcher = Keeper.start(namespace.bundle).proxy()
    factory.destroy(namespace)
    factory.create("uts", Recipe(), watcher)
    ((created, error, bundle_still_there),) = wait_for(lambda: watcher.collected().get(timeout=5), 20, what="the uts namespace")
    assert error is None and bundle_still_there
    factory.destroy(created)
    wait_for(lambda: not os.path.exists(namespace.bundle), 60, what="the bundle to be removed")
    factory.actor_ref.stop(block=True, timeout=30)
    assert os.listdir(bundles) == []


def test_a_crashed_pool_is_started_again_and_the_others_are_unaffected(tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    refs = [NamespaceFactory.start(str(bundles), 4), CheckpointExtractor.start(), ProcessWatcher.start()]
    peers = PoolPeers(*(ref.proxy() for ref in refs))
    entries = tuple(
        CheckpointEntry(CheckpointRef(name), 1, str(SAMPLE / "checkpoint"), None) for name in ("crashing", "steady")
    )
    supervisor = Supervisor.start(Config("test", 1, entries), peers, PoolSettings()).proxy()
    try:
        crashing = supervisor.pool(CheckpointRef("crashing")).get(timeout=5)
        steady = supervisor.pool(CheckpointRef("steady")).get(timeout=5)
        wait_for(lambda: crashing.status().get(timeout=5)["types"]["uts"]["idle"] == 1, 20)
        # A message nobody waits for that fails kills the actor (pykka's rule for tells).
        crashing.actor_ref.tell(pykka.messages.ProxyCall(attr_path=("put",), args=("uts", 999999), kwargs={}))
        wait_for(lambda: not crashing.actor_ref.is_alive(), 10, what="the pool to die")
        assert any(pool["state"] == "crashed" for pool in supervisor.pool_statuses().get(timeout=10).collect(10))
        assert steady.get("uts").get(timeout=5).get(timeout=10).namespace.ns_type == "uts"
        restarted = supervisor.pool(CheckpointRef("crashing")).get(timeout=5)
        assert restarted.actor_ref is not crashing.actor_ref
        lease = wait_for(lambda: _try_get(restarted), 20, what="the restarted pool to serve")
        assert lease.namespace.ns_type == "uts"
        # The dead pool's namespaces were destroyed by its on_failure: the factory holds only what live pools hold.
        def accounted():
            held = sum(
                counts["idle"] + counts["in_use"]
                for pool in supervisor.pool_statuses().get(timeout=10).collect(10)
                for counts in pool.get("types", {}).values()
            )
            factory = peers.factory.status().get(timeout=5)
            return factory["running"] == 0 and factory["live"] == held

        wait_for(accounted, 10, what="the factory's namespaces to match the pools'")
    finally:
        supervisor.actor_ref.stop(block=True, timeout=30)
        for ref in reversed(refs):
            ref.stop(block=True, timeout=30)
    assert os.listdir(bundles) == []


def _try_get(pool):
    try:
        return pool.get("uts").get(timeout=5).get(timeout=10)
    except Exception:  # noqa: BLE001 - still loading
        return None
