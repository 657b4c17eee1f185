"""What the daemon holds as its pools grow: RSS, threads and fill time against the number of checkpoints.

    python3 benchmarks/bench_memory.py [--counts 0,50,100,200] [--capacity 10] [--rounds 1]
                                       [--compare-with /work/main]      (as root)

For each count N a real daemon (``cer start``) serves N checkpoints, each the bundled sample (an IPC namespace
with 2 MiB + 4 KiB of shm, a semaphore set and queued messages; the sample rootfs for mount namespaces) under its
own name, with ``capacity`` namespaces of each type (ipc, uts, mnt): N x capacity x 3 namespaces. Printed per N:
the seconds from start until every pool is full, the daemon's resident memory (VmRSS) and its threads once
full, and the memory per checkpoint above the daemon with no checkpoint at all (N = 0, measured in the same
run). Shm pages live in the kernel (N x capacity x 2 MiB), not in the daemon, and are not counted.

``--compare-with TREE`` runs another source tree (e.g. the main checkout) the same way, interleaved round by
round, and prints the ratios: the baseline of issue 13 item 7 (481 MB and 418 threads for 200 checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cer.protocol.client import Client  # noqa: E402
from cer.protocol.methods import AdminStatus  # noqa: E402

SAMPLE = REPO / "contrib" / "sample"
TYPES = ("ipc", "uts", "mnt")
# The kernel frees a stopped daemon's IPC namespaces (and their shm) in a work queue of its own: let it
# finish before the next run is timed.
SETTLE_SECONDS = 5.0


def package_tree(source: Path, into: Path) -> Path:
    """An importable ``cer`` package made of ``source``'s cer/, actors/ and protocol/ (as setup installs them)."""
    target = into / "cer"
    shutil.copytree(source / "cer", target, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("actors", "protocol"):
        shutil.copytree(source / sub, target / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def run_daemon(count: int, capacity: int, python_path: str | None, timeout: float) -> dict:
    """Start a daemon serving ``count`` sample checkpoints, wait until every pool is full, measure, stop."""
    base = Path(tempfile.mkdtemp(prefix="cer-bm-", dir="/tmp"))
    root = base / "root"
    entries = [{"name": f"ckpt-{i}", "capacity": capacity, "path": str(SAMPLE / "checkpoint"),
                "rootfs": str(SAMPLE / "rootfs")} for i in range(count)]
    config = base / "namespace_service.json"
    config.write_text(json.dumps({"containerd_checkpoints": entries}))
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path
    log = open(base / "daemon.log", "wb")
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "cer", "start", "--root", str(root), "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               cwd=python_path or None)
    try:
        endpoint = f"ipc://{root}/daemon.sock"
        wanted = count * capacity * len(TYPES)
        filled_at = None
        with Client(endpoint, timeout=30) as client:
            while time.monotonic() - started < timeout:
                if process.poll() is not None:
                    raise RuntimeError(f"the daemon exited: {(base / 'daemon.log').read_text()[-2000:]}")
                try:
                    pools = client.call(AdminStatus())["pools"]
                except Exception:
                    time.sleep(0.1)
                    continue
                idle = sum(pool["types"][t]["idle"] for pool in pools for t in TYPES)
                if len(pools) == count and idle >= wanted:
                    filled_at = time.monotonic()
                    break
                time.sleep(0.1)
        if filled_at is None:
            raise RuntimeError(f"{count} checkpoints: not full within {timeout} s")
        time.sleep(1.0)  # let refill threads and timers settle before counting
        status = proc_status(process.pid)
        return {"fill_seconds": filled_at - started, "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
                "threads": int(status["Threads"]), "namespaces": wanted}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
        time.sleep(SETTLE_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,50,100,200", help="Numbers of checkpoints, comma-separated (0: the baseline).")
    parser.add_argument("--capacity", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="Runs per count (medians are printed).")
    parser.add_argument("--compare-with", type=Path, help="Another source tree to run the same way, interleaved.")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon creates namespaces")
    counts = sorted({0, *(int(c) for c in args.counts.split(","))})
    trees: dict[str, str | None] = {"this tree": None}
    scratch = None
    if args.compare_with:
        scratch = Path(tempfile.mkdtemp(prefix="cer-bm-tree-"))
        trees[str(args.compare_with)] = str(package_tree(args.compare_with.resolve(), scratch))
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for _ in range(args.rounds):
            for count in counts:
                for name, python_path in trees.items():  # interleaved: both trees see the same machine state
                    result = run_daemon(count, args.capacity, python_path, args.timeout)
                    results.setdefault((name, count), []).append(result)
                    print(f"  {name}: {count} checkpoints: {result}", flush=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    def median(name: str, count: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, count)])

    print(f"\ncapacity {args.capacity} x {len(TYPES)} types per checkpoint; medians of {args.rounds} round(s)")
    print(f"{'tree':<24} {'ckpts':>5} {'namespaces':>10} {'fill s':>7} {'RSS MB':>7} {'MB/ckpt':>8} {'threads':>7}")
    for name in trees:
        base_rss = median(name, 0, "rss_mb")
        for count in counts:
            per = "" if count == 0 else f"{(median(name, count, 'rss_mb') - base_rss) / count:8.2f}"
            print(f"{name:<24} {count:>5} {count * args.capacity * len(TYPES):>10} {median(name, count, 'fill_seconds'):7.1f} "
                  f"{median(name, count, 'rss_mb'):7.0f} {per:>8} {median(name, count, 'threads'):7.0f}")
    if len(trees) == 2:
        other = list(trees)[1]
        print("\nthis tree / other, per count: RSS, threads, fill time")
        for count in counts:
            ratios = [median("this tree", count, key) / median(other, count, key)
                      for key in ("rss_mb", "threads", "fill_seconds")]
            print(f"  {count:>5}: " + "  ".join(f"{r:.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
