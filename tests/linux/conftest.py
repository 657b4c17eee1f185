"""Fixtures for cer.linux tests: fresh namespaces made the way the daemon's factory makes them."""

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from cer.linux.libc import check, libc  # noqa: E402

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000


@dataclass
class ThreadNamespaces:
    """What ``in_fresh_namespaces`` made: the function's result, and paths (through this
    process's fds) to the IPC and UTS namespaces, which outlive the thread."""

    result: object
    ipc: str
    uts: str


@pytest.fixture
def in_fresh_namespaces():
    """``run(fn)``: in a new thread, unshare IPC and UTS namespaces, call ``fn()`` there and keep
    both namespaces open (until the test ends). ``fn``'s exception is raised in the caller."""
    fds = []

    def run(fn) -> ThreadNamespaces:
        outcome = {}

        def body():
            try:
                check(libc.unshare(CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
                outcome["result"] = fn()
                for kind in ("ipc", "uts"):
                    fd = os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                    fds.append(fd)
                    outcome[kind] = f"/proc/{os.getpid()}/fd/{fd}"
            except BaseException as e:  # re-raised in the test's thread
                outcome["error"] = e

        thread = threading.Thread(target=body, name="test-namespace")
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "namespace thread hung"
        if "error" in outcome:
            raise outcome["error"]
        return ThreadNamespaces(outcome["result"], outcome["ipc"], outcome["uts"])

    yield run
    for fd in fds:
        os.close(fd)
