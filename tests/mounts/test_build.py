"""Pooled mount namespaces built from a real runc + CRIU 4 checkpoint, compared with what the container saw."""

import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402
import mounts_support  # noqa: E402
from conftest import wait_for  # noqa: E402
from mounts_support import FILLED_TMPFS, host_mount_changes, host_mounts, mount_table, tmpfs_digest  # noqa: E402

from cer.criu.checkpoint import read_checkpoint  # noqa: E402
from cer.errors import MountError  # noqa: E402
from cer.linux import namespaces as ns  # noqa: E402
from cer.mounts import plan_document, plan_mounts  # noqa: E402
from cer.pooled_namespaces import Recipe, remove_bundle  # noqa: E402
from cer.mounting import encode_plan  # noqa: E402
from cer.restore_mounts import PLAN_NAME, install_action_script  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
def recipe_for(checkpoint, external=None) -> Recipe:
    contents = read_checkpoint(checkpoint.images)
    external = checkpoint.external if external is None else external
    return Recipe.from_checkpoint(contents, str(checkpoint.rootfs), external)


def deferred_targets(recipe: Recipe) -> set[str]:
    return {step.entry.mountpoint for step in recipe.mounts.deferred}


def without_root(rows):
    return sorted(row for row in rows if row[0] != "/")


def test_a_pooled_namespace_holds_the_containers_mounts_and_tmpfs_files(container_checkpoint, built):
    before = host_mounts()
    recipe = recipe_for(container_checkpoint)
    namespace = built.build(recipe)

    table = mount_table(namespace.path, namespace.rootfs)
    deferred = deferred_targets(recipe)
    expected = [row for row in container_checkpoint.mounts if row[0] not in deferred]
    # Until the restore replaces it, /proc holds what CRIU writes (sysctls) and nothing of the host's processes.
    helpers = [row for row in table if row[0] in ("/proc", "/proc/sys")]
    assert [row[:2] for row in helpers] == [("/proc", "tmpfs"), ("/proc/sys", "proc")]
    assert helpers[0][2].startswith("ro,") and helpers[1][2].startswith("rw,")
    # Target, filesystem type and every option (ro, nosuid, nodev, noexec, atime, size, mode, gid, ptmxmode...).
    assert without_root([row for row in table if row not in helpers]) == without_root(expected)
    root = next(row for row in table if row[0] == "/")
    assert root[1] == "overlay" and root[2].startswith("ro,")  # the container's root was read-only
    assert {row[0] for row in table} >= {"/dev", "/dev/pts", "/dev/shm", "/run", "/tmp", "/data"}

    for path in FILLED_TMPFS:
        seen = tmpfs_digest(namespace.rootfs + path, namespace.path)
        live = dict(container_checkpoint.tmpfs[path])
        for name in [name for name in live if path.rstrip("/") + name in deferred]:
            # Where the restore mounts (/dev/mqueue), the directory under it is what the pool shows.
            assert live.pop(name) == {"kind": "mountpoint"} and seen.pop(name)["kind"] == "dir"
        assert seen == live, path

    # The restore's mount points are there, and nothing shows the host's processes, network or queues: /proc
    # holds only the sysctls CRIU writes until the restore mounts the container's proc.
    assert mounts_support.list_directory(namespace.path, "/proc") == ["sys"]
    assert "kernel" in mounts_support.list_directory(namespace.path, "/proc/sys")
    assert mounts_support.list_directory(namespace.path, "/sys") == mounts_support.list_directory(
        namespace.path, "/dev/mqueue") == []
    # The namespace's root is the container's (pivoted: nothing of the host's tree), keeping its lower layer's
    # mode (the bundle directory is 0700); the host sees the bundle's rootfs directory empty.
    assert namespace.rootfs == "/" and table[0][:2] == ("/", "overlay")
    assert set(mounts_support.list_directory(namespace.path, "/")) >= {*os.listdir(container_checkpoint.rootfs),
                                                                       "dev", "proc", "run", "sys", "tmp"}
    with mounts_support.joined(namespace.path) as inside:
        mode = inside.call(lambda: os.stat("/").st_mode)
        assert not inside.call(lambda: os.path.exists(str(built.bundles)))
    assert mode & 0o7777 == os.stat(container_checkpoint.rootfs).st_mode & 0o7777
    assert os.listdir(Path(namespace.bundle) / "rootfs") == []

    assert host_mount_changes(before, built.bundles) == []
    built.destroy(namespace)
    assert host_mount_changes(before, built.bundles) == []
    assert not os.path.exists(namespace.bundle)


