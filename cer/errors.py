"""Every error cer reports, each with the stable code the protocol sends for it."""


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


class ConfigError(CerError):
    """The configuration file cannot be used; the message names the file, the entry and the problem."""

    code = "bad_request"


class ImageError(CerError):
    """A CRIU image is truncated, corrupt or of an unknown kind."""

    code = "unavailable"

    def __init__(self, path: str, offset: int, problem: str) -> None:
        super().__init__(f"{path}: at offset {offset}: {problem}")
        self.path = path
        self.offset = offset
        self.problem = problem


def error_for_code(code: str) -> type[CerError]:
    """The error class a client raises for a reply's error code."""
    for cls in (BadRequest, UnknownMethod, NotFound, Exhausted, Unavailable):
        if cls.code == code:
            return cls
    return InternalError
