"""The optional HTTP server (``cer start --http-port N``): pool capacity as the original CER-Manager
offered it, and the Prometheus metrics.

    POST /namespace/update  {"checkpoint_name": N, "checkpoint_namespace": NS, "capacity": C}
    GET  /metrics           the Prometheus text format

An update is the protocol's ``namespace.update`` (``checkpoint_namespace`` may be left out: ``default``):
the body becomes a NamespaceUpdate, which checks it and runs it through the Gateway, and the reply is
the protocol's JSON reply (``{"v": 1, "ok": true, "result": {"created": false}}``). Problems with the
request are 400 (with the protocol's ``bad_request`` error), an unknown path 404, a known one with the
wrong verb 405; errors of the update itself keep their protocol code, as 404, 503 or 500. Updates are
counted in the request metrics as the ZeroMQ frontend's requests are (a body that names no valid update
as ``method="invalid"``).

The server has no authentication: it binds to loopback unless ``allow_remote`` is set. It runs in a
thread the daemon starts and stops, one short-lived thread per connection, at most ``_MAX_CONNECTIONS``
at once.
"""

import ipaddress
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from loguru import logger

from cer.actors.gateway import Gateway
from cer.documents import load_object, reject_unknown
from cer.errors import BadRequest, CerError, InternalError, NotFound
from cer.metrics import Metrics
from cer.protocol.methods import NamespaceUpdate
from cer.protocol.wire import MAX_REQUEST_BYTES, encode_error, encode_result

DEFAULT_ADDRESS = "127.0.0.1"
MAX_BODY_BYTES = MAX_REQUEST_BYTES
_UPDATE_FIELDS = {"checkpoint_name", "checkpoint_namespace", "capacity"}
# A body a little too large is read and dropped, so the client sees the 400 rather than a reset connection.
_DRAIN_BYTES = 1024 * 1024
_MAX_CONNECTIONS = 32
_SOCKET_TIMEOUT = 10.0
_STATUS_BY_CODE = {
    "bad_request": HTTPStatus.BAD_REQUEST,
    "not_found": HTTPStatus.NOT_FOUND,
    "exhausted": HTTPStatus.SERVICE_UNAVAILABLE,
    "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
}


class HttpServerError(CerError):
    """The HTTP server cannot be started (address refused or not usable, port taken)."""


def check_address(address: str, allow_remote: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP address to bind; refuses anything but loopback unless ``allow_remote``."""
    try:
        ip = ipaddress.ip_address("127.0.0.1" if address == "localhost" else address)
    except ValueError:
        raise HttpServerError(f"--http-address {address!r} is not an IP address") from None
    if not ip.is_loopback and not allow_remote:
        raise HttpServerError(
            f"--http-address {address} is not a loopback address: the HTTP server has no authentication, so "
            "anyone who can reach it could resize pools; add --http-allow-remote to serve it anyway"
        )
    return ip


class HttpServer:
    """Serves ``/namespace/update`` and ``/metrics`` on ``address:port`` from a thread of its own."""

    def __init__(
        self,
        address: str,
        port: int,
        gateway: Gateway,
        metrics: Metrics,
        allow_remote: bool = False,
    ) -> None:
        self._ip = check_address(address, allow_remote)
        self._port = port
        self._gateway = gateway
        self._metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self._ip}]" if self._ip.version == 6 else str(self._ip)
        port = self._server.server_address[1] if self._server is not None else self._port
        return f"http://{host}:{port}"

    def start(self) -> None:
        """Bind and start serving; raises HttpServerError when the address cannot be bound."""
        family = socket.AF_INET6 if self._ip.version == 6 else socket.AF_INET
        try:
            self._server = _Server((str(self._ip), self._port), family, self)
        except OSError as error:
            raise HttpServerError(f"cannot serve HTTP on {self.url}: {error.strerror or error}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="cer-http", daemon=True)
        self._thread.start()
        if self._ip.is_loopback:
            logger.info("serving HTTP on {} (/namespace/update, /metrics)", self.url)
        else:
            logger.warning(
                "serving HTTP on {} to OTHER HOSTS WITHOUT AUTHENTICATION (--http-allow-remote): anyone who "
                "reaches it can resize pools; firewall it", self.url
            )

    def stop(self) -> None:
        """Stop taking connections; requests in progress finish against the daemon as it stops."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._server = None
        logger.info("stopped serving HTTP")

    # -- what the handler threads call ---------------------------------------------------------------

    def update(self, body: bytes) -> tuple[int, bytes]:
        """Handle an update body: the HTTP status and the JSON reply."""
        started = time.perf_counter()
        method_name = error_code = None
        try:
            method = _parse_update(body)
            method_name = f"{method.service}.{method.name}"
            reply, status = encode_result(method.handle(self._gateway)), HTTPStatus.OK
        except CerError as error:
            error_code = error.code
            reply, status = encode_error(error), _STATUS_BY_CODE.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR)
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever broke
            logger.exception("HTTP update failed")
            error_code = InternalError.code
            reply, status = encode_error(InternalError(f"{type(error).__name__}: {error}")), HTTPStatus.INTERNAL_SERVER_ERROR
        self._observed(method_name, time.perf_counter() - started, error_code)
        return status, reply

    def refused(self, error: BadRequest) -> bytes:
        """The reply to an update whose body was not even read (no length, too large); counted like a bad body."""
        self._observed(None, 0.0, error.code)
        return encode_error(error)

    def _observed(self, method_name: str | None, seconds: float, error_code: str | None) -> None:
        try:
            self._metrics.request_answered(method_name, seconds, error_code)
        except Exception:  # noqa: BLE001 - metrics never cost a reply
            logger.exception("observing an HTTP request failed")

    def metrics(self) -> tuple[bytes, str]:
        return self._metrics.exposition()


