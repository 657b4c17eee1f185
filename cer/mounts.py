"""The container's mount tree in a pooled mount namespace: planned from the checkpoint, mounted in a thread.

:func:`plan_mounts` turns the mounts a checkpoint's ``mountpoints-*.img`` lists (a
:class:`~cer.criu.mountpoints.MountTree`) into an ordered, frozen :class:`MountPlan`; :func:`mount_tree`
makes those mounts under a rootfs, in the calling thread's mount namespace, and restores each tmpfs's
contents into it; :func:`unmount_tree` detaches all of it again.

What cer mounts, and what it leaves to the restore (``MountStep.deferred`` says why, per mount):

- **tmpfs** mounts (/dev, /dev/shm, /run, /tmp, the tmpfs runc puts over masked directories...) with
  their options and flags, their contents restored from the checkpoint's tar images (see
  :mod:`cer.criu.tmpfs` for what is refused). Device nodes are created only in the tmpfs at /dev and
  only those a container runtime makes there (null, zero, full, random, urandom, tty); the host's
  devices are never reachable (a devtmpfs in the image is an error).
- **devpts** as a new instance with its options (gid, mode, ptmxmode).
- **binds** of a part of a filesystem mounted in the tree (runc's masks: /dev/null over a masked file
  is a bind from the container's own /dev tmpfs) or of the container's root filesystem; then remounted
  with their recorded flags (ro, nosuid, nodev, noexec, atime).
- **external binds** (entries with an ``ext_key``, made by ``runc checkpoint`` for the bind mounts of
  the container's config): the host path comes from the ``external`` mapping given to
  :func:`plan_mounts` (key to host path, as ``criu restore --ext-mount-map KEY:PATH`` takes it); a key
  without one fails the pool's mount namespaces with a message that names the mount.
- The root mount is replaced by the pool's overlay; its flags (a read-only root) are applied last.

Deferred to the restore, because these filesystems belong to a namespace that does not exist before
the restore creates it, and mounting them from the building thread would show the host's:

- **proc** shows the PID namespace of whoever mounts it: here, every process of the host;
- **sysfs** shows the network devices of the mounter's network namespace: here, the host's;
- **mqueue** shows the POSIX message queues of the mounter's IPC namespace: here, the host's; a
  throwaway IPC namespace would show queues no process of the container can reach (``mq_open`` uses
  the task's own), so the restore mounts it once the container's IPC namespace is in place;
- **cgroup**/**cgroup2**: the container's cgroup exists only once the restore creates it;
- a bind of a pseudo-terminal (a container's /dev/console), which the restore re-creates;
- and every mount inside or bound from one of these (runc's read-only and masked paths in /proc and
  /sys, the tmpfs at /sys/fs/cgroup). Their mount points are made; :func:`mount_tree` with
  ``restore=True`` makes them, run where the restored container's namespaces are.

Mount propagation is not reproduced: every mount of a pooled namespace is private (runc's default
``rprivate``).

Paths inside the rootfs are resolved as if the rootfs were ``/``: a symbolic link in the container's
image never leads a mount, a created mount point or a file outside it.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cer.criu.mountpoints import MountEntry, MountTree
from cer.criu.tmpfs import TmpfsContents, entries_with_data
from cer.errors import MountError
from cer.mounting import ALLOWED_DEVICES, allowed_device, mount_tree, restore_contents, unmount_tree

__all__ = ["MountPlan", "MountStep", "mount_tree", "plan_document", "plan_mounts", "restore_contents",
           "restore_plan_document", "unmount_tree"]

NAMESPACE_BOUND = {
    "proc": "a proc mount shows the PID namespace of whoever mounts it (here: every process of the host); "
            "the container's PID namespace exists only once the restore creates it",
    "sysfs": "a sysfs mount shows the network devices of the mounter's network namespace (here: the host's); "
             "the container's network namespace exists only once the restore creates it",
    "mqueue": "an mqueue mount shows the POSIX queues of the mounter's IPC namespace (here: the host's); "
              "the container's IPC namespace is joined or created by the restore",
    "cgroup": "the container's cgroup exists only once the restore creates it",
    "cgroup2": "the container's cgroup exists only once the restore creates it",
}
_FRESH = ("tmpfs", "devpts", *NAMESPACE_BOUND)
_PTY_ROOTS = ("/", "/ptmx")


@dataclass(frozen=True)
class MountStep:
    """One mount to make. ``action``: ``mount`` a new filesystem (``source`` its source name), ``bind``
    a path of the container's tree made before it (``source`` that container path), or ``host``: bind a
    host path (``source``; "" when the restore supplies it for ``entry.ext_key``)."""

    entry: MountEntry
    action: str
    source: str
    contents: TmpfsContents | None = None
    deferred: str | None = None


@dataclass(frozen=True)
class MountPlan:
    """The mounts of a checkpoint's tree in the order to make them (a mount after its parent and after
    what it binds), the root's flags, and what cannot be reproduced (``problems``: building fails)."""

    root_flags: int
    steps: tuple[MountStep, ...]
    problems: tuple[str, ...] = ()

    @property
    def ready(self) -> tuple[MountStep, ...]:
        """What cer mounts in a pooled namespace."""
        return tuple(step for step in self.steps if step.deferred is None)

    @property
    def deferred(self) -> tuple[MountStep, ...]:
        """What the restore mounts (``mount_tree(..., restore=True)``)."""
        return tuple(step for step in self.steps if step.deferred is not None)

    @property
    def restore_mounts_proc(self) -> bool:
        """Whether the restore mounts a proc at /proc, and CRIU then finds /proc/sys only if the pool put one
        there (:func:`cer.mounting.mount_restore_sysctls`)."""
        return any(step.entry.fstype == "proc" and step.entry.mountpoint == "/proc" for step in self.deferred)


