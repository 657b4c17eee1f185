"""Messages nobody waits for: sent with ``tell``, handled by methods that cannot fail silently.

An ask whose future is dropped hides its exception (pykka only logs it at INFO); an exception in a plain
tell kills the actor. So every method that is only ever told is decorated with :func:`told`: a failure
is logged at ERROR with the actor and the message, counted (``MESSAGE_FAILURES``, shown by ``cer
status`` and in ``/metrics`` as ``cer_actor_message_failures_total``), and the actor goes on.

Send with :func:`tell`: a proxy method's ``defer`` that returns whether the actor was there to take it.
"""

import functools
import threading
from collections import Counter
from collections.abc import Callable

import pykka
from loguru import logger


class MessageFailures:
    """How many told messages failed, per actor class and message; safe to read from any thread."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._last: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def record(self, actor: str, message: str, error: BaseException) -> None:
        with self._lock:
            self._counts[(actor, message)] += 1
            self._last[(actor, message)] = f"{type(error).__name__}: {error}"

    def snapshot(self) -> list[dict]:
        """Every (actor, message) that ever failed: its count and its last error."""
        with self._lock:
            return [
                {"actor": actor, "message": message, "count": count, "last_error": self._last[(actor, message)]}
                for (actor, message), count in sorted(self._counts.items())
            ]


MESSAGE_FAILURES = MessageFailures()


def told(method: Callable) -> Callable:
    """Mark an actor method as a message nobody waits for: whatever it raises is logged and counted."""

    @functools.wraps(method)
    def handle(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the point: nothing a message does kills its actor unseen
            MESSAGE_FAILURES.record(type(self).__name__, method.__name__, error)
            logger.opt(exception=error).error("{} failed to handle {}: {}", type(self).__name__, method.__name__, error)
            return None

    return handle


def tell(call, *args: object) -> bool:
    """Send ``call(*args)`` without waiting (``call`` is a proxy method); False when its actor is gone."""
    try:
        call.defer(*args)
    except pykka.ActorDeadError:
        return False
    return True
