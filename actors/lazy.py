"""Lazy-pages servers: one server process per lazy restore of a checkpoint cer holds.

A lazy restore (``runc restore --lazy-pages``, ``criu restore --lazy-pages``) starts the container with
its memory still in the images; a lazy-pages server then hands pages over through userfaultfd,
first those the container touches, then all the rest, and exits (status 0) once the restore has all its
pages or its processes are gone. The server is cer's own (``python -m cer.lazy.server``, which also records
each checkpoint's working set and serves it first on later restores: see cer.lazy.server), or with
``LazySettings.server = "criu"`` (``cer start --lazy-server criu``) CRIU's ``criu lazy-pages``. Server and
restore meet at ``lazy-pages.socket`` in CRIU's work directory, so every server here gets a directory of its
own, ``ROOT/lazy/<id>/``, which its restore uses as its work directory; several restores of one checkpoint
at once each get their own server.

What a server is for, and how it ends:

- **starting**: the extractor lends it the checkpoint's images (``CheckpointExtractor.lend``), a thread
  starts its process, and it is ready once its socket exists; all within ``ready_timeout`` (``not_ready``
  beyond). A request waits for that before it is answered.
- **spare**: ready and not handed out. Once a server that was handed out has ended, the actor starts
  ``spares`` servers of that checkpoint ahead of the next request (the ~40 ms a server takes to start is
  then off the restore's path; started only then, a spare does not compete for CPU with the restore and
  its pages); a spare that nobody takes within ``deadline`` is stopped and not replaced.
- **waiting**: handed out; its restore has not been bound yet. With a holder process, the server is
  stopped (``abandoned``) when the holder exits before any restore reached the server.
- **serving**: ``bind`` told it the restored process, and the actor checked that it is: every mapping of
  that process registered with a userfaultfd is registered in the memory one of the server's userfaultfds
  serves (probed through the actor's copy without touching memory, ``registered_page``), or it is the
  init of the pid namespace of such a process; so no client can name some other process for the actor to
  kill. The actor holds one duplicate of each of the server's userfaultfds (``pidfd_getfd``; one it holds
  already is recognised with kcmp and not taken twice). This matters because when the last fd of a
  userfaultfd closes, the kernel fills every page not delivered yet with zeros and the process runs on
  with holes. With cer's copies open, a fault on a missing page waits instead, and if the server ends any
  other way than by finishing its work, the actor kills the restored process (SIGKILL through a pidfd: a
  container's init takes its whole pid namespace with it) before it lets go of them. The restored
  process fails loudly; it never runs with holes.
- At most ``max_per_checkpoint`` servers per checkpoint and ``max_servers`` in all (spares included; a
  spare of another checkpoint gives way to a request) live at once; a request beyond is ``exhausted``.
- Every server ends by ``deadline`` seconds after it was handed out (``expired``: killed, and so is its
  restored process); ``put`` ends it at once (``released``).

Outcomes (``ended`` in status): ``completed`` (exited 0), ``failed`` (exited otherwise, e.g. killed by
someone), ``expired``, ``released``, ``abandoned``, ``unused`` (a spare nobody took), ``not_ready``,
``stopped`` (the daemon stopped). Each ended server leaves nothing: its process is reaped, its work
directory removed, its fds closed and its user of the checkpoint directory (``CheckpointExtractor.lend``)
given back.

The actor's thread never waits (but at shutdown): not on the extractor, a process's start or reaping,
nor on /proc (a bind's probe of the restored process, a status, whether a restore had reached a server
that is being killed or whose holder exited). Those run in short threads of their own (or in the
extractor), which answer the request's future or tell the actor (``@told`` messages: a failure is logged
and counted, never silent). A handed-out server is a lease (cer.actors.leases, as the pools' namespaces
are): its holder is bound through the ProcessWatcher, which also reports the servers' own exits
(``holder_exited``); its deadline, the ready timeout and a spare's deadline are timers of the daemon's
timer service (cer.actors.timers), so tests move their clock. At shutdown, servers with a restore in
progress get ``shutdown_grace`` seconds (one wait for all of them) to finish; then every server left is
killed, its restored process too. Servers left by a daemon killed with SIGKILL (they outlive it) are
found by their work directory at the next start and killed.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import pykka
from loguru import logger

from cer.actors.leases import Handout, Holder, Leases, Waiter
from cer.actors.timers import Timer, Timers, default_timers
from cer.actors.told import tell, told
from cer.errors import BadRequest, CerError, Exhausted, NotFound, Unavailable
from cer.kdat import CACHE_NAME as KDAT_CACHE_NAME
from cer.kdat import RUN as KDAT_RUN
from cer.kdat import run_is_tmpfs
from cer.lazy import working_set
from cer.linux.proc import command_lines, has_uffd, listening, tasks_of_namespace_led_by, uffd_fds, uffd_mappings
from cer.linux.processes import (
    has_exited, kill_process, kill_process_group, pidfd_getfd, pidfd_open, same_open_file, wait_exited,
)
from cer.linux.userfaultfd import lazy_pages_unsupported, registered_page
from cer.references import CheckpointRef

LAZY_DIRECTORY = "lazy"
"""Where, under ROOT, each server's work directory lives."""
SOCKET_NAME = "lazy-pages.socket"
LOG_NAME = "lazy-pages.log"
STATS_NAME = "lazy-pages.stats"
SERVERS = ("cer", "criu")
_STATS_KEPT = ("faults", "zero_faults", "pages_on_fault", "pages_working_set", "pages_background", "working_set",
               "working_set_pages", "seconds_to_finished", "seconds_working_set", "forks")
