"""Every error cer raises across a module boundary, in one place.

The first part is cer's error model: :class:`CerError` and its subclasses, each with the stable code the
protocol answers a request with. The second part is what the layers below raise (files, SysV IPC,
containerd, archives, working sets) for the layer above to catch and turn into a :class:`CerError` or a
pool's error; they keep the standard base (OSError, ValueError) that callers of those layers expect.
Exceptions that never leave one module (a connection's hang-up, a lazy-pages protocol violation) stay in
that module.

This module imports nothing but the standard library's errno: every layer imports it, runtime wrappers
and the client included.
"""

import errno

# --------------------------------------------------------------------------- cer's error model


class CerError(Exception):
    """Base of the errors cer answers requests with; ``code`` is the protocol's error code."""

    code = "internal"


class BadRequest(CerError):
    code = "bad_request"


class UnknownMethod(CerError):
    code = "unknown_method"


class NotFound(CerError):
    code = "not_found"


class Exhausted(CerError):
    code = "exhausted"


class Unavailable(CerError):
    code = "unavailable"


class InternalError(CerError):
    code = "internal"


class Unauthorized(CerError):
    """An update without the token (HTTP only: the other endpoints are root's alone)."""

    code = "unauthorized"


class ConfigError(CerError):
    """The configuration file cannot be used; the message names the file, the entry and the problem."""

    code = "bad_request"


class BudgetExceeded(BadRequest):
    """A pool's pre-filled IPC memory would take the daemon past its budget."""


class ImageError(CerError):
    """A CRIU image is truncated, corrupt or of an unknown kind."""

    code = "unavailable"

    def __init__(self, path: str, offset: int, problem: str) -> None:
        super().__init__(f"{path}: at offset {offset}: {problem}")
        self.path = path
        self.offset = offset
        self.problem = problem


class ViewError(CerError):
    """A view cannot be made (the images are on another filesystem than ROOT, a transform failed)."""

    code = "unavailable"


class MountError(CerError):
    """A mount of the checkpoint cannot be reproduced, or making it failed; the message names it."""

    code = "unavailable"


class DaemonError(CerError):
    """The daemon cannot start (ROOT unusable, another daemon running, endpoint taken)."""


class EndpointRefused(CerError):
    """An endpoint the daemon will not serve as asked."""


class FrontendError(CerError):
    """The endpoint cannot be served (bad URL, address in use, path too long)."""


class HttpServerError(CerError):
    """The HTTP server cannot be started (address refused or not usable, port taken)."""


def error_for_code(code: str) -> type[CerError]:
    """The error class a client raises for a reply's error code."""
    for cls in (BadRequest, UnknownMethod, NotFound, Exhausted, Unavailable):
        if cls.code == code:
            return cls
    return InternalError


# --------------------------------------------------------------------------- the layers below


class UnsafePathError(OSError):
    """A path from outside is not what cer may use: not a regular file, a link where none is expected,
    or a directory that someone other than root can change. ``strerror`` says which."""

    def __init__(self, path: str, problem: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, problem, path)


class IpcPopulateError(OSError):
    """Re-creating one object of a checkpoint's IPC namespace failed; the message names it."""


class WorkingSetError(ValueError):
    """A working-set file that cannot be used (garbled, another checkpoint's, too large)."""


class ContainerdError(Exception):
    """A containerd call failed; the message names the call and gives containerd's reason."""


class ContainerdUnavailable(ContainerdError):
    """containerd is not reachable, or did not answer in time: worth trying again later."""


class ContainerdNotFound(ContainerdError):
    """What the call names does not exist in that containerd namespace."""


class ContainerdAlreadyExists(ContainerdError):
    """What the call would create exists already."""


class ContainerdFailedPrecondition(ContainerdError):
    """The object is in a state that refuses the call (e.g. a snapshot that still has children)."""


class CheckpointImageError(Exception):
    """The image is not a checkpoint cer can use (not an index, no CRIU archive, malformed JSON)."""


class RootfsError(Exception):
    """The checkpoint's root filesystem cannot be built (a base image cer cannot read or mount)."""


class ArchiveError(Exception):
    """The archive is unsafe, corrupt, larger than its descriptor says, or not what its digest says."""


class Cancelled(Exception):
    """The extraction was asked to stop (the daemon is stopping)."""
