"""The checkpoint extractor: turns a checkpoint reference into a directory of CRIU images, once.

For entries with a ``path`` that directory is the configured one, checked when the config was read.
Entries without one are checkpoint images in containerd (``ctr c checkpoint --rw --image --task``): the
extractor finds the image in the entry's containerd namespace, stream-extracts its CRIU archive once to
``ROOT/checkpoint/<ref.key>/`` and builds its root filesystem from containerd snapshots (see
cer.containerd). Either way it then reads what the namespaces must hold from the images and tells the
pool: ``recipe_loaded(recipe, error)``.

All blocking work (reading images, every gRPC call, extracting) runs in threads this actor owns, one
per checkpoint at a time; they report back through the actor's proxy, so the actor's own thread never
waits on containerd. While containerd cannot be reached (or does not answer in time) the pools hear
``checkpoint_unavailable("waiting for containerd: ...")`` and the extractor tries again with backoff; a
checkpoint that containerd does not have, or that is not a usable checkpoint, fails its pool.

``get`` answers at once: the directory when the checkpoint is extracted, else Unavailable saying what
it waits for (the extraction's progress, or containerd).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pykka
from loguru import logger

from cer.actors.timers import Timer, Timers, default_timers
from cer.actors.told import tell, told
from cer.config import CheckpointEntry, validate_image_directory
from cer.containerd.archive import Cancelled, Progress, extract_once, extract_tar, remove_extraction, remove_stale
from cer.containerd.checkpoint import CheckpointImageError, find_checkpoint
from cer.containerd.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    ContainerdClient,
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
)
from cer.containerd.rootfs import Rootfs, RootfsError, SnapshotNames, build_rootfs, remove_rootfs
from cer.criu.checkpoint import read_checkpoint
from cer.errors import BadRequest, NotFound, Unavailable
from cer.namespaces import Recipe
from cer.references import CheckpointRef

CHECKPOINT_DIRECTORY = "checkpoint"
"""Where, under ROOT, checkpoints from containerd are extracted (one directory per ref.key)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts while containerd cannot be reached: first, doubled each time, up to most."""

    first: float = 0.5
    most: float = 10.0


@dataclass
class _Checkpoint:
    entry: CheckpointEntry
    directory: str | None = None
    users: int = 0
    # containerd entries only:
    state: str = "loading"  # loading, waiting (for containerd), ready, failed
    error: str | None = None
    recipe: Recipe | None = None
    rootfs: Rootfs | None = None
    pools: dict = field(default_factory=dict)  # actor urn -> proxy, told once the outcome is known
    attempts: int = 0
    generation: int = 0
    worker: threading.Thread | None = None
    timer: Timer | None = None
    progress: Progress = field(default_factory=Progress)


@dataclass(frozen=True)
class _Outcome:
    """What one attempt of a worker thread found out."""

    directory: str | None = None
    recipe: Recipe | None = None
    rootfs: Rootfs | None = None
    error: str | None = None
    retry: bool = False


class CheckpointExtractor(pykka.ThreadingActor):
    """Resolves checkpoints for pools (``load_recipe``) and for clients (counted ``get``/``put``).

    ``root`` is the daemon's ROOT (without it, checkpoints from containerd are reported unavailable);
    ``configured`` are the references of the configuration, whose extractions a start keeps: every
    other directory under ROOT/checkpoint, and every incomplete one, is removed when the actor starts.
    """

    def __init__(
        self,
        root: str | None = None,
        containerd_address: str = DEFAULT_ADDRESS,
        containerd_timeout: float = DEFAULT_TIMEOUT,
        configured: Iterable[CheckpointRef] = (),
        retry: RetryPolicy = RetryPolicy(),
        timers: Timers | None = None,
    ) -> None:
        super().__init__()
        self._base = os.path.join(root, CHECKPOINT_DIRECTORY) if root else None
        self._address = containerd_address
        self._timeout = containerd_timeout
        self._configured = tuple(configured)
        self._retry = retry
        self._timers = timers or default_timers()
        self._checkpoints: dict[CheckpointRef, _Checkpoint] = {}
        self._loaders: set[threading.Thread] = set()
        self._cancel = threading.Event()

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
        if self._base is not None:
            removed = remove_stale(self._base, (ref.key for ref in self._configured))
            if removed:
                logger.info("removed {} stale or incomplete checkpoint extraction(s) from {}", len(removed), self._base)

    # -- pools ----------------------------------------------------------------------------------------

    @told
    def load_recipe(self, entry: CheckpointEntry, pool: pykka.ActorProxy) -> None:
        """Resolve ``entry`` and tell ``pool.recipe_loaded`` (or ``checkpoint_unavailable`` meanwhile)."""
        if entry.path is not None:
            known = self._checkpoints.get(entry.ref)
            # A pool started again keeps the clients' count of gets of the directory.
            self._checkpoints[entry.ref] = _Checkpoint(entry, entry.path, users=known.users if known else 0, state="ready")
            self._loaders = {thread for thread in self._loaders if thread.is_alive()}
            loader = threading.Thread(target=_load, args=(entry, pool), name=f"cer-load-{entry.ref.key[:8]}", daemon=True)
            self._loaders.add(loader)
            loader.start()
            return
        if self._base is None:
            pool.checkpoint_unavailable("checkpoints from containerd need the daemon's ROOT: give the entry a path")
            return
        checkpoint = self._checkpoints.get(entry.ref)
        if checkpoint is None or checkpoint.entry.path is not None:
            checkpoint = self._checkpoints[entry.ref] = _Checkpoint(entry)
        if checkpoint.state == "ready":
            tell(pool.recipe_loaded, checkpoint.recipe, None)
        elif checkpoint.state == "failed":
            tell(pool.recipe_loaded, None, checkpoint.error)
        else:
            checkpoint.pools[pool.actor_ref.actor_urn] = pool
            tell(pool.checkpoint_unavailable, checkpoint.error or f"loading from containerd at {self._address}")
            if checkpoint.worker is None and checkpoint.timer is None:
                self._attempt(checkpoint)

    @told
    def release(self, ref: CheckpointRef) -> None:
        """The pool of ``ref`` is gone: drop its snapshots and lease, and its extraction unless in use."""
        checkpoint = self._checkpoints.pop(ref, None)
        if checkpoint is None or checkpoint.entry.path is not None:
            return
        checkpoint.generation += 1  # a worker still running reports to nobody and cleans up after itself
        if checkpoint.timer is not None:
            checkpoint.timer.cancel()
        self._spawn(f"cer-release-{ref.key[:8]}", self._remove, checkpoint.rootfs, ref.key if checkpoint.users == 0 else None)

    # -- clients --------------------------------------------------------------------------------------

    def get(self, ref: CheckpointRef) -> str:
        """The image directory of ``ref``; counts a user until the matching ``put``."""
        checkpoint = self._find(ref)
        if checkpoint.directory is None:
            raise Unavailable(f"checkpoint {ref} is not extracted yet: {self._describe(checkpoint)}")
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
        result = {}
        for ref, checkpoint in self._checkpoints.items():
            item = {"directory": checkpoint.directory, "users": checkpoint.users}
            if checkpoint.entry.path is None:
                item.update(
                    state=checkpoint.state,
                    error=checkpoint.error,
                    attempts=checkpoint.attempts,
                    extracted_bytes=checkpoint.progress.done,
                    archive_bytes=checkpoint.progress.total,
                    extract_seconds=checkpoint.progress.seconds,
                    rootfs=checkpoint.rootfs.lowerdir if checkpoint.rootfs else None,
                )
            result[str(ref)] = item
        return result

    # -- the workers' reports (through the proxy) ----------------------------------------------------

    @told
    def attempt_done(self, ref: CheckpointRef, generation: int, outcome: _Outcome) -> None:
        checkpoint = self._checkpoints.get(ref)
        if checkpoint is None or checkpoint.generation != generation:
            # Released meanwhile: what the attempt built belongs to nobody.
            self._spawn(f"cer-release-{ref.key[:8]}", self._remove, outcome.rootfs, None)
            return
        checkpoint.worker = None
        if outcome.recipe is not None:
            checkpoint.state, checkpoint.error = "ready", None
            checkpoint.directory, checkpoint.recipe, checkpoint.rootfs = outcome.directory, outcome.recipe, outcome.rootfs
            logger.info("checkpoint {}: extracted to {}, rootfs {}", ref, outcome.directory, outcome.rootfs.lowerdir if outcome.rootfs else "none")
            self._tell_pools(checkpoint, "recipe_loaded", outcome.recipe, None)
        elif outcome.retry:
            checkpoint.state, checkpoint.error = "waiting", f"waiting for containerd: {outcome.error}"
            delay = min(self._retry.first * 2 ** min(checkpoint.attempts - 1, 30), self._retry.most)
            logger.warning("checkpoint {}: {} (attempt {}, next in {:g} s)", ref, checkpoint.error, checkpoint.attempts, delay)
            for pool in checkpoint.pools.values():
                tell(pool.checkpoint_unavailable, checkpoint.error)
            checkpoint.timer = self._timers.call_later(delay, self._self.retry_now.defer, ref, generation)
        else:
            checkpoint.state, checkpoint.error = "failed", outcome.error
            logger.error("checkpoint {}: {}", ref, outcome.error)
            self._tell_pools(checkpoint, "recipe_loaded", None, outcome.error)

    @told
    def retry_now(self, ref: CheckpointRef, generation: int) -> None:
        checkpoint = self._checkpoints.get(ref)
        if checkpoint is None or checkpoint.generation != generation or checkpoint.state != "waiting":
            return
        checkpoint.timer = None
        self._attempt(checkpoint)

    # -- internals ------------------------------------------------------------------------------------

    def _attempt(self, checkpoint: _Checkpoint) -> None:
        checkpoint.attempts += 1
        job = _Attempt(
            ref=checkpoint.entry.ref,
            generation=checkpoint.generation,
            base=self._base,
            address=self._address,
            timeout=self._timeout,
            cancel=self._cancel,
            progress=checkpoint.progress,
            reply=self._self,
        )
        checkpoint.worker = self._spawn(f"cer-extract-{checkpoint.entry.ref.key[:8]}", job.run)

    def _tell_pools(self, checkpoint: _Checkpoint, method: str, *args: object) -> None:
        pools, checkpoint.pools = checkpoint.pools, {}
        for pool in pools.values():
            tell(getattr(pool, method), *args)

    def _describe(self, checkpoint: _Checkpoint) -> str:
        if checkpoint.entry.path is not None:
            return "no directory"
        if checkpoint.state == "failed":
            return f"the checkpoint is unusable: {checkpoint.error}"
        if checkpoint.state == "waiting":
            return checkpoint.error or "waiting for containerd"
        progress = checkpoint.progress
        if progress.total:
            return f"extracting, {progress.done >> 20} of {progress.total >> 20} MiB"
        return f"loading from containerd at {self._address}"

    def _find(self, ref: CheckpointRef) -> _Checkpoint:
        checkpoint = self._checkpoints.get(ref)
        if checkpoint is None:
            raise NotFound(f"checkpoint {ref} is not configured")
        return checkpoint

    def _spawn(self, name: str, target, *args) -> threading.Thread:
        self._loaders = {thread for thread in self._loaders if thread.is_alive()}
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._loaders.add(thread)
        thread.start()
        return thread

    def _remove(self, rootfs: Rootfs | None, extraction_key: str | None) -> None:
        """Remove a checkpoint's snapshots and lease, and its extraction; runs in a thread of its own."""
        if rootfs is not None:
            try:
                with ContainerdClient(self._address, self._timeout) as client:
                    remove_rootfs(client, rootfs.namespace, rootfs.snapshotter, rootfs.names)
            except ContainerdError as error:
                logger.warning("cannot remove snapshots and lease {}: {}", rootfs.names.lease, error)
        if extraction_key is not None and self._base is not None:
            remove_extraction(self._base, extraction_key)

    def on_stop(self) -> None:
        self._shut_down()

    def on_failure(self, *exc_info: object) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        self._cancel.set()
        for checkpoint in self._checkpoints.values():
            if checkpoint.timer is not None:
                checkpoint.timer.cancel()
        for thread in list(self._loaders):
            # Workers stop at their next chunk or call; one in a call to a hung containerd ends with its
            # timeout and then removes what it built by itself.
            thread.join(self._timeout + 5.0)
        # The pools and the factory are gone: no mount namespace uses the snapshots any more.
        for checkpoint in self._checkpoints.values():
            if checkpoint.rootfs is not None:
                self._remove(checkpoint.rootfs, None)
                checkpoint.rootfs = None


