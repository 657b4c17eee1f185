"""What a pooled namespace holds, and how one is built and torn down.

``build`` and ``tear_down`` run in a dedicated thread that does nothing else and then ends: the
namespace belongs to that thread from ``unshare`` on, and the fd they return is what keeps it alive.
"""

import fcntl
import os
import shutil
from dataclasses import dataclass

from cer.criu.checkpoint import IpcContents, UtsContents
from cer.linux import namespaces as ns
from cer.linux.namespaces import NAMESPACE_TYPES
from cer.linux.sysv import populate_ipc_namespace

__all__ = ["NAMESPACE_TYPES", "Namespace", "Recipe", "build", "remove_bundle", "tear_down_mounts"]


@dataclass(frozen=True)
class Recipe:
    """Everything needed to build one checkpoint's namespaces; shared read-only by creation threads."""

    ipc: IpcContents | None = None
    uts: UtsContents | None = None
    rootfs: str | None = None

    @property
    def ipc_default(self) -> bool:
        """Whether the checkpoint's IPC namespace holds nothing a fresh one lacks (no objects, default sysctls)."""
        return self.ipc is None or self.ipc.is_default

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
        return os.path.join(self.bundle, "rootfs") if self.bundle else None


def build(ns_type: str, recipe: Recipe, bundle: str | None, fd_floor: int) -> Namespace:
    """Unshare a namespace of ``ns_type`` in the calling thread, fill it from ``recipe`` and open it.

    The fd is moved to the lowest free number at or above ``fd_floor`` so that namespace ids are
    not reused right after a put: a late or repeated put then finds nothing instead of a namespace
    that was handed to somebody else.
    """
    ns.unshare(ns.CLONE_FLAGS[ns_type])
    if ns_type == "uts" and recipe.uts is not None:
        ns.sethostname(recipe.uts.nodename)
        ns.setdomainname(recipe.uts.domainname)
    elif ns_type == "ipc" and recipe.ipc is not None:
        populate_ipc_namespace(recipe.ipc)
    elif ns_type == "mnt":
        assert bundle is not None and recipe.rootfs is not None
        _build_mounts(recipe, bundle)
    opened = ns.open_thread_namespace(ns_type)
    try:
        fd = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, fd_floor)
    finally:
        os.close(opened)
    return Namespace(ns_type, fd, os.getpid(), bundle)


def _build_mounts(recipe: Recipe, bundle: str) -> None:
    upper, work, rootfs = (os.path.join(bundle, part) for part in ("upper", "work", "rootfs"))
    for directory in (upper, work, rootfs):
        os.makedirs(directory, mode=0o700)
    # Private first: nothing mounted below may show up in the host's mount namespace.
    ns.make_mounts_private()
    ns.mount("overlay", rootfs, "overlay", 0, f"lowerdir={recipe.rootfs},upperdir={upper},workdir={work}")


def tear_down_mounts(namespace: Namespace) -> None:
    """Unmount the bundle's rootfs inside the namespace; for a dedicated thread, which it leaves in there.

    setns into a mount namespace refuses a thread that shares its filesystem attributes with the rest of
    the process, hence the CLONE_FS unshare first.
    """
    ns.unshare(ns.CLONE_FS)
    ns.setns(namespace.namespace_id, ns.CLONE_NEWNS)
    ns.umount(namespace.rootfs, ns.MNT_DETACH)


def remove_bundle(bundle: str) -> None:
    shutil.rmtree(bundle, ignore_errors=True)
