"""How fast a warm ``namespace.get`` is, against the floor of the design, and how fast namespaces are built.

Run as root (``make bench`` or ``python3 benchmarks/bench_get.py``); about a minute with the defaults,
``--help`` for the counts. In one run, on one machine:

1. **The floor**: a bare pyzmq REQ socket and a REP socket that answers at once, in a process of its own,
   over ``ipc://``, with the bytes of a real get request and the size of its reply. Beside it the daemon's
   own ``Frontend`` with a gateway that answers at once (no actors), through the project's ``Client``:
   what the frontend and the wire format cost before any actor is asked.
2. **Warm gets**: a real ``cer start`` on the bundled sample checkpoint with pools far larger than a batch
   (each reply's ``info.cold`` is counted), gets through :class:`cer.protocol.client.Client`: back to back
   (get, untimed put, get, ...), each on a fresh connection (a new Client per get, as a restore's
   wrapper makes), in restore-like bursts (ipc, uts and mnt gets in a row after some quiet, then the
   puts), and from 32 clients at once (a burst of restores: each client keeps one get in flight, the
   puts follow the round), with echoes measured the same ways. Every measurement runs once per round,
   in an order that rotates, so machine noise hits them alike; the table gives medians over rounds.
3. **Creations** per type: the daemon's :class:`NamespaceFactory` in this process (the daemon's
   concurrency) with a small owner actor that counts what it gets and destroys it; a bare thread that
   only unshares and opens the namespace; and the daemon's fill rate and ``last_build_seconds``.

The daemon is stopped with SIGTERM and must exit 0 (else the exit status is 1); temporary directories
are removed.
"""

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pykka
import zmq

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "contrib" / "sample"
TYPES = ("uts", "ipc", "mnt")
BURST = ("ipc", "uts", "mnt")  # the order of a restore
CHECKPOINT = "bench"

# -- the reference servers (each runs in a child process: ``bench_get.py --serve KIND ENDPOINT ...``) ---------


def serve_echo(endpoint: str, reply_size: int) -> None:
    """The floor: a REP socket that answers every request at once with ``reply_size`` bytes."""
    reply = b"x" * reply_size
    socket = zmq.Context().socket(zmq.REP)
    socket.bind(endpoint)
    print("ready", flush=True)
    while True:
        # Never block for good: a signal that lands while libzmq is busy (a client just went away) only
        # runs its Python handler once the main thread is back in Python.
        if socket.poll(100):
            socket.recv()
            socket.send(reply)


class InstantGateway:
    """Answers gets and puts at once, from fixed data: the daemon's frontend with no actors behind it."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def get_namespace(self, ns_type, ref, *_options):
        from cer.actors.pool import Lease
        from cer.pooled_namespaces import Namespace

        return Lease(Namespace(ns_type, 1234, self.pid), False, False)

    def take_warm(self, ns_type, ref, *_options):
        """The router thread's warm path, as the daemon's Gateway has it (here nothing is ever cold)."""
        return self.get_namespace(ns_type, ref)

    def after_replies(self) -> None:
        pass

    def put_warm(self, ns_type, namespace_id) -> bool:
        return False

    def put_namespace(self, ns_type, namespace_id, *_options) -> None:
        pass


def serve_frontend(endpoint: str, workers: int) -> None:
    """The daemon's own Frontend (ROUTER, worker threads, wire format, method parsing) before the actors."""
    from loguru import logger

    from cer.protocol.frontend import Frontend

    logger.remove()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    frontend = Frontend(endpoint, InstantGateway(), workers)
    frontend.start()
    print("ready", flush=True)
    while not stop.wait(0.1):  # with a timeout, for the same reason as in serve_echo
        pass
    frontend.stop()


