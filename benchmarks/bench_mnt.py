"""How fast cer builds mount namespaces for a real container checkpoint, and where the time goes.

    python3 benchmarks/bench_mnt.py [--count N] [--concurrency C]      (as root; needs runc, CRIU 4, gcc)
    python3 benchmarks/bench_mnt.py --restore [--rounds R] [--extra-tmpfs N]

Makes a checkpoint with runc + CRIU 4 first (tests/mounts/mount-workload.c in a bundle with /dev, /dev/pts,
/dev/shm, /dev/mqueue, /proc, /sys with cgroups, /run and /tmp tmpfs, runc's masked and read-only paths and a
read-only bind of a host directory at /data), then builds N mount namespaces each way, every one as the
daemon's factory does (a new thread unshares, builds, opens /proc/thread-self/ns/mnt and ends):

- ``baseline``: unshare(CLONE_NEWNS) + open, nothing else (measured in the same run);
- ``overlay``: a bundle's upper/work/rootfs, mounts made private, the overlay (a checkpoint without a
  mountpoints image gets this);
- ``full``: the overlay and the checkpoint's mount tree as cer makes it (tmpfs mounts with their contents,
  devpts, the host bind, mount points of what the restore mounts, the read-only root, /proc/sys for CRIU),
  then pivoted into the overlay.

For ``full`` the time inside the thread is split into overlay, mounts and tmpfs (restoring contents). Rates are
namespaces per second of wall time, one at a time and with C creations at once (the factory's default is 4).
At most ``--live`` namespaces exist at a time (as in a pool); they are torn down between batches, outside the rates
(tear-down runs off the get path; its median is printed apart).

``--restore`` measures restores of a mount-heavy checkpoint (the workload's 27 mounts and N more tmpfs mounts,
40 by default), each method restoring a new container from the same checkpoint, until the restoring command
returns; rounds interleaved, the order rotating from round to round, pools full (warm) before each cer restore:

- ``runc``: ``runc restore -d`` from the checkpoint's image directory: CRIU builds the mount namespace;
- ``runc+mnt``: ``runc restore -d`` joining a pooled mount namespace (its path on the bundle's mount entry), cer's
  "mnt" view as the images and cer's CRIU options (the action script) in a file named by org.criu.config; the
  one ``checkpoint.restore`` request that takes them is timed apart;
- ``cer`` and ``cer+mnt``: the same two through ``contrib/ctr-wrapper --runtime runc --external-checkpoint``
  (``--external-ns mnt`` for the second), the wrapper's start-up and its request included.

It prints medians, what the pooled namespace saves (runc / runc+mnt, cer / cer+mnt) and what the action script
took inside ``runc+mnt`` restores (CRIU's log: from running post-restore scripts to the network unlock).
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
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
import runc_support  # noqa: E402
from conftest import start_daemon  # noqa: E402

from cer.criu.checkpoint import read_checkpoint  # noqa: E402
from cer.linux import namespaces as ns  # noqa: E402
from cer.pooled_namespaces import Namespace, Recipe, build, destroy  # noqa: E402
from cer.protocol.client import Client  # noqa: E402
from cer.protocol.methods import CheckpointPut, CheckpointRestore, NamespacePut  # noqa: E402
from cer.references import CheckpointRef  # noqa: E402
from cer.restore_mounts import install_action_script  # noqa: E402

WRAPPER = REPO / "contrib" / "ctr-wrapper"
RESTORE_METHODS = ("runc", "runc+mnt", "cer", "cer+mnt")


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


def restore_bundle(checkpoint, directory: Path, mount_namespace: str | None = None,
                   criu_config: list[str] | None = None) -> Path:
    """A bundle to restore the checkpoint's container from: its config, root.path the checkpoint's rootfs;
    with ``mount_namespace``, that path on the mount entry and ``criu_config`` in a file org.criu.config names."""
    directory.mkdir()
    config = json.loads(json.dumps(checkpoint.config))
    config["root"]["path"] = str(checkpoint.rootfs)
    # No CRIU configuration file unless named: runc would read the host-wide /etc/criu/runc.conf otherwise,
    # which other restores on this machine may be editing (ctr-wrapper's containerd path).
    config.setdefault("annotations", {})["org.criu.config"] = ""
    if mount_namespace is not None:
        for entry in config["linux"]["namespaces"]:
            if entry["type"] == "mount":
                entry["path"] = mount_namespace
        (directory / "criu.conf").write_text("".join(f"{line}\n" for line in criu_config or []))
        config.setdefault("annotations", {})["org.criu.config"] = str(directory / "criu.conf")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                            env=runc_support.runtime_env())
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed


def _log_seconds(line: str) -> float:
    return float(re.match(r"\((\d+\.\d+)\)", line).group(1))


def script_seconds(log: Path) -> float:
    """From CRIU's "Running post-restore scripts" to the next step it logs after them (the network unlock)."""
    lines = log.read_text(errors="replace").splitlines()
    start = next(i for i, line in enumerate(lines) if "Running post-restore scripts" in line)
    after = next(line for line in lines[start + 1:] if re.match(r"\(\d", line) and "\t" not in line
                 and "RPC" not in line and "restore-mounts" not in line)
    return _log_seconds(after) - _log_seconds(lines[start])


