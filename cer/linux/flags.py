"""The kernel's clone and mount flags and the namespace types cer builds: numbers only, no syscalls.

The layers that describe namespaces and mounts without making them (the CRIU image reader, the protocol,
the client, metrics) import these from here, so that importing them loads no ctypes and no libc.
"""

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_FS = 0x00000200
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
# The per-mount flags (as /proc/PID/mountinfo shows them and a bind remount sets them).
MOUNT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME | MS_STRICTATIME
MNT_DETACH = 0x2

# Namespace type names as the protocol and /proc/*/ns/ spell them, with their clone flags.
CLONE_FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "mnt": CLONE_NEWNS}
NAMESPACE_TYPES = tuple(CLONE_FLAGS)
