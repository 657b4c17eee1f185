"""Lazy restores through cer against eager ones: restore-to-running latency and time until all pages are in;
with --response, time from the restore command to the container's first answer.

    python3 benchmarks/bench_lazy.py [--sizes 16,256,1024] [--rounds 5] [--drop-caches]   (as root)
    python3 benchmarks/bench_lazy.py --response [--sizes 256,1024] [--rounds 5]

For each size a container runs tests/contrib/lazy-workload.c holding that many MiB of memory (every page
different) and is checkpointed once with ``runc checkpoint``; a cer daemon serves that image directory. Then,
round after round (the methods interleaved, so drift hits them alike), each method restores a new container
from that same directory:

  eager             ``runc restore -d``: running when it returns, with all its pages;
  lazy-cer          ``checkpoint.lazy`` (a ready spare server, as cer keeps one per checkpoint once used), then
                    ``runc restore -d --lazy-pages --work-path <the server's>``: what a runtime that talks to
                    cer itself pays (the client is already running);
  lazy-cer-nospare  the same from a daemon started with ``--lazy-spares 0``: the server starts on request;
  eager-wrapper     ``contrib/ctr-wrapper restore --runtime runc --external-checkpoint``: a Python process
                    that starts, asks cer for the image directory and runs runc restore;
  lazy-wrapper      ``contrib/ctr-wrapper restore --runtime runc --lazy``: the same, lazily (and binding the
                    container to its server).

"to running" is the time until the restoring command (for lazy-cer: the cer call and runc) returns with the
container running. "all pages" is the time until the container has every page: for eager restores the same
moment; for lazy ones when the lazy-pages server exits, which it does once it has delivered everything. After
each round the workload checks every page of its memory and must answer OK, then the container is removed
and the next round waits for the server to be gone and a spare to be ready. Page cache is warm for all
methods (the images were just written); dirty pages are written back (sync) before each measurement.
With --drop-caches the page cache is dropped instead (``/proc/sys/vm/drop_caches``, machine-wide: every
process on the host reads its files from disk again), as for a checkpoint restored long after it was
written. Medians are printed with ratios to eager (wrappers: to eager-wrapper).

--response: time to first response. After each restore the benchmark asks the workload a question (SIGRTMIN):
it reads a fixed, scattered 10% of its pages and answers through a FIFO in /results. Measured from the start
of the restore command to the answer, round after round, interleaved:

  eager             ``runc restore -d``, then the request;
  lazy-criu         ``checkpoint.lazy`` from a daemon started with ``--lazy-server criu`` (CRIU's
                    ``criu lazy-pages``), ``runc restore -d --lazy-pages``, the request;
  lazy-cer-first    the same from a daemon with cer's server, its working set forgotten first: this restore
                    records it (what a checkpoint's first lazy restore pays);
  lazy-cer-ws       the same with the working set the previous round recorded: served first;
  never-stopped     the request alone, to a container of the same workload that was never checkpointed.

For each: restore to running, restore to answer, the request alone (request to answer), and the page
faults the restored process took while answering (minflt + majflt of /proc/PID/stat; each fault on a page
still missing is one round trip through the lazy-pages server). Aims (issue 14): restore to running at most
0.4x eager; restore to answer with a working set at most 0.3x eager, with at least 10x fewer faults than
lazy-criu; the request after a restore within 1.5x of the same request to a never-stopped process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import containerd_support  # noqa: E402
import runc_support  # noqa: E402
from conftest import start_daemon  # noqa: E402

from cer.protocol.client import Client  # noqa: E402
from cer.protocol.methods import AdminStatus, CheckpointLazy, CheckpointLazyBind, CheckpointLazyForget  # noqa: E402
from cer.references import CheckpointRef  # noqa: E402

WORKLOAD = REPO / "tests" / "contrib" / "lazy-workload.c"
WRAPPER = REPO / "contrib" / "ctr-wrapper"
METHODS = ("eager", "lazy-cer", "lazy-cer-nospare", "eager-wrapper", "lazy-wrapper")
BASELINE = {"eager": None, "lazy-cer": "eager", "lazy-cer-nospare": "eager", "eager-wrapper": None,
            "lazy-wrapper": "eager-wrapper"}


class Size:
    """One checkpoint size: its bundle (/results bound to a host directory) and runc's image directory."""

    def __init__(self, mib: int, work: Path, binary: Path, runc: runc_support.Runc) -> None:
        self.mib = mib
        self.name = f"lazy-{mib}"
        self.results = work / f"{self.name}-results"
        self.results.mkdir()
        self.bundle = runc_support.make_bundle(work / f"{self.name}-bundle", binary, [str(mib), "/results"])
        (self.bundle.rootfs / "results").mkdir()
        config = self.bundle.config()
        config["mounts"].append({"destination": "/results", "type": "bind", "source": str(self.results),
                                 "options": ["rbind", "rw"]})
        self.bundle.config_path.write_text(json.dumps(config))
        self.images = work / f"{self.name}-images"
        self.images.mkdir()
        container = f"{self.name}-{uuid.uuid4().hex[:6]}"
        runc.run_detached(self.bundle, container, timeout=300)
        runc.checkpoint(container, self.images, timeout=600)

    def verify(self, pid: int, timeout: float = 120) -> None:
        """The restored workload checks every page of its memory; anything but OK stops the benchmark."""
        result = self.results / "lazy-result"
        result.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not result.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: process {pid} did not report its memory check")
            time.sleep(0.005)
        text = result.read_text()
        if not text.startswith("OK "):
            raise RuntimeError(f"{self.name}: the restored memory is wrong: {text}")


