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
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import zmq

from conftest import REPO, SAMPLE, short_tempdir, start_daemon, wait_for

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


@pytest.mark.parametrize("annotation", [None, "own", ""], ids=["runc.conf", "spec's own", "none"])
def test_a_per_restore_criu_config_keeps_what_runc_would_have_read(tmp_path, monkeypatch, annotation):
    """cer's CRIU options go into a file of the restore's own, after the options runc would have read for the
    container: the spec's org.criu.config file, /etc/criu/runc.conf without one, nothing if it is empty."""
    module = _load_restore_module()
    own = tmp_path / "own.conf"
    own.write_text("tcp-established\n")
    host = tmp_path / "runc.conf"
    host.write_text("file-locks\n")
    monkeypatch.setattr(module, "RUNC_CRIU_CONFIG", str(host))
    restore = module.Restore(module.RestoreArgs(["restore", "--bundle", str(tmp_path), "c1"]),
                             module.Logs("c1", None, "json"))
    restore.work = str(tmp_path)
    restore.cer = type("Reply", (), {"criu_config": ["action-script /x/complete-mounts"]})()
    spec = {} if annotation is None else {"annotations": {"org.criu.config": str(own) if annotation else ""}}
    written = Path(restore._write_criu_config(spec)).read_text().splitlines()
    before = {None: ["file-locks"], "own": ["tcp-established"], "": []}[annotation]
    assert written == [*before, "action-script /x/complete-mounts"]


def test_a_lazy_restore_is_left_as_it_is(tmp_path):
    """runc restore --lazy-pages reads what its lazy-pages server serves: cer-runc does not touch it."""
    module = _load_restore_module()
    args = module.RestoreArgs(["restore", "--lazy-pages", "--image-path", str(SAMPLE / "checkpoint"), "--bundle",
                               str(tmp_path), "c1"])
    with pytest.raises(module.Fallback, match="lazy"):
        module.Restore(args, module.Logs("c1", None, "json")).prepare()


@pytest.mark.parametrize("argv", [["restore"], ["restore", "--bundle"], ["state", "c1"], []])
def test_what_is_not_a_restore_with_an_id_is_refused_by_the_parser(argv):
    with pytest.raises(ValueError):
        _load_restore_module().RestoreArgs(argv)


