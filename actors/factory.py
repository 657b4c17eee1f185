"""The namespace factory: builds and tears down namespaces, each in a thread of its own.

A namespace is born in the thread that calls ``unshare``, so every creation gets a fresh, short-lived
thread that builds one namespace, opens it and ends; that thread never runs anything else. The factory
actor queues the work, bounds how many threads run at once, and keeps the register of every namespace it
made and has not destroyed yet, with the pool that owns it.
"""

import itertools
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pykka
from loguru import logger

from cer.actors.told import tell, told
from cer.pooled_namespaces import Namespace, Recipe, build, destroy

# Namespace fds are placed at or above this number, rising with every creation (see namespaces.build).
FD_BASE = 1024
_JOIN_TIMEOUT = 10.0


@dataclass(eq=False)
class _Job:
    """One creation or teardown. Its thread sets ``namespace``/``error`` once, before telling the factory."""

    kind: str  # "create" or "tear_down"
    ns_type: str
    owner: pykka.ActorProxy | None = None
    recipe: Recipe | None = None
    namespace: Namespace | None = None
    bundle: str | None = None
    fd_floor: int = FD_BASE
    error: BaseException | None = None
    seconds: float = 0.0
    thread: threading.Thread | None = field(default=None, repr=False)
    reported: bool = False


