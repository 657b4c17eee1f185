"""The supervisor: pools for requests are bounded."""

import pytest

from cer.actors import supervisor as supervisor_module
from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.actors.pool import PoolPeers, PoolSettings
from cer.actors.watcher import ProcessWatcher
from cer.config import CheckpointEntry, Config
from cer.errors import Exhausted
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
        assert len(supervisor.status().get(timeout=10)) == 2
        # The configuration's own pools are never refused for them.
        configured = Config("test", 1, (CheckpointEntry(CheckpointRef("configured"), 0),))
        assert supervisor.reload(configured).get(timeout=30)["added"] == ["default/configured"]
        assert supervisor.update(CheckpointRef("configured"), 1).get(timeout=10) is False
        assert len(supervisor.status().get(timeout=10)) == 3
    finally:
        supervisor.actor_ref.stop(block=True, timeout=30)
        for ref in reversed(refs):
            ref.stop(block=True, timeout=30)