_READY_POLL = 0.002
_HISTORY = 64
_REAP_TIMEOUT = 5.0
# Mappings of a process checked against a server's userfaultfds at a bind (each costs two ioctls).
_MAX_CHECKED_MAPPINGS = 256


@dataclass(frozen=True)
class LazySettings:
    deadline: float = 300.0
    """Seconds from hand-out (for a spare: from its start) until a server that has not ended is stopped."""
    ready_timeout: float = 10.0
    spares: int = 1
    """Ready servers kept per checkpoint once it has been asked for (0: start each on request)."""
    criu: str = "criu"
    shutdown_grace: float = 10.0
    max_servers: int = 64
    """Servers alive at once, spares included; a request beyond is ``exhausted`` (a spare of another
    checkpoint is stopped to make room first)."""
    max_per_checkpoint: int = 16
    """Servers of one checkpoint handed out or being started for a request at once."""
    server: str = "cer"
    """Whose lazy-pages server: ``cer`` (cer.lazy.server, with working sets) or ``criu`` (``criu lazy-pages``)."""
    record_quiet: float = 1.0
    """cer's server: a first restore's working set ends once its tasks faulted nothing for this long..."""
    record_limit: float = 10.0
    """...or this many seconds after the restore finished."""


@dataclass(frozen=True)
class LazyServer:
    """What a client passes to its lazy restore: ``images`` as the image directory, ``work_dir`` as CRIU's
    work directory (the restore finds ``socket``, the server's, there)."""

    server_id: str
    pid: int
    work_dir: str
    socket: str
    images: str
    deadline_seconds: float

    def to_wire(self) -> dict:
        return {
            "server_id": self.server_id, "pid": self.pid, "work_dir": self.work_dir, "socket": self.socket,
            "images": self.images, "deadline_seconds": self.deadline_seconds,
        }


@dataclass(frozen=True)
class _Exit:
    """How a server's process ended, read by the thread that reaped it (its work directory is gone then)."""

    status: int
    stats: dict | None
    log_tail: str


@dataclass(eq=False)
class _Server:
    server_id: str
    ref: CheckpointRef
    work_dir: str
    started: float
    images: str | None = None  # once the extractor lent them: a user of the checkpoint until the server ends
    starting: pykka.ThreadingFuture | None = None  # the start thread's (process, pidfd), while it runs
    process: subprocess.Popen | None = None
    pidfd: int | None = None
    state: str = "starting"  # starting, spare, waiting, serving
    request: Waiter | None = None  # the request waiting for this server to get ready
    lease: Handout | None = None  # once handed out
    holder_pid: int | None = None
    restored_pid: int | None = None
    restored_pidfd: int | None = None
    uffds: list[int] = field(default_factory=list)
    outcome: str | None = None  # set when cer ends the server itself
    reason: str | None = None
    connected: bool = False  # a restore had reached it when cer ended it
    killed: bool = False  # cer has killed it (or a thread of cer's is about to)
    reaping: pykka.ThreadingFuture | None = None  # its _Exit, once its exit was reported
    timers: list[Timer] = field(default_factory=list)  # its ready timeout and its deadline as a spare

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers = []

    @property
    def socket(self) -> str:
        return os.path.join(self.work_dir, SOCKET_NAME)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def reply(self, deadline: float) -> LazyServer:
        return LazyServer(self.server_id, self.process.pid, self.work_dir, self.socket, self.images, deadline)


