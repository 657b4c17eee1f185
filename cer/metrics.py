"""The daemon's Prometheus metrics, in a registry of its own (several daemons can share a process).

Pool sizes and get counts are not copied out of the actors: a collector asks for the daemon's status at
scrape time, so each pool actor stays the only owner of its bookkeeping and a scrape shows the same
numbers as ``cer status``. What only exists as events is recorded as it happens, through callables
handed to whoever sees it: namespace creation times by the namespace factory (``namespace_created``),
request latency and errors by the frontends (``request_answered``).

Labels are bounded by design. Checkpoint labels come only from the daemon's own pools (configured, or
added by ``namespace.update``); methods from the names the daemon hands in (the protocol's method table),
namespace types and error codes from fixed sets. Nothing a request merely names (an unknown ref, an unknown method) becomes a label.

    cer_pool_state{checkpoint, checkpoint_namespace, state}            1 for the pool's state, else 0
    cer_pool_capacity{checkpoint, checkpoint_namespace, type}          idle namespaces the pool keeps (its floor)
    cer_pool_target{checkpoint, checkpoint_namespace, type}            what it fills to now (adaptive pools move it)
    cer_pool_idle / cer_pool_in_use / cer_pool_building{...,type}    namespaces per stage
    cer_pool_gets_total{checkpoint, checkpoint_namespace, type, kind}  kind: warm or cold
    cer_pool_creation_failures_total{checkpoint, checkpoint_namespace, type}
    cer_actor_message_failures_total{actor, message}                   told messages whose handler failed
    cer_status_ok                                                      0 when the actors did not answer the scrape
    cer_namespace_creation_seconds{type}                               histogram, successful creations
    cer_request_duration_seconds{method}                               histogram, every answered request
    cer_request_errors_total{method, code}                             error replies by protocol error code

``method`` is ``service.name`` (``namespace.get``), or ``invalid`` for a request that names no known
method (malformed, or an unknown one).
"""

from collections.abc import Callable, Iterable, Iterator

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cer.linux.flags import NAMESPACE_TYPES

INVALID_METHOD = "invalid"
# Creating an IPC or UTS namespace takes about a millisecond, a mount namespace tens; restoring SysV
# objects or mounting a large tree can take seconds.
_CREATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A warm get answers in well under a millisecond; a cold one waits for a creation, up to the cold timeout.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Every state a pool reports (actors/pool.py), and the supervisor's for a pool that does not answer.
POOL_STATES = ("loading", "unavailable", "ready", "failing", "failed", "retired", "crashed", "unresponsive")


