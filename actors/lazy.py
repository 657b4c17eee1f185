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

- **starting**: spawned; it is ready once its socket exists (bounded by ``ready_timeout``). A request
  waits for that before it is answered.
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
directory removed, its fds closed and its user of the checkpoint directory (``CheckpointExtractor.get``)
given back.

Exits are noticed through pidfds handed to the ProcessWatcher (servers and holders), which tells
``holder_exited``. At shutdown, servers with a restore in progress get ``shutdown_grace`` seconds to
finish; then every server left is killed, its restored process too. Servers left by a daemon killed
with SIGKILL (they outlive it) are found by their work directory at the next start and killed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import pykka
from loguru import logger

from cer.errors import BadRequest, Exhausted, NotFound, Unavailable
from cer.kdat import CACHE_NAME as KDAT_CACHE_NAME
from cer.kdat import RUN as KDAT_RUN
from cer.kdat import run_is_tmpfs
from cer.lazy import working_set
from cer.linux.processes import pidfd_getfd, pidfd_open, same_open_file
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


@dataclass(eq=False)
class _Request:
    future: pykka.ThreadingFuture
    holder_pid: int | None
    holder_pidfd: int | None


@dataclass(eq=False)
class _Server:
    server_id: str
    ref: CheckpointRef
    images: str
    work_dir: str
    process: subprocess.Popen
    pidfd: int
    started: float
    state: str = "starting"  # starting, spare, waiting, serving
    request: _Request | None = None  # the request waiting for this server to get ready
    handed_out: float | None = None
    holder_pid: int | None = None
    restored_pid: int | None = None
    restored_pidfd: int | None = None
    uffds: list[int] = field(default_factory=list)
    outcome: str | None = None  # set when cer ends the server itself
    reason: str | None = None
    connected: bool = False  # a restore had reached it when cer ended it
    timer: threading.Timer | None = None

    @property
    def socket(self) -> str:
        return os.path.join(self.work_dir, SOCKET_NAME)

    def reply(self, deadline: float) -> LazyServer:
        return LazyServer(self.server_id, self.process.pid, self.work_dir, self.socket, self.images, deadline)