def test_the_action_script_completes_the_tree_in_the_restored_inits_namespaces(container_checkpoint, built, tmp_path):
    """What cer leaves to the restore, made by the restore's action script (as CRIU runs it at post-restore) for
    a stand-in init in new PID, network, IPC and cgroup namespaces inside the pooled one: the whole tree then
    equals the container's, /proc shows that PID namespace alone, /dev/mqueue its IPC namespace's queues; a
    second run (CRIU 4.1.1 runs every script twice) changes nothing."""
    before = host_mounts()
    recipe = recipe_for(container_checkpoint)
    namespace = built.build(recipe)
    script, images = action_script(tmp_path, recipe)
    init = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--cgroup", "--",
                             "nsenter", f"--mount={namespace.path}", "/mount-workload", "wait"])
    try:
        init_pid = wait_for_child(init.pid)
        environment = {"PATH": "/usr/bin:/bin", "CRTOOLS_SCRIPT_ACTION": "post-restore",
                       "CRTOOLS_INIT_PID": str(init_pid), "CRTOOLS_IMAGE_DIR": str(images)}
        for run in range(2):
            result = subprocess.run([script], env=environment, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
        assert without_root(mount_table(namespace.path)) == without_root(container_checkpoint.mounts)
        with mounts_support.joined(namespace.path) as inside:
            pids = inside.call(lambda: sorted(name for name in os.listdir("/proc") if name.isdigit()))
            assert pids == ["1"]  # the stand-in init, pid 1 of its own PID namespace
            queue = subprocess.run(["nsenter", f"--ipc=/proc/{init_pid}/ns/ipc", sys.executable, "-c", MQ_OPEN],
                                   capture_output=True, text=True, timeout=30)
            assert queue.returncode == 0, queue.stderr
            assert inside.call(lambda: os.listdir("/dev/mqueue")) == ["cer-restore-queue"]
        other = subprocess.run([script], env={**environment, "CRTOOLS_SCRIPT_ACTION": "network-unlock"}, timeout=30)
        assert other.returncode == 0
    finally:
        init.kill()
        init.wait(10)
    assert host_mount_changes(before, built.bundles) == []
    built.destroy(namespace)
    assert host_mount_changes(before, built.bundles) == []


def test_the_action_script_fails_loudly_and_mounts_nothing_for_a_wrong_init(container_checkpoint, built, tmp_path):
    script, images = action_script(tmp_path, recipe_for(container_checkpoint))
    environment = {"PATH": "/usr/bin:/bin", "CRTOOLS_SCRIPT_ACTION": "post-restore", "CRTOOLS_INIT_PID": "0",
                   "CRTOOLS_IMAGE_DIR": str(images)}
    result = subprocess.run([script], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cer restore-mounts: " in result.stderr
    # Images without the plan (not cer's "mnt" view): refused before anything is mounted.
    result = subprocess.run([script], env={**environment, "CRTOOLS_IMAGE_DIR": str(tmp_path)}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "not cer's images for a mount namespace" in result.stderr


def action_script(directory: Path, recipe: Recipe) -> tuple[str, Path]:
    """The installed action script, and an image directory holding the restore's plan as the "mnt" view does."""
    images = directory / "view"
    images.mkdir()
    (images / PLAN_NAME).write_bytes(encode_plan(plan_document(recipe.mounts)))
    return install_action_script(str(directory)), images


def wait_for_child(parent: int, timeout: float = 10) -> int:
    """The pid of the one child of ``parent`` once it runs the workload."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            if os.readlink(f"/proc/{child}/exe").endswith("mount-workload"):
                return int(child)
        time.sleep(0.01)
    raise AssertionError(f"no workload under pid {parent}")


# A POSIX queue made in the stand-in init's IPC namespace shows in the container's /dev/mqueue.
MQ_OPEN = """
import ctypes, os
librt = ctypes.CDLL("librt.so.1", use_errno=True)
librt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
assert librt.mq_open(b"/cer-restore-queue", os.O_CREAT | os.O_RDWR, 0o600, None) >= 0, ctypes.get_errno()
"""


def test_symbolic_links_in_the_image_never_lead_a_mount_outside_the_rootfs(container_checkpoint, built, tmp_path):
    """A container image whose /run is a link to a host directory and whose /data climbs out with '..':
    the mounts land inside the rootfs, the host directory is untouched in both namespaces."""
    target, other = built.bundles.parent / "host-target", built.bundles.parent / "other-target"
    for directory in (target, other):
        directory.mkdir()
        (directory / "marker").write_text("host\n")
    lower = tmp_path / "lower"
    shutil.copytree(container_checkpoint.rootfs, lower, symlinks=True)
    for name in ("run", "data"):
        if (lower / name).exists():
            (lower / name).rmdir()
    (lower / "run").symlink_to(target)
    (lower / "data").symlink_to("../../../../../../../.." + str(other))
    contents = read_checkpoint(container_checkpoint.images)
    namespace = built.build(Recipe.from_checkpoint(contents, str(lower), container_checkpoint.external))
    table = mount_table(namespace.path, namespace.rootfs)
    targets = [row[0] for row in table]
    assert str(target) in targets and str(other) in targets  # /run and /data, resolved inside the rootfs
    for directory in (target, other):
        assert sorted(os.listdir(directory)) == ["marker"]
        # What the namespace shows at those paths is its own (the host's tree is not in it at all).
        with mounts_support.joined(namespace.path) as inside:
            assert not inside.call(lambda: os.path.exists(directory / "marker"))


def test_a_mount_that_fails_fails_the_namespace_naming_it_and_leaves_nothing(container_checkpoint, built):
    before = host_mounts()
    recipe = recipe_for(container_checkpoint, {"/data": str(built.bundles.parent / "no-such-directory")})
    with pytest.raises(MountError, match=r"mount /data \(unsupported, mount id \d+\): No such file or directory"):
        built.build(recipe)
    assert os.listdir(built.bundles) == []
    assert host_mount_changes(before, built.bundles) == []
    unmapped = recipe_for(container_checkpoint, {})
    with pytest.raises(MountError, match=r"mount /data .*key '/data'.*no host path is configured"):
        built.build(unmapped)
    assert os.listdir(built.bundles) == []


def _mount_namespace_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except FileNotFoundError:
        return None


def test_a_busy_namespace_is_torn_down_all_the_same(plain_checkpoint, built):
    """A process still working inside the tree (cwd in its /run tmpfs): tear-down never enters the namespace,
    the bundle is removed from outside, the host's table untouched (the tree goes with the last process)."""
    before = host_mounts()
    namespace = built.build(recipe_for(plain_checkpoint))
    holder = subprocess.Popen(["nsenter", f"--mount={namespace.path}", "/mount-workload", "wait", "/run/cer"])
    try:
        inode = os.stat(namespace.path).st_ino
        wait_for(lambda: holder.poll() is not None or _mount_namespace_inode(holder.pid) == inode, what="the holder to enter")
        assert mounts_support.read_file(namespace.path, "/run/cer/state.txt") == b"state of the workload\n"
        built.destroy(namespace)
        assert not os.path.exists(namespace.bundle)
        assert host_mount_changes(before, built.bundles) == []
        # The tree is the namespace's root (pivoted): it stays the process's own until it leaves.
        assert holder.poll() is None, holder.returncode
        assert mounts_support.read_file(f"/proc/{holder.pid}/ns/mnt", "/run/cer/state.txt") == b"state of the workload\n"
    finally:
        holder.kill()
        holder.wait(10)


def test_remove_bundle_never_crosses_a_mount(built):
    """What is still mounted in a bundle (a bind of a host directory) stays untouched by its removal."""
    host = built.bundles.parent / "host-dir"
    host.mkdir()
    (host / "precious").write_text("keep\n")
    bundle = built.bundles / "b"
    (bundle / "rootfs" / "data").mkdir(parents=True)
    (bundle / "upper").mkdir()
    (bundle / "upper" / "file").write_text("x")
    errors = []

    def inside() -> None:
        try:
            ns.unshare(ns.CLONE_NEWNS)
            ns.make_mounts_private()
            ns.mount(str(host), str(bundle / "rootfs" / "data"), None, ns.MS_BIND)
            remove_bundle(str(bundle))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join(30)
    assert errors == []
    assert (host / "precious").read_text() == "keep\n"
    assert not (bundle / "upper").exists()
    remove_bundle(str(bundle))  # here the bind is not there: all of it goes
    assert not bundle.exists()


def test_the_process_umask_is_left_alone(plain_checkpoint, built):
    old = os.umask(0o027)
    try:
        built.build(recipe_for(plain_checkpoint))
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_a_checkpoint_without_mountpoints_gets_the_overlay_alone(built):
    contents = read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint")
    namespace = built.build(Recipe.from_checkpoint(contents, str(criu_support.SAMPLE_DIR / "rootfs")))
    table = mount_table(namespace.path, namespace.rootfs)
    assert [(row[0], row[1]) for row in table] == [("/", "overlay")]
    assert "hostname" in mounts_support.list_directory(namespace.path, "/etc")


def test_an_unreadable_mount_tree_fails_building_with_its_reason(container_checkpoint, built, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(container_checkpoint.images, images)
    (mountpoints,) = images.glob("mountpoints-*.img")
    mountpoints.write_bytes(mountpoints.read_bytes()[:-7])
    contents = read_checkpoint(images)
    recipe = Recipe.from_checkpoint(contents, str(container_checkpoint.rootfs), container_checkpoint.external)
    assert recipe.uts is not None
    with pytest.raises(MountError, match=rf"mount tree cannot be used: {mountpoints}: at offset \d+: entry of"):
        built.build(recipe)
    assert os.listdir(built.bundles) == []


def test_plans_with_problems_never_mount_anything(container_checkpoint, built):
    before = host_mounts()
    plan = plan_mounts(read_checkpoint(container_checkpoint.images).mounts, {})
    assert plan.problems
    recipe = Recipe(rootfs=str(container_checkpoint.rootfs), mounts=plan)
    with pytest.raises(MountError, match="/data"):
        built.build(recipe)
    assert os.listdir(built.bundles) == [] and host_mount_changes(before, built.bundles) == []


def in_a_private_tmpfs(work, directory: Path) -> list:
    """Run ``work(path)`` in a thread with a mount namespace of its own and a fresh tmpfs at ``directory``."""
    out: list = []

    def inside() -> None:
        try:
            ns.unshare(ns.CLONE_NEWNS)
            ns.make_mounts_private()
            ns.mount("tmpfs", str(directory), "tmpfs", 0, None)
            out.append(work(str(directory)))
        except BaseException as error:  # noqa: BLE001
            out.append(error)

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join(30)
    return out


def test_restored_contents_are_exact_and_host_devices_are_never_made(tmp_path):
    from cer.criu.tmpfs import TmpfsContents, TmpfsEntry
    from cer.mounts import restore_contents

    entries = (
        TmpfsEntry("shared", "dir", 0o3775, 0, 50, 10**18),
        TmpfsEntry("shared/tool", "file", 0o4755, 1000, 1000, 5 * 10**17, data=b"#!/bin/true\n"),
        TmpfsEntry("shared/also", "hardlink", 0o4755, 1000, 1000, 0, link="shared/tool"),
        TmpfsEntry("shared/fifo", "fifo", 0o620, 7, 8, 10**17),
        TmpfsEntry("shared/up", "symlink", 0o777, 3, 4, 10**17, link="../../.."),
        TmpfsEntry("null", "chardev", 0o666, 0, 0, 10**17, device=(1, 3)),
    )
    contents = TmpfsContents("tmpfs-dev-1.tar.gz.img", TmpfsEntry("", "dir", 0o1777, 0, 0, 10**17), entries, 12)

    def look(path: str) -> dict:
        restore_contents(contents, path)
        rows = {}
        for name in ("", "shared", "shared/tool", "shared/also", "shared/fifo", "shared/up", "null"):
            info = os.lstat(os.path.join(path, name))
            rows[name] = (oct(info.st_mode), info.st_uid, info.st_gid, info.st_mtime_ns, info.st_rdev)
        return rows

    directory = tmp_path / "mnt"
    directory.mkdir()
    (rows,) = in_a_private_tmpfs(look, directory)
    assert not isinstance(rows, BaseException), rows
    assert rows == {
        "": ("0o41777", 0, 0, 10**17, 0),
        "shared": ("0o43775", 0, 50, 10**18, 0),
        "shared/tool": ("0o104755", 1000, 1000, 5 * 10**17, 0),
        "shared/also": ("0o104755", 1000, 1000, 5 * 10**17, 0),
        "shared/fifo": ("0o10620", 7, 8, 10**17, 0),
        "shared/up": ("0o120777", 3, 4, 10**17, 0),
        "null": ("0o20666", 0, 0, 10**17, os.makedev(1, 3)),
    }
    assert os.listdir(directory) == []  # all of it was in the thread's own tmpfs

    for hostile in (TmpfsEntry("sda", "blockdev", 0o660, 0, 0, 0, device=(8, 0)),
                    TmpfsEntry("mem", "chardev", 0o660, 0, 0, 0, device=(1, 1))):
        bad = TmpfsContents("tmpfs-dev-2.tar.gz.img", None, (hostile,), 0)
        (error,) = in_a_private_tmpfs(functools.partial(restore_contents, bad), directory)
        assert isinstance(error, MountError) and f"restoring '{hostile.name}'" in str(error), error
        assert "cer does not create" in str(error)


def test_tmpfs_files_beyond_the_inline_bound_are_copied_from_the_archive_not_kept(tmp_path):
    """Issue 13 item 7: an archive whose files hold more than INLINE_BYTES keeps none of them in memory; each
    fill decompresses it again and writes the same files. An archive replaced after it was read is refused."""
    import gzip
    import io
    import tarfile

    from cer.criu.tmpfs import INLINE_BYTES, read_tmpfs_image
    from cer.mounts import restore_contents

    big, small = os.urandom(INLINE_BYTES + 1), b"small"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, kind in (("./", b"", tarfile.DIRTYPE), ("./d", b"", tarfile.DIRTYPE),
                                 ("./d/big", big, tarfile.REGTYPE), ("./small", small, tarfile.REGTYPE),
                                 ("./empty", b"", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode, info.mtime = kind, len(data), 0o640, 1000
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    image = tmp_path / "tmpfs-dev-9.tar.gz.img"
    image.write_bytes(gzip.compress(buffer.getvalue()))
    contents = read_tmpfs_image(image)
    assert contents.source is not None and all(entry.data == b"" for entry in contents.entries)
    assert [(entry.name, entry.size) for entry in contents.entries if entry.kind == "file"] == [
        ("d/big", len(big)), ("small", 5), ("empty", 0)]

    def look(path: str) -> dict:
        restore_contents(contents, path)
        return {name: (open(os.path.join(path, name), "rb").read(), oct(os.stat(os.path.join(path, name)).st_mode))
                for name in ("d/big", "small", "empty")}

    directory = tmp_path / "mnt"
    directory.mkdir()
    for _ in range(2):  # every fill reads the archive again
        (rows,) = in_a_private_tmpfs(look, directory)
        assert rows == {"d/big": (big, "0o100640"), "small": (small, "0o100640"), "empty": (b"", "0o100640")}

    image.write_bytes(gzip.compress(buffer.getvalue()))  # rewritten: another mtime
    (error,) = in_a_private_tmpfs(functools.partial(restore_contents, contents), directory)
    assert isinstance(error, MountError) and "changed after the checkpoint was read" in str(error), error