@dataclass
class _Attempt:
    """One try at resolving a containerd checkpoint, run in a thread of its own."""

    ref: CheckpointRef
    generation: int
    base: str
    address: str
    timeout: float
    cancel: threading.Event
    progress: Progress
    reply: pykka.ActorProxy

    def run(self) -> None:
        outcome = self._resolve()
        if self.cancel.is_set() and outcome.rootfs is not None:
            # The extractor is stopping and will not hear of this: leave nothing behind in containerd.
            _remove_quietly(self.address, self.timeout, outcome.rootfs)
            return
        if not tell(self.reply.attempt_done, self.ref, self.generation, outcome) and outcome.rootfs is not None:
            # The extractor is gone and will never hear of this rootfs: nobody else would remove it.
            _remove_quietly(self.address, self.timeout, outcome.rootfs)

    def _resolve(self) -> _Outcome:
        ref = self.ref
        try:
            with ContainerdClient(self.address, self.timeout) as client:
                try:
                    checkpoint = find_checkpoint(client, ref.namespace, ref.name)
                except ContainerdNotFound:
                    return _Outcome(error=f"there is no checkpoint image {ref.name!r} in containerd namespace {ref.namespace!r}")
                archive = checkpoint.criu_archive

                started: list[float] = []

                def extract(target: str) -> None:
                    started.append(time.monotonic())
                    extract_tar(client.read(ref.namespace, archive), target, archive.size, archive.digest, self.cancel, self.progress)
                    try:
                        validate_image_directory(target)
                    except BadRequest:
                        raise CheckpointImageError(f"its CRIU archive {archive.digest} holds no CRIU inventory.img") from None

                self.progress.total = archive.size
                directory = extract_once(self.base, ref.key, archive.digest, extract)
                self.progress.done = archive.size
                if started:
                    self.progress.seconds = time.monotonic() - started[0]
                    logger.info("checkpoint {}: extracted {} MiB in {:.2f} s", ref, archive.size >> 20, self.progress.seconds)
                contents = read_checkpoint(directory)
                labels = {"cer.checkpoint": str(ref)}
                rootfs = build_rootfs(client, ref.namespace, checkpoint, SnapshotNames.for_key(ref.key), labels, self.cancel)
                try:
                    recipe = Recipe.from_checkpoint(contents, rootfs.lowerdir if rootfs else None)
                except BaseException:
                    if rootfs is not None:
                        _remove_quietly(self.address, self.timeout, rootfs)  # nobody else will know of it
                    raise
        except ContainerdUnavailable as error:
            return _Outcome(error=f"{self.address}: {error}", retry=True)
        except Cancelled:
            return _Outcome(error="the daemon is stopping")
        except (ContainerdError, CheckpointImageError, RootfsError) as error:
            return _Outcome(error=f"checkpoint image {ref.name!r}: {error}")
        except Exception as error:  # noqa: BLE001 - a broken checkpoint is its pool's error, not the daemon's
            logger.opt(exception=error).debug("resolving checkpoint {} failed", ref)
            return _Outcome(error=f"extracting checkpoint image {ref.name!r} failed: {error}")
        return _Outcome(directory=directory, recipe=recipe, rootfs=rootfs)


def _remove_quietly(address: str, timeout: float, rootfs: Rootfs) -> None:
    try:
        with ContainerdClient(address, timeout) as client:
            remove_rootfs(client, rootfs.namespace, rootfs.snapshotter, rootfs.names)
    except ContainerdError as error:
        logger.warning("cannot remove snapshots and lease {}: {}", rootfs.names.lease, error)


def _load(entry: CheckpointEntry, pool: pykka.ActorProxy) -> None:
    try:
        contents = read_checkpoint(entry.path)
        recipe, error = Recipe.from_checkpoint(contents, entry.rootfs), None
    except Exception as failure:  # noqa: BLE001 - a broken checkpoint is its pool's error, not the daemon's
        logger.opt(exception=failure).debug("reading checkpoint {} failed", entry.ref)
        recipe, error = None, f"reading the checkpoint images failed: {failure}"
    tell(pool.recipe_loaded, recipe, error)