def plan_mounts(tree: MountTree, external: Mapping[str, str] | None = None) -> MountPlan:
    """Decide, for every mount of ``tree``, how it is made and whether cer or the restore makes it.

    ``external`` maps the keys of external bind mounts to host paths. Mounts that cannot be reproduced
    are listed in ``problems`` (each message names the mount) instead of raising, so that a checkpoint
    whose mount tree is unusable still gives its IPC and UTS namespaces.
    """
    external = dict(external or {})
    problems: list[str] = []
    # The mount that shows each superblock whole, made fresh; other mounts of it are binds from there.
    fresh: dict[int, MountEntry] = {}
    for entry in tree.mounts:
        if entry.ext_key is None and entry.root == "/" and entry.fstype in _FRESH and entry.root_dev not in fresh:
            fresh[entry.root_dev] = entry
    steps: dict[int, MountStep] = {}
    depends: dict[int, set[int]] = {}
    for entry in tree.mounts:
        after = {entry.parent_mnt_id} - {tree.root.mnt_id}
        try:
            step, source_id = _step(tree, entry, fresh, external)
        except MountError as error:
            problems.append(str(error))
            continue
        if source_id is not None and source_id != entry.mnt_id:
            after.add(source_id)
        steps[entry.mnt_id] = step
        depends[entry.mnt_id] = after
    ordered = _order(tree, steps, depends, problems)
    return MountPlan(tree.root.flags, tuple(ordered), tuple(problems))


def _step(tree: MountTree, entry: MountEntry, fresh: dict[int, MountEntry],
          external: dict[str, str]) -> tuple[MountStep, int | None]:
    """How ``entry`` is made, and the mount id of the mount it binds from (None: none in the tree)."""
    what = f"mount {entry.describe()}"
    if entry.deleted:
        raise MountError(f"{what}: its mount point was deleted before the dump")
    if entry.with_plugin:
        raise MountError(f"{what}: made by a CRIU plugin, which cer does not have")
    if entry.fstype == "devtmpfs":
        raise MountError(f"{what}: a devtmpfs would give the container the host's devices")
    origin = fresh.get(entry.root_dev)
    if origin is not None and origin is not entry:
        # Another view of a filesystem the tree mounts whole (runc's masks: the container's /dev/null
        # over /proc/keys, recorded as external with the key /dev/null; read-only binds of /proc/sys).
        if origin.fstype == "devpts" and entry.root not in _PTY_ROOTS:
            return MountStep(entry, "bind", _join(origin.mountpoint, entry.root),
                             deferred="a pseudo-terminal, which the restore re-creates"), origin.mnt_id
        return MountStep(entry, "bind", _join(origin.mountpoint, entry.root)), origin.mnt_id
    if entry.ext_key is not None:
        if entry.fstype in ("cgroup", "cgroup2"):
            return MountStep(entry, "host", "", deferred=NAMESPACE_BOUND[entry.fstype]), None
        host = external.get(entry.ext_key)
        if host is None:
            raise MountError(f"{what}: an external bind mount (key {entry.ext_key!r}) and no host path is "
                             "configured for that key")
        if not os.path.isabs(host):
            raise MountError(f"{what}: the host path {host!r} for key {entry.ext_key!r} is not absolute")
        return MountStep(entry, "host", host), None
    if origin is entry:
        if entry.fstype in NAMESPACE_BOUND:
            return MountStep(entry, "mount", entry.source, tree.contents(entry.root_dev),
                             deferred=NAMESPACE_BOUND[entry.fstype]), None
        contents = tree.contents(entry.root_dev)
        if contents is not None:
            _check_devices(what, entry, contents)
        return MountStep(entry, "mount", entry.source, contents), None
    if entry.root_dev == tree.root.root_dev and _below(entry.root, tree.root.root):
        # A bind of a part of the container's own root filesystem.
        return MountStep(entry, "bind", _join("/", os.path.relpath(entry.root, tree.root.root))), None
    if entry.fstype in _FRESH:
        raise MountError(f"{what}: shows {entry.root} of a filesystem that no mount of the checkpoint shows whole")
    raise MountError(f"{what}: cer cannot mount {entry.fstype} filesystems; only tmpfs, devpts, binds within "
                     "the container and external binds with a configured host path")


