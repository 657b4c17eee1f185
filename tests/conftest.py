"""Fixtures shared by the whole suite: a real cer daemon run as a separate process, and actor hygiene."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pykka
import pytest

# Test helper modules (criu_support, dummy_*) live beside this file; tests/ is not a package.
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "contrib" / "sample"


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


UNPRIVILEGED_UID = 54321
"""A uid nobody uses, for tests that play another local user."""

# The interpreter and its site-packages may sit where another user cannot read (pyenv under /root): the
# child imports what the tests' code needs as root, then drops to the unprivileged uid for good (setuid from
# root clears every capability) before that code runs, so every access check it meets is another user's.
_DROP_PRIVILEGES = f"""
import encodings.idna, http.client, json, os, socket, sys, time
import zmq
import cer.errors, cer.protocol.client, cer.protocol.methods
os.setgroups([])
os.setgid({UNPRIVILEGED_UID})
os.setuid({UNPRIVILEGED_UID})
"""


def as_unprivileged(code: str, *args: str, timeout: float = 60, wait: bool = True):
    """Run Python ``code`` (with cer importable, ``args`` as sys.argv[1:]) as UNPRIVILEGED_UID, no groups: the
    CompletedProcess, or with ``wait=False`` the running Popen (output piped)."""
    argv = [sys.executable, "-c", _DROP_PRIVILEGES + code, *args]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")


def unprivileged_can_connect(path: Path | str) -> bool:
    """Whether UNPRIVILEGED_UID may connect to the unix socket ``path``."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
    )
    result = as_unprivileged(probe, timeout=30)
    assert result.returncode in (0, 13), result.stderr
    return result.returncode == 0


def short_tempdir(prefix: str = "cer-") -> Path:
    # An ipc:// endpoint is a unix socket: its path must stay under ~107 bytes, so not under pytest's tmp_path.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class RunningDaemon:
    """A ``cer start`` process serving a temporary ROOT."""

    root: Path
    config: Path
    process: subprocess.Popen
    log: Path
    endpoint: str = field(init=False)

    def __post_init__(self) -> None:
        self.endpoint = f"ipc://{self.root}/daemon.sock"

    def client(self, timeout: float = 15.0):
        from cer.protocol.client import Client

        return Client(self.endpoint, timeout=timeout)

    def call(self, method) -> dict:
        with self.client() as client:
            return client.call(method)

    def status(self) -> dict:
        from cer.protocol.methods import AdminStatus

        return self.call(AdminStatus())

    def pool(self, name: str) -> dict:
        return next(pool for pool in self.status()["pools"] if pool["ref"]["name"] == name)

    def wait_full(self, name: str, types=("ipc", "uts", "mnt"), timeout: float = 20.0) -> dict:
        def full():
            pool = self.pool(name)
            ready = pool["state"] == "ready" and all(
                pool["types"][t]["idle"] >= pool["capacity"] for t in types
            )
            return pool if ready else None

        return wait_for(full, timeout, 0.05, f"pool {name} to fill")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def sample_config(**overrides) -> dict:
    """The bundled sample checkpoints with absolute paths, and the sample rootfs for mnt namespaces."""
    entries = [
        {"name": "sample", "capacity": 2, "path": str(SAMPLE / "checkpoint"), "rootfs": str(SAMPLE / "rootfs")},
        {"name": "sample-empty-ipc", "capacity": 2, "path": str(SAMPLE / "checkpoint-empty-ipc")},
    ]
    return {"containerd_checkpoints": entries, "default_capacity": 2, **overrides}


def start_daemon(config: dict | str, *args: str, root: Path | None = None, wait: bool = True) -> RunningDaemon:
    root = root or short_tempdir() / "root"
    config_path = root.parent / "namespace_service.json"
    config_path.write_text(config if isinstance(config, str) else json.dumps(config))
    log = root.parent / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "cer", "start", "--root", str(root), "--config", str(config_path), *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    daemon = RunningDaemon(root, config_path, process, log)
    if wait:
        def answering():
            if process.poll() is not None:
                pytest.fail(f"the daemon exited with {process.returncode}:\n{daemon.output()}")
            try:
                from cer.protocol.client import Client
                from cer.protocol.methods import AdminStatus

                with Client(daemon.endpoint, timeout=0.5) as client:
                    return client.call(AdminStatus())
            except Exception:
                return None

        wait_for(answering, 20, 0.05, "the daemon to answer")
    return daemon


def served_types(entry: dict) -> tuple[str, ...]:
    """The namespace types cer pools for a checkpoint entry: mnt only where it has a root filesystem (its own
    ``rootfs``, or the image's for an entry in containerd, which has no ``path``)."""
    return ("ipc", "uts", "mnt") if "rootfs" in entry or "path" not in entry else ("ipc", "uts")


@contextlib.contextmanager
def serving_daemon(config: dict, *args: str, timeout: float = 60):
    """A daemon started with ``config`` and ``args``, every configured pool full of the types it serves; stopped
    (status 0 asserted) and its directory removed afterwards."""
    daemon = start_daemon(config, *args)
    try:
        for entry in config["containerd_checkpoints"]:
            daemon.wait_full(entry["name"], served_types(entry), timeout=timeout)
        yield daemon
    finally:
        code = daemon.stop()
        subprocess.run(["rm", "-rf", str(daemon.root.parent)], timeout=60)
    assert code == 0, daemon.output()


@pytest.fixture
def daemon():
    """A daemon serving the bundled sample checkpoints; stopped with SIGTERM after the test."""
    running = start_daemon(sample_config())
    yield running
    code = running.stop()
    assert code == 0, running.output()


@pytest.fixture(autouse=True)
def _stop_actors():
    yield
    pykka.ActorRegistry.stop_all()


def host_mounts() -> list[str]:
    """The host's mount table, each mount as its mount point and source, for before/after comparisons."""
    with open("/proc/1/mountinfo") as file:
        return sorted(" ".join(line.split()[3:5]) for line in file)


def open_fds(pid: int | str = "self") -> set[str]:
    return set(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int | str = "self") -> Counter:
    """What a process holds open, by kind (``ipc``, ``mnt``, ``pipe``, a file path...), sockets left out:
    libzmq opens and closes a socket per client connection in its own time."""
    kinds = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":", 1)[0] if target.endswith("]") else target
        if kind != "socket":
            kinds[kind] += 1
    return kinds
