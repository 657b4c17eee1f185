"""Lazy restores end to end: real runc, real CRIU 4 lazy-pages servers run by a real cer daemon, a workload
that checks every page of its memory itself.

tests/contrib/lazy-workload.c fills N MiB with a pattern in which every page differs, runs in a runc container
and is checkpointed with ``runc checkpoint``. After a lazy restore through cer (``contrib/ctr-wrapper restore
--lazy``) a SIGUSR1 makes it read every page and write ``OK``/``FAIL`` to /results, a host directory
bind-mounted into the container: what it wrote outlives it, so a test can also tell that a killed container
never got to report anything. runc, CRIU or userfaultfd missing is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SAMPLE, start_daemon, wait_for

import runc_support
from lazy_support import (  # noqa: F401 (fixtures: workdir, binary, small, large, lazy_cer, runc)
    Checkpoint, alive, binary, check_memory, daemon_fds, entries, large, lazy_cer, lazy_status,
    processes_naming, restorable, restore_lazily, runc, running_daemon, server, small, unique, users, wait_ended,
    workdir, wrapper_argv,
)
from runc_support import WRAPPER, wrapper_env

# Every test runs the wrapper: its work directories go to a private place (contrib/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("wrapper_work")]


# --------------------------------------------------------------------------- correctness

@pytest.mark.timeout(240)
def test_a_lazy_restore_through_cer_has_every_page(lazy_cer, large, runc, workdir):
    target = restorable(large, workdir / unique("restore"))
    images_before = runc_support.tree_digest(large.images)

    result = restore_lazily(lazy_cer, runc, target, large, "--external-ns", "uts", "--external-ns", "ipc")
    pid, lazy = result["pid"], result["lazy"]
    assert result["checkpoint"] == str(large.images)
    assert Path(lazy["work_dir"]).parent == lazy_cer.root / "lazy"
    assert lazy["state"] in ("serving", "completed")
    assert runc.pid(result["id"]) == pid
    # Checked at once: pages still on their way are faulted in on demand.
    assert check_memory(pid, target, 1).startswith(f"OK 1 pages={large.pages} "), target.result()

    ended = wait_ended(lazy_cer, lazy["server_id"])
    assert ended["outcome"] == "completed", ended
    assert ended["restored_pid"] == pid and ended["restored_killed"] is False
    assert not Path(lazy["work_dir"]).exists(), "the server's work directory outlived it"
    assert not any(s["server_id"] == lazy["server_id"] for s in lazy_status(lazy_cer)["servers"])
    # Every page once more, now that the server is gone: nothing is left to arrive.
    assert check_memory(pid, target, 2).startswith(f"OK 2 pages={large.pages} "), target.result()
    assert alive(pid)
    # The container also runs in cer's namespaces, and cer's images were only read.
    assert runc_support.namespace_inode(f"/proc/{pid}/ns/uts") == runc_support.namespace_inode(result["namespaces"]["uts"])
    assert runc_support.tree_digest(large.images) == images_before, "the lazy restore wrote to cer's image directory"
    assert daemon_fds(lazy_cer, "anon_inode:[userfaultfd]") == 0, "cer kept a userfaultfd of an ended server"
    # What the checkpoint directory counts as users now is the spare server cer started once this one ended.
    spares = [s for s in lazy_status(lazy_cer)["servers"] if s["ref"] == f"default/{large.name}"]
    assert len(spares) == 1 and spares[0]["state"] in ("starting", "spare"), spares
    assert users(lazy_cer, large) == 1


@pytest.mark.timeout(240)
def test_two_lazy_restores_of_one_checkpoint_at_once(lazy_cer, small, runc, workdir):
    targets = [restorable(small, workdir / unique("twin")) for _ in range(2)]
    processes = [subprocess.Popen(wrapper_argv(lazy_cer, runc, target, small, unique("twin")), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=wrapper_env())
                 for target in targets]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"ctr-wrapper --lazy failed ({process.returncode}):\n{err}"
        results.append(json.loads(out))
    first, second = (result["lazy"] for result in results)
    assert first["server_id"] != second["server_id"] and first["pid"] != second["pid"]
    assert first["work_dir"] != second["work_dir"]
    assert results[0]["pid"] != results[1]["pid"]
    for result, target in zip(results, targets, strict=True):
        assert check_memory(result["pid"], target, 1).startswith(f"OK 1 pages={small.pages} "), target.result()
    for result in results:
        ended = wait_ended(lazy_cer, result["lazy"]["server_id"])
        assert ended["outcome"] == "completed", ended
        # A 64 MiB server may be done before the wrapper's bind; then the bind says so and binds nothing.
        bound = result["lazy"]["state"] == "serving"
        assert ended["restored_pid"] == (result["pid"] if bound else None), (result, ended)
    for result, target in zip(results, targets, strict=True):
        assert check_memory(result["pid"], target, 2).startswith("OK 2 "), target.result()


@pytest.mark.timeout(300)
def test_a_server_killed_mid_restore_kills_the_container_before_it_reads_a_hole(lazy_cer, large, runc, workdir):
    """Killed, the server takes its userfaultfd along, and the kernel then fills every page it had not sent
    with zeros: the container would run on with holes. cer holds copies of the userfaultfd, so the container
    waits on the missing page instead (even while cer itself is frozen), and cer kills it: the workload, which
    reports a bad page the moment it reads one, must never get to report anything."""
    for _attempt in range(3):
        target = restorable(large, workdir / unique("killed"))
        result = restore_lazily(lazy_cer, runc, target, large)
        pid, lazy = result["pid"], result["lazy"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(lazy["pid"], signal.SIGSTOP)  # no more pages from here on
        os.kill(pid, signal.SIGUSR1)  # the check reads every page, in order
        def finished_or_blocked(target=target, pid=pid):
            return target.result() or (_wchan(pid) == "handle_userfault" and "blocked")

        blocked = wait_for(finished_or_blocked, 30, 0.005, "the check to finish or to wait for a page")
        if blocked == "blocked":
            break
        # Every page had arrived before the server could be stopped: try again (the server is gone).
        assert blocked.startswith("OK 1 "), blocked
        runc.delete(result["id"])
    else:
        pytest.fail("in 3 tries the server always delivered all 256 MiB before it could be stopped")

    assert server(lazy_cer, lazy["server_id"])["state"] == "serving"
    # The daemon is frozen while the server dies, so that nothing depends on how fast it reacts: what keeps
    # the container from its missing page meanwhile is only the userfaultfd copy the daemon holds open.
    os.kill(lazy_cer.process.pid, signal.SIGSTOP)
    try:
        os.kill(lazy["pid"], signal.SIGKILL)
        runc_support.wait_exited(lazy["pid"], 10)
        time.sleep(0.5)
        assert target.result() is None, f"the container read a hole while cer was frozen: {target.result()}"
        assert _wchan(pid) == "handle_userfault", "the container is not waiting for its missing page"
    finally:
        os.kill(lazy_cer.process.pid, signal.SIGCONT)
    runc_support.wait_exited(pid, 10)
    ended = wait_ended(lazy_cer, lazy["server_id"])
    assert ended["outcome"] == "failed" and ended["reason"] == "killed by SIGKILL", ended
    assert ended["restored_pid"] == pid and ended["restored_killed"] is True, ended
    assert target.result() is None, f"the container ran on and reported: {target.result()}"
    assert runc.state(result["id"])["status"] == "stopped"
    assert not Path(lazy["work_dir"]).exists()
    assert wait_for(lambda: daemon_fds(lazy_cer, "anon_inode:[userfaultfd]") == 0, 10, 0.05,
                    "cer to let go of the dead server's userfaultfd")
    assert "before process" in lazy_cer.output() and "killed it" in lazy_cer.output()


def _wchan(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return None


def _restore_without_bind(daemon, runc, checkpoint: Checkpoint, workdir: Path, prefix: str) -> tuple[dict, str]:
    """A lazy restore the test binds itself: the server is stopped (SIGSTOP) before it can deliver every page,
    so that it stays alive, serving nothing. Its reply and the container's id."""
    from cer.protocol.methods import CheckpointLazy
    from cer.references import CheckpointRef

    for _attempt in range(3):
        target = restorable(checkpoint, workdir / unique(prefix))
        reply = daemon.call(CheckpointLazy(CheckpointRef(checkpoint.name)))
        container_id = unique(prefix)
        runc("restore", "-d", "--lazy-pages", "--image-path", reply["images"], "--work-path", reply["work_dir"],
             "--bundle", str(target.bundle), container_id, timeout=120)
        with contextlib.suppress(ProcessLookupError):
            os.kill(reply["pid"], signal.SIGSTOP)  # before it has sent everything, unless it was very quick
        if server(daemon, reply["server_id"]) is not None:
            return reply, container_id
        runc.delete(container_id)  # it had delivered every page already: try again
    pytest.fail(f"in 3 tries the server always delivered all {checkpoint.mib} MiB before it could be stopped")