def _check_devices(what: str, entry: MountEntry, contents: TmpfsContents) -> None:
    if not contents.devices:
        return
    if entry.mountpoint != "/dev":
        names = ", ".join(device.name for device in contents.devices[:5])
        raise MountError(f"{what}: holds device nodes ({names}); cer creates device nodes only in /dev")
    refused = [device for device in contents.devices if not allowed_device(device)]
    if refused:
        names = ", ".join(f"{d.name} ({d.kind[:-3]} {d.device[0]}:{d.device[1]})" for d in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        allowed = ", ".join(f"{name} {major}:{minor}" for (major, minor), name in ALLOWED_DEVICES.items())
        raise MountError(f"{what}: holds device nodes a container must not get from cer: {names}{more} (a privileged "
                         f"container's /dev holds the host's devices; cer creates only {allowed})")


def _order(tree: MountTree, steps: dict[int, MountStep], depends: dict[int, set[int]],
           problems: list[str]) -> list[MountStep]:
    """Steps after their parent and their bind source, else in the tree's order; deferral is inherited."""
    position = {entry.mnt_id: index for index, entry in enumerate(tree.mounts)}
    waiting = {mnt_id: {d for d in after if d in steps} for mnt_id, after in depends.items()}
    for mnt_id, after in depends.items():
        missing = [d for d in after if d not in steps]
        if missing:
            problems.append(f"mount {steps[mnt_id].entry.describe()}: depends on a mount cer cannot make")
            waiting[mnt_id] = {-1}  # never ready
    dependents: dict[int, list[int]] = {}
    for mnt_id, after in waiting.items():
        for d in after:
            dependents.setdefault(d, []).append(mnt_id)
    ready = [(position[m], m) for m, after in waiting.items() if not after]
    heapq.heapify(ready)
    ordered: list[MountStep] = []
    deferred_ids: dict[int, str] = {}
    while ready:
        _, mnt_id = heapq.heappop(ready)
        step = steps[mnt_id]
        if step.deferred is None:
            reason = next((f"inside or bound from {steps[d].entry.mountpoint}, which the restore mounts"
                           for d in sorted(depends[mnt_id]) if d in deferred_ids), None)
            if reason is not None:
                step = MountStep(step.entry, step.action, step.source, step.contents, reason)
        if step.deferred is not None:
            deferred_ids[mnt_id] = step.deferred
        ordered.append(step)
        for dependent in dependents.get(mnt_id, ()):
            waiting[dependent].discard(mnt_id)
            if not waiting[dependent]:
                heapq.heappush(ready, (position[dependent], dependent))
    stuck = [steps[m].entry.describe() for m, after in waiting.items() if after and -1 not in after]
    if stuck:
        problems.append(f"mounts that depend on each other in a cycle: {', '.join(stuck)}")
    return ordered


def _join(base: str, path: str) -> str:
    return "/" + "/".join(part for part in f"{base}/{path}".split("/") if part not in ("", "."))


def _below(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def restore_plan_document(tree: MountTree) -> dict:
    """What a restore into a pooled mount namespace of ``tree``'s checkpoint mounts itself, as plain data
    (:func:`plan_document`). External binds are the pool's to make, whatever their host paths: they are planned
    with placeholders here, so that only what a restore can meet stays a problem."""
    placeholders = {entry.ext_key: "/" for entry in tree.mounts if entry.ext_key is not None}
    return plan_document(plan_mounts(tree, placeholders))


def plan_document(plan: MountPlan, *, deferred_only: bool = True) -> dict:
    """``plan`` as plain data for :func:`cer.mounting.plan_from_document`: by default only the steps a
    restore makes (what a restore's action script needs); plain data (:func:`cer.mounting.encode_plan`)."""
    def contents(found: TmpfsContents | None) -> dict | None:
        if found is None:
            return None
        # A plan holds the files' bytes, also those a large archive left on disk (an action script reads no archive).
        entries = [{**dataclasses.asdict(item), "data": data if isinstance(data, bytes) else data.read()}
                   for item, data in entries_with_data(found)]
        root = None if found.root is None else dataclasses.asdict(found.root)
        return {"image": found.image, "root": root, "entries": entries, "size": found.size}

    steps = plan.deferred if deferred_only else plan.steps
    return {"root_flags": plan.root_flags, "problems": list(plan.problems), "steps": [
        {"entry": {**dataclasses.asdict(step.entry), "description": step.entry.describe()}, "action": step.action,
         "source": step.source, "contents": contents(step.contents), "deferred": step.deferred} for step in steps]}
