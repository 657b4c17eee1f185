"""The gateway's deadlines: one per request, shared by every wait on its way down."""

import pykka
import pytest

from cer.errors import Unavailable
from cer.protocol.gateway import Deadline


def test_each_wait_gets_what_is_left_and_the_message_says_where_it_went():
    now = [100.0]
    deadline = Deadline(5.0, clock=lambda: now[0])
    answered = pykka.ThreadingFuture()
    answered.set("first")
    now[0] = 103.0
    assert deadline.wait(answered, "the supervisor") == "first"
    assert deadline.left() == 2.0
    now[0] = 106.0
    assert deadline.left() == 0.0
    with pytest.raises(Unavailable, match=r"^the pool did not answer: the request's 5 s ran out after 6.00 s$"):
        deadline.wait(pykka.ThreadingFuture(), "the pool")


def test_a_dead_actor_is_unavailable_at_once():
    future = pykka.ThreadingFuture()
    future.set_exception(exc_info=(pykka.ActorDeadError, pykka.ActorDeadError("gone"), None))
    with pytest.raises(Unavailable, match="the factory has stopped"):
        Deadline(5.0).wait(future, "the factory")