@pytest.mark.timeout(240)
def test_a_bind_after_the_server_died_kills_nothing(lazy_cer, large, runc, workdir):
    """The window between the restore and the bind: a server dead by then cannot be trusted with anything, and
    the daemon cannot tell what the pid it is given is: it says so and kills nothing (issue 15, finding 2)."""
    from cer.errors import Unavailable
    from cer.protocol.methods import CheckpointLazyBind

    reply, container_id = _restore_without_bind(lazy_cer, runc, large, workdir, "late")
    pid = runc.pid(container_id)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        os.kill(reply["pid"], signal.SIGKILL)
        assert wait_ended(lazy_cer, reply["server_id"])["outcome"] == "failed"
        for victim in (bystander.pid, pid):
            with pytest.raises(Unavailable, match=r"ended \(failed: killed by SIGKILL\).*may lack pages"):
                lazy_cer.call(CheckpointLazyBind(reply["server_id"], victim))
        time.sleep(0.5)
        assert bystander.poll() is None, "the daemon killed the pid a bind on an ended server named"
        assert alive(pid), "the daemon killed a process it could not tie to a live server"
    finally:
        bystander.kill()
        bystander.wait(10)
        runc("delete", "--force", container_id, timeout=60)


@pytest.mark.timeout(300)
def test_a_bind_takes_only_the_servers_own_restore_and_holds_each_userfaultfd_once(lazy_cer, large, runc, workdir):
    """Issue 15: through lazy_bind{restored_pid: VICTIM} any client had a root process SIGKILLed when the server
    ended (finding 2), and every bind took one more duplicate of the server's userfaultfds (finding 7)."""
    from cer.errors import BadRequest
    from cer.protocol.methods import CheckpointLazy, CheckpointLazyBind, CheckpointLazyPut
    from cer.references import CheckpointRef

    reply, container_id = _restore_without_bind(lazy_cer, runc, large, workdir, "bind")
    pid = runc.pid(container_id)
    bystander = subprocess.Popen(["sleep", "300"])  # root's, as in the issue
    other = lazy_cer.call(CheckpointLazy(CheckpointRef(large.name)))
    try:
        with pytest.raises(BadRequest, match=f"process {bystander.pid} is not the restore of lazy-pages server"):
            lazy_cer.call(CheckpointLazyBind(reply["server_id"], bystander.pid))
        # A server no restore reached cannot be bound, nor can one server's restore to another server.
        with pytest.raises(BadRequest, match="no restore has reached"):
            lazy_cer.call(CheckpointLazyBind(other["server_id"], pid))
        binds = 200
        with lazy_cer.client() as client:
            for _ in range(binds):
                assert client.call(CheckpointLazyBind(reply["server_id"], pid))["state"] == "serving"
        held = daemon_fds(lazy_cer, "anon_inode:[userfaultfd]")
        served = len([fd for fd in os.listdir(f"/proc/{reply['pid']}/fd")
                      if os.readlink(f"/proc/{reply['pid']}/fd/{fd}") == "anon_inode:[userfaultfd]"])
        assert 1 <= held == served, f"{binds} binds left the daemon holding {held} userfaultfds; the server has {served}"

        # Ended with its restore bound: the daemon kills the restored container, and nothing else.
        assert lazy_cer.call(CheckpointLazyPut(reply["server_id"]))["state"] == "released"
        ended = wait_ended(lazy_cer, reply["server_id"])
        assert ended["restored_pid"] == pid and ended["restored_killed"] is True, ended
        runc_support.wait_exited(pid, 10)
        assert bystander.poll() is None
        assert wait_for(lambda: daemon_fds(lazy_cer, "anon_inode:[userfaultfd]") == 0, 10, 0.05,
                        "the daemon to let go of the userfaultfds")
    finally:
        bystander.kill()
        bystander.wait(10)
        lazy_cer.call(CheckpointLazyPut(other["server_id"]))
        runc("delete", "--force", container_id, timeout=60)


