"""pids from outside: only a running process opens as a pidfd; a thread's id, or no id at all, is not found
(ProcessLookupError here, ``not_found`` on the protocol), never an internal error."""

import os
import subprocess
import threading

import pytest

from cer.errors import NotFound
from cer.linux.processes import pidfd_open
from cer.protocol.methods import NamespaceBind, NamespaceGet, NamespacePut
from cer.references import CheckpointRef


@pytest.fixture
def thread_id():
    """The id of a live thread of this process: a tid, which names no process."""
    started, done = threading.Event(), threading.Event()
    ids = []

    def run() -> None:
        ids.append(threading.get_native_id())
        started.set()
        done.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(10)
    yield ids[0]
    done.set()
    thread.join(10)


def test_a_running_process_opens():
    child = subprocess.Popen(["sleep", "30"])
    try:
        os.close(pidfd_open(child.pid))
    finally:
        child.kill()
        child.wait(10)


def test_ids_that_name_no_process_are_not_found(thread_id):
    # A thread's id, no id at all, and an id past a C int that ctypes would wrap onto this very process.
    for pid in (thread_id, 0, -1, 2**32 + os.getpid()):
        with pytest.raises(ProcessLookupError):
            os.close(pidfd_open(pid))


def test_a_holder_pid_naming_a_thread_is_not_found(daemon, thread_id):
    sample = CheckpointRef("sample")
    daemon.wait_full("sample", ("uts",))  # a get before the pool loaded answers unavailable
    with pytest.raises(NotFound, match=f"process {thread_id}"):
        daemon.call(NamespaceGet("uts", sample, holder_pid=thread_id))
    reply = daemon.call(NamespaceGet("uts", sample))
    with pytest.raises(NotFound, match=f"process {thread_id}"):
        daemon.call(NamespaceBind("uts", reply["namespace_id"], thread_id))
    daemon.call(NamespaceBind("uts", reply["namespace_id"], os.getpid()))  # the process itself binds
    daemon.call(NamespacePut("uts", reply["namespace_id"], reply["pid"]))


@pytest.mark.timeout(30)
def test_wait_exited_waits_for_all_at_once_and_only_up_to_its_timeout():
    import time

    from cer.linux.processes import has_exited, wait_exited

    quick = [subprocess.Popen(["sleep", "0.5"]) for _ in range(3)]
    slow = subprocess.Popen(["sleep", "30"])
    pidfds = {pidfd_open(process.pid): process for process in (*quick, slow)}
    try:
        started = time.monotonic()
        exited = wait_exited(pidfds, 2.0)
        spent = time.monotonic() - started
        assert {pidfds[fd] for fd in exited} == set(quick)
        assert 2.0 <= spent < 3.0  # the three exits are one wait, and the slow one costs the timeout once
        assert not has_exited(next(fd for fd, process in pidfds.items() if process is slow))
    finally:
        slow.kill()
        for fd, process in pidfds.items():
            process.wait(10)
            os.close(fd)