class ReferenceServer:
    def __init__(self, kind: str, endpoint: str, argument: int) -> None:
        self.endpoint = endpoint
        argv = [sys.executable, __file__, "--serve", kind, endpoint, str(argument)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} server did not start")

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# -- statistics -------------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(eq=False)
class Series:
    """One measured thing: every round's samples, in microseconds."""

    name: str
    reference: "Series | None" = None  # what the ratio column divides by
    rounds: list[list[float]] = field(default_factory=list)

    def p50(self) -> float:
        return statistics.median(percentile(samples, 0.50) for samples in self.rounds)

    def p99(self) -> float:
        return statistics.median(percentile(samples, 0.99) for samples in self.rounds)

    def spread(self) -> str:
        """The lowest and highest round p50, to show how steady the rounds were."""
        p50s = [percentile(samples, 0.50) for samples in self.rounds]
        return f"{min(p50s):.0f}-{max(p50s):.0f}"


def now_us() -> float:
    return time.perf_counter_ns() / 1000


# -- part 1 and 2: round trips ----------------------------------------------------------------------------


class EchoBench:
    """Times bare REQ/REP round trips with the bytes of a real get request."""

    def __init__(self, endpoint: str, request: bytes) -> None:
        self.socket = zmq.Context.instance().socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.request = request
        self.endpoint = endpoint

    def round_trip(self) -> float:
        started = now_us()
        self.socket.send(self.request)
        self.socket.recv()
        return now_us() - started

    def batch(self, count: int) -> list[float]:
        return [self.round_trip() for _ in range(count)]

    def bursts(self, count: int, idle: float) -> tuple[list[float], list[float]]:
        """Three round trips in a row after ``idle`` seconds of quiet: the first ones, and the others."""
        first, rest = [], []
        for _ in range(count):
            time.sleep(idle)
            first.append(self.round_trip())
            rest += [self.round_trip(), self.round_trip()]
        return first, rest

    def fresh(self, count: int) -> list[float]:
        """Each round trip on a REQ socket of its own, connected for it: what a restore's client does."""
        samples = []
        for _ in range(count):
            started = now_us()
            socket = zmq.Context.instance().socket(zmq.REQ)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.endpoint)
            socket.send(self.request)
            socket.recv()
            socket.close()
            samples.append(now_us() - started)
        return samples

    def close(self) -> None:
        self.socket.close()


CROWD_COLD = [0, 0]  # cold gets among the crowd's gets, and all of them


def concurrent_round_trips(endpoint: str, request: bytes, clients: int, count: int, put=None) -> list[float]:
    """``clients`` REQ sockets, each with one request always in flight, driven from one thread, until
    ``count`` round trips are timed: a burst of restores at once. With ``put(reply) -> bytes``, every
    reply is given back with that request once the burst is over (untimed), so no namespace is left
    handed out and the pool is full again for the next burst."""
    context = zmq.Context.instance()
    poller = zmq.Poller()
    sockets = []
    for _ in range(clients):
        socket = context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        poller.register(socket, zmq.POLLIN)
        sockets.append(socket)
    in_flight: dict = {}  # socket -> when its request went out
    samples: list[float] = []
    replies: list[bytes] = []
    try:
        for socket in sockets:
            in_flight[socket] = now_us()
            socket.send(request)
        while in_flight:
            events = poller.poll(30_000)
            if not events:
                raise RuntimeError(f"no reply from {endpoint} within 30 s")
            for socket, _event in events:
                reply = socket.recv()
                samples.append(now_us() - in_flight.pop(socket))
                replies.append(reply)
                if len(samples) + len(in_flight) < count:
                    in_flight[socket] = now_us()
                    socket.send(request)
        if put is not None:
            for reply in replies:
                CROWD_COLD[0] += b'"cold":true' in reply
                CROWD_COLD[1] += 1
                sockets[0].send(put(reply))
                sockets[0].recv()
        return samples
    finally:
        for socket in sockets:
            socket.close()


