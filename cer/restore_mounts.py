"""The CRIU action script that completes a restore's mounts in one of cer's pooled mount namespaces.

A restore that joins a pooled mount namespace (``join-ns mnt``, with an image view whose inventory says the
dumping CRIU shared the task's mount namespace, :mod:`cer.criu.views`) leaves the mount tree alone: the pool
built it. What the pool could not build are the mounts that show the container's own namespaces (proc, sysfs,
mqueue, cgroups, and runc's masked and read-only paths on them; see :mod:`cer.mounts`). This script makes them
once CRIU has restored the tasks and before they run (CRIU's ``post-restore`` action; a failure aborts the
restore), with the restored init's PID, network, IPC and cgroup namespaces:

1. the temporary /proc the pool mounted for CRIU (a read-only tmpfs holding a bind of /proc/sys, where CRIU
   writes the UTS and IPC sysctls; :func:`cer.mounting.mount_restore_sysctls`) is detached;
2. the script enters the init's namespaces and forks (a proc mount shows the PID namespace its mounter runs in);
   the child makes the plan's deferred steps with :func:`cer.mounting.mount_tree` (``restore=True``), the
   container's cgroup directories bound in as detached mounts taken where the host's paths are.

The plan comes with the images: the "mnt" view holds ``restore-mounts.plan`` beside them (:mod:`cer.criu.mntview`),
and CRIU tells the script where its images are (CRTOOLS_IMAGE_DIR). So one script serves every restore: the
daemon installs it under ROOT (:func:`install_action_script`) and ``checkpoint.restore`` answers the CRIU
configuration line naming it (:func:`criu_config_lines`), which a runtime wrapper puts in the restore's own
configuration file (runc reads the file the spec's ``org.criu.config`` annotation names). CRIU runs an action
script for every action (pre-restore, setup-namespaces, ..., post-resume) and CRIU 4.1.1 runs each one twice
(it parses the configuration twice): the shell script passes over every other action without starting Python,
and over a second ``post-restore`` run too (the first mounted the container's proc, where its init is pid 1; a
Python run that finds the tree complete does nothing either). Python starts once per restore, with ``-I -S``
and importing only :mod:`cer.mounting` (no protobuf, no tar reader, no json): that start-up is most of the
script's cost.
"""

from __future__ import annotations

import os
import sys

from cer.errors import MountError
from cer.linux import namespaces as ns
from cer.linux.proc import mountinfo
from cer.mounting import PLAN_NAME, decode_plan, mount_tree, unmount_tree

ACTION = "post-restore"
SCRIPT_NAME = "restore-mounts"
# The namespaces a restore-only mount shows (proc: PID; sysfs: network; mqueue: IPC; cgroup2: cgroup), in the
# order they are entered: the mount namespace last (it changes the root, after which /proc/PID/ns is out of reach).
_NAMESPACES = (("pid", ns.CLONE_NEWPID), ("net", ns.CLONE_NEWNET), ("ipc", ns.CLONE_NEWIPC),
               ("cgroup", ns.CLONE_NEWCGROUP))


def install_action_script(directory: str, python: str = sys.executable) -> str:
    """Write the action script into ``directory`` (root's own: CRIU runs it as root), replacing one left there;
    returns its path, for :func:`criu_config_lines`."""
    script_path = os.path.join(directory, SCRIPT_NAME)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launcher = ("import sys; sys.path.insert(0, sys.argv[1]); from cer.restore_mounts import main; "
                "sys.exit(main(sys.argv[2:]))")
    script = (
        "#!/bin/sh\n"
        "# cer: completes a restore's mounts in a pooled mount namespace once CRIU restored the tasks, before they\n"
        "# run (a CRIU action script; see cer/restore_mounts.py).\n"
        f'[ "$CRTOOLS_SCRIPT_ACTION" = {ACTION} ] || exit 0\n'
        f'plan="$CRTOOLS_IMAGE_DIR/{PLAN_NAME}"\n'
        '[ -f "$plan" ] || { echo "cer restore-mounts: no $plan: these are not cer\'s images for a mount namespace" >&2;'
        " exit 1; }\n"
        "# CRIU 4.1.1 runs each action script twice: a first run mounted the container's proc (its init is pid 1 there).\n"
        '[ -e "/proc/$CRTOOLS_INIT_PID/root/proc/1" ] && exit 0\n'
        f'exec {_quote(python)} -I -S -c {_quote(launcher)} {_quote(package_parent)} "$plan"\n'
    )
    temporary = f"{script_path}.{os.getpid()}.tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700),
              "w") as file:
        file.write(script)
    os.replace(temporary, script_path)
    return script_path


