"""Configuration reload (SIGHUP, `cer reload`, admin.reload): only what changed changes."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import SAMPLE, sample_config, start_daemon, wait_for

from cer.errors import BadRequest
from cer.protocol.methods import AdminReload, NamespaceGet, NamespaceUpdate
from cer.references import CheckpointRef


def pool_names(daemon) -> set[str]:
    return {pool["ref"]["name"] for pool in daemon.status()["pools"]}


def test_reload_adds_removes_resizes_and_keeps_the_rest(daemon):
    daemon.wait_full("sample")
    daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
    kept = daemon.call(NamespaceGet("uts", CheckpointRef("sample")))  # a pool left alone keeps its handouts
    daemon.call(NamespaceUpdate(CheckpointRef("made-at-run-time", "k8s.io"), 1))
    config = sample_config()
    config["containerd_checkpoints"][0]["capacity"] = 3  # resized
    del config["containerd_checkpoints"][1]  # removed
    config["containerd_checkpoints"].append({"name": "new", "capacity": 1, "path": str(SAMPLE / "checkpoint-empty-ipc")})
    daemon.config.write_text(json.dumps(config))
    summary = daemon.call(AdminReload())
    assert summary == {"added": ["default/new"], "removed": ["default/sample-empty-ipc"], "resized": ["default/sample"], "restarted": []}
    assert pool_names(daemon) == {"sample", "new", "made-at-run-time"}
    pool = daemon.wait_full("sample")
    assert pool["capacity"] == 3 and pool["types"]["uts"]["in_use"] == 1
    assert os.path.exists(kept["path"])
    daemon.wait_full("new", types=("ipc", "uts"))

    # Same file again: nothing to do.
    assert daemon.call(AdminReload()) == {"added": [], "removed": [], "resized": [], "restarted": []}


def test_a_changed_path_restarts_only_that_pool(daemon):
    daemon.wait_full("sample")
    config = sample_config()
    config["containerd_checkpoints"][1]["path"] = str(SAMPLE / "checkpoint")
    daemon.config.write_text(json.dumps(config))
    assert daemon.call(AdminReload())["restarted"] == ["default/sample-empty-ipc"]
    pool = daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
    assert pool["ipc_default"] is False  # now serving the other checkpoint


def test_a_bad_configuration_changes_nothing_and_says_why(daemon):
    daemon.wait_full("sample")
    daemon.config.write_text('{"containerd_checkpoints": [{"name": "x", "capacity": 0}]}')
    with pytest.raises(BadRequest, match="capacity must be between 1"):
        daemon.call(AdminReload())
    assert pool_names(daemon) == {"sample", "sample-empty-ipc"}


def test_sighup_and_cer_reload_apply_the_file(daemon):
    daemon.wait_full("sample")
    config = sample_config()
    config["containerd_checkpoints"].append({"name": "by-sighup", "capacity": 1, "path": str(SAMPLE / "checkpoint")})
    daemon.config.write_text(json.dumps(config))
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "by-sighup" in pool_names(daemon), 10, what="the SIGHUP reload")
    daemon.config.write_text("{not json")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in daemon.output(), 10, what="the failed reload to be logged")
    assert daemon.process.poll() is None and "by-sighup" in pool_names(daemon)
    config["containerd_checkpoints"].pop()
    daemon.config.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "cer", "reload", "--endpoint", daemon.endpoint],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == ["default/by-sighup"]
