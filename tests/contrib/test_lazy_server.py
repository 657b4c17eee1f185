"""cer's own lazy-pages server (cer.lazy.server) end to end: real runc and CRIU restores of a self-checking
workload (tests/contrib/lazy-workload.c), the working set it records and serves first, and what it does
with bad input on its socket.

The workload's SIGUSR2 round makes the kernel report a fork, an mremap, a madvise(DONTNEED) and a munmap to
the server while pages are still missing, and checks every page afterwards (the forked child checks every
page too, through a userfaultfd of its own). tests/contrib/test_lazy.py runs the rest of the lifecycle
(servers killed mid-restore, deadlines, holders, leftovers) against this server, cer's default.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_for
from lazy_support import (  # noqa: F401 (fixtures: workdir, binary, small, runc)
    Checkpoint, Restorable, binary, check_memory, daemon_fds, entries, lazy_status, restorable, restore_lazily, runc,
    running_daemon, small, unique, wait_ended, workdir, wrapper_argv,
)
from runc_support import wrapper_env

# Every test runs the wrapper: its work directories go to a private place (contrib/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("wrapper_work")]


def events_round(pid: int, where: Restorable, timeout: float = 60) -> str:
    """Fork, mremap, madvise and munmap in the restored workload, then every page checked: its report."""
    os.kill(pid, signal.SIGUSR2)
    path = where.results / "lazy-events"
    return wait_for(lambda: path.exists() and path.read_text().strip(), timeout, 0.01, f"process {pid}'s events round")


def stats_of(daemon, server_id: str) -> dict:
    ended = wait_ended(daemon, server_id, timeout=60)
    assert ended["outcome"] == "completed", ended
    assert ended["server"] == "cer" and ended["stats"] is not None, ended
    return ended["stats"]


def working_sets(daemon) -> dict:
    return lazy_status(daemon)["working_sets"]


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cer", *args, "--endpoint", daemon.endpoint], capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def cer_daemon(small):
    with running_daemon(entries(small)) as daemon:
        yield daemon


@pytest.mark.timeout(300)
def test_first_restore_records_the_working_set_and_later_ones_get_it_first(cer_daemon, small, runc, workdir):
    ref = f"default/{small.name}"
    assert working_sets(cer_daemon) == {}
    # First restore: no working set yet. Fork, mremap, madvise and munmap while most pages are missing.
    first = restorable(small, workdir / unique("first"))
    result = restore_lazily(cer_daemon, runc, first, small)
    assert events_round(result["pid"], first) == f"EVENTS 1 OK pages={small.pages}", first.result()
    assert check_memory(result["pid"], first, 1).startswith(f"OK 1 pages={small.pages} "), first.result()
    recorded = stats_of(cer_daemon, result["lazy"]["server_id"])
    assert recorded["working_set"] == "recorded" and recorded["forks"] == 1, recorded
    assert recorded["faults"] >= small.pages, recorded  # every page the check read came on a fault
    sets = working_sets(cer_daemon)
    assert sets[ref]["pages"] == recorded["working_set_pages"] > small.pages // 2, sets
    assert daemon_fds(cer_daemon, "anon_inode:[userfaultfd]") == 0

    # Later restores, two at once: the recorded pages arrive before the workload asks for them.
    targets = [restorable(small, workdir / unique("later")) for _ in range(2)]
    processes = [subprocess.Popen(wrapper_argv(cer_daemon, runc, target, small, unique("later")),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=wrapper_env()) for target in targets]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    for later, target in zip(results, targets, strict=True):
        assert events_round(later["pid"], target) == f"EVENTS 1 OK pages={small.pages}", target.result()
        assert check_memory(later["pid"], target, 1).startswith(f"OK 1 pages={small.pages} "), target.result()
    for later in results:
        used = stats_of(cer_daemon, later["lazy"]["server_id"])
        assert used["working_set"] == "used" and used["pages_working_set"] > small.pages // 2, used
        assert used["faults"] * 10 <= recorded["faults"], (used, recorded)
    for later, target in zip(results, targets, strict=True):
        assert check_memory(later["pid"], target, 2).startswith("OK 2 "), target.result()
    assert working_sets(cer_daemon)[ref]["pages"] == sets[ref]["pages"], "a later restore re-recorded the set"

    # Forgotten (protocol call through the CLI): the next restore records again.
    forgot = cli(cer_daemon, "checkpoint", "forget-working-set", small.name)
    assert forgot.returncode == 0 and forgot.stdout.strip() == "forgotten", forgot.stderr
    assert ref not in working_sets(cer_daemon)
    again = cli(cer_daemon, "checkpoint", "forget-working-set", small.name)
    assert again.returncode == 0 and again.stdout.strip() == "no working set was recorded", again.stderr
    # A server by hand (cer checkpoint lazy), shown in the status table, given back.
    from cer.protocol.methods import CheckpointLazyPut

    by_hand = cli(cer_daemon, "checkpoint", "lazy", small.name)
    assert by_hand.returncode == 0, by_hand.stderr
    reply = json.loads(by_hand.stdout)
    assert Path(reply["socket"]).exists() and reply["images"] == str(small.images)
    table = cli(cer_daemon, "status")
    assert table.returncode == 0 and "lazy-pages servers (cer)" in table.stdout, table.stdout
    assert reply["server_id"] in table.stdout and "waiting" in table.stdout, table.stdout
    assert cer_daemon.call(CheckpointLazyPut(reply["server_id"]))["state"] == "released"
    assert lazy_status(cer_daemon)["criu_kdat_cached"] in (True, False)


@pytest.mark.timeout(300)
def test_a_working_set_that_does_not_fit_costs_only_faults(cer_daemon, small, runc, workdir):
    from cer.lazy import working_set as ws

    ref = f"default/{small.name}"
    path = ws.path_for(str(cer_daemon.root), ref)
    # Recorded from other images: ignored, recorded anew.
    ws.write(path, ws.WorkingSet(ref, "0" * 64, time.time(), 1.0, ((1, 0x1000),)))
    target = restorable(small, workdir / unique("other"))
    result = restore_lazily(cer_daemon, runc, target, small)
    assert check_memory(result["pid"], target, 1).startswith(f"OK 1 pages={small.pages} "), target.result()
    stats = stats_of(cer_daemon, result["lazy"]["server_id"])
    assert stats["working_set"] == "recorded", stats
    fingerprint = ws.read(path).fingerprint
    assert fingerprint != "0" * 64

    # The right images, the wrong pages: unaligned, unmapped, another task's, the kernel's half, duplicates.
    pid = next(iter(ws.read(path).by_task()))
    wrong = ((pid, 0x1234), (pid, 0x1000), (pid + 999, 0x7F0000000000), (pid, 0xFFFFFFFFFFFFF000), (pid, 0x1000),
             (0, 0))
    ws.write(path, ws.WorkingSet(ref, fingerprint, time.time(), 1.0, wrong))
    target = restorable(small, workdir / unique("wrong"))
    result = restore_lazily(cer_daemon, runc, target, small)
    assert events_round(result["pid"], target) == f"EVENTS 1 OK pages={small.pages}", target.result()
    assert check_memory(result["pid"], target, 1).startswith(f"OK 1 pages={small.pages} "), target.result()
    stats = stats_of(cer_daemon, result["lazy"]["server_id"])
    # Nothing of it was a page to copy: every page came on a fault or in the background, intact.
    assert stats["working_set"] == "used" and stats["pages_working_set"] == 0, stats
    assert stats["pages_on_fault"] + stats["pages_background"] >= small.pages, stats

    # Garbage in the file: ignored, recorded anew.
    Path(path).write_bytes(os.urandom(4096))
    target = restorable(small, workdir / unique("garbage"))
    result = restore_lazily(cer_daemon, runc, target, small)
    assert check_memory(result["pid"], target, 1).startswith(f"OK 1 pages={small.pages} "), target.result()
    assert stats_of(cer_daemon, result["lazy"]["server_id"])["working_set"] == "recorded"
    assert ws.read(path).fingerprint == fingerprint


@pytest.mark.timeout(240)
def test_criu_lazy_pages_stays_as_the_fallback(small, runc, workdir):
    with running_daemon(entries(small), "--lazy-server", "criu") as daemon:
        target = restorable(small, workdir / unique("criu"))
        result = restore_lazily(daemon, runc, target, small)
        assert check_memory(result["pid"], target, 1).startswith(f"OK 1 pages={small.pages} "), target.result()
        ended = wait_ended(daemon, result["lazy"]["server_id"])
        assert ended["outcome"] == "completed" and ended["server"] == "criu" and ended["stats"] is None, ended
        assert lazy_status(daemon)["server"] == "criu" and working_sets(daemon) == {}


# --------------------------------------------------------------------------- the socket as a boundary

class Server:
    """``python -m cer.lazy.server`` run by hand on a checkpoint, with a work directory of its own."""

    def __init__(self, images: Path, work: Path) -> None:
        work.mkdir()
        self.work = work
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cer.lazy.server", "lazy-pages", "-D", str(images), "-W", str(work)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: (work / "lazy-pages.socket").exists() or self.process.poll() is not None, 30, 0.01,
                 "the server's socket")

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(self.work / "lazy-pages.socket"))
        return client

    def error(self) -> str:
        """Waits (bounded) for the server to exit non-zero; its error line."""
        assert self.process.wait(15) == 1, self.log()
        return next(line for line in self.log().splitlines() if "Error: " in line).split("Error: ", 1)[1]

    def log(self) -> str:
        return (self.work / "lazy-pages.log").read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def _task_pid(checkpoint: Checkpoint) -> int:
    from cer.criu import images

    return images.read_entries(checkpoint.images / "pstree.img", images.PSTREE)[0].pid


def _userfaultfd() -> int:
    from cer.linux.libc import libc

    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0
    return fd


def _send(client: socket.socket, pid: int, fd: int | None) -> None:
    client.sendall(struct.pack("=i", pid))
    if fd is not None:
        client.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", fd))])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, expected", [
    ("hang up at once", "the restore closed the connection before it finished"),
    ("a pid not in the checkpoint", "the restore sent pid 999999, which is not a task of this checkpoint"),
    ("a pipe for a userfaultfd", "not a userfaultfd"),
    ("a pid without its fd", "pid came without its userfaultfd"),
    ("a wrong 'finished'", "expected the restore's 'finished' (0x52535446), got 0xdeadbeef"),
    ("more after 'finished'", "unexpected bytes after the restore finished"),
    ("two fds for one task", "file descriptor(s) more than it has tasks"),
])
def test_bad_input_on_the_socket_ends_the_server_with_a_clear_error(small, tmp_path, case, expected):
    pid = _task_pid(small)
    server = Server(small.images, tmp_path / "work")
    try:
        client = server.connect()
        read_end, write_end = os.pipe()
        uffd = _userfaultfd()
        try:
            if case == "a pid not in the checkpoint":
                _send(client, 999999, uffd)
            elif case == "a pipe for a userfaultfd":
                _send(client, pid, read_end)
            elif case == "a pid without its fd":
                client.sendall(struct.pack("=i", pid) + b"\0")
            elif case == "a wrong 'finished'":
                _send(client, pid, uffd)
                client.sendall(struct.pack("=I", 0xDEADBEEF))
            elif case == "more after 'finished'":
                _send(client, pid, uffd)
                client.sendall(struct.pack("=I", 0x52535446) + b"junk")
            elif case == "two fds for one task":
                client.sendall(struct.pack("=i", pid))
                client.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=ii", uffd, read_end))])
            client.close()
            assert expected in server.error()
        finally:
            for fd in (read_end, write_end, uffd):
                os.close(fd)
        # One restore per server: nobody else gets in, and the server left nothing running.
        assert server.process.poll() == 1
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_a_server_without_images_says_so_and_never_listens(tmp_path):
    (tmp_path / "images").mkdir()
    server = Server(tmp_path / "images", tmp_path / "work")
    try:
        assert "pstree.img" in server.error()
        assert not (tmp_path / "work" / "lazy-pages.socket").exists()
    finally:
        server.stop()
