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

Who may do what. Loopback is no access control on a shared host (every local user reaches 127.0.0.1), so:

- an update needs ``Authorization: Bearer TOKEN``, TOKEN being the content of a file only root can read
  (``ROOT/http.token``, 0600 in the 0700 ROOT, written afresh at each start), else it is 401
  (``unauthorized``); ``token_file=None`` (``cer start --http-unauthenticated-updates``) serves updates to
  anyone who reaches the port, as the original did, and says so loudly;
- ``/metrics`` stays open, as Prometheus scrapes it: it is read-only, names only pools the daemon has (whose
  number is bounded), and says nothing ``cer status`` would not;
- the server binds to loopback unless ``allow_remote`` is set.

Nobody can hold it: one short-lived thread per connection, at most ``_MAX_CONNECTIONS`` at once and
``_MAX_PER_PEER`` from one peer (a local user, told by the uid that owns its end of a loopback connection,
or one remote address), and a connection that has not sent its whole request ``_REQUEST_DEADLINE`` seconds
after it was accepted is shut, however it trickles (slowloris). It runs in a thread the daemon starts and
stops.
"""

import hmac
import ipaddress
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from loguru import logger

from cer.protocol.gateway import Gateway
from cer.documents import load_object, reject_unknown
from cer.errors import BadRequest, CerError, HttpServerError, InternalError, NotFound, Unauthorized
from cer.metrics import Metrics
from cer.protocol.methods import NamespaceUpdate
from cer.protocol.wire import MAX_REQUEST_BYTES, encode_error, encode_result

DEFAULT_ADDRESS = "127.0.0.1"
MAX_BODY_BYTES = MAX_REQUEST_BYTES
_UPDATE_FIELDS = {"checkpoint_name", "checkpoint_namespace", "capacity"}
# A body a little too large is read and dropped, so the client sees the 400 rather than a reset connection.
_DRAIN_BYTES = 1024 * 1024
_MAX_CONNECTIONS = 64
_MAX_PER_PEER = 8
_REQUEST_DEADLINE = 5.0
_SOCKET_TIMEOUT = 10.0
TOKEN_NAME = "http.token"
_STATUS_BY_CODE = {
    "bad_request": HTTPStatus.BAD_REQUEST,
    "not_found": HTTPStatus.NOT_FOUND,
    "exhausted": HTTPStatus.SERVICE_UNAVAILABLE,
    "unavailable": HTTPStatus.SERVICE_UNAVAILABLE,
}


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
        token_file: str | None = None,
    ) -> None:
        self._ip = check_address(address, allow_remote)
        self._token_file = token_file
        self._token: bytes | None = None
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
            if self._token_file is not None:
                self._token = _write_token(self._token_file)
            self._server = _Server((str(self._ip), self._port), family, self)
        except OSError as error:
            self._remove_token()
            raise HttpServerError(f"cannot serve HTTP on {self.url}: {error.strerror or error}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="cer-http", daemon=True)
        self._thread.start()
        if self._token is None:
            logger.warning("serving HTTP on {}: /namespace/update WITHOUT AUTHENTICATION (--http-unauthenticated-updates): "
                           "every local user{} can resize pools and create new ones", self.url,
                           "" if self._ip.is_loopback else " and every host that reaches it")
        elif self._ip.is_loopback:
            logger.info("serving HTTP on {} (/namespace/update with the token in {}, /metrics)", self.url, self._token_file)
        else:
            logger.warning(
                "serving HTTP on {} to OTHER HOSTS (--http-allow-remote): /metrics to anyone who reaches it, updates "
                "with the token in {}; firewall it", self.url, self._token_file
            )

    def stop(self) -> None:
        """Stop taking connections; requests in progress finish against the daemon as it stops."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._server = None
        self._remove_token()
        logger.info("stopped serving HTTP")

    def _remove_token(self) -> None:
        if self._token is not None:
            try:
                os.unlink(self._token_file)
            except FileNotFoundError:
                pass

    def authorized(self, header: str | None) -> bool:
        """Whether an update may go on: the token matches (compared in constant time), or none is asked."""
        if self._token is None:
            return True
        scheme, _, presented = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._token)

    # -- what the handler threads call ---------------------------------------------------------------

    def update(self, body: bytes) -> tuple[int, bytes]:
        """Handle an update body: the HTTP status and the JSON reply."""
        started = time.perf_counter()
        method_name = error_code = None
        try:
            method = _parse_update(body)
            method_name = method.full_name
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

    def refused(self, error: CerError) -> bytes:
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


