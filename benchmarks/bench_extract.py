#!/usr/bin/env python3
"""How fast cer makes a checkpoint in containerd usable: time to the first ready pool and extraction
throughput, next to ``ctr content get DIGEST | tar -x`` of the same CRIU archive, in the same run.

Run as root from the repository (``python3 benchmarks/bench_extract.py``; needs what contrib/install-deps
installs). It starts a private containerd (tests/containerd_support.py), runs a container whose process
holds ``--mib`` MiB of written memory (256 by default: a checkpoint of about that size), checkpoints it
with ``ctr c checkpoint --rw --image --task``, and then, round after round, alternating the order:

- **cer**: ``cer start`` on a fresh ROOT with the checkpoint as its only entry (capacity 1). Measured:
  from spawning the process to the pool being ready with one idle namespace of each type (interpreter
  start, finding the image, streaming and extracting the CRIU archive, syncing it, reading the images,
  the rootfs snapshots, building the namespaces); and the extraction alone as cer reports it
  (``extract_seconds`` in status: stream, safety checks, digest, write, syncfs, rename).
- **baseline**: ``ctr content get DIGEST | tar -x -C DIR`` of the same archive, and the same followed by
  ``sync -f DIR`` (cer syncs before it marks an extraction whole; plain tar does not).

The table gives medians over rounds and the ratios; MB/s are 10^6 bytes of archive per second.
Everything it starts is stopped and its directories removed.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import containerd_support  # noqa: E402

MEMORY_WORKLOAD = REPO / "benchmarks" / "memory-workload.c"


def run_cer(containerd, checkpoint, timeout: float) -> tuple[float, float]:
    """Seconds from spawning ``cer start`` to a ready pool, and cer's own extraction seconds."""
    work = Path(tempfile.mkdtemp(prefix="cer-bench-", dir="/tmp"))
    config = work / "namespace_service.json"
    config.write_text(json.dumps({"containerd_checkpoints": [{"name": checkpoint.name, "capacity": 1}]}))
    endpoint = f"ipc://{work}/root/daemon.sock"
    log = open(work / "daemon.log", "wb")
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cer", "start", "--root", str(work / "root"), "--config", str(config),
         "--containerd-address", containerd.address, "--containerd-timeout", "60"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    from cer.protocol.client import Client
    from cer.protocol.methods import AdminStatus

    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"cer exited with {process.returncode}:\n{(work / 'daemon.log').read_text()}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"no ready pool within {timeout} s:\n{(work / 'daemon.log').read_text()[-3000:]}")
            try:
                with Client(endpoint, timeout=0.5) as client:
                    status = client.call(AdminStatus())
            except Exception:  # noqa: BLE001 - not answering yet
                time.sleep(0.005)
                continue
            pool = status["pools"][0]
            if pool["state"] == "ready" and all(pool["types"][t]["idle"] >= 1 for t in ("ipc", "uts", "mnt")):
                ready = time.perf_counter() - started
                extract = next(iter(status["checkpoints"].values()))["extract_seconds"]
                return ready, extract
            if pool["state"] == "failed":
                raise RuntimeError(f"the pool failed: {pool['last_error']}")
            time.sleep(0.005)
    finally:
        process.terminate()
        process.wait(60)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def run_baseline(containerd, checkpoint, sync: bool) -> float:
    target = Path(tempfile.mkdtemp(prefix="cer-bench-tar-", dir="/tmp"))
    command = (f"ctr --address {containerd.address} --namespace default content get {checkpoint.criu_digest}"
               f" | tar -x -C {target}" + (f" && sync -f {target}" if sync else ""))
    try:
        started = time.perf_counter()
        subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, timeout=600, env=containerd_support.runtime_env())
        return time.perf_counter() - started
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="memory the checkpointed process holds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    problem = containerd_support.require_tools()
    if problem:
        sys.exit(problem)

    containerd = containerd_support.PrivateContainerd("cer-bench-ctd-").start()
    try:
        workload = containerd_support.build_static(MEMORY_WORKLOAD.read_text(), "memory-workload",
                                                   containerd.dir / "build")
        made = time.perf_counter()
        checkpoint = containerd_support.make_checkpoint(
            containerd, "bench", workload=workload, args=(f"/{containerd_support.WORKLOAD_PATH}", str(args.mib))
        )
        print(f"checkpoint of a {args.mib} MiB process: CRIU archive {checkpoint.criu_size / 1e6:.1f} MB "
              f"({time.perf_counter() - made:.1f} s to run and checkpoint it)")
        results = {"cer ready": [], "cer extract": [], "tar": [], "tar+sync": []}
        for round_ in range(args.rounds):
            order = ["cer", "tar", "tar+sync"] if round_ % 2 == 0 else ["tar+sync", "tar", "cer"]
            for what in order:
                if what == "cer":
                    ready, extract = run_cer(containerd, checkpoint, 300)
                    results["cer ready"].append(ready)
                    results["cer extract"].append(extract)
                else:
                    results[what].append(run_baseline(containerd, checkpoint, sync=what == "tar+sync"))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()), flush=True)
    finally:
        containerd.close()

    size = checkpoint.criu_size
    medians = {key: statistics.median(values) for key, values in results.items()}
    print()
    print(f"| {args.mib} MiB checkpoint, median of {args.rounds} | seconds | MB/s | vs `ctr content get \\| tar -x` |")
    print("|---|---:|---:|---:|")
    rows = [
        ("`ctr content get | tar -x`", medians["tar"]),
        ("`ctr content get | tar -x && sync -f`", medians["tar+sync"]),
        ("cer extraction (stream, checks, digest, write, syncfs)", medians["cer extract"]),
        ("cer: spawn to first ready pool (ipc+uts+mnt)", medians["cer ready"]),
    ]
    for label, seconds in rows:
        label = label.replace("|", "\\|")
        print(f"| {label} | {seconds:.2f} | {size / seconds / 1e6:.0f} | {seconds / medians['tar']:.2f}x |")


if __name__ == "__main__":
    main()
