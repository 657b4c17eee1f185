"""A container whose SysV IPC is live at checkpoint time, restored by stock runc and CRIU into cer's
pre-filled IPC namespace (issue 12, item 6, IPC part).

tests/contrib/ipc-live-workload.c keeps a segment of several MiB attached and patterned, has two unattached
segments, semaphore sets with values, a queue of typed messages and changed IPC sysctls. It is checkpointed
by real ``runc checkpoint`` and restored through ``contrib/ctr-wrapper --runtime runc`` into cer's IPC
namespace, which already holds everything but the attached segment: CRIU, reading cer's view, creates that
one alone. The workload then checks every byte, value and message itself, through its own mapping and calls.
A stock ``runc restore`` of the same checkpoint (namespaces of its own) is the reference. runc, CRIU or gcc
missing is a failure, not a skip.
"""

import os
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import serving_daemon, short_tempdir, wait_for

import containerd_support
import criu_support
import runc_support
from runc_support import RuntimeSupportError

from cer.criu.images import IPCNS_MSG, IPCNS_SEM, IPCNS_SHM, ImageReader
from cer.criu.views import images_digest
from cer.protocol.methods import CheckpointPut, CheckpointRestore, NamespacePut
from cer.references import CheckpointRef

pytestmark = pytest.mark.slow

WORKLOAD = Path(__file__).with_name("ipc-live-workload.c")
ATTACHED_MIB, UNATTACHED_MIB, SEMAPHORES, MESSAGES = 8, 2, 140, 30
NAME = "live-ipc"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Checkpoint:
    images: Path
    bundle: runc_support.Bundle
    ids: dict[str, int]  # the segments' ids: attached, unattached, small


