"""Helpers for tests and benchmarks that run containers with runc directly: OCI bundles, runc checkpoints
and restores (a private containerd is tests/containerd_support.py's ``PrivateContainerd``).

Not a test module. tests/conftest.py puts this directory on sys.path, so tests ``import runc_support``;
benchmarks add tests/ to sys.path themselves.

What needs what (contrib/install-deps installs all of it): runc 1.1.5 from Debian, CRIU 4 at
/usr/local/sbin/criu *as the ``criu`` that runc finds in PATH* (``containerd_support.runtime_env`` puts
/usr/local/sbin first, and ``require`` checks it), gcc with a static libc, util-linux (nsenter), root.

- ``require``: fail with one clear message when a tool is missing (tests turn it into a failure).
- ``make_bundle``: a runc bundle whose rootfs holds one static binary (the sample IPC workload, the
  benchmark's memory workload), with the capabilities the workload needs to set its host name and IPC
  sysctls, and no CRIU configuration file (runc would read the host-wide one);
- ``bundle_with_results``, ``restore_bundle``: the same with a host directory at /results for a workload's
  own reports, and a copy of it to restore with (own rootfs, own results, namespaces to join).
- ``Runc``: runc with a private ``--root`` state directory, so tests never see or touch other
  containers on the machine; ``run_detached``, ``checkpoint``, ``restore``, ``state``; ``cleanup``
  deletes every container in that root (also the ones a wrapper under test restored there).
- ``tree_digest``: a listing with digests of a directory, to prove that nobody wrote to it.
- ``wrapper_restore_argv``, ``wrapper_env``, ``restore_through_wrapper``: ``contrib/ctr-wrapper restore``
  through runc into a private state root, with a cer daemon's endpoint.

Every child process is bounded by a timeout; every container is removed by its owner's cleanup, which
tests run in ``finally`` blocks or fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import criu_support
from containerd_support import runtime_env  # CRIU 4's directory first in PATH

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "contrib" / "ctr-wrapper"
CRIU4_DIR = os.path.dirname(criu_support.CRIU4_PATH)
# The capabilities the sample workload needs inside a container: unshare/sethostname/IPC sysctls
# (CAP_SYS_ADMIN), SysV objects owned by other users (CAP_CHOWN, CAP_FOWNER, CAP_IPC_OWNER).
WORKLOAD_CAPABILITIES = [
    "CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_FOWNER",
    "CAP_DAC_OVERRIDE", "CAP_IPC_OWNER", "CAP_SETUID", "CAP_SETGID",
]


class RuntimeSupportError(RuntimeError):
    """A helper step failed or a tool is missing; the message says which and what it printed."""


# --------------------------------------------------------------------------- tools

def require(*tools: str) -> None:
    """Raise RuntimeSupportError naming every missing tool among runc, ctr, containerd, criu, gcc,
    nsenter, tar. For ``criu``, the one found first in runtime_env()'s PATH must be a working CRIU 4."""
    path = runtime_env()["PATH"]
    missing = [tool for tool in tools if tool != "criu" and shutil.which(tool, path=path) is None]
    if "criu" in tools:
        criu = criu_support.criu_binary()
        found = shutil.which("criu", path=path)
        if criu is None:
            missing.append("criu (a working CRIU 4)")
        elif found is None or os.path.realpath(found) != os.path.realpath(criu):
            missing.append(f"criu: runc would run {found}, not the CRIU 4 at {criu}")
    if missing:
        raise RuntimeSupportError(f"missing: {', '.join(missing)} (run contrib/install-deps as root)")


