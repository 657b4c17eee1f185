"""contrib/cer-runc on real containerd, runc and CRIU 4, with a real cer daemon.

containerd's runc shim runs cer-runc in place of runc for containers whose runc options name it as their
BinaryName (here `ctr run --runc-binary`); a checkpoint of such a container carries those options on to
every `ctr c restore` of it. The seed's flow: `ctr run`, `ctr c checkpoint --rw --image --task`, `cer start`
with the seed's config, then contrib/ctr-wrapper with the original's flags, through stock containerd.
runc, containerd or CRIU missing is a failure, not a skip: CI runs contrib/install-deps first.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import zmq

from conftest import REPO, short_tempdir, start_daemon, wait_for

import containerd_support
import criu_support
import runc_support

CER_RUNC = REPO / "contrib" / "cer-runc"
WRAPPER = REPO / "contrib" / "ctr-wrapper"
NAMESPACE = "cer-runc-test"

pytestmark = pytest.mark.slow


def _load_restore_module():
    loader = importlib.machinery.SourceFileLoader("cer_runc_restore", str(REPO / "contrib" / "cer-runc-restore"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- argv handling (no runtime)

SHIM_RESTORE = ["--root", "/run/containerd/runc/ns", "--log", "/b/log.json", "--log-format", "json", "restore",
                "--image-path", "/tmp/ctrd-checkpoint1", "--work-path", "/b/work", "--detach", "--pid-file",
                "/b/init.pid", "-no-subreaper", "--bundle", "/state/ns/c1", "c1"]


def test_the_shims_restore_is_parsed_and_only_the_image_path_changes():
    module = _load_restore_module()
    args = module.RestoreArgs(SHIM_RESTORE)
    assert (args.container_id, args.bundle, args.image_path) == ("c1", "/state/ns/c1", "/tmp/ctrd-checkpoint1")
    assert args.globals == {"root": "/run/containerd/runc/ns", "log": "/b/log.json", "log-format": "json"}
    assert args.value("pid-file") == "/b/init.pid"
    rewritten = args.with_options({"image-path": "/cer/view"})
    assert rewritten == [arg if arg != "/tmp/ctrd-checkpoint1" else "/cer/view" for arg in SHIM_RESTORE]
    # A work path runc would default to the image path is added before the id; --opt=value forms are kept.
    args = module.RestoreArgs(["restore", "--image-path=/img", "-d", "c2"])
    assert args.with_options({"image-path": "/v", "work-path": "/w"}) == ["restore", "--image-path=/v", "-d",
                                                                          "--work-path", "/w", "c2"]


@pytest.mark.parametrize("argv", [["restore"], ["restore", "--bundle"], ["state", "c1"], []])
def test_what_is_not_a_restore_with_an_id_is_refused_by_the_parser(argv):
    with pytest.raises(ValueError):
        _load_restore_module().RestoreArgs(argv)


# --------------------------------------------------------------------------- pass-through, on runc itself

def test_every_other_command_goes_to_runc_unchanged(tmp_path):
    """create, start, state, kill and delete of a real container through cer-runc: runc's own answers, and
    cer-runc-restore never runs (it would write its log)."""
    runc_support.require("runc")
    bundle = runc_support.make_bundle(tmp_path / "bundle", criu_support.build_workload(), ["--empty-ipc"])
    log = tmp_path / "cer-runc.log"
    env = {**runc_support.runtime_env(), "CER_RUNC_LOG": str(log)}
    with runc_support.private_runc() as runc:
        container_id = f"pass-{uuid.uuid4().hex[:8]}"

        def cer_runc(*args: str, **kwargs) -> subprocess.CompletedProcess:
            kwargs = kwargs or {"capture_output": True}
            return subprocess.run([str(CER_RUNC), "--root", str(runc.root), *args], text=True, timeout=60, env=env,
                                  stdin=subprocess.DEVNULL, **kwargs)

        # The container's init keeps create's stdio: a file, not a pipe that would never reach EOF.
        with open(tmp_path / "create.out", "w") as output:
            created = cer_runc("create", "--bundle", str(bundle.path), container_id, stdout=output, stderr=output)
        assert created.returncode == 0, (tmp_path / "create.out").read_text()
        assert json.loads(cer_runc("state", container_id).stdout)["status"] == "created"
        assert cer_runc("start", container_id).returncode == 0
        state = json.loads(cer_runc("state", container_id).stdout)
        assert state["status"] == "running" and state == runc.state(container_id)
        assert cer_runc("kill", container_id, "KILL").returncode == 0
        wait_for(lambda: runc.state(container_id)["status"] == "stopped", 10, what="the container to stop")
        assert cer_runc("delete", container_id).returncode == 0
        assert runc.state(container_id) is None
        missing = cer_runc("state", "no-such-container")
        assert missing.returncode != 0 and "does not exist" in missing.stderr  # runc's own error, passed on
    assert not log.exists()


# --------------------------------------------------------------------------- containerd

@pytest.fixture(scope="module")
def setup():
    """A private containerd whose shims run cer-runc with cer's endpoint fixed in advance (the daemon comes
    and goes per test), and two checkpoints of containers run with --runc-binary cer-runc: one of a workload
    with an empty IPC namespace, one whose IPC namespace holds a segment, a semaphore set and a queue."""
    missing = containerd_support.require_tools()
    if missing:
        pytest.fail(missing)
    base = short_tempdir("cer-runc-")
    env = {"CER_ENDPOINT": f"ipc://{base}/root/daemon.sock", "CER_RUNC_LOG": str(base / "cer-runc.log"),
           "CER_RUNC_WORKDIR": str(base / "run"), "CER_RUNC_PYTHON": sys.executable}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # containerd passes its environment on to the shims, and they to cer-runc
    containerd = containerd_support.PrivateContainerd()
    try:
        containerd.start()
        empty = containerd_support.make_checkpoint(
            containerd, "empty-ipc", NAMESPACE, hostname="cer-runc-empty", runc_binary=str(CER_RUNC),
            args=(f"/{containerd_support.WORKLOAD_PATH}", "--empty-ipc"))
        workload = containerd_support.container_ipc_workload(containerd.dir / "build")
        full = containerd_support.make_checkpoint(containerd, "full-ipc", NAMESPACE, hostname="cer-runc-full",
                                                  workload=workload, runc_binary=str(CER_RUNC))
        yield {"base": base, "containerd": containerd, "empty": empty, "full": full, "env": env}
    finally:
        containerd.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        subprocess.run(["rm", "-rf", str(base)], timeout=60)


@pytest.fixture
def cer(setup):
    """cer serving both checkpoints from containerd, with the seed's config format, at the fixed endpoint."""
    config = {"containerd_checkpoints": [{"name": "empty-ipc", "namespace": NAMESPACE, "capacity": 1},
                                         {"name": "full-ipc", "namespace": NAMESPACE, "capacity": 1}]}
    daemon = start_daemon(config, "--containerd-address", setup["containerd"].address, root=setup["base"] / "root")
    try:
        for name in ("empty-ipc", "full-ipc"):
            daemon.wait_full(name, ("ipc", "uts"), timeout=60)
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGCONT)
        code = daemon.stop()
        subprocess.run(["rm", "-rf", str(setup["base"] / "root")], timeout=60)
    assert code == 0, daemon.output()