@pytest.mark.timeout(180)
def test_lazy_servers_are_capped_per_checkpoint_and_in_all(small, large):
    """Issue 15: 100 criu lazy-pages processes in 3 s, no cap. A spare gives way to a restore, never the reverse."""
    from cer.errors import Exhausted
    from cer.protocol.methods import CheckpointLazy, CheckpointLazyPut
    from cer.references import CheckpointRef

    def lazy(checkpoint):
        return daemon.call(CheckpointLazy(CheckpointRef(checkpoint.name)))

    with running_daemon(entries(small, large), "--lazy-max-per-checkpoint", "2", "--lazy-max-servers", "3",
                        "--lazy-spares", "1") as daemon:
        first, second = lazy(small), lazy(small)
        with pytest.raises(Exhausted, match="the most per checkpoint.*--lazy-max-per-checkpoint"):
            lazy(small)
        daemon.call(CheckpointLazyPut(first["server_id"]))

        def spare_of_small():
            return next((s for s in lazy_status(daemon)["servers"]
                         if s["ref"] == f"default/{small.name}" and s["state"] == "spare"), None)

        spare = wait_for(spare_of_small, 15, 0.05, "a spare server of the checkpoint restored lazily")
        taken = [lazy(large), lazy(large)]  # the second takes the spare's place
        ended = wait_ended(daemon, spare["server_id"])
        assert (ended["outcome"], ended["reason"]) == ("unused", "its place was needed for a restore"), ended
        with pytest.raises(Exhausted, match="3 lazy-pages servers are running, the most.*--lazy-max-servers"):
            lazy(small)
        servers = lazy_status(daemon)["servers"]
        assert sorted(s["server_id"] for s in servers) == sorted([second["server_id"], *(t["server_id"] for t in taken)])
        assert len(processes_naming(daemon.root / "lazy")) >= 3
        for reply in (second, *taken):
            daemon.call(CheckpointLazyPut(reply["server_id"]))