def restore_once(method: str, checkpoint, runc, daemon, work: Path, extra: dict) -> float:
    container = f"m-{os.urandom(4).hex()}"
    directory = work / container
    directory.mkdir()
    taken = None
    try:
        if method != "runc":
            daemon.wait_full("mounts", ("mnt",), timeout=60)  # warm: the pool refilled since the last one
        os.sync()
        if method == "runc":
            bundle = restore_bundle(checkpoint, directory / "bundle")
            return timed(runc.argv("restore", "-d", "--image-path", str(checkpoint.images), "--work-path",
                                   str(directory), "--bundle", str(bundle), container))
        if method == "runc+mnt":
            started = time.perf_counter()
            with Client(daemon.endpoint, 30) as client:
                taken = client.call(CheckpointRestore(CheckpointRef("mounts"), ("mnt",), os.getpid()))
            extra.setdefault("request", []).append(time.perf_counter() - started)
            bundle = restore_bundle(checkpoint, directory / "bundle", taken["namespaces"]["mnt"]["path"],
                                    taken["criu_config"])
            seconds = timed(runc.argv("restore", "-d", "--image-path", taken["images"], "--work-path", str(directory),
                                      "--bundle", str(bundle), container))
            extra.setdefault("script", []).append(script_seconds(directory / "restore.log"))
            return seconds
        bundle = restore_bundle(checkpoint, directory / "bundle")
        namespaces = ["--external-ns", "mnt"] if method == "cer+mnt" else []
        return timed([sys.executable, str(WRAPPER), "restore", "--endpoint", daemon.endpoint, "--runtime", "runc",
                      "--runc-root", str(runc.root), "--bundle", str(bundle), *namespaces, "--external-checkpoint",
                      "mounts", container])
    finally:
        runc.delete(container)
        if taken is not None:
            mnt = taken["namespaces"]["mnt"]
            with Client(daemon.endpoint, 30) as client:
                client.call(NamespacePut("mnt", mnt["namespace_id"], mnt["pid"]))
                client.call(CheckpointPut(CheckpointRef("mounts")))
        shutil.rmtree(directory, ignore_errors=True)


def restore_benchmark(work: Path, rounds_count: int, extra_tmpfs: int) -> None:
    runc_support.require("runc", "criu", "gcc")
    print(f"making a runc + CRIU 4 checkpoint of tests/mounts/mount-workload with {extra_tmpfs} more tmpfs mounts ...",
          flush=True)
    checkpoint = mounts_support.make_container_checkpoint(work / "container", host_bind=False,
                                                          extra_tmpfs=extra_tmpfs)
    print(f"checkpoint: {len(checkpoint.mounts)} mounts in the container", flush=True)
    daemon = start_daemon({"containerd_checkpoints": [{"name": "mounts", "capacity": 2, "path": str(checkpoint.images),
                                                        "rootfs": str(checkpoint.rootfs)}]})
    runc = runc_support.Runc(work / "runc")
    times: dict[str, list[float]] = {method: [] for method in RESTORE_METHODS}
    extra: dict[str, list[float]] = {}
    try:
        daemon.wait_full("mounts", ("mnt",), timeout=120)
        for method in RESTORE_METHODS:  # warm-up: caches, the view (made on first use), Python's code paths
            restore_once(method, checkpoint, runc, daemon, work, {})
        for number in range(rounds_count):
            shift = number % len(RESTORE_METHODS)
            for method in RESTORE_METHODS[shift:] + RESTORE_METHODS[:shift]:
                times[method].append(restore_once(method, checkpoint, runc, daemon, work, extra))
    finally:
        runc.cleanup()
        daemon.stop()
        shutil.rmtree(daemon.root.parent, ignore_errors=True)
    medians = {method: statistics.median(values) for method, values in times.items()}
    print(f"\nrestore of a {len(checkpoint.mounts)}-mount container, median of {rounds_count} interleaved rounds, seconds")
    print("  ".join(f"{method:>9}" for method in RESTORE_METHODS))
    print("  ".join(f"{medians[method]:>9.3f}" for method in RESTORE_METHODS))
    print(f"runc / runc+mnt {medians['runc'] / medians['runc+mnt']:.2f}x ({medians['runc'] - medians['runc+mnt']:+.3f} s), "
          f"cer / cer+mnt {medians['cer'] / medians['cer+mnt']:.2f}x ({medians['cer'] - medians['cer+mnt']:+.3f} s): "
          "what the pooled mount namespace saves (> 1x: faster with it)")
    print(f"inside runc+mnt: checkpoint.restore request {statistics.median(extra['request']) * 1000:.1f} ms (apart), "
          f"the action script (post-restore) {statistics.median(extra['script']) * 1000:.1f} ms")
    wall, cpu = script_start_up(work)
    print(f"the action script's Python start-up and imports alone (20 runs): {wall * 1000:.1f} ms wall, "
          f"{cpu * 1000:.1f} ms CPU (median; wall above CPU is waiting for a core)")


def script_start_up(work: Path, runs: int = 20) -> tuple[float, float]:
    """What the action script costs before it mounts anything: sh, Python's start, its imports (run for another
    action than post-restore, after the shell's own filter, as a restore's second run would not)."""
    script = install_action_script(str(work))
    python_line = Path(script).read_text().splitlines()[-1].replace('"$plan"', "/nonexistent")
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(["sh", "-c", python_line], env={"CRTOOLS_SCRIPT_ACTION": "pre-resume"}, check=True, timeout=60)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="namespaces per measurement (default 500)")
    parser.add_argument("--concurrency", type=int, default=4, help="creations at once for the parallel rate")
    parser.add_argument("--live", type=int, default=20, help="namespaces alive at most, as in a pool (default 20)")
    parser.add_argument("--restore", action="store_true", help="measure restores with and without cer's mount namespace")
    parser.add_argument("--rounds", type=int, default=10, help="--restore: interleaved rounds (default 10)")
    parser.add_argument("--extra-tmpfs", type=int, default=40, help="--restore: tmpfs mounts added (default 40)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it creates mount namespaces and runs runc")

    work = Path(tempfile.mkdtemp(prefix="cer-bench-mnt-", dir="/tmp"))
    if args.restore:
        try:
            restore_benchmark(work, args.rounds, args.extra_tmpfs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
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
