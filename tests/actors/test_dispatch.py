"""Dispatched actors: many actors on a few shared threads, each still one message at a time, in order,
with pykka's semantics (the parametrized tests run the same actor as a ThreadingActor for comparison)."""

import threading
import time

import pykka
import pytest
from pykka._envelope import Envelope

from cer.actors.dispatch import DispatchedActor, Dispatcher
from conftest import wait_for


@pytest.fixture
def dispatcher():
    dispatcher = Dispatcher("test-dispatch", threads=3)
    yield dispatcher
    dispatcher.stop(timeout=10)
    assert not any(thread.is_alive() for thread in dispatcher.threads)


@pytest.fixture(params=["threading", "dispatched"])
def start(request, dispatcher):
    """Start an actor made of ``behaviour`` as the parameter's kind; its ``events`` list is returned with it."""

    def start_actor(behaviour: type, *args):
        events: list = []
        if request.param == "threading":
            actor = type(behaviour.__name__, (behaviour, pykka.ThreadingActor), {"events": events})
            return actor.start(*args), events
        actor = type(behaviour.__name__, (behaviour, DispatchedActor), {"events": events})
        return actor.start(dispatcher, *args), events

    return start_actor


class Recorder:
    """Records its hooks and messages in ``events`` (a class attribute: it outlives the actor)."""

    events: list

    def on_start(self) -> None:
        self.events.append("on_start")

    def on_stop(self) -> None:
        self.events.append("on_stop")

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self.events.append(("on_failure", exception_type))

    def record(self, item) -> None:
        self.events.append(item)

    def fail(self) -> None:
        raise ValueError("told to fail")

    def exit(self) -> None:
        raise SystemExit("told to exit")

    def hold(self, release: threading.Event) -> str:
        release.wait(20)
        return "released"

    def thread_name(self) -> str:
        return threading.current_thread().name


class FailingStart(Recorder):
    def on_start(self) -> None:
        raise ValueError("cannot start")


class Dispatched(Recorder, DispatchedActor):
    events: list = []


def start_dispatched(dispatcher: Dispatcher) -> pykka.ActorRef:
    return Dispatched.start(dispatcher)


