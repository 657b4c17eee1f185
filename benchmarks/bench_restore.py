"""Container restore latency: stock containerd, runc from a fresh extraction, and runc through cer.

    python3 benchmarks/bench_restore.py [--sizes 16,256,1024] [--rounds 5] [--no-containerd]   (as root)

For each size a container runs benchmarks/memory-workload.c holding that many MiB of written memory and is
checkpointed twice: by ``runc checkpoint`` (an image directory, also stored as a tar, the way containerd keeps
a checkpoint's CRIU images in its content store) and, in a private containerd, by ``ctr c checkpoint --rw
--image --task``. Then, round after round (the methods interleaved, so drift hits them alike), each method
restores a new container and the time until the restoring command returns is taken:

  ctr           stock ``ctr c restore --live ID CKPT``: containerd unpacks the checkpoint from its content
                store and runs runc restore;
  runc-fresh    extract the stored tar into a new directory (``tar -xf``), then ``runc restore -d`` from it:
                what a restore costs when the images are not already on disk;
  cer-wrapper   ``contrib/ctr-wrapper restore --runtime runc --external-ns uts --external-ns ipc
                --external-checkpoint``: images pre-extracted by cer, IPC and UTS namespaces from cer's pools
                (warm gets), the Python wrapper's start-up and its cer calls included;
  runc-direct   ``runc restore -d`` from the pre-extracted directory with runc's own namespaces: the floor
                the cer path adds its wrapper to (for reading the others, not a method of its own).

Every restored container is killed and deleted before the next round, and dirty pages are written back
(sync) before each measurement. Page cache is left warm for all methods (all images were just written).
Medians are printed side by side with ratios to stock ctr (to runc-fresh with --no-containerd).
"""

from __future__ import annotations

import argparse
import json
import os
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
WRAPPER = REPO / "contrib" / "ctr-wrapper"
NAMESPACE = "cer-bench"
METHODS = ("ctr", "runc-fresh", "cer-wrapper", "runc-direct")


def settle() -> None:
    """Write back what the previous round left dirty (a 1 GiB extraction), so it is not billed to this one."""
    os.sync()


def timed(argv: list[str], env: dict | None = None, timeout: float = 300) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                            env=env or runc_support.runtime_env())
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed


class Size:
    """Everything one checkpoint size needs: bundle, runc images (dir + tar), containerd checkpoint."""

    def __init__(self, mib: int, work: Path, binary: Path, runc: runc_support.Runc,
                 containerd: containerd_support.PrivateContainerd | None) -> None:
        self.mib = mib
        self.name = f"mem-{mib}"
        self.bundle = runc_support.make_bundle(work / f"{self.name}-bundle", binary, [str(mib)])
        self.images = work / f"{self.name}-images"
        self.images.mkdir()
        container = f"{self.name}-{uuid.uuid4().hex[:6]}"
        runc.run_detached(self.bundle, container, timeout=120)
        runc.checkpoint(container, self.images, timeout=600)
        self.tar = work / f"{self.name}-images.tar"
        subprocess.run(["tar", "-cf", str(self.tar), "-C", str(self.images), "."], check=True, timeout=600)
        self.ctr_checkpoint = None
        if containerd is not None:
            image = containerd_support.oci_image_archive(
                work / f"{self.name}.oci.tar", f"docker.io/cer-bench/memory:{mib}",
                {"bin/memory-workload": (binary.read_bytes(), 0o755)}, ["/bin/memory-workload", str(mib)])
            containerd.import_image(image.archive, NAMESPACE)
            containerd.run(image.name, container, namespace=NAMESPACE, timeout=120)  # waits for "ready"
            self.ctr_checkpoint = f"cer-bench/checkpoint:{mib}"
            containerd.checkpoint(container, self.ctr_checkpoint, NAMESPACE, timeout=600)
            containerd.remove_container(container, NAMESPACE)


def round_ctr(size: Size, containerd: containerd_support.PrivateContainerd) -> float:
    container = f"r-{uuid.uuid4().hex[:8]}"
    try:
        settle()
        start = time.perf_counter()
        containerd.ctr("containers", "restore", "--live", container, size.ctr_checkpoint, namespace=NAMESPACE,
                       timeout=300)
        return time.perf_counter() - start
    finally:
        containerd.remove_container(container, NAMESPACE)


