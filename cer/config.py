"""The daemon's configuration file, ``ROOT/namespace_service.json``, as the original CER-Manager wrote it.

    {"containerd_checkpoints": [{"name": "CKPT", "namespace": "default", "capacity": 3}],
     "default_capacity": 10}

An entry may also carry ``"path"`` (a directory of CRIU images on disk) and ``"rootfs"`` (the read-only
lower layer of the pool's mount namespaces); relative paths are taken from the config file's folder.
Entries without ``path`` come from containerd.
"""

import logging
import os
from dataclasses import dataclass

from cer.documents import load_object, reject_unknown
from cer.errors import BadRequest, CerError, ConfigError
from cer.files import read_regular_file
from cer.references import CheckpointRef

DEFAULT_ROOT = "/var/lib/cermanager"
CONFIG_NAME = "namespace_service.json"
MAX_CAPACITY = 1000
# Each pool is an actor, threads and up to 3 x MAX_CAPACITY namespaces: requests cannot add them without end.
MAX_POOLS = 256
# Standard logging (routed into loguru by the daemon) keeps clients, which import this module, light.
logger = logging.getLogger(__name__)


def default_endpoint(root: str = DEFAULT_ROOT) -> str:
    return f"ipc://{os.path.join(root, 'daemon.sock')}"


def client_endpoint(endpoint: str | None = None) -> str:
    """What clients connect to: the given endpoint, else $CER_ENDPOINT, else the daemon's default."""
    return endpoint or os.environ.get("CER_ENDPOINT") or default_endpoint()

_ENTRY_FIELDS = {"name", "namespace", "capacity", "max_capacity", "path", "rootfs"}
_TOP_FIELDS = {"containerd_checkpoints", "default_capacity"}
# CRIU writes INVENTORY_MAGIC (0x58313116, little-endian) first or after its service magic.
_INVENTORY_MAGIC = (0x58313116).to_bytes(4, "little")


@dataclass(frozen=True)
class CheckpointEntry:
    """One configured checkpoint and the pool size wanted for it."""

    ref: CheckpointRef
    capacity: int
    path: str | None = None
    rootfs: str | None = None
    max_capacity: int | None = None
    """With a ceiling, the pool is adaptive: between ``capacity`` and this, it keeps as many idle
    namespaces as the busiest second of the last minute asked for."""


@dataclass(frozen=True)
class Config:
    path: str
    default_capacity: int
    checkpoints: tuple[CheckpointEntry, ...]


def validate_capacity(value: object, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be a whole number, not {value!r}")
    if not minimum <= value <= MAX_CAPACITY:
        raise BadRequest(f"{what} must be between {minimum} and {MAX_CAPACITY}, not {value}")
    return value


def load_config(path: str) -> Config:
    """Read and check the whole file; raise ConfigError naming the file, the entry and the problem."""
    try:
        # A link is fine (a Kubernetes config map is one); a FIFO or a device must not hold a reload.
        raw = read_regular_file(path, 1 << 20, follow_links=True)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration: {error.strerror}") from None
    if len(raw) > 1 << 20:
        raise ConfigError(f"{path}: the configuration is larger than 1 MiB")
    try:
        document = load_object(raw, "the configuration")
    except BadRequest as error:
        raise ConfigError(f"{path}: {error}") from None
    for field in sorted(set(document) - _TOP_FIELDS):
        logger.warning("%s: ignoring unknown field %r", path, field)

    base = os.path.dirname(os.path.abspath(path))
    try:
        default_capacity = validate_capacity(document.get("default_capacity", 10), "default_capacity")
    except BadRequest as error:
        raise ConfigError(f"{path}: {error}") from None
    entries = document.get("containerd_checkpoints", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: containerd_checkpoints must be a list")
    if len(entries) > MAX_POOLS:
        raise ConfigError(f"{path}: {len(entries)} checkpoints; at most {MAX_POOLS} are served")

    checkpoints: list[CheckpointEntry] = []
    seen: dict[CheckpointRef, int] = {}
    for index, item in enumerate(entries):
        label = f"containerd_checkpoints[{index}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']!r})"
        try:
            entry = _parse_entry(item, default_capacity, base)
        except CerError as error:
            raise ConfigError(f"{path}: {label}: {error}") from None
        if entry.ref in seen:
            raise ConfigError(f"{path}: {label}: duplicate of containerd_checkpoints[{seen[entry.ref]}] ({entry.ref})")
        seen[entry.ref] = index
        checkpoints.append(entry)
    return Config(path=os.path.abspath(path), default_capacity=default_capacity, checkpoints=tuple(checkpoints))


def _parse_entry(item: object, default_capacity: int, base: str) -> CheckpointEntry:
    if not isinstance(item, dict):
        raise BadRequest("an entry must be an object")
    if "name" not in item:
        raise BadRequest("the entry has no name")
    reject_unknown(item, _ENTRY_FIELDS, "the entry")
    ref = CheckpointRef(item["name"], item.get("namespace", "default"))
    capacity = validate_capacity(item.get("capacity", default_capacity), "capacity")
    max_capacity = item.get("max_capacity")
    if max_capacity is not None:
        validate_capacity(max_capacity, "max_capacity")
        if max_capacity < capacity:
            raise BadRequest(f"max_capacity {max_capacity} is below capacity {capacity}")
    path = _directory(item, "path", base)
    if path is not None:
        validate_image_directory(path)
    rootfs = _directory(item, "rootfs", base)
    if rootfs is not None and path is None:
        raise BadRequest("rootfs goes with path: a checkpoint from containerd brings its own root filesystem")
    if rootfs is not None:
        # The overlay mount options are a comma- and colon-separated list: such paths cannot be told apart.
        if any(c in rootfs for c in ",:"):
            raise BadRequest(f"rootfs {rootfs} holds ',' or ':', which overlayfs options cannot carry")
    return CheckpointEntry(ref=ref, capacity=capacity, path=path, rootfs=rootfs, max_capacity=max_capacity)


def _directory(item: dict, field: str, base: str) -> str | None:
    value = item.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRequest(f"{field} must be a non-empty path")
    directory = os.path.realpath(os.path.join(base, value))
    if not os.path.isdir(directory):
        raise BadRequest(f"{field} {directory} is not a directory")
    return directory


def validate_image_directory(directory: str) -> None:
    """Check that ``directory`` holds CRIU images: its inventory.img must read as one."""
    inventory = os.path.join(directory, "inventory.img")
    try:
        head = read_regular_file(inventory, 8)
    except OSError as error:
        raise BadRequest(f"path {directory} is not a CRIU image directory: {inventory}: {error.strerror}") from None
    if _INVENTORY_MAGIC not in (head[:4], head[4:8]):
        raise BadRequest(f"path {directory} is not a CRIU image directory: {inventory} is not a CRIU inventory image")
