"""One timer service for every actor: a single thread that sends messages when they are due.

Actors never sleep and never start a thread to wait: a pool that wants to refill in 5 ms, give up on a
cold get after its cold timeout or retry a failed build later asks ``call_later(delay, call, *args)``,
where ``call`` is a tell into the actor (a proxy method's ``defer``), so the work runs in the actor.
The service's clock is injected: tests give actors a :class:`ManualTimers` and move its time
themselves (``advance``), so nothing in them waits for the wall clock to let a timer fire.
"""

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import pykka
from loguru import logger


class Timer:
    """A call scheduled by a timer service; ``cancel`` before it is due and it never happens."""

    __slots__ = ("due", "_call", "_args", "cancelled")

    def __init__(self, due: float, call: Callable, args: tuple) -> None:
        self.due = due
        self._call = call
        self._args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True  # once
        try:
            self._call(*self._args)
        except pykka.ActorDeadError:
            pass  # the actor stopped meanwhile: what it wanted done is moot
        except Exception as error:  # noqa: BLE001 - one failed call never stops the others
            logger.opt(exception=error).error("timer call {} failed: {}", getattr(self._call, "__qualname__", self._call), error)


class _Schedule:
    """The due calls, in order; shared by the threaded and the manual service."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def add(self, timer: Timer) -> bool:
        """Queue ``timer``; True when it is now the first due."""
        with self._lock:
            heapq.heappush(self._heap, (timer.due, next(self._order), timer))
            return self._heap[0][2] is timer

    def pop_due(self, now: float) -> list[Timer]:
        with self._lock:
            due = []
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap)[2])
            return due

    def next_due(self) -> float | None:
        with self._lock:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        with self._lock:
            return sum(not timer.cancelled for _, _, timer in self._heap)


class Timers:
    """The daemon's timer service: one thread, started with the first timer, for the life of the process
    or until ``stop``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.now = clock
        self._schedule = _Schedule()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def call_later(self, delay: float, call: Callable, *args: object) -> Timer:
        """Call ``call(*args)`` in the service's thread ``delay`` seconds from now (a tell into an actor)."""
        timer = Timer(self.now() + max(delay, 0.0), call, args)
        first = self._schedule.add(timer)
        with self._wake:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="cer-timers", daemon=True)
                self._thread.start()
            if first:
                self._wake.notify()
        return timer

    def pending(self) -> int:
        """Timers not yet due and not cancelled."""
        return len(self._schedule)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(5)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopped:
                    return
                due = self._schedule.next_due()
                if due is None or due > self.now():
                    self._wake.wait(None if due is None else due - self.now())
                    continue
            for timer in self._schedule.pop_due(self.now()):
                timer.fire()


class ManualTimers:
    """A timer service whose time moves only when told to (``advance``): for tests.

    Due calls run in the thread that advances the time, in the order they were due.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._time = start
        self._schedule = _Schedule()
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._time

    def call_later(self, delay: float, call: Callable, *args: object) -> Timer:
        timer = Timer(self._time + max(delay, 0.0), call, args)
        self._schedule.add(timer)
        return timer

    def pending(self) -> int:
        return len(self._schedule)

    def advance(self, seconds: float) -> None:
        """Move the time on by ``seconds``, firing every call that falls due on the way."""
        with self._lock:
            target = self._time + seconds
            while (due := self._schedule.next_due()) is not None and due <= target:
                self._time = max(self._time, due)
                for timer in self._schedule.pop_due(self._time):
                    timer.fire()
            self._time = target

    def stop(self) -> None:
        pass


_default: Timers | None = None
_default_lock = threading.Lock()


def default_timers() -> Timers:
    """The process's timer service, for actors started without one of their own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Timers()
        return _default