def round_runc_fresh(size: Size, runc: runc_support.Runc, work: Path) -> float:
    container = f"r-{uuid.uuid4().hex[:8]}"
    images = work / f"fresh-{container}"
    restore_work = work / f"work-{container}"
    try:
        settle()
        start = time.perf_counter()
        images.mkdir()
        subprocess.run(["tar", "-xf", str(size.tar), "-C", str(images)], check=True, timeout=600)
        restore_work.mkdir()
        timed(runc.argv("restore", "-d", "--image-path", str(images), "--work-path", str(restore_work),
                        "--bundle", str(size.bundle.path), container))
        return time.perf_counter() - start
    finally:
        runc.delete(container)
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(restore_work, ignore_errors=True)


def round_runc_direct(size: Size, runc: runc_support.Runc, work: Path) -> float:
    container = f"r-{uuid.uuid4().hex[:8]}"
    restore_work = work / f"work-{container}"
    restore_work.mkdir()
    try:
        settle()
        return timed(runc.argv("restore", "-d", "--image-path", str(size.images), "--work-path", str(restore_work),
                               "--bundle", str(size.bundle.path), container))
    finally:
        runc.delete(container)
        shutil.rmtree(restore_work, ignore_errors=True)


def round_wrapper(size: Size, runc: runc_support.Runc, daemon) -> float:
    container = f"r-{uuid.uuid4().hex[:8]}"
    try:
        settle()
        return timed([sys.executable, str(WRAPPER), "restore", "--endpoint", daemon.endpoint, "--runtime", "runc",
                      "--runc-root", str(runc.root), "--bundle", str(size.bundle.path), "--external-ns", "uts",
                      "--external-ns", "ipc", "--external-checkpoint", size.name, container])
    finally:
        runc.delete(container)
        # Back to a full pool before the next round, so every round gets warm namespaces.
        daemon.wait_full(size.name, ("ipc", "uts"), timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,256,1024", help="checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-containerd", action="store_true", help="leave stock ctr out")
    options = parser.parse_args()
    sizes = [int(size) for size in options.sizes.split(",")]
    runc_support.require("runc", "criu", "gcc", "tar", *(() if options.no_containerd else ("containerd", "ctr")))

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cer-bench-restore-", dir="/tmp"))
    containerd = None if options.no_containerd else containerd_support.PrivateContainerd("cer-bench-ctd-")
    runc = runc_support.Runc(work / "runc")
    daemon = None
    results: dict[int, dict[str, list[float]]] = {}
    try:
        if containerd is not None:
            containerd.start()
        binary = containerd_support.build_static(WORKLOAD.read_text(), "memory-workload", work / "build")
        prepared = []
        for mib in sizes:
            print(f"checkpointing {mib} MiB ...", file=sys.stderr, flush=True)
            prepared.append(Size(mib, work, binary, runc, containerd))
        entries = [{"name": size.name, "capacity": 2, "path": str(size.images)} for size in prepared]
        daemon = start_daemon({"containerd_checkpoints": entries, "default_capacity": 2})
        for size in prepared:
            daemon.wait_full(size.name, ("ipc", "uts"), timeout=60)
        for size in prepared:
            times = results[size.mib] = {method: [] for method in METHODS}
            for round_number in range(options.rounds):
                print(f"{size.mib} MiB round {round_number + 1}/{options.rounds}", file=sys.stderr, flush=True)
                if containerd is not None:
                    times["ctr"].append(round_ctr(size, containerd))
                times["runc-fresh"].append(round_runc_fresh(size, runc, work))
                times["cer-wrapper"].append(round_wrapper(size, runc, daemon))
                times["runc-direct"].append(round_runc_direct(size, runc, work))
    finally:
        runc.cleanup()
        if daemon is not None:
            daemon.stop()
            shutil.rmtree(daemon.root.parent, ignore_errors=True)
        if containerd is not None:
            containerd.close()
        shutil.rmtree(work, ignore_errors=True)

    baseline = "ctr" if containerd is not None else "runc-fresh"
    shown = [method for method in METHODS if results and results[sizes[0]][method]]
    print(f"\nrestore latency, median of {options.rounds} rounds, seconds (ratio = {baseline} / method)")
    print(f"{'size':>8}  " + "  ".join(f"{method:>12}" for method in shown) + "  " +
          "  ".join(f"{baseline + '/' + method:>22}" for method in shown if method != baseline))
    for mib, times in results.items():
        medians = {method: statistics.median(times[method]) for method in shown}
        print(f"{mib:>5} MiB  " + "  ".join(f"{medians[method]:>12.3f}" for method in shown) + "  " +
              "  ".join(f"{medians[baseline] / medians[method]:>21.2f}x" for method in shown if method != baseline))
    print(json.dumps({"rounds": options.rounds, "seconds": results}), file=sys.stderr)
    print(f"\n(total run {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