RESPONSE_METHODS = ("eager", "lazy-criu", "lazy-cer-first", "lazy-cer-ws", "never-stopped")


class Asker:
    """Asks a workload of one size its question (SIGRTMIN) and waits for the answer on the FIFO
    /results/answer (the benchmark keeps its read end open, so that the workload's open never blocks)."""

    def __init__(self, size: Size) -> None:
        self.fifo = size.results / "answer"
        if not self.fifo.exists():
            os.mkfifo(self.fifo, 0o666)
        self.fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        # A writer of our own: without one, a FIFO whose last writer closed reads as end-of-file at once.
        self.keep = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)

    def ask(self, pid: int, timeout: float = 120) -> tuple[float, float, int]:
        """(when asked, when answered: perf_counter, faults the process took meanwhile)."""
        while True:  # an answer left from before is not this one's
            try:
                os.read(self.fd, 4096)
            except BlockingIOError:
                break
        faults = _faults(pid)
        asked = time.perf_counter()
        os.kill(pid, signal.SIGRTMIN)
        if not select.select([self.fd], [], [], timeout)[0]:
            raise RuntimeError(f"process {pid} did not answer within {timeout:g} s")
        answered = time.perf_counter()
        text = os.read(self.fd, 4096).decode()
        if " OK" not in text:
            raise RuntimeError(f"process {pid} answered wrongly: {text!r}")
        return asked, answered, _faults(pid) - faults

    def close(self) -> None:
        os.close(self.keep)
        os.close(self.fd)


def _faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[9])  # minflt, majflt (fields 10 and 12 of proc(5))


