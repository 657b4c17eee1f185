"""Configuration reload (SIGHUP, `cer reload`, admin.reload): only what changed changes."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import SAMPLE, sample_config, wait_for

from cer.errors import BadRequest, NotFound
from cer.protocol.methods import AdminReload, NamespaceGet, NamespacePut, NamespaceUpdate
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


def test_a_removed_or_replaced_pool_keeps_what_it_handed_out_until_it_comes_back(daemon):
    daemon.wait_full("sample")
    daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
    held_mnt = daemon.call(NamespaceGet("mnt", CheckpointRef("sample")))
    held_uts = daemon.call(NamespaceGet("uts", CheckpointRef("sample-empty-ipc")))
    config = sample_config()
    config["containerd_checkpoints"][0]["path"] = str(SAMPLE / "checkpoint-empty-ipc")  # replaced
    del config["containerd_checkpoints"][1]  # removed
    daemon.config.write_text(json.dumps(config))
    assert daemon.call(AdminReload()) == {"added": [], "removed": ["default/sample-empty-ipc"], "resized": [], "restarted": ["default/sample"]}
    # What running containers use is untouched: the namespaces, and the mnt bundle's files.
    assert os.path.exists(held_mnt["path"]) and os.path.isdir(held_mnt["info"]["bundle"])
    assert os.path.exists(held_uts["path"])
    states = {(pool["ref"]["name"], pool["state"]) for pool in daemon.status()["pools"]}
    assert ("sample", "retired") in states and ("sample-empty-ipc", "retired") in states
    # The new pool of the replaced entry serves; the removed one's name no longer does.
    assert wait_for(lambda: _get_or_none(daemon, "uts", "sample"), 20)["info"]["ipc_default"] is True
    with pytest.raises(NotFound):
        daemon.call(NamespaceGet("uts", CheckpointRef("sample-empty-ipc")))
    # Puts reach the retired pools, which then stop.
    daemon.call(NamespacePut("mnt", held_mnt["namespace_id"]))
    daemon.call(NamespacePut("uts", held_uts["namespace_id"]))
    wait_for(lambda: not os.path.exists(held_mnt["info"]["bundle"]), 10, what="the bundle to go")
    wait_for(lambda: all(pool["state"] != "retired" for pool in daemon.status()["pools"]), 10, what="retired pools to stop")


def _get_or_none(daemon, ns_type, name):
    try:
        return daemon.call(NamespaceGet(ns_type, CheckpointRef(name)))
    except Exception:  # noqa: BLE001 - the new pool is still loading
        return None


def test_a_changed_max_capacity_resizes_without_a_restart(daemon):
    daemon.wait_full("sample")
    config = sample_config()
    config["containerd_checkpoints"][0]["max_capacity"] = 6
    daemon.config.write_text(json.dumps(config))
    assert daemon.call(AdminReload())["resized"] == ["default/sample"]
    assert daemon.pool("sample")["max_capacity"] == 6