class NamespaceFactory(pykka.ThreadingActor):
    """Creates namespaces for pool actors, which get them through ``namespace_created``."""

    def __init__(
        self, bundles_dir: str, max_concurrent: int = 4, on_created: Callable[[str, float], None] | None = None
    ) -> None:
        """``on_created(ns_type, seconds)`` is told how long each successful creation took (for metrics)."""
        super().__init__()
        self._bundles_dir = bundles_dir
        self._on_created = on_created
        self._max_concurrent = max_concurrent
        self._queue: deque[_Job] = deque()  # creations waiting for a slot
        self._tear_downs: deque[_Job] = deque()  # tear-downs waiting for one of theirs
        self._running: set[_Job] = set()
        self._owners: dict[tuple[str, int], pykka.ActorProxy] = {}
        self._live: dict[tuple[str, int], Namespace] = {}
        self._serial = itertools.count(1)
        self._fd_ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
        self._next_fd = FD_BASE
        self._counts = {"created": 0, "failed": 0, "destroyed": 0}

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()

    @told
    def create(self, ns_type: str, recipe: Recipe, owner: pykka.ActorProxy) -> None:
        """Build a namespace of ``ns_type`` and hand it, or the error, to ``owner.namespace_created``."""
        job = _Job("create", ns_type, owner=owner, recipe=recipe, fd_floor=self._allocate_fd_floor())
        if ns_type == "mnt":
            job.bundle = os.path.join(self._bundles_dir, f"{os.getpid()}-{next(self._serial)}")
        self._queue.append(job)
        self._run_queued()

    @told
    def destroy(self, namespace: Namespace) -> None:
        """Close a namespace for good; a mount namespace is unmounted and its bundle removed first."""
        key = (namespace.ns_type, namespace.namespace_id)
        if self._live.pop(key, None) is None:
            logger.warning("destroy of unknown namespace {} {}", namespace.ns_type, namespace.namespace_id)
            return
        self._owners.pop(key, None)
        self._counts["destroyed"] += 1
        if namespace.ns_type == "mnt":
            self._tear_downs.append(_Job("tear_down", "mnt", namespace=namespace))
            self._run_queued()
        else:
            os.close(namespace.namespace_id)

    def owner(self, ns_type: str, namespace_id: int) -> pykka.ActorProxy | None:
        """The pool that owns a live namespace, for routing a put that names only the namespace."""
        return self._owners.get((ns_type, namespace_id))

    def status(self) -> dict:
        queued = len(self._queue) + len(self._tear_downs)
        return {"running": len(self._running), "queued": queued, "live": len(self._live), **self._counts}

    def _allocate_fd_floor(self) -> int:
        floor = self._next_fd
        self._next_fd = floor + 1 if floor + 1 < self._fd_ceiling else FD_BASE
        return floor

    def _run_queued(self) -> None:
        # Creations and tear-downs have slots of their own: how long removing a bundle takes depends on what
        # the container left in it, and must never hold up the creations.
        for queue in (self._queue, self._tear_downs):
            while queue and sum(job.kind == queue[0].kind for job in self._running) < self._max_concurrent:
                job = queue.popleft()
                target = _create if job.kind == "create" else _tear_down
                job.thread = threading.Thread(target=target, args=(job, self._self), name=f"cer-{job.kind}-{job.ns_type}", daemon=True)
                self._running.add(job)
                job.thread.start()

    @told
    def job_finished(self, job: _Job) -> None:
        self._running.discard(job)
        job.reported = True
        try:
            if job.kind == "create":
                self._deliver(job)
            elif job.error is not None:
                logger.error("tearing down mount namespace {} failed: {}", job.namespace.namespace_id, job.error)
        finally:
            # The slot is free whatever delivering did: the queue must never wait for a message that is gone.
            self._run_queued()

    def _deliver(self, job: _Job) -> None:
        namespace = job.namespace
        if namespace is None:
            self._counts["failed"] += 1
        else:
            self._counts["created"] += 1
            self._observe_creation(job)
            key = (namespace.ns_type, namespace.namespace_id)
            self._live[key] = namespace
            self._owners[key] = job.owner
        if job.owner is None or not job.owner.actor_ref.is_alive():
            if namespace is not None:
                self.destroy(namespace)
            return
        # A pool that stops before it handles this leaves the namespace registered: on_stop destroys it.
        if not tell(job.owner.namespace_created, job.ns_type, namespace, job.error, job.seconds) and namespace is not None:
            self.destroy(namespace)

    def _observe_creation(self, job: _Job) -> None:
        if self._on_created is None:
            return
        try:
            self._on_created(job.ns_type, job.seconds)
        except Exception:  # noqa: BLE001 - an exception here would kill the factory actor
            logger.exception("observing a namespace creation failed")

    def on_stop(self) -> None:
        # Let the threads still at work end; what they built and never reported is destroyed here.
        self._queue.clear()
        while self._tear_downs:
            self._tear_down_now(self._tear_downs.popleft())
        for job in list(self._running):
            job.thread.join(_JOIN_TIMEOUT)
            if not job.reported and job.kind == "create" and job.namespace is not None:
                self._live[(job.ns_type, job.namespace.namespace_id)] = job.namespace
        for namespace in list(self._live.values()):
            logger.info("destroying {} namespace {} at shutdown", namespace.ns_type, namespace.namespace_id)
            self._live.pop((namespace.ns_type, namespace.namespace_id))
            if namespace.ns_type == "mnt":
                self._tear_down_now(_Job("tear_down", "mnt", namespace=namespace))
            else:
                os.close(namespace.namespace_id)

    def _tear_down_now(self, job: _Job) -> None:
        thread = threading.Thread(target=_tear_down, args=(job, None), daemon=True)
        thread.start()
        thread.join(_JOIN_TIMEOUT)


def _create(job: _Job, factory: pykka.ActorProxy) -> None:
    started = time.monotonic()
    try:
        job.namespace = build(job.ns_type, job.recipe, job.bundle, job.fd_floor)
        job.seconds = time.monotonic() - started
    except BaseException as error:  # noqa: BLE001 - whatever went wrong is the pool's to report; the thread ends here anyway
        job.error = error  # build removed the half-built bundle (or noted on the error why it could not)
    finally:
        _report(job, factory)


def _tear_down(job: _Job, factory: pykka.ActorProxy | None) -> None:
    # This thread never enters the namespace (see cer.pooled_namespaces.destroy), and the factory hears of it
    # whatever happens: a job never reported would hold one of its creation slots for good.
    try:
        destroy(job.namespace)
    except BaseException as error:  # noqa: BLE001 - logged by the factory; the thread ends here anyway
        job.error = error
    finally:
        _report(job, factory)


def _report(job: _Job, factory: pykka.ActorProxy | None) -> None:
    # A factory that is stopping drops the message; its on_stop looks after what this job left.
    if factory is not None:
        tell(factory.job_finished, job)
