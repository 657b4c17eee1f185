"""contrib/ctr-wrapper's runc path end to end: real runc, real CRIU 4, a real cer daemon (its containerd path,
through cer-runc, is tests/contrib/test_cer_runc.py).

The checkpoints are made here, by ``runc checkpoint`` of the sample IPC workload running in a container. Some
tests put a fake runtime in place (a script that blocks) where the point is what the wrapper does around the
runtime: dying mid-way, signals. runc, containerd or CRIU missing is a failure, not a skip: CI runs contrib/install-deps first.
"""

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE, serving_daemon, short_tempdir, wait_for

import criu_support
import runc_support
from runc_support import RuntimeSupportError

WRAPPER = REPO / "contrib" / "ctr-wrapper"
# How the wrapper's first line runs it: isolated, without site (and so without cer's package until it asks for it).
PYTHON = [sys.executable, "-I", "-S"]

# Every test may run the wrapper: its work directories go to a private place (contrib/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("wrapper_work")]


def _require(*tools: str) -> None:
    try:
        runc_support.require(*tools)
    except RuntimeSupportError as error:
        pytest.fail(str(error))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- checkpoints and daemons

@pytest.fixture(scope="module")
def workdir():
    path = short_tempdir("cer-wrapper-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], timeout=60)


def _runc_checkpoint(workdir: Path, name: str, args: list[str]) -> tuple[Path, runc_support.Bundle]:
    """The sample workload run by ``runc run -d`` in a bundle of its own, checkpointed by ``runc checkpoint``."""
    _require("runc", "criu", "gcc", "nsenter")
    bundle = runc_support.make_bundle(workdir / f"{name}-bundle", criu_support.build_workload(), args)
    images = workdir / f"{name}-images"
    images.mkdir()
    with runc_support.private_runc() as runc:
        container_id = _unique(name)
        pid = runc.run_detached(bundle, container_id)
        expected = "cer-sample-empty" if "--empty-ipc" in args else "cer-sample"
        assert runc_support.hostname_of(pid) == expected
        runc.checkpoint(container_id, images)
    return images, bundle


@pytest.fixture(scope="module")
def empty_checkpoint(workdir):
    """A container whose IPC namespace holds nothing (``ipc-workload --empty-ipc``), host name cer-sample-empty."""
    return _runc_checkpoint(workdir, "empty", ["--empty-ipc"])


@pytest.fixture(scope="module")
def ipc_checkpoint(workdir):
    """A container whose IPC namespace holds the sample's shm segments, semaphores, messages and sysctls."""
    return _runc_checkpoint(workdir, "ipc", [])


@pytest.fixture
def runc_cer(empty_checkpoint, ipc_checkpoint):
    """A cer daemon serving both runc checkpoints from their image directories."""
    entries = [
        {"name": "empty", "capacity": 1, "path": str(empty_checkpoint[0])},
        {"name": "ipc", "capacity": 1, "path": str(ipc_checkpoint[0])},
    ]
    with serving_daemon({"containerd_checkpoints": entries, "default_capacity": 1}) as daemon:
        yield daemon


@pytest.fixture
def sample_cer():
    """A cer daemon serving the bundled sample checkpoint, with mount namespaces."""
    entries = [{"name": "sample", "capacity": 1, "path": str(SAMPLE / "checkpoint-empty-ipc"),
                "rootfs": str(SAMPLE / "rootfs")}]
    with serving_daemon({"containerd_checkpoints": entries, "default_capacity": 1}) as daemon:
        yield daemon


@pytest.fixture
def runc(private_runc):
    return private_runc


def held(daemon, name: str) -> dict[str, tuple[int, int]]:
    """namespace type -> (in use, bound) for checkpoint ``name``."""
    pool = daemon.pool(name)
    return {ns_type: (types["in_use"], types["bound"]) for ns_type, types in pool["types"].items() if types["supported"]}


def checkpoint_users(daemon, name: str) -> int:
    return next(value["users"] for key, value in daemon.status()["checkpoints"].items() if key.endswith(f"/{name}"))


def wait_all_back(daemon, name: str, timeout: float = 15) -> None:
    wait_for(lambda: all(counts == (0, 0) for counts in held(daemon, name).values()), timeout,
             what=f"cer to have every namespace of {name} back: {held(daemon, name)}")


# --------------------------------------------------------------------------- running the wrapper

def _env(**extra: str) -> dict[str, str]:
    env = runc_support.wrapper_env()
    env.pop("CER_PATCHED_CTR", None)
    env.update(extra)
    return env


def run_wrapper(daemon, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    argv = [*PYTHON, str(WRAPPER), "restore", "--endpoint", daemon.endpoint, *args]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def start_wrapper(daemon, *args: str, **env: str) -> subprocess.Popen:
    argv = [*PYTHON, str(WRAPPER), "restore", "--endpoint", daemon.endpoint, *args]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(**env))


def succeeded(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, f"ctr-wrapper failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)


def runc_args(runc, bundle: runc_support.Bundle) -> list[str]:
    return ["--runtime", "runc", "--runc-root", str(runc.root), "--bundle", str(bundle.path)]


def assert_keeps_running(pid: int, seconds: float = 1.0) -> None:
    pidfd = os.pidfd_open(pid)
    try:
        exited = select.select([pidfd], [], [], seconds)[0]
    finally:
        os.close(pidfd)
    assert not exited, f"process {pid} exited within {seconds} s of its restore"


def _write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path):
    """A fake runtime. ``runc``: writes its pid to $FAKE_MARKER, then blocks (a restore that hangs)."""
    runc = _write_script(tmp_path / "fake-runc", """
        import os, time
        with open(os.environ["FAKE_MARKER"], "w") as file:
            file.write(str(os.getpid()))
        time.sleep(300)
    """)
    return {"runc": runc, "marker": tmp_path / "marker"}


def _marker_pid(path: Path) -> int | None:
    """The pid a fake runtime wrote, once the whole number is there (the file can exist empty first)."""
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def kill_pid_in(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(path.read_text()), signal.SIGKILL)


@contextlib.contextmanager
def hung_wrapper(daemon, runc, bundle: runc_support.Bundle, fakes: dict, *args: str):
    """ctr-wrapper restoring a container (``args``, then a fresh id) with the fake runtime, which hangs: the
    wrapper once the runtime has started. Afterwards the wrapper and the runtime are killed if still there."""
    wrapper = start_wrapper(daemon, *runc_args(runc, bundle), "--runc", str(fakes["runc"]), *args, _unique("hung"),
                            FAKE_MARKER=str(fakes["marker"]))
    try:
        wait_for(lambda: _marker_pid(fakes["marker"]), 30, what="the wrapper to start the runtime")
        yield wrapper
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        wrapper.communicate(timeout=10)
        kill_pid_in(fakes["marker"])


# --------------------------------------------------------------------------- (1) runc

@pytest.mark.timeout(120)
def test_the_runc_checkpoint_restores_with_stock_runc(empty_checkpoint, runc):
    """The baseline the wrapper builds on: runc alone restores it, in namespaces of its own."""
    images, bundle = empty_checkpoint
    container_id = _unique("plain")
    pid = runc.restore(container_id, bundle, images)
    assert runc_support.hostname_of(pid) == "cer-sample-empty"
    assert runc_support.namespace_inode(f"/proc/{pid}/ns/uts") != runc_support.namespace_inode("/proc/self/ns/uts")
    runc.delete(container_id)
    assert runc.state(container_id) is None


@pytest.mark.timeout(240)
def test_runc_restore_runs_in_cers_namespaces_from_cers_images(runc_cer, empty_checkpoint, runc):
    images, bundle = empty_checkpoint
    images_before = runc_support.tree_digest(images)
    bundle_config_before = bundle.config_path.read_bytes()
    conf_before = runc_support.criu_conf_state()
    container_id = _unique("restored")

    result = succeeded(run_wrapper(runc_cer, *runc_args(runc, bundle), "--external-ns", "uts", "--external-ns", "ipc",
                                   "--external-checkpoint", "empty", container_id))
    pid = result["pid"]
    assert runc.pid(container_id) == pid
    # cer's view of the checkpoint: its own files, hard-linked, IPC images emptied of what cer's namespace holds.
    view = Path(result["checkpoint"])
    assert view.parent.parent == runc_cer.root / "views" and view.name == "ipc"
    assert os.stat(view / "pstree.img").st_ino == os.stat(images / "pstree.img").st_ino
    assert result["ipc_declined"] is False
    # cer holds its fds of these namespaces until the container exits, so its paths still name them.
    for ns_type in ("ipc", "uts"):
        assert runc_support.namespace_inode(f"/proc/{pid}/ns/{ns_type}") == \
            runc_support.namespace_inode(result["namespaces"][ns_type]), f"{ns_type} is not cer's namespace"
    assert runc_support.hostname_of(pid) == "cer-sample-empty"
    assert held(runc_cer, "empty") == {"ipc": (1, 1), "uts": (1, 1)}
    assert runc_cer.status()["watched_holders"] == 2
    assert checkpoint_users(runc_cer, "empty") == 0
    assert_keeps_running(pid)
    assert runc.pid(container_id) == pid

    assert runc_support.tree_digest(images) == images_before, "cer's image directory was written to"
    assert bundle.config_path.read_bytes() == bundle_config_before, "the user's bundle was modified"
    assert runc_support.criu_conf_state() == conf_before

    runc.delete(container_id)
    wait_all_back(runc_cer, "empty")
    assert runc_cer.status()["watched_holders"] == 0


@pytest.mark.timeout(120)
def test_wrapper_killed_after_binding_loses_nothing(runc_cer, empty_checkpoint, runc, fakes):
    """SIGKILL while the restore hangs: the namespaces were bound to the wrapper, so cer takes them back."""
    _, bundle = empty_checkpoint
    with hung_wrapper(runc_cer, runc, bundle, fakes, "--image-path", str(empty_checkpoint[0]), "--external-ns", "uts",
                      "--external-ns", "ipc", "empty") as wrapper:
        assert held(runc_cer, "empty") == {"ipc": (1, 1), "uts": (1, 1)}
        assert checkpoint_users(runc_cer, "empty") == 1
        wrapper.kill()
        wrapper.wait(10)
        wait_all_back(runc_cer, "empty")
        wait_for(lambda: checkpoint_users(runc_cer, "empty") == 0, what="the images' user to come back")


@pytest.mark.timeout(120)
def test_sigterm_gives_everything_back_and_stops_the_runtime(runc_cer, empty_checkpoint, runc, fakes):
    _, bundle = empty_checkpoint
    with hung_wrapper(runc_cer, runc, bundle, fakes, "--external-checkpoint", "--external-ns", "uts", "--external-ns",
                      "ipc", "empty") as wrapper:
        runtime_pid = int(fakes["marker"].read_text())
        assert checkpoint_users(runc_cer, "empty") == 1
        wrapper.send_signal(signal.SIGTERM)
        _, stderr = wrapper.communicate(timeout=30)
        assert wrapper.returncode == 128 + signal.SIGTERM, stderr
        assert "stopped by signal 15" in stderr
        # Put back by the wrapper itself, not by cer noticing its exit: nothing is held right after it exits.
        assert held(runc_cer, "empty") == {"ipc": (0, 0), "uts": (0, 0)}
        assert checkpoint_users(runc_cer, "empty") == 0
        runc_support.wait_exited(runtime_pid)


@pytest.mark.timeout(120)
def test_failed_restore_gives_namespaces_back_at_once(runc_cer, empty_checkpoint, runc):
    images, bundle = empty_checkpoint
    images_before = runc_support.tree_digest(images)
    container_id = _unique("taken")
    # The id is taken: runc refuses the restore after the wrapper got everything from cer.
    runc.run_detached(bundle, container_id)
    result = run_wrapper(runc_cer, *runc_args(runc, bundle), "--external-ns", "uts", "--external-ns", "ipc",
                         "--external-checkpoint", "empty", container_id)
    assert result.returncode == 1, result.stderr
    assert "runc" in result.stderr and "failed" in result.stderr
    assert held(runc_cer, "empty") == {"ipc": (0, 0), "uts": (0, 0)}
    assert checkpoint_users(runc_cer, "empty") == 0
    assert runc_support.tree_digest(images) == images_before


# --------------------------------------------------------------------------- (3) IPC objects

@pytest.mark.timeout(240)
@pytest.mark.parametrize("images_from", ["cer", "image-path"])
def test_a_checkpoint_with_ipc_objects_runs_in_cers_prefilled_namespace(runc_cer, ipc_checkpoint, runc, images_from):
    """Stock runc and CRIU restore into cer's IPC namespace, which already holds the checkpoint's objects:
    the restore reads cer's view, so CRIU creates none of them, and the process finds every one intact."""
    images, bundle = ipc_checkpoint
    images_before = runc_support.tree_digest(images)
    container_id = _unique("ipc")
    source = ["--external-checkpoint"] if images_from == "cer" else ["--image-path", str(images)]
    result = run_wrapper(runc_cer, *runc_args(runc, bundle), "--external-ns", "uts", "--external-ns", "ipc", *source,
                         "ipc", container_id)
    restored = succeeded(result)
    pid = restored["pid"]
    assert set(restored["namespaces"]) == {"ipc", "uts"} and restored["ipc_declined"] is False
    for ns_type in ("ipc", "uts"):
        assert runc_support.namespace_inode(f"/proc/{pid}/ns/{ns_type}") == \
            runc_support.namespace_inode(restored["namespaces"][ns_type]), f"{ns_type} is not cer's namespace"
    assert Path(restored["checkpoint"]).parent.parent == runc_cer.root / "views"
    assert held(runc_cer, "ipc") == {"ipc": (1, 1), "uts": (1, 1)}
    assert checkpoint_users(runc_cer, "ipc") == 0

    inside = criu_support.inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts")
    assert criu_support.differences(inside, criu_support.expected_namespace()) == []
    assert_keeps_running(pid)
    assert runc_support.tree_digest(images) == images_before

    runc.delete(container_id)
    wait_all_back(runc_cer, "ipc")


@pytest.mark.timeout(120)
def test_image_path_of_another_dump_is_refused_for_cers_ipc(runc_cer, ipc_checkpoint, empty_checkpoint, runc):
    """cer's IPC namespace goes with cer's images: --image-path naming another dump is refused, nothing kept."""
    _, bundle = ipc_checkpoint
    result = run_wrapper(runc_cer, *runc_args(runc, bundle), "--external-ns", "ipc", "--image-path",
                         str(empty_checkpoint[0]), "ipc", _unique("other"))
    assert result.returncode == 3, result.stderr
    assert "is not the dump in" in result.stderr
    assert held(runc_cer, "ipc") == {"ipc": (0, 0), "uts": (0, 0)}
    assert checkpoint_users(runc_cer, "ipc") == 0


# --------------------------------------------------------------------------- what stock runtimes cannot do

@pytest.mark.timeout(60)
@pytest.mark.parametrize("options, says", [
    (["--runtime", "runc", "--bundle", str(SAMPLE), "--lazy", "--external-ns", "mnt"], "rebuilds the mount tree"),
], ids=["runc-lazy-mnt"])
def test_refused_before_taking_anything(sample_cer, options, says):
    result = run_wrapper(sample_cer, *options, "sample", _unique("never"))
    assert result.returncode == 4, result.stderr
    assert says in result.stderr
    pool = sample_cer.pool("sample")
    for ns_type in ("ipc", "uts", "mnt"):
        assert pool["types"][ns_type]["warm_gets"] + pool["types"][ns_type]["cold_gets"] == 0
    assert checkpoint_users(sample_cer, "sample") == 0


# --------------------------------------------------------------------------- a lean start

def _load_wrapper():
    loader = importlib.machinery.SourceFileLoader("ctr_wrapper", str(WRAPPER))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def imported_modules(importtime_output: str) -> set[str]:
    """The modules ``python3 -X importtime`` reports as imported."""
    return {line.split("|")[-1].strip() for line in importtime_output.splitlines() if line.startswith("import time:")}


@pytest.mark.timeout(240)
def test_an_eager_runc_restore_imports_neither_cer_nor_pyzmq(runc_cer, empty_checkpoint, runc):
    """The wrapper's start is most of what it adds to runc: an eager runc restore through cer's ipc:// socket
    runs on the standard library alone (cer-runc-restore's client), the whole way to binding the container."""
    _, bundle = empty_checkpoint
    container_id = _unique("lean")
    argv = [*PYTHON, "-X", "importtime", str(WRAPPER), "restore", "--endpoint", runc_cer.endpoint,
            *runc_args(runc, bundle), "--external-ns", "uts", "--external-ns", "ipc", "--external-checkpoint",
            "empty", container_id]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=_env())
    restored = succeeded(result)
    assert held(runc_cer, "empty") == {"ipc": (1, 1), "uts": (1, 1)}
    modules = imported_modules(result.stderr)
    assert {"json", "socket"} <= modules, "-X importtime reported nothing (socket: cer-runc-restore's client)"
    heavy = sorted(name for name in modules if name.split(".")[0] in ("cer", "zmq", "protocol", "actors", "site"))
    assert heavy == [], f"the eager runc path imported {heavy}"
    runc.delete(container_id)
    wait_all_back(runc_cer, "empty")
    assert restored["pid"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options", [["--lazy", "--endpoint", "ipc:///nonexistent/cer/daemon.sock"],
                                     ["--external-checkpoint", "--endpoint", "tcp://127.0.0.1:1"]],
                         ids=["lazy", "tcp-endpoint"])
def test_what_needs_cers_package_runs_again_with_site(tmp_path, options):
    """Lazy restores and endpoints other than an ipc:// path need cer's package: run as its first line says
    (without site), the wrapper runs itself again with site and gets as far as asking cer."""
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "rootfs"},
                                                      "linux": {"namespaces": [{"type": "uts"}]}}))
    result = subprocess.run([*PYTHON, str(WRAPPER), "restore", "--runtime", "runc", "--bundle", str(tmp_path),
                             "--cer-timeout", "0.5", *options, "ckpt", _unique("never")],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=50, env=_env())
    assert result.returncode == 3, result.stderr
    assert "cer: unavailable: no answer from the cer daemon" in result.stderr


def test_what_the_wrapper_holds_of_cer_is_cers():
    """The few facts of cer the wrapper keeps to itself, without importing cer: equal to cer's."""
    from cer.config import default_endpoint
    from cer.criu.views import TRANSFORMS

    wrapper = _load_wrapper()
    assert wrapper.VIEW_KINDS == tuple(sorted(TRANSFORMS))
    assert wrapper.cer_runc_restore.DEFAULT_ENDPOINT == default_endpoint()