class ResponseBench:
    def __init__(self, work: Path, runc: runc_support.Runc, cer_daemon, criu_daemon) -> None:
        self.work, self.runc, self.cer, self.criu = work, runc, cer_daemon, criu_daemon

    def round(self, method: str, size: Size, asker: Asker, never_stopped: int) -> dict:
        if method == "never-stopped":
            asked, answered, faults = asker.ask(never_stopped)
            return {"running": 0.0, "answer": answered - asked, "request": answered - asked, "faults": faults}
        container = f"q-{uuid.uuid4().hex[:8]}"
        daemon = self.criu if method == "lazy-criu" else self.cer
        if method != "eager":
            ready_spare(daemon, size, True)
        if method == "lazy-cer-first":
            with Client(daemon.endpoint, 30) as client:
                client.call(CheckpointLazyForget(CheckpointRef(size.name)))
        os.sync()
        server_pid = None
        try:
            start = time.perf_counter()
            if method == "eager":
                restore_work = Path(tempfile.mkdtemp(prefix="eager-", dir=self.work))
                run(self.runc.argv("restore", "-d", "--image-path", str(size.images), "--work-path", str(restore_work),
                                   "--bundle", str(size.bundle.path), container))
                running = time.perf_counter() - start
                pid = self.runc.pid(container)
            else:
                with Client(daemon.endpoint, 30) as client:
                    reply = client.call(CheckpointLazy(CheckpointRef(size.name)))
                    server_pid = reply["pid"]
                    run(self.runc.argv("restore", "-d", "--lazy-pages", "--image-path", reply["images"], "--work-path",
                                       reply["work_dir"], "--bundle", str(size.bundle.path), container))
                    running = time.perf_counter() - start
                    pid = self.runc.pid(container)
                    client.call(CheckpointLazyBind(reply["server_id"], pid))
            asked, answered, faults = asker.ask(pid)
            measured = {"running": running, "answer": answered - start, "request": answered - asked, "faults": faults}
            if server_pid is not None:
                wait_exit(server_pid)
                if method.startswith("lazy-cer"):
                    measured["server"] = _server_stats(daemon, server_pid)
            size.verify(pid)
            return measured
        finally:
            self.runc.delete(container)


def _server_stats(daemon, server_pid: int) -> dict | None:
    """What the server reported, once the daemon has reaped it (a moment after the process exits)."""
    deadline = time.monotonic() + 10
    with Client(daemon.endpoint, 30) as client:
        while True:
            ended = client.call(AdminStatus())["lazy"]["ended"]
            entry = next((entry for entry in reversed(ended) if entry["pid"] == server_pid), None)
            if entry is not None or time.monotonic() > deadline:
                return None if entry is None else entry["stats"]
            time.sleep(0.01)


