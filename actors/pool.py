"""A pool actor keeps one checkpoint's ready namespaces, per type, at the capacity asked for.

It is the only owner of those namespaces' bookkeeping: which are idle, which are handed out (and to
which process, once bound), which are being built. A get takes an idle one and starts a refill; when
none is idle it asks the factory for one and answers once it arrives (a "cold" get). A namespace that
was handed out is never handed out again: its put, or the exit of the process it is bound to, destroys
it and the pool builds a fresh one. Handed-out namespaces are leases (cer.actors.leases), as lazy-pages
servers are.

The idle namespaces of each type sit on a :class:`Shelf` that the pool publishes (:class:`Shelves`):
the frontend takes a warm namespace from it in its own thread, without a hop through a worker or the
pool, and reports what it took, and what of it came back by a put, once its replies are out and before
any other request about it can reach the pool (``shelf_events``). All timed work (refills a moment after gets, cold-get deadlines, retries,
the adaptive pools' decay) goes through the daemon's one timer service (cer.actors.timers).
"""

import threading
from collections import deque
from dataclasses import dataclass, field

import pykka
from loguru import logger

from cer.actors.dispatch import DispatchedActor, Dispatcher, default_dispatcher
from cer.actors.leases import Handout, Holder, Leases, Waiter
from cer.actors.timers import Timer, Timers, default_timers
from cer.actors.told import tell, told
from cer.budget import PrefillBudget, reserved_namespaces
from cer.config import CheckpointEntry
from cer.errors import BadRequest, BudgetExceeded, Exhausted, NotFound, Unavailable
from cer.pooled_namespaces import NAMESPACE_TYPES, Namespace, Recipe
from cer.references import CheckpointRef

_MAX_BACKOFF = 60.0
_ADAPT_SECONDS = 5.0
# When a refill runs after the gets and puts that asked for it. Builds compete with gets for the CPUs
# (and the GIL), so a pool that still holds half its target or more waits until gets and puts have
# been quiet for a moment (or at most _REFILL_LONGEST), and builds for all of them at once; a pool
# running low refills almost at once (a restore's ipc, uts and mnt gets are answered first).
_REFILL_DELAY = 0.005
_REFILL_QUIET = 0.05
_REFILL_LONGEST = 1.0
# How long a retired pool with nothing out, but takes off its shelves still to be reported, waits for
# them: longer than a report can take to arrive.
_RETIRE_GRACE = 0.5


class PoolRetired(Unavailable):
    """This pool was retired by a reload; a newer pool may serve the same checkpoint (ask the supervisor)."""


@dataclass(frozen=True)
class PoolPeers:
    """The actors every pool talks to, the timer service, and where pools publish their shelves."""

    factory: pykka.ActorProxy
    extractor: pykka.ActorProxy
    watcher: pykka.ActorProxy
    timers: Timers = field(default_factory=default_timers)
    shelves: "Shelves | None" = None
    budget: PrefillBudget = field(default_factory=PrefillBudget)
    """What every pool's pre-filled IPC namespaces may hold in all (shared, thread-safe)."""
    dispatcher: Dispatcher = field(default_factory=default_dispatcher)
    """The threads the pools run on, shared by all of them."""


@dataclass(frozen=True)
class PoolSettings:
    cold_timeout: float = 10.0
    """The longest a get waits for a namespace built on demand."""
    lease_timeout: float = 300.0
    """A namespace handed out, and neither put nor bound to a process for this long, is reported overdue."""


@dataclass(frozen=True)
class Lease:
    """What a get hands out: the namespace, and whether it had to be built for this get."""

    namespace: Namespace
    cold: bool
    ipc_default: bool | None
    ipc: dict | None = None  # an IPC namespace's contents (Recipe.ipc_info)


@dataclass(frozen=True)
class _Taken:
    """A namespace the frontend took off a shelf, for its pool's books."""

    ns_type: str
    namespace: Namespace
    holder: Holder | None
    at: float


@dataclass(frozen=True)
class _Returned:
    """A namespace from a shelf that its client put back (the frontend answered the put already)."""

    ns_type: str
    namespace_id: int


