"""The checkpoint extractor: turns a checkpoint reference into a directory of CRIU images, once.

For entries with a ``path`` that directory is the configured one, checked when the config was read;
checkpoints that live in containerd are not supported yet and are reported unavailable. Reading what
the namespaces must hold from the images is blocking I/O (a shm segment can be large), so it runs in a
thread of its own and the pool is told the result.
"""

import threading
from dataclasses import dataclass

import pykka
from loguru import logger

from cer.config import CheckpointEntry
from cer.criu.checkpoint import read_checkpoint
from cer.errors import NotFound, Unavailable
from cer.namespaces import Recipe
from cer.references import CheckpointRef


@dataclass
class _Checkpoint:
    entry: CheckpointEntry
    directory: str | None
    users: int = 0


class CheckpointExtractor(pykka.ThreadingActor):
    """Resolves checkpoints for pools (``load_recipe``) and for clients (counted ``get``/``put``)."""

    def __init__(self) -> None:
        super().__init__()
        self._checkpoints: dict[CheckpointRef, _Checkpoint] = {}
        self._loaders: set[threading.Thread] = set()

    def load_recipe(self, entry: CheckpointEntry, pool: pykka.ActorProxy) -> None:
        """Resolve ``entry`` and tell ``pool.recipe_loaded`` (or ``checkpoint_unavailable``)."""
        self._checkpoints[entry.ref] = _Checkpoint(entry, entry.path)
        if entry.path is None:
            pool.checkpoint_unavailable("checkpoints from containerd are not supported yet: give the entry a path")
            return
        self._loaders = {thread for thread in self._loaders if thread.is_alive()}
        loader = threading.Thread(target=_load, args=(entry, pool), name=f"cer-load-{entry.ref.key[:8]}", daemon=True)
        self._loaders.add(loader)
        loader.start()

    def get(self, ref: CheckpointRef) -> str:
        """The image directory of ``ref``; counts a user until the matching ``put``."""
        checkpoint = self._find(ref)
        if checkpoint.directory is None:
            raise Unavailable(f"checkpoint {ref} is not extracted: checkpoints from containerd are not supported yet")
        checkpoint.users += 1
        return checkpoint.directory

    def put(self, ref: CheckpointRef) -> int:
        """Drop one user of ``ref``'s directory; returns how many remain."""
        checkpoint = self._find(ref)
        if checkpoint.users == 0:
            raise NotFound(f"checkpoint {ref} has no outstanding get")
        checkpoint.users -= 1
        return checkpoint.users

    def status(self) -> dict:
        return {
            str(ref): {"directory": checkpoint.directory, "users": checkpoint.users}
            for ref, checkpoint in self._checkpoints.items()
        }

    def _find(self, ref: CheckpointRef) -> _Checkpoint:
        checkpoint = self._checkpoints.get(ref)
        if checkpoint is None:
            raise NotFound(f"checkpoint {ref} is not configured")
        return checkpoint

    def on_stop(self) -> None:
        for loader in self._loaders:
            loader.join(10.0)


def _load(entry: CheckpointEntry, pool: pykka.ActorProxy) -> None:
    try:
        contents = read_checkpoint(entry.path)
        recipe, error = Recipe(ipc=contents.ipc, uts=contents.uts, rootfs=entry.rootfs), None
    except Exception as failure:  # noqa: BLE001 - a broken checkpoint is its pool's error, not the daemon's
        logger.opt(exception=failure).debug("reading checkpoint {} failed", entry.ref)
        recipe, error = None, f"reading the checkpoint images failed: {failure}"
    try:
        pool.recipe_loaded(recipe, error)
    except pykka.ActorDeadError:
        pass
