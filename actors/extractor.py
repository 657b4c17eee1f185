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
it waits for (the extraction's progress, or containerd). ``lend`` is the same for an actor that must not
wait on this one (the lazy-pages servers): the answer is told back to it.

The extractor also owns the checkpoints' image views (cer.criu.views): ``get_view`` makes the view of a
key once, in a thread of its own, under ``ROOT/views/<ref.key>/<view key>/``, and counts a user of the
checkpoint for each view it hands out, as ``get`` does; ``put`` drops either. A view is made again when
the checkpoint's images changed (their digest), and removed with the checkpoint; a start removes every
view an earlier daemon left. ``find`` names the checkpoint whose identity images have a given digest.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pykka
from loguru import logger

from cer.actors.leases import Holder
from cer.actors.timers import Timer, Timers, default_timers
from cer.actors.told import tell, told
from cer.config import CheckpointEntry, validate_image_directory
from cer.containerd.archive import Progress, extract_once, extract_tar, remove_extraction, remove_stale
from cer.containerd.checkpoint_image import find_checkpoint
from cer.containerd.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, ContainerdClient
from cer.containerd.rootfs import Rootfs, SnapshotNames, build_rootfs, remove_rootfs
from cer.criu.checkpoint import read_checkpoint
from cer.criu.views import VIEWS_DIRECTORY, images_digest, make_view, remove_views, view_key
from cer.errors import (
    BadRequest,
    Cancelled,
    CerError,
    CheckpointImageError,
    ContainerdError,
    ContainerdNotFound,
    ContainerdUnavailable,
    NotFound,
    RootfsError,
    Unavailable,
    ViewError,
)
from cer.pooled_namespaces import Recipe
from cer.references import CheckpointRef

CHECKPOINT_DIRECTORY = "checkpoint"
"""Where, under ROOT, checkpoints from containerd are extracted (one directory per ref.key)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts while containerd cannot be reached: first, doubled each time, up to most."""

    first: float = 0.5
    most: float = 10.0


@dataclass(eq=False)
class _View:
    """One view of a checkpoint: being made (``waiters`` wait for it) or ready at ``path``."""

    key: str
    digest: str  # of the images it was made from
    path: str
    ready: bool = False
    waiters: list = field(default_factory=list)  # futures of get_view calls


@dataclass
class _Checkpoint:
    entry: CheckpointEntry
    directory: str | None = None
    users: int = 0
    digest: str | None = None  # images_digest of the directory, once read
    views: dict = field(default_factory=dict)  # view key -> _View
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
    digest: str | None = None


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
        self._views_base = os.path.join(root, VIEWS_DIRECTORY) if root else None
        self._address = containerd_address
        self._timeout = containerd_timeout
        self._configured = tuple(configured)
        self._retry = retry
        self._timers = timers or default_timers()
        self._checkpoints: dict[CheckpointRef, _Checkpoint] = {}
        # Users that a process gives back by exiting (bind_user): key -> the checkpoint counting it, and the
        # process watcher that watches the process.
        self._bound_users: dict[tuple, tuple[_Checkpoint, pykka.ActorProxy]] = {}
        self._user_serials = itertools.count(1)
        self._loaders: set[threading.Thread] = set()
        self._cancel = threading.Event()

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
        if self._base is not None:
            removed = remove_stale(self._base, (ref.key for ref in self._configured))
            if removed:
                logger.info("removed {} stale or incomplete checkpoint extraction(s) from {}", len(removed), self._base)
        if self._views_base is not None and os.path.lexists(self._views_base):
            # Views are cheap to make again, and those of an earlier daemon may show images since changed.
            remove_views(self._views_base)

    # -- pools ----------------------------------------------------------------------------------------

    @told
    def load_recipe(self, entry: CheckpointEntry, pool: pykka.ActorProxy) -> None:
        """Resolve ``entry`` and tell ``pool.recipe_loaded`` (or ``checkpoint_unavailable`` meanwhile)."""
        if entry.path is not None:
            known = self._checkpoints.get(entry.ref)
            # A pool started again keeps the clients' count of gets of the directory, and its views.
            checkpoint = self._checkpoints[entry.ref] = _Checkpoint(entry, entry.path, users=known.users if known else 0, state="ready")
            if known is not None and known.directory == entry.path:
                checkpoint.views, checkpoint.digest = known.views, known.digest
            for key, (counted_by, watcher) in self._bound_users.items():
                if counted_by is known:
                    self._bound_users[key] = (checkpoint, watcher)  # the count moved over with the users
            self._spawn(f"cer-load-{entry.ref.key[:8]}", _load, entry, pool, self._self)
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
        """The pool of ``ref`` is gone: drop its snapshots and lease, and its extraction and views unless in use."""
        checkpoint = self._checkpoints.pop(ref, None)
        if checkpoint is None:
            return
        self._drop_views(checkpoint, "the checkpoint was removed")
        if checkpoint.entry.path is not None:
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

    @told
    def lend(self, ref: CheckpointRef, reply, token: object) -> None:
        """``get`` for an actor that must not wait on this one: the answer is told to ``reply(token, ref,
        directory, error)`` (a proxy method; one of directory and error is None). A user counted for a
        borrower that has stopped meanwhile is given back at once."""
        try:
            directory, error = self.get(ref), None
        except CerError as failure:
            directory, error = None, failure.with_traceback(None)
        if not tell(reply, token, ref, directory, error) and directory is not None:
            self.put(ref)

    def get_view(self, ref: CheckpointRef, kinds: tuple[str, ...]) -> pykka.Future:
        """A future of the path of ``ref``'s view for ``kinds`` (see cer.criu.views), made once per key;
        counts a user, as ``get`` does, once the view is handed out. No kinds: the directory itself."""
        checkpoint = self._find(ref)
        key = view_key(kinds)
        future = pykka.ThreadingFuture()
        if not key:
            future.set(self.get(ref))
            return future
        if checkpoint.directory is None:
            raise Unavailable(f"checkpoint {ref} is not extracted yet: {self._describe(checkpoint)}")
        if checkpoint.digest is None or self._views_base is None:
            raise Unavailable(f"checkpoint {ref}: its images are still being read" if self._views_base
                              else "this daemon has no ROOT to make image views in")
        view = checkpoint.views.get(key)
        if view is not None and view.digest != checkpoint.digest:
            view = None  # the images changed under the same name: make it again (in the same place)
        if view is None:
            path = os.path.join(self._views_base, ref.key, key)
            view = checkpoint.views[key] = _View(key, checkpoint.digest, path)
            self._spawn(f"cer-view-{ref.key[:8]}", _build_view, checkpoint.directory, view, ref, self._self)
        if view.ready:
            checkpoint.users += 1
            future.set(view.path)
        else:
            view.waiters.append(future)
        return future

    @told
    def view_made(self, ref: CheckpointRef, view: _View, error: str | None) -> None:
        """A view's thread is done (from that thread)."""
        waiters, view.waiters = view.waiters, []
        checkpoint = self._checkpoints.get(ref)
        if checkpoint is None or checkpoint.views.get(view.key) is not view:
            if checkpoint is None and error is None:
                self._spawn(f"cer-unview-{ref.key[:8]}", remove_views, view.path)  # made for nobody
            error = error or f"checkpoint {ref} was removed or changed while its view was made"
        if error is not None:
            if checkpoint is not None and checkpoint.views.get(view.key) is view:
                del checkpoint.views[view.key]  # the next get tries again (the cause may be gone)
            logger.error("checkpoint {}: {}", ref, error)
            for future in waiters:
                future.set_exception(exc_info=(ViewError, ViewError(error), None))
            return
        view.ready = True
        checkpoint.users += len(waiters)
        for future in waiters:
            future.set(view.path)

    @told
    def digest_read(self, ref: CheckpointRef, directory: str, digest: str | None) -> None:
        """The identity digest of a checkpoint's images (from the thread that read them)."""
        checkpoint = self._checkpoints.get(ref)
        if checkpoint is not None and checkpoint.directory == directory:
            checkpoint.digest = digest

    def find(self, digest: str) -> CheckpointRef:
        """The checkpoint whose images have ``digest`` (see cer.criu.views.images_digest)."""
        for ref, checkpoint in self._checkpoints.items():
            if checkpoint.digest == digest:
                return ref
        raise NotFound(f"cer holds no checkpoint with images {digest} (or it is still loading)")

    def _drop_views(self, checkpoint: _Checkpoint, why: str) -> None:
        for view in checkpoint.views.values():
            for future in view.waiters:
                future.set_exception(exc_info=(ViewError, ViewError(f"checkpoint {checkpoint.entry.ref}: {why}"), None))
            view.waiters = []
        if checkpoint.views and checkpoint.users == 0 and self._views_base is not None:
            # With users left, a restore may still read a view: the next start removes it.
            self._spawn(f"cer-unview-{checkpoint.entry.ref.key[:8]}", remove_views,
                        os.path.join(self._views_base, checkpoint.entry.ref.key))
        checkpoint.views = {}

    def put(self, ref: CheckpointRef) -> int:
        """Drop one user of ``ref``'s directory or of one of its views; returns how many remain."""
        checkpoint = self._find(ref)
        if checkpoint.users == 0:
            raise NotFound(f"checkpoint {ref} has no outstanding get")
        checkpoint.users -= 1
        # A put ends a bound user first: its holder's exit then finds nothing to give back. (Ending an
        # unbound one instead could count one user twice, should its client put after that exit.)
        bound = next((key for key, (counted_by, _) in self._bound_users.items() if counted_by is checkpoint), None)
        if bound is not None:
            _, watcher = self._bound_users.pop(bound)
            tell(watcher.unwatch, bound)
        return checkpoint.users

    def bind_user(self, ref: CheckpointRef, holder: Holder, watcher: pykka.ActorProxy) -> None:
        """Tie one user of ``ref``, counted by a get, to ``holder`` (its pidfd now ours): when it exits, the user
        is given back unless a put came first. So a restore's client killed before its put leaves no user
        behind, nor the views and extraction that user would keep."""
        try:
            checkpoint = self._find(ref)
        except NotFound:
            holder.close()
            raise
        key = ("checkpoint user", next(self._user_serials))
        if not tell(watcher.watch, holder.pidfd, holder.pid, self._self, key):
            holder.close()
            raise Unavailable("the process watcher is not running (the daemon is stopping)")
        self._bound_users[key] = (checkpoint, watcher)

    @told
    def holder_exited(self, key: tuple, pid: int) -> None:
        """A process a user was bound to has exited (from the process watcher)."""
        checkpoint, _ = self._bound_users.pop(key, (None, None))
        if checkpoint is None or self._checkpoints.get(checkpoint.entry.ref) is not checkpoint or checkpoint.users == 0:
            return  # removed meanwhile
        checkpoint.users -= 1
        logger.info("checkpoint {}: user given back, its process {} exited", checkpoint.entry.ref, pid)

    def status(self) -> dict:
        result = {}
        for ref, checkpoint in self._checkpoints.items():
            item = {"directory": checkpoint.directory, "users": checkpoint.users, "images_digest": checkpoint.digest,
                    "views": sorted(key for key, view in checkpoint.views.items() if view.ready)}
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
            checkpoint.digest = outcome.digest
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
        if self._views_base is not None:
            remove_views(self._views_base)  # links only: the checkpoints' files stay
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
                digest = _digest_or_none(directory)
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
        return _Outcome(directory=directory, recipe=recipe, rootfs=rootfs, digest=digest)


def _remove_quietly(address: str, timeout: float, rootfs: Rootfs) -> None:
    try:
        with ContainerdClient(address, timeout) as client:
            remove_rootfs(client, rootfs.namespace, rootfs.snapshotter, rootfs.names)
    except ContainerdError as error:
        logger.warning("cannot remove snapshots and lease {}: {}", rootfs.names.lease, error)


def _digest_or_none(directory: str) -> str | None:
    try:
        return images_digest(directory)
    except CerError as error:
        logger.warning("checkpoint images at {}: no digest ({}); restores cannot name it by its images", directory, error)
        return None


def _build_view(directory: str, view: _View, ref: CheckpointRef, extractor: pykka.ActorProxy) -> None:
    error = None
    try:
        if images_digest(directory) != view.digest:
            raise ViewError(f"the images at {directory} changed since they were read")
        make_view(directory, view.path, view.key.split("+"))
    except CerError as failure:
        error = f"making its {view.key} view failed: {failure}"
    except Exception as failure:  # noqa: BLE001 - reported to whoever waits for the view
        logger.opt(exception=failure).debug("making view {} of {} failed", view.key, ref)
        error = f"making its {view.key} view failed: {failure}"
    tell(extractor.view_made, ref, view, error)


def _load(entry: CheckpointEntry, pool: pykka.ActorProxy, extractor: pykka.ActorProxy) -> None:
    tell(extractor.digest_read, entry.ref, entry.path, _digest_or_none(entry.path))
    try:
        contents = read_checkpoint(entry.path)
        recipe, error = Recipe.from_checkpoint(contents, entry.rootfs), None
    except Exception as failure:  # noqa: BLE001 - a broken checkpoint is its pool's error, not the daemon's
        logger.opt(exception=failure).debug("reading checkpoint {} failed", entry.ref)
        recipe, error = None, f"reading the checkpoint images failed: {failure}"
    tell(pool.recipe_loaded, recipe, error)