# --------------------------------------------------------------------------- servers nobody uses

@pytest.mark.timeout(120)
def test_a_server_whose_restore_never_comes_is_cleaned_up(small):
    from cer.protocol.methods import CheckpointLazy
    from cer.references import CheckpointRef

    with running_daemon(entries(small), "--lazy-deadline", "2", "--lazy-spares", "0") as daemon:
        baseline = daemon_fds(daemon, "anon_inode:[pidfd]")
        started = time.monotonic()
        reply = daemon.call(CheckpointLazy(CheckpointRef(small.name)))
        assert reply["deadline_seconds"] == 2
        assert Path(reply["socket"]).exists() and alive(reply["pid"])
        assert users(daemon, small) == 1
        assert server(daemon, reply["server_id"])["state"] == "waiting"

        ended = wait_ended(daemon, reply["server_id"], timeout=15)
        assert ended["outcome"] == "expired", ended
        assert time.monotonic() - started >= 2
        assert not alive(reply["pid"])
        assert not Path(reply["work_dir"]).exists()
        assert users(daemon, small) == 0
        assert lazy_status(daemon)["servers"] == []

        # With a holder: stopped as soon as the holder exits without a restore.
        holder = subprocess.Popen(["sleep", "60"])
        try:
            reply = daemon.call(CheckpointLazy(CheckpointRef(small.name), holder_pid=holder.pid))
            assert server(daemon, reply["server_id"])["holder_pid"] == holder.pid
        finally:
            holder.kill()
            holder.wait(10)
        ended = wait_ended(daemon, reply["server_id"], timeout=1.5)
        assert ended["outcome"] == "abandoned", ended
        assert not alive(reply["pid"]) and not Path(reply["work_dir"]).exists()
        assert users(daemon, small) == 0
        assert wait_for(lambda: daemon_fds(daemon, "anon_inode:[pidfd]") == baseline, 5, 0.05, "pidfds to be closed")


