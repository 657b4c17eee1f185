#!/usr/bin/env python3
"""Fixed vs adaptive pool sizing on a bursty trace: cold gets and idle namespace-seconds.

Runs real pool, factory and extractor actors in this process (as root) on the bundled sample checkpoint
and replays the same trace against each sizing: bursts of gets, each namespace held a while and put,
then a long quiet spell with a trickle of single gets. Idle namespace-seconds (what a pool keeps ready
and unused, integrated over time) is sampled from the pool's status. ``--scale`` shrinks every duration,
the adaptive window included, so the whole comparison runs in well under a minute by default.

    python3 benchmarks/bench_adaptive.py [--scale 0.25] [--burst 12]
"""

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from cer.actors import pool as pool_module  # noqa: E402
from cer.actors.extractor import CheckpointExtractor  # noqa: E402
from cer.actors.factory import NamespaceFactory  # noqa: E402
from cer.actors.pool import PoolActor, PoolPeers, PoolSettings  # noqa: E402
from cer.actors.watcher import ProcessWatcher  # noqa: E402
from cer.config import CheckpointEntry  # noqa: E402
from cer.references import CheckpointRef  # noqa: E402


def trace(scale: float, burst: int) -> list[tuple[float, float]]:
    """(when, how long held) for every get: 5 bursts 4 s apart, then 140 s of one get every 7 s."""
    gets = []
    for index in range(5):
        gets += [(index * 4.0 * scale, 1.5 * scale)] * burst
    gets += [((20 + 7 * step) * scale, 0.5 * scale) for step in range(20)]
    return sorted(gets)


def replay(name: str, capacity: int, max_capacity: int | None, gets: list, end: float, bundles: str) -> dict:
    refs = [NamespaceFactory.start(bundles, 4), CheckpointExtractor.start(), ProcessWatcher.start()]
    peers = PoolPeers(*(ref.proxy() for ref in refs))
    entry = CheckpointEntry(CheckpointRef(name), capacity, str(REPO / "contrib/sample/checkpoint-empty-ipc"), None, max_capacity)
    pool_ref = PoolActor.start(entry, peers, PoolSettings())
    pool = pool_ref.proxy()
    deadline = time.monotonic() + 20
    while pool.status().get(timeout=5)["types"]["uts"]["idle"] < capacity and time.monotonic() < deadline:
        time.sleep(0.02)
    idle_seconds, cold, stop = [0.0], [0], threading.Event()

    def sample():
        last = time.monotonic()
        while not stop.wait(0.02):
            now = time.monotonic()
            idle_seconds[0] += pool.status().get(timeout=5)["types"]["uts"]["idle"] * (now - last)
            last = now

    def hold(namespace_id: int, seconds: float):
        time.sleep(seconds)
        pool.put("uts", namespace_id).get(timeout=5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start, holders = time.monotonic(), []
    for when, held in gets:
        time.sleep(max(0.0, start + when - time.monotonic()))
        lease = pool.get("uts").get(timeout=5).get(timeout=15)
        cold[0] += lease.cold
        holder = threading.Thread(target=hold, args=(lease.namespace.namespace_id, held))
        holder.start()
        holders.append(holder)
    time.sleep(max(0.0, start + end - time.monotonic()))
    for holder in holders:
        holder.join()
    stop.set()
    sampler.join()
    pool_ref.stop(block=True, timeout=30)
    for ref in reversed(refs):
        ref.stop(block=True, timeout=30)
    return {"name": name, "gets": len(gets), "cold": cold[0], "idle_seconds": idle_seconds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.2, help="time scale (1 = the real 60 s window)")
    parser.add_argument("--burst", type=int, default=12, help="gets per burst")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the pools build real namespaces")
    pool_module._Demand.WINDOW = 60 * args.scale
    pool_module._Demand.SECOND = args.scale
    pool_module._ADAPT_SECONDS = 5.0 * args.scale
    gets = trace(args.scale, args.burst)
    end = 162 * args.scale
    sizings = [
        ("fixed-small", 2, None),
        ("fixed-burst", args.burst, None),
        ("adaptive", 1, 4 * args.burst),
    ]
    with tempfile.TemporaryDirectory(prefix="cer-bench-") as bundles:
        results = [replay(name, capacity, ceiling, gets, end, bundles) for name, capacity, ceiling in sizings]
    print(f"trace: {len(gets)} uts gets (5 bursts of {args.burst}, then a trickle), {end:.0f} s, "
          f"adaptive window {pool_module._Demand.WINDOW:g} s")
    print(f"{'sizing':<14}{'cold gets':>10}{'cold %':>8}{'idle ns*s':>12}{'idle vs fixed-burst':>21}")
    baseline = next(r for r in results if r["name"] == "fixed-burst")["idle_seconds"]
    for result in results:
        print(f"{result['name']:<14}{result['cold']:>10}{100 * result['cold'] / result['gets']:>7.0f}%"
              f"{result['idle_seconds']:>12.1f}{result['idle_seconds'] / baseline:>20.2f}x")


if __name__ == "__main__":
    main()