class LazyPagesServers(pykka.ThreadingActor):
    """Starts, hands out, watches and ends lazy-pages servers (see the module's docstring)."""

    def __init__(
        self, root: str, extractor: pykka.ActorProxy, watcher: pykka.ActorProxy, settings: LazySettings = LazySettings(),
        ask_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self._base = os.path.join(root, LAZY_DIRECTORY)
        self._root = root
        self._extractor = extractor
        self._watcher = watcher
        self._settings = settings
        self._ask_timeout = ask_timeout
        self._servers: dict[str, _Server] = {}
        self._ended: deque[dict] = deque(maxlen=_HISTORY)
        self._counts: Counter = Counter()
        self._serial = itertools.count(1)
        self._criu: str | None = None
        self._unsupported: str | None = None
        self._stopping = False

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
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
        the error). With ``holder_pid``, the server is stopped if that process exits before a restore
        reached it."""
        if self._unsupported:
            raise Unavailable(f"lazy restores are not available on this host: {self._unsupported}")
        spare = self._find(ref, "spare") or self._find(ref, "starting")
        if spare is None:
            self._make_room(ref)
        request = _Request(pykka.ThreadingFuture(), holder_pid, _open_holder(holder_pid))
        try:
            server = spare if spare is not None else self._spawn(ref)
        except BaseException:
            _close(request.holder_pidfd)
            raise
        if server.state == "spare":
            self._hand_out(server, request)
        else:
            server.request = request
        return request.future

    def bind(self, server_id: str, pid: int) -> str:
        """Process ``pid`` was restored with server ``server_id``: if the server ends before it has delivered
        all its pages, the process is killed. Returns the server's state (``serving``, or ``completed`` when
        it is done already).

        The daemon kills only a process it has tied to this server's restore itself: every mapping the
        process has registered with a userfaultfd must be registered, at the same address, in the memory
        that one of this server's userfaultfds serves (``_restored_state``). Nothing else is ever killed, not
        even for a server that has ended: such a bind is ``unavailable`` and the client removes its container.
        """
        server = self._servers.get(server_id)
        if server is None:
            ended = self._ended_entry(server_id)
            if ended["outcome"] == "completed":
                return "completed"
            raise Unavailable(
                f"lazy-pages server {server_id} ended ({ended['outcome']}: {ended['reason']}) before its restore was "
                f"bound: the restored process may lack pages that never came; stop it (the daemon kills only "
                f"processes bound to a live server)"
            )
        if server.state in ("starting", "spare"):
            raise NotFound(f"lazy-pages server {server_id} is not handed out")
        other = next((s for s in self._servers.values() if s is not server and s.restored_pid == pid), None)
        if other is not None:
            raise BadRequest(f"process {pid} is bound to lazy-pages server {other.server_id} already")
        try:
            restored_pidfd = pidfd_open(pid)
        except ProcessLookupError:
            raise NotFound(f"process {pid} is not running") from None
        try:
            self._hold_uffds(server)
            state = self._restored_state(server, pid, restored_pidfd)
        except BaseException:
            os.close(restored_pidfd)
            raise
        if state == "completed":
            os.close(restored_pidfd)
            logger.info("lazy-pages server {}: process {} waits on no userfaultfd and the server serves none any more: "
                        "nothing to protect", server_id, pid)
            return state
        _close(server.restored_pidfd)
        server.restored_pid, server.restored_pidfd = pid, restored_pidfd
        if server.holder_pid is not None:
            self._watcher.unwatch(("lazy", server_id, "holder"))
        server.state = "serving"
        logger.info("lazy-pages server {}: serving process {} ({} userfaultfd(s) held)", server_id, pid, len(server.uffds))
        return "serving"

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

    def status(self) -> dict:
        now = time.monotonic()
        servers = []
        for server in self._servers.values():
            servers.append({
                "server_id": server.server_id, "ref": str(server.ref), "state": server.state, "pid": server.process.pid,
                "work_dir": server.work_dir, "images": server.images, "age_seconds": round(now - server.started, 3),
                "holder_pid": server.holder_pid, "restored_pid": server.restored_pid,
                "restore_connected": bool(server.uffds) or _has_uffd(server.process.pid),
                "deadline_in_seconds": self._deadline_in(server, now),
            })
        return {
            "supported": self._unsupported is None, "unsupported_reason": self._unsupported, "criu": self._criu,
            "deadline_seconds": self._settings.deadline, "spares": self._settings.spares, "servers": servers,
            "ended": list(self._ended), "counts": dict(self._counts), "server": self._settings.server,
            "working_sets": self._working_sets(), "criu_kdat_cached": self._kdat_cached,
        }

    def forget_working_set(self, ref: CheckpointRef) -> bool:
        """Remove ``ref``'s recorded working set: its next lazy restore records one anew. Whether there was one."""
        try:
            os.unlink(working_set.path_for(self._root, str(ref)))
        except FileNotFoundError:
            return False
        logger.info("working set of {} forgotten", ref)
        return True

    def _working_sets(self) -> dict[str, dict]:
        """Every recorded working set, by checkpoint (read from the files: servers write them)."""
        found = {}
        directory = os.path.join(self._root, working_set.DIRECTORY)
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
            if working_set.path_for(self._root, header["ref"]) != path:
                continue  # not where that checkpoint's set would be: not cer's
            found[header["ref"]] = {"pages": header["pages"], "bytes": header["pages"] * 4096,
                                    "recorded": header["recorded"], "seconds": header["seconds"]}
        return found

    # -- what threads and the watcher report ------------------------------------------------------------

    def server_ready(self, server_id: str) -> None:
        server = self._servers.get(server_id)
        if server is None or server.state != "starting":
            return
        logger.debug("lazy-pages server {} ready after {:.3f} s", server_id, time.monotonic() - server.started)
        if server.request is not None:
            self._hand_out(server, server.request)
        else:
            server.state = "spare"

    def server_not_ready(self, server_id: str, reason: str) -> None:
        server = self._servers.get(server_id)
        if server is not None and server.state == "starting":
            self._end(server, "not_ready", reason)

    def deadline_passed(self, server_id: str, timer: threading.Timer) -> None:
        server = self._servers.get(server_id)
        if server is None or server.timer is not timer:
            return
        if server.state in ("starting", "spare"):
            self._end(server, "unused", f"not taken within {self._settings.deadline:g} s")
        else:
            self._end(server, "expired", f"not done {self._settings.deadline:g} s after it was handed out")

    def holder_exited(self, key: tuple, pid: int) -> None:
        """From the process watcher: a server (``key[2] == "server"``) or the holder of one exited."""
        _lazy, server_id, role = key
        server = self._servers.get(server_id)
        if server is None:
            return
        if role == "server":
            self._server_exited(server)
        elif role == "holder" and server.state == "waiting" and server.holder_pid == pid:
            if _has_uffd(server.process.pid):
                # A restore is under way: stopping the server now would leave holes in it.
                logger.warning("lazy-pages server {}: its holder {} exited during the restore; serving it to the end",
                               server_id, pid)
            else:
                self._end(server, "abandoned", f"holder process {pid} exited before a restore came")

    # -- internals --------------------------------------------------------------------------------------

    def _find(self, ref: CheckpointRef, state: str) -> _Server | None:
        return next((s for s in self._servers.values() if s.ref == ref and s.state == state and s.request is None), None)

    def _start_spares(self, ref: CheckpointRef) -> None:
        ready = [s for s in self._servers.values() if s.ref == ref and s.state in ("starting", "spare") and s.request is None]
        for _ in range(self._settings.spares - len(ready)):
            if len(self._live()) >= self._settings.max_servers:
                return  # spares never take the place of a restore
            try:
                self._spawn(ref)
            except (Unavailable, NotFound) as error:
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
        images = self._wait(self._extractor.get(ref), "the checkpoint extractor")  # a user until the server ends
        server_id = f"{os.getpid()}-{next(self._serial)}"
        work_dir = os.path.join(self._base, server_id)
        try:
            os.mkdir(work_dir, 0o700)
            with open(os.path.join(work_dir, "lazy-pages.stderr"), "wb") as stderr:
                process = subprocess.Popen(
                    self._command(ref, images, work_dir),
                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, cwd=work_dir, start_new_session=True,
                )
        except OSError as error:
            shutil.rmtree(work_dir, ignore_errors=True)
            self._extractor.put(ref)
            raise Unavailable(f"cannot start a lazy-pages server ({self._settings.server}): {error}") from None
        # Our child, not reaped until we wait for it: its pid cannot name another process before then.
        server = _Server(server_id, ref, images, work_dir, process, pidfd_open(process.pid), time.monotonic())
        self._servers[server_id] = server
        self._counts["started"] += 1
        self._watcher.watch(os.dup(server.pidfd), process.pid, self._self, ("lazy", server_id, "server"))
        self._arm_deadline(server)
        # The thread polls a pidfd of its own: the actor closes the server's when the server ends.
        threading.Thread(target=_await_ready, args=(server.socket, os.dup(server.pidfd), server_id,
                                                     self._settings.ready_timeout, self._self),
                         name=f"cer-lazy-ready-{server_id}", daemon=True).start()
        return server

    def _command(self, ref: CheckpointRef, images: str, work_dir: str) -> list[str]:
        """The server's command line; both kinds carry ``lazy-pages`` and ``-W work_dir`` (_kill_leftovers)."""
        if self._settings.server == "criu":
            return [self._criu, "lazy-pages", "-D", images, "-W", work_dir, "-o", LOG_NAME]
        return [sys.executable, "-m", "cer.lazy.server", "lazy-pages", "-D", images, "-W", work_dir, "-o", LOG_NAME,
                "--working-set", working_set.path_for(self._root, str(ref)), "--ref", str(ref),
                "--record-quiet", str(self._settings.record_quiet), "--record-limit", str(self._settings.record_limit)]

    def _hand_out(self, server: _Server, request: _Request) -> None:
        server.request = None
        server.state = "waiting"
        server.handed_out = time.monotonic()
        self._counts["handed_out"] += 1
        if request.holder_pidfd is not None:
            server.holder_pid = request.holder_pid
            self._watcher.watch(request.holder_pidfd, request.holder_pid, self._self, ("lazy", server.server_id, "holder"))
        self._arm_deadline(server)
        logger.info("lazy-pages server {} of {} handed out (pid {}, {})", server.server_id, server.ref, server.process.pid,
                    server.work_dir)
        request.future.set(server.reply(self._settings.deadline))

    def _arm_deadline(self, server: _Server) -> None:
        if server.timer is not None:
            server.timer.cancel()
        timer = threading.Timer(self._settings.deadline, lambda: _tell(self._self, "deadline_passed", server.server_id, timer))
        timer.daemon = True
        server.timer = timer
        timer.start()

    def _deadline_in(self, server: _Server, now: float) -> float | None:
        since = server.handed_out if server.handed_out is not None else server.started
        return round(max(0.0, since + self._settings.deadline - now), 3)

    def _hold_uffds(self, server: _Server) -> None:
        """Hold a duplicate of each userfaultfd the server has, once: one the daemon holds already is not
        taken again, however often a client binds."""
        own = os.getpid()
        for fd in _uffd_fds(server.process.pid):
            try:
                if any(same_open_file(own, held, server.process.pid, fd) for held in server.uffds):
                    continue
                server.uffds.append(pidfd_getfd(server.pidfd, fd))
            except OSError as error:  # closed meanwhile, or the server is gone: nothing to hold
                logger.debug("lazy-pages server {}: cannot hold fd {}: {}", server.server_id, fd, error)

    def _restored_state(self, server: _Server, pid: int, pidfd: int) -> str:
        """``serving`` when process ``pid`` is provably what ``server``'s restore made: its memory that waits on a
        userfaultfd is the memory one of the server's serves, or (when nothing of its own waits any more, its
        children's pages may still be on their way) it is the init of the pid namespace of a process whose is.
        ``completed`` when nothing of it waits on a userfaultfd and the server, reached by its restore, has none
        left (it has delivered all and is about to exit). Anything else is refused (BadRequest)."""
        mappings = _uffd_mappings(pid)
        tasks = [pid] if mappings else _tasks_of_namespace_led_by(pid)
        tied = any(_serves_all(uffd, _uffd_mappings(task) if task != pid else mappings)
                   for task in tasks for uffd in server.uffds)
        # Read after the pidfd was opened and checked alive after: what was read was this very process's.
        if _exited(pidfd, 0):
            raise NotFound(f"process {pid} is not running")
        if tied:
            return "serving"
        if _listening(server.process.pid):
            raise BadRequest(f"no restore has reached lazy-pages server {server.server_id} yet: bind the process its "
                             f"restore made, once the restore has returned")
        if not mappings and not _uffd_fds(server.process.pid):
            return "completed"
        raise BadRequest(
            f"process {pid} is not the restore of lazy-pages server {server.server_id}: "
            + ("none of its memory waits on a userfaultfd" if not mappings else
               "its lazily restored memory is not the memory this server's userfaultfds serve")
        )

    def _end(self, server: _Server, outcome: str, reason: str) -> None:
        """End a server ourselves; the rest happens when its exit is reported (``_server_exited``)."""
        if server.outcome is None:
            server.outcome, server.reason = outcome, reason
            server.connected = bool(server.uffds) or _has_uffd(server.process.pid)
        _kill_group(server)

    def _server_exited(self, server: _Server) -> None:
        # Not reaped yet, so its pid still names its process group: CRIU's start-up forks helpers (a stopped
        # ptrace test child among them) that outlive a server killed at that moment.
        _kill_group(server)
        status = server.process.wait()
        outcome = server.outcome or ("completed" if status == 0 else "failed")
        reason = server.reason or _describe_status(status)
        if outcome == "completed":
            self._finish(server, outcome, reason, killed=False)
            return
        if server.request is not None or outcome == "not_ready":
            reason = f"{reason}: {_log_tail(server.work_dir)}"
        killed = False
        if server.restored_pidfd is not None:
            killed = _kill(server.restored_pidfd)
            if killed:
                logger.error("lazy-pages server {} ended ({}: {}) before process {} had all its pages: killed it",
                             server.server_id, outcome, reason, server.restored_pid)
        elif server.state == "waiting" and (server.connected or outcome == "failed"):
            logger.warning("lazy-pages server {} ended ({}: {}) with no restored process bound to it: the restore it "
                           "served may lack pages", server.server_id, outcome, reason)
        self._finish(server, outcome, reason, killed)

    def _finish(self, server: _Server, outcome: str, reason: str, killed: bool) -> None:
        del self._servers[server.server_id]
        if server.timer is not None:
            server.timer.cancel()
        if server.request is not None:
            _close(server.request.holder_pidfd)
            server.request.future.set_exception(exc_info=(Unavailable, Unavailable(
                f"the lazy-pages server for {server.ref} did not get ready ({reason})"), None))
        if server.holder_pid is not None:
            self._watcher.unwatch(("lazy", server.server_id, "holder"))
        # The restored process is dead (or was never at risk) before cer lets go of its userfaultfds.
        _release_later(server.restored_pidfd if killed else None, server.uffds)
        if not killed:
            _close(server.restored_pidfd)
        os.close(server.pidfd)
        stats = _read_stats(server.work_dir)
        shutil.rmtree(server.work_dir, ignore_errors=True)
        self._extractor.put(server.ref)
        self._counts[outcome] += 1
        self._ended.append({
            "server_id": server.server_id, "ref": str(server.ref), "outcome": outcome, "reason": reason,
            "pid": server.process.pid, "seconds": round(time.monotonic() - server.started, 3),
            "served_seconds": None if server.handed_out is None else round(time.monotonic() - server.handed_out, 3),
            "restored_pid": server.restored_pid, "restored_killed": killed, "server": self._settings.server,
            "stats": stats,
        })
        log = logger.warning if killed or server.connected or outcome in ("failed", "not_ready") else logger.info
        log("lazy-pages server {} of {} ended: {} ({})", server.server_id, server.ref, outcome, reason)
        if server.handed_out is not None and not self._stopping:
            self._start_spares(server.ref)

    def _ended_entry(self, server_id: str) -> dict:
        entry = next((item for item in reversed(self._ended) if item["server_id"] == server_id), None)
        if entry is None:
            raise NotFound(f"no lazy-pages server {server_id} (ids of an earlier daemon are not known)")
        return entry

    def _wait(self, future: pykka.Future, who: str):
        try:
            return future.get(timeout=self._ask_timeout)
        except pykka.Timeout:
            raise Unavailable(f"{who} did not answer within {self._ask_timeout:g} s") from None
        except pykka.ActorDeadError:
            raise Unavailable(f"{who} has stopped") from None

    # -- shutdown -------------------------------------------------------------------------------------

    def on_stop(self) -> None:
        self._shut_down()

    def on_failure(self, *exc_info: object) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        self._stopping = True
        for server in self._servers.values():
            if server.timer is not None:
                server.timer.cancel()
        busy = [s for s in self._servers.values() if s.state == "serving" or (s.state == "waiting" and _has_uffd(s.process.pid))]
        for server in self._servers.values():
            if server not in busy:
                self._end(server, "stopped", "the daemon stopped")
        if busy:
            logger.info("waiting up to {:g} s for {} lazy restore(s) to get all their pages", self._settings.shutdown_grace,
                        len(busy))
            deadline = time.monotonic() + self._settings.shutdown_grace
            for server in busy:
                if not _exited(server.pidfd, max(0.0, deadline - time.monotonic())):
                    logger.warning("lazy-pages server {} still serving at shutdown: stopping it and its restored process",
                                   server.server_id)
                    self._end(server, "stopped", "the daemon stopped before its restore had all its pages")
        for server in list(self._servers.values()):
            if not _exited(server.pidfd, _REAP_TIMEOUT):
                logger.error("lazy-pages server {} (pid {}) does not die", server.server_id, server.process.pid)
                continue
            self._server_exited(server)
        shutil.rmtree(self._base, ignore_errors=True)
        try:  # kept only when it holds a working set
            os.rmdir(os.path.join(self._root, working_set.DIRECTORY))
        except OSError:
            pass


