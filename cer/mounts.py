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

import errno
import heapq
import os
import stat
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from cer.criu.mountpoints import (
    MOUNT_FLAGS,
    MS_NOATIME,
    MS_NODIRATIME,
    MS_RDONLY,
    MS_RELATIME,
    MS_STRICTATIME,
    MountEntry,
    MountTree,
)
from cer.criu.tmpfs import ALLOWED_DEVICES, TmpfsContents, TmpfsEntry, allowed_device, entries_with_data
from cer.errors import CerError, ImageError
from cer.linux import namespaces as ns

__all__ = ["MountError", "MountPlan", "MountStep", "mount_tree", "plan_mounts", "restore_contents", "unmount_tree"]

MS_REMOUNT, MS_BIND = ns.MS_REMOUNT, ns.MS_BIND
_ATIME_FLAGS = MS_NOATIME | MS_NODIRATIME | MS_RELATIME | MS_STRICTATIME
_MAX_SYMLINKS = 40
_MAX_DETACH = 64
_COPY_CHUNK = 1 << 20

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


class MountError(CerError):
    """A mount of the checkpoint cannot be reproduced, or making it failed; the message names it."""

    code = "unavailable"


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


def mount_tree(plan: MountPlan, rootfs: str, *, restore: bool = False, external: Mapping[str, str] | None = None,
               timings: dict[str, float] | None = None) -> None:
    """Make the mounts of ``plan`` under ``rootfs``, in the calling thread's mount namespace.

    ``restore=False`` (a pooled namespace): the mounts cer makes, the mount points of the deferred ones,
    then the root's flags. ``restore=True``: the deferred mounts, run where the restored container's
    PID, network, IPC and cgroup namespaces are; ``external`` then maps the keys of deferred external
    binds (the container's cgroups) to host paths. Raises :class:`MountError` naming the mount that
    failed; what was mounted before stays (the caller detaches the tree). ``timings`` gets the seconds
    spent in ``mounts`` and in ``tmpfs`` (restoring contents) added.
    """
    if plan.problems:
        raise MountError("; ".join(plan.problems))
    external = dict(external or {})
    rootfs = os.path.realpath(rootfs)
    spent = {"mounts": 0.0, "tmpfs": 0.0}
    started = time.perf_counter()
    deferred = {step.entry.mnt_id for step in plan.deferred}
    for step in plan.steps:
        if (step.deferred is not None) != restore:
            if not restore and step.entry.parent_mnt_id not in deferred:
                # The restore mounts it on a mount cer made: its mount point must be there already.
                _guard(step, _resolve, rootfs, step.entry.mountpoint, "dir")
            continue
        _guard(step, _make, step, rootfs, external, spent)
    if not restore and plan.root_flags & MOUNT_FLAGS != MS_RELATIME:
        try:
            ns.mount("none", rootfs, None, MS_REMOUNT | MS_BIND | (plan.root_flags & MOUNT_FLAGS))
        except OSError as error:
            raise MountError(f"the root mount's flags {plan.root_flags:#x}: {error}") from error
    if timings is not None:
        timings["tmpfs"] = timings.get("tmpfs", 0.0) + spent["tmpfs"]
        timings["mounts"] = timings.get("mounts", 0.0) + time.perf_counter() - started - spent["tmpfs"]


def _guard(step: MountStep, action, *args) -> None:
    """``action(*args)``, an OSError turned into a MountError that names the mount."""
    try:
        action(*args)
    except MountError:
        raise
    except OSError as error:
        raise MountError(f"mount {step.entry.describe()}: {error.strerror or error}"
                         + (f" ({error.filename})" if error.filename else "")) from error


def _make(step: MountStep, rootfs: str, external: dict[str, str], spent: dict[str, float]) -> None:
    entry = step.entry
    flags = entry.flags & MOUNT_FLAGS
    if step.action == "mount":
        target = _resolve(rootfs, entry.mountpoint, "dir")
        sb_readonly = bool(entry.sb_flags & MS_RDONLY)
        filled = step.contents is not None
        # A filesystem to fill is mounted writable and made read-only once filled.
        first = (flags & ~MS_RDONLY) | (MS_RDONLY if sb_readonly and not filled else 0)
        ns.mount(step.source or entry.fstype, target, entry.fstype, first, entry.options or None)
        if filled:
            started = time.perf_counter()
            try:
                restore_contents(step.contents, target)
            except MountError as error:
                raise MountError(f"mount {entry.describe()}: {error}") from error
            spent["tmpfs"] += time.perf_counter() - started
            if sb_readonly:
                ns.mount("none", target, None, MS_REMOUNT | (flags & ~MS_RDONLY) | MS_RDONLY)
        if bool(flags & MS_RDONLY) != sb_readonly:
            ns.mount("none", target, None, MS_REMOUNT | MS_BIND | flags)
        return
    if step.action == "bind":
        source = _resolve(rootfs, step.source, None)
    else:
        source = step.source or external.get(entry.ext_key or "", "")
        if not source:
            raise MountError(f"mount {entry.describe()}: no host path given for external key {entry.ext_key!r}")
    is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    target = _resolve(rootfs, entry.mountpoint, "dir" if is_dir else "file")
    ns.mount(source, target, None, MS_BIND)
    ns.mount("none", target, None, MS_REMOUNT | MS_BIND | flags)


