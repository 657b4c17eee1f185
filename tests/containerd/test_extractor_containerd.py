"""The extractor actor in this process against the real containerd: what it leaves in containerd, and when.

A pool that goes away (``release``) takes the checkpoint's snapshots, lease and extraction with it; a
stopping extractor removes the snapshots and lease of every checkpoint and keeps the extractions.
"""

import queue
import threading
import time

import pykka
import pytest

from cer.actors.extractor import CheckpointExtractor, RetryPolicy, _Attempt
from cer.containerd.archive import Progress
from cer.config import CheckpointEntry
from cer.containerd.archive import READY_MARKER
from cer.references import CheckpointRef

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Recorder(pykka.ThreadingActor):
    def __init__(self, events: queue.Queue) -> None:
        super().__init__()
        self._events = events

    def recipe_loaded(self, recipe, error) -> None:
        self._events.put((recipe, error))

    def checkpoint_unavailable(self, reason: str) -> None:
        pass


def loaded(extractor, entry, timeout: float = 60):
    events = queue.Queue()
    extractor.load_recipe(entry, Recorder.start(events).proxy())
    recipe, error = events.get(timeout=timeout)
    assert error is None, error
    return recipe


def cer_objects(containerd) -> list[str]:
    return sorted(key for key in containerd.snapshot_keys() + containerd.lease_ids() if key.startswith("cer-"))


def test_release_and_stop_remove_what_cer_made_in_containerd(running, checkpoint, tmp_path):
    ref = CheckpointRef(checkpoint.name)
    lease = f"cer-{ref.key[:16]}"
    extractor_ref = CheckpointExtractor.start(str(tmp_path), running.address, 10.0, [ref], RetryPolicy(0.1, 1.0))
    extractor = extractor_ref.proxy()
    try:
        recipe = loaded(extractor, CheckpointEntry(ref, 1))
        assert recipe.uts.nodename == checkpoint.hostname
        assert len(recipe.rootfs.split(":")) == 2  # the committed rw layer over the base image's layer
        assert cer_objects(running) == sorted([lease, f"{lease}-rootfs", f"{lease}-view"])
        extraction = tmp_path / "checkpoint" / ref.key
        assert (extraction / READY_MARKER).exists()

        extractor.release(ref).get(timeout=10)
        deadline = time.monotonic() + 20
        while (cer_objects(running) or extraction.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cer_objects(running) == []
        assert not extraction.exists()

        # Loaded again, then the extractor stops: containerd is left as it was, the extraction stays.
        loaded(extractor, CheckpointEntry(ref, 1))
        assert lease in cer_objects(running)
    finally:
        extractor_ref.stop(block=True, timeout=60)
    assert cer_objects(running) == []
    assert (extraction / READY_MARKER).exists()


def test_an_attempt_that_ends_after_its_extractor_stopped_leaves_nothing_in_containerd(running, checkpoint, tmp_path):
    # The attempt built a rootfs (snapshots and a lease) for an extractor that is gone: it must remove
    # them itself, since nobody else will ever know of them.
    ref = CheckpointRef(checkpoint.name)
    gone = CheckpointExtractor.start(str(tmp_path), running.address, 10.0)
    reply = gone.proxy()
    gone.stop(block=True, timeout=30)
    attempt = _Attempt(ref=ref, generation=1, base=str(tmp_path / "checkpoint"), address=running.address, timeout=10.0,
                       cancel=threading.Event(), progress=Progress(), reply=reply)
    attempt.run()
    assert cer_objects(running) == []
