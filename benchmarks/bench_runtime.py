"""cer-runc: what it costs on every container (pass-through), and a containerd restore through it.

    python3 benchmarks/bench_runtime.py [--rounds 30] [--sizes 16,256] [--restore-rounds 5]   (as root)

1. Pass-through. A runc bundle (the memory workload, 1 MiB) goes through create, start, state, kill and
   delete, round after round, with the runtimes interleaved (the order rotates each round, so drift hits them
   alike): plain ``runc``; ``contrib/cer-runc`` (a POSIX sh front that execs runc for all but restore); and,
   to show why the front is sh, the same front written in Python (``python3 -I -S``, argv scan, os.execv).
   Printed: the median of each command per runtime and what each front adds to runc's median.

2. containerd restore. For each size, two containers of the memory workload are run in a private containerd,
   one with runc, one with ``--runc-binary cer-runc``, and checkpointed with ``ctr c checkpoint --rw --image
   --task``; cer serves the second (its seed config format, from containerd). Interleaved rounds of:
     ctr-stock     ``ctr c restore --live`` of the runc checkpoint: containerd and runc alone;
     ctr-cer       ``ctr c restore --live`` of the cer-runc checkpoint: cer-runc takes IPC, UTS and mount
                   namespaces and the image view from cer in one request (warm pools) and restores from cer's
                   images into them (CRIU leaves the mounts to cer and its action script);
     wrapper       ``contrib/ctr-wrapper restore --external-ns ipc --external-ns uts --external-ns mnt
                   --external-checkpoint CKPT ID``: the seed's command line, the same path plus the wrapper
                   (run as its first line runs it, ``python3 -I -S``);
     no-mnt        the wrapper with ``--external-ns ipc --external-ns uts`` only: CRIU builds the mounts, as
                   stock; against ``wrapper``, what joining cer's mount namespace saves or costs.
   Each round checks in cer-runc's log that the restore went through cer. Printed: medians, ratios to
   ctr-stock, and what containerd still does before runc runs: how many bytes of CRIU images it extracted to
   its own temporary directory (cer-runc logs that directory's size before it swaps in cer's images) and how
   long from ``ctr`` starting to cer-runc starting (container, snapshot, extraction, shim).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
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

WORKLOAD = REPO / "benchmarks" / "memory-workload.c"
CER_RUNC = REPO / "contrib" / "cer-runc"
WRAPPER = REPO / "contrib" / "ctr-wrapper"
NAMESPACE = "cer-bench-runtime"
COMMANDS = ("create", "start", "state", "kill", "delete")
RESTORE_METHODS = ("ctr-stock", "ctr-cer", "wrapper", "no-mnt")
PYTHON_FRONT = """#!/usr/bin/python3 -IS
import os, sys
argv = sys.argv[1:]
skip = False
command = None
for arg in argv:
    if skip:
        skip = False
    elif arg in ("--root", "-root", "--log", "-log", "--log-format", "-log-format", "--criu", "-criu"):
        skip = True
    elif not arg.startswith("-"):
        command = arg
        break
os.execvp("runc", ["runc", *argv])
"""


# The stock checkpoint's runc: runc itself, with the wall time around each restore logged (two `date` runs,
# about 2 ms, are all it adds), so that the stock path's runc restore can be told from what containerd does first.
TIMED_RUNC = """#!/bin/sh
case " $* " in
    *" restore "*) start=$(date +%s.%N); runc "$@"; status=$?; echo "$start $(date +%s.%N)" >> "$CER_BENCH_RUNC_TIMES"
                   exit $status ;;
