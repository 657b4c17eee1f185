"""How fast cer builds mount namespaces for a real container checkpoint, and where the time goes.

    python3 benchmarks/bench_mnt.py [--count N] [--concurrency C]      (as root; needs runc, CRIU 4, gcc)

Makes a checkpoint with runc + CRIU 4 first (tests/mounts/mount-workload.c in a bundle with /dev, /dev/pts,
/dev/shm, /dev/mqueue, /proc, /sys with cgroups, /run and /tmp tmpfs, runc's masked and read-only paths and a
read-only bind of a host directory at /data), then builds N mount namespaces each way, every one as the
daemon's factory does (a new thread unshares, builds, opens /proc/thread-self/ns/mnt and ends):

- ``baseline``: unshare(CLONE_NEWNS) + open, nothing else (measured in the same run);
- ``overlay``: a bundle's upper/work/rootfs, mounts made private, the overlay (a checkpoint without a
  mountpoints image gets this);
- ``full``: the overlay and the checkpoint's mount tree as cer makes it (tmpfs mounts with their contents,
  devpts, the host bind, mount points of what the restore mounts, the read-only root).

For ``full`` the time inside the thread is split into overlay, mounts and tmpfs (restoring contents). Rates are
namespaces per second of wall time, one at a time and with C creations at once (the factory's default is 4).
At most ``--live`` namespaces exist at a time (as in a pool); they are torn down between batches, outside the rates
(tear-down runs off the get path; its median is printed apart).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import mounts_support  # noqa: E402

from cer.criu.checkpoint import read_checkpoint  # noqa: E402
from cer.linux import namespaces as ns  # noqa: E402
from cer.namespaces import Namespace, Recipe, build, destroy  # noqa: E402


def in_thread(work):
    """Run ``work()`` in a fresh thread, as the factory does; its result, or its exception raised here."""
    out = {}

    def body():
        try:
            out["value"] = work()
        except BaseException as error:  # noqa: BLE001
            out["error"] = error

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def baseline_one(_: int) -> dict:
    def work():
        started = time.perf_counter()
        ns.unshare(ns.CLONE_NEWNS)
        fd = ns.open_thread_namespace("mnt")
        return {"total": time.perf_counter() - started, "fd": fd}

    return in_thread(work)


def build_one(recipe: Recipe, bundles: Path, serial: int) -> dict:
    def work():
        timings: dict[str, float] = {}
        started = time.perf_counter()
        namespace = build("mnt", recipe, str(bundles / str(serial)), 4096, timings)
        return {"total": time.perf_counter() - started, "namespace": namespace, **timings}

    return in_thread(work)


def tear_down(namespace: Namespace) -> None:
    in_thread(lambda: destroy(namespace))


def rounds(make, count: int, concurrency: int, live: int) -> tuple[list[dict], float]:
    """``count`` namespaces made by ``make(serial)``, ``concurrency`` at a time, in batches of ``live`` that are
    torn down before the next batch (a pool holds a few idle namespaces, not hundreds; every live mount
    namespace copies the host's mount table and makes path lookups and mounts slower): the results and the
    wall time of the creations alone."""
    results: list[dict] = []
    wall = 0.0
    with ThreadPoolExecutor(concurrency) as pool:
        for first in range(0, count, live):
            serials = range(first, min(first + live, count))
            started = time.perf_counter()
            batch = [make(serial) for serial in serials] if concurrency == 1 else list(pool.map(make, serials))
            wall += time.perf_counter() - started
            for result in batch:
                if "namespace" in result:
                    started = time.perf_counter()
                    tear_down(result["namespace"])
                    result["tear_down"] = time.perf_counter() - started
                else:
                    os.close(result["fd"])
            results += batch
    return results, wall


def milliseconds(values) -> str:
    return f"{statistics.median(values) * 1000:7.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="namespaces per measurement (default 500)")
    parser.add_argument("--concurrency", type=int, default=4, help="creations at once for the parallel rate")
    parser.add_argument("--live", type=int, default=20, help="namespaces alive at most, as in a pool (default 20)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it creates mount namespaces and runs runc")

    work = Path(tempfile.mkdtemp(prefix="cer-bench-mnt-", dir="/tmp"))
    try:
        print("making a runc + CRIU 4 checkpoint of tests/mounts/mount-workload ...", flush=True)
        checkpoint = mounts_support.make_container_checkpoint(work / "container")
        contents = read_checkpoint(checkpoint.images)
        full = Recipe.from_checkpoint(contents, str(checkpoint.rootfs), checkpoint.external)
        if full.mounts.problems:
            sys.exit("; ".join(full.mounts.problems))
        overlay = Recipe(rootfs=str(checkpoint.rootfs))
        files = sum(len(c.entries) for _, c in contents.mounts.tmpfs)
        print(f"checkpoint: {len(contents.mounts.mounts) + 1} mounts in its image; cer makes {len(full.mounts.ready)} "
              f"of them (+ the overlay), leaves {len(full.mounts.deferred)} to the restore; "
              f"{files} tmpfs entries, {sum(c.size for _, c in contents.mounts.tmpfs)} bytes of files")
        bundles = work / "bundles"
        bundles.mkdir()

        ways = {
            "baseline": baseline_one,
            "overlay": lambda serial: build_one(overlay, bundles, serial),
            "full": lambda serial: build_one(full, bundles, serial),
        }
        for way in ways.values():  # warm up caches (dentries, the lower layer, the python code paths)
            rounds(way, 20, 1, args.live)
        print(f"\n{args.count} namespaces each, at most {args.live} alive; median ms per namespace in its thread; "
              "rates in namespaces/s of wall time")
        print(f"{'':10} {'total':>7} {'overlay':>7} {'mounts':>7} {'tmpfs':>7} {'1 at a time':>12} "
              f"{f'{args.concurrency} at once':>10}  vs baseline")
        rates = {}
        tear_downs = {}
        for name, way in ways.items():
            sequential, wall = rounds(way, args.count, 1, args.live)
            _, parallel_wall = rounds(way, args.count, args.concurrency, args.live)
            rates[name] = (args.count / wall, args.count / parallel_wall)
            parts = [milliseconds(r[part] for r in sequential) if part in sequential[0] else f"{'-':>7}"
                     for part in ("overlay", "mounts", "tmpfs")]
            ratio = rates["baseline"][0] / rates[name][0]
            print(f"{name:10} {milliseconds(r['total'] for r in sequential)} {' '.join(parts)} "
                  f"{rates[name][0]:12.0f} {rates[name][1]:10.0f}  {ratio:5.1f}x the time")
            if "tear_down" in sequential[0]:
                tear_downs[name] = milliseconds(r["tear_down"] for r in sequential)
        print("tear-down (close the namespace, remove the bundle from the host; off the get path), median ms: "
              + ", ".join(f"{name} {value.strip()}" for name, value in tear_downs.items()))
        target = rates["full"][1]
        print(f"\nfull mount list: {target:.0f} namespaces/s with {args.concurrency} at once "
              f"({'meets' if target >= 500 else 'misses'} the 500/s aim)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
