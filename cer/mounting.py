"""Making a planned mount tree: the syscall half of :mod:`cer.mounts`, and all a restore's action script imports.

:func:`mount_tree` makes the steps of a :class:`cer.mounts.MountPlan` under a root directory, in the calling
thread's mount namespace, and restores each tmpfs's contents into it; :func:`unmount_tree` detaches a tree
again. This module imports nothing of the CRIU image reader (protobuf, tar): the action script that completes a
restore's mounts (:mod:`cer.restore_mounts`) starts a fresh Python for every restore, and what it imports is
what the container waits for. Plans, steps, mount entries and tmpfs contents are used by their attributes only,
so the script's plan can come from a file of plain data (:func:`encode_plan`, :func:`decode_plan`).

Paths inside the rootfs are resolved as if the rootfs were ``/``: a symbolic link in the container's image
never leads a mount, a created mount point or a file outside it.
"""

from __future__ import annotations

import errno
import marshal
import os
import stat
import time
from collections import deque
from collections.abc import Mapping
from types import SimpleNamespace

from cer.errors import ImageError, MountError
from cer.linux import namespaces as ns
from cer.linux.namespaces import MOUNT_FLAGS, MS_BIND, MS_RDONLY, MS_RELATIME, MS_REMOUNT

__all__ = ["ALLOWED_DEVICES", "allowed_device", "enter_root", "mount_restore_sysctls", "mount_tree",
           "decode_plan", "encode_plan", "plan_from_document", "restore_contents", "unmount_tree"]

_MAX_SYMLINKS = 40
_PLAN_MAGIC = b"cer mount plan 1\n"
_MAX_DETACH = 64
_COPY_CHUNK = 1 << 20

# The device nodes a container runtime makes in a container's /dev, by (major, minor): the only ones cer creates.
ALLOWED_DEVICES = {
    (1, 3): "null",
    (1, 5): "zero",
    (1, 7): "full",
    (1, 8): "random",
    (1, 9): "urandom",
    (5, 0): "tty",
}


def allowed_device(entry) -> bool:
    """Whether the tmpfs entry ``entry`` is a device node cer may create: one of :data:`ALLOWED_DEVICES`."""
    return entry.kind == "chardev" and entry.device in ALLOWED_DEVICES


def mount_tree(plan, rootfs: str, *, restore: bool = False, external: Mapping[str, str | int] | None = None,
               timings: dict[str, float] | None = None) -> None:
    """Make the mounts of ``plan`` under ``rootfs``, in the calling thread's mount namespace.

    ``restore=False`` (a pooled namespace): the mounts cer makes, the mount points of the deferred ones,
    then the root's flags. ``restore=True``: the deferred mounts, run where the restored container's
    PID, network, IPC and cgroup namespaces are; ``external`` then maps the keys of deferred external
    binds (the container's cgroups) to host paths, or to detached binds (:func:`cer.linux.namespaces.open_tree`
    fds) taken where the host's paths are, for a tree whose mount namespace has its own root. Raises :class:`MountError` naming the mount that
    failed; what was mounted before stays (the caller detaches the tree). ``timings`` gets the seconds
    spent in ``mounts`` and in ``tmpfs`` (restoring contents) added.
    """
    if plan.problems:
        raise MountError("; ".join(plan.problems))
    external = dict(external or {})
    rootfs = os.path.realpath(rootfs)
    spent = {"mounts": 0.0, "tmpfs": 0.0}
    started = time.perf_counter()
    deferred = {step.entry.mnt_id for step in plan.steps if step.deferred is not None}
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


def enter_root(rootfs: str) -> None:
    """Make the mount at ``rootfs`` the root of the calling thread's mount namespace (as runc does for a
    container): pivot_root into it and detach the old root, so nothing of the host's tree stays reachable.
    For a thread that unshared its mount namespace (which also unshared its root and working directory)."""
    os.chdir(rootfs)
    ns.pivot_root(".", ".")
    ns.umount(".", ns.MNT_DETACH)
    os.chdir("/")


