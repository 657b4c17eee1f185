"""Container restore latency: stock containerd, runc from an extracted directory, and runc through cer with
and without cer's namespaces.

    python3 benchmarks/bench_restore.py [--sizes 16,256] [--rounds 5] [--no-ipc-heavy] [--no-containerd]   (as root)

Checkpoints, each made once by ``runc checkpoint`` (and, for the memory sizes, by ``ctr c checkpoint --rw
--image --task`` in a private containerd):

  mem-N       benchmarks/memory-workload.c holding N MiB of written memory (no SysV IPC);
  ipc-heavy   tests/contrib/ipc-live-workload.c with 64 MiB of unattached SysV shm, 1,000 semaphores (ten
              sets) and 100 queued messages (and two IPC sysctls changed): what a pre-filled IPC
              namespace saves a restore.

Methods, each restoring a new container from the same checkpoint; the time until the restoring command
returns is taken:

  ctr         stock ``ctr c restore --live ID CKPT`` (containerd unpacks the checkpoint from its content
              store, then runs runc restore); memory sizes only;
  runc        ``runc restore -d`` from the extracted image directory, runc's own namespaces: the floor;
  cer         ``contrib/ctr-wrapper restore --runtime runc --external-checkpoint``: cer's images, runc's own
              namespaces (the wrapper's start-up, as its first line runs it, ``python3 -I -S``, and its one
              request to cer included);
  cer+ns      the same with ``--external-ns uts --external-ns ipc``: cer's pre-filled IPC and UTS namespaces
              (warm), and cer's image view (hard links to the same files; the IPC images left out).

Rounds are interleaved: in each round every checkpoint is restored by every method, in an order that
rotates from round to round, so drift hits all alike. Every restored container is killed and deleted
before the next restore, dirty pages are written back (sync) before each measurement, and cer's pools
are full again before each cer restore (warm gets). Page cache stays warm for all methods. Medians are
printed with the ratios the issue's aims are about: cer / runc (aim: at most 1.1), ctr / cer (aim: above
1), and cer / cer+ns (what cer's namespaces save; aim for ipc-heavy: above 1). A second table gives the CPU
time each runc-based method used (the command and what it waited for: runc, CRIU; not the restored
process), which a busy machine disturbs less than wall time: cer - runc is what the wrapper costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import containerd_support  # noqa: E402
import runc_support  # noqa: E402
from conftest import start_daemon  # noqa: E402

MEMORY_WORKLOAD = REPO / "benchmarks" / "memory-workload.c"
IPC_WORKLOAD = REPO / "tests" / "contrib" / "ipc-live-workload.c"
IPC_HEAVY_ARGS = ["0", "64", "1000", "100"]  # no attached segment, 64 MiB unattached, 1,000 semaphores, 100 messages
WRAPPER = REPO / "contrib" / "ctr-wrapper"
NAMESPACE = "cer-bench"
METHODS = ("ctr", "runc", "cer", "cer+ns")


def settle() -> None:
    """Write back what the previous restore left dirty, so it is not billed to this one."""
    os.sync()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], cpu: list[float], timeout: float = 300) -> float:
    """Run argv; its wall time, and into ``cpu`` the CPU time it and what it waited for (runc, CRIU) used:
    on a busy machine CPU time shows what a method costs where wall time also shows what it waited for."""
    cpu_before = children_cpu()
    start = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                            env=runc_support.runtime_env())
    elapsed = time.perf_counter() - start
    cpu.append(children_cpu() - cpu_before)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed


@dataclass
class Checkpoint:
    name: str
    bundle: runc_support.Bundle
    images: Path
    ctr_checkpoint: str | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {method: [] for method in METHODS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {method: [] for method in METHODS})


def runc_checkpoint(name: str, work: Path, binary: Path, args: list[str], runc: runc_support.Runc) -> Checkpoint:
    bundle = runc_support.make_bundle(work / f"{name}-bundle", binary, args)
    images = work / f"{name}-images"
    images.mkdir()
    container = f"{name}-{uuid.uuid4().hex[:6]}"
    runc.run_detached(bundle, container, ready_line=b"ready\n", timeout=120)
    runc.checkpoint(container, images, timeout=600)
    return Checkpoint(name, bundle, images)


def ctr_checkpoint(checkpoint: Checkpoint, mib: int, work: Path, binary: Path,
                   containerd: containerd_support.PrivateContainerd) -> None:
    image = containerd_support.oci_image_archive(
        work / f"{checkpoint.name}.oci.tar", f"docker.io/cer-bench/memory:{mib}",
        {"bin/memory-workload": (binary.read_bytes(), 0o755)}, ["/bin/memory-workload", str(mib)])
    containerd.import_image(image.archive, NAMESPACE)
    container = f"{checkpoint.name}-{uuid.uuid4().hex[:6]}"
    containerd.run(image.name, container, namespace=NAMESPACE, timeout=120)  # waits for "ready"
    checkpoint.ctr_checkpoint = f"cer-bench/checkpoint:{mib}"
    containerd.checkpoint(container, checkpoint.ctr_checkpoint, NAMESPACE, timeout=600)
    containerd.remove_container(container, NAMESPACE)


def restore(method: str, checkpoint: Checkpoint, runc: runc_support.Runc, work: Path, daemon,
            containerd: containerd_support.PrivateContainerd | None) -> float:
    container = f"r-{uuid.uuid4().hex[:8]}"
    restore_work = work / f"work-{container}"
    restore_work.mkdir()
    try:
        if method.startswith("cer"):
            # Warm gets only: the pool refilled after the previous cer restore before this one starts.
            daemon.wait_full(checkpoint.name, ("ipc", "uts"), timeout=60)
        settle()
        if method == "ctr":
            start = time.perf_counter()
            containerd.ctr("containers", "restore", "--live", container, checkpoint.ctr_checkpoint,
                           namespace=NAMESPACE, timeout=300)
            return time.perf_counter() - start
        if method == "runc":
            return timed(runc.argv("restore", "-d", "--image-path", str(checkpoint.images), "--work-path",
                                   str(restore_work), "--bundle", str(checkpoint.bundle.path), container),
                         checkpoint.cpu[method])
        namespaces = ["--external-ns", "uts", "--external-ns", "ipc"] if method == "cer+ns" else []
        # As the wrapper's first line runs it (python3 -I -S), with this Python.
        return timed([sys.executable, "-I", "-S", str(WRAPPER), "restore", "--endpoint", daemon.endpoint, "--runtime", "runc",
                      "--runc-root", str(runc.root), "--bundle", str(checkpoint.bundle.path), *namespaces,
                      "--external-checkpoint", checkpoint.name, container], checkpoint.cpu[method])
    finally:
        if method == "ctr":
            containerd.remove_container(container, NAMESPACE)
        else:
            runc.delete(container)
        shutil.rmtree(restore_work, ignore_errors=True)


def report(checkpoints: list[Checkpoint], rounds: int) -> None:
    shown = [method for method in METHODS if any(c.times[method] for c in checkpoints)]
    print(f"\nrestore latency, median of {rounds} rounds, seconds")
    print(f"{'checkpoint':>10}  " + "  ".join(f"{method:>8}" for method in shown) +
          f"  {'cer/runc':>9}  {'ctr/cer':>8}  {'cer/cer+ns':>10}  {'ns saved':>9}")
    for checkpoint in checkpoints:
        medians = {m: statistics.median(checkpoint.times[m]) for m in shown if checkpoint.times[m]}
        cells = "  ".join(f"{medians[m]:>8.3f}" if m in medians else f"{'-':>8}" for m in shown)
        best_cer = min(medians["cer"], medians["cer+ns"])
        ctr_ratio = f"{medians['ctr'] / best_cer:>7.2f}x" if "ctr" in medians else f"{'-':>8}"
        print(f"{checkpoint.name:>10}  {cells}  {best_cer / medians['runc']:>8.2f}x  {ctr_ratio}  "
              f"{medians['cer'] / medians['cer+ns']:>9.2f}x  {medians['cer'] - medians['cer+ns']:>8.3f}s")
    print("cer/runc: the faster cer path against the floor (aim <= 1.10); ctr/cer: stock ctr against it (aim > 1);\n"
          "cer/cer+ns and ns saved: what cer's pre-filled namespaces save a restore (aim for ipc-heavy: > 1)")
    print("\nCPU time of the restoring command and what it waited for (runc, CRIU), median, seconds")
    print(f"{'checkpoint':>10}  {'runc':>8}  {'cer':>8}  {'cer+ns':>8}  {'cer-runc':>9}  {'ns saved':>9}")
    for checkpoint in checkpoints:
        cpu = {m: statistics.median(checkpoint.cpu[m]) for m in ("runc", "cer", "cer+ns")}
        print(f"{checkpoint.name:>10}  {cpu['runc']:>8.3f}  {cpu['cer']:>8.3f}  {cpu['cer+ns']:>8.3f}  "
              f"{cpu['cer'] - cpu['runc']:>8.3f}s  {cpu['cer'] - cpu['cer+ns']:>8.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,256", help="memory checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-ipc-heavy", action="store_true", help="leave the IPC-heavy checkpoint out")
    parser.add_argument("--no-containerd", action="store_true", help="leave stock ctr out")
    options = parser.parse_args()
    sizes = [int(size) for size in options.sizes.split(",") if size]
    runc_support.require("runc", "criu", "gcc", *(() if options.no_containerd else ("containerd", "ctr")))

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cer-bench-restore-", dir="/tmp"))
    containerd = None if options.no_containerd else containerd_support.PrivateContainerd("cer-bench-ctd-")
    runc = runc_support.Runc(work / "runc")
    daemon = None
    checkpoints: list[Checkpoint] = []
    try:
        if containerd is not None:
            containerd.start()
        memory = containerd_support.build_static(MEMORY_WORKLOAD.read_text(), "memory-workload", work / "build")
        for mib in sizes:
            print(f"checkpointing {mib} MiB ...", file=sys.stderr, flush=True)
            checkpoint = runc_checkpoint(f"mem-{mib}", work, memory, [str(mib)], runc)
            if containerd is not None:
                ctr_checkpoint(checkpoint, mib, work, memory, containerd)
            checkpoints.append(checkpoint)
        if not options.no_ipc_heavy:
            print("checkpointing ipc-heavy ...", file=sys.stderr, flush=True)
            ipc = containerd_support.build_static(IPC_WORKLOAD.read_text(), "ipc-live-workload", work / "build")
            checkpoints.append(runc_checkpoint("ipc-heavy", work, ipc, IPC_HEAVY_ARGS, runc))
        entries = [{"name": c.name, "capacity": 1, "path": str(c.images)} for c in checkpoints]
        daemon = start_daemon({"containerd_checkpoints": entries, "default_capacity": 1})
        for round_number in range(options.rounds):
            print(f"round {round_number + 1}/{options.rounds}", file=sys.stderr, flush=True)
            for checkpoint in checkpoints:
                methods = [m for m in METHODS if m != "ctr" or checkpoint.ctr_checkpoint]
                shift = round_number % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    checkpoint.times[method].append(restore(method, checkpoint, runc, work, daemon, containerd))
    finally:
        runc.cleanup()
        if daemon is not None:
            daemon.stop()
            shutil.rmtree(daemon.root.parent, ignore_errors=True)
        if containerd is not None:
            containerd.close()
        shutil.rmtree(work, ignore_errors=True)

    report(checkpoints, options.rounds)
    print(json.dumps({"rounds": options.rounds, "seconds": {c.name: c.times for c in checkpoints},
                      "cpu_seconds": {c.name: c.cpu for c in checkpoints}}), file=sys.stderr)
    print(f"\n(total run {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