class GetBench:
    """Times warm gets through the project's client; every namespace is put back untimed."""

    def __init__(self, client) -> None:
        self.client = client
        self.gets = {ns_type: 0 for ns_type in TYPES}
        self.cold = {ns_type: 0 for ns_type in TYPES}

    def get(self, ns_type: str) -> tuple[float, dict]:
        from cer.protocol.methods import NamespaceGet
        from cer.references import CheckpointRef

        method = NamespaceGet(ns_type, CheckpointRef(CHECKPOINT))
        started = now_us()
        reply = self.client.call(method)
        elapsed = now_us() - started
        self.gets[ns_type] += 1
        self.cold[ns_type] += bool(reply["info"]["cold"])
        return elapsed, reply

    def put(self, ns_type: str, reply: dict) -> None:
        from cer.protocol.methods import NamespacePut

        self.client.call(NamespacePut(ns_type, reply["namespace_id"], reply["pid"]))

    def batch(self, ns_type: str, count: int) -> list[float]:
        """Back to back: get, put, get, put... (each get and put starts a build of a fresh namespace)."""
        samples = []
        for _ in range(count):
            elapsed, reply = self.get(ns_type)
            samples.append(elapsed)
            self.put(ns_type, reply)
        return samples

    def fresh(self, ns_type: str, count: int) -> list[float]:
        """Each get through a Client of its own, connected for it (as a restore wrapper does); untimed puts."""
        from cer.protocol.client import Client

        samples = []
        for _ in range(count):
            started = now_us()
            with Client(self.client.endpoint, timeout=30) as client:
                elapsed, reply = GetBench(client).get(ns_type)
            samples.append(now_us() - started)
            self.put(ns_type, reply)
        return samples

    def bursts(self, count: int, idle: float) -> dict[str, list[float]]:
        """As a restore asks: after ``idle`` seconds of quiet, an ipc, a uts and a mnt get in a row."""
        samples: dict[str, list[float]] = {ns_type: [] for ns_type in BURST}
        for _ in range(count):
            time.sleep(idle)
            replies = []
            for ns_type in BURST:
                elapsed, reply = self.get(ns_type)
                samples[ns_type].append(elapsed)
                replies.append((ns_type, reply))
            for ns_type, reply in replies:
                self.put(ns_type, reply)
        return samples


def sample_reply_size(ns_type: str, pid: int) -> int:
    """The size of a real get reply of ``ns_type`` (mnt carries the bundle paths too)."""
    from cer.protocol.wire import encode_result

    info = {"cold": False, "ref": {"name": CHECKPOINT, "labels": {"namespace": "default"}}, "ipc_default": False}
    if ns_type == "mnt":
        bundle = f"/tmp/cer-bench-xxxxxxxx/root/bundles/{pid}-1234"
        info.update(bundle=bundle, rootfs=f"{bundle}/rootfs")
    return len(encode_result({"namespace_id": 1234, "pid": pid, "path": f"/proc/{pid}/fd/1234", "info": info}))


# -- the daemon -------------------------------------------------------------------------------------------


class Daemon:
    def __init__(self, workdir: Path, capacity: int) -> None:
        self.root = workdir / "root"
        self.endpoint = f"ipc://{self.root}/daemon.sock"
        config = {
            "containerd_checkpoints": [
                {
                    "name": CHECKPOINT,
                    "capacity": capacity,
                    "path": str(SAMPLE / "checkpoint"),
                    "rootfs": str(SAMPLE / "rootfs"),
                }
            ],
            "default_capacity": 1,
        }
        config_path = workdir / "namespace_service.json"
        config_path.write_text(json.dumps(config))
        self.log = workdir / "daemon.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cer", "start", "--root", str(self.root), "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,  # not the repository: PYTHONPATH may point at another tree to compare
            )
        self.started = time.monotonic()

    def status(self, timeout: float = 2.0) -> dict | None:
        from cer.protocol.client import Client
        from cer.protocol.methods import AdminStatus

        try:
            with Client(self.endpoint, timeout=timeout) as client:
                return client.call(AdminStatus())
        except Exception:  # noqa: BLE001 - not answering yet
            return None

    def wait_full(self, capacity: int, timeout: float) -> tuple[dict, float]:
        """Wait until every type holds ``capacity`` idle namespaces; returns the pool and the seconds it took."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.process.returncode}:\n{self.output()}")
            status = self.status()
            if status is not None:
                pool = status["pools"][0]
                if pool["state"] == "ready" and all(pool["types"][t]["idle"] >= capacity for t in TYPES):
                    return pool, time.monotonic() - self.started
                if pool["state"] in ("failed", "failing"):
                    raise RuntimeError(f"the pool is {pool['state']}: {pool['last_error']}")
            time.sleep(0.05)
        raise RuntimeError(f"the pools did not fill to {capacity} within {timeout:g} s:\n{self.output()}")

    def wait_idle(self, ns_type: str, count: int, timeout: float) -> None:
        """Wait (untimed) until the pool holds ``count`` idle namespaces of ``ns_type``, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            counts = status["pools"][0]["types"][ns_type] if status is not None else None
            if counts is not None and counts["idle"] >= count and counts["building"] == 0:
                return
            time.sleep(0.02)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            print("the daemon did not exit within 30 s of SIGTERM; killing it", file=sys.stderr)
            self.process.kill()
            self.process.wait()
            return -signal.SIGKILL

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# -- part 3: creations --------------------------------------------------------------------------------------


