"""What /proc tells about processes: their userfaultfds and the mappings registered with them, the
tasks of a container's pid namespace, listening sockets, command lines, mount tables.

Every reading is of a moment: a process may change or exit right after, so callers that act on one check
the process is still the same (a pidfd) afterwards. A process gone, or unreadable, reads as having nothing
(except a mount table: its reader raises, as it is read from a process that matters).
"""

import contextlib
import os

UFFD_LINK = "anon_inode:[userfaultfd]"


def uffd_fds(pid: int) -> list[int]:
    """The fd numbers of process ``pid`` that are userfaultfds."""
    fds = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == UFFD_LINK:
                fds.append(int(name))
        except OSError:
            continue
    return fds


def has_uffd(pid: int) -> bool:
    """Whether process ``pid`` holds a userfaultfd (a lazy-pages server does once its restore reached it)."""
    return bool(uffd_fds(pid))


def uffd_mappings(pid: int) -> list[tuple[int, int]]:
    """The mappings (start, end) of process ``pid`` registered with a userfaultfd for missing pages (``um``
    in smaps' VmFlags): those of a lazy restore wait on its server."""
    mappings = []
    start = end = 0
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    low, _, high = first.partition("-")
                    start, end = int(low, 16), int(high, 16)
                elif first == "VmFlags:" and " um" in line:
                    mappings.append((start, end))
    except (OSError, ValueError):
        return []
    return mappings


def tasks_of_namespace_led_by(pid: int) -> list[int]:
    """The processes of the pid namespace whose init is ``pid`` (a container's), none when ``pid`` is no such
    init or its namespace is this process's own: killing an init kills its namespace, nothing outside it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            nspid = next((line.split()[1:] for line in status if line.startswith("NSpid:")), [])
        namespace = os.stat(f"/proc/{pid}/ns/pid").st_ino
        if len(nspid) < 2 or nspid[-1] != "1" or namespace == os.stat("/proc/self/ns/pid").st_ino:
            return []
    except OSError:
        return []
    tasks = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(name) != pid and os.stat(f"/proc/{name}/ns/pid").st_ino == namespace:
                tasks.append(int(name))
        except OSError:
            continue
    return tasks


def listening(pid: int) -> bool:
    """Whether process ``pid`` holds a listening unix socket. (Told by inode: a socket bound by a name
    relative to a directory shows no usable path in /proc/net/unix.)"""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) >= 7 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        pass
    return False


def command_lines() -> dict[int, list[bytes]]:
    """Every process's argv, by pid (those that exit while read are left out)."""
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as file:
                found[int(name)] = file.read().split(b"\0")
        except OSError:
            continue
    return found


def mountinfo(path: str):
    """The rows of a mountinfo file (``/proc/PID/mountinfo``): mount point, root, fstype and super options, octal
    escapes decoded, in the table's order. Raises OSError when it cannot be read."""
    with open(path, "rb") as file:
        for line in file.read().splitlines():
            fields = line.split()
            separator = fields.index(b"-")
            yield {"root": _unescape(fields[3]), "mountpoint": _unescape(fields[4]),
                   "fstype": fields[separator + 1].decode(), "options": fields[separator + 3].decode()}


def _unescape(raw: bytes) -> str:
    # The kernel escapes space, tab, newline and backslash in octal (\040).
    return os.fsdecode(raw.decode("unicode_escape").encode("latin-1"))