class LazyPagesServers(pykka.ThreadingActor):
    """Starts, hands out, watches and ends lazy-pages servers (see the module's docstring).

    The actor's thread never waits: the extractor's answer, a server's start (and readiness), its reaping,
    a bind's probe of the restored process and a status's /proc readings come back as told messages or
    complete the request's future from the threads that did them.
    """

    def __init__(
        self, root: str, extractor: pykka.ActorProxy, watcher: pykka.ActorProxy, settings: LazySettings = LazySettings(),
        timers: Timers | None = None,
    ) -> None:
        super().__init__()
        self._base = os.path.join(root, LAZY_DIRECTORY)
        self._root = root
        self._extractor = extractor
        self._watcher = watcher
        self._settings = settings
        self._timers = timers or default_timers()
        self._now = self._timers.now
        self._servers: dict[str, _Server] = {}
        self._ended: deque[dict] = deque(maxlen=_HISTORY)
        self._counts: Counter = Counter()
        self._serial = itertools.count(1)
        self._criu: str | None = None
        self._unsupported: str | None = None
        self._stopping = False

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
        self._leases = Leases(self._self, self._watcher, self._timers)
        self._criu = shutil.which(self._settings.criu)
        self._unsupported = lazy_pages_unsupported()
        if self._criu is None:
            self._unsupported = f"no CRIU at {self._settings.criu!r} (cer start --criu)"
        _kill_leftovers(self._base)
        shutil.rmtree(self._base, ignore_errors=True)
        os.makedirs(self._base, mode=0o700)
        # Working sets outlive the daemon: a checkpoint's set serves its restores after a restart too.
        os.makedirs(os.path.join(self._root, working_set.DIRECTORY), mode=0o700, exist_ok=True)
        if self._unsupported:
            logger.warning("lazy restores are not available: {}", self._unsupported)
        # The daemon puts the cache in place where CRIU cannot (cer.kdat); without it every restore probes.
        self._kdat_cached = run_is_tmpfs() or os.path.exists(os.path.join(KDAT_RUN, KDAT_CACHE_NAME))
        if not self._kdat_cached:
            logger.warning("no CRIU kernel probe cache ({}/{}): CRIU probes the kernel at every restore (about "
                           "0.03-0.15 s each); a tmpfs on /run saves that", KDAT_RUN, KDAT_CACHE_NAME)

    # -- requests -------------------------------------------------------------------------------------

    def get(self, ref: CheckpointRef, holder_pid: int | None = None) -> pykka.Future:
        """A server for one lazy restore of ``ref``: a future of a LazyServer, set once it is ready (or of
        the error), within ``ready_timeout``. With ``holder_pid``, the server is stopped if that process
        exits before a restore reached it."""
        if self._unsupported:
            raise Unavailable(f"lazy restores are not available on this host: {self._unsupported}")
        spare = self._find(ref, "spare") or self._find(ref, "starting")
        if spare is None:
            self._make_room(ref)
        request = Waiter(pykka.ThreadingFuture(), Holder.of(holder_pid))
        try:
            server = spare if spare is not None else self._spawn(ref)
        except BaseException:
            if request.holder is not None:
                request.holder.close()
            raise
        if server.state == "spare":
            self._hand_out(server, request)
        else:
            server.request = request
        return request.future

    def bind(self, server_id: str, pid: int) -> pykka.Future:
        """Process ``pid`` was restored with server ``server_id``: if the server ends before it has delivered
        all its pages, the process is killed. A future of the server's state (``serving``, or ``completed``
        when it is done already).

        The daemon kills only a process it has tied to this server's restore itself: every mapping the
        process has registered with a userfaultfd must be registered, at the same address, in the memory
        that one of this server's userfaultfds serves (``_restored_state``). Nothing else is ever killed, not
        even for a server that has ended: such a bind is ``unavailable`` and the client removes its container.
        That probe reads /proc in a thread of its own; what it found is recorded by ``restore_probed``, in
        the actor, so a server that ends meanwhile is seen.
        """
        future = pykka.ThreadingFuture()
        server = self._servers.get(server_id)
        if server is None:
            future.set(self._unbound_state(server_id))
            return future
        if server.state in ("starting", "spare"):
            raise NotFound(f"lazy-pages server {server_id} is not handed out")
        self._check_unbound(server, pid)
        try:
            restored_pidfd = pidfd_open(pid)
        except ProcessLookupError:
            raise NotFound(f"process {pid} is not running") from None
        probe = _Probe(server_id, server.pid, os.dup(server.pidfd), tuple(server.uffds), pid, restored_pidfd, future)
        threading.Thread(target=_probe_restore, args=(probe, self._self), name=f"cer-lazy-bind-{server_id}",
                         daemon=True).start()
        return future

    def put(self, server_id: str) -> str:
        """End a server now (``released``); a process bound to it that lacks pages is killed. For a server
        that has ended already, its outcome."""
        server = self._servers.get(server_id)
        if server is None:
            return self._ended_entry(server_id)["outcome"]
        if server.state in ("starting", "spare"):
            raise NotFound(f"lazy-pages server {server_id} is not handed out")
        self._end(server, "released", "given back by its client")
        return "released"

    def status(self) -> pykka.Future:
        """A future of what the servers are doing; what /proc and the working-set files say is read in a
        thread, off the actor."""
        now = self._now()
        servers = [{
            "server_id": server.server_id, "ref": str(server.ref), "state": server.state, "pid": server.pid,
            "work_dir": server.work_dir, "images": server.images, "age_seconds": round(now - server.started, 3),
            "holder_pid": server.holder_pid, "restored_pid": server.restored_pid,
            "restore_connected": bool(server.uffds), "deadline_in_seconds": self._deadline_in(server, now),
        } for server in self._servers.values()]
        status = {
            "supported": self._unsupported is None, "unsupported_reason": self._unsupported, "criu": self._criu,
            "deadline_seconds": self._settings.deadline, "spares": self._settings.spares, "servers": servers,
            "ended": list(self._ended), "counts": dict(self._counts), "server": self._settings.server,
            "criu_kdat_cached": self._kdat_cached,
        }
        future = pykka.ThreadingFuture()
        threading.Thread(target=_complete_status, args=(status, self._root, future), name="cer-lazy-status",
                         daemon=True).start()
        return future

    def forget_working_set(self, ref: CheckpointRef) -> bool:
        """Remove ``ref``'s recorded working set: its next lazy restore records one anew. Whether there was one."""
        try:
            os.unlink(working_set.path_for(self._root, str(ref)))
        except FileNotFoundError:
            return False
        logger.info("working set of {} forgotten", ref)
        return True

    # -- what other actors, threads, timers and the watcher report -----------------------------------------

    @told
    def checkpoint_lent(self, server_id: str, ref: CheckpointRef, images: str | None, error: Exception | None) -> None:
        """The extractor's answer for a server being started (CheckpointExtractor.lend)."""
        server = self._servers.get(server_id)
        if server is None:
            if images is not None:
                tell(self._extractor.put, ref)  # the server was ended before its images came
            return
        if error is not None:
            self._drop(server, error)
            return
        server.images = images
        server.starting = pykka.ThreadingFuture()
        threading.Thread(target=_start_server, args=(server_id, self._command(ref, images, server.work_dir), server.work_dir,
                                                     server.starting, self._self),
                         name=f"cer-lazy-start-{server_id}", daemon=True).start()

    @told
    def server_started(self, server_id: str) -> None:
        """A server's start thread is done: its process runs, or could not be started."""
        server = self._servers[server_id]  # a server is never dropped while its start runs
        starting, server.starting = server.starting, None
        try:
            process, pidfd = starting.get(timeout=0)
        except Exception as error:  # noqa: BLE001 - whatever kept it from starting is the request's answer
            tell(self._extractor.put, server.ref)
            self._drop(server, Unavailable(f"cannot start a lazy-pages server ({self._settings.server}): {error}"))
            return
        self._started(server, process, pidfd)

    @told
    def server_ready(self, server_id: str) -> None:
        server = self._servers.get(server_id)
        if server is None or server.state != "starting" or server.outcome is not None:
            return
        logger.debug("lazy-pages server {} ready after {:.3f} s", server_id, self._now() - server.started)
        if server.request is not None:
            self._hand_out(server, server.request)
        else:
            server.state = "spare"

    @told
    def server_not_ready(self, server_id: str) -> None:
        """A server's ready timeout (from the timer service)."""
        server = self._servers.get(server_id)
        if server is None or server.state != "starting":
            return
        timeout = self._settings.ready_timeout
        if server.images is None:
            reason = f"the checkpoint extractor did not answer within {timeout:g} s"
        elif server.process is None:
            reason = f"its process did not start within {timeout:g} s"
        else:
            reason = f"no {SOCKET_NAME} within {timeout:g} s"
        self._end(server, "not_ready", reason)

    @told
    def deadline_passed(self, server_id: str) -> None:
        """A server's deadline, as a spare or handed out (from the timer service); one moved later since
        was armed anew, and this call is moot."""
        server = self._servers.get(server_id)
        if server is None:
            return
        if server.lease is not None:
            if self._leases.expired(server.lease):
                self._end(server, "expired", f"not done {self._settings.deadline:g} s after it was handed out")
        elif self._now() >= server.started + self._settings.deadline:
            self._end(server, "unused", f"not taken within {self._settings.deadline:g} s")

    @told
    def holder_exited(self, key: tuple, pid: int) -> None:
        """From the process watcher: a server (``key[2] == "server"``) or the holder of one exited."""
        _lazy, server_id, role = key
        server = self._servers.get(server_id)
        if server is None:
            return
        if role == "server":
            self._server_exited(server)
        elif role == "holder" and server.state == "waiting" and self._leases.bound_to(server.lease, pid):
            threading.Thread(target=_read_reached, args=(server_id, pid, server.pid, self._self),
                             name=f"cer-lazy-holder-{server_id}", daemon=True).start()

    @told
    def holder_left(self, server_id: str, pid: int, reached: bool) -> None:
        """Whether a restore had reached the server whose holder ``pid`` exited (from ``_read_reached``)."""
        server = self._servers.get(server_id)
        if server is None or server.state != "waiting" or server.reaping is not None:
            return  # bound, or ended, meanwhile
        if reached:
            # A restore is under way: stopping the server now would leave holes in it.
            logger.warning("lazy-pages server {}: its holder {} exited during the restore; serving it to the end",
                           server_id, pid)
        else:
            self._end(server, "abandoned", f"holder process {pid} exited before a restore came")

    @told
    def server_stopping(self, server_id: str, connected: bool) -> None:
        """A server is being killed; whether a restore had reached it (from ``_kill_server``, before the kill)."""
        server = self._servers.get(server_id)
        if server is not None:
            server.connected = connected

    @told
    def server_reaped(self, server_id: str) -> None:
        """A server's process is reaped and its work directory removed (from the reaping thread)."""
        server = self._servers[server_id]  # a server is never dropped while it is reaped
        self._conclude(server, server.reaping.get(timeout=0))

    @told
    def restore_probed(self, probe: _Probe, state: str | None, taken: tuple[int, ...], error: Exception | None) -> None:
        """What a bind's thread found (``_probe_restore``); recorded here, where the server's end is seen."""
        try:
            self._record_bind(probe, state, taken, error)
        except Exception as failure:
            _fail(probe.future, failure)
            raise

    # -- internals --------------------------------------------------------------------------------------

    def _find(self, ref: CheckpointRef, state: str) -> _Server | None:
        return next((s for s in self._live() if s.ref == ref and s.state == state and s.request is None), None)

    def _start_spares(self, ref: CheckpointRef) -> None:
        ready = [s for s in self._live() if s.ref == ref and s.state in ("starting", "spare") and s.request is None]
        for _ in range(self._settings.spares - len(ready)):
            if len(self._live()) >= self._settings.max_servers:
                return  # spares never take the place of a restore
            try:
                self._spawn(ref)
            except Unavailable as error:
                logger.warning("no spare lazy-pages server for {}: {}", ref, error)
                return

    def _live(self) -> list[_Server]:
        """Servers not being ended already."""
        return [s for s in self._servers.values() if s.outcome is None]

    def _make_room(self, ref: CheckpointRef) -> None:
        """Refuse (``exhausted``) a new server beyond the caps; a spare of another checkpoint gives way."""
        live = self._live()
        mine = [s for s in live if s.ref == ref]
        if len(mine) >= self._settings.max_per_checkpoint:
            raise Exhausted(
                f"{ref} has {len(mine)} lazy-pages servers already, the most per checkpoint (cer start "
                f"--lazy-max-per-checkpoint): give back unused ones (checkpoint.lazy_put) or try again later"
            )
        if len(live) < self._settings.max_servers:
            return
        spare = next((s for s in live if s.state in ("starting", "spare") and s.request is None), None)
        if spare is None:
            raise Exhausted(
                f"{len(live)} lazy-pages servers are running, the most this daemon runs (cer start --lazy-max-servers): "
                f"give back unused ones (checkpoint.lazy_put) or try again later"
            )
        self._end(spare, "unused", "its place was needed for a restore")

    def _spawn(self, ref: CheckpointRef) -> _Server:
        """A new server, starting: the extractor lends it the images (``checkpoint_lent``), a thread starts its
        process (``server_started``) and reports it ready (``server_ready``), all within ``ready_timeout``."""
        server_id = f"{os.getpid()}-{next(self._serial)}"
        server = _Server(server_id, ref, os.path.join(self._base, server_id), self._now())
        if not tell(self._extractor.lend, ref, self._self.checkpoint_lent, server_id):
            raise Unavailable("the checkpoint extractor has stopped")
        self._servers[server_id] = server
        server.timers = [
            self._timers.call_later(self._settings.ready_timeout, self._self.server_not_ready.defer, server_id),
            self._timers.call_later(self._settings.deadline, self._self.deadline_passed.defer, server_id),
        ]
        return server

    def _started(self, server: _Server, process: subprocess.Popen, pidfd: int) -> None:
        # Our child, not reaped until we wait for it: its pid cannot name another process before then.
        server.process, server.pidfd = process, pidfd
        self._counts["started"] += 1
        watch = os.dup(pidfd)
        if not tell(self._watcher.watch, watch, process.pid, self._self, ("lazy", server.server_id, "server")):
            os.close(watch)
            logger.error("lazy-pages server {} started with no process watcher to report its exit", server.server_id)
        if server.outcome is not None:
            self._kill(server)  # ended while it started

    def _drop(self, server: _Server, error: Exception) -> None:
        """Forget a server that never got a process (the extractor or its start failed)."""
        del self._servers[server.server_id]
        server.cancel_timers()
        if server.request is not None:
            server.request.fail(error)
        else:
            logger.warning("no spare lazy-pages server for {}: {}", server.ref, error)

    def _command(self, ref: CheckpointRef, images: str, work_dir: str) -> list[str]:
        """The server's command line; both kinds carry ``lazy-pages`` and ``-W work_dir`` (_kill_leftovers)."""
        if self._settings.server == "criu":
            return [self._criu, "lazy-pages", "-D", images, "-W", work_dir, "-o", LOG_NAME]
        return [sys.executable, "-m", "cer.lazy.server", "lazy-pages", "-D", images, "-W", work_dir, "-o", LOG_NAME,
                "--working-set", working_set.path_for(self._root, str(ref)), "--ref", str(ref),
                "--record-quiet", str(self._settings.record_quiet), "--record-limit", str(self._settings.record_limit)]

    def _hand_out(self, server: _Server, request: Waiter) -> None:
        server.request = None
        server.state = "waiting"
        server.cancel_timers()
        self._counts["handed_out"] += 1
        server.holder_pid = None if request.holder is None else request.holder.pid
        server.lease = self._leases.hand_out(server.server_id, ("lazy", server.server_id, "holder"), request.holder)
        self._leases.expire_after(server.lease, self._settings.deadline, self._self.deadline_passed.defer, server.server_id)
        logger.info("lazy-pages server {} of {} handed out (pid {}, {})", server.server_id, server.ref, server.pid,
                    server.work_dir)
        request.answer(server.reply(self._settings.deadline))

    def _deadline_in(self, server: _Server, now: float) -> float | None:
        due = server.lease.expires if server.lease is not None else server.started + self._settings.deadline
        return round(max(0.0, due - now), 3)

    def _check_unbound(self, server: _Server, pid: int) -> None:
        other = next((s for s in self._servers.values() if s is not server and s.restored_pid == pid), None)
        if other is not None:
            raise BadRequest(f"process {pid} is bound to lazy-pages server {other.server_id} already")

    def _unbound_state(self, server_id: str) -> str:
        """A bind's answer for a server that has ended: ``completed``, or Unavailable."""
        ended = self._ended_entry(server_id)
        if ended["outcome"] == "completed":
            return "completed"
        raise Unavailable(
            f"lazy-pages server {server_id} ended ({ended['outcome']}: {ended['reason']}) before its restore was "
            f"bound: the restored process may lack pages that never came; stop it (the daemon kills only "
            f"processes bound to a live server)"
        )

    def _record_bind(self, probe: _Probe, state: str | None, taken: tuple[int, ...], error: Exception | None) -> None:
        server = self._servers.get(probe.server_id)
        if server is None:  # it ended while the probe ran: nothing may be tied to it now
            for fd in taken:
                os.close(fd)
            os.close(probe.restored_pidfd)
            try:
                probe.future.set(self._unbound_state(probe.server_id))
            except CerError as refused:
                _fail(probe.future, refused)
            return
        self._hold(server, taken)
        if error is None:
            try:
                self._check_unbound(server, probe.pid)
            except BadRequest as refused:
                error = refused
        if error is not None:
            os.close(probe.restored_pidfd)
            _fail(probe.future, error)
            return
        if state == "completed":
            os.close(probe.restored_pidfd)
            logger.info("lazy-pages server {}: process {} waits on no userfaultfd and the server serves none any more: "
                        "nothing to protect", server.server_id, probe.pid)
            probe.future.set(state)
            return
        if server.restored_pidfd is not None:
            os.close(server.restored_pidfd)
        server.restored_pid, server.restored_pidfd = probe.pid, probe.restored_pidfd
        self._leases.unbind(server.lease)  # its restore is bound now: the holder's exit no longer matters
        server.state = "serving"
        logger.info("lazy-pages server {}: serving process {} ({} userfaultfd(s) held)", server.server_id, probe.pid,
                    len(server.uffds))
        probe.future.set("serving")

    @staticmethod
    def _hold(server: _Server, taken: tuple[int, ...]) -> None:
        """Keep one duplicate of each of the server's userfaultfds: two probes at once may take the same."""
        own = os.getpid()
        for fd in taken:
            if any(same_open_file(own, held, own, fd) for held in server.uffds):
                os.close(fd)
            else:
                server.uffds.append(fd)

    def _end(self, server: _Server, outcome: str, reason: str) -> None:
        """End a server ourselves; the rest happens when its exit is reported (``_server_exited``), or, for one
        whose process has not started yet, when the extractor or the start thread answers."""
        if server.process is None and server.starting is None:
            # Still waiting for the extractor: its late answer is given back (checkpoint_lent).
            self._finish(server, outcome, reason, False, None)
            return
        if server.outcome is None:
            server.outcome, server.reason = outcome, reason
        if server.process is not None:
            self._kill(server)

    def _kill(self, server: _Server) -> None:
        """Kill a server's process, once (what it forked goes when it is reaped, ``_reap_now``). Whether a
        restore had reached it is read first, while its fds are there: in a thread, but for at shutdown,
        when no report would be read."""
        if server.killed or server.reaping is not None:
            return
        server.killed = True
        if self._stopping:
            server.connected = bool(server.uffds) or has_uffd(server.pid)
            kill_process(server.pidfd)
            return
        threading.Thread(target=_kill_server, args=(server.server_id, server.pid, os.dup(server.pidfd), bool(server.uffds),
                                                    self._self),
                         name=f"cer-lazy-kill-{server.server_id}", daemon=True).start()

    def _server_exited(self, server: _Server) -> None:
        if server.reaping is not None:
            return
        server.reaping = pykka.ThreadingFuture()
        threading.Thread(target=_reap, args=(server.server_id, server.process, server.work_dir, server.reaping, self._self),
                         name=f"cer-lazy-reap-{server.server_id}", daemon=True).start()

    def _conclude(self, server: _Server, exit: _Exit) -> None:
        outcome = server.outcome or ("completed" if exit.status == 0 else "failed")
        reason = server.reason or _describe_status(exit.status)
        if outcome == "completed":
            self._finish(server, outcome, reason, False, exit.stats)
            return
        if server.request is not None or outcome == "not_ready":
            reason = f"{reason}: {exit.log_tail}"
        killed = False
        if server.restored_pidfd is not None:
            killed = kill_process(server.restored_pidfd)
            if killed:
                logger.error("lazy-pages server {} ended ({}: {}) before process {} had all its pages: killed it",
                             server.server_id, outcome, reason, server.restored_pid)
        elif server.state == "waiting" and (server.connected or outcome == "failed"):
            logger.warning("lazy-pages server {} ended ({}: {}) with no restored process bound to it: the restore it "
                           "served may lack pages", server.server_id, outcome, reason)
        self._finish(server, outcome, reason, killed, exit.stats)

    def _finish(self, server: _Server, outcome: str, reason: str, killed: bool, stats: dict | None) -> None:
        del self._servers[server.server_id]
        server.cancel_timers()
        if server.request is not None:
            server.request.fail(Unavailable(f"the lazy-pages server for {server.ref} did not get ready ({reason})"))
        if server.lease is not None:
            self._leases.release(server.lease)
        # The restored process is dead (or was never at risk) before cer lets go of its userfaultfds.
        _release_later(server.restored_pidfd if killed else None, server.uffds)
        if not killed and server.restored_pidfd is not None:
            os.close(server.restored_pidfd)
        if server.pidfd is not None:
            os.close(server.pidfd)
        if server.images is not None:
            tell(self._extractor.put, server.ref)
        self._counts[outcome] += 1
        now = self._now()
        self._ended.append({
            "server_id": server.server_id, "ref": str(server.ref), "outcome": outcome, "reason": reason,
            "pid": server.pid, "seconds": round(now - server.started, 3),
            "served_seconds": None if server.lease is None else round(now - server.lease.since, 3),
            "restored_pid": server.restored_pid, "restored_killed": killed, "server": self._settings.server,
            "stats": stats,
        })
        log = logger.warning if killed or server.connected or outcome in ("failed", "not_ready") else logger.info
        log("lazy-pages server {} of {} ended: {} ({})", server.server_id, server.ref, outcome, reason)
        if server.lease is not None and not self._stopping:
            self._start_spares(server.ref)

    def _ended_entry(self, server_id: str) -> dict:
        entry = next((item for item in reversed(self._ended) if item["server_id"] == server_id), None)
        if entry is None:
            raise NotFound(f"no lazy-pages server {server_id} (ids of an earlier daemon are not known)")
        return entry

    # -- shutdown -------------------------------------------------------------------------------------

    def on_stop(self) -> None:
        self._shut_down()

    def on_failure(self, *exc_info: object) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        """End every server, giving those with a restore in progress ``shutdown_grace`` seconds (all at once)
        to finish. The one place the actor waits: it must not stop while a server it started runs."""
        self._stopping = True
        for server in list(self._servers.values()):
            server.cancel_timers()
            if server.lease is not None and server.lease.timer is not None:
                server.lease.timer.cancel()
            if server.starting is not None:  # its report will not be read: take the start's result here
                starting, server.starting = server.starting, None
                try:
                    process, pidfd = starting.get(timeout=_REAP_TIMEOUT)
                except Exception as error:  # noqa: BLE001 - it did not start, or is stuck starting: nothing to stop
                    logger.error("lazy-pages server {} did not start cleanly at shutdown: {}", server.server_id, error)
                else:
                    self._started(server, process, pidfd)
            if server.process is None:
                # Its images, if the extractor lends them yet, go back to it (CheckpointExtractor.lend).
                self._finish(server, "stopped", "the daemon stopped", False, None)
        busy = [s for s in self._servers.values()
                if s.reaping is None and (s.state == "serving" or (s.state == "waiting" and has_uffd(s.pid)))]
        for server in list(self._servers.values()):
            if server not in busy:
                self._end(server, "stopped", "the daemon stopped")
        if busy:
            logger.info("waiting up to {:g} s for {} lazy restore(s) to get all their pages", self._settings.shutdown_grace,
                        len(busy))
            done = wait_exited([s.pidfd for s in busy], self._settings.shutdown_grace)
            for server in busy:
                if server.pidfd not in done:
                    logger.warning("lazy-pages server {} still serving at shutdown: stopping it and its restored process",
                                   server.server_id)
                    self._end(server, "stopped", "the daemon stopped before its restore had all its pages")
        servers = list(self._servers.values())
        exited = wait_exited([s.pidfd for s in servers if s.reaping is None], _REAP_TIMEOUT)
        for server in servers:
            if server.reaping is not None:
                try:
                    exit = server.reaping.get(timeout=_REAP_TIMEOUT)
                except Exception as error:  # noqa: BLE001 - one server's failure must not leave the others running
                    logger.error("lazy-pages server {} (pid {}) is not reaped: {}", server.server_id, server.pid, error)
                    continue
            elif server.pidfd in exited:
                exit = _reap_now(server.process, server.work_dir)
            else:
                logger.error("lazy-pages server {} (pid {}) does not die", server.server_id, server.pid)
                continue
            self._conclude(server, exit)
        shutil.rmtree(self._base, ignore_errors=True)
        try:  # kept only when it holds a working set
            os.rmdir(os.path.join(self._root, working_set.DIRECTORY))
        except OSError:
            pass


