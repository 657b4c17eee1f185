"""Helpers for tests that need real CRIU checkpoints and real IPC/UTS namespaces.

Not a test module. tests/conftest.py puts this directory on sys.path, so tests simply
``import criu_support``.

What needs what (see contrib/install-deps): CRIU 4 at /usr/local/sbin/criu, gcc with a static
libc, util-linux (unshare, nsenter), root. ``criu_binary()`` returns None where CRIU 4 is missing
so tests can skip.

- ``dump_live_workload``: start contrib/sample/ipc-workload (its own IPC+UTS namespaces, a new pid
  namespace) and ``criu dump`` it, like contrib/sample/make-checkpoint.
- ``restore_and_inspect``: ``criu restore -d`` a checkpoint, describe its IPC+UTS namespaces from
  inside, kill it.
- ``inspect_namespaces``: describe any IPC/UTS namespace given as a path (``/proc/PID/ns/ipc``,
  ``/proc/PID/fd/N``) by running tests/ipc_inspector.py under nsenter.
- ``expected_namespace`` / ``differences``: what the sample workload creates, and a comparison.
- ``decode_image``: decode one CRIU image file with pycriu (the patched copy that
  contrib/install-deps builds: Debian's own pycriu/crit garble CRIU 4's ipcns-shm images).

Every child process is bounded by a timeout and killed on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "contrib" / "sample"
WORKLOAD_SOURCE = SAMPLE_DIR / "ipc-workload.c"
DEFAULT_BUILD_DIR = SAMPLE_DIR / "build"
INSPECTOR = Path(__file__).resolve().with_name("ipc_inspector.py")
# Where contrib/install-deps puts CRIU 4 and the patched pycriu.
CRIU4_PATH = "/usr/local/sbin/criu"
PYCRIU_DIR = "/opt/cer-criu/python"
# Serializes ``criu restore`` runs of this module, machine-wide (see ``restored``).
RESTORE_LOCK = "/tmp/cer-criu-restore.lock"


class CriuSupportError(RuntimeError):
    """A helper step failed; the message carries the relevant log lines."""


# --------------------------------------------------------------------------- CRIU and building

@functools.lru_cache(maxsize=None)
def criu_binary() -> str | None:
    """Path of a CRIU >= 4 whose ``criu check`` passes here, or None.

    Looks at $CER_CRIU, then /usr/local/sbin/criu, then ``criu`` in PATH (Debian's 3.17 in
    /usr/sbin fails ``criu check`` on this kernel and is rejected by the version test).
    """
    candidates = [os.environ.get("CER_CRIU"), CRIU4_PATH, shutil.which("criu")]
    for path in dict.fromkeys(c for c in candidates if c):
        if not os.access(path, os.X_OK):
            continue
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
            match = re.search(r"^Version: (\d+)\.", version.stdout, re.M)
            if not match or int(match.group(1)) < 4:
                continue
            check = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "Looks good" in check.stdout + check.stderr:
            return path
    return None


def _require_criu() -> str:
    criu = criu_binary()
    if criu is None:
        raise CriuSupportError("no working CRIU 4 (run contrib/install-deps)")
    return criu


def build_workload(build_dir: str | os.PathLike = DEFAULT_BUILD_DIR) -> Path:
    """Build contrib/sample/ipc-workload.c statically into build_dir; return the binary's path.

    Rebuilt only when the source is newer. Written under a temporary name and renamed, so
    concurrent callers never run a half-written binary.
    """
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / "ipc-workload"
    if binary.exists() and binary.stat().st_mtime >= WORKLOAD_SOURCE.stat().st_mtime:
        return binary
    tmp = build_dir / f".ipc-workload.{os.getpid()}.tmp"
    cc = os.environ.get("CC", "gcc")
    try:
        result = subprocess.run([cc, "-static", "-O2", "-s", "-Wall", "-o", str(tmp), str(WORKLOAD_SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise CriuSupportError(f"building {WORKLOAD_SOURCE} failed:\n{result.stderr}")
        os.replace(tmp, binary)
    finally:
        tmp.unlink(missing_ok=True)
    return binary


# --------------------------------------------------------------------------- process plumbing

class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise CriuSupportError("timed out")
        return left


def _log_excerpt(log: Path, lines: int = 30) -> str:
    """The Error/Warn lines of a CRIU log, else its tail."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {log})"
    # "rlimit: Can't setup RLIMIT_NOFILE" is a harmless error CRIU logs on every run here.
    picked = [line for line in text if re.search(r"Error|Warn", line) and "RLIMIT_NOFILE" not in line]
    return "\n".join((picked or text)[-lines:])


