"""A checkpoint's root filesystem, as containerd snapshots, for the pool's mount namespaces.

The base image named by the checkpoint is unpacked if it is not yet (its layers applied with the diff
service onto snapshots named by their OCI chain ids, as containerd's own unpacker does), the
container's rw layer is applied onto a snapshot of it and committed, and a view of the result gives
the read-only layer stack: its directories, uppermost first, are the overlay lowerdir of every pooled
mount namespace, each of which has its own upper layer. Everything cer creates in containerd for a
checkpoint lives under one lease named after the checkpoint reference, so ``remove_rootfs`` (and, as a
last resort, containerd's garbage collector once the lease is gone) takes it all away again.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from dataclasses import dataclass

from loguru import logger

from cer.containerd.checkpoint_image import INDEXES, MANIFESTS, CheckpointImage, read_json
from cer.containerd.client import ContainerdClient, Descriptor, Mount
from cer.errors import (
    Cancelled,
    CheckpointImageError,
    ContainerdAlreadyExists,
    ContainerdError,
    ContainerdNotFound,
    RootfsError,
)

# An overlay mount's options must fit in a page, with the pool's upperdir and workdir beside them.
MAX_LOWERDIR = 3000
_GC_SNAPSHOT_LABEL = "containerd.io/gc.ref.snapshot."
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class SnapshotNames:
    """What cer calls its lease and snapshots for one checkpoint, in one containerd namespace."""

    lease: str

    @classmethod
    def for_key(cls, ref_key: str) -> SnapshotNames:
        return cls(f"cer-{ref_key[:16]}")

    @property
    def apply(self) -> str:
        return f"{self.lease}-apply"

    @property
    def rootfs(self) -> str:
        return f"{self.lease}-rootfs"

    @property
    def view(self) -> str:
        return f"{self.lease}-view"

    def unpack(self, index: int) -> str:
        return f"{self.lease}-unpack-{index}"


@dataclass(frozen=True)
class Rootfs:
    """A built root filesystem: where it lives in containerd, and the lowerdir stack it gives."""

    namespace: str
    snapshotter: str
    names: SnapshotNames
    lowerdir: str


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain ids of a layer stack: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def build_rootfs(
    client: ContainerdClient,
    namespace: str,
    checkpoint: CheckpointImage,
    names: SnapshotNames,
    labels: dict[str, str] | None = None,
    cancel: threading.Event | None = None,
) -> Rootfs | None:
    """Build the checkpoint's root filesystem; None when the checkpoint names no base image."""
    base = _base_manifest(client, namespace, checkpoint)
    if base is None:
        return None
    manifest = read_json(client, namespace, base)
    try:
        config = Descriptor.from_json(manifest.get("config"))
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers") or []]
    except ValueError as error:
        raise CheckpointImageError(f"base image manifest {base.digest}: {error}") from None
    rootfs = read_json(client, namespace, config).get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and d.startswith("sha256:") for d in diff_ids):
        raise CheckpointImageError(f"base image config {config.digest} has no valid rootfs.diff_ids")
    if len(diff_ids) != len(layers):
        raise CheckpointImageError(
            f"base image {base.digest} has {len(layers)} layers but its config lists {len(diff_ids)} diff ids"
        )
    chain = chain_ids(diff_ids)
    snapshotter = checkpoint.snapshotter

    # Whatever an earlier run left (a daemon that was killed) goes first: the names are fixed.
    remove_rootfs(client, namespace, snapshotter, names)
    client.create_lease(namespace, names.lease, labels)
    try:
        _unpack(client, namespace, snapshotter, layers, diff_ids, config, names, cancel)
        parent = chain[-1] if chain else ""
        if checkpoint.rw_layer is not None:
            _check(cancel)
            mounts = client.prepare_snapshot(namespace, snapshotter, names.apply, parent, lease=names.lease)
            client.apply_layer(namespace, checkpoint.rw_layer, mounts, lease=names.lease)
            client.commit_snapshot(namespace, snapshotter, names.rootfs, names.apply, lease=names.lease)
            parent = names.rootfs
        _check(cancel)
        mounts = client.view_snapshot(namespace, snapshotter, names.view, parent, lease=names.lease)
        lowerdir = lowerdir_of(mounts, snapshotter)
    except BaseException:
        try:
            remove_rootfs(client, namespace, snapshotter, names)
        except ContainerdError as error:
            logger.warning("cannot remove the snapshots of a failed rootfs build ({}): {}", names.lease, error)
        raise
    return Rootfs(namespace, snapshotter, names, lowerdir)


def remove_rootfs(client: ContainerdClient, namespace: str, snapshotter: str, names: SnapshotNames) -> None:
    """Remove cer's snapshots and lease for one checkpoint; what is not there is skipped."""
    # Children before parents: the view and the apply snapshot sit on the committed rootfs or the base.
    for key in (names.view, names.apply, names.rootfs):
        try:
            client.remove_snapshot(namespace, snapshotter, key)
        except ContainerdNotFound:
            pass
    try:
        client.delete_lease(namespace, names.lease)
    except ContainerdNotFound:
        pass