@dataclass(frozen=True, eq=False)
class _Probe:
    """A bind under way: what its thread reads and what it answers."""

    server_id: str
    server_pid: int
    server_pidfd: int  # the thread's own duplicate: the actor may close the server's meanwhile
    held: tuple[int, ...]  # the userfaultfds the actor holds already
    pid: int
    restored_pidfd: int
    future: pykka.ThreadingFuture


# -- helpers, run in threads of their own (or in the actor, where said) -----------------------------------

def _start_server(server_id: str, command: list[str], work_dir: str, started: pykka.ThreadingFuture,
                  actor: pykka.ActorProxy) -> None:
    """Start a server's process in ``work_dir``: ``started`` gets its (process, pidfd), and the actor hears
    ``server_started``; then tell it ``server_ready`` once the server's socket exists. A server that exits
    first is the watcher's to report."""
    try:
        os.mkdir(work_dir, 0o700)
        with open(os.path.join(work_dir, "lazy-pages.stderr"), "wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, cwd=work_dir,
                                       start_new_session=True)
        pidfd = pidfd_open(process.pid)  # our child, not reaped: the pid is still its own
        watch = os.dup(pidfd)  # this thread's: the actor closes the server's when the server ends
    except Exception as error:  # noqa: BLE001 - handed to the actor, which answers the request with it
        shutil.rmtree(work_dir, ignore_errors=True)
        _fail(started, error)
        tell(actor.server_started, server_id)
        return
    started.set((process, pidfd))
    tell(actor.server_started, server_id)
    try:
        socket = os.path.join(work_dir, SOCKET_NAME)
        while not os.path.exists(socket):
            if has_exited(watch, _READY_POLL):
                return
        tell(actor.server_ready, server_id)
    finally:
        os.close(watch)


