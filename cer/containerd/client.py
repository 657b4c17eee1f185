"""A small blocking client for the parts of containerd's gRPC API that cer uses.

Every call names the containerd namespace it acts in (sent as the ``containerd-namespace`` metadata,
as containerd's own clients do) and, when it creates something that must outlive the call, the lease
that keeps it from containerd's garbage collector (``containerd-lease``). Calls are bounded: unary
calls by the client's timeout, blob reads and layer applies by the timeout plus the time the blob's
size takes at a slow rate. gRPC failures come out as ``ContainerdError`` and its subclasses, whose
messages name the call.

Blocking: use it from a thread of its own, never from an actor's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import field_mask_pb2

from cer.containerd.api import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    mount_pb2,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from cer.errors import (
    ContainerdAlreadyExists,
    ContainerdError,
    ContainerdFailedPrecondition,
    ContainerdNotFound,
    ContainerdUnavailable,
)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_TIMEOUT = 10.0
# Blob reads and layer applies get this much more time per byte of the blob (a slow disk's rate).
_SLOW_BYTES_PER_SECOND = 4 << 20

_NAMESPACE_HEADER = "containerd-namespace"
_LEASE_HEADER = "containerd-lease"

# gRPC's default reconnect backoff grows to two minutes: a containerd that comes back would go
# unnoticed that long. The extractor has its own backoff; the channel only has to try again soon.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 16 << 20),
]


_ERRORS = {
    grpc.StatusCode.UNAVAILABLE: ContainerdUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ContainerdUnavailable,
    grpc.StatusCode.CANCELLED: ContainerdUnavailable,
    grpc.StatusCode.NOT_FOUND: ContainerdNotFound,
    grpc.StatusCode.ALREADY_EXISTS: ContainerdAlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: ContainerdFailedPrecondition,
}


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor: a blob's media type, digest and size, and its annotations."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, message: descriptor_pb2.Descriptor) -> Descriptor:
        return cls(message.media_type, message.digest, message.size, dict(message.annotations))

    @classmethod
    def from_json(cls, value: object) -> Descriptor:
        """From a descriptor in an OCI index or manifest; ValueError when it is not one."""
        if not isinstance(value, dict):
            raise ValueError("a descriptor must be a JSON object")
        media_type, digest, size = value.get("mediaType", ""), value.get("digest"), value.get("size")
        annotations = value.get("annotations") or {}
        if not isinstance(media_type, str) or not isinstance(digest, str) or not digest:
            raise ValueError(f"descriptor {value!r} has no media type or digest")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"descriptor of {digest} has no valid size")
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise ValueError(f"descriptor of {digest} has invalid annotations")
        return cls(media_type, digest, size, dict(annotations))

    def to_proto(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(
            media_type=self.media_type, digest=self.digest, size=self.size, annotations=dict(self.annotations)
        )


@dataclass(frozen=True)
class Mount:
    """A mount a snapshotter hands out, in mount(2) terms."""

    type: str
    source: str
    options: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, message: mount_pb2.Mount) -> Mount:
        return cls(message.type, message.source, tuple(message.options))

    def to_proto(self) -> mount_pb2.Mount:
        return mount_pb2.Mount(type=self.type, source=self.source, options=list(self.options))


class ContainerdClient:
    """One gRPC channel to containerd's socket at ``address``; close it when done."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(address)}", options=_CHANNEL_OPTIONS)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._diff = diff_pb2_grpc.DiffStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- images and content -------------------------------------------------------------------------

    def image(self, namespace: str, name: str) -> Descriptor:
        """The target descriptor of image ``name``."""
        reply = self._call(f"image {name!r}", namespace, self._images.Get, images_pb2.GetImageRequest(name=name))
        return Descriptor.from_proto(reply.image.target)

    def content_labels(self, namespace: str, digest: str) -> dict[str, str]:
        reply = self._call(f"content info of {digest}", namespace, self._content.Info, content_pb2.InfoRequest(digest=digest))
        return dict(reply.info.labels)

    def set_content_labels(self, namespace: str, digest: str, labels: Mapping[str, str]) -> None:
        """Set these labels on a blob, leaving its others as they are."""
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{key}" for key in labels]),
        )
        self._call(f"labelling {digest}", namespace, self._content.Update, request)

    def read(self, namespace: str, descriptor: Descriptor) -> Iterator[bytes]:
        """Stream the blob ``descriptor`` names, in containerd's chunks.

        Raises ContainerdError when containerd sends data out of order or more or less than the
        descriptor's size: what comes out is exactly ``descriptor.size`` bytes, in order.
        """
        what = f"reading {descriptor.digest}"
        request = content_pb2.ReadContentRequest(digest=descriptor.digest)
        timeout = self.timeout + descriptor.size / _SLOW_BYTES_PER_SECOND
        stream = self._content.Read(request, timeout=timeout, metadata=_metadata(namespace))
        offset = 0
        try:
            for reply in stream:
                if reply.offset != offset:
                    raise ContainerdError(f"{what}: containerd sent data for offset {reply.offset}, expected {offset}")
                offset += len(reply.data)
                if offset > descriptor.size:
                    raise ContainerdError(f"{what}: containerd sent more than the {descriptor.size} bytes of its descriptor")
                if reply.data:
                    yield reply.data
        except grpc.RpcError as error:
            raise _translate(error, what) from None
        finally:
            stream.cancel()
        if offset != descriptor.size:
            raise ContainerdError(f"{what}: containerd sent {offset} bytes, its descriptor says {descriptor.size}")

    def read_blob(self, namespace: str, descriptor: Descriptor, limit: int) -> bytes:
        """A whole small blob (an index, a manifest, a config); refuses one larger than ``limit``."""
        if descriptor.size > limit:
            raise ContainerdError(f"{descriptor.digest} ({descriptor.media_type}) is {descriptor.size} bytes, more than {limit}")
        data = b"".join(self.read(namespace, descriptor))
        algorithm, _, expected = descriptor.digest.partition(":")
        if algorithm == "sha256" and hashlib.sha256(data).hexdigest() != expected:
            raise ContainerdError(f"{descriptor.digest}: containerd sent content with another digest")
        return data

    # -- leases -------------------------------------------------------------------------------------

    def create_lease(self, namespace: str, lease_id: str, labels: Mapping[str, str] | None = None) -> None:
        request = leases_pb2.CreateRequest(id=lease_id, labels=dict(labels or {}))
        self._call(f"creating lease {lease_id}", namespace, self._leases.Create, request)

    def delete_lease(self, namespace: str, lease_id: str) -> None:
        self._call(f"deleting lease {lease_id}", namespace, self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id))

    def lease_ids(self, namespace: str) -> list[str]:
        reply = self._call("listing leases", namespace, self._leases.List, leases_pb2.ListRequest())
        return [lease.id for lease in reply.leases]

    # -- snapshots ----------------------------------------------------------------------------------

    def snapshot_exists(self, namespace: str, snapshotter: str, key: str) -> bool:
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._call(f"stat of snapshot {key}", namespace, self._snapshots.Stat, request)
        except ContainerdNotFound:
            return False
        return True

    def prepare_snapshot(
        self, namespace: str, snapshotter: str, key: str, parent: str, lease: str | None = None
    ) -> list[Mount]:
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        reply = self._call(f"preparing snapshot {key}", namespace, self._snapshots.Prepare, request, lease)
        return [Mount.from_proto(mount) for mount in reply.mounts]

    def view_snapshot(self, namespace: str, snapshotter: str, key: str, parent: str, lease: str | None = None) -> list[Mount]:
        request = snapshots_pb2.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        reply = self._call(f"viewing snapshot {parent} as {key}", namespace, self._snapshots.View, request, lease)
        return [Mount.from_proto(mount) for mount in reply.mounts]

    def snapshot_mounts(self, namespace: str, snapshotter: str, key: str) -> list[Mount]:
        request = snapshots_pb2.MountsRequest(snapshotter=snapshotter, key=key)
        reply = self._call(f"mounts of snapshot {key}", namespace, self._snapshots.Mounts, request)
        return [Mount.from_proto(mount) for mount in reply.mounts]

    def commit_snapshot(
        self,
        namespace: str,
        snapshotter: str,
        name: str,
        key: str,
        lease: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=dict(labels or {}))
        self._call(f"committing snapshot {key} as {name}", namespace, self._snapshots.Commit, request, lease)

    def remove_snapshot(self, namespace: str, snapshotter: str, key: str) -> None:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(f"removing snapshot {key}", namespace, self._snapshots.Remove, request)

    # -- diff -----------------------------------------------------------------------------------------

    def apply_layer(self, namespace: str, layer: Descriptor, mounts: list[Mount], lease: str | None = None) -> Descriptor:
        """Unpack the layer blob onto ``mounts`` (an active snapshot); returns the uncompressed layer."""
        request = diff_pb2.ApplyRequest(diff=layer.to_proto(), mounts=[mount.to_proto() for mount in mounts])
        # Applying a layer reads it, decompresses it and writes every file: allow for its size.
        timeout = self.timeout + 4 * layer.size / _SLOW_BYTES_PER_SECOND
        reply = self._call(f"applying layer {layer.digest}", namespace, self._diff.Apply, request, lease, timeout)
        return Descriptor.from_proto(reply.applied)

    # -- internals ------------------------------------------------------------------------------------

    def _call(self, what, namespace, method, request, lease=None, timeout=None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=_metadata(namespace, lease))
        except grpc.RpcError as error:
            raise _translate(error, what) from None


def _metadata(namespace: str, lease: str | None = None) -> tuple[tuple[str, str], ...]:
    if lease is None:
        return ((_NAMESPACE_HEADER, namespace),)
    return ((_NAMESPACE_HEADER, namespace), (_LEASE_HEADER, lease))


def _translate(error: grpc.RpcError, what: str) -> ContainerdError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _ERRORS.get(code, ContainerdError)
    name = code.name.lower() if code is not None else "error"
    return cls(f"{what}: {name}: {details}")
