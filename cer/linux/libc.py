"""The C library handle shared by the syscall wrappers, and the one way they report failures."""

import ctypes
import os


def _load() -> ctypes.CDLL:
    # glibc's soname first: find_library runs ldconfig (or a compiler) in a subprocess, which costs a restore's
    # action script more than all its mounts.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


libc = _load()
libc.syscall.restype = ctypes.c_long  # syscall(2) returns a long, which the default int would truncate


def check(result: int, what: str, path: str | None = None) -> int:
    """Return ``result``, or raise ``OSError(errno, message, path)`` when the call returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result