class Metrics:
    """One daemon's metrics: feed it through its callables, expose it with ``exposition``. ``method_names`` are
    the protocol's methods as ``service.name`` (:func:`cer.protocol.methods.method_names`): the only method
    labels there are, handed in so that metrics know nothing of the protocol layer above them."""

    def __init__(self, method_names: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._method_names = frozenset(method_names)
        self._creation = Histogram(
            "cer_namespace_creation_seconds",
            "Time to build one namespace, per namespace type (successful creations).",
            ["type"],
            buckets=_CREATION_BUCKETS,
            registry=self.registry,
        )
        self._latency = Histogram(
            "cer_request_duration_seconds",
            "Time from taking a request to having its reply, per protocol method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._errors = Counter(
            "cer_request_errors",
            "Requests answered with an error, per protocol method and error code.",
            ["method", "code"],
            registry=self.registry,
        )
        # Series that exist from the start, so rates work from the first scrape.
        for ns_type in NAMESPACE_TYPES:
            self._creation.labels(ns_type)
        # Each method's histogram looked up once: the frontend observes every request.
        self._latency_of = {method: self._latency.labels(method) for method in sorted(self._method_names | {INVALID_METHOD})}

    def watch_pools(self, status: Callable[[], dict]) -> None:
        """Report the pools from ``status`` (the Gateway's ``status``), asked for at every scrape."""
        self.registry.register(_PoolCollector(status))

    def namespace_created(self, ns_type: str, seconds: float) -> None:
        """A namespace of ``ns_type`` was built in ``seconds`` (called by the namespace factory)."""
        if ns_type in NAMESPACE_TYPES:
            self._creation.labels(ns_type).observe(seconds)

    def request_answered(self, method: str | None, seconds: float, error_code: str | None) -> None:
        """A request was answered after ``seconds``; ``method`` is ``service.name`` or None when the request
        named no known method, ``error_code`` the protocol error code of an error reply."""
        label = method if method in self._method_names else INVALID_METHOD
        self._latency_of[label].observe(seconds)
        if error_code is not None:
            self._errors.labels(label, error_code).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PoolCollector:
    """Turns one status snapshot into the pool metrics; nothing is kept between scrapes."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily("cer_status_ok", "1 when the daemon's actors answered this scrape's status request.")
        try:
            status = self._status()
            pools = status["pools"]
        except Exception as error:  # noqa: BLE001 - a scrape reports what it can; the reason goes to the log
            logger.warning("metrics: the daemon's status could not be read: {}", error)
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        yield from _pool_metrics(pools)
        yield _failure_metrics(status.get("message_failures", []))


def _failure_metrics(failures: list[dict]) -> Metric:
    # Labels are actor classes and handler names: a fixed set, from the code.
    family = CounterMetricFamily(
        "cer_actor_message_failures", "Messages nobody waited for whose handler failed (logged at ERROR).", labels=["actor", "message"]
    )
    for failure in failures:
        family.add_metric([failure["actor"], failure["message"]], failure["count"])
    return family


def _pool_metrics(pools: list[dict]) -> Iterator[Metric]:
    pool_labels = ["checkpoint", "checkpoint_namespace"]
    type_labels = [*pool_labels, "type"]
    state = GaugeMetricFamily("cer_pool_state", "The pool's state: 1 for the current one, 0 for the others.", labels=[*pool_labels, "state"])
    capacity = GaugeMetricFamily("cer_pool_capacity", "Idle namespaces the pool keeps, per type.", labels=type_labels)
    sizes = {
        "target": GaugeMetricFamily(
            "cer_pool_target", "Idle namespaces the pool fills to now (its capacity, or what demand asks of an adaptive pool).", labels=type_labels
        ),
        "idle": GaugeMetricFamily("cer_pool_idle", "Idle namespaces, ready to hand out.", labels=type_labels),
        "in_use": GaugeMetricFamily("cer_pool_in_use", "Namespaces handed out and not yet given back.", labels=type_labels),
        "building": GaugeMetricFamily("cer_pool_building", "Namespaces being built for the pool.", labels=type_labels),
    }
    gets = CounterMetricFamily("cer_pool_gets", "Namespaces handed out: warm (was idle) or cold (built for the get).", labels=[*type_labels, "kind"])
    failures = CounterMetricFamily("cer_pool_creation_failures", "Failed namespace creations.", labels=type_labels)
    for pool in pools:
        ref = pool["ref"]
        labels = [ref["name"], ref["labels"]["namespace"]]
        current = pool.get("state", "unresponsive")
        for name in (*POOL_STATES, *(() if current in POOL_STATES else (current,))):
            state.add_metric([*labels, name], int(name == current))
        for ns_type, counts in pool.get("types", {}).items():
            if not counts.get("supported"):
                continue  # a pool without a rootfs has no mnt namespaces: no series rather than zeros
            typed = [*labels, ns_type]
            capacity.add_metric(typed, pool["capacity"])
            for key, family in sizes.items():
                family.add_metric(typed, counts[key])
            gets.add_metric([*typed, "warm"], counts["warm_gets"])
            gets.add_metric([*typed, "cold"], counts["cold_gets"])
            failures.add_metric(typed, counts["failures"])
    yield from (state, capacity, *sizes.values(), gets, failures)
