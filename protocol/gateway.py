"""How requests reach the actors: one deadline per request, and pools are found by reference.

Request handlers run in the frontends' threads and call this; it is no actor and never runs in one, which
is why it sits with the frontends in the protocol package rather than among the actors. Each request
gets one :class:`Deadline`; every wait on its way (the supervisor, then a pool, ...) gets what is left
of it, never more, so the actors' own time limits (a pool's cold timeout) are the first to fire and an
"unavailable" answer says where the time went. A warm get does not ask any actor: ``take_warm`` takes
a namespace off the pool's published shelf (see cer.actors.pool.Shelf).
"""

import os
import threading
import time
from typing import TYPE_CHECKING

import pykka
from loguru import logger

from cer import __version__
from cer.actors.leases import Holder
from cer.actors.pool import Lease, PoolPeers, PoolRetired
from cer.actors.told import MESSAGE_FAILURES
from cer.config import load_config
from cer.errors import CerError, NotFound, Unavailable
from cer.references import CheckpointRef
from cer.restore_mounts import criu_config_lines

if TYPE_CHECKING:
    from cer.actors.lazy import LazyServer


class Deadline:
    """The time one request may take, shared by every wait on its way down."""

    def __init__(self, seconds: float, clock=time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._start = clock()

    def left(self) -> float:
        return max(0.0, self._start + self.seconds - self._clock())

    def spent(self) -> float:
        return self._clock() - self._start

    def wait(self, future: pykka.Future, who: str):
        """``future``'s value, within what is left; Unavailable naming ``who`` when the time runs out."""
        try:
            return future.get(timeout=self.left())
        except pykka.Timeout:
            raise Unavailable(
                f"{who} did not answer: the request's {self.seconds:g} s ran out after {self.spent():.2f} s"
            ) from None
        except pykka.ActorDeadError:
            raise Unavailable(f"{who} has stopped") from None


class Gateway:
    def __init__(
        self,
        supervisor: pykka.ActorProxy,
        peers: PoolPeers,
        ask_timeout: float = 5.0,
        cold_timeout: float = 10.0,
        config_path: str | None = None,
        lazy: pykka.ActorProxy | None = None,
        lazy_ready_timeout: float = 10.0,
        mounts_script: str | None = None,
    ) -> None:
        """``mounts_script``: the CRIU action script that completes the mounts of a restore into a pooled mount
        namespace (cer.restore_mounts), named in the CRIU configuration of such restores."""
        self._supervisor = supervisor
        self._mounts_script = mounts_script
        self._lazy = lazy
        self._lazy_ready_timeout = lazy_ready_timeout
        self._config_path = config_path
        self._factory = peers.factory
        self._extractor = peers.extractor
        self._watcher = peers.watcher
        self._ask_timeout = ask_timeout
        self._cold_timeout = cold_timeout
        # Asking the supervisor for the pool on every request would double the hops of a get; a pool
        # proxy stays valid for the actor's life, and a dead one is looked up again.
        self._pools: dict[CheckpointRef, pykka.ActorProxy] = {}
        self._shelves = peers.shelves
        self.pid = os.getpid()
        self._started = time.monotonic()

    def take_warm(self, ns_type: str, ref: CheckpointRef, holder_pid: int | None = None) -> Lease | None:
        """A namespace off the pool's shelf, without asking any actor; None when none is idle there."""
        shelf = self._shelves.find(ref, ns_type) if self._shelves is not None else None
        return shelf.take(holder_pid) if shelf is not None else None

    def after_replies(self) -> None:
        """The frontend sent the replies of ``take_warm``: tell the pools what was taken (Shelves.report)."""
        if self._shelves is not None:
            self._shelves.report()

    def get_namespace(self, ns_type: str, ref: CheckpointRef, holder_pid: int | None = None) -> Lease:
        asked: list[pykka.Future] = []

        def get(pool: pykka.ActorProxy) -> pykka.Future:
            asked.append(pool.get(ns_type, holder_pid))
            return asked[-1]

        # The pool answers a cold get within its cold timeout; the margin covers a busy machine.
        deadline = Deadline(self._cold_timeout + self._ask_timeout)
        try:
            pending = self._ask_pool(ref, get, deadline)
            return deadline.wait(pending, f"the {ns_type} pool of {ref}")
        except Unavailable:
            if asked:
                # Should the pool still hand a namespace out after we gave up, nobody would hold it.
                threading.Thread(target=self._give_back_late, args=(ns_type, asked[-1]), daemon=True).start()
            raise

    def _give_back_late(self, ns_type: str, asked: pykka.Future) -> None:
        late = 2 * (self._cold_timeout + self._ask_timeout)
        try:
            answer = asked.get(timeout=late)
            lease = answer.get(timeout=late) if isinstance(answer, pykka.Future) else answer
        except Exception:  # noqa: BLE001 - the get failed after all: nothing was handed out
            return
        logger.warning("{} namespace {} was handed out after its get gave up; putting it back", ns_type, lease.namespace.namespace_id)
        try:
            self.put_namespace(ns_type, lease.namespace.namespace_id)
        except CerError as error:
            logger.error("putting back {} namespace {} failed: {}", ns_type, lease.namespace.namespace_id, error)

    def put_warm(self, ns_type: str, namespace_id: int) -> bool:
        """Put back a namespace ``take_warm`` handed out, without waiting; False when it did not (ask its pool)."""
        return self._shelves is not None and self._shelves.give_back(ns_type, namespace_id)

    def put_namespace(self, ns_type: str, namespace_id: int) -> None:
        """Return a namespace to its pool, which destroys it."""
        deadline = Deadline(self._ask_timeout)
        deadline.wait(self._owner(ns_type, namespace_id, deadline).put(ns_type, namespace_id), "the pool")

    def bind_namespace(self, ns_type: str, namespace_id: int, holder_pid: int) -> None:
        """Release the namespace by itself when process ``holder_pid`` exits."""
        deadline = Deadline(self._ask_timeout)
        deadline.wait(self._owner(ns_type, namespace_id, deadline).bind(ns_type, namespace_id, holder_pid), "the pool")

    def _owner(self, ns_type: str, namespace_id: int, deadline: Deadline) -> pykka.ActorProxy:
        owner = deadline.wait(self._factory.owner(ns_type, namespace_id), "the namespace factory")
        if owner is None:
            raise NotFound(f"{ns_type} namespace {namespace_id} is not handed out by this daemon")
        return owner

    def ipc_default(self, ref: CheckpointRef) -> bool | None:
        return self._ask_pool(ref, lambda pool: pool.ipc_default(), Deadline(self._ask_timeout))

    def update(self, ref: CheckpointRef, capacity: int) -> bool:
        return self._wait(self._supervisor.update(ref, capacity), "the supervisor")

    def reload(self) -> dict[str, list[str]]:
        """Read the configuration file again and apply it; a bad file changes nothing (ConfigError)."""
        if self._config_path is None:
            raise Unavailable("this daemon has no configuration file to reload")
        config = load_config(self._config_path)
        return self._wait(self._supervisor.reload(config), "the supervisor", 6 * self._ask_timeout)

    def get_checkpoint(self, ref: CheckpointRef) -> str:
        return self._wait(self._extractor.get(ref), "the checkpoint extractor")

    def get_view(self, ref: CheckpointRef, kinds: tuple[str, ...]) -> str:
        """``ref``'s image view for ``kinds`` (see cer.criu.views), made on first use; counts a user."""
        pending = self._wait(self._extractor.get_view(ref, kinds), "the checkpoint extractor")
        return self._wait(pending, f"the {'+'.join(kinds)} view of {ref}", self._cold_timeout + self._ask_timeout)

    def find_checkpoint(self, images_digest: str) -> CheckpointRef:
        return self._wait(self._extractor.find(images_digest), "the checkpoint extractor")

    def prepare_restore(self, ref: CheckpointRef, ns_types: tuple[str, ...], view: tuple[str, ...],
                        holder_pid: int) -> tuple[str, dict[str, Lease]]:
        """Everything one restore of ``ref`` takes from cer: the images (its view for ``view``) and a
        namespace of each of ``ns_types`` bound to ``holder_pid``. All or nothing: what was taken before a
        failure is given back."""
        images = self.get_view(ref, view)
        leases: dict[str, Lease] = {}
        try:
            for ns_type in ns_types:
                leases[ns_type] = self.get_namespace(ns_type, ref, holder_pid)
            # The images' user goes with the holder too: a client killed before its checkpoint.put leaves none.
            holder = Holder.of(holder_pid)
            self._wait(self._extractor.bind_user(ref, holder, self._watcher), "the checkpoint extractor")
        except BaseException:
            for ns_type, lease in leases.items():
                try:
                    self.put_namespace(ns_type, lease.namespace.namespace_id)
                except CerError as error:
                    logger.error("giving back {} namespace {} of a failed restore: {}", ns_type, lease.namespace.namespace_id, error)
            try:
                self.put_checkpoint(ref)
            except CerError as error:
                logger.error("releasing checkpoint {} of a failed restore: {}", ref, error)
            raise
        return images, leases

    def criu_config(self, ns_types: tuple[str, ...]) -> list[str]:
        """The CRIU options a restore joining ``ns_types`` needs beside the images: for a mount namespace, the
        action script that completes its mounts."""
        if "mnt" not in ns_types or self._mounts_script is None:
            return []
        return criu_config_lines(self._mounts_script)

    def put_checkpoint(self, ref: CheckpointRef) -> int:
        return self._wait(self._extractor.put(ref), "the checkpoint extractor")

    def lazy_server(self, ref: CheckpointRef, holder_pid: int | None = None) -> "LazyServer":
        """A ready lazy-pages server for one lazy restore of ``ref``."""
        deadline = Deadline(self._lazy_ready_timeout + self._ask_timeout)
        pending = deadline.wait(self._lazy_servers().get(ref, holder_pid), "the lazy-pages servers")
        return deadline.wait(pending, f"a lazy-pages server for {ref}")

    def bind_lazy_server(self, server_id: str, restored_pid: int) -> str:
        deadline = Deadline(self._ask_timeout)
        pending = deadline.wait(self._lazy_servers().bind(server_id, restored_pid), "the lazy-pages servers")
        return deadline.wait(pending, f"the bind of lazy-pages server {server_id}")

    def put_lazy_server(self, server_id: str) -> str:
        return self._wait(self._lazy_servers().put(server_id), "the lazy-pages servers")

    def forget_working_set(self, ref: CheckpointRef) -> bool:
        return self._wait(self._lazy_servers().forget_working_set(ref), "the lazy-pages servers")

    def _lazy_servers(self) -> pykka.ActorProxy:
        if self._lazy is None:
            raise Unavailable("this daemon serves no lazy restores")
        return self._lazy

    def status(self, timeout: float | None = None) -> dict:
        # Every actor is asked at once; the answers share one deadline.
        deadline = Deadline(timeout or 3 * self._ask_timeout)
        pools = self._supervisor.pool_statuses()
        factory = self._factory.status()
        checkpoints = self._extractor.status()
        watching = self._watcher.watching()
        lazy = self._lazy.status() if self._lazy is not None else None
        return {
            "version": __version__,
            "pid": self.pid,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "pools": deadline.wait(pools, "the supervisor").collect(deadline.left()),
            "factory": deadline.wait(factory, "the namespace factory"),
            "checkpoints": deadline.wait(checkpoints, "the checkpoint extractor"),
            "watched_holders": deadline.wait(watching, "the process watcher"),
            "lazy": deadline.wait(deadline.wait(lazy, "the lazy-pages servers"), "the lazy-pages servers' status")
            if lazy is not None else None,
            "message_failures": MESSAGE_FAILURES.snapshot(),
        }

    def check_started(self, timeout: float) -> None:
        """Raise Unavailable unless every actor, every pool included, answers within ``timeout``."""
        status = self.status(timeout)
        silent = [pool["ref"]["name"] for pool in status["pools"] if pool["state"] in ("crashed", "unresponsive")]
        if silent:
            raise Unavailable(f"pools that did not start: {', '.join(silent)}")

    def _ask_pool(self, ref: CheckpointRef, call, deadline: Deadline):
        for _attempt in range(2):
            pool = self._pools.get(ref)
            if pool is None:
                pool = self._pools[ref] = deadline.wait(self._supervisor.pool(ref), "the supervisor")
            try:
                return call(pool).get(timeout=min(deadline.left(), self._ask_timeout))
            except (pykka.ActorDeadError, PoolRetired):
                self._pools.pop(ref, None)  # a reload or a restart put another pool in its place
            except pykka.Timeout:
                raise Unavailable(f"the pool of {ref} did not answer within {min(deadline.seconds, self._ask_timeout):g} s") from None
        raise Unavailable(f"the pool of {ref} keeps dying")

    def _wait(self, future: pykka.Future, who: str, timeout: float | None = None):
        return Deadline(timeout or self._ask_timeout).wait(future, who)
