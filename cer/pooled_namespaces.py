"""What a pooled namespace holds, and how one is built and torn down.

``build`` runs in a dedicated thread that does nothing else and then ends: the namespace belongs to that
thread from ``unshare`` on, and the fd it returns is what keeps it alive. ``destroy`` runs from outside,
in a thread of the daemon's own mount namespace: it never enters a namespace that was handed out.

A pooled mount namespace is a container's mount namespace as runc would leave it: its root is an overlay of
the pool's read-only rootfs and the bundle's own ``upper``/``work`` (mounted at ``bundle/rootfs``, then made the
namespace's root with pivot_root, the host's tree detached), and on it the container's mounts as the
checkpoint's mountpoints image lists them, tmpfs contents restored (:mod:`cer.mounts` says which mounts, and
which it leaves to the restore). Where the restore mounts a proc, /proc holds what CRIU needs until then (a
read-only tmpfs with only /proc/sys; :func:`cer.mounting.mount_restore_sysctls`). A checkpoint without a
mountpoints image gets the overlay alone. A CRIU restore can join such a namespace (``join-ns mnt``) with a
view of its images that keeps CRIU's hands off the mount tree (:mod:`cer.criu.views`), completing the
restore-only mounts in an action script (:mod:`cer.restore_mounts`).
"""

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cer.criu.checkpoint import CheckpointContents, IpcContents, UtsContents
from cer.errors import MountError
from cer.linux import namespaces as ns
from cer.linux.namespaces import NAMESPACE_TYPES
from cer.linux.proc import mountinfo
from cer.linux.sysv import is_fresh_ipc_namespace, populate_ipc_namespace
from cer.mounting import enter_root, mount_restore_sysctls
from cer.mounts import MountPlan, mount_tree, plan_mounts, unmount_tree

__all__ = ["NAMESPACE_TYPES", "Namespace", "Recipe", "build", "destroy", "remove_bundle"]


@dataclass(frozen=True)
class Recipe:
    """Everything needed to build one checkpoint's namespaces; shared read-only by creation threads."""

    ipc: IpcContents | None = None
    uts: UtsContents | None = None
    rootfs: str | None = None
    mounts: MountPlan | None = None  # None: the overlay alone
    ipc_default: bool = False
    """Whether the checkpoint's IPC namespace holds nothing a fresh one lacks (no objects, default sysctls):
    decided once by :meth:`from_checkpoint`, which may probe a fresh namespace; False (claim nothing) for a
    recipe made otherwise."""

    @classmethod
    def from_checkpoint(cls, contents: CheckpointContents, rootfs: str | None,
                        external_mounts: Mapping[str, str] | None = None) -> "Recipe":
        """The recipe for a checkpoint read by ``read_checkpoint``, with ``rootfs`` as the lower layer of its
        mount namespaces (None: it has none). ``external_mounts`` maps the keys of the checkpoint's external
        bind mounts to host paths; a mount that cannot be reproduced fails the mount namespaces' creation
        with a message that names it (see :func:`cer.mounts.plan_mounts`), never the IPC and UTS ones."""
        plan = None
        if rootfs is not None and contents.mounts_error is not None:
            plan = MountPlan(0, (), (f"the checkpoint's mount tree cannot be used: {contents.mounts_error}",))
        elif rootfs is not None and contents.mounts is not None:
            plan = plan_mounts(contents.mounts, external_mounts)
        ipc_default = contents.ipc is None or is_fresh_ipc_namespace(contents.ipc)
        return cls(ipc=contents.ipc, uts=contents.uts, rootfs=rootfs, mounts=plan, ipc_default=ipc_default)

    def ipc_info(self) -> dict | None:
        """What a pooled IPC namespace of this checkpoint holds, for a get's ``info.ipc``: the ids of the
        SysV objects in it (``shm``, ``sem``, ``msg``), the segments left for the restore to create
        (``left_to_restore``: those attached at dump time), and the image view a stock CRIU restore
        joining it must use (``view``; None: the images as they are will do)."""
        if self.ipc is None:
            return None
        held = self.ipc.prefill()
        holds_objects = bool(held.shm or held.sem or held.msg)
        return {
            "shm": sorted(segment.id for segment in held.shm),
            "sem": sorted(sem_set.id for sem_set in held.sem),
            "msg": sorted(queue.id for queue in held.msg),
            "left_to_restore": sorted(self.ipc.attached_shm),
            "view": "ipc" if holds_objects else None,
        }

    def supports(self, ns_type: str) -> bool:
        return ns_type != "mnt" or self.rootfs is not None


