"""The timer service: one thread for every actor's timed messages, and a manual clock for tests."""

import threading

import pykka
import pytest

from cer.actors.timers import ManualTimers, Timers


def test_calls_come_in_the_order_they_are_due_and_cancelled_ones_never():
    timers = ManualTimers()
    calls = []
    timers.call_later(0.3, calls.append, "third")
    timers.call_later(0.1, calls.append, "first")
    cancelled = timers.call_later(0.2, calls.append, "cancelled")
    timers.call_later(0.2, calls.append, "second")
    cancelled.cancel()
    timers.advance(0.15)
    assert calls == ["first"]
    assert timers.pending() == 2
    timers.advance(1.0)
    assert calls == ["first", "second", "third"]
    assert timers.pending() == 0


def test_the_clock_reads_the_time_of_each_call_as_it_fires():
    timers = ManualTimers(start=50.0)
    seen = []
    timers.call_later(2.0, lambda: seen.append(timers.now()))
    timers.advance(10.0)
    assert seen == [52.0] and timers.now() == 60.0


def test_a_call_made_while_firing_falls_due_in_the_same_advance():
    timers = ManualTimers()
    calls = []
    timers.call_later(1.0, lambda: timers.call_later(1.0, calls.append, "again"))
    timers.advance(2.5)
    assert calls == ["again"]


def test_a_failing_call_is_logged_and_the_others_still_run(caplog_loguru):
    timers = ManualTimers()
    calls = []

    def broken():
        raise RuntimeError("boom")

    timers.call_later(0.1, broken)
    timers.call_later(0.2, calls.append, "after")
    timers.advance(1.0)
    assert calls == ["after"]
    assert any("boom" in message and "ERROR" in message for message in caplog_loguru)


class _Stopped(pykka.ThreadingActor):
    def ping(self) -> None:
        pass


def test_a_tell_to_an_actor_that_stopped_is_dropped_quietly(caplog_loguru):
    actor = _Stopped.start()
    call = actor.proxy().ping.defer
    actor.stop()
    timers = ManualTimers()
    timers.call_later(0.1, call)
    timers.advance(1.0)
    assert not any("ERROR" in message for message in caplog_loguru)


def test_the_threaded_service_fires_in_one_thread_and_stops():
    timers = Timers()
    fired = threading.Event()
    names = []
    threads = []

    def record():
        names.append(threading.current_thread().name)
        threads.append(threading.current_thread())
        fired.set()

    later = timers.call_later(30.0, names.append, "never")
    timers.call_later(0.01, record)
    assert fired.wait(5)
    assert names == ["cer-timers"]
    later.cancel()
    assert timers.pending() == 0
    timers.stop()
    assert not threads[0].is_alive()


@pytest.fixture
def caplog_loguru():
    from loguru import logger

    messages: list[str] = []
    handler = logger.add(lambda message: messages.append(f"{message.record['level'].name} {message}"), level="DEBUG")
    yield messages
    logger.remove(handler)
