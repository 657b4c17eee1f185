"""kill -9 with pools full and namespaces handed out: the next run cleans up and serves again."""

import os
import signal

import pytest
from conftest import host_mounts, sample_config, start_daemon

from cer.errors import NotFound
from cer.protocol.methods import NamespaceGet, NamespacePut
from cer.references import CheckpointRef

REF = CheckpointRef("sample")


def test_a_daemon_killed_with_namespaces_handed_out_is_cleaned_up_by_the_next_run():
    mounts_before = host_mounts()
    first = start_daemon(sample_config())
    first.wait_full("sample")
    held = {ns_type: first.call(NamespaceGet(ns_type, REF)) for ns_type in ("ipc", "uts", "mnt")}
    stale_bundle = held["mnt"]["info"]["bundle"]
    first.stop(signal.SIGKILL)
    # The kernel dropped the dead daemon's namespaces with its fds; its files stay.
    assert os.path.isdir(stale_bundle)
    assert os.path.exists(first.root / "daemon.sock")

    second = start_daemon(sample_config(), root=first.root)
    try:
        second.wait_full("sample")
        assert not os.path.exists(stale_bundle)
        assert "removing bundles left by an earlier run" in second.output()
        # A client still holding a namespace from the dead daemon gets a clear answer.
        for ns_type, reply in held.items():
            with pytest.raises(NotFound, match=f"came from daemon pid {first.process.pid}, which is no longer running"):
                second.call(NamespacePut(ns_type, reply["namespace_id"], reply["pid"]))
        fresh = second.call(NamespaceGet("mnt", REF))
        assert fresh["pid"] == second.process.pid
    finally:
        assert second.stop() == 0
    assert sorted(os.listdir(second.root)) == []
    assert host_mounts() == mounts_before
