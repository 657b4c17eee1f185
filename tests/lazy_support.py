"""What the lazy-restore tests share (tests/contrib/test_lazy.py, tests/contrib/test_lazy_server.py): checkpoints of
tests/contrib/lazy-workload.c made with real runc, a cer daemon serving them, restores through contrib/ctr-wrapper
--lazy, and the workload's own reports. runc, CRIU or userfaultfd missing is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, short_tempdir, start_daemon, wait_for

import containerd_support
import runc_support
from runc_support import RuntimeSupportError

WORKLOAD = REPO / "tests" / "contrib" / "lazy-workload.c"



def require() -> None:
    try:
        runc_support.require("runc", "criu", "gcc")
    except RuntimeSupportError as error:
        pytest.fail(str(error))
    from cer.linux.userfaultfd import lazy_pages_unsupported

    reason = lazy_pages_unsupported()
    if reason is not None:
        pytest.fail(f"lazy restores need userfaultfd here: {reason}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    name: str
    mib: int
    images: Path
    bundle: runc_support.Bundle

    @property
    def pages(self) -> int:
        return self.mib * 256


@dataclass
class Restorable:
    """A bundle to restore a checkpoint with: a copy of the checkpoint's root filesystem, /results bound to a
    fresh host directory of its own (two restores at once must not share one)."""

    bundle: Path
    results: Path

    def result(self) -> str | None:
        try:
            return (self.results / "lazy-result").read_text().strip()
        except FileNotFoundError:
            return None


def restorable(checkpoint: Checkpoint, directory: Path) -> Restorable:
    bundle, results = runc_support.restore_bundle(checkpoint.bundle, directory)
    return Restorable(bundle, results)


@pytest.fixture(scope="module")
def workdir():
    path = short_tempdir("cer-lazy-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], timeout=60)


@pytest.fixture(scope="module")
def binary(workdir):
    require()
    return containerd_support.build_static(WORKLOAD.read_text(), "lazy-workload", workdir / "build")


def make_checkpoint(workdir: Path, binary: Path, mib: int) -> Checkpoint:
    name = f"lazy-{mib}"
    bundle = runc_support.bundle_with_results(workdir / name, binary, [str(mib), "/results"])
    images = workdir / name / "images"
    images.mkdir()
    with runc_support.private_runc() as runc:
        container_id = unique(name)
        runc.run_detached(bundle, container_id, timeout=120)
        runc.checkpoint(container_id, images, timeout=300)
    return Checkpoint(name, mib, images, bundle)


@pytest.fixture(scope="module")
def small(workdir, binary):
    """64 MiB: most tests."""
    return make_checkpoint(workdir, binary, 64)


@pytest.fixture(scope="module")
def large(workdir, binary):
    """256 MiB, the size the issue names."""
    return make_checkpoint(workdir, binary, 256)


# --------------------------------------------------------------------------- daemon, runc, wrapper

def entries(*checkpoints: Checkpoint) -> dict:
    return {"containerd_checkpoints": [{"name": c.name, "capacity": 1, "path": str(c.images)} for c in checkpoints],
            "default_capacity": 1}


def processes_naming(path: Path) -> list[int]:
    """Processes whose command line names something under ``path`` (a lazy-pages server, or a helper it forked)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if str(path).encode() in Path(f"/proc/{name}/cmdline").read_bytes() and alive(int(name)):
                found.append(int(name))
    return found


@contextlib.contextmanager
def running_daemon(config: dict, *args: str):
    daemon = start_daemon(config, *args)
    try:
        for entry in config["containerd_checkpoints"]:
            daemon.wait_full(entry["name"], ("ipc", "uts"), timeout=60)
        yield daemon
    finally:
        code = daemon.stop()
        left = processes_naming(daemon.root / "lazy")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(daemon.root.parent)], timeout=60)
    assert code == 0, daemon.output()
    assert not left, f"processes of lazy-pages servers outlived the daemon: {left}"


@pytest.fixture
def lazy_cer(small, large):
    with running_daemon(entries(small, large)) as daemon:
        yield daemon


@pytest.fixture
def runc(private_runc):
    """tests/contrib/conftest.py's private runc state root, by the name the lazy tests use."""
    return private_runc


def wrapper_argv(daemon, runc, restorable_: Restorable, checkpoint: Checkpoint, container_id: str, *extra: str):
    return runc_support.wrapper_restore_argv(daemon.endpoint, runc, restorable_.bundle, "--lazy", *extra,
                                             checkpoint.name, container_id)


def restore_lazily(daemon, runc, restorable_: Restorable, checkpoint: Checkpoint, *extra: str) -> dict:
    return runc_support.restore_through_wrapper(daemon.endpoint, runc, restorable_.bundle, "--lazy", *extra,
                                                checkpoint.name, unique("lazy"))


def check_memory(pid: int, where: Restorable, round_: int, timeout: float = 60) -> str:
    """Ask the workload to check every page; its report for that round."""
    os.kill(pid, signal.SIGUSR1)

    def reported():
        text = where.result()
        return text if text and text.split()[1] == str(round_) else None

    return wait_for(reported, timeout, 0.01, f"process {pid} to report check {round_}")


def lazy_status(daemon) -> dict:
    return daemon.status()["lazy"]


def server(daemon, server_id: str) -> dict | None:
    return next((s for s in lazy_status(daemon)["servers"] if s["server_id"] == server_id), None)


def wait_ended(daemon, server_id: str, timeout: float = 30) -> dict:
    def ended():
        return next((e for e in lazy_status(daemon)["ended"] if e["server_id"] == server_id), None)

    return wait_for(ended, timeout, 0.05, f"lazy-pages server {server_id} to end")


def users(daemon, checkpoint: Checkpoint) -> int:
    return daemon.status()["checkpoints"][f"default/{checkpoint.name}"]["users"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def daemon_fds(daemon, kind: str) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{daemon.process.pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{daemon.process.pid}/fd/{fd}") == kind
    return count
