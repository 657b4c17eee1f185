"""Helpers for tests and benchmarks that need a real containerd holding real checkpoint images.

Not a test module. tests/conftest.py puts this directory on sys.path, so tests ``import
containerd_support``; benchmarks put tests/ on sys.path themselves.

What needs what (contrib/install-deps installs all of it): Debian's containerd 1.6 and runc 1.1.5,
CRIU 4 at /usr/local/sbin/criu as the ``criu`` runc finds in PATH (the containerd started here gets
/usr/local/sbin first in its PATH, which its shims and runc inherit), gcc with a static libc, root.
``require_tools`` fails with one clear message when something is missing: tests must fail, not skip.

- ``PrivateContainerd``: containerd with its own root, state, socket and config under a short
  directory in /tmp (unix socket paths are limited to ~107 bytes); ``start``/``stop`` can be repeated
  on the same directories (containerd coming back finds its images again); ``close`` removes tasks,
  containers, shims, mounts and the directory.
- ``oci_image_archive``: an OCI layout tar holding a one-layer image made with tarfile, for ``ctr
  images import`` (no registry is reachable here).
- ``make_checkpoint``: import such an image holding a static workload, run it (``ctr run -d``, not
  privileged), change files in its rw layer, and ``ctr c checkpoint --rw --image --task`` it; returns
  what the test needs to know about it (the CRIU archive's digest, the base image's chain id, the files
  changed, the container's IPC and UTS namespaces as they were).
- ``CONTAINER_IPC_WORKLOAD``: a workload that fills a container's IPC namespace and names its host
  without writing /proc/sys (read-only in a container).
- ``build_static``: compile a small C program statically (the memory workload of the benchmark).

Every child process is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import criu_support

TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "nsenter", "gcc")
CRIU_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
RW_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
WORKLOAD_PATH = "bin/ipc-workload"
# workload.h, which the C workloads of the tests and benchmarks include.
WORKLOAD_HEADERS = Path(__file__).resolve().parent / "contrib"


class ContainerdSupportError(RuntimeError):
    """A helper step failed; the message carries the command's output or containerd's log."""


def require_tools() -> str | None:
    """None when containerd, runc, CRIU 4 and the rest are here; else what is missing, as a sentence."""
    missing = [tool for tool in TOOLS if shutil.which(tool, path=runtime_env()["PATH"]) is None]
    if criu_support.criu_binary() is None:
        missing.append("a working CRIU 4 at /usr/local/sbin/criu")
    if os.geteuid() != 0:
        missing.append("root")
    if not missing:
        return None
    return f"containerd tests need {', '.join(missing)}: run contrib/install-deps as root"


def runtime_env() -> dict[str, str]:
    """The environment for containerd: CRIU 4's directory first in PATH, so runc's ``criu`` is CRIU 4."""
    env = dict(os.environ)
    first = os.path.dirname(criu_support.CRIU4_PATH)
    rest = [part for part in env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":") if part and part != first]
    env["PATH"] = ":".join([first, *rest])
    return env


def _run(argv: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    except subprocess.TimeoutExpired:
        raise ContainerdSupportError(f"{' '.join(argv)} timed out after {timeout:g} s") from None
    if check and result.returncode != 0:
        raise ContainerdSupportError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr.decode(errors='replace')[-3000:]}"
        )
    return result


class PrivateContainerd:
    """A containerd of the tests' own: root, state, socket, config and log in one directory under /tmp."""

    def __init__(self, prefix: str = "cer-ctd-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.address = str(self.dir / "c.sock")
        self.log = self.dir / "containerd.log"
        self.config = self.dir / "config.toml"
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.dir}/root"\n'
            f'state = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n  level = "info"\n'
            '[metrics]\n  address = ""\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.dir}/opt"\n'
        )
        self.process: subprocess.Popen | None = None

    @property
    def snapshots_dir(self) -> Path:
        return self.dir / "root" / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"

    def start(self, timeout: float = 30) -> PrivateContainerd:
        if self.process is not None and self.process.poll() is None:
            return self
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=runtime_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ContainerdSupportError(f"containerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", check=False, timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise ContainerdSupportError(f"containerd did not answer within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop containerd alone (SIGTERM): shims, tasks, images and snapshots stay for the next start."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        """Remove every task and container, stop containerd and its shims, unmount, delete the directory."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ContainerdSupportError):
                for namespace in self.ctr("namespaces", "ls", "-q", check=False, timeout=30).stdout.decode().split():
                    for container in self.ctr("containers", "ls", "-q", namespace=namespace, check=False).stdout.decode().split():
                        self.remove_container(container, namespace)
        self.stop()
        self._kill_shims()
        self._unmount_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    # -- ctr ------------------------------------------------------------------------------------------

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 120, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        argv = ["ctr", "--address", self.address, "--namespace", namespace, *args]
        return _run(argv, timeout, check, env=runtime_env(), **kwargs)

    def import_image(self, archive: Path, namespace: str = "default") -> None:
        self.ctr("images", "import", str(archive), namespace=namespace, timeout=300)

    def run(self, image: str, container: str, *args: str, namespace: str = "default", timeout: float = 30,
            capabilities: tuple[str, ...] = ("CAP_SYS_ADMIN",), runc_binary: str | None = None) -> int:
        """``ctr run -d`` (a container as runc's default spec makes it, plus ``capabilities``) with stdout to a
        file; waits for the workload's "ready" line; returns its pid. ``runc_binary``: ``--runc-binary``
        (the runc options' BinaryName, which a checkpoint of the container carries on to its restores).

        Not --privileged: a privileged container's /dev holds the host's devices, which no checkpoint that
        cer serves should (cer refuses block devices in a checkpoint's tmpfs archives).
        """
        output = self.dir / f"{container}.out"
        caps = [f"--cap-add={cap}" for cap in capabilities]
        runc = ["--runc-binary", runc_binary] if runc_binary else []
        self.ctr("run", "--detach", *caps, *runc, f"--log-uri=file://{output}", image, container, *args,
                 namespace=namespace, timeout=timeout)
        deadline = time.monotonic() + timeout
        while b"ready" not in (output.read_bytes() if output.exists() else b""):
            if time.monotonic() > deadline:
                raise ContainerdSupportError(f"{container} did not say ready within {timeout:g} s: {self.tasks(namespace)}")
            time.sleep(0.02)
        return self.task_pid(container, namespace)

    def tasks(self, namespace: str = "default") -> dict[str, tuple[int, str]]:
        lines = self.ctr("tasks", "ls", namespace=namespace, timeout=30).stdout.decode().splitlines()[1:]
        return {fields[0]: (int(fields[1]), fields[2]) for fields in map(str.split, lines) if len(fields) >= 3}

    def task_pid(self, container: str, namespace: str = "default") -> int:
        pid, status = self.tasks(namespace).get(container, (0, "missing"))
        if status != "RUNNING":
            raise ContainerdSupportError(f"task {container} is {status}:\n{self.log_tail()}")
        return pid

    def checkpoint(self, container: str, name: str, namespace: str = "default", timeout: float = 300) -> None:
        self.ctr("containers", "checkpoint", "--rw", "--image", "--task", container, name, namespace=namespace,
                 timeout=timeout)

    def remove_container(self, container: str, namespace: str = "default") -> None:
        """Kill and delete the task, then the container and its snapshot; quiet when they are not there."""
        if container in self.tasks(namespace):
            self.ctr("tasks", "kill", "--signal", "SIGKILL", container, namespace=namespace, check=False, timeout=30)
            deadline = time.monotonic() + 15
            while self.tasks(namespace).get(container, (0, "STOPPED"))[1] != "STOPPED" and time.monotonic() < deadline:
                time.sleep(0.05)
            self.ctr("tasks", "delete", "--force", container, namespace=namespace, check=False, timeout=30)
        self.ctr("containers", "delete", container, namespace=namespace, check=False, timeout=30)

    def image_target(self, name: str, namespace: str = "default") -> str:
        """The digest an image points at, from ``ctr images ls``."""
        for line in self.ctr("images", "ls", namespace=namespace).stdout.decode().splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == name:
                return fields[2]
        raise ContainerdSupportError(f"no image {name} in namespace {namespace}")

    def content(self, digest: str, namespace: str = "default") -> bytes:
        return self.ctr("content", "get", digest, namespace=namespace, timeout=300).stdout

    def snapshot_keys(self, namespace: str = "default") -> list[str]:
        lines = self.ctr("snapshots", "ls", namespace=namespace).stdout.decode().splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]

    def lease_ids(self, namespace: str = "default") -> list[str]:
        lines = self.ctr("leases", "ls", namespace=namespace).stdout.decode().splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]

    # -- internals ------------------------------------------------------------------------------------

    def _kill_shims(self) -> None:
        # A shim outlives containerd while it has a task; ours name our socket on their command line.
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"-address" in argv and self.address.encode() in argv:
                    os.kill(int(entry.name), signal.SIGKILL)

    def _unmount_all(self) -> None:
        prefix = str(self.dir) + "/"
        with open("/proc/self/mountinfo") as file:
            points = [line.split()[4] for line in file]
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


# -- images -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    archive: Path
    name: str
    diff_id: str

    @property
    def chain_id(self) -> str:
        return self.diff_id  # one layer: its chain id is its diff id


def oci_image_archive(path: Path, name: str, files: dict[str, tuple[bytes, int]], cmd: list[str]) -> BuiltImage:
    """Write an OCI layout tar to ``path`` holding image ``name``: one gzipped layer with ``files``
    (name -> (bytes, mode); parent directories are added), and ``cmd`` as its command."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return f"sha256:{digest}"

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directories = sorted({str(Path(name).parent) for name in files} - {"."} | {"proc", "dev", "sys", "tmp", "run", "etc"})
        for directory in directories:
            for part in [str(p) for p in reversed(Path(directory).parents) if str(p) != "."] + [directory]:
                if part in archive.getnames():
                    continue
                info = tarfile.TarInfo(part)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
        for name_, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name_)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"
    compressed = gzip.compress(layer_bytes, mtime=0)
    layer_digest = blob(compressed)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_bytes = json.dumps(config).encode()
    config_digest = blob(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": RW_MEDIA_TYPE, "digest": layer_digest, "size": len(compressed)}],
    }
    manifest_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": blob(manifest_bytes), "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }],
    }
    with tarfile.open(path, "w") as archive:
        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest}", data)
    return BuiltImage(path, name, diff_id)