@pytest.fixture
def container(setup):
    """A fresh container id, removed afterwards."""
    container_id = f"r-{uuid.uuid4().hex[:8]}"
    yield container_id
    setup["containerd"].remove_container(container_id, NAMESPACE)


def held(daemon, name: str) -> dict[str, tuple[int, int]]:
    pool = daemon.pool(name)
    return {t: (c["in_use"], c["bound"]) for t, c in pool["types"].items() if c["supported"]}


def cer_namespace_inode(path: str) -> int:
    return os.stat(path).st_ino


def bundle_of(setup, container_id: str) -> Path:
    return setup["containerd"].dir / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / container_id


def run_wrapper(setup, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(WRAPPER), "restore", "--address", setup["containerd"].address, "--namespace",
            NAMESPACE, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**runc_support.runtime_env(), "CER_WRAPPER_WORKDIR": str(setup["base"] / "wrapper")})


def test_seed_flow_restores_into_cers_namespaces_through_containerd(setup, cer, container):
    """The original's command line, through stock containerd: the container runs in cer's UTS and IPC
    namespaces (inodes), with its host name; mnt is left to CRIU with a logged reason; the bundle's
    config.json is the shim's own again; everything goes back to cer when the container exits."""
    checkpoint = setup["empty"]
    result = run_wrapper(setup, "--external-ns", "ipc", "--external-ns", "uts", "--external-ns", "mnt",
                         "--external-checkpoint", checkpoint.name, container)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    pid = setup["containerd"].task_pid(container, NAMESPACE)
    assert done["pid"] == pid and done["cer"] is True
    assert set(done["namespaces"]) == {"ipc", "uts"}
    for ns_type, path in done["namespaces"].items():
        assert os.stat(f"/proc/{pid}/ns/{ns_type}").st_ino == cer_namespace_inode(path)
    assert runc_support.hostname_of(pid) == checkpoint.live["hostname"]
    assert done["checkpoint"].startswith(str(cer.root))  # cer's images, not containerd's copy
    assert held(cer, checkpoint.name) == {"ipc": (1, 1), "uts": (1, 1), "mnt": (0, 0)}
    assert "mnt left out" in (setup["base"] / "cer-runc.log").read_text()
    config = json.loads((bundle_of(setup, container) / "config.json").read_text())
    assert all("path" not in entry for entry in config["linux"]["namespaces"])
    assert not list((setup["base"] / "run" / "requests" / NAMESPACE).iterdir())
    assert cer.status()["checkpoints"][f"{NAMESPACE}/{checkpoint.name}"]["users"] == 0
    setup["containerd"].ctr("tasks", "kill", "--signal", "SIGKILL", container, namespace=NAMESPACE)
    wait_for(lambda: held(cer, checkpoint.name) == {"ipc": (0, 0), "uts": (0, 0), "mnt": (0, 0)}, 15,
             what="cer to have its namespaces back")