def _parse_update(body: bytes) -> NamespaceUpdate:
    """The original's update body, checked by the protocol's own NamespaceUpdate."""
    document = load_object(body, 'the body, {"checkpoint_name": N, "checkpoint_namespace": NS, "capacity": C},')
    reject_unknown(document, _UPDATE_FIELDS, "the body")
    ref = {"name": document.get("checkpoint_name")}
    if "checkpoint_namespace" in document:
        ref["labels"] = {"namespace": document["checkpoint_namespace"]}
    try:
        return NamespaceUpdate.parse({"ref": ref, "capacity": document.get("capacity")})
    except BadRequest as error:
        # The protocol names the fields ref.name and ref.labels.namespace: say which of this body's it means.
        raise BadRequest(f"{error} (checkpoint_name and checkpoint_namespace make the ref)") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, owner: HttpServer) -> None:
        self.address_family = family
        self.owner = owner
        self._slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            logger.warning("HTTP: {} connections already open; dropping one from {}", _MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request, client_address) -> None:
        # socketserver would print the traceback to stderr; a client that stalls or resets is no news.
        logger.opt(exception=True).debug("HTTP connection from {} failed", client_address[0])

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _SOCKET_TIMEOUT  # a client that stalls mid-request loses its connection
    server_version = "cer"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        routes = {"/metrics": ("GET", self._metrics), "/namespace/update": ("POST", self._update)}
        path = urlsplit(self.path).path
        if path not in routes:
            self._reply(HTTPStatus.NOT_FOUND, encode_error(NotFound(f"no such path {path!r}; there are {', '.join(routes)}")))
            return
        verb, handler = routes[path]
        if self.command != verb:
            self._reply(
                HTTPStatus.METHOD_NOT_ALLOWED,
                encode_error(BadRequest(f"{path} takes {verb}, not {self.command}")),
                headers={"Allow": verb},
            )
            return
        handler()

    def _metrics(self) -> None:
        body, content_type = self.server.owner.metrics()
        self._reply(HTTPStatus.OK, body, content_type)

    def _update(self) -> None:
        try:
            body = self._read_body()
        except OSError:
            body = None  # timed out or reset mid-body
        except BadRequest as error:
            self.close_connection = True  # what is left of the body is not read
            self._reply(HTTPStatus.BAD_REQUEST, self.server.owner.refused(error))
            return
        if body is None:
            self.close_connection = True  # the client went away or stalled mid-body: nobody to answer
            return
        self._reply(*self.server.owner.update(body))

    def _read_body(self) -> bytes | None:
        """The request body, or None when the client closed the connection before sending it all."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise BadRequest("send the body with a Content-Length, not a Transfer-Encoding")
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise BadRequest("a JSON body with a Content-Length is required")
        if not (declared.isascii() and declared.strip().isdigit()):
            raise BadRequest(f"Content-Length {declared!r} is not a byte count")
        length = int(declared)
        if length > MAX_BODY_BYTES:
            if length <= _DRAIN_BYTES:
                self._drain(length)
            raise BadRequest(f"the body is {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        body = self.rfile.read(length)
        return body if len(body) == length else None

    def _drain(self, length: int) -> None:
        try:
            while length > 0 and (chunk := self.rfile.read(min(length, 65536))):
                length -= len(chunk)
        except OSError:
            pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        logger.debug("HTTP {}: {}", self.client_address[0], format % args)