def _kill_server(server_id: str, pid: int, pidfd: int, held: bool, actor: pykka.ActorProxy) -> None:
    """Tell the actor whether a restore had reached the server, then kill it: the report is in the actor's
    inbox before the watcher can see the exit."""
    try:
        tell(actor.server_stopping, server_id, held or has_uffd(pid))
        kill_process(pidfd)
    finally:
        os.close(pidfd)


def _read_reached(server_id: str, holder_pid: int, server_pid: int, actor: pykka.ActorProxy) -> None:
    """Whether a restore has reached the server whose holder exited: it holds the restore's userfaultfds."""
    tell(actor.holder_left, server_id, holder_pid, has_uffd(server_pid))


def _reap_now(process: subprocess.Popen, work_dir: str) -> _Exit:
    """Reap a server that has exited, after killing what it forked; read what it left and remove its work
    directory. (The actor calls this itself only at shutdown.)"""
    # Not reaped yet, so its pid still names its process group: CRIU's start-up forks helpers (a stopped
    # ptrace test child among them) that outlive a server killed at that moment.
    kill_process_group(process.pid)
    status = process.wait()
    exit = _Exit(status, _read_stats(work_dir), _log_tail(work_dir))
    shutil.rmtree(work_dir, ignore_errors=True)
    return exit


