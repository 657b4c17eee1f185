"""Reading a checkpoint's mount namespace: ``mountpoints-<ns id>.img`` and its tmpfs archives.

A mountpoints image holds one ``mnt_entry`` per mount of the namespace, in CRIU's own order (a
mount's children may come before it). :func:`read_mount_tree` checks the entries and gives them
back as a frozen :class:`MountTree`, parents first: exactly one root (the entry mounted at ``/``
whose parent is outside the namespace), every other entry reachable from it, paths absolute and
free of ``..``, only the mount flags CRIU records. It also reads the contents of every tmpfs
superblock a mount of the tree shows (see :mod:`cer.criu.tmpfs`), bounded for the whole
checkpoint.

What to do with the tree (which mounts cer can reproduce, which the restore must make) is
:mod:`cer.mounts`'s business; this module only reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cer.criu.images import MNTS, ImageReader, text
from cer.criu.tmpfs import MAX_TMPFS_BYTES, TmpfsContents, read_tmpfs_image, tmpfs_image_names
from cer.errors import ImageError
from cer.linux.flags import MOUNT_FLAGS, MS_RDONLY

MAX_MOUNTS = 4096

# CRIU's fstype enumeration (images/mnt.proto), as the kernel names the filesystems. AUTO means
# "look at fsname"; UNSUPPORTED is any filesystem CRIU has no special handling for (ext4, xfs...).
FSTYPES = {
    0: "unsupported", 1: "proc", 2: "sysfs", 3: "devtmpfs", 4: "binfmt_misc", 5: "tmpfs", 6: "devpts",
    7: "simfs", 8: "pstore", 9: "securityfs", 10: "fusectl", 11: "debugfs", 12: "cgroup", 13: "aufs",
    14: "mqueue", 15: "fuse", 16: "auto", 17: "overlay", 18: "autofs", 19: "tracefs", 23: "cgroup2",
}

# Per-mount flags: MOUNT_FLAGS, as CRIU records them from /proc/PID/mountinfo (it adds MS_STRICTATIME when a
# mount shows none of the other atime flags). Superblock flags:
MS_SYNCHRONOUS = 0x10
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_LAZYTIME = 0x2000000
SUPERBLOCK_FLAGS = MS_RDONLY | MS_SYNCHRONOUS | MS_MANDLOCK | MS_DIRSYNC | MS_LAZYTIME


@dataclass(frozen=True)
class MountEntry:
    """One mount as the image records it. ``mountpoint`` is absolute in the container ("/" for its
    root); ``root`` the directory of the filesystem it shows (not "/" for a bind of a subdirectory);
    ``root_dev`` the superblock's device in the kernel's encoding (major << 20 | minor), which
    identifies mounts of the same filesystem; ``flags`` the per-mount MS_* flags, ``sb_flags`` the
    superblock's; ``options`` the filesystem's own options; ``ext_key`` set for a mount the dump
    was told is external (a bind of something outside the container)."""

    mnt_id: int
    parent_mnt_id: int
    fstype: str
    root_dev: int
    flags: int
    sb_flags: int
    root: str
    mountpoint: str
    source: str
    options: str
    ext_key: str | None = None
    shared_id: int = 0
    master_id: int = 0
    deleted: bool = False
    with_plugin: bool = False

    @property
    def device(self) -> str:
        return f"{self.root_dev >> 20}:{self.root_dev & 0xFFFFF}"

    def describe(self) -> str:
        return f"{self.mountpoint} ({self.fstype}, mount id {self.mnt_id})"


@dataclass(frozen=True)
class MountTree:
    """A checkpoint's mount namespace: its root mount, every other mount parents first (of siblings, one
    inside another first), and the contents of the tmpfs superblocks, by ``root_dev``."""

    image: str
    root: MountEntry
    mounts: tuple[MountEntry, ...]
    tmpfs: tuple[tuple[int, TmpfsContents], ...] = ()

    def contents(self, root_dev: int) -> TmpfsContents | None:
        return next((contents for dev, contents in self.tmpfs if dev == root_dev), None)


def read_mount_tree(directory: str | os.PathLike[str], ns_id: int, max_tmpfs_bytes: int = MAX_TMPFS_BYTES) -> MountTree:
    """Read ``mountpoints-<ns_id>.img`` of ``directory`` and the tmpfs archives its mounts need."""
    directory = Path(directory)
    path = directory / f"mountpoints-{ns_id}.img"
    entries: list[MountEntry] = []
    with ImageReader(path, MNTS) as image:
        for offset, raw in image.entries_with_offsets():
            if len(entries) >= MAX_MOUNTS:
                raise image.error(f"more than {MAX_MOUNTS} mounts", offset)
            entries.append(_entry(image, offset, raw))
    root, mounts = _tree(str(path), entries)
    return MountTree(str(path), root, mounts, _read_tmpfs(directory, mounts, max_tmpfs_bytes))


def _entry(image: ImageReader, offset: int, raw) -> MountEntry:
    def path(value: str, what: str) -> str:
        value = text(value)
        if value.startswith("./"):  # CRIU before 3.x: mount points relative to the root
            value = value[1:]
        elif value == ".":
            value = "/"
        parts = [part for part in value.split("/") if part not in ("", ".")]
        if not value.startswith("/") or ".." in parts or "\0" in value:
            raise image.error(f"mount {raw.mnt_id}: {what} {value!r} is not an absolute path without '..'", offset)
        return "/" + "/".join(parts)

    fstype = FSTYPES.get(raw.fstype)
    if fstype is None:
        raise image.error(f"mount {raw.mnt_id}: unknown fstype {raw.fstype}", offset)
    if fstype == "auto" and raw.HasField("fsname"):
        fstype = text(raw.fsname)
    if raw.flags & ~MOUNT_FLAGS:
        raise image.error(f"mount {raw.mnt_id}: unknown mount flags {raw.flags & ~MOUNT_FLAGS:#x}", offset)
    sb_flags = raw.sb_flags if raw.HasField("sb_flags") else 0
    if sb_flags & ~SUPERBLOCK_FLAGS:
        raise image.error(f"mount {raw.mnt_id}: unknown superblock flags {sb_flags & ~SUPERBLOCK_FLAGS:#x}", offset)
    return MountEntry(
        mnt_id=raw.mnt_id,
        parent_mnt_id=raw.parent_mnt_id,
        fstype=fstype,
        root_dev=raw.root_dev,
        flags=raw.flags,
        sb_flags=sb_flags,
        root=path(raw.root, "root"),
        mountpoint=path(raw.mountpoint, "mount point"),
        source=text(raw.source),
        options=text(raw.options),
        ext_key=text(raw.ext_key) if raw.HasField("ext_key") else None,
        shared_id=raw.shared_id,
        master_id=raw.master_id,
        deleted=raw.deleted,
        with_plugin=raw.with_plugin,
    )


def _tree(path: str, entries: list[MountEntry]) -> tuple[MountEntry, tuple[MountEntry, ...]]:
    by_id: dict[int, MountEntry] = {}
    for entry in entries:
        if entry.mnt_id in by_id:
            raise ImageError(path, 0, f"mount id {entry.mnt_id} appears twice")
        by_id[entry.mnt_id] = entry
    roots = [entry for entry in entries if entry.parent_mnt_id not in by_id or entry.parent_mnt_id == entry.mnt_id]
    if len(roots) != 1 or roots[0].mountpoint != "/":
        found = ", ".join(e.describe() for e in roots) or "none"
        raise ImageError(path, 0, f"a mount namespace has one root mount at '/'; mounts without a parent here: {found}")
    children: dict[int, list[MountEntry]] = {}
    for entry in entries:
        if entry is not roots[0]:
            children.setdefault(entry.parent_mnt_id, []).append(entry)
    ordered: list[MountEntry] = []
    level = [roots[0]]
    while level:
        following = []
        for parent in level:
            # A sibling inside another sibling was there first (else it would be that one's child): deeper first.
            # Mount ids say nothing about order (the kernel reuses the lowest free one).
            siblings = children.pop(parent.mnt_id, ())
            for child in sorted(siblings, key=lambda e: (-e.mountpoint.count("/"), e.mountpoint, e.mnt_id)):
                inside = child.mountpoint.startswith(parent.mountpoint.rstrip("/") + "/")
                if child.mountpoint != parent.mountpoint and not inside:
                    raise ImageError(path, 0, f"mount {child.describe()} is not below its parent {parent.describe()}")
                ordered.append(child)
                following.append(child)
        level = following
    if children:
        lost = ", ".join(e.describe() for group in children.values() for e in group)
        raise ImageError(path, 0, f"mounts not reachable from the root mount: {lost}")
    return roots[0], tuple(ordered)


def _read_tmpfs(directory: Path, mounts: tuple[MountEntry, ...], budget: int) -> tuple[tuple[int, TmpfsContents], ...]:
    """The contents of each tmpfs superblock that a mount shows from its root, read once per superblock."""
    found: dict[int, TmpfsContents] = {}
    for entry in mounts:
        if entry.fstype != "tmpfs" or entry.ext_key is not None or entry.root != "/" or entry.root_dev in found:
            continue
        for name in tmpfs_image_names(entry.root_dev, entry.mnt_id):
            if (directory / name).exists():
                contents = read_tmpfs_image(directory / name, max_bytes=budget)
                budget -= contents.size
                found[entry.root_dev] = contents
                break
        else:
            raise ImageError(str(directory / tmpfs_image_names(entry.root_dev, entry.mnt_id)[0]), 0,
                             f"missing: the contents of tmpfs mount {entry.describe()}")
    return tuple(found.items())
