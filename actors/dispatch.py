"""Actors that share a few dispatcher threads instead of owning one thread each.

A ``pykka.ThreadingActor`` is a thread, so a daemon with one pool per checkpoint ran a thread per
checkpoint: 200 checkpoints, over 200 threads, nearly all of them asleep in their inbox. The pools never
wait (on other actors, on I/O or on time: slow work runs in the factory's threads, timed work comes from
the timer service), so their threads only ever ran the short handling of a message. Threads should be
bounded by the work there is, not by the number of pools: a :class:`DispatchedActor` runs on a
:class:`Dispatcher`, a fixed set of threads (``cer-pools-1`` ... ``cer-pools-4`` in the daemon) shared by
all its actors, however many.

The actor model's guarantee is kept: an actor handles its messages one at a time, in the order they came,
and never on two threads at once; only different actors run at the same time. An actor is *scheduled*
(in the dispatcher's ready queue, or in a turn on one of its threads) at most once: a message to an idle
actor schedules it, a message to a scheduled one only joins its inbox. A turn handles up to ``batch``
messages, then the actor, if it has more, goes to the back of the ready queue, so a busy actor does not
starve the others. A handler that blocks holds one of the threads for as long as it blocks (and its
actor's messages wait meanwhile): the others go on running on the remaining threads.

How this maps onto pykka's extension points for new actor types (``pykka._actor.Actor``):

- ``_create_actor_inbox``: an :class:`_Inbox`, a queue that schedules its actor when a message arrives
  and none is scheduled, and once the actor has stopped answers what still arrives with
  ``ActorDeadError`` (as pykka's teardown answers what was left in the inbox).
- ``_create_future``: ``pykka.ThreadingFuture``; callers block on futures in their own threads, as with
  ``ThreadingActor``.
- ``_start_actor_loop``: binds the inbox to the actor and schedules its first turn, instead of starting
  a thread. The loop ``Actor._actor_loop`` runs in one thread from start to end; here its steps run in
  turns: the first turn runs ``_actor_loop_setup`` (``on_start``, its failure handling), every turn then
  handles messages as ``_actor_loop_running`` does one by one (replies, ``on_failure`` after an
  exception in a told message, ``ActorRegistry.stop_all`` after a ``BaseException``), and the turn in
  which the actor has stopped runs ``_actor_loop_teardown``.

Everything else (``start``, refs, proxies, ``stop``, the registry, ``on_stop``/``on_failure``) is pykka's
own. What ran "in the actor's thread" now runs in some dispatcher thread, a different one from turn to
turn: an actor that needs one thread for good (a ZeroMQ socket, ``setns``, thread-locals) must stay a
``ThreadingActor``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from typing import Any

import pykka
from loguru import logger
from pykka import messages

# pykka's own records (an exception returned to a caller, a stop of every actor) keep pykka's logger and levels.
_pykka_logger = logging.getLogger("pykka")

DEFAULT_THREADS = 4
"""Threads of a dispatcher unless told otherwise: enough for a few blocked handlers, few enough to be
cheap on any machine (the pools' handlers are short; the CPUs are mostly the factory's)."""
DEFAULT_BATCH = 16
"""Messages an actor handles in one turn before it lets the other ready actors have the thread."""


class Dispatcher:
    """A fixed set of threads, named ``NAME-1`` ... ``NAME-threads``, that run the turns of its actors.

    The threads start with the first actor and end with :meth:`stop`. They are daemon threads, so a
    dispatcher nobody stops never keeps the process from exiting.
    """

    def __init__(self, name: str, threads: int = DEFAULT_THREADS, batch: int = DEFAULT_BATCH) -> None:
        if threads < 1 or batch < 1:
            raise ValueError(f"a dispatcher needs at least one thread and a batch of one message: {threads}, {batch}")
        self.name = name
        self.size = threads
        self.batch = batch
        self._wake = threading.Condition()  # guards everything below
        self._ready: deque[DispatchedActor] = deque()
        self._live: dict[str, pykka.ActorRef] = {}  # in the order they started, for stop()
        self._threads: list[threading.Thread] = []
        self._closed = False  # no actor starts here any more
        self._ending = False  # the threads end once the ready queue is empty

    @property
    def threads(self) -> list[threading.Thread]:
        with self._wake:
            return list(self._threads)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the actors still running here (last started first), then end the threads; each wait takes
        at most ``timeout`` seconds. No actor can start here afterwards."""
        with self._wake:
            if any(thread is threading.current_thread() for thread in self._threads):
                raise RuntimeError(f"dispatcher {self.name} cannot be stopped from one of its own threads")
            self._closed = True
            live = list(self._live.values())
        for ref in reversed(live):
            try:
                ref.stop(block=True, timeout=timeout)
            except pykka.Timeout:
                logger.error("{} did not stop within {} s; dispatcher {} ends without it", ref, timeout, self.name)
        with self._wake:
            self._ending = True
            self._wake.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                logger.error("{} is still in a message after {} s; it is left to the process's exit", thread.name, timeout)

    def _attach(self, actor: DispatchedActor) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError(f"dispatcher {self.name} is stopped: {actor} cannot start on it")
            self._live[actor.actor_urn] = actor.actor_ref
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._run, name=f"{self.name}-{number}", daemon=True)
                    for number in range(1, self.size + 1)
                ]
                for thread in self._threads:
                    thread.start()

    def _detach(self, actor: DispatchedActor) -> None:
        with self._wake:
            self._live.pop(actor.actor_urn, None)

    def _schedule(self, actor: DispatchedActor) -> None:
        with self._wake:
            self._ready.append(actor)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._ready and not self._ending:
                    self._wake.wait()
                if not self._ready:
                    return
                actor = self._ready.popleft()
            if actor._run_turn(self.batch):  # noqa: SLF001 - the dispatcher drives its actors' turns
                self._schedule(actor)


