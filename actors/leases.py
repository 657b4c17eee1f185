"""Leases: what an actor hands out, to which process, and until when; shared by the pools (namespaces)
and the lazy-pages servers.

A request may name a *holder*, a process the thing handed out belongs to: a :class:`Holder` carries a
pidfd on it, which the process watcher (cer.actors.watcher) takes over once the lease is bound, and the
watcher tells the owning actor ``holder_exited(key, pid)`` when that process exits: the actor then
releases what it was holding (:meth:`Leases.bound_to` says whether the exit still counts: a lease moved to
another process, or released, ignores it). A request that cannot be answered at once is a :class:`Waiter`,
failed by its deadline at the latest. A lease that nobody bound for too long is *overdue* (reported), one
given an expiry is told to its actor when due (``expire_after``). All timing goes through the daemon's
timer service (cer.actors.timers), so tests move time with a manual clock.

Everything here runs in the owning actor's thread, except :meth:`Holder.of`, which the frontend also calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import pykka

from cer.actors.timers import Timer, Timers
from cer.actors.told import tell
from cer.errors import NotFound
from cer.linux.processes import pidfd_open

T = TypeVar("T")


@dataclass(frozen=True)
class Holder:
    """The process a lease is to be bound to, with a pidfd on it that the watcher will own."""

    pid: int
    pidfd: int

    @classmethod
    def of(cls, pid: int | None) -> Holder | None:
        """A holder for ``pid`` (None for None); NotFound when no such process runs."""
        if pid is None:
            return None
        try:
            return cls(pid, pidfd_open(pid))
        except ProcessLookupError:
            raise NotFound(f"process {pid} is not running") from None

    def close(self) -> None:
        """Give up the pidfd: the lease was never bound."""
        os.close(self.pidfd)


@dataclass(eq=False)
class Waiter:
    """A request waiting for something to hand out; answered once, with a lease or an error."""

    future: pykka.Future
    holder: Holder | None
    timer: Timer | None = None
    """Its deadline (None: another deadline, e.g. of what it waits for, answers it in time)."""

    def answer(self, value: object) -> None:
        """The holder goes with ``value`` (the caller binds it, ``Leases.hand_out``)."""
        if self.timer is not None:
            self.timer.cancel()
        self.future.set(value)

    def fail(self, error: Exception) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.holder is not None:
            self.holder.close()
        self.future.set_exception(exc_info=(type(error), error, None))


@dataclass(eq=False)
class Handout(Generic[T]):
    """One thing handed out: since when, to which holder (once bound), until when (with an expiry)."""

    item: T
    key: Hashable
    """What the watcher reports the holder's exit under."""
    since: float
    holder_pid: int | None = None
    expires: float | None = None
    timer: Timer | None = None

    def overdue(self, now: float, limit: float) -> bool:
        """Neither given back nor bound to a process ``limit`` seconds after it was handed out."""
        return self.holder_pid is None and now - self.since > limit


class Leases:
    """The lease book of one actor: binds holders through the process watcher and times waiters and
    expiries on the timer service. The actor keeps its handouts where it likes; this keeps them right."""

    def __init__(self, owner: pykka.ActorProxy, watcher: pykka.ActorProxy, timers: Timers) -> None:
        self._owner = owner
        self._watcher = watcher
        self._timers = timers
        self.now = timers.now

    def waiter(self, future: pykka.Future, holder: Holder | None, timeout: float | None = None,
               on_timeout: Callable | None = None, *args: object) -> Waiter:
        """A waiting request; with ``timeout``, ``on_timeout(*args)`` (a tell into the actor) is called when
        it is due, and should fail the waiter if it still waits."""
        timer = self._timers.call_later(timeout, on_timeout, *args) if timeout is not None else None
        return Waiter(future, holder, timer)

    def hand_out(self, item: T, key: Hashable, holder: Holder | None, since: float | None = None) -> Handout[T]:
        """A new lease of ``item``, bound to ``holder`` when there is one (``since``: when it was taken, if
        not now)."""
        handout = Handout(item, key, self.now() if since is None else since)
        if holder is not None:
            self.bind(handout, holder)
        return handout

    def bind(self, handout: Handout, holder: Holder) -> None:
        """Tie ``handout`` to ``holder`` (its pidfd is the watcher's from now on); binding again moves it."""
        handout.holder_pid = holder.pid
        if not tell(self._watcher.watch, holder.pidfd, holder.pid, self._owner, handout.key):
            holder.close()  # the daemon is stopping: its actors release everything anyway

    def unbind(self, handout: Handout) -> None:
        """Stop watching the holder: its exit no longer releases the lease."""
        if handout.holder_pid is not None:
            tell(self._watcher.unwatch, handout.key)
            handout.holder_pid = None

    @staticmethod
    def bound_to(handout: Handout | None, pid: int) -> bool:
        """Whether ``handout`` is still bound to process ``pid``, whose exit was reported."""
        return handout is not None and handout.holder_pid == pid

    def expire_after(self, handout: Handout, seconds: float, call: Callable, *args: object) -> None:
        """Call ``call(*args)`` (a tell into the actor) when ``handout`` has been out for ``seconds``; the
        actor checks ``expired`` then, since a timer already on its way cannot be taken back."""
        if handout.timer is not None:
            handout.timer.cancel()
        handout.expires = handout.since + seconds
        handout.timer = self._timers.call_later(handout.expires - self.now(), call, *args)

    def expired(self, handout: Handout) -> bool:
        return handout.expires is not None and self.now() >= handout.expires

    def release(self, handout: Handout) -> None:
        """The lease ends (given back, its holder gone, expired): no timer, no watch is left of it."""
        if handout.timer is not None:
            handout.timer.cancel()
            handout.timer = None
        self.unbind(handout)