def _run_criu(args: list[str], log: Path, timeout: float) -> None:
    try:
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CriuSupportError(f"{' '.join(args[:2])} timed out after {timeout:.1f}s\n"
                               f"{_log_excerpt(log)}") from None
    if result.returncode != 0:
        raise CriuSupportError(f"{' '.join(args[:2])} failed ({result.returncode}):\n"
                               f"{result.stderr}{_log_excerpt(log)}")


def _pidfd(pid: int) -> int | None:
    """A pidfd, so a later kill can never hit a recycled pid; None if the process is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _kill_pidfd(pidfd: int | None, timeout: float = 10) -> None:
    """SIGKILL the process behind pidfd (for a pid-namespace init: its whole namespace) and wait
    until it has exited. Closes pidfd."""
    if pidfd is None:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        # A pidfd polls readable once the process has exited (even before it is reaped).
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def _flock(path: str, deadline: _Deadline):
    """Exclusive flock on path, waiting at most until the deadline."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                deadline.left()
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_line(stream, deadline: _Deadline) -> bytes:
    """One line from a pipe, bounded by the deadline (b"" on EOF)."""
    fd = stream.fileno()
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], deadline.left())
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _only_child(pid: int, deadline: _Deadline) -> int:
    path = f"/proc/{pid}/task/{pid}/children"
    while True:
        with contextlib.suppress(OSError):
            children = Path(path).read_text().split()
            if children:
                return int(children[0])
        deadline.left()
        time.sleep(0.01)


# --------------------------------------------------------------------------- dump

def dump_live_workload(images_dir: str | os.PathLike, *, empty_ipc: bool = False, timeout: float = 30,
                       hostname: str | None = None, domainname: str | None = None,
                       build_dir: str | os.PathLike = DEFAULT_BUILD_DIR) -> None:
    """Run the sample workload and ``criu dump`` it into images_dir (created; must be empty).

    Same procedure as contrib/sample/make-checkpoint: the workload runs as init of a new pid
    namespace (it unshares its own IPC and UTS namespaces), and its binary is deleted before the
    dump so that CRIU stores it in the images (ghost file) and the checkpoint restores anywhere.
    hostname/domainname default to the workload's ("cer-sample" or "cer-sample-empty",
    "cer.example"). ``criu dump`` kills the workload; anything left is killed on the way out.
    """
    criu = _require_criu()
    deadline = _Deadline(timeout)
    binary = build_workload(build_dir)
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    if any(images_dir.iterdir()):
        raise CriuSupportError(f"{images_dir} is not empty")

    args = ["--empty-ipc"] if empty_ipc else []
    if hostname is not None or domainname is not None:
        args.append(hostname if hostname is not None else
                    ("cer-sample-empty" if empty_ipc else "cer-sample"))
    if domainname is not None:
        args.append(domainname)

    with tempfile.TemporaryDirectory(prefix="cer-dump-") as run:
        run = Path(run)
        exe = run / "ipc-workload"
        shutil.copy2(binary, exe)
        work = run / "work"
        work.mkdir()
        unshare = shutil.which("unshare")
        if unshare is None:
            raise CriuSupportError("unshare not found (util-linux)")
        # env={}: the environment lands on the workload's stack, hence in the images.
        proc = subprocess.Popen([unshare, "--pid", "--fork", str(exe), *args], cwd="/", env={},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        workload = None  # pidfd of the workload (pid 1 of its pid namespace)

        def stop() -> bytes:
            """Kill what is left and return unshare's stderr (the workload's, until "ready").
            Idempotent."""
            nonlocal workload
            if proc.stderr.closed:  # already stopped
                return b""
            if workload is None and proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    workload = _pidfd(int(kids[0])) if kids else None
            # Kill the pid-namespace init first so that unshare, its parent, reaps it and exits.
            _kill_pidfd(workload)
            workload = None
            try:
                _, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=5)
            return err or b""

        try:
            line = _read_line(proc.stdout, deadline)
            if line != b"ready\n":
                err = stop().decode(errors="replace")
                raise CriuSupportError(f"workload did not get ready: {line!r}; stderr: {err}")
            workload_pid = _only_child(proc.pid, deadline)
            workload = _pidfd(workload_pid)
            exe.unlink()
            _run_criu([criu, "dump", "-t", str(workload_pid), "-D", str(images_dir), "-W", str(work),
                       "--ghost-limit", "4M", "-o", "dump.log", "-v4"],
                      work / "dump.log", deadline.left())
        finally:
            stop()


# --------------------------------------------------------------------------- restore and inspect