@contextlib.contextmanager
def checkpoints_served(prefix: str, sizes: list[int], *daemon_args: tuple[str, ...]):
    """A checkpoint of the workload per size, and one cer daemon serving them per ``daemon_args`` entry (its
    ``cer start`` options); yields (work directory, runc, sizes, daemons) and removes everything after."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    runc = runc_support.Runc(work / "runc")
    daemons = []
    try:
        binary = containerd_support.build_static(WORKLOAD.read_text(), "lazy-workload", work / "build")
        prepared = []
        for mib in sizes:
            print(f"checkpointing {mib} MiB ...", file=sys.stderr, flush=True)
            prepared.append(Size(mib, work, binary, runc))
        config = {"containerd_checkpoints": [{"name": s.name, "capacity": 1, "path": str(s.images)} for s in prepared]}
        for args in daemon_args:
            daemons.append(start_daemon(config, *args))
        yield work, runc, prepared, daemons
    finally:
        runc.cleanup()
        for daemon in daemons:
            daemon.stop()
            shutil.rmtree(daemon.root.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def response_main(options, sizes: list[int]) -> None:
    started = time.monotonic()
    results: dict[int, dict[str, list[dict]]] = {}
    with checkpoints_served("cer-bench-response-", sizes, (), ("--lazy-server", "criu")) as (work, runc, prepared,
                                                                                             daemons):
        bench = ResponseBench(work, runc, *daemons)
        for size in prepared:
            asker = Asker(size)
            never_stopped = f"never-{uuid.uuid4().hex[:6]}"
            runc.run_detached(size.bundle, never_stopped, timeout=300)
            try:
                times = results[size.mib] = {method: [] for method in RESPONSE_METHODS}
                for round_number in range(options.rounds + 1):  # round 0 warms up
                    print(f"{size.mib} MiB round {round_number}/{options.rounds}", file=sys.stderr, flush=True)
                    for method in RESPONSE_METHODS:
                        measured = bench.round(method, size, asker, runc.pid(never_stopped))
                        if round_number:
                            times[method].append(measured)
            finally:
                runc.delete(never_stopped)
                asker.close()

    cache = "page cache warm"
    print(f"\ntime to first response, median of {options.rounds} rounds, {cache}; seconds, ratios to eager "
          "(request: to never-stopped)")
    print(f"{'size':>8}  {'method':<16}{'running':>9}{'/eager':>8}{'answer':>9}{'/eager':>8}{'request':>10}"
          f"{'/never':>8}{'faults':>9}{'ws pages':>10}")
    for mib, times in results.items():
        def median(method: str, key: str) -> float:
            return statistics.median(t[key] for t in times[method])

        for method in RESPONSE_METHODS:
            ws_pages = [t["server"]["working_set_pages"] for t in times[method] if t.get("server")]
            print(f"{mib:>5} MiB  {method:<16}{median(method, 'running'):>9.3f}"
                  f"{median(method, 'running') / median('eager', 'running'):>7.2f}x"
                  f"{median(method, 'answer'):>9.3f}{median(method, 'answer') / median('eager', 'answer'):>7.2f}x"
                  f"{median(method, 'request'):>10.4f}"
                  f"{median(method, 'request') / median('never-stopped', 'request'):>7.2f}x"
                  f"{median(method, 'faults'):>9.0f}{statistics.median(ws_pages) if ws_pages else '-':>10}")
    print(json.dumps({"rounds": options.rounds, "results": results}), file=sys.stderr)
    print(f"\n(every restored container checked all its pages: OK; total run {time.monotonic() - started:.0f} s)")


def wait_exit(pid: int, timeout: float = 300) -> float:
    """The moment (perf_counter) process ``pid`` exits; now if it is gone already."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.perf_counter()
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise RuntimeError(f"lazy-pages server {pid} still running after {timeout:g} s")
        return time.perf_counter()
    finally:
        os.close(pidfd)


def run(argv: list[str], timeout: float = 300) -> str:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                            env=runc_support.runtime_env())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


class Bench:
    def __init__(self, work: Path, runc: runc_support.Runc, daemon, nospare, drop_caches: bool = False) -> None:
        self.work, self.runc, self.daemon, self.nospare = work, runc, daemon, nospare
        self.drop_caches = drop_caches

    def eager(self, size: Size, container: str) -> tuple[float, float, int]:
        restore_work = Path(tempfile.mkdtemp(prefix="eager-", dir=self.work))
        start = time.perf_counter()
        run(self.runc.argv("restore", "-d", "--image-path", str(size.images), "--work-path", str(restore_work),
                           "--bundle", str(size.bundle.path), container))
        running = time.perf_counter() - start
        return running, running, self.runc.pid(container)

    def lazy_cer(self, size: Size, container: str, daemon) -> tuple[float, float, int]:
        with Client(daemon.endpoint, 30) as client:
            start = time.perf_counter()
            reply = client.call(CheckpointLazy(CheckpointRef(size.name)))
            pidfd = os.pidfd_open(reply["pid"])  # the server cannot end before its restore has begun
            try:
                run(self.runc.argv("restore", "-d", "--lazy-pages", "--image-path", reply["images"], "--work-path",
                                   reply["work_dir"], "--bundle", str(size.bundle.path), container))
                running = time.perf_counter() - start
                pid = self.runc.pid(container)
                client.call(CheckpointLazyBind(reply["server_id"], pid))
                if not select.select([pidfd], [], [], 300)[0]:
                    raise RuntimeError("the lazy-pages server did not finish within 300 s")
                all_pages = time.perf_counter() - start
            finally:
                os.close(pidfd)
        return running, all_pages, pid

    def wrapper(self, size: Size, container: str, lazy: bool) -> tuple[float, float, int]:
        argv = [sys.executable, str(WRAPPER), "restore", "--endpoint", self.daemon.endpoint, "--runtime", "runc",
                "--runc-root", str(self.runc.root), "--bundle", str(size.bundle.path),
                "--lazy" if lazy else "--external-checkpoint", size.name, container]
        start = time.perf_counter()
        result = json.loads(run(argv))
        running = time.perf_counter() - start
        all_pages = wait_exit(result["lazy"]["pid"]) - start if lazy else running
        return running, all_pages, result["pid"]

    def round(self, method: str, size: Size) -> tuple[float, float]:
        container = f"r-{uuid.uuid4().hex[:8]}"
        daemon = self.nospare if method == "lazy-cer-nospare" else self.daemon
        if method.startswith("lazy"):
            ready_spare(daemon, size, method != "lazy-cer-nospare")
        os.sync()
        if self.drop_caches:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        try:
            if method == "eager":
                running, all_pages, pid = self.eager(size, container)
            elif method.startswith("lazy-cer"):
                running, all_pages, pid = self.lazy_cer(size, container, daemon)
            else:
                running, all_pages, pid = self.wrapper(size, container, method == "lazy-wrapper")
            size.verify(pid)
            return running, all_pages
        finally:
            self.runc.delete(container)


