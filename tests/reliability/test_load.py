"""Many clients at once against a real daemon: the invariants that keep one namespace from two holders."""

import os
import threading
import time
from collections import Counter

import pytest
from conftest import fd_kinds, host_mounts, sample_config, start_daemon, wait_for

from cer.protocol.methods import NamespaceGet, NamespacePut
from cer.references import CheckpointRef

CLIENTS = 32
PAIRS_PER_CLIENT = 100  # 3200 get/put pairs in all
TYPES = ("ipc", "uts", "mnt")
REF = CheckpointRef("sample")


@pytest.mark.timeout(600)
def test_many_clients_never_share_a_namespace_and_nothing_leaks():
    mounts_before = host_mounts()
    config = sample_config()
    config["containerd_checkpoints"][0]["capacity"] = 8
    daemon = start_daemon(config)
    try:
        daemon.wait_full("sample")
        daemon.wait_full("sample-empty-ipc", types=("ipc", "uts"))
        fds_at_rest = fd_kinds(daemon.process.pid)
        held: dict[tuple[str, int], int] = {}  # (type, namespace id) -> client holding it now
        lock = threading.Lock()
        violations: list[str] = []
        errors: list[BaseException] = []
        puts = Counter()

        def client(index: int) -> None:
            try:
                with daemon.client(timeout=60) as connection:
                    for pair in range(PAIRS_PER_CLIENT):
                        ns_type = TYPES[(index + pair) % 3]
                        reply = connection.call(NamespaceGet(ns_type, REF))
                        key = (ns_type, reply["namespace_id"])
                        with lock:
                            if key in held:
                                violations.append(f"{key} handed to client {index} while client {held[key]} holds it")
                            held[key] = index
                        # The namespace is really there while we hold it.
                        if not os.path.exists(reply["path"]):
                            violations.append(f"{key} does not exist while held")
                        with lock:
                            del held[key]
                        connection.call(NamespacePut(ns_type, reply["namespace_id"], reply["pid"]))
                        with lock:
                            puts[key] += 1
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(500)
        elapsed = time.monotonic() - started
        assert not errors, errors[:3]
        assert not violations, violations[:5]
        assert sum(puts.values()) == CLIENTS * PAIRS_PER_CLIENT
        assert max(puts.values()) == 1  # every put accepted exactly once: no id was ever handed out twice

        def settled():
            status = daemon.status()
            pool = next(p for p in status["pools"] if p["ref"]["name"] == "sample")
            counts = pool["types"]
            idle_and_used = sum(counts[t]["idle"] + counts[t]["in_use"] for t in TYPES)
            building = sum(counts[t]["building"] for t in TYPES)
            factory = status["factory"]
            # Everything the daemon holds is idle or in use in some pool (the other pool holds the rest).
            other = sum(
                p["types"][t]["idle"] + p["types"][t]["in_use"] for p in status["pools"] if p is not pool for t in TYPES
            )
            return building == 0 and factory["running"] == 0 and factory["live"] == idle_and_used + other and all(
                counts[t]["idle"] == 8 and counts[t]["in_use"] == 0 for t in TYPES
            )

        wait_for(settled, 30, 0.1, "the pools to settle")
        assert fd_kinds(daemon.process.pid) == fds_at_rest
        print(f"\n{CLIENTS} clients, {CLIENTS * PAIRS_PER_CLIENT} get/put pairs in {elapsed:.1f} s")
    finally:
        assert daemon.stop() == 0
    assert host_mounts() == mounts_before