class CountingOwner(pykka.ThreadingActor):
    """Stands in for a pool: counts the namespaces the factory hands it and destroys each at once."""

    def __init__(self, factory: pykka.ActorProxy, expected: int, done: threading.Event) -> None:
        super().__init__()
        self._factory = factory
        self._expected = expected
        self._done = done
        self.seconds: list[float] = []
        self.errors: list[str] = []
        self.finished_at = 0.0

    def namespace_created(self, ns_type, namespace, error, seconds) -> None:
        if namespace is None:
            self.errors.append(repr(error))
        else:
            self.seconds.append(seconds)
            self._factory.destroy(namespace)
        if len(self.seconds) + len(self.errors) == self._expected:
            self.finished_at = time.perf_counter()
            self._done.set()

    def result(self) -> tuple[list[float], list[str], float]:
        return self.seconds, self.errors, self.finished_at


@dataclass
class CreationResult:
    ns_type: str
    factory_per_second: float
    build_ms: list[float]
    bare_per_second: float
    bare_us: list[float]
    bare_thread_us: list[float]


def measure_factory(ns_type: str, recipe, bundles: str, count: int, concurrency: int) -> tuple[float, list[float]]:
    """Creations per second and each creation's build time (ms), from the factory's own report."""
    from cer.actors.factory import NamespaceFactory

    factory = NamespaceFactory.start(bundles, concurrency)
    done = threading.Event()
    owner = CountingOwner.start(factory.proxy(), count, done)
    try:
        proxy = owner.proxy()
        started = time.perf_counter()
        for _ in range(count):
            factory.proxy().create(ns_type, recipe, proxy)
        if not done.wait(120):
            raise RuntimeError(f"the factory did not build {count} {ns_type} namespaces within 120 s")
        seconds, errors, finished = proxy.result().get(timeout=10)
        if errors:
            raise RuntimeError(f"{len(errors)} {ns_type} creations failed, e.g. {errors[0]}")
        return count / (finished - started), [s * 1000 for s in seconds]
    finally:
        owner.stop()
        factory.stop()  # waits for teardowns still running and destroys whatever is left


def measure_bare(ns_type: str, count: int) -> tuple[float, list[float], list[float]]:
    """A thread that unshares, opens its namespace and closes it, one after another: the syscall floor."""
    from cer.linux import namespaces as ns

    inside: list[float] = []
    whole: list[float] = []

    def unshare_and_open() -> None:
        started = now_us()
        ns.unshare(ns.CLONE_FLAGS[ns_type])
        os.close(ns.open_thread_namespace(ns_type))
        inside.append(now_us() - started)

    started_all = time.perf_counter()
    for _ in range(count):
        started = now_us()
        thread = threading.Thread(target=unshare_and_open)
        thread.start()
        thread.join()
        whole.append(now_us() - started)
    if len(inside) != count:
        raise RuntimeError(f"bare {ns_type} unshare failed")
    return count / (time.perf_counter() - started_all), inside, whole


