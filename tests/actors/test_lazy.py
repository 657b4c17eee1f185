"""The lazy-pages actor in this process, with stand-in servers (a script that makes the server's socket and
sleeps): it never waits on another actor, its told messages fail loudly, its deadlines follow the timer
service's clock, and its leases are the pools' (cer.actors.leases)."""

import os
import subprocess
import threading

import pykka
import pytest
from conftest import wait_for

from cer.actors.lazy import LazyPagesServers, LazySettings
from cer.actors.timers import ManualTimers
from cer.actors.told import MESSAGE_FAILURES, tell, told
from cer.actors.watcher import ProcessWatcher
from cer.errors import NotFound, Unavailable
from cer.references import CheckpointRef

REF = CheckpointRef("sample")

# Stands in for `criu lazy-pages -D IMAGES -W WORK_DIR -o LOG`: ready at once unless NOT_READY is set.
FAKE_SERVER = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = -W ] && work=$2; shift; done
[ -n "$NOT_READY" ] || : > "$work/lazy-pages.socket"
exec sleep 600
"""


class DummyExtractor(pykka.ThreadingActor):
    """Lends a directory for any checkpoint; with ``blocked`` set, its thread hangs in ``lend`` until the
    event is set (an extractor stuck on containerd)."""

    def __init__(self, images: str, blocked: threading.Event | None = None) -> None:
        super().__init__()
        self.images = images
        self.blocked = blocked
        self.users = 0

    @told
    def lend(self, ref, reply, token) -> None:
        if self.blocked is not None:
            self.blocked.wait(30)
        self.users += 1
        if not tell(reply, token, ref, self.images, None):
            self.users -= 1

    def put(self, ref) -> int:
        self.users -= 1
        return self.users

    def user_count(self) -> int:
        return self.users


@pytest.fixture
def fake_criu(tmp_path):
    path = tmp_path / "fake-criu"
    path.write_text(FAKE_SERVER)
    path.chmod(0o755)
    return path


class Lazy:
    """A lazy-pages actor with a dummy extractor and a real process watcher."""

    def __init__(self, tmp_path, fake_criu, timers=None, blocked=None, watcher=None, **settings):
        (tmp_path / "images").mkdir(exist_ok=True)
        self.extractor = DummyExtractor.start(str(tmp_path / "images"), blocked)
        self.watcher = watcher or ProcessWatcher.start()
        settings = LazySettings(server="criu", criu=str(fake_criu), spares=0, **settings)
        self.ref = LazyPagesServers.start(str(tmp_path / "root"), self.extractor.proxy(), self.watcher.proxy(),
                                          settings, timers)
        self.actor = self.ref.proxy()

    def status(self) -> dict:
        return self.actor.status().get(timeout=5).get(timeout=5)

    def server(self, server_id: str) -> dict | None:
        return next((s for s in self.status()["servers"] if s["server_id"] == server_id), None)

    def ended(self, server_id: str) -> dict:
        def entry():
            return next((e for e in self.status()["ended"] if e["server_id"] == server_id), None)

        return wait_for(entry, 10, 0.02, f"lazy-pages server {server_id} to end")

    def stop(self) -> None:
        for ref in (self.ref, self.watcher, self.extractor):
            ref.stop(block=True, timeout=30)


@pytest.mark.timeout(60)
def test_the_actor_answers_while_the_extractor_is_blocked(tmp_path, fake_criu):
    blocked = threading.Event()
    lazy = Lazy(tmp_path, fake_criu, blocked=blocked)
    try:
        pending = lazy.actor.get(REF).get(timeout=2)  # the actor answers with a future at once
        with pytest.raises(pykka.Timeout):
            pending.get(timeout=0.2)  # nothing yet: the extractor has not lent the images
        # The extractor's thread hangs; the lazy-pages actor still answers, within a fraction of the timeout.
        status = lazy.actor.status().get(timeout=1).get(timeout=1)
        assert [(s["state"], s["pid"]) for s in status["servers"]] == [("starting", None)]
        with pytest.raises(NotFound):
            lazy.actor.put("nobody").get(timeout=1)
        blocked.set()
        server = pending.get(timeout=10)
        assert os.path.exists(server.socket) and server.images == str(tmp_path / "images")
        assert lazy.server(server.server_id)["state"] == "waiting"
        assert lazy.actor.put(server.server_id).get(timeout=5) == "released"
        ended = lazy.ended(server.server_id)
        assert (ended["outcome"], ended["pid"]) == ("released", server.pid)
        assert not os.path.exists(server.work_dir)
        assert lazy.extractor.proxy().user_count().get(timeout=5) == 0
    finally:
        blocked.set()
        lazy.stop()


@pytest.mark.timeout(60)
def test_deadlines_follow_the_timer_service_clock(tmp_path, fake_criu):
    timers = ManualTimers()
    lazy = Lazy(tmp_path, fake_criu, timers, deadline=100.0)
    try:
        server = lazy.actor.get(REF).get(timeout=5).get(timeout=10)
        assert lazy.server(server.server_id)["deadline_in_seconds"] == 100.0
        timers.advance(99)
        assert lazy.server(server.server_id)["state"] == "waiting"  # not a wall-clock second has mattered
        timers.advance(1)
        ended = lazy.ended(server.server_id)
        assert ended["outcome"] == "expired" and "100 s after it was handed out" in ended["reason"], ended
        assert wait_for(lambda: timers.pending() == 0, 5, what="the server's timers to be cancelled")
    finally:
        lazy.stop()


@pytest.mark.timeout(60)
def test_a_server_that_never_gets_ready_fails_its_request_when_the_clock_says(tmp_path, fake_criu, monkeypatch):
    monkeypatch.setenv("NOT_READY", "1")
    timers = ManualTimers()
    lazy = Lazy(tmp_path, fake_criu, timers, ready_timeout=10.0)
    try:
        pending = lazy.actor.get(REF).get(timeout=5)
        started = wait_for(lambda: (s := lazy.status()["servers"]) and s[0]["pid"] and s[0], 10, what="the process")
        timers.advance(10)
        with pytest.raises(Unavailable, match=r"did not get ready \(no lazy-pages.socket within 10 s"):
            pending.get(timeout=10)
        ended = lazy.ended(started["server_id"])
        assert ended["outcome"] == "not_ready" and ended["pid"] == started["pid"]
        assert lazy.extractor.proxy().user_count().get(timeout=5) == 0
    finally:
        lazy.stop()


@pytest.mark.timeout(30)
def test_a_told_message_that_fails_is_logged_counted_and_the_actor_lives_on(tmp_path, fake_criu):
    lazy = Lazy(tmp_path, fake_criu)
    try:
        def failures():
            return sum(item["count"] for item in MESSAGE_FAILURES.snapshot()
                       if (item["actor"], item["message"]) == ("LazyPagesServers", "holder_exited"))

        before = failures()
        lazy.actor.holder_exited.defer(("not", "a key"), 1)  # a tell nobody waits for, that raises
        wait_for(lambda: failures() == before + 1, 5, what="the failure to be counted")
        assert lazy.status()["servers"] == []
    finally:
        lazy.stop()


@pytest.mark.timeout(30)
def test_a_bind_is_answered_through_a_future(tmp_path, fake_criu):
    lazy = Lazy(tmp_path, fake_criu)
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    try:
        server = lazy.actor.get(REF).get(timeout=5).get(timeout=10)
        with pytest.raises(NotFound, match=f"process {gone.pid} is not running"):
            lazy.actor.bind(server.server_id, gone.pid).get(timeout=5)
        with pytest.raises(NotFound, match="no lazy-pages server 1-1"):
            lazy.actor.bind("1-1", os.getpid()).get(timeout=5)
        # Its server serves no userfaultfd and nothing of this process waits on one: nothing to protect.
        assert lazy.actor.bind(server.server_id, os.getpid()).get(timeout=5).get(timeout=5) == "completed"
    finally:
        lazy.stop()


@pytest.mark.timeout(90)
def test_one_holder_exit_releases_a_namespace_and_a_lazy_server_alike(tmp_path, fake_criu):
    """Pools and the lazy-pages actor keep leases the same way (cer.actors.leases): bound to one holder
    through one process watcher, both come back when it exits."""
    from conftest import SAMPLE

    from cer.actors.extractor import CheckpointExtractor
    from cer.actors.factory import NamespaceFactory
    from cer.actors.pool import PoolActor, PoolPeers, PoolSettings
    from cer.config import CheckpointEntry

    (tmp_path / "bundles").mkdir()
    watcher = ProcessWatcher.start()
    lazy = Lazy(tmp_path, fake_criu, watcher=watcher)
    pool_refs = [NamespaceFactory.start(str(tmp_path / "bundles"), 2), CheckpointExtractor.start()]
    peers = PoolPeers(pool_refs[0].proxy(), pool_refs[1].proxy(), watcher.proxy(), ManualTimers())
    entry = CheckpointEntry(REF, 1, str(SAMPLE / "checkpoint"), None, None)
    pool_refs.append(PoolActor.start(entry, peers, PoolSettings()))
    pool = pool_refs[-1].proxy()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lease = wait_for(lambda: _try_get(pool, holder.pid), 20, 0.05, "a uts namespace")
        server = lazy.actor.get(REF, holder.pid).get(timeout=5).get(timeout=10)
        assert lazy.server(server.server_id)["holder_pid"] == holder.pid
        assert pool.status().get(timeout=5)["types"]["uts"]["bound"] == 1
        assert watcher.proxy().watching().get(timeout=5) == 3  # the holder, twice, and the lazy-pages server

        holder.kill()
        holder.wait(10)
        ended = lazy.ended(server.server_id)
        assert ended["outcome"] == "abandoned" and f"holder process {holder.pid} exited" in ended["reason"], ended
        wait_for(lambda: pool.status().get(timeout=5)["types"]["uts"]["in_use"] == 0, 10, what="the namespace's release")
        assert not os.path.exists(server.work_dir)
        wait_for(lambda: watcher.proxy().watching().get(timeout=5) == 0, 5, what="the watcher to let go")
        with pytest.raises(NotFound):
            pool.put("uts", lease.namespace.namespace_id).get(timeout=5)
    finally:
        holder.kill()
        holder.wait(10)
        lazy.ref.stop(block=True, timeout=30)
        for ref in reversed(pool_refs):
            ref.stop(block=True, timeout=30)
        watcher.stop(block=True, timeout=30)
        lazy.extractor.stop(block=True, timeout=30)


def _try_get(pool, holder_pid):
    try:
        return pool.get("uts", holder_pid).get(timeout=5).get(timeout=10)
    except Unavailable:
        return None  # the checkpoint is still loading
