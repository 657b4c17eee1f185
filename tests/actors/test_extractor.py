"""The checkpoint extractor actor against a fake containerd: a gRPC server speaking the same Images and
Content services (cer's own stubs, containerd's names) from memory, which can be absent, slow, or break
a read halfway. The real containerd is in tests/containerd/; here the timing is under the test's control.

The fake's checkpoint holds the bundled sample CRIU images and no base image, so it has no rootfs.
"""

import hashlib
import io
import json
import os
import queue
import tarfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import pykka
import pytest
from conftest import SAMPLE, short_tempdir

from cer.actors.extractor import CheckpointExtractor, RetryPolicy
from cer.config import CheckpointEntry
from cer.containerd.api import content_pb2, content_pb2_grpc, descriptor_pb2, images_pb2, images_pb2_grpc
from cer.containerd.archive import READY_MARKER
from cer.containerd.checkpoint_image import CRIU_ARCHIVE
from cer.criu.checkpoint import read_checkpoint
from cer.errors import NotFound, Unavailable
from cer.references import CheckpointRef

INDEX = "application/vnd.oci.image.index.v1+json"
CHUNK = 64 * 1024


def blob(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def tar_of(directory: Path, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(directory.iterdir()):
            archive.add(path, arcname=path.name)
        for info in extra:
            archive.addfile(info)
    return buffer.getvalue()


class FakeContainerd(images_pb2_grpc.ImagesServicer, content_pb2_grpc.ContentServicer):
    """Images.Get and Content.Read from dictionaries, on a unix socket, checking the namespace header."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.images: dict[tuple[str, str], descriptor_pb2.Descriptor] = {}
        self.blobs: dict[str, bytes] = {}
        self.reads: dict[str, int] = {}
        self.get_delay = 0.0
        self.break_reads = 0  # this many reads of a big blob fail halfway with UNAVAILABLE
        self.read_delay = 0.0
        self._server = None

    def add_blob(self, data: bytes, media_type: str) -> dict:
        self.blobs[blob(data)] = data
        return {"mediaType": media_type, "digest": blob(data), "size": len(data)}

    def add_image(self, namespace: str, name: str, target: dict) -> None:
        self.images[namespace, name] = descriptor_pb2.Descriptor(
            media_type=target["mediaType"], digest=target["digest"], size=target["size"]
        )

    def add_checkpoint(self, namespace: str, name: str, archive: bytes, media_type: str = CRIU_ARCHIVE) -> str:
        part = self.add_blob(archive, media_type)
        index = json.dumps({"schemaVersion": 2, "manifests": [part], "annotations": {}}).encode()
        self.add_image(namespace, name, self.add_blob(index, INDEX))
        return part["digest"]

    def start(self) -> "FakeContainerd":
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        images_pb2_grpc.add_ImagesServicer_to_server(self, self._server)
        content_pb2_grpc.add_ContentServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{self.address}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)

    @staticmethod
    def _namespace(context) -> str:
        return dict(context.invocation_metadata()).get("containerd-namespace", "")

    def Get(self, request, context):
        time.sleep(self.get_delay)
        target = self.images.get((self._namespace(context), request.name))
        if target is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f'image "{request.name}": not found')
        return images_pb2.GetImageResponse(image=images_pb2.Image(name=request.name, target=target))

    def Read(self, request, context):
        data = self.blobs.get(request.digest)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        self.reads[request.digest] = self.reads.get(request.digest, 0) + 1
        breaking = len(data) > 1 << 20 and self.break_reads > 0
        if breaking:
            self.break_reads -= 1
        for offset in range(0, len(data), CHUNK):
            if breaking and offset >= len(data) // 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset halfway")
            time.sleep(self.read_delay)
            yield content_pb2.ReadContentResponse(offset=offset, data=data[offset:offset + CHUNK])


class RecordingPool(pykka.ThreadingActor):
    """Stands in for a PoolActor: records what the extractor tells it."""

    def __init__(self, events: queue.Queue) -> None:
        super().__init__()
        self._events = events

    def recipe_loaded(self, recipe, error) -> None:
        self._events.put(("loaded", recipe, error))

    def checkpoint_unavailable(self, reason: str) -> None:
        self._events.put(("unavailable", reason))


def next_event(events: queue.Queue, kind: str, timeout: float = 20.0):
    """The next event of ``kind``, skipping others; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            event = events.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            pytest.fail(f"no {kind!r} event within {timeout} s")
        if event[0] == kind:
            return event


def next_wait_for_containerd(events: queue.Queue) -> str:
    """The reason of the next 'unavailable' event that says the extractor waits for containerd (it may say
    other things first)."""
    reason = ""
    while "waiting for containerd" not in reason:
        reason = next_event(events, "unavailable")[1]
    return reason


@pytest.fixture
def place():
    directory = short_tempdir("cer-fake-")
    yield directory
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fake(place):
    server = FakeContainerd(str(place / "c.sock"))
    yield server
    server.stop()


SAMPLE_TAR = tar_of(SAMPLE / "checkpoint")
REF = CheckpointRef("ckpt", "cer-test")
ENTRY = CheckpointEntry(REF, capacity=1)


def start_extractor(place, fake, **kwargs):
    kwargs.setdefault("retry", RetryPolicy(0.05, 0.2))
    kwargs.setdefault("containerd_timeout", 2.0)
    return CheckpointExtractor.start(str(place / "root"), fake.address, **kwargs).proxy()


def start_pool():
    events = queue.Queue()
    return RecordingPool.start(events).proxy(), events


def test_one_extraction_serves_every_pool_and_client(place, fake):
    criu = fake.add_checkpoint("cer-test", "ckpt", SAMPLE_TAR)
    fake.read_delay = 0.002  # slow enough that both pools ask while it runs
    fake.start()
    extractor = start_extractor(place, fake)
    (first, first_events), (second, second_events) = start_pool(), start_pool()
    extractor.load_recipe(ENTRY, first)
    extractor.load_recipe(ENTRY, second)
    with pytest.raises(Unavailable, match=r"not extracted yet: (extracting|loading)"):
        extractor.get(REF).get(timeout=5)

    for events in (first_events, second_events):
        _, recipe, error = next_event(events, "loaded")
        assert error is None
        assert recipe.uts.nodename == "cer-sample" and len(recipe.ipc.shm) == 2
        assert recipe.rootfs is None  # the fake's checkpoint names no base image
    assert fake.reads[criu] == 1

    directory = Path(extractor.get(REF).get(timeout=5))
    assert directory == place / "root" / "checkpoint" / REF.key
    expected = sorted(os.listdir(SAMPLE / "checkpoint"))
    assert sorted(os.listdir(directory)) == sorted([*expected, READY_MARKER])
    for name in expected:
        assert (directory / name).read_bytes() == (SAMPLE / "checkpoint" / name).read_bytes()
    assert read_checkpoint(directory).uts.nodename == "cer-sample"
    assert extractor.put(REF).get(timeout=5) == 0
    with pytest.raises(NotFound):
        extractor.put(REF).get(timeout=5)

    # A pool that comes later (one that was restarted) hears at once, without another read.
    late, late_events = start_pool()
    extractor.load_recipe(ENTRY, late)
    assert next_event(late_events, "loaded")[2] is None
    assert fake.reads[criu] == 1
    status = extractor.status().get(timeout=5)[str(REF)]
    assert status["state"] == "ready" and status["extracted_bytes"] == status["archive_bytes"] == len(SAMPLE_TAR)


def test_containerd_absent_then_there(place, fake):
    fake.add_checkpoint("cer-test", "ckpt", SAMPLE_TAR)
    extractor = start_extractor(place, fake)
    pool, events = start_pool()
    extractor.load_recipe(ENTRY, pool)
    reason = next_wait_for_containerd(events)
    assert fake.address in reason
    with pytest.raises(Unavailable, match="waiting for containerd"):
        extractor.get(REF).get(timeout=5)
    next_event(events, "unavailable")  # it tries again, and says so again
    assert extractor.status().get(timeout=5)[str(REF)]["attempts"] >= 2

    fake.start()
    _, recipe, error = next_event(events, "loaded")
    assert error is None and recipe.uts.nodename == "cer-sample"


def test_a_slow_containerd_is_waited_for(place, fake):
    fake.add_checkpoint("cer-test", "ckpt", SAMPLE_TAR)
    fake.get_delay = 1.5
    fake.start()
    extractor = start_extractor(place, fake, containerd_timeout=0.3)
    pool, events = start_pool()
    extractor.load_recipe(ENTRY, pool)
    reason = next_wait_for_containerd(events)
    assert "deadline_exceeded" in reason
    # The actor's own thread never waits on gRPC: it answers while a call hangs.
    started = time.monotonic()
    extractor.status().get(timeout=5)
    assert time.monotonic() - started < 0.2
    fake.get_delay = 0.0
    assert next_event(events, "loaded")[2] is None


def test_a_read_broken_halfway_leaves_no_extraction_and_is_retried(place, fake):
    big = SAMPLE / "checkpoint"
    archive = tar_of(big) + b"\0" * (2 << 20)  # padding past the end marker: big enough to break halfway
    criu = fake.add_checkpoint("cer-test", "ckpt", archive)
    fake.break_reads = 1
    fake.start()
    extractor = start_extractor(place, fake)
    pool, events = start_pool()
    extractor.load_recipe(ENTRY, pool)
    reason = next_wait_for_containerd(events)
    assert "connection reset halfway" in reason
    assert next_event(events, "loaded")[2] is None
    assert fake.reads[criu] == 2
    base = place / "root" / "checkpoint"
    assert os.listdir(base) == [REF.key]  # no partial directory left
    assert (base / REF.key / READY_MARKER).read_text().strip() == criu


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda fake: None, "there is no checkpoint image 'ckpt' in containerd namespace 'cer-test'"),
        (lambda fake: fake.add_image("cer-test", "ckpt", fake.add_blob(b"{}", "application/vnd.oci.image.manifest.v1+json")),
         "is not a checkpoint: its target is application/vnd.oci.image.manifest.v1+json"),
        (lambda fake: fake.add_checkpoint("cer-test", "ckpt", SAMPLE_TAR, media_type="application/octet-stream"),
         "holds 0 CRIU archives"),
        (lambda fake: fake.add_image("cer-test", "ckpt", fake.add_blob(b"not json", INDEX)), "is not valid JSON"),
        (lambda fake: fake.add_checkpoint("cer-test", "ckpt", tar_of(SAMPLE / "checkpoint", [_symlink("escape", "/etc")])),
         "member 'escape' is a symbolic link"),
        (lambda fake: fake.add_checkpoint("cer-test", "ckpt", tar_of(SAMPLE / "rootfs" / "etc")),
         "holds no CRIU inventory.img"),
    ],
    ids=["unknown", "not-an-index", "no-criu-archive", "bad-index", "hostile-archive", "not-criu-images"],
)
def test_unusable_checkpoints_fail_their_pool(place, fake, setup, message):
    setup(fake)
    fake.add_checkpoint("cer-test", "other", SAMPLE_TAR)
    fake.start()
    extractor = start_extractor(place, fake)
    pool, events = start_pool()
    extractor.load_recipe(ENTRY, pool)
    _, recipe, error = next_event(events, "loaded")
    assert recipe is None
    assert any(part in error for part in message.split("|")), error
    with pytest.raises(Unavailable, match="unusable"):
        extractor.get(REF).get(timeout=5)
    assert not (place / "root" / "checkpoint" / REF.key / READY_MARKER).exists()
    # A failed pool is told again on a reload, and another checkpoint is not affected.
    extractor.load_recipe(ENTRY, pool)
    assert next_event(events, "loaded")[2] == error
    extractor.load_recipe(CheckpointEntry(CheckpointRef("other", "cer-test"), 1), pool)
    assert next_event(events, "loaded")[2] is None


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_start_removes_what_is_not_a_whole_configured_extraction(place, fake):
    criu = fake.add_checkpoint("cer-test", "ckpt", SAMPLE_TAR)
    fake.start()
    extractor = start_extractor(place, fake, configured=[REF])
    pool, events = start_pool()
    extractor.load_recipe(ENTRY, pool)
    assert next_event(events, "loaded")[2] is None
    extractor.actor_ref.stop()
    base = place / "root" / "checkpoint"
    gone = CheckpointRef("no-longer-configured", "cer-test").key
    (base / gone).mkdir()
    (base / gone / READY_MARKER).write_text("sha256:" + "0" * 64)
    (base / f".partial-{REF.key}-0badc0de").mkdir()

    reads = fake.reads[criu]
    again = start_extractor(place, fake, configured=[REF])
    pool, events = start_pool()
    again.load_recipe(ENTRY, pool)
    assert next_event(events, "loaded")[2] is None
    assert sorted(os.listdir(base)) == [REF.key]
    assert fake.reads[criu] == reads  # whole already: not extracted again
    assert again.get(REF).get(timeout=5) == str(base / REF.key)


