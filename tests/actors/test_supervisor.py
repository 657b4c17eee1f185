"""The supervisor: pools for requests are bounded."""

import pytest

from cer.actors import supervisor as supervisor_module
from cer.actors.extractor import CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.actors.pool import PoolPeers, PoolSettings
from cer.actors.watcher import ProcessWatcher
from cer.config import Config
from cer.errors import BadRequest
from cer.references import CheckpointRef


def test_requests_cannot_add_pools_without_end(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor_module, "MAX_POOLS", 2)
    # An extractor without ROOT: checkpoints from containerd stay "unavailable", nothing is built.
    refs = [NamespaceFactory.start(str(tmp_path), 1), CheckpointExtractor.start(), ProcessWatcher.start()]
    supervisor = supervisor_module.Supervisor.start(
        Config("test", 1, ()), PoolPeers(*(ref.proxy() for ref in refs)), PoolSettings()
    ).proxy()
    try:
        assert supervisor.update(CheckpointRef("a"), 0).get(timeout=10) is True
        assert supervisor.update(CheckpointRef("b"), 0).get(timeout=10) is True
        with pytest.raises(BadRequest, match="already serves 2 pools"):
            supervisor.update(CheckpointRef("c"), 0).get(timeout=10)
        assert supervisor.update(CheckpointRef("a"), 1).get(timeout=10) is False  # resizing is always fine
        assert len(supervisor.pool_statuses().get(timeout=10).collect(10)) == 2
    finally:
        supervisor.actor_ref.stop(block=True, timeout=30)
        for ref in reversed(refs):
            ref.stop(block=True, timeout=30)