def mount_restore_sysctls(proc: str = "/proc") -> None:
    """What a restore needs at ``proc`` before the container's own proc can be mounted: CRIU's restored tasks
    write their UTS and IPC sysctls through /proc/sys (a write acts on the writer's namespaces, whichever proc it
    goes through). A proc mounted here would show the host's processes, so ``proc`` gets a small read-only tmpfs
    holding only a bind of a proc's ``sys``; the restore's action script replaces it (:mod:`cer.restore_mounts`)."""
    ns.mount("tmpfs", proc, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC, "size=16k,mode=555")
    whole = os.path.join(proc, ".whole")
    sysctls = os.path.join(proc, "sys")
    os.mkdir(whole, 0o500)
    os.mkdir(sysctls, 0o555)
    ns.mount("proc", whole, "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)
    try:
        ns.mount(os.path.join(whole, "sys"), sysctls, None, MS_BIND)
    finally:
        ns.umount(whole, ns.MNT_DETACH)
    os.rmdir(whole)
    ns.mount("none", proc, None, MS_REMOUNT | ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC | MS_RDONLY)


def _guard(step, action, *args) -> None:
    """``action(*args)``, an OSError turned into a MountError that names the mount."""
    try:
        action(*args)
    except MountError:
        raise
    except OSError as error:
        raise MountError(f"mount {step.entry.describe()}: {error.strerror or error}"
                         + (f" ({error.filename})" if error.filename else "")) from error


def _make(step, rootfs: str, external: dict[str, str | int], spent: dict[str, float]) -> None:
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
        if source == "":
            raise MountError(f"mount {entry.describe()}: no host path given for external key {entry.ext_key!r}")
    is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    target = _resolve(rootfs, entry.mountpoint, "dir" if is_dir else "file")
    if isinstance(source, int):
        ns.move_mount(source, target)  # a detached bind taken where the host's paths are
    else:
        ns.mount(source, target, None, MS_BIND)
    ns.mount("none", target, None, MS_REMOUNT | MS_BIND | flags)


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


def restore_contents(contents, directory: str) -> None:
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
        for entry, data in _entries_with_data(contents):
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


def _entries_with_data(contents):
    """Each entry of ``contents`` with its file's bytes (see :func:`cer.criu.tmpfs.entries_with_data`)."""
    if getattr(contents, "source", None) is None:
        return ((entry, entry.data) for entry in contents.entries)
    # Only a pool's build meets an archive whose bytes were left on disk; an action script's plan holds its
    # bytes and never loads the archive reader.
    from cer.criu.tmpfs import entries_with_data
    return entries_with_data(contents)


def _create(root: int, entry, data) -> None:
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


class _Described(SimpleNamespace):
    def describe(self) -> str:
        return self.description


PLAN_NAME = "restore-mounts.plan"
"""The restore plan's file in a "mnt" image view (cer.criu.mntview writes it, cer.restore_mounts reads it)."""


def encode_plan(document: Mapping) -> bytes:
    """A plan document (:func:`cer.mounts.plan_document`: dicts, lists, strings, numbers, bytes) as a file.

    marshal, not JSON: decoding JSON imports ``re`` and more, and the action script that reads it starts a fresh
    Python on every restore. marshal's format 4 is stable across Python 3 versions; the file is cer's own
    (written by the daemon into a view under ROOT), never a client's."""
    return _PLAN_MAGIC + marshal.dumps(dict(document), 4)


def decode_plan(data: bytes) -> SimpleNamespace:
    """The plan in a file :func:`encode_plan` wrote; ValueError for anything else."""
    if not data.startswith(_PLAN_MAGIC):
        raise ValueError("not a plan of cer's mounts (no header)")
    try:
        document = marshal.loads(data[len(_PLAN_MAGIC):])
        return plan_from_document(document)
    except (EOFError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"a damaged plan of cer's mounts: {error!r}") from None


def plan_from_document(document: Mapping) -> SimpleNamespace:
    """A plan for :func:`mount_tree` from what :func:`cer.mounts.plan_document` gives, without the CRIU
    reader's types: the same attributes, read-only by convention."""
    def contents(found: Mapping | None) -> SimpleNamespace | None:
        if found is None:
            return None
        def entry(item: Mapping | None) -> SimpleNamespace | None:
            if item is None:
                return None
            device = item.get("device")
            return SimpleNamespace(**{**item, "data": bytes(item.get("data", b"")),
                                      "device": tuple(device) if device is not None else None})
        return SimpleNamespace(image=found["image"], root=entry(found["root"]),
                               entries=tuple(entry(item) for item in found["entries"]), size=found["size"])

    steps = tuple(SimpleNamespace(entry=_Described(**step["entry"]), action=step["action"], source=step["source"],
                                  contents=contents(step.get("contents")), deferred=step.get("deferred"))
                  for step in document["steps"])
    return SimpleNamespace(root_flags=document["root_flags"], steps=steps, problems=tuple(document["problems"]))