@pytest.fixture(scope="module")
def workdir():
    path = short_tempdir("cer-ipc-live-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], timeout=60)


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Checkpoint:
    try:
        runc_support.require("runc", "criu", "gcc", "nsenter")
    except RuntimeSupportError as error:
        pytest.fail(str(error))
    binary = containerd_support.build_static(WORKLOAD.read_text(), "ipc-live-workload", workdir / "build")
    bundle = runc_support.bundle_with_results(workdir / "original", binary,
                                              [str(ATTACHED_MIB), str(UNATTACHED_MIB), str(SEMAPHORES), str(MESSAGES), "/results"])
    images = workdir / "images"
    images.mkdir()
    with runc_support.private_runc() as runc:
        container_id = _unique("live")
        pid = runc.run_detached(bundle, container_id)
        # The workload's own check before the dump: what it reports after a restore is then about the restore.
        assert check(pid, workdir / "original" / "results", 1).startswith("OK 1 ")
        runc.checkpoint(container_id, images)
    return Checkpoint(images, bundle, _segment_ids(images))


def _segment_ids(images: Path) -> dict[str, int]:
    """The segments' ids as the checkpoint holds them, by the workload's keys."""
    with ImageReader(next(images.glob("ipcns-shm-*.img")), IPCNS_SHM) as image:
        by_key = {entry.desc.key: entry.desc.id for entry in image.entries()}
    return {"attached": by_key[0x4C495601], "unattached": by_key[0x4C495602], "small": by_key[0x4C495603]}


def check(pid: int, results: Path, round_: int, timeout: float = 60) -> str:
    """Ask the workload to check all its IPC; its report for that round."""
    os.kill(pid, signal.SIGUSR1)

    def reported():
        try:
            text = (results / "ipc-result").read_text().strip()
        except FileNotFoundError:
            return None
        return text if text.split()[1] == str(round_) else None

    return wait_for(reported, timeout, 0.01, f"process {pid} to report check {round_}")


@pytest.fixture
def cer(checkpoint):
    config = {"containerd_checkpoints": [{"name": NAME, "capacity": 1, "path": str(checkpoint.images)}]}
    with serving_daemon(config) as daemon:
        yield daemon


@pytest.fixture
def runc(private_runc, wrapper_work):
    return private_runc


def described(pid: int) -> dict:
    """The restored process's IPC namespace as seen from inside, without what differs between two live
    namespaces (their inode numbers)."""
    seen = criu_support.inspect_namespaces(f"/proc/{pid}/ns/ipc", f"/proc/{pid}/ns/uts")
    seen.pop("ns")
    return seen


def entries(path: Path, image_type) -> list:
    with ImageReader(path, image_type) as image:
        return list(image.entries())


@pytest.mark.timeout(300)
def test_live_ipc_survives_a_restore_into_cers_prefilled_namespace(cer, checkpoint, runc, workdir):
    # The reference: stock runc, namespaces of its own, the checkpoint's own images.
    reference_dir, reference_results = runc_support.restore_bundle(checkpoint.bundle, workdir / _unique("reference"))
    reference_id = _unique("reference")
    reference_pid = runc.restore(reference_id, reference_dir, checkpoint.images)
    # The workload counts its checks across the dump: the first after a restore is its second.
    assert check(reference_pid, reference_results, 2).startswith("OK 2 "), "the stock restore itself lost IPC"
    reference = described(reference_pid)
    runc.delete(reference_id)

    # Through cer: the wrapper's one request, cer's IPC and UTS namespaces, cer's view of the images.
    target_dir, target_results = runc_support.restore_bundle(checkpoint.bundle, workdir / _unique("cer"))
    container_id = _unique("cer")
    restored = runc_support.restore_through_wrapper(cer.endpoint, runc, target_dir, "--external-ns", "ipc",
                                                    "--external-ns", "uts", "--external-checkpoint", NAME, container_id)
    pid = restored["pid"]

    # Its namespaces are cer's (cer holds its fds of them, so the paths still name them).
    for ns_type in ("ipc", "uts"):
        assert os.stat(f"/proc/{pid}/ns/{ns_type}").st_ino == os.stat(restored["namespaces"][ns_type]).st_ino, ns_type
    # CRIU created the attached segment alone: the view's IPC images hold nothing else.
    view = Path(restored["checkpoint"])
    assert [e.desc.id for e in entries(next(view.glob("ipcns-shm-*.img")), IPCNS_SHM)] == [checkpoint.ids["attached"]]
    assert entries(next(view.glob("ipcns-sem-*.img")), IPCNS_SEM) == []
    assert entries(next(view.glob("ipcns-msg-*.img")), IPCNS_MSG) == []

    # The workload finds every byte, value and message, twice (its check leaves everything in place).
    report = check(pid, target_results, 2)
    assert report.startswith(f"OK 2 attached={ATTACHED_MIB << 20} "), report
    assert f"semaphores={SEMAPHORES} messages={MESSAGES}" in report
    assert check(pid, target_results, 3).startswith("OK 3 ")
    # The same namespace contents as the stock restore's, object by object (ids, keys, modes, bytes, values,
    # messages, sysctls, host name).
    assert described(pid) == reference
    shm = {segment["id"]: segment["nattch"] for segment in reference["shm"]}
    assert shm == {checkpoint.ids["attached"]: 1, checkpoint.ids["unattached"]: 0, checkpoint.ids["small"]: 0}

    runc.delete(container_id)
    wait_for(lambda: cer.pool(NAME)["types"]["ipc"]["in_use"] == 0, what="cer to take its IPC namespace back")
    assert cer.status()["checkpoints"][f"default/{NAME}"]["users"] == 0


@pytest.mark.timeout(180)
def test_without_the_view_stock_criu_collides_with_the_prefilled_namespace(cer, checkpoint, runc, workdir):
    """Why the view exists: cer's namespace really holds the objects, and CRIU given the checkpoint's own
    images fails to create them again (``File exists``)."""
    taken = cer.call(CheckpointRestore(None, ("ipc",), os.getpid(), images_digest(checkpoint.images)))
    ipc = taken["namespaces"]["ipc"]
    try:
        assert ipc["info"]["ipc"]["left_to_restore"] == [checkpoint.ids["attached"]]
        assert checkpoint.ids["unattached"] in ipc["info"]["ipc"]["shm"]
        bundle_dir, _ = runc_support.restore_bundle(checkpoint.bundle, workdir / _unique("collide"), {"ipc": ipc["path"]})
        with pytest.raises(RuntimeSupportError, match="File exists"):
            runc.restore(_unique("collide"), bundle_dir, checkpoint.images)
    finally:
        cer.call(NamespacePut("ipc", ipc["namespace_id"], ipc["pid"]))
        cer.call(CheckpointPut(CheckpointRef(NAME)))