def ready_spare(daemon, size: Size, want: bool, timeout: float = 30) -> None:
    """No server of this size still at work, and (``want``) the spare cer starts after a hand-out ready (there
    is none before the checkpoint's first lazy restore: the warm-up round)."""
    deadline = time.monotonic() + timeout
    while True:
        with Client(daemon.endpoint, 30) as client:
            servers = [s for s in client.call(AdminStatus())["lazy"]["servers"] if s["ref"] == f"default/{size.name}"]
        busy = [s for s in servers if s["state"] in ("waiting", "serving") or (want and s["state"] == "starting")]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"lazy-pages servers of {size.name} did not settle: {servers}")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,256,1024", help="checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the (machine-wide) page cache before each restore: images read from disk")
    parser.add_argument("--response", action="store_true", help="time to first response (see the docstring)")
    options = parser.parse_args()
    sizes = [int(size) for size in options.sizes.split(",")]
    runc_support.require("runc", "criu", "gcc")
    if options.response:
        response_main(options, sizes)
        return

    started = time.monotonic()
    results: dict[int, dict[str, list[tuple[float, float]]]] = {}
    with checkpoints_served("cer-bench-lazy-", sizes, (), ("--lazy-spares", "0")) as (work, runc, prepared, daemons):
        daemon, nospare = daemons
        bench = Bench(work, runc, daemon, nospare, options.drop_caches)
        for size in prepared:
            times = results[size.mib] = {method: [] for method in METHODS}
            for round_number in range(options.rounds + 1):  # round 0 warms up (first spare, first Python start)
                print(f"{size.mib} MiB round {round_number}/{options.rounds}", file=sys.stderr, flush=True)
                for method in METHODS:
                    measured = bench.round(method, size)
                    if round_number:
                        times[method].append(measured)

    for title, index in (("restore to running", 0), ("time to all pages", 1)):
        cache = "page cache dropped before each restore" if options.drop_caches else "page cache warm"
        print(f"\n{title}, median of {options.rounds} rounds, {cache}, seconds (ratio = method / its eager baseline)")
        print(f"{'size':>8}  " + "  ".join(f"{method:>16}" for method in METHODS) + "  " +
              "  ".join(f"{method + '/' + BASELINE[method]:>28}" for method in METHODS if BASELINE[method]))
        for mib, times in results.items():
            medians = {method: statistics.median(t[index] for t in times[method]) for method in METHODS}
            print(f"{mib:>5} MiB  " + "  ".join(f"{medians[method]:>16.3f}" for method in METHODS) + "  " +
                  "  ".join(f"{medians[method] / medians[BASELINE[method]]:>27.2f}x" for method in METHODS
                            if BASELINE[method]))
    print(json.dumps({"rounds": options.rounds, "seconds": results}), file=sys.stderr)
    print(f"\n(every restored container checked all its pages: OK; total run {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