def lowerdir_of(mounts: list[Mount], snapshotter: str) -> str:
    """The overlay lowerdir (directories joined by ':', uppermost first) that a view's mounts show."""
    if len(mounts) == 1 and mounts[0].type == "bind":
        directories = [mounts[0].source]
    elif len(mounts) == 1 and mounts[0].type == "overlay":
        options = mounts[0].options
        if any(option.startswith(("upperdir=", "workdir=")) for option in options):
            raise RootfsError(f"the view of snapshotter {snapshotter} is writable: {mounts}")
        lower = [option[len("lowerdir="):] for option in options if option.startswith("lowerdir=")]
        if len(lower) != 1:
            raise RootfsError(f"the view of snapshotter {snapshotter} has no lowerdir: {mounts}")
        directories = lower[0].split(":")
    else:
        raise RootfsError(
            f"snapshotter {snapshotter} gives mounts that cer cannot use as an overlay lower layer: {mounts}"
        )
    for directory in directories:
        if not os.path.isabs(directory) or "," in directory or ":" in directory:
            raise RootfsError(f"snapshotter {snapshotter} gives a layer directory overlayfs cannot take: {directory!r}")
        if not os.path.isdir(directory):
            raise RootfsError(f"layer directory {directory} of snapshotter {snapshotter} is not a directory here")
    lowerdir = ":".join(directories)
    if len(lowerdir) > MAX_LOWERDIR:
        raise RootfsError(f"the root filesystem has {len(directories)} layers, too many for one overlay mount")
    return lowerdir


def _base_manifest(client: ContainerdClient, namespace: str, checkpoint: CheckpointImage) -> Descriptor | None:
    base = checkpoint.base_manifest
    if base is None and checkpoint.base_name is not None:
        base = client.image(namespace, checkpoint.base_name)
    if base is None:
        return None
    if base.media_type in INDEXES:
        base = _platform_manifest(client, namespace, base)
    if base.media_type not in MANIFESTS:
        raise CheckpointImageError(f"the base image of {checkpoint.name!r} is {base.media_type}, not an image manifest")
    return base


def _platform_manifest(client: ContainerdClient, namespace: str, index: Descriptor) -> Descriptor:
    architecture = _ARCHITECTURES.get(platform.machine(), platform.machine())
    for item in read_json(client, namespace, index).get("manifests") or []:
        wanted = isinstance(item, dict) and item.get("platform") or {}
        if wanted.get("os") == "linux" and wanted.get("architecture") == architecture:
            try:
                return Descriptor.from_json(item)
            except ValueError as error:
                raise CheckpointImageError(f"base image index {index.digest}: {error}") from None
    raise CheckpointImageError(f"base image index {index.digest} has no manifest for linux/{architecture}")


def _unpack(client, namespace, snapshotter, layers, diff_ids, config, names, cancel) -> None:
    """Commit a snapshot for every chain id that is missing, bottom up, like containerd's unpacker."""
    chain = chain_ids(diff_ids)
    missing = len(chain)
    while missing > 0 and not client.snapshot_exists(namespace, snapshotter, chain[missing - 1]):
        missing -= 1
    if missing == len(chain):
        return
    logger.info("unpacking {} layer(s) of the base image onto snapshotter {}", len(chain) - missing, snapshotter)
    for position in range(missing, len(chain)):
        _check(cancel)
        key = names.unpack(position)
        parent = chain[position - 1] if position else ""
        try:
            client.remove_snapshot(namespace, snapshotter, key)
        except ContainerdNotFound:
            pass
        mounts = client.prepare_snapshot(namespace, snapshotter, key, parent, lease=names.lease)
        try:
            applied = client.apply_layer(namespace, layers[position], mounts, lease=names.lease)
            if applied.digest != diff_ids[position]:
                raise CheckpointImageError(
                    f"layer {layers[position].digest} unpacks to {applied.digest}, not the diff id its config names"
                )
            client.commit_snapshot(namespace, snapshotter, chain[position], key, lease=names.lease)
        except ContainerdAlreadyExists:
            pass  # unpacked meanwhile by someone else
        finally:
            try:
                client.remove_snapshot(namespace, snapshotter, key)
            except ContainerdNotFound:
                pass  # committed: the key is gone
    # As containerd's unpacker does: the config refers to the top snapshot, which keeps the stack
    # from the garbage collector for as long as the image exists, whatever becomes of cer's lease.
    client.set_content_labels(namespace, config.digest, {f"{_GC_SNAPSHOT_LABEL}{snapshotter}": chain[-1]})


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the rootfs build was cancelled")