@pytest.mark.parametrize("checkpoint", ["checkpoint", "checkpoint-empty-ipc"])
def test_the_images_digest_is_cers(checkpoint, tmp_path):
    """cer-runc computes cer's digest without importing cer.criu: the two must name a checkpoint alike, and
    differ between checkpoints."""
    from cer.criu.views import images_digest

    module = _load_restore_module()
    directory = SAMPLE / checkpoint
    assert module.images_digest(str(directory)) == images_digest(directory)
    other = SAMPLE / ({"checkpoint", "checkpoint-empty-ipc"} - {checkpoint}).pop()
    assert module.images_digest(str(directory)) != module.images_digest(str(other))
    assert module.images_digest(str(tmp_path)) is None  # no identity images: not a checkpoint
    os.mkfifo(tmp_path / "inventory.img")
    (tmp_path / "pstree.img").write_bytes(b"")
    assert module.images_digest(str(tmp_path)) is None  # a FIFO neither blocks nor counts


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
    with an empty IPC namespace, one whose IPC namespace holds a segment, a semaphore set and a queue; and a
    checkpoint of a container run with plain runc."""
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
        plain = containerd_support.make_checkpoint(
            containerd, "plain-runc", NAMESPACE, args=(f"/{containerd_support.WORKLOAD_PATH}", "--empty-ipc"))
        yield {"base": base, "containerd": containerd, "empty": empty, "full": full, "plain": plain, "env": env}
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
    config = {"containerd_checkpoints": [{"name": name, "namespace": NAMESPACE, "capacity": 1}
                                         for name in ("empty-ipc", "full-ipc", "plain-runc")]}
    daemon = start_daemon(config, "--containerd-address", setup["containerd"].address, root=setup["base"] / "root")
    try:
        for name in ("empty-ipc", "full-ipc", "plain-runc"):
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
    # As the wrapper's first line runs it: isolated, without site (its containerd path needs only the stdlib).
    argv = [sys.executable, "-I", "-S", str(WRAPPER), "restore", "--address", setup["containerd"].address, "--namespace",
            NAMESPACE, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**runc_support.runtime_env(), "CER_WRAPPER_WORKDIR": str(setup["base"] / "wrapper")})


@pytest.mark.parametrize("which", ["empty", "full"], ids=["empty-ipc", "ipc-objects"])
def test_seed_flow_restores_into_cers_namespaces_through_containerd(setup, cer, container, which):
    """The original's command line, through stock containerd: the container runs in cer's UTS, IPC and mount
    namespaces (inodes), with its host name, its IPC objects as they were (segment bytes, semaphore values,
    messages), its root filesystem as it was (the image's files, those it changed, not those it deleted) and
    the mounts only a restore can make (its own /proc); the bundle's config.json is the shim's own again;
    everything goes back to cer when the container exits."""
    checkpoint = setup[which]
    result = run_wrapper(setup, "--external-ns", "ipc", "--external-ns", "uts", "--external-ns", "mnt",
                         "--external-checkpoint", checkpoint.name, container)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    pid = setup["containerd"].task_pid(container, NAMESPACE)
    assert done["pid"] == pid and done["cer"] is True
    assert set(done["namespaces"]) == {"ipc", "uts", "mnt"}
    for ns_type, path in done["namespaces"].items():
        assert os.stat(f"/proc/{pid}/ns/{ns_type}").st_ino == cer_namespace_inode(path)
    assert runc_support.hostname_of(pid) == checkpoint.live["hostname"]
    seen = criu_support.inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts")
    assert containerd_support.stable_description(seen) == checkpoint.live
    assert done["checkpoint"].startswith(str(cer.root))  # cer's images, not containerd's copy
    assert held(cer, checkpoint.name) == {"ipc": (1, 1), "uts": (1, 1), "mnt": (1, 1)}
    root = Path(f"/proc/{pid}/root")
    for name, data in {**checkpoint.image_files, **checkpoint.changed_files}.items():
        if name not in checkpoint.deleted_files:
            assert (root / name).read_bytes() == data, name
    assert not any((root / name).exists() for name in checkpoint.deleted_files)
    with open(f"/proc/{pid}/mountinfo") as file:
        points = {line.split()[4] for line in file}
    assert {"/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"} <= points, points
    assert os.readlink(root / "proc" / "1" / "exe") == "/" + containerd_support.WORKLOAD_PATH  # its own /proc
    config = json.loads((bundle_of(setup, container) / "config.json").read_text())
    assert all("path" not in entry for entry in config["linux"]["namespaces"])
    assert not list((setup["base"] / "run" / "requests" / NAMESPACE).iterdir())
    assert cer.status()["checkpoints"][f"{NAMESPACE}/{checkpoint.name}"]["users"] == 0
    setup["containerd"].ctr("tasks", "kill", "--signal", "SIGKILL", container, namespace=NAMESPACE)
    wait_for(lambda: held(cer, checkpoint.name) == {"ipc": (0, 0), "uts": (0, 0), "mnt": (0, 0)}, 15,
             what="cer to have its namespaces back")


def test_a_checkpoint_whose_runtime_is_not_cer_runc_restores_plainly_and_the_wrapper_says_so(setup, cer, container):
    """`ctr c restore` takes the runtime options the checkpoint carries (it has no --runc-binary): a container
    that ran with plain runc is restored by plain runc, which the wrapper reports instead of failing."""
    result = run_wrapper(setup, "--external-ns", "ipc", "--external-ns", "uts", "plain-runc", container)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["cer"] is False and done["namespaces"] == {}
    assert "do not name cer-runc" in result.stderr
    assert done["pid"] == setup["containerd"].task_pid(container, NAMESPACE)
    assert held(cer, "plain-runc") == {"ipc": (0, 0), "uts": (0, 0), "mnt": (0, 0)}


def test_the_types_the_wrapper_asks_for_are_the_ones_taken(setup, cer, container):
    """--external-ns reaches cer-runc through its request directory: uts alone takes uts alone."""
    result = run_wrapper(setup, "--external-ns", "uts", setup["empty"].name, container)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["cer"] is True and set(done["namespaces"]) == {"uts"}
    assert held(cer, setup["empty"].name) == {"ipc": (0, 0), "uts": (1, 1), "mnt": (0, 0)}
    assert runc_support.hostname_of(done["pid"]) == setup["empty"].live["hostname"]


def test_a_request_left_by_a_killed_wrapper_is_replaced_and_a_live_one_refused(setup, cer, container):
    requests = setup["base"] / "run" / "requests" / NAMESPACE
    requests.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (requests / container).mkdir()
        (requests / container / "request.json").write_text(json.dumps({"types": ["uts"], "client_pid": sleeper.pid}))
        refused = run_wrapper(setup, "--external-ns", "uts", setup["empty"].name, container)
        assert refused.returncode == 2 and "already under way" in refused.stderr
        assert container not in setup["containerd"].tasks(NAMESPACE)
    finally:
        sleeper.kill()
        sleeper.wait(10)
    result = run_wrapper(setup, "--external-ns", "uts", setup["empty"].name, container)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cer"] is True
    assert list(requests.iterdir()) == []


def test_ipc_objects_are_intact_after_a_restore_through_cer(setup, cer, container):
    """A checkpoint whose IPC namespace holds objects, restored by plain `ctr c restore` (the runtime handler's
    path: no wrapper, cer-runc's default types): the container runs in cer's pre-filled IPC namespace and
    cer's UTS and mount namespaces (inodes), and every segment byte, semaphore value and message is as it was
    in the live container."""
    checkpoint = setup["full"]
    setup["containerd"].ctr("containers", "restore", "--live", container, checkpoint.name, namespace=NAMESPACE)
    pid = setup["containerd"].task_pid(container, NAMESPACE)
    seen = containerd_support.stable_description(
        criu_support.inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts"))
    assert seen == checkpoint.live
    assert held(cer, checkpoint.name) == {"ipc": (1, 1), "uts": (1, 1), "mnt": (1, 1)}
    done = json.loads((setup["base"] / "cer-runc.log").read_text().splitlines()[-1].split("restored through cer: ", 1)[1])
    for ns_type in ("ipc", "uts", "mnt"):
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


# --------------------------------------------------------------------------- runc restores, without containerd

@pytest.fixture(scope="module")
def runc_checkpoint():
    """A runc container of the sample workload (empty IPC namespace) checkpointed by `runc checkpoint`, and a
    cer daemon serving that image directory."""
    runc_support.require("runc", "criu", "gcc", "nsenter")
    base = short_tempdir("cer-runc-direct-")
    bundle = runc_support.make_bundle(base / "bundles" / "bundle", criu_support.build_workload(), ["--empty-ipc"])
    images = base / "images"
    images.mkdir()
    with runc_support.private_runc() as runc:
        container_id = f"d-{uuid.uuid4().hex[:8]}"
        runc.run_detached(bundle, container_id)
        runc.checkpoint(container_id, images)
    daemon = start_daemon({"containerd_checkpoints": [{"name": "direct", "capacity": 1, "path": str(images)}]})
    try:
        daemon.wait_full("direct", ("ipc", "uts"), timeout=60)
        yield {"base": base, "bundle": bundle, "images": images, "daemon": daemon}
    finally:
        code = daemon.stop()
        subprocess.run(["rm", "-rf", str(base), str(daemon.root.parent)], timeout=60)
    assert code == 0, daemon.output()


def direct_restore(setup: dict, runc, bundle: Path, container_id: str) -> tuple[subprocess.CompletedProcess, Path]:
    """cer-runc restore as containerd's shim calls it, on a private runc root; runc's log is returned too."""
    work = setup["base"] / f"work-{container_id}"
    work.mkdir()
    runc_log = work / "log.json"
    env = {**runc_support.runtime_env(), "CER_ENDPOINT": setup["daemon"].endpoint, "CER_RUNC_PYTHON": sys.executable,
           "CER_RUNC_LOG": str(setup["base"] / "cer-runc.log"), "CER_RUNC_WORKDIR": str(setup["base"] / "run")}
    argv = [str(CER_RUNC), "--root", str(runc.root), "--log", str(runc_log), "--log-format", "json", "restore",
            "--image-path", str(setup["images"]), "--work-path", str(work), "--detach", "--pid-file",
            str(work / "init.pid"), "-no-subreaper", "--bundle", str(bundle), container_id]
    with open(work / "stdio", "w") as stdio:  # the restored init keeps runc's stdio: a file, not a pipe
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio, timeout=120, env=env)
    return result, runc_log


def test_a_runc_restore_through_cer_runc_joins_cers_namespaces_and_leaves_the_bundle_as_it_was(runc_checkpoint):
    setup = runc_checkpoint
    before = setup["bundle"].config_path.read_bytes()
    images_before = runc_support.tree_digest(setup["images"])
    with runc_support.private_runc() as runc:
        container_id = f"ok-{uuid.uuid4().hex[:8]}"
        result, _ = direct_restore(setup, runc, setup["bundle"].path, container_id)
        assert result.returncode == 0
        pid = runc.pid(container_id)
        assert held(setup["daemon"], "direct") == {"ipc": (1, 1), "uts": (1, 1)}
        # cer has no mount namespaces for an entry without a root filesystem: the others, and CRIU's mounts
        assert "mnt left to CRIU" in (setup["base"] / "cer-runc.log").read_text()
        assert runc_support.hostname_of(pid) == "cer-sample-empty"
        assert setup["bundle"].config_path.read_bytes() == before
        assert runc_support.tree_digest(setup["images"]) == images_before  # CRIU wrote nothing into them
        runc.delete(container_id)
    wait_for(lambda: held(setup["daemon"], "direct") == {"ipc": (0, 0), "uts": (0, 0)}, 15,
             what="cer to have its namespaces back")
    assert list((setup["base"] / "run").glob("restore-*")) == []


def test_a_failed_restore_puts_everything_back(runc_checkpoint):
    """runc restore fails for real (CRIU cannot find the workload's executable in the bundle's rootfs): its
    status is runc's, config.json is as it was, cer has every namespace and the checkpoint back, and runc's
    log says what happened."""
    setup = runc_checkpoint
    broken = setup["base"] / "bundles" / f"broken-{uuid.uuid4().hex[:6]}"
    shutil.copytree(setup["bundle"].path, broken, symlinks=True)
    for path in (broken / "rootfs").iterdir():
        if path.is_file():  # the workload's executable (runc made the directories)
            path.unlink()
    config = json.loads((broken / "config.json").read_text())
    config["root"]["path"] = str(broken / "rootfs")
    (broken / "config.json").write_text(json.dumps(config))
    before = (broken / "config.json").read_bytes()
    with runc_support.private_runc() as runc:
        container_id = f"bad-{uuid.uuid4().hex[:8]}"
        result, runc_log = direct_restore(setup, runc, broken, container_id)
        assert result.returncode == 1
        assert runc.state(container_id) is None
    assert (broken / "config.json").read_bytes() == before
    assert held(setup["daemon"], "direct") == {"ipc": (0, 0), "uts": (0, 0)}
    assert setup["daemon"].status()["checkpoints"]["default/direct"]["users"] == 0
    messages = [json.loads(line)["msg"] for line in runc_log.read_text().splitlines()]
    assert any("they went back to cer" in message for message in messages), messages
    assert list((setup["base"] / "run").glob("restore-*")) == []
