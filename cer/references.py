"""Checkpoint references: which checkpoint a pool, a request or a directory belongs to.

Names and namespaces come from clients and config files; they are never used as paths. Anything
that needs a file name uses ``CheckpointRef.key``, a digest.
"""

import hashlib
import re
from dataclasses import dataclass

from cer.documents import reject_unknown
from cer.errors import BadRequest

# containerd's own rule for namespace names (pkg/namespaces/validate.go).
_CONTAINERD_NAMESPACE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
_MAX_NAME = 1024
_MAX_NAMESPACE = 76
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A checkpoint: its name (a containerd image name, or any label for an on-disk checkpoint) and
    the containerd namespace it lives in."""

    name: str
    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_namespace(self.namespace)

    @property
    def key(self) -> str:
        """A digest that names this checkpoint on disk; safe whatever the name holds."""
        return hashlib.sha256(f"{self.namespace}\0{self.name}".encode()).hexdigest()

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_wire(cls, value: object, field: str = "ref") -> "CheckpointRef":
        """Parse the protocol's ``{"name": N, "labels": {"namespace": NS}}``."""
        if not isinstance(value, dict):
            raise BadRequest(f"{field} must be an object with a name")
        reject_unknown(value, {"name", "labels"}, field)
        labels = value.get("labels", {})
        if labels is None:
            labels = {}
        if not isinstance(labels, dict):
            raise BadRequest(f"{field}.labels must be an object")
        namespace = labels.get("namespace", DEFAULT_NAMESPACE)
        try:
            return cls(value.get("name"), namespace)  # type: ignore[arg-type]
        except BadRequest as error:
            raise BadRequest(f"{field}: {error}") from None

    def to_wire(self) -> dict:
        return {"name": self.name, "labels": {"namespace": self.namespace}}


def validate_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise BadRequest("name must be a non-empty string")
    if len(name) > _MAX_NAME:
        raise BadRequest(f"name is longer than {_MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest("name holds control characters")


def validate_namespace(namespace: object) -> None:
    if not isinstance(namespace, str) or not _CONTAINERD_NAMESPACE.match(namespace):
        raise BadRequest(f"namespace {namespace!r} is not a valid containerd namespace name")
    if len(namespace) > _MAX_NAMESPACE:
        raise BadRequest(f"namespace is longer than {_MAX_NAMESPACE} characters")