@dataclass(eq=False, frozen=True)
class _ShelfOwner:
    """The pool behind a shelf: where reports of what was taken go, and who destroys an orphan."""

    events: object  # the pool's ``shelf_events`` proxy method
    factory: pykka.ActorProxy


class Shelf:
    """The idle namespaces of one pool and type, ready to be handed out.

    The pool fills it and takes namespaces back off it; the frontend's router thread takes one for a
    warm get with ``take``. Appends and pops of a deque are atomic, so each namespace leaves the shelf
    once, whichever thread takes it.
    """

    def __init__(self, ns_type: str, owner: _ShelfOwner, shelves: "Shelves", clock) -> None:
        self.ns_type = ns_type
        self.idle: deque[Namespace] = deque()
        self.ipc_default: bool | None = None
        self.ipc: dict | None = None  # what an IPC namespace holds (Recipe.ipc_info), read once per checkpoint
        self.owner = owner
        self._shelves = shelves
        self._clock = clock

    def take(self, holder_pid: int | None = None) -> Lease | None:
        """A warm lease, or None when nothing is idle; NotFound when ``holder_pid`` is not running.

        The pool hears of it at the next ``Shelves.report``.
        """
        if not self.idle:
            return None
        holder = Holder.of(holder_pid)
        try:
            namespace = self.idle.popleft()
        except IndexError:  # the pool or another thread took the last one meanwhile
            if holder is not None:
                holder.close()
            return None
        self._shelves.handed[(self.ns_type, namespace.namespace_id)] = self.owner
        self._shelves.reports.append((self.owner, _Taken(self.ns_type, namespace, holder, self._clock())))
        return Lease(namespace, False, self.ipc_default, self.ipc)


class Shelves:
    """The shelves of every pool, by checkpoint and type, for the frontend's warm gets.

    What is taken off a shelf is reported to its pool by ``report``, which the frontend calls when its
    requests pause, after a batch of replies, and always before it hands a request to a worker: the pool
    hears of a handout after the client has it (the report costs the reply nothing) and before any
    other request about it can reach the pool. A burst of gets makes one message per pool.

    A namespace taken off a shelf is remembered (``handed``) until it goes back: its put (``give_back``)
    is answered at once and reported to its pool in the same ordered stream. The pool forgets it when it
    releases it any other way (its holder exited, a put through the pool), so a put of a namespace that
    is not handed out still goes to the pool and is refused there.
    """

    def __init__(self) -> None:
        self._shelves: dict[tuple[CheckpointRef, str], Shelf] = {}
        self._lock = threading.Lock()
        self.reports: deque[tuple[_ShelfOwner, _Taken | _Returned]] = deque()
        self.handed: dict[tuple[str, int], _ShelfOwner] = {}

    def find(self, ref: CheckpointRef, ns_type: str) -> Shelf | None:
        return self._shelves.get((ref, ns_type))  # a plain dict read: safe without the lock

    def publish(self, ref: CheckpointRef, shelves: dict[str, Shelf]) -> None:
        with self._lock:
            for ns_type, shelf in shelves.items():
                self._shelves[(ref, ns_type)] = shelf

    def withdraw(self, ref: CheckpointRef, shelves: dict[str, Shelf]) -> None:
        """Withdraw these shelves, unless another pool of ``ref`` published its own since."""
        with self._lock:
            for ns_type, shelf in shelves.items():
                if self._shelves.get((ref, ns_type)) is shelf:
                    del self._shelves[(ref, ns_type)]

    def give_back(self, ns_type: str, namespace_id: int) -> bool:
        """Put back a namespace taken off a shelf: True when it will be reported to its pool, False when
        this does not know the namespace (not taken off a shelf, or back already: ask its pool)."""
        owner = self.handed.pop((ns_type, namespace_id), None)
        if owner is None:
            return False
        self.reports.append((owner, _Returned(ns_type, namespace_id)))
        return True

    def forget(self, ns_type: str, namespace_id: int) -> None:
        """The pool released this namespace: a put of it must ask the pool from now on."""
        self.handed.pop((ns_type, namespace_id), None)

    def reported_soon(self, owner: _ShelfOwner) -> bool:
        """Whether takes off ``owner``'s shelves wait to be reported."""
        return any(waiting is owner for waiting, _ in list(self.reports))  # list(): one step under the GIL

    def report(self) -> None:
        """Tell every pool, in order, what was taken off its shelves and put back since the last report."""
        if not self.reports:
            return
        batches: dict[_ShelfOwner, list[_Taken | _Returned]] = {}
        while True:
            try:
                owner, event = self.reports.popleft()
            except IndexError:
                break
            batches.setdefault(owner, []).append(event)
        for owner, batch in batches.items():
            if tell(owner.events, tuple(batch)):
                continue
            # The pool died after publishing: nobody will take these back.
            for event in batch:
                if isinstance(event, _Taken):
                    logger.error("{} namespace {} was handed out by a pool that has stopped", event.ns_type, event.namespace.namespace_id)
                    if event.holder is not None:
                        event.holder.close()
                    tell(owner.factory.destroy, event.namespace)