esac
exec runc "$@"
"""


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


# --------------------------------------------------------------------------- 1. pass-through

def lifecycle(front: str, root: Path, bundle: runc_support.Bundle, env: dict, work: Path) -> dict[str, float]:
    container = f"p-{uuid.uuid4().hex[:8]}"
    times = {}

    def timed(command: str, *args: str, **kwargs) -> None:
        start = time.perf_counter()
        result = subprocess.run([front, "--root", str(root), command, *args], stdin=subprocess.DEVNULL, env=env,
                                timeout=60, **(kwargs or {"capture_output": True}))
        times[command] = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{front} {command} failed: {result}")

    with open(work / "create.out", "w") as output:  # the init keeps create's stdio: a file, not a pipe
        timed("create", "--bundle", str(bundle.path), container, stdout=output, stderr=output)
    timed("start", container)
    timed("state", container)
    timed("kill", container, "KILL")
    deadline = time.monotonic() + 10
    while json.loads(subprocess.run(["runc", "--root", str(root), "state", container], capture_output=True,
                                    timeout=10).stdout)["status"] != "stopped":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{container} did not stop")
        time.sleep(0.005)
    timed("delete", container)
    return times


def bench_passthrough(work: Path, binary: Path, rounds: int) -> None:
    bundle = runc_support.make_bundle(work / "pass-bundle", binary, ["1"])
    python_front = work / "py-front"
    python_front.write_text(PYTHON_FRONT)
    python_front.chmod(0o755)
    fronts = {"runc": shutil.which("runc"), "cer-runc": str(CER_RUNC), "python -I -S": str(python_front)}
    env = {**runc_support.runtime_env(), "CER_RUNC_LOG": str(work / "cer-runc-pass.log")}
    root = work / "pass-root"
    times = {name: {command: [] for command in COMMANDS} for name in fronts}
    names = list(fronts)
    for round_number in range(rounds):
        order = names[round_number % len(names):] + names[:round_number % len(names)]
        for name in order:
            for command, seconds in lifecycle(fronts[name], root, bundle, env, work).items():
                times[name][command].append(seconds)
    if (work / "cer-runc-pass.log").exists():
        raise RuntimeError("cer-runc-restore ran for a command that is not a restore")
    print(f"\npass-through: median of {rounds} rounds, ms per command (added = front's median - runc's median)")
    print(f"{'command':>8}  " + "  ".join(f"{name:>12}" for name in names) + "  " +
          "  ".join(f"{'added ' + name:>20}" for name in names[1:]))
    for command in COMMANDS:
        medians = {name: median_ms(times[name][command]) for name in names}
        print(f"{command:>8}  " + "  ".join(f"{medians[name]:>12.2f}" for name in names) + "  " +
              "  ".join(f"{medians[name] - medians['runc']:>20.2f}" for name in names[1:]))
    print(json.dumps({"passthrough_seconds": times}), file=sys.stderr)


# --------------------------------------------------------------------------- 2. containerd restore

def log_entries(log: Path) -> list[tuple[float, str]]:
    entries = []
    for line in log.read_text().splitlines() if log.exists() else []:
        stamp, _, message = line.partition(" ")
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        entries.append((when.timestamp(), message))
    return entries


class Checkpoints:
    """One size: a checkpoint of a runc container and one of a cer-runc container, same workload."""

    def __init__(self, mib: int, containerd: containerd_support.PrivateContainerd, binary: Path, work: Path,
                 timed_runc: Path) -> None:
        self.mib = mib
        image = containerd_support.oci_image_archive(
            work / f"memory-{mib}.oci.tar", f"docker.io/cer-bench/runtime-memory:{mib}",
            {"bin/memory-workload": (binary.read_bytes(), 0o755)}, ["/bin/memory-workload", str(mib)])
        containerd.import_image(image.archive, NAMESPACE)
        self.stock, self.cer = f"stock-{mib}", f"cer-{mib}"
        for name, runc_binary in ((self.stock, str(timed_runc)), (self.cer, str(CER_RUNC))):
            container = f"{name}-{uuid.uuid4().hex[:6]}"
            containerd.run(image.name, container, namespace=NAMESPACE, timeout=120, runc_binary=runc_binary)
            containerd.checkpoint(container, name, NAMESPACE, timeout=600)
            containerd.remove_container(container, NAMESPACE)


def restore_round(method: str, size: Checkpoints, containerd, daemon, log: Path, runc_times: Path) -> dict:
    container = f"r-{uuid.uuid4().hex[:8]}"
    seen = len(log_entries(log))
    runc_times.write_text("")
    try:
        os.sync()
        wall = time.time()
        start = time.perf_counter()
        if method in ("wrapper", "no-mnt"):
            types = ["ipc", "uts", "mnt"] if method == "wrapper" else ["ipc", "uts"]
            result = subprocess.run(
                [sys.executable, "-I", "-S", str(WRAPPER), "restore", "--address", containerd.address, "--namespace", NAMESPACE,
                 *[f"--external-ns={ns_type}" for ns_type in types], "--external-checkpoint", size.cer, container],
                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=runc_support.runtime_env())
            if result.returncode != 0:
                raise RuntimeError(f"ctr-wrapper failed: {result.stderr}")
        else:
            checkpoint = size.stock if method == "ctr-stock" else size.cer
            containerd.ctr("containers", "restore", "--live", container, checkpoint, namespace=NAMESPACE, timeout=300)
        seconds = time.perf_counter() - start
    finally:
        containerd.remove_container(container, NAMESPACE)
    measured = {"seconds": seconds}
    if method == "ctr-stock":
        runc_start, runc_end = map(float, runc_times.read_text().split())
        measured.update(before_runtime=runc_start - wall, runc=runc_end - runc_start)
    else:
        entries = log_entries(log)[seen:]
        done = [m.split("restored through cer: ", 1)[1] for _, m in entries if "restored through cer: " in m]
        if not done:
            raise RuntimeError(f"{method}: the restore did not go through cer: {entries}")
        measured["phases"] = json.loads(done[0])["seconds"]
        copy = next(re.search(r"containerd's own copy at \S+: (\d+) files, (\d+) bytes", m) for _, m in entries
                    if "containerd's own copy" in m)
        finished = next(when for when, m in entries if "restored through cer: " in m)
        measured.update(extracted_bytes=int(copy.group(2)), runc=measured["phases"]["runc"],
                        before_runtime=finished - measured["phases"]["since_exec"] - wall)
        daemon.wait_full(size.cer, ("ipc", "uts", "mnt"), timeout=30)  # warm namespaces for every round
    return measured


def bench_containerd(work: Path, binary: Path, sizes: list[int], rounds: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="cer-bench-rt-", dir="/tmp"))  # short: the endpoint is a unix socket
    log = base / "cer-runc.log"
    runc_times = base / "runc-times"
    timed_runc = base / "timed-runc"
    timed_runc.write_text(TIMED_RUNC)
    timed_runc.chmod(0o755)
    os.environ.update(CER_ENDPOINT=f"ipc://{base}/root/daemon.sock", CER_RUNC_LOG=str(log),
                      CER_RUNC_WORKDIR=str(base / "run"), CER_RUNC_PYTHON=sys.executable,
                      CER_BENCH_RUNC_TIMES=str(runc_times))
    containerd = containerd_support.PrivateContainerd("cer-bench-rt-ctd-")
    daemon = None
    results: dict[int, dict[str, list[dict]]] = {}
    try:
        containerd.start()
        prepared = []
        for mib in sizes:
            print(f"checkpointing {mib} MiB twice ...", file=sys.stderr, flush=True)
            prepared.append(Checkpoints(mib, containerd, binary, work, timed_runc))
        entries = [{"name": size.cer, "namespace": NAMESPACE, "capacity": 2} for size in prepared]
        daemon = start_daemon({"containerd_checkpoints": entries, "default_capacity": 2},
                              "--containerd-address", containerd.address, root=base / "root")
        for size in prepared:
            daemon.wait_full(size.cer, ("ipc", "uts", "mnt"), timeout=300)
        for size in prepared:
            results[size.mib] = {method: [] for method in RESTORE_METHODS}
            for round_number in range(rounds):
                print(f"{size.mib} MiB round {round_number + 1}/{rounds}", file=sys.stderr, flush=True)
                shift = round_number % len(RESTORE_METHODS)
                order = RESTORE_METHODS[shift:] + RESTORE_METHODS[:shift]
                for method in order:
                    results[size.mib][method].append(restore_round(method, size, containerd, daemon, log, runc_times))
    except BaseException:
        # what was measured before the failure is still worth seeing: the sizes every round of which ran
        complete = {mib: r for mib, r in results.items() if all(len(v) == rounds for v in r.values())}
        if complete:
            report_restores(complete, rounds)
        raise
    finally:
        if daemon is not None:
            daemon.stop()
        containerd.close()
        shutil.rmtree(base, ignore_errors=True)

    report_restores(results, rounds)


def report_restores(results: dict[int, dict[str, list[dict]]], rounds: int) -> None:
    print(f"\ncontainerd restore: median of {rounds} rounds, seconds (ratio = ctr-stock / method)")
    print(f"{'size':>8}  " + "  ".join(f"{method:>10}" for method in RESTORE_METHODS) + "  " +
          "  ".join(f"{'stock/' + method:>16}" for method in RESTORE_METHODS[1:]))
    for mib, by_method in results.items():
        medians = {method: statistics.median(r["seconds"] for r in by_method[method]) for method in RESTORE_METHODS}
        print(f"{mib:>5} MiB  " + "  ".join(f"{medians[m]:>10.3f}" for m in RESTORE_METHODS) + "  " +
              "  ".join(f"{medians['ctr-stock'] / medians[m]:>15.2f}x" for m in RESTORE_METHODS[1:]))
    print("\nwhere it goes, medians in seconds: before runc = from `ctr` starting to containerd's shim starting the "
          "runtime (container, snapshot, extraction of containerd's own copy of the CRIU images); runtime = the "
          "runtime's restore (stock: runc alone; cer: cer-runc from start to namespaces bound)")
    print(f"{'size':>8}  {'extracted':>12}  {'stock before':>13}  {'cer before':>11}  {'stock runtime':>14}  "
          f"{'cer runtime':>12}")
    for mib, by_method in results.items():
        def median_of(method: str, key: str) -> float:
            return statistics.median(r[key] for r in by_method[method])

        extracted = median_of("ctr-cer", "extracted_bytes")
        cer_runtime = statistics.median(r["phases"]["since_exec"] for r in by_method["ctr-cer"])
        print(f"{mib:>5} MiB  {extracted / 2**20:>8.1f} MiB  {median_of('ctr-stock', 'before_runtime'):>13.3f}  "
              f"{median_of('ctr-cer', 'before_runtime'):>11.3f}  {median_of('ctr-stock', 'runc'):>14.3f}  "
              f"{cer_runtime:>12.3f}")
    print("\ncer-runc's restore, median seconds per phase (ctr-cer): since_exec = from the shim starting it to "
          "the container bound; python_to_main = interpreter and imports; prepare = images digest, cer's request, "
          "bundle rewrite; runc = runc restore from cer's images; bind = namespaces to the container's init")
    for mib, by_method in results.items():
        phases = by_method["ctr-cer"][0]["phases"]
        print(f"{mib:>5} MiB  " + "  ".join(
            f"{name} {statistics.median(r['phases'][name] for r in by_method['ctr-cer']):.3f}" for name in phases))
    print(json.dumps({"restore": results}), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="pass-through rounds")
    parser.add_argument("--sizes", default="16,256", help="checkpoint sizes in MiB for the containerd part")
    parser.add_argument("--restore-rounds", type=int, default=5)
    parser.add_argument("--no-containerd", action="store_true", help="pass-through only")
    options = parser.parse_args()
    runc_support.require("runc", "criu", "gcc", *(() if options.no_containerd else ("containerd", "ctr")))
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cer-bench-runtime-", dir="/tmp"))
    try:
        binary = containerd_support.build_static(WORKLOAD.read_text(), "memory-workload", work / "build")
        bench_passthrough(work, binary, options.rounds)
        if not options.no_containerd:
            bench_containerd(work, binary, [int(size) for size in options.sizes.split(",")], options.restore_rounds)
    finally:
        subprocess.run(["rm", "-rf", str(work)], timeout=120)
    print(f"\n(total run {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
