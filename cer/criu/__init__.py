"""Reading CRIU image files: the namespaces of a checkpoint's root task that cer rebuilds.

``images`` reads single image files (CRIU's framing, checked against the file's size);
``checkpoint`` turns an image directory into frozen contents, with ``mountpoints`` (the mount tree)
and ``tmpfs`` (tmpfs contents from their tar images); ``criu.proto`` is the schema.
"""

from cer.criu.checkpoint import (
    CheckpointContents,
    IpcContents,
    MessageQueue,
    SemaphoreSet,
    ShmPages,
    ShmSegment,
    UtsContents,
    read_checkpoint,
)
from cer.criu.mountpoints import MountEntry, MountTree
from cer.criu.tmpfs import TmpfsContents, TmpfsEntry

__all__ = [
    "CheckpointContents",
    "IpcContents",
    "MessageQueue",
    "MountEntry",
    "MountTree",
    "SemaphoreSet",
    "ShmPages",
    "ShmSegment",
    "TmpfsContents",
    "TmpfsEntry",
    "UtsContents",
    "read_checkpoint",
]