class _Demand:
    """Gets per second over the last minute. An adaptive pool keeps as many idle as its busiest second
    asked for, so the next burst like it finds them warm, and lets them go once that burst is a minute old."""

    WINDOW = 60.0
    SECOND = 1.0  # the unit of a burst; both are class attributes so a benchmark can scale time

    def __init__(self) -> None:
        self._seconds: deque[list[int]] = deque()  # [second number, gets in it], oldest first

    def record(self, now: float) -> None:
        second = int(now / self.SECOND)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += 1
        else:
            self._seconds.append([second, 1])

    def busiest(self, now: float) -> int:
        while self._seconds and (self._seconds[0][0] + 1) * self.SECOND <= now - self.WINDOW:
            self._seconds.popleft()
        return max((count for _, count in self._seconds), default=0)


@dataclass
class _TypePool:
    shelf: Shelf
    target: int = 0
    demand: _Demand = field(default_factory=_Demand)
    in_use: dict[int, Handout[Namespace]] = field(default_factory=dict)
    building: int = 0
    waiters: deque[Waiter] = field(default_factory=deque)
    warm_gets: int = 0
    cold_gets: int = 0
    failures: int = 0
    last_build_seconds: float | None = None

    @property
    def idle(self) -> deque:
        return self.shelf.idle


