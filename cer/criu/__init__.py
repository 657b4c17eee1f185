"""Reading CRIU image files: the namespaces of a checkpoint's root task that cer rebuilds.

``images`` reads single image files (CRIU's framing, checked against the file's size);
``checkpoint`` turns an image directory into frozen contents; ``criu.proto`` is the schema.
"""

from cer.criu.checkpoint import (
    CheckpointContents,
    IpcContents,
    MessageQueue,
    SemaphoreSet,
    ShmSegment,
    UtsContents,
    read_checkpoint,
)

__all__ = [
    "CheckpointContents",
    "IpcContents",
    "MessageQueue",
    "SemaphoreSet",
    "ShmSegment",
    "UtsContents",
    "read_checkpoint",
]