def _write_token(path: str) -> bytes:
    """A fresh random token in ``path``, readable by root alone; a file left there (by an earlier run, or
    planted: never followed) is replaced."""
    token = secrets.token_urlsafe(32).encode()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, token + b"\n")
    finally:
        os.close(fd)
    return token


def _table_address(host: str, port: int) -> tuple[str, str] | None:
    """The /proc/net table and the ``HEX:PORT`` form in which it lists a loopback ``host:port``."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        return None
    words = struct.unpack(f"={len(ip.packed) // 4}I", ip.packed)  # each 32-bit word in host order
    return ("/proc/net/tcp" if ip.version == 4 else "/proc/net/tcp6"), "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def peer_of(connection: socket.socket, address: tuple) -> tuple[str, int | str]:
    """Who is at the other end: ``("uid", N)`` for a local process (the owner of its end of a loopback
    connection, as /proc/net/tcp lists it), else ``("address", IP)``."""
    try:
        client = _table_address(address[0], address[1])
        server = _table_address(*connection.getsockname()[:2])
        if client is not None and server is not None and client[0] == server[0]:
            with open(client[0]) as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if fields[1] == client[1] and fields[2] == server[1]:
                        return "uid", int(fields[7])
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return "address", address[0]


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
        self._lock = threading.Lock()
        self._peers: Counter = Counter()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(self._peers.values())

    def process_request(self, request, client_address) -> None:
        peer = peer_of(request, client_address)
        with self._lock:
            refused = (f"{_MAX_CONNECTIONS} connections already open" if sum(self._peers.values()) >= _MAX_CONNECTIONS
                       else f"{_MAX_PER_PEER} connections of that peer open" if self._peers[peer] >= _MAX_PER_PEER
                       else None)
            if refused is None:
                self._peers[peer] += 1
        if refused is not None:
            logger.warning("HTTP: {}; dropping one from {} ({} {})", refused, client_address[0], *peer)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, (client_address, peer))
        except BaseException:
            self._release(peer)
            raise

    def _release(self, peer: tuple) -> None:
        with self._lock:
            self._peers[peer] -= 1
            if not self._peers[peer]:
                del self._peers[peer]

    def handle_error(self, request, client_address) -> None:
        # socketserver would print the traceback to stderr; a client that stalls or resets is no news.
        logger.opt(exception=True).debug("HTTP connection from {} failed", client_address[0][0])

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _SOCKET_TIMEOUT  # a client that stalls mid-request loses its connection
    server_version = "cer"
    sys_version = ""

    def __init__(self, request, client_address, server) -> None:
        # socketserver hands (address, peer) through; http.server wants the address alone.
        super().__init__(request, client_address[0], server)

    def setup(self) -> None:
        super().setup()
        self._deadline_lock = threading.Lock()
        self._request_read = False
        self._deadline = threading.Timer(_REQUEST_DEADLINE, self._request_too_slow)
        self._deadline.daemon = True
        self._deadline.start()

    def _request_too_slow(self) -> None:
        with self._deadline_lock:
            if self._request_read:
                return
            self._request_read = True
            self.close_connection = True
            try:
                # Wakes the handler's blocked read with an end of file; the socket is closed after finish().
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        logger.debug("HTTP {}: request not complete within {:g} s; connection shut", self.client_address[0],
                     _REQUEST_DEADLINE)

    def _read_done(self) -> bool:
        """Stop the request's deadline: False when it had passed already (the connection is shut)."""
        with self._deadline_lock:
            if self._request_read:
                return False
            self._request_read = True
        self._deadline.cancel()
        return True

    def finish(self) -> None:
        self._read_done()
        super().finish()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        routes = {"/metrics": ("GET", self._metrics), "/namespace/update": ("POST", self._update)}
        path = urlsplit(self.path).path
        if (path, self.command) != ("/namespace/update", "POST") and not self._read_done():
            return  # no body to read: the request is all here
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
        if not self.server.owner.authorized(self.headers.get("Authorization")):
            self._read_done()
            self.close_connection = True  # the body is not read
            error = Unauthorized(f"an update needs the header 'Authorization: Bearer TOKEN', TOKEN being the content "
                                 f"of the daemon's {TOKEN_NAME} (root's alone)")
            self._reply(HTTPStatus.UNAUTHORIZED, self.server.owner.refused(error), headers={"WWW-Authenticate": "Bearer"})
            return
        try:
            body = self._read_body()
        except OSError:
            body = None  # timed out or reset mid-body
        except BadRequest as error:
            self._read_done()
            self.close_connection = True  # what is left of the body is not read
            self._reply(HTTPStatus.BAD_REQUEST, self.server.owner.refused(error))
            return
        if not self._read_done():
            body = None  # the deadline passed while it came
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