def test_without_a_root_containerd_entries_are_unavailable():
    extractor = CheckpointExtractor.start().proxy()
    pool, events = start_pool()
    extractor.load_recipe(ENTRY, pool)
    assert "give the entry a path" in next_event(events, "unavailable")[1]


class Borrower(pykka.ThreadingActor):
    """Stands in for the lazy-pages actor: records what ``CheckpointExtractor.lend`` tells it."""

    def __init__(self, answers: queue.Queue) -> None:
        super().__init__()
        self._answers = answers

    def lent(self, token, ref, directory, error) -> None:
        self._answers.put((token, ref, directory, error))


@pytest.mark.timeout(30)
def test_lend_answers_by_a_message_and_takes_back_a_user_nobody_is_there_to_take():
    entry = CheckpointEntry(CheckpointRef("sample"), 1, str(SAMPLE / "checkpoint"))
    extractor = CheckpointExtractor.start().proxy()
    pool, events = start_pool()
    extractor.load_recipe(entry, pool)
    assert next_event(events, "loaded")[2] is None

    answers: queue.Queue = queue.Queue()
    borrower = Borrower.start(answers).proxy()
    extractor.lend(entry.ref, borrower.lent, "first")
    assert answers.get(timeout=5) == ("first", entry.ref, str(SAMPLE / "checkpoint"), None)
    extractor.lend(CheckpointRef("nobody"), borrower.lent, "second")
    token, _, directory, error = answers.get(timeout=5)
    assert (token, directory, type(error)) == ("second", None, NotFound)

    gone = Borrower.start(queue.Queue()).proxy()
    lent = gone.lent
    gone.actor_ref.stop(block=True)
    extractor.lend(entry.ref, lent, "third")
    # Told in order: by the time status answers, the lend to the stopped borrower was handled.
    assert extractor.status().get(timeout=5)[str(entry.ref)]["users"] == 1  # only the first's