def measure_creations(args, workdir: Path) -> list[CreationResult]:
    from cer.criu.checkpoint import read_checkpoint
    from cer.pooled_namespaces import Recipe

    contents = read_checkpoint(SAMPLE / "checkpoint")
    recipe = Recipe.from_checkpoint(contents, str(SAMPLE / "rootfs"))  # what the daemon's extractor makes
    bundles = workdir / "bundles"
    bundles.mkdir()
    results = []
    for ns_type in TYPES:
        measure_factory(ns_type, recipe, str(bundles), min(20, args.creations), args.concurrency)  # warm-up
        per_second, build_ms = measure_factory(ns_type, recipe, str(bundles), args.creations, args.concurrency)
        bare_per_second, bare_us, bare_thread_us = measure_bare(ns_type, args.creations)
        results.append(CreationResult(ns_type, per_second, build_ms, bare_per_second, bare_us, bare_thread_us))
    return results


# -- the report ---------------------------------------------------------------------------------------------


def print_report(args, table: list[Series], gets: GetBench, fill, creations) -> None:
    print()
    print(f"cer get benchmark: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, "
          f"Python {platform.python_version()}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{args.rounds} rounds; in each, every measurement once, in an order rotating from round to round")
    print()
    header = f"{'round trip over ipc:// (us)':<48}{'p50':>7}{'p99':>8}{'round p50s':>13}{'ratio':>8}"
    sections = {
        0: f"back to back, {args.batch} per round (a get is followed by an untimed put):",
        len(TYPES) + 2: f"a fresh connection for each, {args.batch} per round (the get's put is untimed, on another):",
        len(TYPES) + 4: f"restore-like: {args.bursts} bursts per round, each after {args.idle_ms:g} ms of quiet; "
                        f"gets of {', '.join(BURST)} in a row, then the puts:",
        len(TYPES) * 2 + 6: f"{args.clients} clients, each with a request always in flight, from one thread; "
                            f"{args.clients * args.crowd_rounds} per round (the puts after the round, untimed):",
    }
    for index, row in enumerate(table):
        if index in sections:
            print(sections[index])
            print(header)
            print("-" * len(header))
        ratio = f"{row.p50() / row.reference.p50():>7.2f}x" if row.reference else f"{'':>8}"
        print(f"  {row.name:<46}{row.p50():>7.0f}{row.p99():>8.0f}{row.spread():>13}{ratio}")
        if index + 1 in sections:
            print()
    print("p50, p99: the median over rounds of each round's percentile; round p50s: the lowest and highest round;")
    print("ratio: p50 over the p50 of the echo it compares with (the first get of a burst: the first echo).")
    print("cold gets: " + ", ".join(f"{t} {gets.cold[t]} of {gets.gets[t]}" for t in TYPES)
          + f"; in the crowd rows {CROWD_COLD[0]} of {CROWD_COLD[1]}")
    if creations is None:
        return
    print()
    pool, fill_seconds = fill
    total = args.capacity * len(TYPES)
    header = (f"{'creation':<9}{'factory/s':>10}{'build ms p50':>14}{'p99':>7}{'bare/s':>9}{'bare us p50':>13}"
              f"{'p99':>7}{'+thread us':>12}{'build/bare':>12}{'daemon last ms':>16}")
    print(header)
    print("-" * len(header))
    for result in creations:
        last = pool["types"][result.ns_type]["last_build_seconds"]
        build_p50, bare_p50 = percentile(result.build_ms, 0.5), percentile(result.bare_us, 0.5)
        print(f"{result.ns_type:<9}{result.factory_per_second:>10.0f}{build_p50:>14.2f}"
              f"{percentile(result.build_ms, 0.99):>7.2f}{result.bare_per_second:>9.0f}{bare_p50:>13.0f}"
              f"{percentile(result.bare_us, 0.99):>7.0f}{percentile(result.bare_thread_us, 0.5):>12.0f}"
              f"{build_p50 * 1000 / bare_p50:>11.1f}x{last * 1000 if last else float('nan'):>16.2f}")
    print(f"factory: NamespaceFactory in this process, {args.concurrency} at once, {args.creations} of a type, "
          "an owner actor")
    print("  destroying each as it comes; build ms is the factory's own time per creation (in its thread).")
    print("bare: one thread at a time that unshares, opens /proc/thread-self/ns/TYPE and closes it")
    print("  (bare us inside the thread; +thread us from start to join).")
    print(f"daemon: filled {total} namespaces (all types at once) {fill_seconds:.1f} s after it was started, "
          f"{total / fill_seconds:.0f}/s with start-up;")
    print("  daemon last ms is the pool's last_build_seconds.")


