"""The supervisor: starts one pool actor per configured checkpoint and keeps the map of them.

A pool whose checkpoint is broken stays up and reports its error; a pool actor that died is started
again on the next request that needs it, so one checkpoint never takes the others down.
"""

import time
from dataclasses import dataclass, replace

import pykka
from loguru import logger

from cer.actors.pool import PoolActor, PoolPeers, PoolSettings
from cer.actors.told import tell, told
from cer.budget import reserved_namespaces
from cer.config import CheckpointEntry, Config
from cer.errors import Exhausted, NotFound
from cer.references import CheckpointRef

MAX_RUNTIME_POOLS = 16
"""Pools ``namespace.update`` may create for refs the configuration does not name. A quota of their own:
however many a client makes, the configuration's pools (bounded by the file, cer.config.MAX_POOLS) are
never refused for them."""


@dataclass(frozen=True)
class PoolStatuses:
    """Every pool's status, asked of all pools at once; collected by the caller, never in an actor."""

    crashed: tuple[dict, ...]
    asked: tuple[tuple[CheckpointRef, pykka.Future], ...]

    def collect(self, timeout: float) -> list[dict]:
        """The statuses, sorted by checkpoint; a pool that does not answer within ``timeout`` (for all of
        them together) is reported "unresponsive"."""
        end = time.monotonic() + timeout
        result = list(self.crashed)
        for ref, future in self.asked:
            try:
                result.append(future.get(timeout=max(0.0, end - time.monotonic())))
            except (pykka.Timeout, pykka.ActorDeadError) as error:
                result.append({"ref": ref.to_wire(), "state": "unresponsive", "last_error": repr(error)})
        return sorted(result, key=lambda pool: (pool["ref"]["labels"]["namespace"], pool["ref"]["name"]))


class Supervisor(pykka.ThreadingActor):
    def __init__(self, config: Config, peers: PoolPeers, settings: PoolSettings) -> None:
        super().__init__()
        self._config = config
        self._peers = peers
        self._settings = settings
        self._pools: dict[CheckpointRef, pykka.ActorRef] = {}
        self._entries: dict[CheckpointRef, CheckpointEntry] = {}
        # Pools a reload removed or replaced, kept until the namespaces they handed out come back.
        self._retired: dict[str, tuple[CheckpointRef, pykka.ActorRef]] = {}

    def on_start(self) -> None:
        for entry in self._config.checkpoints:
            self._start_pool(entry)

    def pool(self, ref: CheckpointRef) -> pykka.ActorProxy:
        """The pool of ``ref``, started again if its actor died."""
        actor = self._pools.get(ref)
        if actor is None:
            raise NotFound(f"no pool for checkpoint {ref}")
        if not actor.is_alive():
            logger.error("pool {} had died; starting it again", ref)
            actor = self._start_pool(self._entries[ref])
        return actor.proxy()

    def update(self, ref: CheckpointRef, capacity: int) -> bool:
        """Resize the pool of ``ref``, or create it (a containerd checkpoint); True when created."""
        entry = replace(self._entries.get(ref) or CheckpointEntry(ref=ref, capacity=capacity), capacity=capacity)
        actor = self._pools.get(ref)
        if actor is not None and actor.is_alive():
            # The budget refuses here, in the reply, what the pool could only refuse after it (changing nothing);
            # the resize itself is told, not waited for: the pool's next message sees the new capacity.
            self._reserve_budget(actor, entry)
            self._entries[ref] = entry
            tell(actor.proxy().set_capacity, capacity)
            return False
        if actor is None:
            configured = {entry.ref for entry in self._config.checkpoints}
            created = [other for other in self._pools if other not in configured]
            if len(created) >= MAX_RUNTIME_POOLS:
                raise Exhausted(
                    f"{len(created)} pools were created by namespace.update for checkpoints the configuration does "
                    f"not name, the most: {ref} is not added (name it in {self._config.path} and reload)"
                )
        self._start_pool(entry)
        return actor is None

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply a new configuration: start, stop, resize or restart only the pools whose entries changed.

        Pools created at run time by ``namespace.update`` are left alone unless the new configuration
        names them; a configured entry that did not change keeps its pool as it is (capacity included).
        """
        before = {entry.ref: entry for entry in self._config.checkpoints}
        after = {entry.ref: entry for entry in config.checkpoints}
        summary: dict[str, list[str]] = {"added": [], "removed": [], "resized": [], "restarted": []}
        for ref in before.keys() - after.keys():
            self._retire_pool(ref)
            summary["removed"].append(str(ref))
        for ref, entry in after.items():
            current = self._entries.get(ref)
            if before.get(ref) == entry:
                continue
            if current is None:
                self._start_pool(entry)
                summary["added"].append(str(ref))
            elif replace(current, capacity=entry.capacity, max_capacity=entry.max_capacity) == entry and self._pools[ref].is_alive():
                if (current.capacity, current.max_capacity) != (entry.capacity, entry.max_capacity):
                    self._reserve_budget(self._pools[ref], entry)
                    self._entries[ref] = entry
                    tell(self._pools[ref].proxy().set_capacity, entry.capacity, entry.max_capacity)
                    summary["resized"].append(str(ref))
            else:
                self._retire_pool(ref)
                self._start_pool(entry)
                summary["restarted"].append(str(ref))
        self._config = config
        logger.info("configuration reloaded from {}: {}", config.path, {k: v for k, v in summary.items() if v} or "no change")
        return summary

    def pool_statuses(self) -> PoolStatuses:
        """Every pool's status, asked now and collected by the caller (``PoolStatuses.collect``)."""
        retired = [(ref, actor) for ref, actor in self._retired.values() if actor.is_alive()]
        crashed = tuple(
            {"ref": ref.to_wire(), "state": "crashed", "last_error": "the pool actor died"}
            for ref, actor in self._pools.items()
            if not actor.is_alive()
        )
        asked = tuple((ref, actor.proxy().status()) for ref, actor in [*self._pools.items(), *retired] if actor.is_alive())
        return PoolStatuses(crashed, asked)

    def _reserve_budget(self, actor: pykka.ActorRef, entry: CheckpointEntry) -> None:
        """Hold ``entry``'s new size to the pre-fill budget at the cost its pool reserved at (a lock, no wait):
        BudgetExceeded, changing nothing, when it would pass."""
        self._peers.budget.resize(actor.actor_urn, reserved_namespaces(entry.capacity, entry.max_capacity))

    def _start_pool(self, entry: CheckpointEntry) -> pykka.ActorRef:
        self._entries[entry.ref] = entry
        actor = PoolActor.start(entry, self._peers, self._settings)
        self._pools[entry.ref] = actor
        return actor

    def _retire_pool(self, ref: CheckpointRef) -> None:
        actor = self._pools.pop(ref)
        del self._entries[ref]
        self._retired[actor.actor_urn] = (ref, actor)
        tell(actor.proxy().retire, self.actor_ref.proxy())

    @told
    def pool_retired(self, ref: CheckpointRef, urn: str) -> None:
        """A retired pool has every namespace back and stopped; its checkpoint goes unless served again."""
        self._retired.pop(urn, None)
        if ref not in self._pools and not any(other == ref for other, _ in self._retired.values()):
            tell(self._peers.extractor.release, ref)

    def on_stop(self) -> None:
        # Pools hand their namespaces to the factory to destroy, so they stop before it does.
        for actor in [*self._pools.values(), *(actor for _, actor in self._retired.values())]:
            actor.stop(block=True, timeout=30)