def _reap(server_id: str, process: subprocess.Popen, work_dir: str, reaped: pykka.ThreadingFuture,
          actor: pykka.ActorProxy) -> None:
    try:
        reaped.set(_reap_now(process, work_dir))
    except Exception as error:  # noqa: BLE001 - the actor logs it as the failure of server_reaped
        _fail(reaped, error)
    tell(actor.server_reaped, server_id)


def _probe_restore(probe: _Probe, actor: pykka.ActorProxy) -> None:
    """A bind's /proc readings and userfaultfd probes (see ``LazyPagesServers.bind``); the actor records
    the result (``restore_probed``) and answers."""
    taken: tuple[int, ...] = ()
    state = error = None
    try:
        taken = _take_uffds(probe)
        state = _restored_state(probe, probe.held + taken)
    except Exception as failure:  # noqa: BLE001 - the bind's answer
        error = failure
    finally:
        os.close(probe.server_pidfd)
    if not tell(actor.restore_probed, probe, state, taken, error):
        for fd in taken:
            os.close(fd)
        os.close(probe.restored_pidfd)
        _fail(probe.future, Unavailable("the daemon is stopping: stop the restored process"))


def _take_uffds(probe: _Probe) -> tuple[int, ...]:
    """A duplicate of each userfaultfd of the server the actor does not hold yet (told apart with kcmp):
    however often a client binds, the daemon holds each once."""
    own = os.getpid()
    taken = []
    for fd in uffd_fds(probe.server_pid):
        try:
            if any(same_open_file(own, held, probe.server_pid, fd) for held in probe.held):
                continue
            taken.append(pidfd_getfd(probe.server_pidfd, fd))
        except OSError as error:  # closed meanwhile, or the server is gone: nothing to hold
            logger.debug("lazy-pages server {}: cannot hold fd {}: {}", probe.server_id, fd, error)
    return tuple(taken)