@pytest.mark.timeout(60)
def test_each_actor_handles_its_messages_one_at_a_time_in_the_order_sent(dispatcher):
    class Checker(DispatchedActor):
        def __init__(self, dispatcher):
            super().__init__(dispatcher)
            self.inside = False
            self.overlaps = 0
            self.received: dict[int, list[int]] = {}
            self.threads: set[str] = set()

        def take(self, sender: int, sequence: int) -> None:
            if self.inside:
                self.overlaps += 1
            self.inside = True
            self.threads.add(threading.current_thread().name)
            self.received.setdefault(sender, []).append(sequence)
            time.sleep(0)  # let another thread run now, in the middle of the message, if it could
            self.inside = False

        def report(self):
            return self.overlaps, self.received, self.threads

    actors = [Checker.start(dispatcher).proxy() for _ in range(4)]
    messages = 300

    def send(sender: int) -> None:
        for sequence in range(messages):
            for actor in actors:
                actor.take.defer(sender, sequence)

    senders = [threading.Thread(target=send, args=(sender,)) for sender in range(6)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(30)
    threads_used = set()
    for actor in actors:
        overlaps, received, threads = actor.report().get(timeout=20)
        assert overlaps == 0
        assert received == {sender: list(range(messages)) for sender in range(6)}
        threads_used |= threads
    assert threads_used <= {"test-dispatch-1", "test-dispatch-2", "test-dispatch-3"}
    assert len(threads_used) > 1  # the actors took turns on the shared threads


@pytest.mark.timeout(60)
def test_hundreds_of_actors_run_on_the_dispatchers_few_threads(dispatcher):
    before = threading.active_count()
    actors = [start_dispatched(dispatcher) for _ in range(300)]
    names = {actor.proxy().thread_name().get(timeout=10) for actor in actors}
    assert names <= {"test-dispatch-1", "test-dispatch-2", "test-dispatch-3"}
    assert len([thread for thread in threading.enumerate() if thread.name.startswith("test-dispatch-")]) == 3
    assert threading.active_count() <= before + 3
    for actor in actors:
        actor.stop(block=False)
    wait_for(lambda: not any(actor.is_alive() for actor in actors), 10, what="the actors to stop")
    assert threading.active_count() <= before + 3  # the threads are the dispatcher's, not the actors'


@pytest.mark.timeout(30)
def test_a_blocked_actor_does_not_keep_the_others_from_running(dispatcher):
    release = threading.Event()
    blocked = [start_dispatched(dispatcher) for _ in range(2)]
    held = [actor.proxy().hold(release) for actor in blocked]  # two of the three threads
    try:
        others = [start_dispatched(dispatcher) for _ in range(20)]
        for actor in others:
            actor.proxy().record("ran").get(timeout=5)
        assert not any(future_done(future) for future in held)
    finally:
        release.set()
    assert [future.get(timeout=5) for future in held] == ["released", "released"]


def future_done(future: pykka.Future) -> bool:
    try:
        future.get(timeout=0)
    except pykka.Timeout:
        return False
    return True


@pytest.mark.timeout(30)
def test_an_actor_with_a_long_inbox_yields_its_thread_after_a_batch():
    dispatcher = Dispatcher("test-batch", threads=1, batch=3)
    order: list[str] = []

    class Busy(DispatchedActor):
        def hold(self, holding: threading.Event, release: threading.Event) -> None:
            holding.set()
            release.wait(10)

        def note(self, name: str) -> None:
            order.append(name)

    try:
        gate, busy, other = (Busy.start(dispatcher).proxy() for _ in range(3))
        holding, release = threading.Event(), threading.Event()
        gate.hold.defer(holding, release)
        assert holding.wait(5)  # the only thread waits while the inboxes fill
        for number in range(10):
            busy.note.defer(f"busy-{number}")
        other.note.defer("other")
        release.set()
        busy.note("busy-last").get(timeout=5)
        other.note("other-last").get(timeout=5)
    finally:
        dispatcher.stop(timeout=10)
    assert order.index("other") == 3  # after one batch of busy's, not after all ten
    assert [name for name in order if name.startswith("busy")] == [*(f"busy-{n}" for n in range(10)), "busy-last"]


@pytest.mark.timeout(30)
def test_stopping_answers_what_came_before_and_refuses_what_comes_after(start):
    actor, events = start(Recorder)
    proxy = actor.proxy()
    release = threading.Event()
    held = proxy.hold(release)
    before = proxy.record("before")
    stopped = actor.stop(block=False)
    after = proxy.record("after")
    release.set()
    assert held.get(timeout=5) == "released"
    assert before.get(timeout=5) is None
    assert stopped.get(timeout=5) is True
    with pytest.raises(pykka.ActorDeadError):
        after.get(timeout=5)
    assert events == ["on_start", "before", "on_stop"]
    assert not actor.is_alive()
    assert actor.stop(block=True, timeout=5) is False
    with pytest.raises(pykka.ActorDeadError):
        actor.ask("anything", timeout=5)
    with pytest.raises(pykka.ActorDeadError):
        actor.tell("anything")
    with pytest.raises(pykka.ActorDeadError):
        proxy.record("late").get(timeout=5)
    assert pykka.ActorRegistry.get_by_urn(actor.actor_urn) is None


@pytest.mark.timeout(30)
def test_a_message_that_slips_in_after_the_stop_is_answered_actor_dead(dispatcher):
    # ActorRef.ask checks is_alive, then puts: a put can come after the actor's last turn. It is answered at
    # once instead of waiting forever in a dead actor's inbox.
    actor = start_dispatched(dispatcher)
    actor.stop(block=True, timeout=5)
    future = pykka.ThreadingFuture()
    actor.actor_inbox.put(Envelope("late", reply_to=future))
    with pytest.raises(pykka.ActorDeadError):
        future.get(timeout=5)


@pytest.mark.timeout(30)
def test_an_exception_in_on_start_stops_the_actor(start):
    actor, events = start(FailingStart)
    wait_for(lambda: not actor.is_alive(), 5, what="the actor to stop")
    with pytest.raises(pykka.ActorDeadError):
        actor.ask("anything", timeout=5)
    assert pykka.ActorRegistry.get_by_urn(actor.actor_urn) is None
    assert events == []  # neither on_stop nor on_failure: pykka calls neither after on_start fails


@pytest.mark.timeout(30)
def test_an_exception_in_a_told_message_runs_on_failure_and_stops_the_actor(start):
    actor, events = start(Recorder)
    proxy = actor.proxy()
    proxy.fail.defer()
    wait_for(lambda: not actor.is_alive(), 5, what="the actor to stop")
    assert events == ["on_start", ("on_failure", ValueError)]
    assert pykka.ActorRegistry.get_by_urn(actor.actor_urn) is None
    with pytest.raises(pykka.ActorDeadError):
        proxy.record("after").get(timeout=5)


@pytest.mark.timeout(30)
def test_an_exception_in_an_asked_message_goes_to_the_caller_and_the_actor_lives_on(start):
    actor, events = start(Recorder)
    proxy = actor.proxy()
    with pytest.raises(ValueError, match="told to fail"):
        proxy.fail().get(timeout=5)
    proxy.record("after").get(timeout=5)
    assert actor.is_alive()
    assert events == ["on_start", "after"]


@pytest.mark.timeout(30)
def test_system_exit_in_a_message_stops_every_actor(start):
    actor, _ = start(Recorder)
    bystander, _ = start(Recorder)
    actor.proxy().exit.defer()
    wait_for(lambda: not actor.is_alive() and not bystander.is_alive(), 10, what="every actor to stop")


@pytest.mark.timeout(30)
def test_the_registrys_stop_all_stops_dispatched_actors(dispatcher):
    Dispatched.events.clear()
    actors = [start_dispatched(dispatcher) for _ in range(20)]
    assert set(pykka.ActorRegistry.get_by_class(Dispatched)) == set(actors)
    assert pykka.ActorRegistry.stop_all(timeout=10) == [True] * 20
    assert not any(actor.is_alive() for actor in actors)
    assert Dispatched.events.count("on_stop") == 20


@pytest.mark.timeout(30)
def test_stopping_the_dispatcher_stops_its_actors_and_ends_its_threads():
    dispatcher = Dispatcher("test-stop", threads=2)
    assert dispatcher.threads == []  # no actor yet, no thread
    actors = [start_dispatched(dispatcher) for _ in range(5)]
    threads = dispatcher.threads
    assert [thread.name for thread in threads] == ["test-stop-1", "test-stop-2"]
    dispatcher.stop(timeout=10)
    assert not any(actor.is_alive() for actor in actors)
    assert not any(thread.is_alive() for thread in threads)
    with pytest.raises(RuntimeError, match="test-stop is stopped"):
        start_dispatched(dispatcher)
    assert pykka.ActorRegistry.get_by_class(Dispatched) == []


def test_a_dispatcher_needs_a_thread():
    with pytest.raises(ValueError):
        Dispatcher("none", threads=0)
