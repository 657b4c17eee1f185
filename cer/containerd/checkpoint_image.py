"""What a checkpoint image in containerd holds, as ``ctr c checkpoint --rw --image --task`` writes it.

The image's target is an OCI index whose "manifests" are the checkpoint's parts, told apart by media
type: the CRIU images (a plain tar), the container's rw layer (a gzipped layer tar), the base image's
manifest, the spec and runtime options. The index's annotations name the base image and the
snapshotter its root filesystem was on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cer.containerd.client import ContainerdClient, Descriptor
from cer.errors import CheckpointImageError

CRIU_ARCHIVE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
RW_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEXES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFESTS = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
IMAGE_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
SNAPSHOTTER_ANNOTATION = "io.containerd.checkpoint.snapshotter"
DEFAULT_SNAPSHOTTER = "overlayfs"
# Indexes, manifests and configs are small JSON documents; anything much bigger is not one.
MAX_DOCUMENT = 4 << 20


@dataclass(frozen=True)
class CheckpointImage:
    """The parts of one checkpoint image that cer uses."""

    name: str
    index: Descriptor
    criu_archive: Descriptor
    rw_layer: Descriptor | None
    base_manifest: Descriptor | None
    base_name: str | None
    snapshotter: str


def find_checkpoint(client: ContainerdClient, namespace: str, name: str) -> CheckpointImage:
    """Look the checkpoint image ``name`` up in ``namespace`` and read its index.

    ContainerdNotFound when there is no such image; CheckpointImageError when it is not a checkpoint.
    """
    target = client.image(namespace, name)
    if target.media_type not in INDEXES:
        raise CheckpointImageError(
            f"image {name!r} is not a checkpoint: its target is {target.media_type or 'untyped'}, not an image index"
        )
    index = read_json(client, namespace, target)
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise CheckpointImageError(f"the index of {name!r} ({target.digest}) has no manifests list")
    try:
        parts = [Descriptor.from_json(item) for item in manifests]
    except ValueError as error:
        raise CheckpointImageError(f"the index of {name!r} ({target.digest}): {error}") from None
    annotations = index.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise CheckpointImageError(f"the index of {name!r} ({target.digest}) has malformed annotations")

    archives = [part for part in parts if part.media_type == CRIU_ARCHIVE]
    if len(archives) != 1:
        raise CheckpointImageError(
            f"image {name!r} is not a task checkpoint: its index holds {len(archives)} CRIU archives ({CRIU_ARCHIVE}), "
            "expected one (was it made with `ctr c checkpoint --task`?)"
        )
    layers = [part for part in parts if part.media_type == RW_LAYER]
    if len(layers) > 1:
        raise CheckpointImageError(f"image {name!r} holds {len(layers)} rw layers, expected at most one")
    bases = [part for part in parts if part.media_type in MANIFESTS or part.media_type in INDEXES]
    if len(bases) > 1:
        raise CheckpointImageError(f"image {name!r} holds {len(bases)} base image manifests, expected at most one")
    base_name = annotations.get(IMAGE_NAME_ANNOTATION)
    snapshotter = annotations.get(SNAPSHOTTER_ANNOTATION) or DEFAULT_SNAPSHOTTER
    if not isinstance(snapshotter, str) or not snapshotter.isidentifier():
        raise CheckpointImageError(f"image {name!r} names an invalid snapshotter {snapshotter!r}")
    return CheckpointImage(
        name=name,
        index=target,
        criu_archive=archives[0],
        rw_layer=layers[0] if layers else None,
        base_manifest=bases[0] if bases else None,
        base_name=base_name if isinstance(base_name, str) and base_name else None,
        snapshotter=snapshotter,
    )


def read_json(client: ContainerdClient, namespace: str, descriptor: Descriptor) -> dict:
    """A small JSON document (index, manifest, config) from the content store."""
    data = client.read_blob(namespace, descriptor, MAX_DOCUMENT)
    try:
        document = json.loads(data)
    except ValueError as error:
        raise CheckpointImageError(f"{descriptor.digest} ({descriptor.media_type}) is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise CheckpointImageError(f"{descriptor.digest} ({descriptor.media_type}) is not a JSON object")
    return document