@pytest.mark.timeout(180)
def test_nothing_outlives_the_daemon(small):
    from cer.protocol.methods import CheckpointLazy, CheckpointLazyPut
    from cer.references import CheckpointRef

    with running_daemon(entries(small)) as daemon:
        replies = [daemon.call(CheckpointLazy(CheckpointRef(small.name))) for _ in range(2)]
        # One more that ends, so that cer starts a spare: that one must not outlive the daemon either.
        daemon.call(CheckpointLazyPut(daemon.call(CheckpointLazy(CheckpointRef(small.name)))["server_id"]))
        def two_and_a_spare():  # the given-back server ends a moment after the put answers
            servers = lazy_status(daemon)["servers"]
            spares = [s for s in servers if s["state"] in ("spare", "starting")]
            return servers if len(servers) == 3 and len(spares) == 1 else None

        servers = wait_for(two_and_a_spare, 10, 0.05, "two servers and a spare")
        pids = [s["pid"] for s in servers]
        assert {reply["pid"] for reply in replies} < set(pids)
        assert sorted(s["state"] in ("spare", "starting") for s in servers) == [False, False, True], servers
        assert users(daemon, small) == 3
        root = daemon.root
    assert not any(alive(pid) for pid in pids), "a lazy-pages server outlived the daemon"
    assert not (root / "lazy").exists()

    # A daemon killed with SIGKILL leaves its servers running; the next one on that ROOT ends them.
    daemon = start_daemon(entries(small))
    try:
        daemon.wait_full(small.name, ("ipc", "uts"), timeout=60)
        reply = daemon.call(CheckpointLazy(CheckpointRef(small.name)))
        daemon.stop(signal.SIGKILL)
        assert alive(reply["pid"]) and Path(reply["work_dir"]).exists()
        again = start_daemon(entries(small), root=daemon.root)
        try:
            assert not alive(reply["pid"]) and not Path(reply["work_dir"]).exists()
            assert "left by an earlier run" in again.output()
        finally:
            assert again.stop() == 0, again.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(reply["pid"], signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(daemon.root.parent)], timeout=60)


# --------------------------------------------------------------------------- what cannot be done

@pytest.mark.timeout(120)
def test_the_wrapper_says_when_lazy_restores_cannot_be_done(lazy_cer, small, runc, workdir):
    target = restorable(small, workdir / unique("refused"))
    before = lazy_status(lazy_cer)["counts"].get("handed_out", 0)
    argv = wrapper_argv(lazy_cer, runc, target, small, unique("refused"))

    def run(argv_: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv_, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=wrapper_env())

    # Stock containerd: ctr has no lazy-pages option.
    containerd = run([sys.executable, str(WRAPPER), "restore", "--endpoint", lazy_cer.endpoint, "--lazy", small.name, "x"])
    assert containerd.returncode == 4, containerd.stderr
    assert "--lazy needs --runtime runc: stock ctr has no option for lazy pages" in containerd.stderr
    # A kernel that refuses userfaultfd: here, root without CAP_SYS_PTRACE (vm.unprivileged_userfaultfd=0).
    assert Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "0"
    no_uffd = run(["setpriv", "--bounding-set", "-sys_ptrace", *argv])
    assert no_uffd.returncode == 4, no_uffd.stderr
    assert re.search(r"this kernel cannot restore lazily: userfaultfd\(2\) failed: Operation not permitted.*CAP_SYS_PTRACE",
                     no_uffd.stderr), no_uffd.stderr
    # --image-path: the server serves cer's images, the restore must read the same.
    image_path = run([*argv[:-2], f"--image-path={small.images}", *argv[-2:]])
    assert image_path.returncode == 2 and "drop --image-path" in image_path.stderr
    # A runc that has no --lazy-pages.
    old_runc = workdir / "old-runc"
    old_runc.write_text("#!/bin/sh\necho 'flag provided but not defined: -lazy-pages' >&2\nexit 1\n")
    old_runc.chmod(0o755)
    old = run([*argv[:-2], f"--runc={old_runc}", *argv[-2:]])
    assert old.returncode == 4 and "cannot restore lazily (it has no --lazy-pages)" in old.stderr, old.stderr

    assert lazy_status(lazy_cer)["counts"].get("handed_out", 0) == before + 1  # only the old runc's, given back
    ended = lazy_status(lazy_cer)["ended"][-1]
    assert ended["outcome"] == "released", ended
    assert [s for s in lazy_status(lazy_cer)["servers"] if s["state"] not in ("spare", "starting")] == []