@dataclass(frozen=True)
class Namespace:
    """A namespace held open by the daemon through the fd ``namespace_id``."""

    ns_type: str
    namespace_id: int
    pid: int
    bundle: str | None = None

    @property
    def path(self) -> str:
        """Where another process joins it: the daemon's fd, through /proc."""
        return f"/proc/{self.pid}/fd/{self.namespace_id}"

    @property
    def rootfs(self) -> str | None:
        """Where the container's root filesystem is inside the namespace: its root. (The host sees the bundle's
        ``rootfs`` directory empty: the overlay was mounted there only in the namespace, which then pivoted.)"""
        return "/" if self.bundle else None


def build(ns_type: str, recipe: Recipe, bundle: str | None, fd_floor: int,
          timings: dict[str, float] | None = None) -> Namespace:
    """Unshare a namespace of ``ns_type`` in the calling thread, fill it from ``recipe`` and open it.

    The fd is moved to the lowest free number at or above ``fd_floor`` so that namespace ids are
    not reused right after a put: a late or repeated put then finds nothing instead of a namespace
    that was handed to somebody else. ``timings`` (mnt only) gets the seconds spent in ``overlay``,
    ``mounts`` and ``tmpfs`` added. A mount namespace that fails half-built leaves no bundle behind: the
    thread goes back to the daemon's mount namespace (the half-built one goes with it) and removes the
    bundle from there, never from inside a tree whose root may already be the container's.
    """
    outside = ns.open_thread_namespace("mnt") if ns_type == "mnt" else None
    try:
        ns.unshare(ns.CLONE_FLAGS[ns_type])
        try:
            return _fill_and_open(ns_type, recipe, bundle, fd_floor, timings)
        except BaseException as error:
            if outside is not None:
                _go_back_and_remove(outside, bundle, error)
            raise
    finally:
        if outside is not None:
            os.close(outside)


def _fill_and_open(ns_type: str, recipe: Recipe, bundle: str | None, fd_floor: int,
                   timings: dict[str, float] | None) -> Namespace:
    # Opened before filling: a mount namespace's thread ends up with the container's root, without the host's /proc.
    opened = ns.open_thread_namespace(ns_type)
    try:
        if ns_type == "uts" and recipe.uts is not None:
            ns.sethostname(recipe.uts.nodename)
            ns.setdomainname(recipe.uts.domainname)
        elif ns_type == "ipc" and recipe.ipc is not None:
            # Segments attached at dump time are left to the restore: stock CRIU maps only those it creates.
            populate_ipc_namespace(recipe.ipc.prefill())
        elif ns_type == "mnt":
            assert bundle is not None and recipe.rootfs is not None
            _build_mounts(recipe, bundle, timings)
        fd = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, fd_floor)
    finally:
        os.close(opened)
    return Namespace(ns_type, fd, os.getpid(), bundle)


def _go_back_and_remove(outside: int, bundle: str, error: BaseException) -> None:
    """Leave a half-built mount namespace for the daemon's own and remove the bundle; ``error`` (what the
    pool must hear about) gets a note when that fails."""
    try:
        ns.setns(outside, ns.CLONE_NEWNS)
        remove_bundle(bundle)
    except BaseException as cleanup:  # noqa: BLE001 - the build's own error is the one to raise
        error.add_note(f"and its bundle {bundle} could not be removed: {cleanup}")


def _build_mounts(recipe: Recipe, bundle: str, timings: dict[str, float] | None = None) -> None:
    """The overlay, the checkpoint's mounts on it, then the overlay made the namespace's root."""
    started = time.perf_counter()
    upper, work, rootfs = (os.path.join(bundle, part) for part in ("upper", "work", "rootfs"))
    os.mkdir(bundle, 0o700)
    for directory in (upper, work, rootfs):
        os.mkdir(directory, 0o700)
    # The overlay's root shows the upper layer's mode and owner: the container's "/" must keep the lower's
    # (the bundle directory itself stays 0700).
    try:
        lower = os.stat(recipe.rootfs.split(":")[0])  # the topmost of the lower layers
    except OSError:
        lower = None  # the overlay mount says what is wrong with it
    if lower is not None:
        os.chmod(upper, stat.S_IMODE(lower.st_mode))
        if (lower.st_uid, lower.st_gid) != (0, 0):
            os.chown(upper, lower.st_uid, lower.st_gid)
    # Private first: nothing mounted below may show up in the host's mount namespace.
    ns.make_mounts_private()
    ns.mount("overlay", rootfs, "overlay", 0, f"lowerdir={recipe.rootfs},upperdir={upper},workdir={work}")
    if timings is not None:
        timings["overlay"] = timings.get("overlay", 0.0) + time.perf_counter() - started
    try:
        if recipe.mounts is not None:
            mount_tree(recipe.mounts, rootfs, timings=timings)
            if recipe.mounts.restore_mounts_proc:
                mount_restore_sysctls(os.path.join(rootfs, "proc"))
        # Last: once pivoted, this thread's paths are the container's (the caller cleans up from outside).
        enter_root(rootfs)
    except BaseException:
        # The namespace dies with this thread; detached, the tree cannot be reached by removing the bundle
        # (which never crosses a mount anyway). The mount that failed is what the pool must hear about.
        with contextlib.suppress(OSError, MountError):
            unmount_tree(rootfs)
        raise