def _restored_state(probe: _Probe, uffds: tuple[int, ...]) -> str:
    """``serving`` when process ``probe.pid`` is provably what the server's restore made: its memory that waits
    on a userfaultfd is the memory one of the server's serves, or (when nothing of its own waits any more,
    its children's pages may still be on their way) it is the init of the pid namespace of a process whose
    is. ``completed`` when nothing of it waits on a userfaultfd and the server, reached by its restore, has
    none left (it has delivered all and is about to exit). Anything else is refused (BadRequest)."""
    pid = probe.pid
    mappings = uffd_mappings(pid)
    tasks = [pid] if mappings else tasks_of_namespace_led_by(pid)
    tied = any(_serves_all(uffd, uffd_mappings(task) if task != pid else mappings) for task in tasks for uffd in uffds)
    # Read after the pidfd was opened and checked alive after: what was read was this very process's.
    if has_exited(probe.restored_pidfd):
        raise NotFound(f"process {pid} is not running")
    if tied:
        return "serving"
    if listening(probe.server_pid):
        raise BadRequest(f"no restore has reached lazy-pages server {probe.server_id} yet: bind the process its "
                         f"restore made, once the restore has returned")
    if not mappings and not uffd_fds(probe.server_pid):
        return "completed"
    raise BadRequest(
        f"process {pid} is not the restore of lazy-pages server {probe.server_id}: "
        + ("none of its memory waits on a userfaultfd" if not mappings else
           "its lazily restored memory is not the memory this server's userfaultfds serve")
    )