@contextlib.contextmanager
def restored(images_dir: str | os.PathLike, timeout: float = 30):
    """``criu restore -d`` images_dir; yield the restored root's pid (in this pid namespace);
    kill the restored tree on exit.

    The image directory is only read: logs go to a temporary work directory.
    """
    criu = _require_criu()
    deadline = _Deadline(timeout)
    with tempfile.TemporaryDirectory(prefix="cer-restore-") as work:
        work = Path(work)
        pidfile = work / "pid"
        pidfd = None
        try:
            try:
                # The sample checkpoints carry their executable as a ghost file, which CRIU
                # re-creates at a path fixed in the images during the restore: two concurrent
                # restores of one checkpoint collide on it ("Can't create ghost regfile: File
                # exists"). Restores take ~0.1 s, so simply take turns.
                with _flock(RESTORE_LOCK, deadline):
                    _run_criu([criu, "restore", "-D", str(Path(images_dir).resolve()), "-W", str(work),
                               "-d", "--pidfile", str(pidfile), "-o", "restore.log", "-v4"],
                              work / "restore.log", deadline.left())
            finally:
                # Even a failed or timed-out restore may have left a root task behind.
                with contextlib.suppress(OSError, ValueError):
                    pidfd = _pidfd(int(pidfile.read_text()))
            if pidfd is None:
                raise CriuSupportError("criu restore reported success but its root task is gone:\n"
                                       + _log_excerpt(work / "restore.log"))
            yield int(pidfile.read_text())
        finally:
            _kill_pidfd(pidfd)


def restore_and_inspect(images_dir: str | os.PathLike, timeout: float = 30) -> dict:
    """Restore images_dir with real ``criu restore -d``, describe its IPC and UTS namespaces from
    inside (see ``inspect_namespaces``), kill the restored tree and return the description."""
    deadline = _Deadline(timeout)
    with restored(images_dir, timeout=deadline.left()) as pid:
        return inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts", timeout=deadline.left())


def inspect_namespaces(ipc_path: str | os.PathLike | None, uts_path: str | os.PathLike | None,
                       timeout: float = 30) -> dict:
    """Describe the IPC and UTS namespaces at these paths (``/proc/PID/ns/ipc``,
    ``/proc/DAEMON/fd/N``, ...; None = this process's own) by running tests/ipc_inspector.py
    inside them under nsenter.

    Returns {"ns": {"ipc", "uts"}, "hostname", "domainname", "sysctls": {name: int | [int]},
    "shm": [{id, key, mode, uid, gid, cuid, cgid, size, nattch, sha256}],
    "sem": [{id, key, mode, uid, gid, cuid, cgid, nsems, values}],
    "msg": [{id, key, mode, uid, gid, cuid, cgid, qnum, cbytes, messages: [(mtype, bytes)]}]}.
    Reading leaves the objects in place (shm attached read-only then detached, MSG_COPY).
    """
    argv = ["nsenter"]
    if ipc_path is not None:
        argv.append(f"--ipc={ipc_path}")
    if uts_path is not None:
        argv.append(f"--uts={uts_path}")
    return _run_inspector(argv, timeout)


def inspect_fresh_namespaces(timeout: float = 30) -> dict:
    """Describe brand-new IPC+UTS namespaces: this kernel's defaults (what an untouched pool
    namespace holds)."""
    return _run_inspector(["unshare", "--ipc", "--uts"], timeout)


def _run_inspector(prefix: list[str], timeout: float) -> dict:
    # -I: isolated, the inspector needs nothing but the standard library.
    argv = [*prefix, sys.executable, "-I", str(INSPECTOR)]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CriuSupportError(f"inspector timed out after {timeout:.1f}s: {argv}") from None
    if result.returncode != 0:
        raise CriuSupportError(f"inspector failed ({result.returncode}): {argv}\n{result.stderr}")
    desc = json.loads(result.stdout)
    for queue in desc["msg"]:
        if queue["messages"] is not None:
            queue["messages"] = [(mtype, bytes.fromhex(text)) for mtype, text in queue["messages"]]
    return desc


# --------------------------------------------------------------------------- expectations

def _xorshift_bytes(size: int, seed: int = 0x12345678) -> bytes:
    out = bytearray(size)
    x = seed
    for i in range(size):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


@functools.lru_cache(maxsize=None)
def _shm_hashes() -> tuple[str, str]:
    small = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    return hashlib.sha256(small).hexdigest(), hashlib.sha256(_xorshift_bytes(2 * 1024 * 1024)).hexdigest()


