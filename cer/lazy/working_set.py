"""Working sets: the pages a restore of a checkpoint faulted in its first moments, kept for the next restores.

One file per checkpoint under ``ROOT/working-sets/`` (named by a digest of the checkpoint's reference, so
that no name from outside becomes a path)::

    FILE    ::= MAGIC HEADER_LENGTH HEADER { PID ADDRESS }      (little-endian; PID u32, ADDRESS u64)
    HEADER  ::= JSON object: ref, fingerprint, recorded (unix time), pages, seconds

``fingerprint`` says which checkpoint the set was recorded from (its pstree and pagemaps, and the size of
its pages files): a set recorded from other images than the ones a server serves is ignored, and recorded
anew. The addresses are the pages' addresses at dump time. A set that names pages the checkpoint does not
have, or misses pages it uses, costs page faults, never a wrong byte: the server only ever copies a page
from the checkpoint to the address the checkpoint gives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass

from cer.errors import WorkingSetError

DIRECTORY = "working-sets"
_MAGIC = b"CER-WORKING-SET\n"
_HEADER_LENGTH = struct.Struct("<I")
_RECORD = struct.Struct("<IQ")
_MAX_HEADER = 64 << 10
MAX_PAGES = 1 << 24
"""The most pages a set may name (64 GiB of memory): a larger file is not a set cer wrote."""


@dataclass(frozen=True)
class WorkingSet:
    ref: str
    fingerprint: str
    recorded: float
    seconds: float
    pages: tuple[tuple[int, int], ...]  # (pid, address at dump time), in the order they were first faulted

    def by_task(self) -> dict[int, list[int]]:
        tasks: dict[int, list[int]] = {}
        for pid, address in self.pages:
            tasks.setdefault(pid, []).append(address)
        return tasks


def path_for(root: str, ref: str) -> str:
    return os.path.join(root, DIRECTORY, hashlib.sha256(ref.encode()).hexdigest()[:32] + ".ws")


def fingerprint(directory: str, pids: list[int], pages_files: list[str]) -> str:
    """What identifies a checkpoint's memory layout: its pstree and pagemaps, and how large its pages are."""
    digest = hashlib.sha256()
    for name in ["pstree.img", *(f"pagemap-{pid}.img" for pid in sorted(pids))]:
        with open(os.path.join(directory, name), "rb") as file:
            data = file.read(_MAX_HEADER * 256)
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    for path in sorted(pages_files):
        digest.update(os.path.basename(path).encode() + os.stat(path).st_size.to_bytes(8, "little"))
    return digest.hexdigest()


def write(path: str, working_set: WorkingSet) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    header = json.dumps({"ref": working_set.ref, "fingerprint": working_set.fingerprint,
                         "recorded": working_set.recorded, "seconds": working_set.seconds,
                         "pages": len(working_set.pages)}).encode()
    body = b"".join(_RECORD.pack(pid, address) for pid, address in working_set.pages)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as file:
        file.write(_MAGIC + _HEADER_LENGTH.pack(len(header)) + header + body)
    os.rename(temporary, path)


def read_header(path: str) -> dict:
    """The header of a set, without its pages (for a status)."""
    with open(path, "rb") as file:
        return _header(file, path)


def read(path: str) -> WorkingSet:
    with open(path, "rb") as file:
        header = _header(file, path)
        count = header["pages"]
        body = file.read(count * _RECORD.size + 1)
    if len(body) != count * _RECORD.size:
        raise WorkingSetError(f"{path}: the header announces {count} pages, the file holds {len(body) / _RECORD.size:g}")
    pages = tuple(_RECORD.iter_unpack(body))
    return WorkingSet(header["ref"], header["fingerprint"], header["recorded"], header["seconds"], pages)


def _header(file, path: str) -> dict:
    if file.read(len(_MAGIC)) != _MAGIC:
        raise WorkingSetError(f"{path}: not a working-set file")
    raw = file.read(_HEADER_LENGTH.size)
    if len(raw) != _HEADER_LENGTH.size or (length := _HEADER_LENGTH.unpack(raw)[0]) > _MAX_HEADER:
        raise WorkingSetError(f"{path}: garbled header length")
    try:
        header = json.loads(file.read(length))
    except (ValueError, UnicodeDecodeError) as error:
        raise WorkingSetError(f"{path}: garbled header: {error}") from None
    kinds = {"ref": str, "fingerprint": str, "recorded": (int, float), "seconds": (int, float), "pages": int}
    if not isinstance(header, dict) or set(header) != set(kinds) or not all(
            isinstance(header[key], kind) and not isinstance(header[key], bool) for key, kind in kinds.items()):
        raise WorkingSetError(f"{path}: the header is not what cer writes")
    if not 0 <= header["pages"] <= MAX_PAGES:
        raise WorkingSetError(f"{path}: {header['pages']} pages is out of bounds")
    return header


def now() -> float:
    return time.time()
