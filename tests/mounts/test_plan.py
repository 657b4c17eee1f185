"""cer.mounts.plan_mounts: which mounts cer makes, which it leaves to the restore and why, and which it refuses."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402

from cer.criu.checkpoint import read_checkpoint  # noqa: E402
from cer.criu.mountpoints import MountEntry, MountTree  # noqa: E402
from cer.criu.tmpfs import TmpfsContents, TmpfsEntry  # noqa: E402
from cer.mounts import plan_mounts  # noqa: E402
from cer.pooled_namespaces import Recipe  # noqa: E402

READY = ["/dev", "/run", "/tmp", "/data", "/dev/pts", "/dev/shm"]


def entry(mnt_id, parent, mountpoint, fstype="tmpfs", root="/", dev=None, **extra) -> MountEntry:
    return MountEntry(mnt_id=mnt_id, parent_mnt_id=parent, fstype=fstype, root_dev=dev if dev is not None else mnt_id,
                      flags=extra.pop("flags", 0x200000), sb_flags=extra.pop("sb_flags", 0), root=root,
                      mountpoint=mountpoint, source=extra.pop("source", fstype), options=extra.pop("options", ""),
                      **extra)


ROOT = entry(10, 1, "/", fstype="ext4", root="/var/lib/bundle/rootfs", dev=254 << 20)


def tree(*mounts, tmpfs=()) -> MountTree:
    empty = {m.root_dev: TmpfsContents("tmpfs-dev.img", None, (), 0) for m in mounts if m.fstype == "tmpfs"}
    empty.update(dict(tmpfs))
    return MountTree("mountpoints-1.img", ROOT, tuple(mounts), tuple(empty.items()))


@pytest.mark.slow
def test_runc_containers_mounts(container_checkpoint):
    """cer makes the tmpfs mounts, devpts and the host bind; proc, sysfs, mqueue, the cgroups and all that is
    inside them (runc's masks and read-only paths) are the restore's, each with its reason."""
    contents = read_checkpoint(container_checkpoint.images)
    plan = plan_mounts(contents.mounts, container_checkpoint.external)
    assert plan.problems == ()
    assert sorted(step.entry.mountpoint for step in plan.ready) == sorted(READY)
    assert {step.action for step in plan.ready if step.entry.mountpoint == "/data"} == {"host"}
    deferred = {step.entry.mountpoint: step.deferred for step in plan.deferred}
    assert "PID namespace" in deferred["/proc"] and "host" in deferred["/proc"]
    assert "network" in deferred["/sys"]
    assert "IPC namespace" in deferred["/dev/mqueue"]
    assert "cgroup" in deferred["/sys/fs/cgroup/cpu"]
    for inside in ("/proc/sys", "/proc/keys", "/proc/acpi", "/sys/firmware", "/sys/fs/cgroup"):
        assert deferred[inside].startswith("inside or bound from /"), inside
    # The masks bind the container's own /dev/null (its /dev tmpfs), never the host's.
    keys = next(step for step in plan.steps if step.entry.mountpoint == "/proc/keys")
    assert (keys.action, keys.source) == ("bind", "/dev/null")
    # Every mount comes after its parent and after what it binds.
    done = {contents.mounts.root.mnt_id}
    by_target = {step.entry.mountpoint: step.entry.mnt_id for step in plan.steps}
    for step in plan.steps:
        assert step.entry.parent_mnt_id in done
        if step.action == "bind" and step.source in by_target and step.source != step.entry.mountpoint:
            assert by_target[step.source] in done
        done.add(step.entry.mnt_id)


@pytest.mark.slow
def test_an_external_bind_without_a_host_path_is_a_problem_naming_it(container_checkpoint):
    contents = read_checkpoint(container_checkpoint.images)
    recipe = Recipe.from_checkpoint(contents, str(container_checkpoint.rootfs))
    (problem,) = recipe.mounts.problems
    assert problem.startswith("mount /data (unsupported, mount id ") and "key '/data'" in problem
    assert "no host path is configured" in problem
    # The IPC and UTS parts of the recipe are there all the same.
    assert recipe.uts is not None and recipe.ipc is not None


def test_without_a_mountpoints_image_or_a_rootfs_there_is_no_plan():
    contents = read_checkpoint(criu_support.SAMPLE_DIR / "checkpoint")
    assert Recipe.from_checkpoint(contents, str(criu_support.SAMPLE_DIR / "rootfs")).mounts is None
    fake = type(contents)(ipc=contents.ipc, uts=contents.uts, mounts=tree())
    assert Recipe.from_checkpoint(fake, None).mounts is None
    assert Recipe.from_checkpoint(fake, "/lower").mounts is not None


@pytest.mark.parametrize("mounts, problem", [
    ((entry(11, 10, "/dev", fstype="devtmpfs"),),
     "mount /dev (devtmpfs, mount id 11): a devtmpfs would give the container the host's devices"),
    ((entry(11, 10, "/sys/kernel/debug", fstype="debugfs"),), "cer cannot mount debugfs filesystems"),
    ((entry(11, 10, "/x", deleted=True),), "mount point was deleted"),
    ((entry(11, 10, "/x", with_plugin=True),), "made by a CRIU plugin"),
    ((entry(11, 10, "/x", fstype="ext4", root="/srv", dev=254 << 20),), "cer cannot mount ext4"),
    ((entry(11, 10, "/x", root="/sub"),), "shows /sub of a filesystem that no mount of the checkpoint shows whole"),
    ((entry(11, 10, "/x", ext_key="volume"),), "an external bind mount (key 'volume') and no host path"),
])
def test_mounts_cer_cannot_make_are_problems(mounts, problem):
    plan = plan_mounts(tree(*mounts))
    assert any(problem in p for p in plan.problems), plan.problems


def test_only_the_standard_character_devices_and_only_in_dev():
    def dev(*devices):
        entries = tuple(TmpfsEntry(name, kind, 0o666, 0, 0, 0, device=numbers) for name, kind, numbers in devices)
        return tree(entry(11, 10, "/dev"), tmpfs=[(11, TmpfsContents("tmpfs-dev-11.tar.gz.img", None, entries, 0))])

    standard = [("null", "chardev", (1, 3)), ("zero", "chardev", (1, 5)), ("full", "chardev", (1, 7)),
                ("random", "chardev", (1, 8)), ("urandom", "chardev", (1, 9)), ("tty", "chardev", (5, 0))]
    assert plan_mounts(dev(*standard)).problems == ()
    (problem,) = plan_mounts(dev(*standard, ("zram0", "blockdev", (252, 0)), ("mem", "chardev", (1, 1)))).problems
    assert problem.startswith("mount /dev (tmpfs, mount id 11): holds device nodes a container must not get from cer: "
                              "zram0 (block 252:0), mem (char 1:1) (a privileged container's /dev")


def test_device_nodes_only_in_dev():
    null = TmpfsEntry("null", "chardev", 0o666, 0, 0, 0, device=(1, 3))
    contents = TmpfsContents("tmpfs-dev-11.tar.gz.img", None, (null,), 0)
    assert plan_mounts(tree(entry(11, 10, "/dev"), tmpfs=[(11, contents)])).problems == ()
    (problem,) = plan_mounts(tree(entry(11, 10, "/run"), tmpfs=[(11, contents)])).problems
    assert "mount /run" in problem and "holds device nodes (null); cer creates device nodes only in /dev" in problem


def test_a_host_path_must_be_absolute():
    (problem,) = plan_mounts(tree(entry(11, 10, "/x", ext_key="k")), {"k": "relative/dir"}).problems
    assert "not absolute" in problem


def test_binds_come_after_what_they_bind_whatever_the_mount_ids():
    mounts = (entry(11, 10, "/a/mask", root="/null", dev=20), entry(12, 10, "/a"), entry(20, 10, "/dev"))
    plan = plan_mounts(tree(*mounts))
    assert plan.problems == ()
    assert [(s.entry.mountpoint, s.action, s.source) for s in plan.steps] == [
        ("/a", "mount", "tmpfs"), ("/dev", "mount", "tmpfs"), ("/a/mask", "bind", "/dev/null")]


def test_binds_of_the_root_filesystem_and_of_pseudo_terminals():
    mounts = (entry(11, 10, "/etc/shared", fstype="ext4", root="/var/lib/bundle/rootfs/srv/shared", dev=254 << 20),
              entry(12, 10, "/dev"), entry(13, 12, "/dev/pts", fstype="devpts", options="newinstance"),
              entry(14, 12, "/dev/console", fstype="devpts", root="/0", dev=13),
              entry(15, 12, "/dev/ptmx", fstype="devpts", root="/ptmx", dev=13))
    steps = {s.entry.mountpoint: s for s in plan_mounts(tree(*mounts)).steps}
    assert (steps["/etc/shared"].action, steps["/etc/shared"].source) == ("bind", "/srv/shared")
    assert steps["/dev/console"].deferred == "a pseudo-terminal, which the restore re-creates"
    assert (steps["/dev/ptmx"].source, steps["/dev/ptmx"].deferred) == ("/dev/pts/ptmx", None)


def test_what_is_inside_or_bound_from_a_deferred_mount_is_deferred():
    mounts = (entry(11, 10, "/proc", fstype="proc", dev=30),
              entry(12, 11, "/proc/sys", fstype="proc", root="/sys", dev=30),
              entry(13, 10, "/dev"), entry(14, 11, "/proc/kcore", root="/null", dev=13, ext_key="/dev/null"),
              entry(15, 13, "/dev/sys-view", fstype="proc", root="/sys", dev=30))
    steps = {s.entry.mountpoint: s for s in plan_mounts(tree(*mounts)).steps}
    assert steps["/dev"].deferred is None
    assert "PID namespace" in steps["/proc"].deferred
    assert steps["/proc/sys"].deferred.startswith("inside or bound from /proc")
    assert steps["/proc/kcore"].deferred.startswith("inside or bound from /proc")
    assert steps["/dev/sys-view"].deferred.startswith("inside or bound from /proc")  # bound from it


def test_masks_and_read_only_paths_outside_proc_and_sys_are_made_by_cer():
    """A config's masked file (runc: the container's /dev/null, recorded as external with key /dev/null) and a
    read-only path (a bind of the root filesystem over itself, read-only): binds cer makes, after /dev."""
    mounts = (entry(13, 10, "/dev"),
              entry(14, 10, "/etc/secret", root="/null", dev=13, ext_key="/dev/null", flags=0x1000002),
              entry(15, 10, "/etc/ro", fstype="ext4", root="/var/lib/bundle/rootfs/etc/ro", dev=254 << 20,
                    flags=0x200001))
    plan = plan_mounts(tree(*mounts))
    steps = {s.entry.mountpoint: s for s in plan.steps}
    assert plan.problems == () and plan.deferred == ()
    assert (steps["/etc/secret"].action, steps["/etc/secret"].source) == ("bind", "/dev/null")
    read_only = steps["/etc/ro"]
    assert (read_only.action, read_only.source, read_only.entry.flags & 1) == ("bind", "/etc/ro", 1)
    order = [s.entry.mountpoint for s in plan.steps]
    assert order.index("/dev") < order.index("/etc/secret")