def criu_config_lines(script_path: str) -> list[str]:
    """The CRIU configuration lines that run ``script_path`` as an action script."""
    if any(c in script_path for c in "\n\"\\"):
        raise ValueError(f"unusable path for a CRIU configuration file: {script_path!r}")
    return [f'action-script "{script_path}"']


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def main(argv: list[str]) -> int:
    """Entry point of the action script: ``main([PLAN_PATH])`` with CRIU's CRTOOLS_* environment."""
    if os.environ.get("CRTOOLS_SCRIPT_ACTION") != ACTION:
        return 0
    try:
        (plan_path,) = argv
        init_pid = int(os.environ["CRTOOLS_INIT_PID"])
        with open(plan_path, "rb") as file:
            plan = decode_plan(file.read())
        complete_mounts(plan, init_pid)
    except (MountError, OSError, ValueError, KeyError) as error:
        print(f"cer restore-mounts: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def complete_mounts(plan, init_pid: int) -> None:
    """Make ``plan``'s deferred mounts in the mount namespace of ``init_pid`` (a restored, still stopped
    container init), with its namespaces; nothing when they are there already. Raises MountError or OSError."""
    deferred = [step for step in plan.steps if step.deferred is not None]
    if not deferred or _completed(deferred[-1].entry, init_pid):
        return
    sources = cgroup_sources(deferred, init_pid)
    try:
        _enter_namespaces(init_pid)
        child = os.fork()
        if child == 0:
            _finish_in_child(plan, sources)
        _, status = os.waitpid(child, 0)
    finally:
        for fd in sources.values():
            os.close(fd)
    if os.waitstatus_to_exitcode(status) != 0:
        raise MountError(f"completing the mounts of restored pid {init_pid} failed (status {status:#x})")


def _finish_in_child(plan, sources: dict[str, int]) -> None:
    """In the container's PID namespace, its root our root: replace the temporary /proc, make the rest."""
    code = 1
    try:
        unmount_tree("/proc")
        mount_tree(plan, "/", restore=True, external=sources)
        code = 0
    except BaseException as error:  # noqa: BLE001 - reported, and the child must never return into the caller
        print(f"cer restore-mounts: {error}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _enter_namespaces(init_pid: int) -> None:
    fds = {}
    try:
        for name, _ in (*_NAMESPACES, ("mnt", ns.CLONE_NEWNS)):
            fds[name] = os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        for name, flag in _NAMESPACES:
            if os.fstat(fds[name]).st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
                ns.setns(fds[name], flag)
        ns.setns(fds["mnt"], ns.CLONE_NEWNS)
    finally:
        for fd in fds.values():
            os.close(fd)


def _completed(last_entry, init_pid: int) -> bool:
    """Whether the last deferred mount is in place: what a first run of the script leaves."""
    for fields in mountinfo(f"/proc/{init_pid}/mountinfo"):
        if fields["mountpoint"] == last_entry.mountpoint and fields["fstype"] == last_entry.fstype:
            return True
    return False


def cgroup_sources(deferred, init_pid: int) -> dict[str, int]:
    """For each deferred external cgroup bind (runc's cgroup v1 mounts): a detached bind (open_tree fd) of the
    host directory of the restored init's cgroup in that hierarchy, taken here, where the host's paths are."""
    wanted = [step for step in deferred if step.action == "host" and step.entry.fstype == "cgroup"]
    if not wanted:
        return {}
    memberships = []
    with open(f"/proc/{init_pid}/cgroup") as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers:
                memberships.append((set(controllers.split(",")), path))
    hierarchies = [(set(fields["options"].split(",")), fields["root"], fields["mountpoint"])
                   for fields in mountinfo("/proc/self/mountinfo") if fields["fstype"] == "cgroup"]
    sources: dict[str, int] = {}
    try:
        for step in wanted:
            controllers = set(step.entry.options.split(",")) - {"rw", "ro"}
            path = next((path for names, path in memberships if controllers & names), None)
            # The host's mount of that hierarchy that shows the cgroup (the first: a bind of a sub-group may follow).
            host = next((os.path.join(mountpoint, os.path.relpath(path, root)) for options, root, mountpoint
                         in hierarchies if path is not None and controllers & options
                         and not os.path.relpath(path, root).startswith("..")), None)
            if host is None:
                raise MountError(f"mount {step.entry.describe()}: no host mount shows the restored pid {init_pid}'s "
                                 f"cgroup in the {','.join(sorted(controllers))} hierarchy")
            sources[step.entry.ext_key] = ns.open_tree(os.path.normpath(host))
    except BaseException:
        for fd in sources.values():
            os.close(fd)
        raise
    return sources