class PoolActor(DispatchedActor):
    """The pool of one checkpoint.

    States: loading, unavailable (the checkpoint cannot be had yet), ready, failing (creations fail and
    are retried with backoff), failed (the checkpoint is unusable).
    """

    def __init__(self, entry: CheckpointEntry, peers: PoolPeers, settings: PoolSettings) -> None:
        super().__init__(peers.dispatcher)
        self.entry = entry
        self._factory = peers.factory
        self._extractor = peers.extractor
        self._watcher = peers.watcher
        self._timers = peers.timers
        self._now = peers.timers.now
        self._shelves = peers.shelves
        self._budget = peers.budget
        self._over_budget = False
        self._cold_timeout = settings.cold_timeout
        self._lease_timeout = settings.lease_timeout
        self._capacity = entry.capacity
        self._max_capacity = entry.max_capacity
        self._adapt_timer: Timer | None = None
        self._retired_to: pykka.ActorProxy | None = None
        self._types: dict[str, _TypePool] = {}
        self._recipe: Recipe | None = None
        self._state = "loading"
        self._last_error: str | None = None
        self._backoff = 0.0
        self._retry_timer: Timer | None = None
        self._refill_timer: Timer | None = None
        self._refill_wanted_since: float | None = None
        self._retiring_timer: Timer | None = None

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
        self._leases = Leases(self._self, self._watcher, self._timers)
        self._shelf_owner = _ShelfOwner(self._self.shelf_events, self._factory)
        if self._shelves is None:
            self._shelves = Shelves()  # published nowhere: only the pool's own gets take from its shelves
        self._types = {
            ns_type: _TypePool(Shelf(ns_type, self._shelf_owner, self._shelves, self._now)) for ns_type in NAMESPACE_TYPES
        }
        self._shelves.publish(self.entry.ref, self._shelf_map())
        tell(self._extractor.load_recipe, self.entry, self._self)

    def _shelf_map(self) -> dict[str, Shelf]:
        return {ns_type: pool.shelf for ns_type, pool in self._types.items()}

    def _withdraw_shelves(self) -> None:
        if self._shelves is not None:
            self._shelves.withdraw(self.entry.ref, self._shelf_map())

    # -- the extractor's answer -------------------------------------------------------------------

    @told
    def recipe_loaded(self, recipe: Recipe | None, error: str | None) -> None:
        """The extractor has resolved the checkpoint and read what its namespaces must hold."""
        if recipe is None:
            self._fail_permanently(error or "the checkpoint could not be loaded")
            return
        self._recipe = recipe
        ipc_info = recipe.ipc_info()
        for ns_type, pool in self._types.items():
            pool.shelf.ipc_default = recipe.ipc_default
            pool.shelf.ipc = ipc_info if ns_type == "ipc" else None
        try:
            self._reserve(self._capacity, self._max_capacity)
        except BudgetExceeded as error:
            self._over_budget = True
            self._fail_permanently(str(error))
            return
        self._state = "ready"
        self._last_error = None
        logger.info("pool {}: checkpoint loaded, filling to {}", self.entry.ref, self._capacity)
        self._set_targets()
        self._refill()

    @told
    def checkpoint_unavailable(self, reason: str) -> None:
        """The checkpoint cannot be had yet (e.g. containerd is not there); the extractor retries."""
        self._state = "unavailable"
        self._last_error = reason

    # -- requests -----------------------------------------------------------------------------------

    def get(self, ns_type: str, holder_pid: int | None = None) -> pykka.Future:
        """Hand out a namespace of ``ns_type``: a future of a Lease, already set when one was idle.

        The future is always set within the cold timeout, with a lease or an error. With
        ``holder_pid`` the namespace is bound to that process as it is handed out (see ``bind``).
        """
        self._check_serving(ns_type)
        holder = Holder.of(holder_pid)
        pool = self._types[ns_type]
        self._record_demand(pool, self._now())
        future = pykka.ThreadingFuture()
        try:
            namespace = pool.idle.popleft()
        except IndexError:
            pool.waiters.append(
                self._leases.waiter(future, holder, self._cold_timeout, self._self.expire_waiter.defer, ns_type, future)
            )
            self._refill()  # this one is waited for
        else:
            pool.warm_gets += 1
            future.set(self._hand_out(ns_type, namespace, False, holder))
            self._refill_soon()
        return future

    @told
    def shelf_events(self, batch: tuple[_Taken | _Returned, ...]) -> None:
        """What the frontend took off this pool's shelves for warm gets (Shelf.take), and which of those
        came back by a put it answered (Shelves.give_back), in the order they happened."""
        for event in batch:
            if isinstance(event, _Returned):
                self._put_back(event.ns_type, event.namespace_id)
                continue
            pool = self._types[event.ns_type]
            pool.warm_gets += 1
            self._record_demand(pool, event.at)
            self._lend(event.ns_type, event.namespace, event.holder, event.at)
        self._refill_soon()

    def _record_demand(self, pool: _TypePool, when: float) -> None:
        if self._max_capacity is not None:
            pool.demand.record(when)
            self._set_targets()

    def put(self, ns_type: str, namespace_id: int) -> None:
        """Take back a namespace that was handed out, destroy it and build a fresh one."""
        self._release(ns_type, self._handout(ns_type, namespace_id))

    def _put_back(self, ns_type: str, namespace_id: int) -> None:
        handout = self._types[ns_type].in_use.get(namespace_id)
        if handout is None:
            logger.debug("pool {}: {} namespace {} was put after it came back by itself", self.entry.ref, ns_type, namespace_id)
            return
        self._release(ns_type, handout)

    def bind(self, ns_type: str, namespace_id: int, holder_pid: int) -> None:
        """Tie a handed-out namespace to a process: when it exits, the namespace comes back by itself.

        Binding again moves it to another process (a restore wrapper binds to itself, then to the
        restored container's init).
        """
        self._leases.bind(self._handout(ns_type, namespace_id), Holder.of(holder_pid))

    @told
    def holder_exited(self, key: tuple[str, int], pid: int) -> None:
        """The process a namespace was bound to has exited (from the process watcher)."""
        ns_type, namespace_id = key
        handout = self._types[ns_type].in_use.get(namespace_id)
        if self._leases.bound_to(handout, pid):
            logger.info("pool {}: {} namespace {} released: its holder {} exited", self.entry.ref, ns_type, namespace_id, pid)
            self._release(ns_type, handout)

    def _handout(self, ns_type: str, namespace_id: int) -> Handout[Namespace]:
        handout = self._types[ns_type].in_use.get(namespace_id)
        if handout is None:
            raise NotFound(f"{ns_type} namespace {namespace_id} of {self.entry.ref} is not handed out")
        return handout

    def _release(self, ns_type: str, handout: Handout[Namespace]) -> None:
        del self._types[ns_type].in_use[handout.item.namespace_id]
        self._shelves.forget(ns_type, handout.item.namespace_id)
        self._leases.release(handout)
        tell(self._factory.destroy, handout.item)
        self._refill_soon()
        self._stop_when_retired()

    @told
    def set_capacity(self, capacity: int, max_capacity: int | None | object = ...) -> None:
        """Set how many idle namespaces each type keeps (the floor, for an adaptive pool) and, when given,
        the adaptive ceiling (None: a fixed pool); shrinking destroys idle namespaces at once. Raises
        BudgetExceeded, changing nothing, when the pool would pass the daemon's pre-fill budget."""
        ceiling = self._max_capacity if max_capacity is ... else max_capacity
        self._reserve(capacity, ceiling)
        if self._over_budget:
            self._over_budget = False
            self._state, self._last_error = "ready", None
        self._capacity = capacity
        if max_capacity is not ...:
            self._max_capacity = max_capacity
        self._set_targets()
        self._refill()

    @told
    def retire(self, supervisor: pykka.ActorProxy) -> None:
        """Stop serving: a reload removed or replaced this pool's entry. Idle namespaces and waiting gets
        go now; namespaces handed out stay, for running containers use them, until their put or their
        holder's exit; then the pool stops itself and tells ``supervisor.pool_retired``."""
        self._withdraw_shelves()
        self._retired_to = supervisor
        self._budget.release(self.actor_urn)
        self._state, self._last_error = "retired", "its entry was removed or replaced by a configuration reload"
        self._capacity, self._max_capacity = 0, None
        self._cancel_timers()
        for pool in self._types.values():
            while pool.waiters:
                pool.waiters.popleft().fail(Unavailable(f"checkpoint {self.entry.ref} {self._last_error}"))
        self._set_targets()
        self._stop_when_retired()

    def _stop_when_retired(self) -> None:
        if self._retired_to is None or self._retiring_timer is not None or self._busy():
            return
        if self._shelves.reported_soon(self._shelf_owner):
            # A warm get took a namespace off a shelf before it was withdrawn; its report is at most a
            # moment away (see Shelves.report): wait for it, and for that namespace to come back.
            self._retiring_timer = self._timers.call_later(_RETIRE_GRACE, self._self.finish_retiring.defer)
            return
        self.finish_retiring()

    def _busy(self) -> bool:
        return any(pool.in_use or pool.building for pool in self._types.values())

    @told
    def finish_retiring(self) -> None:
        """A retired pool with nothing out stops, and tells the supervisor."""
        self._retiring_timer = None
        if self._busy():
            return  # a late report: wait for that namespace to come back too
        tell(self._retired_to.pool_retired, self.entry.ref, self.actor_ref.actor_urn)
        self.actor_ref.stop(block=False)

    @told
    def adapt(self) -> None:
        """Let an adaptive pool's targets follow demand down when nobody asks (from its timer)."""
        self._adapt_timer = None
        self._set_targets()
        self._refill()

    @told
    def refill_now(self) -> None:
        """Build what the pool lacks (from the timer service, a moment after gets and puts)."""
        self._refill_timer = self._refill_wanted_since = None
        self._refill()

    def _refill_soon(self) -> None:
        # One refill for the gets and puts of a burst, after it (see _REFILL_QUIET).
        now = self._now()
        if self._refill_wanted_since is None:
            self._refill_wanted_since = now
        low = any(len(pool.idle) + pool.building < (pool.target + 1) // 2 for pool in self._types.values())
        due = min(now + (_REFILL_DELAY if low else _REFILL_QUIET), self._refill_wanted_since + _REFILL_LONGEST)
        if self._refill_timer is not None:
            # Moved only when it is due much too soon or too late: each move may wake the timer thread.
            if due - _REFILL_QUIET / 2 <= self._refill_timer.due <= due:
                return
            self._refill_timer.cancel()
        self._refill_timer = self._timers.call_later(due - now, self._self.refill_now.defer)

    def _set_targets(self) -> None:
        now = self._now()
        for pool in self._types.values():
            pool.target = self._capacity
            if self._max_capacity is not None:
                pool.target = min(max(pool.demand.busiest(now), self._capacity), self._max_capacity)
            self._destroy_idle(pool, pool.target)
        if self._max_capacity is not None and self._adapt_timer is None and self.actor_ref.is_alive():
            self._adapt_timer = self._timers.call_later(_ADAPT_SECONDS, self._self.adapt.defer)

    def _destroy_idle(self, pool: _TypePool, keep: int) -> None:
        while len(pool.idle) > keep:
            try:
                namespace = pool.idle.pop()  # the newest; the frontend takes from the other end
            except IndexError:
                return  # the frontend took the last ones meanwhile
            tell(self._factory.destroy, namespace)

    def _cancel_timers(self) -> None:
        for timer in (self._retry_timer, self._adapt_timer, self._refill_timer, self._retiring_timer):
            if timer is not None:
                timer.cancel()
        self._retry_timer = self._adapt_timer = self._refill_timer = self._retiring_timer = None

    def ipc_default(self) -> bool | None:
        """Whether this checkpoint's IPC namespace is default (None until the checkpoint is loaded)."""
        return None if self._recipe is None else self._recipe.ipc_default

    def status(self) -> dict:
        now = self._now()
        return {
            "ref": self.entry.ref.to_wire(),
            "source": self.entry.path or "containerd",
            "state": self._state,
            "last_error": self._last_error,
            "capacity": self._capacity,
            "max_capacity": self._max_capacity,
            "ipc_default": self.ipc_default(),
            "ipc_prefill_bytes": None if self._recipe is None or self._recipe.ipc is None else self._recipe.ipc.prefill_bytes,
            "types": {
                ns_type: {
                    "supported": self._recipe is None or self._recipe.supports(ns_type),
                    "target": pool.target,
                    "idle": len(pool.idle),
                    "in_use": len(pool.in_use),
                    "bound": sum(handout.holder_pid is not None for handout in pool.in_use.values()),
                    "overdue": sum(handout.overdue(now, self._lease_timeout) for handout in pool.in_use.values()),
                    "building": pool.building,
                    "waiting": len(pool.waiters),
                    "warm_gets": pool.warm_gets,
                    "cold_gets": pool.cold_gets,
                    "failures": pool.failures,
                    "last_build_seconds": pool.last_build_seconds,
                }
                for ns_type, pool in self._types.items()
            },
        }

    # -- the factory's answers ----------------------------------------------------------------------

    @told
    def namespace_created(
        self, ns_type: str, namespace: Namespace | None, error: BaseException | None, seconds: float
    ) -> None:
        pool = self._types[ns_type]
        pool.building -= 1
        if namespace is None:
            self._creation_failed(ns_type, error)
            return
        pool.last_build_seconds = seconds
        self._backoff = 0.0
        if self._state == "failing":
            self._state, self._last_error = "ready", None
        if pool.waiters:
            waiter = pool.waiters.popleft()
            pool.cold_gets += 1
            waiter.answer(self._hand_out(ns_type, namespace, True, waiter.holder))
        elif len(pool.idle) < pool.target:
            pool.idle.append(namespace)
        else:
            tell(self._factory.destroy, namespace)
        self._refill()
        self._stop_when_retired()

    def _creation_failed(self, ns_type: str, error: BaseException | None) -> None:
        pool = self._types[ns_type]
        pool.failures += 1
        message = f"creating a {ns_type} namespace failed: {error}"
        logger.error("pool {}: {}", self.entry.ref, message)
        self._state, self._last_error = "failing", message
        # Whoever waits for this type would wait for the same failure: answer them now.
        while pool.waiters:
            pool.waiters.popleft().fail(Exhausted(message))
        if self._retry_timer is None:
            # Once per retry round, not per failed build: a full pool fails many builds at once.
            self._backoff = min(max(self._backoff * 2, 0.5), _MAX_BACKOFF)
            self._retry_timer = self._timers.call_later(self._backoff, self._self.retry_refill.defer)

    @told
    def retry_refill(self) -> None:
        self._retry_timer = None
        self._refill()

    @told
    def expire_waiter(self, ns_type: str, future: pykka.Future) -> None:
        pool = self._types[ns_type]
        for waiter in pool.waiters:
            if waiter.future is future:
                pool.waiters.remove(waiter)
                waiter.fail(Exhausted(f"no {ns_type} namespace of {self.entry.ref} was ready within {self._cold_timeout:g} s"))
                return

    # -- internals ----------------------------------------------------------------------------------

    def _check_serving(self, ns_type: str) -> None:
        if self._state == "retired":
            raise PoolRetired(f"checkpoint {self.entry.ref}: this pool {self._last_error}")
        if self._state in ("loading", "unavailable"):
            raise Unavailable(f"checkpoint {self.entry.ref} is not ready: {self._last_error or 'loading'}")
        if self._state == "failed":
            raise Unavailable(f"checkpoint {self.entry.ref} is unusable: {self._last_error}")
        if not self._recipe.supports(ns_type):
            # Asking again will not help: that is the request's problem, not the daemon's.
            why = "its entry has no rootfs" if self.entry.path else "containerd gave it no root filesystem"
            raise BadRequest(f"checkpoint {self.entry.ref} has no mnt namespaces: {why}")

    def _hand_out(self, ns_type: str, namespace: Namespace, cold: bool, holder: Holder | None) -> Lease:
        self._lend(ns_type, namespace, holder)
        return Lease(namespace, cold, self._recipe.ipc_default, self._types[ns_type].shelf.ipc)

    def _lend(self, ns_type: str, namespace: Namespace, holder: Holder | None, since: float | None = None) -> None:
        """Count ``namespace`` as handed out (since ``since``: a warm get's take, reported later)."""
        self._types[ns_type].in_use[namespace.namespace_id] = self._leases.hand_out(
            namespace, (ns_type, namespace.namespace_id), holder, since
        )

    def _refill(self) -> None:
        if self._recipe is None or self._retry_timer is not None or self._retired_to is not None or self._over_budget:
            return
        for ns_type, pool in self._types.items():
            if not self._recipe.supports(ns_type):
                continue
            missing = pool.target + len(pool.waiters) - len(pool.idle) - pool.building
            for _ in range(missing):
                pool.building += 1
                tell(self._factory.create, ns_type, self._recipe, self._self)

    def _reserve(self, capacity: int, max_capacity: int | None) -> None:
        """Reserve in the daemon's budget what this pool's IPC namespaces pre-fill at most (none before the
        checkpoint is read)."""
        if self._recipe is None or self._recipe.ipc is None:
            return
        self._budget.reserve(self.actor_urn, f"checkpoint {self.entry.ref}", self._recipe.ipc.prefill_bytes,
                             reserved_namespaces(capacity, max_capacity))

    def _fail_permanently(self, message: str) -> None:
        logger.error("pool {}: {}", self.entry.ref, message)
        self._state, self._last_error = "failed", message

    def on_stop(self) -> None:
        self._release_all()

    def on_failure(self, *exc_info: object) -> None:
        self._release_all()

    def _release_all(self) -> None:
        self._budget.release(self.actor_urn)
        self._withdraw_shelves()
        self._cancel_timers()
        for ns_type, pool in self._types.items():
            for waiter in pool.waiters:
                waiter.fail(Unavailable("the daemon is stopping"))
            for handout in pool.in_use.values():
                logger.warning(
                    "pool {}: {} namespace {} was still handed out at shutdown", self.entry.ref, ns_type, handout.item.namespace_id
                )
            self._destroy_idle(pool, 0)
            for handout in pool.in_use.values():
                self._shelves.forget(ns_type, handout.item.namespace_id)
                tell(self._factory.destroy, handout.item)  # a factory already stopped destroyed all it held
            pool.in_use.clear()