# -- main ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved measurement rounds (default 15)")
    parser.add_argument("--batch", type=int, default=100, help="timed round trips per row and round (default 100)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed round trips per row first (default 50)")
    parser.add_argument("--bursts", type=int, default=15, help="restore-like bursts per round (default 15)")
    parser.add_argument("--idle-ms", type=float, default=30.0, help="quiet before each burst, in ms (default 30)")
    parser.add_argument("--capacity", type=int, default=200, help="idle namespaces kept per type (default 200)")
    parser.add_argument("--creations", type=int, default=200, help="factory creations per type (default 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="factory creations at once (daemon default 4)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the crowd rows (default 32)")
    parser.add_argument("--crowd-rounds", type=int, default=3,
                        help="timed requests per crowd client and round (default 3: a round takes less than half "
                             "the pool, which refills once the burst is over)")
    parser.add_argument("--workers", type=int, default=8, help="frontend worker threads (the daemon's default, 8)")
    parser.add_argument("--fill-timeout", type=float, default=90.0, help="longest wait for the pools to fill (s)")
    parser.add_argument("--no-creations", action="store_true", help="measure round trips only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon log)")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "ENDPOINT", "ARGUMENT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def measure_round_trips(args, workdir: Path, daemon: Daemon) -> tuple[list[Series], GetBench]:
    """The echo floor, the frontend alone and the daemon's gets, measurement by measurement in every
    round, in an order that rotates from round to round."""
    from cer.protocol.client import Client
    from cer.protocol.methods import NamespaceGet
    from cer.protocol.wire import encode_request
    from cer.references import CheckpointRef

    request = encode_request("namespace", "get", NamespaceGet("uts", CheckpointRef(CHECKPOINT)).params())
    idle = args.idle_ms / 1000
    servers: list[ReferenceServer] = []
    clients = []
    echo: EchoBench | None = None
    try:
        reply_size = sample_reply_size("uts", daemon.process.pid)
        servers.append(ReferenceServer("echo", f"ipc://{workdir}/echo.sock", reply_size))
        servers.append(ReferenceServer("frontend", f"ipc://{workdir}/frontend.sock", args.workers))
        echo = EchoBench(servers[0].endpoint, request)
        clients = [Client(servers[1].endpoint, timeout=30), Client(daemon.endpoint, timeout=30)]
        frontend, gets = GetBench(clients[0]), GetBench(clients[1])

        floor = Series("echo REQ -> REP, bytes only (the floor)")
        alone = Series("frontend alone: Client -> Frontend, no actors", floor)
        back_to_back = {t: Series(f"namespace.get {t}: Client -> daemon", floor) for t in TYPES}
        burst_first = Series("echo, the first after the quiet")
        burst_rest = Series("echo, the 2nd and 3rd")
        burst = {t: Series(f"namespace.get {t}", burst_first if t == BURST[0] else burst_rest) for t in BURST}
        fresh_echo = Series("echo, a fresh REQ socket each")
        fresh_get = Series("namespace.get uts, a fresh Client each", fresh_echo)
        crowd_echo = Series(f"echo, {args.clients} clients at once")
        crowd_get = Series(f"namespace.get uts, {args.clients} clients at once", crowd_echo)

        def put_request(reply: bytes) -> bytes:
            result = orjson.loads(reply)["result"]
            params = {"namespace_type": "uts", "namespace_id": result["namespace_id"], "pid": result["pid"]}
            return encode_request("namespace", "put", params)

        def crowd(endpoint: str, series: Series, put=None):
            def measure(n: int) -> dict:
                if put is not None:
                    daemon.wait_idle("uts", args.capacity, 20)  # the burst finds the pool full and quiet
                return {series: concurrent_round_trips(endpoint, request, args.clients, n, put)}

            return measure

        def echo_bursts(count: int) -> dict:
            first, rest = echo.bursts(count, idle)
            return {burst_first: first, burst_rest: rest}

        def get_bursts(count: int) -> dict:
            return {burst[t]: samples for t, samples in gets.bursts(count, idle).items()}

        batches, bursts = (args.batch, args.warmup), (args.bursts, max(1, args.bursts // 3))
        crowds = (args.clients * args.crowd_rounds, args.clients)
        measurements = [
            (batches, lambda n: {floor: echo.batch(n)}),
            (batches, lambda n: {alone: frontend.batch("uts", n)}),
            *((batches, lambda n, t=t: {back_to_back[t]: gets.batch(t, n)}) for t in TYPES),
            (bursts, echo_bursts),
            (bursts, get_bursts),
            (batches, lambda n: {fresh_echo: echo.fresh(n)}),
            (batches, lambda n: {fresh_get: gets.fresh("uts", n)}),
            (crowds, crowd(servers[0].endpoint, crowd_echo)),
            (crowds, crowd(daemon.endpoint, crowd_get, put_request)),
        ]
        for (_count, warmup), measure in measurements:
            measure(warmup)
        print(f"measuring {args.rounds} rounds ...", file=sys.stderr)
        for round_number in range(args.rounds):
            shift = round_number % len(measurements)
            for (count, _warmup), measure in measurements[shift:] + measurements[:shift]:
                gc.collect()
                for series, samples in measure(count).items():
                    series.rounds.append(samples)
        table = [floor, alone, *back_to_back.values(), fresh_echo, fresh_get, burst_first, burst_rest, *burst.values(),
                 crowd_echo, crowd_get]
        return table, gets
    finally:
        if echo is not None:
            echo.close()
        for client in clients:
            client.close()
        for server in servers:
            if server.stop() != 0:
                print(f"the {server.endpoint} server exited with {server.process.returncode}", file=sys.stderr)


def main() -> int:
    args = parse_args()
    if args.serve:
        kind, endpoint, argument = args.serve
        if kind == "echo":
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            serve_echo(endpoint, int(argument))
        else:
            serve_frontend(endpoint, int(argument))
        return 0
    if os.geteuid() != 0:
        print("bench_get.py needs root: it runs the daemon and creates namespaces", file=sys.stderr)
        return 2
    from loguru import logger

    logger.remove()  # the in-process factory's info lines would break up the report
    logger.add(sys.stderr, level="WARNING")
    # An ipc:// endpoint is a unix socket path, which must stay short: not under a long TMPDIR.
    workdir = Path(tempfile.mkdtemp(prefix="cer-bench-", dir="/tmp"))
    daemon: Daemon | None = None
    code = 0
    try:
        daemon = Daemon(workdir, args.capacity)
        print(f"filling the daemon's pools to {args.capacity} per type ...", file=sys.stderr)
        fill = daemon.wait_full(args.capacity, args.fill_timeout)
        table, gets = measure_round_trips(args, workdir, daemon)
        returned = daemon.stop()
        if returned != 0:
            print(f"the daemon exited with {returned}:\n{daemon.output()}", file=sys.stderr)
            code = 1
        else:
            print("the daemon stopped on SIGTERM with exit status 0", file=sys.stderr)
        daemon = None
        creations = None
        if not args.no_creations:
            print("measuring creations ...", file=sys.stderr)
            creations = measure_creations(args, workdir)
        print_report(args, table, gets, fill, creations)
    finally:
        if daemon is not None:
            daemon.stop()
        pykka.ActorRegistry.stop_all()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
