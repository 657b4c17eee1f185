"""The "mnt" view of a checkpoint: images with which stock CRIU joins a prepared mount namespace untouched.

CRIU restores the mount tree of every mount namespace it did not share with the dumping CRIU, even when told
to join one (``join-ns mnt``: CRIU 4.1.1 still keeps CLONE_NEWNS in the root task's namespace mask, then
rebuilds the tree and fails against the joined one). Which namespaces it shared, it reads from inventory.img:
``root_ids`` are the dumping CRIU's own ids, and a task whose ``mnt_ns_id`` equals ``root_ids.mnt_ns_id``
was in CRIU's mount namespace. So a view whose inventory says so (``root_ids.mnt_ns_id`` := the root task's
``mnt_ns_id`` from ``ids-<pid>.img``) makes CRIU leave CLONE_NEWNS out and not touch mounts at all: the task
lands in the namespace it joins, whose root must then be the container's root (cer's pooled mount
namespaces are pivoted into theirs). Every other image stays the checkpoint's own.

The transform is pure (bytes in, bytes out) so that the daemon's view machinery
(:mod:`cer.criu.views`) can run it once per checkpoint and share the result: :func:`share_mount_namespace`
rewrites inventory.img given the root task's ids image; :func:`mnt_view` does the whole view from a reader of
the checkpoint's image files. The view also carries ``restore-mounts.plan`` (CRIU ignores files it does not
know): what the restore's action script mounts (:mod:`cer.restore_mounts`), read from the checkpoint's mount
tree, so that the script reads plain data (:func:`cer.mounting.encode_plan`), not images.
"""

from __future__ import annotations

from collections.abc import Callable

from cer.criu.images import IDS, INVENTORY, PSTREE, ImageReader, encode_image, read_single_entry
from cer.errors import ImageError
from cer.mounting import PLAN_NAME as RESTORE_PLAN_NAME
from cer.mounting import encode_plan

INVENTORY_NAME = "inventory.img"


def share_mount_namespace(inventory: bytes, root_ids: bytes) -> bytes:
    """inventory.img with ``root_ids.mnt_ns_id`` set to the root task's mount namespace id (read from its
    ``ids-<pid>.img``, ``root_ids``); every other field, known to cer's schema or not, kept as it was."""
    entry = read_single_entry(INVENTORY_NAME, INVENTORY, inventory)
    task = read_single_entry("ids image of the root task", IDS, root_ids)
    if not task.HasField("mnt_ns_id"):
        raise ImageError("ids image of the root task", 0, "no mnt_ns_id: the checkpoint holds no mount namespace id")
    if not entry.HasField("root_ids"):
        raise ImageError(INVENTORY_NAME, 0, "no root_ids: an image set older than CRIU 3, which cer cannot view")
    entry.root_ids.mnt_ns_id = task.mnt_ns_id
    return encode_image(INVENTORY, [entry])


def root_task_pid(pstree: bytes) -> int:
    """The pid of the root task (pstree.img lists it first)."""
    with ImageReader("pstree.img", PSTREE, pstree) as image:
        root = image.read_entry()
        if root is None:
            raise image.error("no task in the process tree")
        return root.pid


def mnt_view(read: Callable[[str], bytes], restore_plan: dict | None = None) -> dict[str, bytes]:
    """The files of the "mnt" view that differ from the checkpoint's: ``{"inventory.img": bytes}``, given
    ``read(name)`` returning the bytes of a checkpoint image file; with ``restore_plan``
    (:func:`cer.mounts.restore_plan_document`) also ``restore-mounts.plan``."""
    pid = root_task_pid(read("pstree.img"))
    files = {INVENTORY_NAME: share_mount_namespace(read(INVENTORY_NAME), read(f"ids-{pid}.img"))}
    if restore_plan is not None:
        files[RESTORE_PLAN_NAME] = encode_plan(restore_plan)
    return files
