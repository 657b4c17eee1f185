"""Helpers for tests and benchmarks of pooled mount namespaces: a real runc container checkpointed by CRIU 4,
what it saw while it ran, and the same views of a pooled namespace.

Not a test module. tests/conftest.py puts this directory on sys.path, so tests ``import mounts_support``;
benchmarks add tests/ to sys.path themselves. Containers are run with tests/runc_support.py.

What needs what (contrib/install-deps installs all of it): runc (Debian's 1.1.5), CRIU 4 at
/usr/local/sbin/criu as the ``criu`` runc runs, gcc with a static libc, util-linux (findmnt, nsenter,
unshare), root.

- ``require``: raise one clear error naming every missing tool (tests turn it into a failure, not a skip).
- ``make_container_checkpoint``: build tests/mounts/mount-workload.c, run it with ``runc run -d`` in a bundle
  with /dev, /dev/pts, /dev/shm, /dev/mqueue, /proc, /sys (+ cgroups), /run and /tmp tmpfs, runc's masked and
  read-only paths and, optionally, a read-only bind of a host directory at /data; record its mount table and
  tmpfs files while it runs; ``runc checkpoint --image-path``; return a ``ContainerCheckpoint``.
- ``mount_table`` / ``container_mount_table``: ``findmnt -R -J`` of a pooled namespace (through a thread of
  this process that joined it: its root is the container's, without findmnt) or of a running container,
  flattened to (target, fstype, options) rows.
- ``joined`` / ``read_file`` / ``write_file`` / ``list_directory``: work inside a pooled mount namespace.
- ``tmpfs_digest``: every file of a tmpfs mount (type, mode, owner, seconds of mtime, sha256, link target,
  device), not crossing into other mounts, read inside any mount namespace.
- ``cgroup_mapping``: host cgroup directories for the container's external cgroup mounts (a restore's).
- ``host_mounts`` / ``host_mount_changes``: the host's mount table and what changed in it that is ours.

Every child process is bounded by a timeout; containers are deleted on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import runc_support

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_SOURCE = REPO / "tests" / "mounts" / "mount-workload.c"
BUILD_DIR = REPO / "tests" / "mounts" / "build"
# tmpfs mounts cer fills in a pooled namespace for the workload's checkpoint.
FILLED_TMPFS = ("/dev", "/dev/shm", "/run", "/tmp")


class MountSupportError(RuntimeError):
    """A helper step failed or a tool is missing; the message says which and what it printed."""


def require() -> None:
    """Raise MountSupportError naming whatever of runc, CRIU 4, gcc, findmnt, nsenter, unshare is missing."""
    try:
        runc_support.require("runc", "criu", "gcc", "nsenter")
    except runc_support.RuntimeSupportError as error:
        raise MountSupportError(str(error)) from None
    missing = [tool for tool in ("findmnt", "unshare") if not _which(tool)]
    if missing:
        raise MountSupportError(f"missing: {', '.join(missing)} (util-linux)")


def _which(tool: str) -> bool:
    return shutil.which(tool, path=runc_support.runtime_env()["PATH"]) is not None


def run(argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                                env=runc_support.runtime_env())
    except subprocess.TimeoutExpired:
        raise MountSupportError(f"{' '.join(argv)} timed out after {timeout:g} s") from None
    if check and result.returncode != 0:
        raise MountSupportError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def build_workload() -> Path:
    """tests/mounts/mount-workload.c, built statically (again only when the source is newer)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    binary = BUILD_DIR / "mount-workload"
    if binary.exists() and binary.stat().st_mtime >= WORKLOAD_SOURCE.stat().st_mtime:
        return binary
    temporary = BUILD_DIR / f".mount-workload.{os.getpid()}.tmp"
    try:
        run(["gcc", "-static", "-O2", "-Wall", "-o", str(temporary), str(WORKLOAD_SOURCE)], timeout=120)
        os.replace(temporary, binary)
    finally:
        temporary.unlink(missing_ok=True)
    return binary


# --------------------------------------------------------------------------- the container

@dataclass
class ContainerCheckpoint:
    """A checkpoint of the mount workload and what the container saw while it ran."""

    images: Path  # the CRIU image directory
    rootfs: Path  # the container's root filesystem (a pool's lower layer)
    hostdata: Path | None  # the host directory bound at /data, None without that bind
    mounts: list[tuple[str, str, str]]  # container_mount_table while it ran
    tmpfs: dict[str, dict]  # tmpfs_digest of each of FILLED_TMPFS while it ran
    config: dict = field(repr=False, default_factory=dict)

    @property
    def external(self) -> dict[str, str]:
        """The external mounts' keys and host paths, as ``runc restore`` would map them."""
        return {"/data": str(self.hostdata)} if self.hostdata else {}