# -- helpers, run in the actor or in threads of their own ------------------------------------------------

def _await_ready(socket: str, pidfd: int, server_id: str, timeout: float, actor: pykka.ActorProxy) -> None:
    """Tell the actor once the server's socket exists (``pidfd`` is this thread's to close); an exit on
    the way is the watcher's to report."""
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(socket):
            left = deadline - time.monotonic()
            if left <= 0:
                _tell(actor, "server_not_ready", server_id, f"no {SOCKET_NAME} within {timeout:g} s")
                return
            if select.select([pidfd], [], [], min(_READY_POLL, left))[0]:
                return  # exited
        _tell(actor, "server_ready", server_id)
    finally:
        os.close(pidfd)


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


def _open_holder(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return pidfd_open(pid)
    except ProcessLookupError:
        raise NotFound(f"process {pid} is not running") from None


def _kill_group(server: _Server) -> None:
    """SIGKILL a server and whatever it forked (its own process group: started in a session of its own).
    Only while it is not reaped: until then its pid, hence its group id, cannot name anyone else."""
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exited(pidfd: int, timeout: float) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


def _kill(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _uffd_fds(pid: int) -> list[int]:
    fds = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                fds.append(int(name))
        except OSError:
            continue
    return fds


def _uffd_mappings(pid: int) -> list[tuple[int, int]]:
    """The mappings (start, end) of process ``pid`` registered with a userfaultfd for missing pages (``um``
    in smaps' VmFlags): those of a lazy restore wait on its server."""
    mappings = []
    start = end = 0
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    low, _, high = first.partition("-")
                    start, end = int(low, 16), int(high, 16)
                elif first == "VmFlags:" and " um" in line:
                    mappings.append((start, end))
    except (OSError, ValueError):
        return []
    return mappings


def _tasks_of_namespace_led_by(pid: int) -> list[int]:
    """The processes of the pid namespace whose init is ``pid`` (a container's), none when ``pid`` is no such
    init or its namespace is the daemon's own: killing an init kills its namespace, nothing outside it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            nspid = next((line.split()[1:] for line in status if line.startswith("NSpid:")), [])
        namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
        if len(nspid) < 2 or nspid[-1] != "1" or namespace == os.stat("/proc/self/ns/pid").st_ino:
            return []
    except OSError:
        return []
    tasks = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(name) != pid and os.stat(f"/proc/{name}/ns/pid").st_ino == namespace:
                tasks.append(int(name))
        except OSError:
            continue
    return tasks


def _listening(pid: int) -> bool:
    """Whether process ``pid`` holds a listening unix socket: a lazy-pages server stops listening once its
    restore has connected. (Told by inode: CRIU binds its socket by a name relative to its work directory.)"""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) >= 7 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        pass
    return False


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


def _has_uffd(pid: int) -> bool:
    """Whether a restore has reached the server: it holds the restored processes' userfaultfds."""
    return bool(_uffd_fds(pid))


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
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except OSError:
            continue
        if b"lazy-pages" in argv and any(arg.decode(errors="replace").startswith(prefix) for arg in argv):
            logger.warning("killing lazy-pages server {} left by an earlier run", name)
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _tell(actor: pykka.ActorProxy, method: str, *args: object) -> None:
    try:
        getattr(actor, method)(*args)
    except pykka.ActorDeadError:
        pass
