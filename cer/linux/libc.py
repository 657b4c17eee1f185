"""The C library handle shared by the syscall wrappers, and the one way they report failures."""

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(result: int, what: str, path: str | None = None) -> int:
    """Return ``result``, or raise ``OSError(errno, message, path)`` when the call returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result
