"""The daemon's life: check the config, prepare ROOT, start the actors and the frontend, and on
SIGTERM/SIGINT take it all down in reverse order, leaving nothing behind under ROOT."""

import contextlib
import fcntl
import gc
import os
import resource
import queue
import signal
import socket
import sys
from dataclasses import dataclass

import pykka
import pykka.debug
from loguru import logger

from cer.actors.dispatch import DEFAULT_THREADS as DEFAULT_POOL_THREADS
from cer.actors.dispatch import Dispatcher
from cer.actors.extractor import CHECKPOINT_DIRECTORY, CheckpointExtractor
from cer.actors.factory import NamespaceFactory
from cer.protocol.gateway import Gateway
from cer.actors.lazy import LAZY_DIRECTORY, LazyPagesServers, LazySettings
from cer.actors.pool import PoolPeers, PoolSettings, Shelves
from cer.actors.timers import Timers
from cer.actors.supervisor import Supervisor
from cer.actors.watcher import ProcessWatcher
from cer.budget import PrefillBudget, describe_bytes
from cer.config import Config
from cer.containerd.client import DEFAULT_ADDRESS as DEFAULT_CONTAINERD_ADDRESS
from cer.containerd.client import DEFAULT_TIMEOUT as DEFAULT_CONTAINERD_TIMEOUT
from cer.criu.views import VIEWS_DIRECTORY
from cer.errors import CerError, DaemonError, EndpointRefused, UnsafePathError
from cer.files import open_private_directory, remove_entry, remove_unless_directory
from cer.kdat import KdatCache
from cer.kdat import prepare as prepare_kdat_cache
from cer.metrics import Metrics
from cer.progress import FillReporter
from cer.protocol.frontend import Frontend
from cer.protocol.legacy import DEFAULT_TIMEOUT as DEFAULT_LEGACY_TIMEOUT
from cer.protocol.legacy import SOCKET_NAME as LEGACY_SOCKET_NAME
from cer.protocol.legacy import LegacyFrontend
from cer.protocol.methods import method_names
from cer.protocol.http import DEFAULT_ADDRESS as DEFAULT_HTTP_ADDRESS
from cer.protocol.http import TOKEN_NAME as HTTP_TOKEN_NAME
from cer.protocol.http import HttpServer, check_address
from cer.protocol.security import check_endpoint
from cer.restore_mounts import install_action_script


@dataclass(frozen=True)
class Settings:
    root: str
    endpoint: str
    debug: bool = False
    workers: int = 8
    max_concurrent_creations: int = 4
    ask_timeout: float = 5.0
    pool: PoolSettings = PoolSettings()
    curve_keys: str | None = None
    insecure_tcp: bool = False
    """Serve a loopback tcp:// endpoint without CURVE keys, to every local user (--insecure-tcp-any-local-user)."""
    containerd_address: str = DEFAULT_CONTAINERD_ADDRESS
    containerd_timeout: float = DEFAULT_CONTAINERD_TIMEOUT
    legacy_socket: bool = False
    """Also serve the original CER-Manager's protocol on ROOT/daemon.socket."""
    legacy_timeout: float = DEFAULT_LEGACY_TIMEOUT
    http_port: int | None = None
    """Serve /namespace/update and /metrics over HTTP on this port (off when None)."""
    http_address: str = DEFAULT_HTTP_ADDRESS
    http_allow_remote: bool = False
    http_unauthenticated_updates: bool = False
    """Serve HTTP updates without the token of ROOT/http.token, to whoever reaches the port (the original's way)."""
    lazy: LazySettings = LazySettings()
    """The lazy-pages servers of lazy restores (checkpoint.lazy)."""
    prefill_budget: int | None = None
    """Bytes of SysV memory all pools together may pre-fill into IPC namespaces (None: a quarter of the memory)."""
    pool_threads: int = DEFAULT_POOL_THREADS
    """Threads all pools share (cer-pools-N), however many checkpoints there are."""


BUNDLES_DIRECTORY = "bundles"
LOCK_NAME = "daemon.lock"
# Directories under ROOT whose leftovers the actors remove as they start.
CLEANED_BY_ACTORS = (CHECKPOINT_DIRECTORY, LAZY_DIRECTORY, VIEWS_DIRECTORY)