def make_container_checkpoint(directory: str | os.PathLike, *, host_bind: bool = True, extra_tmpfs: int = 0,
                              timeout: float = 120) -> ContainerCheckpoint:
    """Run the mount workload with runc in a bundle under ``directory``, record what it sees, checkpoint it.
    ``extra_tmpfs``: that many more (empty) tmpfs mounts at /extra/NN, for a mount-heavy checkpoint."""
    require()
    directory = Path(directory)
    bundle = runc_support.make_bundle(directory / "bundle", build_workload(), [])
    config = bundle.config()
    # runc_support gives the workload CAP_SYS_ADMIN and a writable /proc/sys; runc's defaults are wanted here.
    config["linux"]["readonlyPaths"] = sorted({*config["linux"]["readonlyPaths"], "/proc/sys"})
    config["mounts"] += [
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755", "size=16m"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "noexec"]},
    ]
    config["mounts"] += [{"destination": f"/extra/{number:02d}", "type": "tmpfs", "source": "tmpfs",
                          "options": ["nosuid", "nodev", "size=1m"]} for number in range(extra_tmpfs)]
    hostdata = None
    if host_bind:
        hostdata = directory / "hostdata"
        hostdata.mkdir()
        (hostdata / "greeting").write_text("from the host\n")
        config["mounts"].append({"destination": "/data", "type": "bind", "source": str(hostdata),
                                 "options": ["rbind", "ro"]})
    bundle.config_path.write_text(json.dumps(config, indent=2))

    images = directory / "images"
    images.mkdir()
    runc = runc_support.Runc(directory / "runc-state")
    container = f"cer-mnt-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    try:
        pid = runc.run_detached(bundle, container, timeout=timeout)
        mounts = container_mount_table(pid)
        tmpfs = {path: tmpfs_digest(f"/proc/{pid}/root{path}") for path in FILLED_TMPFS}
        runc.checkpoint(container, images, timeout=timeout)
    except runc_support.RuntimeSupportError as error:
        raise MountSupportError(str(error)) from None
    finally:
        runc.cleanup()
    return ContainerCheckpoint(images, bundle.rootfs, hostdata, mounts, tmpfs, config)


# --------------------------------------------------------------------------- views

def _flatten(tree: dict, strip: str) -> list[tuple[str, str, str]]:
    rows = []

    def walk(node: dict) -> None:
        target = node["target"]
        if strip:
            target = target[len(strip):] or "/"
        rows.append((target, node["fstype"], node["options"]))
        for child in node.get("children", ()):
            walk(child)

    for node in tree["filesystems"]:
        walk(node)
    return rows


def container_mount_table(pid: int) -> list[tuple[str, str, str]]:
    """What a running container sees: ``findmnt -N PID -R -J /`` (its /proc/PID/mountinfo), flattened."""
    tree = json.loads(run(["findmnt", "-N", str(pid), "-R", "-J", "-o", "TARGET,FSTYPE,OPTIONS", "/"], 30).stdout)
    return _flatten(tree, "")


def mount_table(ns_path: str, rootfs: str = "/") -> list[tuple[str, str, str]]:
    """The mounts under ``rootfs`` (default: all) in the mount namespace at ``ns_path``, targets relative to
    rootfs: ``findmnt -N TID`` of a thread that joined it (a pooled namespace's root is the container's, where
    no findmnt is)."""
    with joined(ns_path) as inside:
        tree = json.loads(run(["findmnt", "-N", str(inside.tid), "-R", "-J", "-o", "TARGET,FSTYPE,OPTIONS",
                               rootfs], 30).stdout)
    return _flatten(tree, rootfs.rstrip("/"))


