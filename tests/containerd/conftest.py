"""One private containerd for the package's tests, and a checkpoint image made in it.

The tests need containerd, runc and CRIU 4: where they are missing they fail with the reason (CI runs
contrib/install-deps first), they never skip.
"""

import pytest

import containerd_support

CHECKPOINT = "cer-ckpt"


@pytest.fixture(scope="package")
def containerd():
    problem = containerd_support.require_tools()
    if problem:
        pytest.fail(problem)
    daemon = containerd_support.PrivateContainerd()
    try:
        yield daemon.start()
    finally:
        daemon.close()


@pytest.fixture(scope="package")
def checkpoint(containerd):
    """A checkpoint of a container whose IPC namespace holds SysV objects (host name cer-ctd-test), with
    files changed in its rw layer."""
    workload = containerd_support.container_ipc_workload(containerd.dir / "build")
    return containerd_support.make_checkpoint(containerd, CHECKPOINT, workload=workload)


@pytest.fixture
def running(containerd):
    """containerd, started again should a test have left it stopped."""
    containerd.start()
    return containerd