def build_static(source: str, name: str, build_dir: Path) -> Path:
    """Compile C ``source`` statically to ``build_dir/name``; it may ``#include "workload.h"``."""
    build_dir.mkdir(parents=True, exist_ok=True)
    c_file, binary = build_dir / f"{name}.c", build_dir / name
    c_file.write_text(source)
    _run([os.environ.get("CC", "gcc"), "-static", "-O2", "-s", "-I", str(WORKLOAD_HEADERS), "-o", str(binary),
          str(c_file)], 120)
    return binary


# -- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint image made by ``make_checkpoint``, and what the tests compare against."""

    name: str
    namespace: str
    image: BuiltImage
    index_digest: str
    criu_digest: str
    criu_size: int
    rw_digest: str | None
    hostname: str
    live: dict = field(default_factory=dict)
    """The checkpointed container's IPC and UTS namespaces just before the checkpoint (``stable_description``)."""
    image_files: dict[str, bytes] = field(default_factory=dict)
    changed_files: dict[str, bytes] = field(default_factory=dict)
    deleted_files: tuple[str, ...] = ()


CONTAINER_IPC_WORKLOAD = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <unistd.h>
/* For a container (its own IPC and UTS namespaces already, CAP_SYS_ADMIN for the names, /proc/sys
 * read-only): names the host HOSTNAME and the domain cer.example, fills the IPC namespace with a shm
 * segment, a semaphore set and a message queue, prints "ready", points stdio at /dev/null, sleeps. */