_SWITCH_INTERVAL = 0.0002
# How long every actor has to answer the start-up check before the daemon gives up.
_STARTUP_CHECK_SECONDS = 30.0


def run(config: Config, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT (SIGHUP reloads the configuration); returns once all is torn down."""
    signals: queue.SimpleQueue = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: signals.put(signum))  # SimpleQueue.put is reentrant
    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)
    # Refused before anything exists.
    try:
        check_endpoint(settings.endpoint, settings.curve_keys, settings.insecure_tcp)
    except EndpointRefused as error:
        raise DaemonError(f"cannot serve {settings.endpoint}: {error}") from None
    if settings.http_port is not None:
        check_address(settings.http_address, settings.http_allow_remote)
    # The frontend's router thread answers warm gets itself; a thread busy in Python (a build, a tear-down,
    # a put) would otherwise keep it from the GIL for up to the default 5 ms switch interval.
    sys.setswitchinterval(_SWITCH_INTERVAL)
    with _RootDirectory(settings.root) as root:
        _raise_fd_limit()
        actors: list[pykka.ActorRef] = []
        frontend: Frontend | None = None
        legacy: LegacyFrontend | None = None
        http: HttpServer | None = None
        progress: FillReporter | None = None
        metrics = Metrics(method_names())
        timers = Timers()
        pool_threads = Dispatcher("cer-pools", settings.pool_threads)
        criu_cache: KdatCache | None = None
        try:
            # The extractor stops last: the factory's mount namespaces sit on its containerd snapshots.
            from_containerd = [entry.ref for entry in config.checkpoints if entry.path is None]
            extractor = CheckpointExtractor.start(
                root.root, settings.containerd_address, settings.containerd_timeout, from_containerd, timers=timers
            )
            actors.append(extractor)
            factory = NamespaceFactory.start(root.bundles, settings.max_concurrent_creations, metrics.namespace_created)
            actors.append(factory)
            watcher = ProcessWatcher.start()
            actors.append(watcher)
            criu_cache = prepare_kdat_cache(settings.lazy.criu)
            # After the watcher, which tells it when its servers exit; stopped before it, after the pools.
            lazy = LazyPagesServers.start(root.root, extractor.proxy(), watcher.proxy(), settings.lazy, timers)
            actors.append(lazy)
            budget = PrefillBudget(settings.prefill_budget)
            logger.info("IPC pre-fill budget: {}", describe_bytes(budget.limit))
            peers = PoolPeers(factory.proxy(), extractor.proxy(), watcher.proxy(), timers, Shelves(), budget, pool_threads)
            supervisor = Supervisor.start(config, peers, settings.pool)
            actors.append(supervisor)
            gateway = Gateway(supervisor.proxy(), peers, settings.ask_timeout, settings.pool.cold_timeout, config.path,
                              lazy.proxy(), settings.lazy.ready_timeout, root.mounts_script)
            # Before the ZeroMQ frontend: a daemon that answers there serves every socket it was asked for.
            if settings.legacy_socket:
                legacy = LegacyFrontend(
                    os.path.join(root.root, LEGACY_SOCKET_NAME), gateway, settings.legacy_timeout, debug=settings.debug
                )
                legacy.start()
            metrics.watch_pools(gateway.status)
            if settings.http_port is not None:
                token = None if settings.http_unauthenticated_updates else os.path.join(root.root, HTTP_TOKEN_NAME)
                http = HttpServer(settings.http_address, settings.http_port, gateway, metrics, settings.http_allow_remote, token)
                http.start()
            frontend = Frontend(
                settings.endpoint, gateway, settings.workers, settings.debug, settings.curve_keys, metrics.request_answered,
                settings.insecure_tcp,
            )
            frontend.start()
            try:
                # Every actor, every pool included, answers before systemd hears the daemon is up.
                gateway.check_started(_STARTUP_CHECK_SECONDS)
            except CerError as error:
                raise DaemonError(f"the daemon's actors did not start: {error}") from None
            # What start-up made (modules, actors, sockets) lives as long as the daemon: the cyclic garbage
            # collector need never walk it again, which keeps its full collections off the request path.
            gc.freeze()
            _notify_systemd("READY=1")
            logger.info("cer started, pid {}, {} checkpoint(s) from {}", os.getpid(), len(config.checkpoints), config.path)
            progress = FillReporter(gateway.status)
            progress.start()
            while (signum := _next_signal(signals)) == signal.SIGHUP:
                try:
                    gateway.reload()
                except CerError as error:
                    logger.error("configuration not reloaded: {}", error)
            _notify_systemd("STOPPING=1")
            logger.info("stopping on {}", signal.Signals(signum).name)
        finally:
            # Reverse order: no new requests, then pools hand their namespaces to the factory, which destroys them.
            if progress is not None:
                progress.stop()
            if http is not None:
                http.stop()
            if legacy is not None:
                legacy.stop()
            if frontend is not None:
                frontend.stop()
            for actor in reversed(actors):
                actor.stop(block=True, timeout=60)
            pykka.ActorRegistry.stop_all()
            pool_threads.stop()
            timers.stop()
            if criu_cache is not None:
                criu_cache.remove()
    logger.info("stopped")


def _next_signal(signals: queue.SimpleQueue) -> int:
    # A signal that the kernel hands to another thread does not wake a get() blocked in the main thread;
    # Python runs its handler there only at the next bytecode. Waking up now and then lets it run.
    while True:
        try:
            return signals.get(timeout=0.5)
        except queue.Empty:
            pass


def _notify_systemd(state: str) -> None:
    """Tell systemd (a Type=notify unit) the daemon's state; nothing happens without $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.sendto(state.encode(), target)
    except OSError as error:
        logger.warning("cannot tell systemd {} through {}: {}", state, address, error)


class _RootDirectory:
    """ROOT, locked for this daemon; what the daemon keeps there (bundles, socket, lock, the restores' action
    script) goes at exit.

    ROOT must be a directory no other user can change (see :func:`cer.files.open_private_directory`):
    the daemon removes what earlier runs left in it, as root. That clean-up goes by fd and never follows a
    link, and the directories the actors clean up themselves (ROOT/checkpoint, ROOT/lazy) are made real
    directories first, so a link planted there is removed rather than followed.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.bundles = os.path.join(self.root, BUNDLES_DIRECTORY)
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> "_RootDirectory":
        try:
            # Whatever the umask or an earlier owner left: the socket lives here, so only root may enter.
            self._fd = open_private_directory(self.root, 0o700)
        except UnsafePathError as error:
            raise DaemonError(f"cannot use {self.root} as ROOT: {error.filename} is {error.strerror}") from None
        except OSError as error:
            raise DaemonError(f"cannot use {self.root}: {error.strerror}") from None
        try:
            self._lock_fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                                    0o600, dir_fd=self._fd)
        except OSError as error:
            os.close(self._fd)
            raise DaemonError(f"cannot use {self.root}: {LOCK_NAME}: {error.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()
            raise DaemonError(f"another cer daemon is running on {self.root}") from None
        except OSError as error:  # not a file flock works on (a FIFO planted under the name)
            self._close()
            raise DaemonError(f"cannot lock {self.root}/{LOCK_NAME}: {error.strerror}") from None
        if remove_entry(self._fd, BUNDLES_DIRECTORY):
            # Left by a daemon that was killed: its mount namespaces died with it, the directories did not.
            logger.warning("removing bundles left by an earlier run in {}", self.bundles)
        os.mkdir(BUNDLES_DIRECTORY, 0o700, dir_fd=self._fd)
        for name in CLEANED_BY_ACTORS:
            if remove_unless_directory(self._fd, name):
                logger.warning("removed {}/{}: not a directory (a link is never followed)", self.root, name)
        self.mounts_script = install_action_script(self.root)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            remove_entry(self._fd, BUNDLES_DIRECTORY)
        except OSError as error:
            logger.error("cannot remove {}: {}", self.bundles, error)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.basename(self.mounts_script), dir_fd=self._fd)
        os.unlink(LOCK_NAME, dir_fd=self._fd)
        self._close()

    def _close(self) -> None:
        for fd in (self._lock_fd, self._fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._fd = None


def _raise_fd_limit() -> None:
    # Every pooled namespace is an open fd.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
