"""CRIU's kernel probe cache, prepared ahead on hosts where CRIU cannot keep it itself.

Every CRIU run starts by probing the kernel (30-50 ms of a restore here) unless ``/run/criu.kdat`` holds
an earlier run's results. CRIU writes that file only on a tmpfs, so that it cannot outlive a reboot into
another kernel (criu/kerndat.c: the save checks ``fstatfs`` for TMPFS_MAGIC; the load checks only the
file's size and magics). On a host whose ``/run`` is a plain directory (no systemd), every restore pays
the probe again. So the daemon runs one ``criu check`` at start in a private mount namespace whose ``/run``
is a tmpfs, puts the cache CRIU wrote there into the host's ``/run``, and removes it at stop, so that a
reboot into another kernel does not find it (after a crash the next start writes it anew).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from loguru import logger

from cer.files import read_regular_file
from cer.linux.proc import mountinfo

RUN = "/run"
CACHE_NAME = "criu.kdat"
_MOST_BYTES = 1 << 16  # CRIU 4's struct kerndat_s is under 1 KiB
_TIMEOUT = 30.0
# In a mount namespace of its own (util-linux unshare), so the tmpfs on /run shows nowhere else: CRIU
# probes, saves its cache on the tmpfs, and the cache comes back on stdout.
_PROBE = 'mount -t tmpfs -o size=1m,mode=0700 cer-kdat "$1" && { "$0" check >/dev/null 2>&1; cat "$1/$2"; }'


def run_is_tmpfs(run: str = RUN) -> bool:
    """Whether CRIU can keep its cache in ``run`` by itself: the last mount on it is a tmpfs."""
    try:
        mounted = [row["fstype"] for row in mountinfo("/proc/self/mountinfo") if row["mountpoint"] == run]
    except OSError:
        return False
    return bool(mounted) and mounted[-1] == "tmpfs"  # the last mount on it is the one seen


class KdatCache:
    """The cache the daemon put in place: removed at stop unless someone replaced it meanwhile."""

    def __init__(self, path: str, contents: bytes) -> None:
        self.path = path
        self._contents = contents

    def remove(self) -> None:
        try:
            if read_regular_file(self.path, _MOST_BYTES) != self._contents:
                return  # rewritten by a CRIU of another version, or by another daemon: theirs now
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("cannot remove CRIU's kernel probe cache {}: {}", self.path, error)


def prepare(criu: str, run: str = RUN) -> KdatCache | None:
    """Put CRIU's kernel probe cache in ``run`` when CRIU cannot (``run`` is no tmpfs); None when it can,
    or when no cache could be made (each CRIU run then probes, as before: said in the log)."""
    if run_is_tmpfs(run):
        return None
    binary = shutil.which(criu)
    unshare = shutil.which("unshare")
    if binary is None or unshare is None:
        logger.warning("no CRIU kernel probe cache in {}: {} not found", run, criu if binary is None else "unshare")
        return None
    try:
        probe = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", _PROBE, binary, run, CACHE_NAME],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("no CRIU kernel probe cache in {}: {}", run, error)
        return None
    contents = probe.stdout
    if not 0 < len(contents) <= _MOST_BYTES:
        logger.warning("no CRIU kernel probe cache in {}: {} check saved none ({})", run, binary,
                       probe.stderr.decode(errors="replace").strip()[-200:] or f"exit status {probe.returncode}")
        return None
    path = os.path.join(run, CACHE_NAME)
    temporary = os.path.join(run, f".cer-{CACHE_NAME}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, contents)
        finally:
            os.close(fd)
        os.replace(temporary, path)  # whole or not at all: a CRIU starting meanwhile reads either
    except OSError as error:
        logger.warning("no CRIU kernel probe cache in {}: {}", run, error)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return None
    logger.info("{} is no tmpfs: CRIU's kernel probe cache put at {} for the daemon's lifetime (saves each CRIU run "
                "its kernel probing)", run, path)
    return KdatCache(path, contents)