def test_ipc_objects_are_intact_after_a_restore_through_cer(setup, cer, container):
    """A checkpoint whose IPC namespace holds objects, restored by plain `ctr c restore` (the runtime handler's
    path: no wrapper): the container runs in cer's pre-filled IPC namespace and cer's UTS namespace
    (inodes), and every segment byte, semaphore value and message is as it was in the live container."""
    checkpoint = setup["full"]
    setup["containerd"].ctr("containers", "restore", "--live", container, checkpoint.name, namespace=NAMESPACE)
    pid = setup["containerd"].task_pid(container, NAMESPACE)
    seen = containerd_support.stable_description(
        criu_support.inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts"))
    assert seen == checkpoint.live
    assert held(cer, checkpoint.name) == {"ipc": (1, 1), "uts": (1, 1), "mnt": (0, 0)}
    done = json.loads((setup["base"] / "cer-runc.log").read_text().splitlines()[-1].split("restored through cer: ", 1)[1])
    for ns_type in ("ipc", "uts"):
        assert os.stat(f"/proc/{pid}/ns/{ns_type}").st_ino == os.stat(done["namespaces"][ns_type]).st_ino


def _plain_restore_says_why(setup, container: str, why: str) -> None:
    checkpoint = setup["empty"]
    setup["containerd"].ctr("containers", "restore", "--live", container, checkpoint.name, namespace=NAMESPACE,
                            timeout=60)
    pid = setup["containerd"].task_pid(container, NAMESPACE)
    assert runc_support.hostname_of(pid) == checkpoint.live["hostname"]
    # runc's log in the shim's bundle: where containerd looks when a runtime fails
    runc_log = [json.loads(line) for line in (bundle_of(setup, container) / "log.json").read_text().splitlines()]
    said = [entry["msg"] for entry in runc_log if "restoring without cer" in entry["msg"] and why in entry["msg"]]
    assert said, runc_log
    # the wait for cer is bounded (CER_RUNC_TIMEOUT, 0.5 s by default): cer-runc says how long it waited
    waited = float(re.search(r"after ([0-9.]+) s", said[0]).group(1))
    assert waited < 1.5, said[0]


def test_cer_stopped_restores_plainly(setup, container):
    _plain_restore_says_why(setup, container, "no answer from the cer daemon")


def test_cer_hung_restores_plainly_and_bounded(setup, cer, container):
    cer.process.send_signal(signal.SIGSTOP)
    try:
        _plain_restore_says_why(setup, container, "no answer from the cer daemon")
    finally:
        cer.process.send_signal(signal.SIGCONT)


def test_cer_answering_errors_restores_plainly(setup, container):
    """Something at cer's endpoint that answers every request with an error."""
    endpoint = setup["env"]["CER_ENDPOINT"]
    Path(endpoint.removeprefix("ipc://")).parent.mkdir(parents=True, exist_ok=True)
    context = zmq.Context.instance()
    socket = context.socket(zmq.REP)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    stop = False

    def answer_errors():
        while not stop:
            if socket.poll(50):
                socket.recv()
                socket.send(json.dumps({"v": 1, "ok": False, "error": {"code": "internal", "message": "boom"}}).encode())

    import threading

    thread = threading.Thread(target=answer_errors)
    thread.start()
    try:
        _plain_restore_says_why(setup, container, "boom")
    finally:
        stop = True
        thread.join(5)
        socket.close()