def _join(base: str, path: str) -> str:
    return "/" + "/".join(part for part in f"{base}/{path}".split("/") if part not in ("", "."))


def _below(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def _resolve(rootfs: str, path: str, create: str | None) -> str:
    """``rootfs/path`` with every symbolic link on the way resolved as if ``rootfs`` were ``/`` (an
    absolute target starts again at rootfs, ``..`` stops there), so the result is always inside it.
    ``create``: make what is missing, directories on the way and the last component as ``"dir"`` or
    ``"file"`` (an empty file: a mount point for a bind of a file)."""
    parts = deque(part for part in path.split("/") if part not in ("", "."))
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.popleft()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        current = os.path.join(rootfs, *resolved, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            if create is None:
                raise
            if parts or create == "dir":
                os.mkdir(current, 0o755)
            else:
                os.close(os.open(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            resolved.append(part)
            continue
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", current)
            target = os.readlink(current)
            if target.startswith("/"):
                resolved = []
            parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        resolved.append(part)
    return os.path.join(rootfs, *resolved)


def restore_contents(contents: TmpfsContents, directory: str) -> None:
    """Write a tmpfs's checked contents into ``directory``, the root of that tmpfs, freshly mounted.

    Every entry is created relative to an fd of the mount's root, exclusively (``O_EXCL``: nothing may
    exist there yet) and without following a link in its last component; the archive was checked so
    that no entry lies below anything but a directory it created. Modes are exact (the umask is set
    to 0 meanwhile: the building thread's own, as it unshared its filesystem attributes with the mount
    namespace), owners numeric, times as recorded, directories' times set last.
    """
    old_umask = os.umask(0)
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    entry = contents.root
    try:
        for entry, data in entries_with_data(contents):
            _create(root, entry, data)
        for entry in reversed(contents.entries):
            if entry.kind == "dir":
                os.utime(entry.name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=root, follow_symlinks=False)
        if contents.root is not None:
            top = contents.root
            if (top.uid, top.gid) != (0, 0):
                os.fchown(root, top.uid, top.gid)
            os.fchmod(root, top.mode)
            os.utime(root, ns=(top.mtime_ns, top.mtime_ns))
    except OSError as error:
        where = f"{entry.name!r}" if entry is not None and entry.name else "its root"
        image = os.path.basename(contents.image)
        raise MountError(f"restoring {where} from {image}: {error.strerror or error}") from error
    except ImageError as error:
        raise MountError(f"restoring tmpfs contents: {error}") from error
    finally:
        os.close(root)
        os.umask(old_umask)


def _create(root: int, entry: TmpfsEntry, data: bytes | BinaryIO) -> None:
    name, kind = entry.name, entry.kind
    owned = (entry.uid, entry.gid) != (0, 0)
    times = (entry.mtime_ns, entry.mtime_ns)
    if kind == "file":
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, entry.mode, dir_fd=root)
        try:
            # Kept bytes in one piece; bytes left in the archive as they are decompressed.
            for chunk in [data] if isinstance(data, bytes) else iter(lambda: data.read(_COPY_CHUNK), b""):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            if owned:
                os.fchown(fd, entry.uid, entry.gid)
            if owned or entry.mode & 0o7000:  # chown drops set-id bits; open's mode may too
                os.fchmod(fd, entry.mode)
            os.utime(fd, ns=times)
        finally:
            os.close(fd)
        return
    if kind == "dir":
        os.mkdir(name, entry.mode, dir_fd=root)
        if owned:
            os.chown(name, entry.uid, entry.gid, dir_fd=root, follow_symlinks=False)
        if owned or entry.mode & 0o7000:  # mkdir ignores set-gid
            os.chmod(name, entry.mode, dir_fd=root, follow_symlinks=False)
        return  # its time is set once everything inside it exists
    if kind == "hardlink":
        os.link(entry.link, name, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
        return
    if kind == "symlink":
        os.symlink(entry.link, name, dir_fd=root)
    elif kind == "chardev" and allowed_device(entry):  # the plan refused the others: never the host's devices
        os.mknod(name, stat.S_IFCHR | entry.mode, os.makedev(*entry.device), dir_fd=root)
    elif kind == "fifo":
        os.mkfifo(name, entry.mode, dir_fd=root)
    else:
        raise OSError(errno.EPERM, f"cer does not create a {kind} {entry.device or ''}")
    if owned:
        os.chown(name, entry.uid, entry.gid, dir_fd=root, follow_symlinks=False)
    if kind != "symlink" and (owned or entry.mode & 0o7000):
        os.chmod(name, entry.mode, dir_fd=root, follow_symlinks=False)
    os.utime(name, ns=times, dir_fd=root, follow_symlinks=False)


def unmount_tree(rootfs: str) -> None:
    """Detach ``rootfs`` and everything mounted below it, in the calling thread's mount namespace
    (also what was mounted over it). Lazy: a busy mount goes once its last user does."""
    for _ in range(_MAX_DETACH):
        try:
            ns.umount(rootfs, ns.MNT_DETACH)
        except OSError as error:
            if error.errno == errno.EINVAL:  # not a mount point (any more)
                return
            raise
    raise MountError(f"{rootfs}: still a mount point after {_MAX_DETACH} detaches")
