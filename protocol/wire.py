"""Framing of the cer protocol: one JSON document per ZeroMQ message, in and out.

Request: ``{"v": 1, "service": S, "method": M, "params": {...}}``
Reply:   ``{"v": 1, "ok": true, "result": {...}}`` or
         ``{"v": 1, "ok": false, "error": {"code": C, "message": M}}``
"""

import orjson

from cer.documents import load_object, reject_unknown
from cer.errors import BadRequest, CerError, error_for_code

VERSION = 1
# Requests are small; anything larger is refused before it is parsed.
MAX_REQUEST_BYTES = 64 * 1024
_REQUEST_FIELDS = {"v", "service", "method", "params"}


def decode_request(frames: list[bytes]) -> tuple[str, str, dict]:
    """Parse one request; raise BadRequest with the reason for anything else."""
    if len(frames) != 1:
        raise BadRequest(f"a request is one message frame, not {len(frames)}")
    raw = frames[0]
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadRequest(f"the request is {len(raw)} bytes; at most {MAX_REQUEST_BYTES} are accepted")
    document = load_object(raw, "the request")
    reject_unknown(document, _REQUEST_FIELDS, "the request")
    if document.get("v") != VERSION or isinstance(document.get("v"), bool):
        raise BadRequest(f"unsupported protocol version {document.get('v')!r}; this daemon speaks v{VERSION}")
    service, method, params = document.get("service"), document.get("method"), document.get("params", {})
    if not isinstance(service, str) or not isinstance(method, str):
        raise BadRequest("service and method must be strings")
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object")
    return service, method, params


def encode_request(service: str, method: str, params: dict) -> bytes:
    return orjson.dumps({"v": VERSION, "service": service, "method": method, "params": params})


def encode_result(result: dict) -> bytes:
    return orjson.dumps({"v": VERSION, "ok": True, "result": result})


def encode_error(error: CerError) -> bytes:
    return orjson.dumps({"v": VERSION, "ok": False, "error": {"code": error.code, "message": str(error)}})


def decode_reply(raw: bytes) -> dict:
    """The result of a reply; an error reply is raised as the CerError subclass of its code."""
    try:
        document = orjson.loads(raw)
        if document["ok"]:
            return document["result"]
        error = document["error"]
        code, message = error["code"], error["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as failure:
        raise CerError(f"malformed reply from the daemon: {failure}") from None
    raise error_for_code(code)(message)
