"""The metrics alone and as fed in one process: pool series from a status snapshot, request and creation
observations, bounded labels, and registries that do not share state."""

import orjson
import pykka
import pytest
import zmq
from conftest import short_tempdir, wait_for
from dummy_gateway import DummyGateway
from prometheus_client.parser import text_string_to_metric_families

from cer.actors.factory import NamespaceFactory
from cer.metrics import POOL_STATES, Metrics
from cer.pooled_namespaces import Recipe
from cer.protocol.frontend import Frontend
from cer.protocol.methods import method_names

pytestmark = pytest.mark.timeout(60)


def samples(metrics: Metrics) -> dict[tuple, float]:
    """Every sample of the exposition, keyed by (name, sorted label items)."""
    text = metrics.exposition()[0].decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def pool_status(name: str, state: str = "ready", mnt: bool = True, **counts) -> dict:
    def per_type(supported: bool) -> dict:
        base = {"supported": supported, "target": 3, "idle": 2, "in_use": 1, "building": 1, "warm_gets": 5, "cold_gets": 1, "failures": 0}
        return {**base, **counts}

    return {
        "ref": {"name": name, "labels": {"namespace": "default"}},
        "state": state,
        "capacity": 3,
        "types": {"ipc": per_type(True), "uts": per_type(True), "mnt": per_type(mnt)},
    }


def test_pool_series_come_from_the_status_at_scrape_time():
    pools = [pool_status("a"), pool_status("b", state="failing", mnt=False, failures=4)]
    metrics = Metrics(method_names())
    metrics.watch_pools(lambda: {"pools": pools})
    a_uts = {"checkpoint": "a", "checkpoint_namespace": "default", "type": "uts"}
    assert value(metrics, "cer_status_ok") == 1
    assert value(metrics, "cer_pool_capacity", **a_uts) == 3
    assert value(metrics, "cer_pool_idle", **a_uts) == 2
    assert value(metrics, "cer_pool_in_use", **a_uts) == 1
    assert value(metrics, "cer_pool_building", **a_uts) == 1
    assert value(metrics, "cer_pool_gets_total", kind="warm", **a_uts) == 5
    assert value(metrics, "cer_pool_gets_total", kind="cold", **a_uts) == 1
    b = {"checkpoint": "b", "checkpoint_namespace": "default"}
    assert value(metrics, "cer_pool_creation_failures_total", type="ipc", **b) == 4
    assert value(metrics, "cer_pool_state", state="failing", **b) == 1
    assert sum(value(metrics, "cer_pool_state", state=state, **b) for state in POOL_STATES) == 1
    # A pool without mnt namespaces has no mnt series, rather than zeros that look like an empty pool.
    assert value(metrics, "cer_pool_idle", type="mnt", **b) is None
    # Read again at the next scrape: nothing was copied out of the status.
    pools[0]["types"]["uts"]["idle"] = 0
    assert value(metrics, "cer_pool_idle", **a_uts) == 0


def test_a_crashed_pool_and_a_failed_status_are_reported_not_raised():
    crashed = {"ref": {"name": "c", "labels": {"namespace": "ns1"}}, "state": "crashed", "last_error": "the pool actor died"}
    metrics = Metrics(method_names())
    metrics.watch_pools(lambda: {"pools": [crashed]})
    assert value(metrics, "cer_pool_state", checkpoint="c", checkpoint_namespace="ns1", state="crashed") == 1

    def broken():
        raise RuntimeError("the supervisor did not answer")

    failing = Metrics(method_names())
    failing.watch_pools(broken)
    assert value(failing, "cer_status_ok") == 0
    assert not any(name.startswith("cer_pool_") for name, _ in samples(failing))


def test_daemons_in_one_process_keep_their_own_metrics():
    first, second = Metrics(method_names()), Metrics(method_names())  # no "duplicated timeseries" error: each owns its registry
    first.request_answered("admin.status", 0.001, None)
    first.namespace_created("uts", 0.002)
    assert value(first, "cer_request_duration_seconds_count", method="admin.status") == 1
    assert value(second, "cer_request_duration_seconds_count", method="admin.status") == 0
    assert value(first, "cer_namespace_creation_seconds_count", type="uts") == 1
    assert value(second, "cer_namespace_creation_seconds_count", type="uts") == 0


def test_method_labels_come_from_the_method_table_only():
    metrics = Metrics(method_names())
    metrics.request_answered("namespace.steal-everything", 0.001, "unknown_method")
    metrics.namespace_created("net-of-nonsense", 0.001)
    text = metrics.exposition()[0].decode()
    assert "steal-everything" not in text and "net-of-nonsense" not in text
    assert value(metrics, "cer_request_errors_total", method="invalid", code="unknown_method") == 1


def raw_request(endpoint: str, body: bytes) -> dict:
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send(body)
        assert socket.poll(5000), "no reply"
        return orjson.loads(socket.recv())
    finally:
        socket.close()


def request(service: str, method: str, params: dict | None = None) -> bytes:
    return orjson.dumps({"v": 1, "service": service, "method": method, "params": params or {}})


