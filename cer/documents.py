"""JSON documents from outside (requests, HTTP bodies, the configuration): one object, known fields only."""

import orjson

from cer.errors import BadRequest


def load_object(raw: bytes, what: str) -> dict:
    """``raw`` parsed as a JSON object; BadRequest naming ``what`` (and the line and column) otherwise."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"{what} is not JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return document


def reject_unknown(document: dict, known: set[str], what: str) -> None:
    """Refuse fields this version does not know, so that a misspelt one never passes silently."""
    unknown = set(document) - known
    if unknown:
        raise BadRequest(f"{what} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
