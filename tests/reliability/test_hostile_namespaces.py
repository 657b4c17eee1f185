"""A process inside a namespace cer handed out is not to be trusted: whatever it does in there, the put
tears the namespace down from outside, removes the bundle from the host and frees the factory's slot.

The hostile process does what runc does with a mount namespace (joins it, ``pivot_root`` into the rootfs,
detaches the old root), then plants the path of its bundle inside its own root, or a tree too deep for a
recursive walk, in the overlay's upper layer (which is the bundle on the host). A namespace cer already
pivoted (issue 12) is joined as it is: it starts with the container's rootfs as its root.
"""

import ctypes
import fcntl
import os
import struct
import subprocess
import sys

import pytest
import mounts_support
from conftest import wait_for

from cer.pooled_namespaces import remove_bundle
from cer.protocol.methods import NamespaceGet, NamespacePut
from cer.references import CheckpointRef

SAMPLE_REF = CheckpointRef("sample")
MAX_CONCURRENT_CREATIONS = 4  # the daemon's default: one more hostile put than this would wedge it

HOSTILE = r"""
import ctypes, os, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(result, what):
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


path, rootfs, bundle, mode = sys.argv[1:]
fd = os.open(path, os.O_RDONLY)
check(libc.setns(fd, 0x00020000), "setns")
os.close(fd)
if rootfs != "/" and os.path.ismount(rootfs):  # not pivoted yet (info.rootfs is "/" once it is): as runc does
    os.chdir(rootfs)
    check(libc.syscall(155, b".", b"."), "pivot_root")  # SYS_pivot_root on x86_64
    check(libc.umount2(b".", 2), "umount2")  # MNT_DETACH
os.chdir("/")
if "plant" in mode:  # the bundle's path, read from the overlay's upperdir, in the container's own root
    os.makedirs(os.path.join(bundle, "rootfs"))
    os.makedirs(os.path.join(bundle, "upper"))
    with open(os.path.join(bundle, "upper", "planted"), "w") as planted:
        planted.write("the container's\n")
if "deep" in mode:
    for _ in range(1500):  # past Python's recursion limit
        os.mkdir("d")
        os.chdir("d")
    os.chdir("/")
print("ready", flush=True)
if "stay" in mode:
    sys.stdin.read()
"""

# <linux/nsfs.h> NS_GET_MNTNS_ID, and listmount(2) (x86_64) asked for a namespace's mounts by its id:
# ENOENT once the namespace is gone.
_NS_GET_MNTNS_ID = 0x8008B705
_SYS_LISTMOUNT = 458
_LSMT_ROOT = 0xFFFFFFFFFFFFFFFF
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def mount_namespace_id(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("Q", fcntl.ioctl(fd, _NS_GET_MNTNS_ID, bytes(8)))[0]
    finally:
        os.close(fd)  # holding it would keep the namespace alive


def mount_namespace_exists(namespace_id: int) -> bool:
    request = struct.pack("IIQQQ", 32, 0, _LSMT_ROOT, 0, namespace_id)
    found = (ctypes.c_uint64 * 1)()
    if _libc.syscall(_SYS_LISTMOUNT, request, found, 1, 0) >= 0:
        return True
    error = ctypes.get_errno()
    assert error == 2, os.strerror(error)
    return False


def mounts_in(root) -> list:
    """What the host's mount table holds in ``root`` (other suites mount elsewhere meanwhile)."""
    return sorted(row for row in mounts_support.host_mounts() if row[0].startswith(f"{root}/"))


def hostile(reply: dict, mode: str, stay: bool = False) -> subprocess.Popen:
    """A process that joins the namespace at ``reply["path"]`` and does what ``mode`` says; it has done it
    when this returns. With ``stay`` it stays in there until its stdin is closed."""
    info = reply["info"]
    arguments = [reply["path"], info["rootfs"], info["bundle"], mode + ("-stay" if stay else "")]
    process = subprocess.Popen([sys.executable, "-I", "-c", HOSTILE, *arguments],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = process.stdout.readline()
    if line != b"ready\n":
        process.kill()
        pytest.fail(f"the hostile process failed: {process.communicate(timeout=10)[1].decode(errors='replace')}")
    return process


@pytest.mark.parametrize("mode", ["pivot", "pivot-plant", "pivot-deep"])
def test_a_container_that_pivots_never_keeps_its_bundle_nor_wedges_the_factory(daemon, mode):
    """More hostile puts than the factory has creation slots: each namespace is destroyed, each bundle gone
    from the host's disk, no mount left on the host, and the pools fill again (a tear-down that was never
    reported would hold its slot for good)."""
    daemon.wait_full("sample")
    put = []
    for _ in range(MAX_CONCURRENT_CREATIONS + 1):
        reply = daemon.call(NamespaceGet("mnt", SAMPLE_REF))
        put.append((reply["info"]["bundle"], mount_namespace_id(reply["path"])))
        hostile(reply, mode).communicate(timeout=30)
        daemon.call(NamespacePut("mnt", reply["namespace_id"], reply["pid"]))
    daemon.wait_full("sample")
    for bundle, namespace_id in put:
        wait_for(lambda: not mount_namespace_exists(namespace_id), 10, what="the namespace to be destroyed")
        wait_for(lambda: not os.path.lexists(bundle), 10, what=f"{bundle} to be removed")
    assert mounts_in(daemon.root) == []
    assert "tearing down mount namespace" not in daemon.output()


def test_a_namespace_put_while_a_process_is_still_in_it(daemon):
    """The process keeps the namespace and its mounts until it leaves (none of them in the host's table);
    the bundle goes from the host's disk at the put all the same, and the namespace with the process."""
    daemon.wait_full("sample")
    reply = daemon.call(NamespaceGet("mnt", SAMPLE_REF))
    namespace_id = mount_namespace_id(reply["path"])
    process = hostile(reply, "pivot-plant", stay=True)
    try:
        daemon.call(NamespacePut("mnt", reply["namespace_id"], reply["pid"]))
        wait_for(lambda: not os.path.lexists(reply["info"]["bundle"]), 10, what="the bundle to be removed")
        assert mounts_in(daemon.root) == []
        assert mount_namespace_exists(namespace_id)
    finally:
        process.communicate(timeout=10)
    wait_for(lambda: not mount_namespace_exists(namespace_id), 10, what="the namespace to go with its process")
    daemon.wait_full("sample")
    assert mounts_in(daemon.root) == []


def test_remove_bundle_takes_a_tree_deeper_than_any_recursion(tmp_path):
    bundle = tmp_path / "bundle"
    deepest = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ["bundle", "upper"] + ["d"] * 1500:  # past Python's recursion limit
            os.mkdir(name, dir_fd=deepest)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=deepest)
            os.close(deepest)
            deepest = inner
        os.symlink("/", "to-the-host", dir_fd=deepest)
    finally:
        os.close(deepest)
    remove_bundle(str(bundle))
    assert os.listdir(tmp_path) == []