class _Joined:
    """A thread of this process that joined a mount namespace and runs what it is given, until closed."""

    def __init__(self, ns_path: str) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.tid = 0
        self.thread = threading.Thread(target=self._serve, args=(ns_path,), daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise MountSupportError(f"joining {ns_path} took more than 10 s")
        if self.error is not None:
            raise MountSupportError(f"joining {ns_path}: {self.error}")

    def _serve(self, ns_path: str) -> None:
        from cer.linux import namespaces as ns

        try:
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ns.unshare(ns.CLONE_FS)  # setns into a mount namespace needs filesystem attributes of our own
                ns.setns(fd, ns.CLONE_NEWNS)
            finally:
                os.close(fd)
            self.tid = threading.get_native_id()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self.error = error
            return
        finally:
            self.ready.set()
        while (request := self.requests.get()) is not None:
            work, answer = request
            try:
                answer.put((True, work()))
            except BaseException as error:  # noqa: BLE001
                answer.put((False, error))

    def call(self, work, timeout: float = 30):
        """``work()`` run in the thread (its paths resolve in the namespace, from its root)."""
        answer: queue.Queue = queue.Queue()
        self.requests.put((work, answer))
        ok, value = answer.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(10)


@contextlib.contextmanager
def joined(ns_path: str):
    """A ``_Joined`` thread in the mount namespace at ``ns_path``; it ends (with its hold on the namespace) after."""
    inside = _Joined(ns_path)
    try:
        yield inside
    finally:
        inside.close()


def read_file(ns_path: str, path: str) -> bytes:
    """The bytes of ``path`` as the mount namespace at ``ns_path`` shows it."""
    with joined(ns_path) as inside:
        return inside.call(lambda: Path(path).read_bytes())


def write_file(ns_path: str, path: str, data: bytes) -> None:
    """Write ``path`` in the mount namespace at ``ns_path``."""
    with joined(ns_path) as inside:
        inside.call(lambda: Path(path).write_bytes(data))


def list_directory(ns_path: str, path: str) -> list[str]:
    with joined(ns_path) as inside:
        return sorted(inside.call(lambda: os.listdir(path)))


DIGEST_SCRIPT = r"""
import hashlib, json, os, stat, sys
top = sys.argv[1]
device = os.lstat(top).st_dev
out = {}
def describe(path):
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    row = {"mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid}
    if st.st_dev != device:
        return {"kind": "mountpoint"}
    if stat.S_ISREG(kind):
        with open(path, "rb") as f:
            row.update(kind="file", size=st.st_size, links=st.st_nlink, sha256=hashlib.sha256(f.read()).hexdigest(),
                       mtime=int(st.st_mtime))
    elif stat.S_ISDIR(kind):
        row.update(kind="dir", mtime=int(st.st_mtime))
    elif stat.S_ISLNK(kind):
        row.update(kind="symlink", target=os.readlink(path))
    elif stat.S_ISCHR(kind):
        row.update(kind="chardev", device=[os.major(st.st_rdev), os.minor(st.st_rdev)], mtime=int(st.st_mtime))
    else:
        row.update(kind=oct(kind))
    return row
def walk(path, rel):
    row = describe(path)
    out[rel] = row
    if row["kind"] == "dir":
        for name in sorted(os.listdir(path)):
            walk(os.path.join(path, name), rel.rstrip("/") + "/" + name)
walk(top, "/")
print(json.dumps(out))
"""


def tmpfs_digest(path: str, ns_path: str | None = None) -> dict:
    """Every entry of the mount at ``path`` (not crossing into mounts below it), by path relative to it;
    inside the mount namespace at ``ns_path`` when given (read by a thread that joined it)."""
    if ns_path is None:
        return json.loads(run([sys.executable, "-I", "-c", DIGEST_SCRIPT, path], 30).stdout)
    code = compile(DIGEST_SCRIPT.replace("top = sys.argv[1]", "top = TOP").replace("print(json.dumps(out))", ""),
                   "digest", "exec")

    def digest() -> dict:
        scope = {"TOP": path}
        exec(code, scope)  # noqa: S102 - our own script, run where the namespace's paths are
        return scope["out"]

    with joined(ns_path) as inside:
        return inside.call(digest)


# --------------------------------------------------------------------------- the host's mount table

def host_mounts() -> set[tuple[str, str]]:
    """The host's mount table as (mount point, source) pairs."""
    with open("/proc/1/mountinfo") as file:
        rows = set()
        for line in file:
            fields = line.split()
            rows.add((fields[4], " ".join(fields[fields.index("-") + 1:])))
        return rows


# Where other suites of this repository (containerd and runc tests, run at the same time on a shared
# machine) mount things in the host's mount namespace: their changes are not ours.
_OTHERS = ("/tmp/", "/run/containerd/", "/run/runc/", "/var/lib/containerd/", "/run/netns/")


def host_mount_changes(before: set[tuple[str, str]], ours: str | os.PathLike) -> list[str]:
    """What changed in the host's mount table since ``before`` that is not another suite's: anything under
    ``ours``, and whatever changed outside the places where containerd and runc tests mount things."""
    ours = str(ours).rstrip("/") + "/"
    after = host_mounts()
    changes = [("+", row) for row in sorted(after - before)] + [("-", row) for row in sorted(before - after)]
    return [f"{sign} {mountpoint} {source}" for sign, (mountpoint, source) in changes
            if mountpoint.startswith(ours) or not mountpoint.startswith(_OTHERS)]


def cgroup_mapping(pid: int | str = "self") -> dict[str, str]:
    """For a restore's external cgroup mounts (runc's keys ``/sys/fs/cgroup/<hierarchy>``): the host
    directory of each cgroup v1 hierarchy that ``pid`` is in, as a restore would bind the container's."""
    mapping = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if not controllers:
            continue  # the cgroup v2 line
        for controller in controllers.split(","):
            name = controller.removeprefix("name=")
            mapping[f"/sys/fs/cgroup/{name}"] = f"/sys/fs/cgroup/{name}{path}".rstrip("/")
    return mapping
