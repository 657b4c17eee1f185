"""Image views: a checkpoint's CRIU images as a restore that joins cer's namespaces must see them.

A stock CRIU restore that joins a namespace cer prepared still restores from the images what that
namespace holds: it creates every SysV object of ``ipcns-shm/sem/msg-*.img`` with IPC_EXCL at its
saved id (``File exists`` in a pre-filled namespace), and it rebuilds the mount tree unless the
inventory says otherwise. A *view* is a directory with the checkpoint's own image files, hard-linked,
except the few files a transform rewrites so that the restore leaves out what cer's namespace holds.

A view is named by its *key*: the sorted kinds of namespace it is for, joined by ``+`` (``ipc``,
``ipc+mnt``). The daemon makes one per checkpoint and key, under ``ROOT/views/<checkpoint key>/<view
key>/``, shares it between restores and removes it with the checkpoint (actors.extractor).

A transform (``TRANSFORMS[kind]``) reads the checkpoint's image directory, never writes, and returns
``{file name: new content}`` for the files it rewrites; every other file of the view is the
checkpoint's own. Transforms of one key must rewrite different files.

Why hard links: CRIU opens image files after it has switched into the restored container's mount
namespace, where a symlink's target does not exist; a copy would cost the checkpoint's size in time
and space at every first restore. So a view needs the checkpoint on ROOT's filesystem, and
:func:`make_view` refuses with :class:`ViewError` otherwise (no copy fallback).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from typing import TYPE_CHECKING

from cer.errors import CerError, ImageError, ViewError

if TYPE_CHECKING:
    from cer.criu.images import ImageType

# Runtime wrappers import this module on every restore for images_digest and view_kinds: it must stay
# light. The image reader (protobuf and the CRIU schema, tens of ms to import) is loaded by the
# transforms, which only the daemon runs.

VIEWS_DIRECTORY = "views"
"""Where, under ROOT, views are made: ``views/<checkpoint key>/<view key>/``."""

# The images whose bytes identify a checkpoint (see images_digest): inventory.img carries the dump's
# uptime stamp and the dumping CRIU's ids, pstree.img the dumped tasks' pids.
IDENTITY_IMAGES = ("inventory.img", "pstree.img")
_MAX_IDENTITY_IMAGE = 1 << 20

Transform = Callable[[Path], Mapping[str, bytes]]


def image_header(image_type: ImageType) -> bytes:
    """The magic an image of ``image_type`` starts with: an image of that type holding no entry."""
    from cer.criu.images import encode_image

    return encode_image(image_type, [])


def ipc_transform(directory: Path) -> dict[str, bytes]:
    """The root task's IPC images as a restore into cer's pre-filled IPC namespace needs them.

    Semaphore sets and message queues are all in cer's namespace: their images keep their header only.
    The shm image keeps the segments some task had attached at dump time (CRIU maps an attached
    segment only if it created it itself; cer's namespace leaves them out, see
    ``IpcContents.prefill``), with their pagemaps untouched. ``ipcns-var`` stays: CRIU writes the
    same sysctls cer did.
    """
    from cer.criu.checkpoint import attached_shm_ids, root_ipc_namespace_id
    from cer.criu.images import IPCNS_MSG, IPCNS_SEM

    ns_id = root_ipc_namespace_id(directory)
    if ns_id is None:
        return {}
    rewritten = {}
    shm = directory / f"ipcns-shm-{ns_id}.img"
    if shm.exists():
        rewritten[shm.name] = _shm_entries(shm, attached_shm_ids(directory))
    for image_type, name in ((IPCNS_SEM, f"ipcns-sem-{ns_id}.img"), (IPCNS_MSG, f"ipcns-msg-{ns_id}.img")):
        if (directory / name).exists():
            rewritten[name] = image_header(image_type)
    return rewritten


def _shm_entries(path: Path, keep: frozenset[int]) -> bytes:
    """An ipcns-shm image with only the segments in ``keep``, each entry (and its inline payload, in
    images of CRIU before 3.x) copied byte for byte."""
    from cer.criu.images import IPCNS_SHM, ImageReader

    parts = [image_header(IPCNS_SHM)]
    with ImageReader(path, IPCNS_SHM) as image:
        for start, entry in image.entries_with_offsets():
            if not entry.in_pagemaps:
                image.skip_payload(entry.size, 4, f"contents of shm segment {entry.desc.id}")
            if entry.desc.id in keep:
                end = image.offset
                parts.append(image.read_at(start, end - start, f"shm segment {entry.desc.id}"))
    return b"".join(parts)


def mnt_transform(directory: Path) -> dict[str, bytes]:
    """The images as a restore into one of cer's pooled mount namespaces needs them: an inventory that keeps
    CRIU's hands off the mount tree, and the plan of what the restore's action script mounts
    (cer.criu.mntview)."""
    from cer.criu.checkpoint import read_checkpoint_mounts
    from cer.criu.mntview import mnt_view
    from cer.mounts import restore_plan_document

    tree = read_checkpoint_mounts(directory)
    plan = restore_plan_document(tree) if tree is not None else None
    return mnt_view(lambda name: _read_identity_image(os.path.join(directory, name)), plan)


TRANSFORMS: dict[str, Transform] = {"ipc": ipc_transform, "mnt": mnt_transform}
"""The transform of each kind of view (import what a transform reads with inside it: see above)."""


def view_key(kinds: Iterable[str]) -> str:
    """The key of the view for ``kinds`` (each a key of TRANSFORMS); "" for none: the images as they are."""
    kinds = sorted(set(kinds))
    unknown = [kind for kind in kinds if kind not in TRANSFORMS]
    if unknown:
        raise ValueError(f"no view of kind {', '.join(map(repr, unknown))}: views are {', '.join(sorted(TRANSFORMS))}")
    return "+".join(kinds)


def view_kinds(namespace_types: Iterable[str]) -> tuple[str, ...]:
    """The kinds of view a restore joining ``namespace_types`` needs: those whose images it changes."""
    return tuple(sorted(set(namespace_types) & set(TRANSFORMS)))


def images_digest(directory: str | os.PathLike[str]) -> str:
    """A digest of a checkpoint's identity images, the same for every copy of one dump.

    A runtime wrapper computes it from the image directory it was given and names the checkpoint by
    it; cer computes it for each checkpoint it holds. ``sha256:`` and 64 hex digits.
    """
    digest = hashlib.sha256()
    for name in IDENTITY_IMAGES:
        data = _read_identity_image(os.path.join(directory, name))
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return f"sha256:{digest.hexdigest()}"


def _read_identity_image(path: str) -> bytes:
    # (Also how the mnt transform reads inventory, pstree and ids images: small ones.)
    # Not through a link (a view holds none, so the digest of one would name other files), nor a FIFO.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        problem = "a symlink, not a regular file" if error.errno == errno.ELOOP else f"cannot open: {error.strerror}"
        raise ImageError(path, 0, problem) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(path, 0, "not a regular file")
        if info.st_size > _MAX_IDENTITY_IMAGE:
            raise ImageError(path, 0, f"{info.st_size} bytes, more than an identity image holds ({_MAX_IDENTITY_IMAGE})")
        return file.read(_MAX_IDENTITY_IMAGE + 1)[:_MAX_IDENTITY_IMAGE]


def make_view(source: str | os.PathLike[str], target: str | os.PathLike[str], kinds: Iterable[str]) -> None:
    """Make ``target`` a view of the image directory ``source`` for ``kinds``: hard links to every regular
    file of ``source``, and the transforms' files. Built beside ``target`` and renamed into place, so
    ``target`` is complete or absent; a ``target`` left from before is replaced.

    Raises ViewError when a file cannot be hard-linked (another filesystem) or a transform fails.
    """
    source, target = os.fspath(source), os.fspath(target)
    rewritten: dict[str, bytes] = {}
    for kind in sorted(set(kinds)):
        try:
            files = TRANSFORMS[kind](Path(source))
        except CerError as error:
            raise ViewError(f"the {kind} view of {source}: {error}") from None
        for name, data in files.items():
            if os.path.basename(name) != name or name in (".", ".."):
                raise ViewError(f"the {kind} view of {source}: {name!r} is not a file name")
            if name in rewritten:
                raise ViewError(f"views {view_key(kinds)!r}: two transforms rewrite {name}")
            rewritten[name] = data
    parent = os.path.dirname(target)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    building = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        _link_and_write(source, building, rewritten)
        os.chmod(building, 0o555)
        if os.path.lexists(target):
            remove_views(target)
        os.rename(building, target)
    except BaseException:
        remove_views(building)
        raise


def _link_and_write(source: str, building: str, rewritten: Mapping[str, bytes]) -> None:
    source_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    target_fd = os.open(building, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in os.scandir(source_fd):
            # Only regular files: a CRIU image directory holds nothing else, and a link or a device
            # planted in it must not reach the restore.
            if entry.name in rewritten or not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.link(entry.name, entry.name, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
            except OSError as error:
                if error.errno == errno.EXDEV:
                    raise ViewError(f"{source} is on another filesystem than {building}: a view is made of hard "
                                    "links (CRIU cannot follow symlinks, copies would cost the checkpoint's size); "
                                    "keep checkpoints on the filesystem of cer's ROOT") from None
                raise ViewError(f"cannot link {entry.name} of {source} into a view: {error.strerror}") from None
        for name, data in rewritten.items():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444, dir_fd=target_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
    finally:
        os.close(source_fd)
        os.close(target_fd)


def remove_views(path: str | os.PathLike[str]) -> None:
    """Remove a view, or a directory of views: the links go, the checkpoint's files stay."""
    shutil.rmtree(path, ignore_errors=True)
