"""Reading CRIU image files: the namespaces of a checkpoint's root task that cer rebuilds.

``images`` reads single image files (CRIU's framing, checked against the file's size);
``checkpoint`` turns an image directory into frozen contents, with ``mountpoints`` (the mount tree)
and ``tmpfs`` (tmpfs contents from their tar images); ``views`` makes image views for restores that
join cer's namespaces; ``criu.proto`` is the schema. The reader holds data and makes no syscalls: what is
decided against a live namespace (is a checkpoint's IPC namespace a fresh one?) is the namespace layer's.

The names below are loaded on first use: runtime wrappers import ``cer.criu.views`` on every restore
and must not pay for the image reader (protobuf) they do not use.
"""

import importlib

_EXPORTS = {
    "CheckpointContents": "checkpoint",
    "IpcContents": "checkpoint",
    "MessageQueue": "checkpoint",
    "SemaphoreSet": "checkpoint",
    "ShmPages": "checkpoint",
    "ShmSegment": "checkpoint",
    "UtsContents": "checkpoint",
    "read_checkpoint": "checkpoint",
    "MountEntry": "mountpoints",
    "MountTree": "mountpoints",
    "TmpfsContents": "tmpfs",
    "TmpfsEntry": "tmpfs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