def expected_namespace(empty_ipc: bool = False, hostname: str | None = None,
                       domainname: str = "cer.example") -> dict:
    """What contrib/sample/ipc-workload.c creates (keep the two in step).

    "sysctls" lists only the values the workload changes; the others keep the kernel's defaults
    (see ``inspect_fresh_namespaces``). Objects carry only the fields that survive a
    checkpoint/restore unchanged (no times, pids or attach counts).
    """
    if hostname is None:
        hostname = "cer-sample-empty" if empty_ipc else "cer-sample"
    desc = {"hostname": hostname, "domainname": domainname, "sysctls": {}, "shm": [], "sem": [], "msg": []}
    if empty_ipc:
        return desc
    small, big = _shm_hashes()
    desc["sysctls"] = {
        "kernel.msgmax": 16384, "kernel.msgmnb": 32768, "kernel.msgmni": 1000,
        "kernel.sem": [300, 60000, 64, 512], "kernel.shmmni": 2000, "fs.mqueue.queues_max": 100,
    }
    desc["shm"] = [
        {"id": 7, "key": 0x43455201, "mode": 0o600, "uid": 0, "gid": 0, "size": 4096, "sha256": small},
        {"id": 8, "key": 0x43455202, "mode": 0o640, "uid": 1000, "gid": 1000, "size": 2 * 1024 * 1024,
         "sha256": big},
    ]
    desc["sem"] = [{"id": 3, "key": 0x43455203, "mode": 0o660, "uid": 0, "gid": 0, "values": [1, 7, 42, 32000]}]
    desc["msg"] = [{"id": 5, "key": 0x43455204, "mode": 0o620, "uid": 1001, "gid": 1002, "messages": [
        (1, b"hello"), (2, b"world\0\x01\x02\xff"), (7, b"x" * 300), (1, b"again type 1")]}]
    return desc


def differences(actual: dict, expected: dict) -> list[str]:
    """Where an ``inspect_namespaces`` description departs from an ``expected_namespace`` one
    (only the keys present in expected are compared; sysctls only those listed). [] = match."""
    diffs = []
    for key in ("hostname", "domainname"):
        if actual.get(key) != expected[key]:
            diffs.append(f"{key}: {actual.get(key)!r} != {expected[key]!r}")
    for name, value in expected["sysctls"].items():
        if actual["sysctls"].get(name) != value:
            diffs.append(f"sysctl {name}: {actual['sysctls'].get(name)!r} != {value!r}")
    for kind in ("shm", "sem", "msg"):
        want = expected[kind]
        keys = {k for obj in want for k in obj} or {"id", "key"}
        got = [{k: obj.get(k) for k in keys} for obj in actual[kind]]
        if got != want:
            diffs.append(f"{kind}: {got!r} != {want!r}")
    return diffs


# --------------------------------------------------------------------------- image decoding

def _pycriu():
    try:
        import pycriu  # the .pth that contrib/install-deps adds points at the patched copy
    except ImportError:
        if PYCRIU_DIR not in sys.path:
            sys.path.append(PYCRIU_DIR)
        import pycriu
    return pycriu


def decode_image(path: str | os.PathLike, pretty: bool = False) -> dict:
    """Decode one CRIU image file ({"magic": ..., "entries": [...]}) like ``crit decode``."""
    pycriu = _pycriu()
    with open(path, "rb") as f:
        return pycriu.images.load(f, pretty)


def image_bytes(type_magic: int, entries, *, common_magic: bool = True) -> bytes:
    """An image file's bytes: magics, then each entry (a message, or raw bytes written as is)."""
    from cer.criu.images import IMG_COMMON_MAGIC  # noqa: PLC0415

    out = bytearray(struct.pack("<II", IMG_COMMON_MAGIC, type_magic) if common_magic else struct.pack("<I", type_magic))
    for entry in entries:
        if isinstance(entry, (bytes, bytearray)):
            out += entry
        else:
            raw = entry.SerializeToString()
            out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def sparse_shm_checkpoint(target: str | os.PathLike, size: int = 1 << 30, pages: dict[int, bytes] | None = None) -> Path:
    """A copy of the sample checkpoint whose IPC namespace holds one shm segment (id 7) of ``size`` bytes,
    dumped through a pagemap that holds only ``pages`` (page number -> 4096 bytes; none by default): the
    52-byte image of issue 15 that once cost ``size`` bytes per pooled namespace."""
    from cer.criu import criu_pb2 as pb  # noqa: PLC0415
    from cer.criu.images import IPCNS_SHM, PAGEMAP  # noqa: PLC0415

    target = Path(target)
    shutil.copytree(SAMPLE_DIR / "checkpoint", target)
    for stale in [*target.glob("pagemap-shmem-*.img")]:
        stale.unlink()
    desc = pb.ipc_desc_entry(key=0x5EED, uid=0, gid=0, cuid=0, cgid=0, mode=0o600, id=7)
    (target / "ipcns-shm-10.img").write_bytes(
        image_bytes(IPCNS_SHM.magic, [pb.ipc_shm_entry(desc=desc, size=size, in_pagemaps=True)]))
    pages = pages or {}
    entries = [pb.pagemap_entry(vaddr=number * 4096, compat_nr_pages=1, flags=4) for number in sorted(pages)]
    (target / "pagemap-shmem-7.img").write_bytes(image_bytes(PAGEMAP.magic, [pb.pagemap_head(pages_id=900), *entries]))
    if pages:
        (target / "pages-900.img").write_bytes(b"".join(pages[number] for number in sorted(pages)))
    return target
