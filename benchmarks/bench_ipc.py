"""How fast cer builds IPC namespaces from checkpoints, and how fast it copies shm contents.

    python3 benchmarks/bench_ipc.py [--empty N] [--shm N]      (as root)

(a) namespaces per second from a checkpoint whose IPC namespace holds nothing (the bundled
    contrib/sample/checkpoint-empty-ipc), and (b) from one holding a single 64 MiB shm segment
    (built in memory). Each namespace is made as the daemon makes it: a new thread unshares
    CLONE_NEWIPC, populates, opens /proc/thread-self/ns/ipc; here the fd is closed at once.

The copy rate of populate's shm copy (populate time of (b) less that of (a)) is printed next to a
memcpy baseline measured in the same run: ctypes.memmove of 64 MiB between two buffers, with the
destination already faulted in (warm) and freshly mapped (cold, which pays the page allocation
that filling a new segment cannot avoid either).
"""

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cer.criu.checkpoint import IpcContents, ShmSegment, read_checkpoint  # noqa: E402
from cer.linux.libc import check, libc  # noqa: E402
from cer.linux.sysv import CLONE_NEWIPC, fresh_ipc_sysctls, is_fresh_ipc_namespace, populate_ipc_namespace  # noqa: E402

SEGMENT = 64 << 20
EMPTY_CHECKPOINT = Path(__file__).resolve().parents[1] / "contrib" / "sample" / "checkpoint-empty-ipc"


def make_namespace(contents: IpcContents) -> tuple[float, float]:
    """One namespace, made in its own thread: (seconds in all, seconds of populate)."""
    times = {}

    def body():
        try:
            start = time.perf_counter()
            check(libc.unshare(CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")
            populate_start = time.perf_counter()
            populate_ipc_namespace(contents)
            times["populate"] = time.perf_counter() - populate_start
            os.close(os.open("/proc/thread-self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC))
            times["total"] = time.perf_counter() - start
        except BaseException as e:
            times["error"] = e

    thread = threading.Thread(target=body)
    started = time.perf_counter()
    thread.start()
    thread.join()
    if "error" in times:
        raise times["error"]
    return time.perf_counter() - started, times["populate"]


def namespaces(contents: IpcContents, count: int) -> tuple[list[float], list[float]]:
    made = [make_namespace(contents) for _ in range(count)]
    return [t for t, _ in made], [p for _, p in made]


def memmove_seconds(source, destination) -> float:
    start = time.perf_counter()
    ctypes.memmove(destination, source, SEGMENT)
    return time.perf_counter() - start


def baseline(runs: int, data: bytes) -> tuple[list[float], list[float]]:
    """memmove of 64 MiB: into one warm buffer, and into a freshly mapped one each time."""
    warm = ctypes.create_string_buffer(SEGMENT)
    memmove_seconds(data, warm)
    warm_times = [memmove_seconds(data, warm) for _ in range(runs)]
    cold_times = []
    for _ in range(runs):
        with mmap.mmap(-1, SEGMENT) as fresh:
            target = (ctypes.c_char * SEGMENT).from_buffer(fresh)
            cold_times.append(memmove_seconds(data, target))
            del target
    return warm_times, cold_times


def gbps(seconds: float) -> float:
    return SEGMENT / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--empty", type=int, default=500, help="namespaces from the empty checkpoint")
    parser.add_argument("--shm", type=int, default=15, help="namespaces with a 64 MiB segment")
    args = parser.parse_args()

    fresh_ipc_sysctls()  # its one-off probe namespace is not what is measured
    empty = read_checkpoint(EMPTY_CHECKPOINT).ipc
    assert is_fresh_ipc_namespace(empty)
    data = os.urandom(SEGMENT)
    with_shm = IpcContents(sysctls=empty.sysctls,
                           shm=(ShmSegment(id=0, key=0x62656E63, mode=0o600, uid=0, gid=0, size=SEGMENT, data=data),))

    namespaces(empty, 20)  # warm-up
    empty_total, empty_populate = namespaces(empty, args.empty)
    shm_total, shm_populate = namespaces(with_shm, args.shm)
    warm, cold = baseline(max(args.shm, 5), data)

    empty_median = statistics.median(empty_total)
    shm_median = statistics.median(shm_total)
    copy = statistics.median(shm_populate) - statistics.median(empty_populate)
    print(f"(a) empty IPC checkpoint:   {1 / empty_median:8.0f} namespaces/s   median {empty_median * 1e6:7.0f} us "
          f"(populate {statistics.median(empty_populate) * 1e6:.0f} us), {args.empty} namespaces")
    print(f"(b) one 64 MiB shm segment: {1 / shm_median:8.1f} namespaces/s   median {shm_median * 1e3:7.1f} ms "
          f"(populate {statistics.median(shm_populate) * 1e3:.1f} ms), {args.shm} namespaces")
    print(f"shm copy in populate:       {gbps(copy):6.2f} GB/s")
    for name, times in (("warm", warm), ("cold", cold)):
        rate = gbps(statistics.median(times))
        print(f"memmove baseline, {name}:     {rate:6.2f} GB/s   baseline/populate {rate / gbps(copy):.2f}")

if __name__ == "__main__":
    main()
