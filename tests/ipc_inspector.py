"""Describe the IPC and UTS namespaces this process runs in, as JSON on stdout.

Meant to run under ``nsenter --ipc=PATH --uts=PATH python3 ipc_inspector.py`` (see
``criu_support.inspect_namespaces``): the /proc/sys and /proc/sysvipc files read here, and the
SysV calls made, all act on the *current* IPC/UTS namespaces, whatever /proc is mounted. Standard
library only, so it runs under any python3 on the host.

Output (bytes as hex, since JSON has no bytes type)::

    {"ns": {"ipc": "ipc:[4026...]", "uts": "uts:[4026...]"},
     "hostname": str, "domainname": str,
     "sysctls": {"kernel.msgmax": 8192, "kernel.sem": [32000, 1024000000, 500, 32000], ...},
     "shm": [{"id", "key", "mode", "uid", "gid", "cuid", "cgid", "size", "nattch", "sha256"}],
     "sem": [{"id", "key", "mode", "uid", "gid", "cuid", "cgid", "nsems", "values"}],
     "msg": [{"id", "key", "mode", "uid", "gid", "cuid", "cgid", "qnum", "cbytes",
              "messages": [[mtype, hex], ...]}]}

Looking is almost free of side effects: shm segments are attached read-only and detached again
(that updates their attach/detach times and last pid), messages are read with MSG_COPY so nothing
is dequeued. MSG_COPY needs a kernel built with CONFIG_CHECKPOINT_RESTORE (CRIU needs it anyway);
without it "messages" is null and "messages_error" says why. A per-object failure (e.g. a segment
marked for removal that cannot be attached) is reported in that object's "error" field instead of
aborting the whole description.
"""

import ctypes
import ctypes.util
import hashlib
import json
import os
import sys

IPC_NOWAIT = 0o4000
MSG_COPY = 0o40000  # linux/msg.h: copy the message at index msgtyp instead of dequeuing
SHM_RDONLY = 0o10000
GETALL = 13

# Every IPC sysctl that is per IPC namespace (ipc/ipc_sysctl.c, ipc/mq_sysctl.c).
IPC_SYSCTLS = [
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.auto_msgmni",
    "kernel.sem",
    "kernel.shmmax", "kernel.shmall", "kernel.shmmni", "kernel.shm_rmid_forced",
    "kernel.msg_next_id", "kernel.sem_next_id", "kernel.shm_next_id",
    "fs.mqueue.queues_max", "fs.mqueue.msg_max", "fs.mqueue.msgsize_max",
    "fs.mqueue.msg_default", "fs.mqueue.msgsize_default",
]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.msgrcv.restype = ctypes.c_ssize_t
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
# semctl is variadic; its 4th argument (union semun) is passed as a pointer here (GETALL).
libc.semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


def _oserror(what):
    err = ctypes.get_errno()
    return f"{what}: {os.strerror(err)} (errno {err})"


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _sysctl(name):
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        values = [int(v) for v in _read(path).split()]
    except FileNotFoundError:
        return None  # older kernel without this knob
    return values[0] if len(values) == 1 else values


def _sysvipc(kind):
    """Rows of /proc/sysvipc/<kind> as dicts of ints (perms is octal)."""
    with open(f"/proc/sysvipc/{kind}") as f:
        header = f.readline().split()
        rows = []
        for line in f:
            fields = line.split()
            row = {}
            for name, value in zip(header, fields):
                row[name] = int(value, 8) if name == "perms" else int(value)
            rows.append(row)
    return rows


def _common(row, id_field):
    return {"id": row[id_field], "key": row["key"], "mode": row["perms"],
            "uid": row["uid"], "gid": row["gid"], "cuid": row["cuid"], "cgid": row["cgid"]}


def _shm():
    out = []
    for row in _sysvipc("shm"):
        item = _common(row, "shmid")
        item.update(size=row["size"], nattch=row["nattch"], sha256=None)
        addr = libc.shmat(row["shmid"], None, SHM_RDONLY)
        if addr in (None, ctypes.c_void_p(-1).value):
            item["error"] = _oserror("shmat")
        else:
            try:
                item["sha256"] = hashlib.sha256(ctypes.string_at(addr, row["size"])).hexdigest()
            finally:
                libc.shmdt(addr)
        out.append(item)
    return out


def _sem():
    out = []
    for row in _sysvipc("sem"):
        item = _common(row, "semid")
        item.update(nsems=row["nsems"], values=None)
        values = (ctypes.c_ushort * row["nsems"])()
        if libc.semctl(row["semid"], 0, GETALL, ctypes.cast(values, ctypes.c_void_p)) < 0:
            item["error"] = _oserror("semctl GETALL")
        else:
            item["values"] = list(values)
        out.append(item)
    return out


def _msg():
    out = []
    for row in _sysvipc("msg"):
        item = _common(row, "msqid")
        item.update(qnum=row["qnum"], cbytes=row["cbytes"], messages=[])
        # Room for the largest possible message: the whole queue content (plus the mtype long).
        size = max(row["cbytes"], 1)
        buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + size)
        for index in range(row["qnum"]):
            n = libc.msgrcv(row["msqid"], buf, size, index, IPC_NOWAIT | MSG_COPY)
            if n < 0:
                item["messages"] = None
                item["messages_error"] = _oserror(f"msgrcv(MSG_COPY, index {index})")
                break
            mtype = ctypes.c_long.from_buffer(buf).value
            text = buf.raw[ctypes.sizeof(ctypes.c_long):ctypes.sizeof(ctypes.c_long) + n]
            item["messages"].append([mtype, text.hex()])
        out.append(item)
    return out


def describe():
    return {
        "ns": {"ipc": os.readlink("/proc/self/ns/ipc"), "uts": os.readlink("/proc/self/ns/uts")},
        # /proc/sys/kernel/{hostname,domainname} show the reader's UTS namespace.
        "hostname": _read("/proc/sys/kernel/hostname"),
        "domainname": _read("/proc/sys/kernel/domainname"),
        "sysctls": {name: _sysctl(name) for name in IPC_SYSCTLS},
        "shm": _shm(),
        "sem": _sem(),
        "msg": _msg(),
    }


if __name__ == "__main__":
    json.dump(describe(), sys.stdout)
    sys.stdout.write("\n")