@pytest.mark.timeout(60)
def test_a_daemon_without_criu_refuses_lazy_restores(tmp_path):
    from cer.errors import BadRequest, NotFound, Unavailable
    from cer.protocol.methods import CheckpointLazy, CheckpointLazyBind, CheckpointLazyPut
    from cer.references import CheckpointRef

    config = {"containerd_checkpoints": [{"name": "sample", "capacity": 1, "path": str(SAMPLE / "checkpoint-empty-ipc")}]}
    with running_daemon(config, "--criu", "/nonexistent/criu") as daemon:
        status = lazy_status(daemon)
        assert status["supported"] is False and "/nonexistent/criu" in status["unsupported_reason"]
        with pytest.raises(Unavailable, match="lazy restores are not available on this host: no CRIU"):
            daemon.call(CheckpointLazy(CheckpointRef("sample")))
        with pytest.raises(NotFound, match="no lazy-pages server 1-1"):
            daemon.call(CheckpointLazyPut("1-1"))
        with pytest.raises(NotFound):
            daemon.call(CheckpointLazyBind("1-1", os.getpid()))
        with daemon.client() as client:
            for params in ({"server_id": 7}, {"server_id": "../x"}, {"server_id": "1-1", "pid": 3}):
                with pytest.raises(BadRequest):
                    client.request("checkpoint", "lazy_put", params)
            with pytest.raises(BadRequest):
                client.request("checkpoint", "lazy_bind", {"server_id": "1-1", "restored_pid": 0})


@pytest.mark.timeout(60)
def test_lazy_servers_of_unknown_checkpoints_and_holders_are_refused(daemon):
    from cer.errors import NotFound
    from cer.protocol.methods import CheckpointLazy
    from cer.references import CheckpointRef

    with pytest.raises(NotFound, match="not configured"):
        daemon.call(CheckpointLazy(CheckpointRef("nobody")))
    gone = subprocess.Popen(["true"])
    gone.wait(10)
    with pytest.raises(NotFound, match=f"process {gone.pid} is not running"):
        daemon.call(CheckpointLazy(CheckpointRef("sample"), holder_pid=gone.pid))
    status = daemon.status()
    assert status["lazy"]["servers"] == [] and status["checkpoints"]["default/sample"]["users"] == 0


@pytest.mark.timeout(30)
def test_only_the_init_of_a_pid_namespace_other_than_the_daemons_leads_its_tasks():
    """What a bind of a container's init may be tied through (its namespace's restored tasks): never the
    host's init, never a process that is no namespace's init."""
    from cer.linux.proc import tasks_of_namespace_led_by as _tasks_of_namespace_led_by

    container = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        def init_and_tasks():
            children = Path(f"/proc/{container.pid}/task/{container.pid}/children").read_text().split()
            if not children:
                return None
            init = int(children[0])
            tasks = _tasks_of_namespace_led_by(init)
            # Until they have exec'ed, the children are copies of sh.
            sleeping = all(Path(f"/proc/{task}/cmdline").read_bytes().startswith(b"sleep") for task in tasks)
            return (init, tasks) if len(tasks) == 2 and sleeping else None

        init, tasks = wait_for(init_and_tasks, 10, 0.02, "the namespace's init and its two sleeping tasks")
        assert _tasks_of_namespace_led_by(tasks[0]) == []  # not an init
        assert _tasks_of_namespace_led_by(1) == []  # the daemon's own namespace
        assert _tasks_of_namespace_led_by(os.getpid()) == []
    finally:
        container.kill()
        container.wait(10)