def test_the_frontend_reports_each_request_by_method_and_error_code():
    metrics = Metrics(method_names())
    endpoint = f"ipc://{short_tempdir()}/metrics.sock"
    frontend = Frontend(endpoint, DummyGateway(), workers=2, observe=metrics.request_answered)
    frontend.start()
    try:
        for body in (
            request("admin", "status"),
            request("admin", "status"),
            request("namespace", "put", {"namespace_type": "uts", "namespace_id": 7}),  # not handed out
            request("namespace", "steal-everything"),
            b"\xff not json",
        ):
            raw_request(endpoint, body)
    finally:
        frontend.stop()
    assert value(metrics, "cer_request_duration_seconds_count", method="admin.status") == 2
    assert value(metrics, "cer_request_duration_seconds_count", method="namespace.put") == 1
    assert value(metrics, "cer_request_duration_seconds_count", method="invalid") == 2
    assert value(metrics, "cer_request_errors_total", method="namespace.put", code="not_found") == 1
    assert value(metrics, "cer_request_errors_total", method="invalid", code="unknown_method") == 1
    assert value(metrics, "cer_request_errors_total", method="invalid", code="bad_request") == 1
    assert value(metrics, "cer_request_errors_total", method="admin.status", code="not_found") is None
    assert "steal-everything" not in metrics.exposition()[0].decode()


def test_a_failing_observer_never_costs_a_reply():
    def broken(*_):
        raise RuntimeError("metrics bug")

    endpoint = f"ipc://{short_tempdir()}/metrics.sock"
    frontend = Frontend(endpoint, DummyGateway(), workers=1, observe=broken)
    frontend.start()
    try:
        assert raw_request(endpoint, request("admin", "status"))["ok"] is True
        assert raw_request(endpoint, request("admin", "status"))["ok"] is True
    finally:
        frontend.stop()


class Receiver(pykka.ThreadingActor):
    """Stands in for a pool: counts what the factory hands over, and gives it back to be destroyed."""

    def __init__(self, factory) -> None:
        super().__init__()
        self.factory = factory
        self.results = []

    def namespace_created(self, ns_type, namespace, error, seconds) -> None:
        self.results.append(namespace is not None)
        if namespace is not None:
            self.factory.destroy(namespace)

    def received(self) -> list[bool]:
        return list(self.results)


class Exploding:
    """IPC contents whose every use fails the creation."""

    def __getattr__(self, name):
        raise RuntimeError("unusable contents")


def test_the_factory_reports_successful_creation_times(tmp_path):
    metrics = Metrics(method_names())
    observed = []

    def on_created(ns_type, seconds):
        observed.append((ns_type, seconds))
        metrics.namespace_created(ns_type, seconds)
        if len(observed) == 1:
            raise RuntimeError("a broken observer must not kill the factory")

    factory = NamespaceFactory.start(str(tmp_path), 2, on_created).proxy()
    receiver = Receiver.start(factory).proxy()
    factory.create("uts", Recipe(), receiver)
    factory.create("ipc", Recipe(ipc=Exploding()), receiver)
    wait_for(lambda: len(receiver.received().get(timeout=5)) == 2, 20, what="both creations")
    factory.create("uts", Recipe(), receiver)
    wait_for(lambda: len(receiver.received().get(timeout=5)) == 3, 20, what="the factory to survive its observer")
    assert sorted(receiver.received().get(timeout=5)) == [False, True, True]
    assert [ns_type for ns_type, _ in observed] == ["uts", "uts"]
    assert all(seconds > 0 for _, seconds in observed)
    assert value(metrics, "cer_namespace_creation_seconds_count", type="uts") == 2
    assert value(metrics, "cer_namespace_creation_seconds_count", type="ipc") == 0  # the failed one
    assert value(metrics, "cer_namespace_creation_seconds_sum", type="uts") == pytest.approx(sum(s for _, s in observed))


def test_the_target_of_an_adaptive_pool_is_exported_beside_its_floor():
    from cer.metrics import _pool_metrics

    pool = {"ref": {"name": "a", "labels": {"namespace": "default"}}, "state": "ready", "capacity": 1,
            "types": {"uts": {"supported": True, "target": 7, "idle": 5, "in_use": 2, "building": 0,
                              "warm_gets": 3, "cold_gets": 1, "failures": 0}}}
    families = {family.name: family for family in _pool_metrics([pool])}
    assert families["cer_pool_target"].samples[0].value == 7
    assert families["cer_pool_capacity"].samples[0].value == 1


def test_told_messages_that_failed_are_counted_per_actor_and_message():
    failures = [{"actor": "PoolActor", "message": "namespace_created", "count": 3, "last_error": "KeyError: 'x'"}]
    metrics = Metrics(method_names())
    metrics.watch_pools(lambda: {"pools": [], "message_failures": failures})
    assert value(metrics, "cer_actor_message_failures_total", actor="PoolActor", message="namespace_created") == 3