def destroy(namespace: Namespace) -> None:
    """Close a namespace for good; a mount namespace's bundle is removed too. For a thread in the daemon's
    own mount namespace, never one that entered a namespace cer handed out.

    Nothing here enters the namespace or reads anything in it: its root, its /proc and the paths in it are
    the container's (it may have pivoted into its rootfs, detached the rest, planted the bundle's path in
    its own root). Closing the daemon's fd is enough: a mount namespace that no process is in and no fd
    holds is destroyed by the kernel with every mount in it, the overlay included. A process still in it
    (a put while in use) keeps the namespace until it leaves, none of its mounts in the host's table; the
    bundle (the overlay's ``upper`` and ``work`` are plain directories on the host's filesystem) is removed
    from the host regardless, so nothing stays on disk after the put. Removing ``rootfs`` there makes the
    kernel detach the tree mounted on it in that namespace too; a tree the container pivoted into is its
    root and stays its own until it leaves.
    """
    try:
        os.close(namespace.namespace_id)
    finally:
        if namespace.bundle is not None:
            remove_bundle(namespace.bundle)


def remove_bundle(bundle: str) -> None:
    """Remove a bundle directory, never following a link nor crossing into another filesystem: whatever is
    still mounted in it where this runs (a bind of a host directory, a tmpfs) stays untouched, and so does
    its directory. However deep the tree the container left in its upper layer: two fds at most, no
    recursion."""
    try:
        top = os.lstat(bundle)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        return
    bundle = os.path.realpath(bundle)
    mount_points = _mount_points(bundle)
    if bundle in mount_points:
        return
    for _ in range(_MAX_WALKS):
        if _empty_tree(bundle, top.st_dev, mount_points):
            break
    _quietly(os.rmdir, bundle)


def _mount_points(below: str) -> set[str]:
    """Where something is mounted at or below ``below`` in the calling thread's mount namespace (a bind of a
    directory of the same filesystem has the same st_dev: only the mount table tells)."""
    return {row["mountpoint"] for row in mountinfo("/proc/thread-self/mountinfo")
            if row["mountpoint"] == below or row["mountpoint"].startswith(below + "/")}


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A process still in the namespace can move directories while they are removed: the walk starts again
# from the top when it finds one moved, this many times at most.
_MAX_WALKS = 8


def _empty_tree(top: str, device: int, mount_points: set[str]) -> bool:
    """Remove everything below ``top`` that is on ``device`` and not a mount point, depth first; False when a
    directory on the way was moved meanwhile (the walk must start again).

    Every step opens one name relative to its parent's fd, never a whole path: a process still writing in
    the bundle could swap a directory already passed for a link to the host's files. Going back up opens
    ``..`` and checks it is the directory it came from."""
    fd = os.open(top, _DIRECTORY)
    try:
        if os.fstat(fd).st_dev != device:
            return True
        # From ``top`` down to ``fd``: each directory's name, path, identity and subdirectories still to visit.
        path = [(top, top, _identity(os.fstat(fd)), _unlink_files(fd, top, device, mount_points))]
        while True:
            name, where, _, pending = path[-1]
            if pending:
                child = pending.pop()
                try:
                    child_fd = os.open(child, _DIRECTORY, dir_fd=fd)
                except OSError:
                    continue
                info = os.fstat(child_fd)
                if info.st_dev != device:
                    os.close(child_fd)
                    continue
                os.close(fd)
                fd = child_fd
                below = os.path.join(where, child)
                path.append((child, below, _identity(info), _unlink_files(fd, below, device, mount_points)))
                continue
            if len(path) == 1:
                return True
            parent_fd = os.open("..", _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent_fd
            path.pop()
            if _identity(os.fstat(fd)) != path[-1][2]:
                return False
            _quietly(os.rmdir, name, dir_fd=fd)
    finally:
        os.close(fd)


def _unlink_files(fd: int, where: str, device: int, mount_points: set[str]) -> list[str]:
    """Unlink what is not a directory in ``fd`` (the directory at ``where``); the subdirectories to visit."""
    directories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if os.path.join(where, entry.name) in mount_points:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                _quietly(os.unlink, entry.name, dir_fd=fd)
            elif info.st_dev == device:
                directories.append(entry.name)
    return directories


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _quietly(remove, *args, **kwargs) -> None:
    try:
        remove(*args, **kwargs)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