static void die(const char *what) { perror(what); exit(1); }
struct message { long mtype; char text[64]; };
int main(int argc, char **argv)
{
    const char *host = argc > 1 ? argv[1] : "cer-ctd-test";
    if (sethostname(host, strlen(host)) || setdomainname("cer.example", 11))
        die("names");
    int shm = shmget(0x43455301, 65536, IPC_CREAT | 0640);
    unsigned char *bytes = shm < 0 ? NULL : shmat(shm, NULL, 0);
    if (bytes == NULL || bytes == (void *)-1)
        die("shm");
    for (int i = 0; i < 65536; i++)
        bytes[i] = (unsigned char)(i * 7 + 3);
    shmdt(bytes);
    int sem = semget(0x43455302, 3, IPC_CREAT | 0660);
    unsigned short values[3] = {1, 7, 42};
    if (sem < 0 || semctl(sem, 0, SETALL, values))
        die("sem");
    int msg = msgget(0x43455303, IPC_CREAT | 0620);
    struct message first = {1, "hello"}, second = {2, "from the container"};
    if (msg < 0 || msgsnd(msg, &first, 6, 0) || msgsnd(msg, &second, 19, 0))
        die("msg");
    printf("ready\n");
    fflush(stdout);
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0); dup2(null, 1); dup2(null, 2);
    for (;;)
        pause();
}
"""


def container_ipc_workload(build_dir: Path) -> Path:
    """``CONTAINER_IPC_WORKLOAD``, built statically into ``build_dir``."""
    return build_static(CONTAINER_IPC_WORKLOAD, "container-ipc-workload", build_dir)


def stable_description(seen: dict) -> dict:
    """An ``inspect_namespaces`` description reduced to what survives a checkpoint, in the shape
    ``criu_support.differences`` compares against (no times, pids or attach counts)."""
    keep = {"shm": ("id", "key", "mode", "uid", "gid", "size", "sha256"),
            "sem": ("id", "key", "mode", "uid", "gid", "values"),
            "msg": ("id", "key", "mode", "uid", "gid", "messages")}
    result = {"hostname": seen["hostname"], "domainname": seen["domainname"], "sysctls": dict(seen["sysctls"])}
    for kind, fields in keep.items():
        result[kind] = [{name: obj.get(name) for name in fields} for obj in seen[kind]]
    return result


IMAGE_FILES = {"etc/cer-image-file": b"from the image\n", "etc/cer-to-delete": b"deleted in the container\n",
               "etc/cer-untouched": b"left alone\n"}
CHANGED_FILES = {"etc/cer-image-file": b"changed in the container\n", "etc/cer-new-file": b"made in the container\n"}
DELETED_FILES = ("etc/cer-to-delete",)


def make_checkpoint(
    containerd: PrivateContainerd,
    name: str,
    namespace: str = "default",
    hostname: str = "cer-ctd-test",
    workload: Path | None = None,
    args: tuple[str, ...] | None = None,
    keep_container: bool = False,
    capabilities: tuple[str, ...] = ("CAP_SYS_ADMIN",),
    runc_binary: str | None = None,
) -> Checkpoint:
    """Build and import an image holding ``workload`` (default: the sample IPC workload, which needs its
    ``--empty-ipc`` argument in a container: /proc/sys is read-only there), run it, change files in its rw
    layer through /proc/PID/root, describe its IPC and UTS namespaces, and checkpoint it as ``name``; the
    container is removed afterwards unless ``keep_container``."""
    workload = workload or criu_support.build_workload()
    image_name = f"docker.io/cer-test/{name.lower()}:1"
    files = {WORKLOAD_PATH: (workload.read_bytes(), 0o755), **{k: (v, 0o644) for k, v in IMAGE_FILES.items()}}
    image = oci_image_archive(containerd.dir / f"{name}.oci.tar", image_name, files, [f"/{WORKLOAD_PATH}"])
    containerd.import_image(image.archive, namespace)
    container = f"cer-{secrets.token_hex(4)}"
    args = (f"/{WORKLOAD_PATH}", hostname) if args is None else args
    try:
        pid = containerd.run(image_name, container, *args, namespace=namespace, capabilities=capabilities,
                             runc_binary=runc_binary)
        live = stable_description(criu_support.inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts"))
        root = Path(f"/proc/{pid}/root")
        for changed, data in CHANGED_FILES.items():
            (root / changed).write_bytes(data)
        for deleted in DELETED_FILES:
            (root / deleted).unlink()
        containerd.checkpoint(container, name, namespace)
    finally:
        if not keep_container:
            containerd.remove_container(container, namespace)
    index_digest = containerd.image_target(name, namespace)
    index = json.loads(containerd.content(index_digest, namespace))
    by_type = {item["mediaType"]: item for item in index["manifests"]}
    criu = by_type[CRIU_MEDIA_TYPE]
    rw = by_type.get(RW_MEDIA_TYPE)
    return Checkpoint(
        name=name, namespace=namespace, image=image, index_digest=index_digest, criu_digest=criu["digest"],
        criu_size=criu["size"], rw_digest=rw["digest"] if rw else None, hostname=hostname, live=live,
        image_files=dict(IMAGE_FILES), changed_files=dict(CHANGED_FILES), deleted_files=DELETED_FILES,
    )


def tar_digests(data: bytes) -> dict[str, str]:
    """name -> sha256 of every regular file in a plain tar."""
    result = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive:
            if member.isreg():
                result[member.name.removeprefix("./")] = hashlib.sha256(archive.extractfile(member).read()).hexdigest()
    return result


def tree_digests(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """name -> sha256 of every regular file below ``directory`` (relative names)."""
    result = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if relative in exclude or not path.is_file() or path.is_symlink():
            continue
        result[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result