def _complete_status(status: dict, root: str, future: pykka.ThreadingFuture) -> None:
    """Add to the actor's status what /proc and the working-set files say, and answer it."""
    try:
        for server in status["servers"]:
            if not server["restore_connected"] and server["pid"] is not None:
                server["restore_connected"] = has_uffd(server["pid"])
        status["working_sets"] = _working_sets(root)
    except Exception as error:  # noqa: BLE001 - the status request's answer
        _fail(future, error)
        return
    future.set(status)


def _working_sets(root: str) -> dict[str, dict]:
    """Every recorded working set, by checkpoint (read from the files: servers write them)."""
    found = {}
    directory = os.path.join(root, working_set.DIRECTORY)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".ws"):
            continue
        path = os.path.join(directory, name)
        try:
            header = working_set.read_header(path)
        except (OSError, working_set.WorkingSetError) as error:
            logger.debug("working set {}: {}", path, error)
            continue
        if working_set.path_for(root, header["ref"]) != path:
            continue  # not where that checkpoint's set would be: not cer's
        found[header["ref"]] = {"pages": header["pages"], "bytes": header["pages"] * 4096,
                                "recorded": header["recorded"], "seconds": header["seconds"]}
    return found


def _fail(future: pykka.ThreadingFuture, error: Exception) -> None:
    future.set_exception(exc_info=(type(error), error, None))


def _read_stats(work_dir: str) -> dict | None:
    """What cer's server said it did (None for CRIU's, or a server that wrote nothing)."""
    try:
        with open(os.path.join(work_dir, STATS_NAME)) as file:
            stats = json.load(file)
    except (OSError, ValueError):
        return None
    return {key: stats.get(key) for key in _STATS_KEPT} if isinstance(stats, dict) else None


def _release_later(pidfd: int | None, uffds: list[int]) -> None:
    """Close cer's copies of a server's userfaultfds, after the killed process behind ``pidfd`` is gone."""
    if pidfd is None:
        for fd in uffds:
            os.close(fd)
        return

    def wait_then_close() -> None:
        try:
            if not select.select([pidfd], [], [], _REAP_TIMEOUT)[0]:
                logger.error("a killed restored process did not exit within {:g} s", _REAP_TIMEOUT)
        finally:
            os.close(pidfd)
            for fd in uffds:
                os.close(fd)

    threading.Thread(target=wait_then_close, name="cer-lazy-release", daemon=True).start()


def _serves_all(uffd: int, mappings: list[tuple[int, int]]) -> bool:
    """Whether every one of ``mappings`` (the first and last page of each) is registered in the memory that
    ``uffd`` serves: true of the process that memory is, and of no process whose layout differs."""
    if not mappings:
        return False
    try:
        return all(registered_page(uffd, start) and registered_page(uffd, end - 1)
                   for start, end in mappings[:_MAX_CHECKED_MAPPINGS])
    except OSError as error:  # that memory is gone, or being remapped: not provably the same
        logger.debug("userfaultfd probe failed: {}", error)
        return False


def _describe_status(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return "exited 0" if status == 0 else f"exited {status}"


def _log_tail(work_dir: str, lines: int = 5) -> str:
    text = []
    for name in (LOG_NAME, "lazy-pages.stderr"):
        try:
            with open(os.path.join(work_dir, name), errors="replace") as file:
                text += [line.strip() for line in file if line.strip()]
        except OSError:
            continue
    errors = [line for line in text if "Error" in line or "error" in line]
    return " | ".join((errors or text)[-lines:]) or "no log"


def _kill_leftovers(base: str) -> None:
    """Servers of a daemon killed with SIGKILL outlive it: find them by their work directory under ``base``."""
    prefix = base.rstrip("/") + "/"
    for pid, argv in command_lines().items():
        if b"lazy-pages" in argv and any(arg.decode(errors="replace").startswith(prefix) for arg in argv):
            logger.warning("killing lazy-pages server {} left by an earlier run", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


