"""The supervisor: pools for requests are bounded, and nothing it does waits on a pool."""

import threading
import time

import pytest
from conftest import SAMPLE, wait_for

from cer.actors import supervisor as supervisor_module
from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.protocol.gateway import Gateway
from cer.actors.pool import PoolActor, PoolPeers, PoolSettings
from cer.actors.watcher import ProcessWatcher
from cer.config import CheckpointEntry, Config
from cer.errors import Exhausted, Unavailable
from cer.references import CheckpointRef


def test_requests_cannot_add_pools_without_end_nor_crowd_out_the_configurations(tmp_path, monkeypatch):
    """Issue 15, finding 3: 254 junk refs made 254 pools, and then root's own update of a new ref was refused."""
    monkeypatch.setattr(supervisor_module, "MAX_RUNTIME_POOLS", 2)
    # An extractor without ROOT: checkpoints from containerd stay "unavailable", nothing is built.
    refs = [NamespaceFactory.start(str(tmp_path), 1), CheckpointExtractor.start(), ProcessWatcher.start()]
    supervisor = supervisor_module.Supervisor.start(
        Config("test", 1, ()), PoolPeers(*(ref.proxy() for ref in refs)), PoolSettings()
    ).proxy()
    try:
        assert supervisor.update(CheckpointRef("a"), 0).get(timeout=10) is True
        assert supervisor.update(CheckpointRef("b"), 0).get(timeout=10) is True
        with pytest.raises(Exhausted, match="2 pools were created by namespace.update.*the most: default/c is not added"):
            supervisor.update(CheckpointRef("c"), 0).get(timeout=10)
        assert supervisor.update(CheckpointRef("a"), 1).get(timeout=10) is False  # resizing is always fine
        assert len(supervisor.pool_statuses().get(timeout=10).collect(10)) == 2
        # The configuration's own pools are never refused for them.
        configured = Config("test", 1, (CheckpointEntry(CheckpointRef("configured"), 0),))
        assert supervisor.reload(configured).get(timeout=30)["added"] == ["default/configured"]
        assert supervisor.update(CheckpointRef("configured"), 1).get(timeout=10) is False
        assert len(supervisor.pool_statuses().get(timeout=10).collect(10)) == 3
    finally:
        supervisor.actor_ref.stop(block=True, timeout=30)
        for ref in reversed(refs):
            ref.stop(block=True, timeout=30)


class BusyPool(PoolActor):
    """A pool whose thread a test can keep busy, as slow work on an actor's thread would."""

    def hold(self, release: threading.Event) -> None:
        release.wait(30)


@pytest.fixture
def busy_pools(tmp_path, monkeypatch):
    """A supervisor of two pools (uts and ipc only, capacity 0), a gateway with a 0.5 s ask timeout, and an
    event that keeps both pools busy until set."""
    monkeypatch.setattr(supervisor_module, "PoolActor", BusyPool)
    refs = [NamespaceFactory.start(str(tmp_path), 1), CheckpointExtractor.start(), ProcessWatcher.start()]
    peers = PoolPeers(*(ref.proxy() for ref in refs))
    entries = tuple(CheckpointEntry(CheckpointRef(name), 0, str(SAMPLE / "checkpoint")) for name in ("a", "b"))
    supervisor = supervisor_module.Supervisor.start(Config("test", 1, entries), peers, PoolSettings())
    gateway = Gateway(supervisor.proxy(), peers, ask_timeout=0.5)
    wait_for(lambda: all(pool["state"] == "ready" for pool in gateway.status()["pools"]), 10)
    release = threading.Event()
    pools = [supervisor.proxy().pool(entry.ref).get(timeout=5) for entry in entries]
    try:
        for pool in pools:
            pool.hold.defer(release)
        yield supervisor.proxy(), gateway, pools, release
    finally:
        release.set()
        supervisor.stop(block=True, timeout=30)
        for ref in reversed(refs):
            ref.stop(block=True, timeout=30)


def test_resizing_a_busy_pool_does_not_wait_for_it(busy_pools):
    supervisor, gateway, pools, release = busy_pools
    started = time.monotonic()
    assert gateway.update(CheckpointRef("a"), 3) is False  # the supervisor tells the pool, and answers
    assert time.monotonic() - started < 0.5
    release.set()
    assert pools[0].status().get(timeout=5)["capacity"] == 3  # the pool's next message sees it


def test_status_asks_every_pool_at_once_within_one_deadline(busy_pools):
    supervisor, gateway, pools, release = busy_pools
    started = time.monotonic()
    status = gateway.status()  # 3 x 0.5 s for everything, not 5 s per pool one after the other
    assert time.monotonic() - started < 2.5
    assert [pool["state"] for pool in status["pools"]] == ["unresponsive", "unresponsive"]
    assert status["factory"]["live"] == 0  # the other actors answered within the same deadline
    with pytest.raises(Unavailable, match="pools that did not start: a, b"):
        gateway.check_started(1.0)
    release.set()
    gateway.check_started(5.0)  # every actor answers now


def test_a_deadline_names_who_did_not_answer_and_how_long_was_spent(busy_pools):
    supervisor, gateway, pools, release = busy_pools
    with pytest.raises(Unavailable, match=r"the pool of default/a did not answer within 0.5 s"):
        gateway.ipc_default(CheckpointRef("a"))