class _Inbox:
    """An actor's messages, and whether the actor is scheduled.

    ``put`` comes from any thread; ``get`` and ``empty`` only from its actor's turns (and pykka's teardown
    in the last one), so ``get`` never waits: a turn ends when the inbox is empty.
    """

    def __init__(self) -> None:
        self._messages: deque = deque()
        self._lock = threading.Lock()
        self._actor: DispatchedActor | None = None  # set when the actor starts: it is scheduled from then on
        self._scheduled = False
        self._closed = False

    def put(self, envelope: Any, /) -> None:
        with self._lock:
            if self._closed:
                refused, schedule = True, False
            else:
                self._messages.append(envelope)
                refused, schedule = False, self._actor is not None and not self._scheduled
                self._scheduled = self._scheduled or schedule
        if refused:
            self._refuse(envelope)
        elif schedule:
            self._actor.dispatcher._schedule(self._actor)  # noqa: SLF001

    def get(self) -> Any:
        return self._messages.popleft()

    def empty(self) -> bool:
        return not self._messages

    def bind(self, actor: DispatchedActor) -> None:
        """Schedule ``actor``'s first turn; from now on a message to it while idle schedules it."""
        with self._lock:
            self._actor = actor
            self._scheduled = True
        actor.dispatcher._schedule(actor)  # noqa: SLF001

    def end_turn(self) -> bool:
        """Whether the actor has more messages and stays scheduled; otherwise the next message schedules it."""
        with self._lock:
            self._scheduled = bool(self._messages)
            return self._scheduled

    def close(self) -> None:
        """The actor has stopped: what is in the inbox is left to the teardown, what comes later is refused."""
        with self._lock:
            self._closed = True

    def _refuse(self, envelope: Any) -> None:
        # What pykka's _actor_loop_teardown answers to a message left in a stopped actor's inbox.
        if envelope.reply_to is None:
            return
        if isinstance(envelope.message, messages._ActorStop):  # noqa: SLF001
            envelope.reply_to.set(None)
        else:
            error = pykka.ActorDeadError(f"{self._actor.actor_ref} stopped before handling the message")
            envelope.reply_to.set_exception(exc_info=(pykka.ActorDeadError, error, None))


class DispatchedActor(pykka.Actor):
    """A pykka actor that runs on ``dispatcher``'s threads rather than on a thread of its own.

    Subclasses pass their dispatcher to ``__init__``; otherwise they are written as any pykka actor whose
    handlers do not wait (see the module's docstring).
    """

    def __init__(self, dispatcher: Dispatcher, *args: Any, **kwargs: Any) -> None:
        self.dispatcher = dispatcher
        self._set_up = False
        super().__init__(*args, **kwargs)

    @staticmethod
    def _create_actor_inbox() -> _Inbox:
        return _Inbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        try:
            self.dispatcher._attach(self)  # noqa: SLF001
        except RuntimeError:
            # Actor.start registered it already: leave no live-looking actor that nothing will ever run.
            pykka.ActorRegistry.unregister(self.actor_ref)
            self.actor_stopped.set()
            raise
        self.actor_inbox.bind(self)

    def _run_turn(self, batch: int) -> bool:
        """One turn on a dispatcher thread: True when the actor has more messages and is to be scheduled again."""
        if not self._set_up:
            self._set_up = True
            try:
                self._actor_loop_setup()
            except BaseException:  # noqa: BLE001 - pykka's setup catches only Exception; a turn must not end its thread
                self._stop_everything()
        handled = 0
        while handled < batch and not self.actor_stopped.is_set() and not self.actor_inbox.empty():
            self._handle_envelope(self.actor_inbox.get())
            handled += 1
        if self.actor_stopped.is_set():
            self.actor_inbox.close()
            self._actor_loop_teardown()
            self.dispatcher._detach(self)  # noqa: SLF001
            return False
        return self.actor_inbox.end_turn()

    def _handle_envelope(self, envelope: Any) -> None:
        # One pass of pykka's Actor._actor_loop_running, whose loop waits on the inbox and so cannot be reused.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                _pykka_logger.info(f"Exception returned from {self} to caller:", exc_info=sys.exc_info())
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:  # noqa: BLE001 - pykka's own handling: logged, and the actor is stopped
                    self._handle_failure(*sys.exc_info())
        except BaseException:  # noqa: BLE001 - pykka stops every actor on SystemExit, KeyboardInterrupt and the like
            self._stop_everything()

    def _stop_everything(self) -> None:
        _pykka_logger.debug(f"{sys.exc_info()[1]!r} in {self}. Stopping all actors.")
        self._stop()
        # Not blocking, unlike pykka: this thread waiting for actors that may need it would deadlock.
        pykka.ActorRegistry.stop_all(block=False)


_default: Dispatcher | None = None
_default_lock = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher (threads ``cer-actors-N``), for actors started without one of their own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Dispatcher("cer-actors")
        return _default