def _run(argv: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout, env=kwargs.pop("env", runtime_env()), **kwargs)
    except subprocess.TimeoutExpired:
        raise RuntimeSupportError(f"{' '.join(argv)} timed out after {timeout:g} s") from None
    if check and result.returncode != 0:
        raise RuntimeSupportError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def tree_digest(directory: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under directory with its type, mode, size, mtime and (files) sha256: equal before and
    after means nothing was created, removed or written (reads only change atime, which is left out)."""
    directory = Path(directory)
    listing = {}
    for path in sorted([directory, *directory.rglob("*")]):
        info = path.lstat()
        digest = None
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
        listing[str(path.relative_to(directory))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return listing


# --------------------------------------------------------------------------- bundles and runc

@dataclass
class Bundle:
    path: Path
    rootfs: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def config(self) -> dict:
        return json.loads(self.config_path.read_text())


def make_bundle(directory: str | os.PathLike, binary: Path, args: list[str]) -> Bundle:
    """A bundle in directory (created) running ``/<binary name> ARGS`` in new pid, net, ipc, uts and mount
    namespaces, rootfs read-only, /proc/sys writable (the workload sets IPC sysctls), no terminal."""
    path = Path(directory)
    rootfs = path / "rootfs"
    rootfs.mkdir(parents=True)
    shutil.copy2(binary, rootfs / binary.name)
    _run(["runc", "spec", "--bundle", str(path)], 30)
    config = json.loads((path / "config.json").read_text())
    process = config["process"]
    process.update(terminal=False, args=[f"/{binary.name}", *args], env=["PATH=/"])
    process["capabilities"] = {kind: list(WORKLOAD_CAPABILITIES) for kind in process["capabilities"]}
    linux = config["linux"]
    linux["readonlyPaths"] = [p for p in linux["readonlyPaths"] if p != "/proc/sys"]
    # No CRIU configuration file: without this annotation runc reads the host-wide /etc/criu/runc.conf,
    # which anything else on the machine may be editing (a wrapper's join-ns lines would join this restore).
    config.setdefault("annotations", {})["org.criu.config"] = ""
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return Bundle(path, rootfs)


class Runc:
    """runc with a private state directory (``runc --root``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.root), *args]

    def __call__(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return _run(self.argv(*args), timeout, check)

    def run_detached(self, bundle: Bundle, container_id: str, ready_line: bytes | None = b"ready\n",
                     timeout: float = 30) -> int:
        """``runc run -d``; wait for the workload's ready line on its stdout (a pipe the workload closes
        once ready); return the container's init pid."""
        process = subprocess.Popen(self.argv("run", "-d", "--bundle", str(bundle.path), container_id),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=runtime_env())
        try:
            out = b""
            deadline = time.monotonic() + timeout
            while ready_line is not None and not out.endswith(ready_line):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
                    raise RuntimeSupportError(f"container {container_id} did not get ready within {timeout:g} s")
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
            _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if process.returncode != 0 or (ready_line is not None and not out.endswith(ready_line)):
                raise RuntimeSupportError(f"runc run {container_id} failed ({process.returncode}): "
                                          f"stdout {out!r}, stderr {err.decode(errors='replace')}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
            process.stdout.close()
            process.stderr.close()
        return self.pid(container_id)

    def state(self, container_id: str) -> dict | None:
        result = self("state", container_id, check=False, timeout=30)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def pid(self, container_id: str) -> int:
        state = self.state(container_id)
        if state is None or state["status"] != "running":
            raise RuntimeSupportError(f"container {container_id} is not running: {state}")
        return state["pid"]

    def checkpoint(self, container_id: str, image_dir: str | os.PathLike, timeout: float = 120) -> None:
        """``runc checkpoint`` into image_dir (the container is gone afterwards); logs to a private work dir."""
        with tempfile.TemporaryDirectory(prefix="cer-runc-dump-") as work:
            result = self("checkpoint", "--image-path", str(image_dir), "--work-path", work, container_id,
                          timeout=timeout, check=False)
            if result.returncode != 0:
                raise RuntimeSupportError(f"runc checkpoint {container_id} failed:\n{result.stderr}"
                                          f"{criu_support._log_excerpt(Path(work) / 'dump.log')}")
        self("delete", "--force", container_id, check=False)

    def restore(self, container_id: str, bundle: Bundle | Path, image_dir: str | os.PathLike,
                timeout: float = 120) -> int:
        """``runc restore -d`` from image_dir (logs in a private work dir); returns the init pid."""
        bundle_path = bundle.path if isinstance(bundle, Bundle) else bundle
        with tempfile.TemporaryDirectory(prefix="cer-runc-restore-") as work:
            result = self("restore", "-d", "--image-path", str(Path(image_dir).resolve()), "--work-path", work,
                          "--bundle", str(bundle_path), container_id, timeout=timeout, check=False)
            if result.returncode != 0:
                raise RuntimeSupportError(f"runc restore {container_id} failed:\n{result.stderr}"
                                          f"{criu_support._log_excerpt(Path(work) / 'restore.log')}")
        return self.pid(container_id)

    def delete(self, container_id: str) -> None:
        """Kill and remove the container; nothing happens if it does not exist."""
        self("delete", "--force", container_id, check=False, timeout=30)

    def containers(self) -> list[str]:
        result = self("list", "--quiet", check=False, timeout=30)
        return result.stdout.split() if result.returncode == 0 else []

    def cleanup(self) -> None:
        """Delete every container in this root, then the root."""
        for container_id in self.containers():
            self.delete(container_id)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_runc(prefix: str = "cer-runc-"):
    """A Runc with a fresh state root; every container in it is deleted on the way out."""
    runc = Runc(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")) / "state")
    try:
        yield runc
    finally:
        runc.cleanup()
        shutil.rmtree(runc.root.parent, ignore_errors=True)


def hostname_of(pid: int) -> str:
    return _run(["nsenter", f"--uts=/proc/{pid}/ns/uts", "hostname"], 10).stdout.strip()


def namespace_inode(path: str | os.PathLike) -> int:
    return os.stat(path).st_ino


# --------------------------------------------------------------------------- small checks

def criu_conf_state(path: str = "/etc/criu/runc.conf") -> bytes | None:
    """The bytes of runc's CRIU config file, None when absent: for before/after comparisons."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def wait_exited(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", None):
        if time.monotonic() > deadline:
            raise RuntimeSupportError(f"process {pid} did not exit within {timeout:g} s")
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    try:
        match = re.search(r"^State:\s+(\S)", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return None
    return match.group(1) if match else None


# --------------------------------------------------------------------------- workloads that report

def bundle_with_results(directory: str | os.PathLike, binary: Path, args: list[str]) -> Bundle:
    """``make_bundle`` in directory/bundle, with directory/results (a host directory) bound at /results: a
    self-checking workload writes its reports there, where they outlive the process."""
    directory = Path(directory)
    results = directory / "results"
    results.mkdir(parents=True)
    bundle = make_bundle(directory / "bundle", binary, args)
    (bundle.rootfs / "results").mkdir()
    config = bundle.config()
    config["mounts"].append({"destination": "/results", "type": "bind", "source": str(results), "options": ["rbind", "rw"]})
    bundle.config_path.write_text(json.dumps(config, indent=2))
    return bundle


def restore_bundle(bundle: Bundle, directory: str | os.PathLike, namespace_paths: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A bundle to restore ``bundle``'s checkpoint with, in directory: a copy of its root filesystem (runc
    prepares a restore's bind mounts inside it, so two restores must not share one), /results bound to a
    fresh directory of its own, and the ``linux.namespaces`` entries of ``namespace_paths`` (runc's type
    names: ipc, uts, mount) joined at those paths. Returns (bundle directory, results directory)."""
    directory = Path(directory)
    results = directory / "results"
    results.mkdir(parents=True)
    shutil.copytree(bundle.rootfs, directory / "rootfs", symlinks=True)
    config = bundle.config()
    config["root"]["path"] = str(directory / "rootfs")
    for mount in config["mounts"]:
        if mount["destination"] == "/results":
            mount["source"] = str(results)
    for entry in config["linux"]["namespaces"]:
        if namespace_paths and entry["type"] in namespace_paths:
            entry["path"] = namespace_paths[entry["type"]]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory, results


# --------------------------------------------------------------------------- restores through ctr-wrapper

def wrapper_restore_argv(endpoint: str, runc: Runc, bundle: str | os.PathLike, *args: str) -> list[str]:
    """``ctr-wrapper restore`` of ``bundle`` by runc in ``runc``'s state root, asking the daemon at ``endpoint``;
    ``args``: the wrapper's further options, then the checkpoint's name and the container id."""
    return [sys.executable, str(WRAPPER), "restore", "--endpoint", endpoint, "--runtime", "runc", "--runc-root",
            str(runc.root), "--bundle", str(bundle), *args]


def wrapper_env() -> dict[str, str]:
    """``runtime_env`` without a CER_ENDPOINT of the caller's: the wrapper asks the daemon its argv names."""
    env = runtime_env()
    env.pop("CER_ENDPOINT", None)
    return env


def restore_through_wrapper(endpoint: str, runc: Runc, bundle: str | os.PathLike, *args: str,
                            timeout: float = 120) -> dict:
    """Run ``wrapper_restore_argv`` to its end; the wrapper's JSON reply (pid, namespaces, checkpoint, ...).
    The calling test fails, with the wrapper's stderr, when the restore does."""
    result = subprocess.run(wrapper_restore_argv(endpoint, runc, bundle, *args), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout, env=wrapper_env())
    assert result.returncode == 0, f"ctr-wrapper failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)
