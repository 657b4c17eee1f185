"""The original CER-Manager's wire protocol on ``ROOT/daemon.socket``, for clients written for it.

The Go CER-Manager (github.com/YLonely/cer-manager) served a unix stream socket on which a client sends,
as many times as it likes on one connection::

    service type   2 bytes, big-endian: 10 namespace, 11 checkpoint
    method         4-byte big-endian length, then a JSON string: "Get", "Put" or "Update"
    request        4-byte big-endian length, then a JSON object with the original's field names

and reads one reply per request: a 4-byte big-endian length, then a JSON object in the original's shape.
This module only maps names and shapes: every request becomes the method object of
``cer.protocol.methods`` that the ZeroMQ frontend would build, parsed and handled the same way.

Hostile input gets an error reply in the original's shape while the stream is still in step (bad JSON,
unknown service or method, bad fields) and a closed connection once it is not (a length over the cap, a
truncated frame, a client too slow to finish a request or idle past the timeout). Connections beyond a
bound are closed at once. One thread accepts; each connection is served by a thread of its own, so a get
that waits for a namespace to be built holds up that connection only.
"""

import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from loguru import logger

from cer.documents import load_object
from cer.errors import BadRequest, CerError, FrontendError, InternalError, UnknownMethod
from cer.protocol.methods import CheckpointGet, CheckpointPut, Method, NamespaceGet, NamespacePut, NamespaceUpdate
from cer.protocol.wire import MAX_REQUEST_BYTES

SOCKET_NAME = "daemon.socket"
SERVICE_TYPES = {10: "namespace", 11: "checkpoint"}
# "Update" is the longest method name; a longer frame is not a method name.
MAX_METHOD_BYTES = 256
MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT = 30.0
_SERVICE = struct.Struct(">H")
_LENGTH = struct.Struct(">I")


# Not in cer.errors: it only ends one connection's loop here and never reaches a caller.
class _Hangup(Exception):
    """The connection cannot go on: the peer left, stalled, or broke the framing."""


@dataclass(frozen=True)
class _Route:
    """One method of the original: the request fields it had, and the shape of its replies."""

    method: type[Method]
    fields: frozenset[str]
    reply: Callable[[dict], dict]
    error: Callable[[str], dict]


def _namespace_reply(result: dict) -> dict:
    # The original's info was the bundle directory for mnt and absent for the other types.
    reply = {"pid": result["pid"], "namespace_fd": result["namespace_id"]}
    bundle = result["info"].get("bundle")
    return reply if bundle is None else {**reply, "info": bundle}


def _error_field(message: str) -> dict:
    return {"error": message}


def _empty(_result: dict) -> dict:
    return {}


_ROUTES: dict[tuple[str, str], _Route] = {
    ("namespace", "Get"): _Route(
        NamespaceGet,
        frozenset({"namespace_type", "ref", "extra_refs"}),
        _namespace_reply,
        lambda message: {"pid": 0, "namespace_fd": -1, "info": message},
    ),
    ("namespace", "Put"): _Route(NamespacePut, frozenset({"namespace_type", "namespace_id"}), _empty, _error_field),
    ("namespace", "Update"): _Route(NamespaceUpdate, frozenset({"ref", "capacity"}), _empty, _error_field),
    ("checkpoint", "Get"): _Route(
        CheckpointGet, frozenset({"ref"}), lambda result: {"path": result["path"]},
        lambda message: {"path": "", "error": message},
    ),
    ("checkpoint", "Put"): _Route(CheckpointPut, frozenset({"ref"}), _empty, _error_field),
}


def _any_error(message: str) -> dict:
    """An error before the method is known: every original reply type reads it as a failure."""
    return {"error": message, "pid": 0, "namespace_fd": -1, "info": message, "path": ""}


def _message(error: CerError) -> str:
    return f"{error.code}: {error}"


def _params(raw: dict, fields: frozenset[str]) -> dict:
    """The original's request as cer's params: the same field names, refs also as bare names."""
    unknown = set(raw) - fields
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(map(str, unknown)))}; this method has {', '.join(sorted(fields))}")
    params = dict(raw)
    # Older clients sent a checkpoint as its name alone; later ones as {"name", "labels": {"namespace"}}.
    if isinstance(params.get("ref"), str):
        params["ref"] = {"name": params["ref"]}
    if isinstance(params.get("extra_refs"), list):
        params["extra_refs"] = [{"name": ref} if isinstance(ref, str) else ref for ref in params["extra_refs"]]
    elif params.get("extra_refs") is None:
        params.pop("extra_refs", None)  # Go sends a nil slice as null
    return params


def _json(raw: bytes, what: str):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the {what} is not JSON: {error.msg}") from None


def encode_frame(document: dict) -> bytes:
    body = orjson.dumps(document)
    return _LENGTH.pack(len(body)) + body


class LegacyFrontend:
    """Serves the original protocol on a unix socket at ``path``; ``start``/``stop`` like ``Frontend``."""

    def __init__(
        self,
        path: str,
        gateway,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        debug: bool = False,
    ) -> None:
        self.path = path
        self._gateway = gateway
        self._timeout = timeout
        self._max_connections = max_connections
        self._debug = debug
        self._listener: socket.socket | None = None
        self._wake_read: socket.socket | None = None
        self._wake_write: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._refusing = False

    def start(self) -> None:
        """Bind the socket and start serving; raises FrontendError when the path cannot be served."""
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.path)
            # ROOT is 0700 already; the socket itself is root's alone as well.
            os.chmod(self.path, 0o600)
            listener.listen(self._max_connections)
        except OSError as error:
            listener.close()
            raise FrontendError(f"cannot serve {self.path}: {error.strerror or error}") from None
        self._listener = listener
        self._wake_read, self._wake_write = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept, name="cer-legacy-accept", daemon=True)
        self._acceptor.start()
        logger.info("serving the original protocol on {}", self.path)

    def stop(self) -> None:
        """Stop taking connections and requests; requests already being handled are answered first."""
        if self._listener is None:
            return
        self._stopping.set()
        self._wake_write.send(b"x")
        self._acceptor.join(10)
        with self._lock:
            connections = dict(self._connections)
        for connection in connections:
            # Readers wake with end-of-file; a reply being written still goes out.
            try:
                connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + 60
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in connections.values() if thread.is_alive()]
        if stuck:
            logger.error("legacy connection threads did not stop: {}", ", ".join(stuck))
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()
        self._listener = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        logger.info("stopped serving {}", self.path)

    def _remove_stale_socket(self) -> None:
        # Left by a daemon killed with SIGKILL; the ROOT lock says no daemon uses it now.
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise FrontendError(f"cannot serve {self.path}: {error.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise FrontendError(f"cannot serve {self.path}: it exists and is not a socket")
        os.unlink(self.path)

    def _accept(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._listener and not self._stopping.is_set():
                        self._take_connection()

    def _take_connection(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError as error:  # EMFILE and the like: the peer is gone, the listener is not
            logger.warning("cannot accept a connection on {}: {}", self.path, error)
            time.sleep(0.05)
            return
        with self._lock:
            full = len(self._connections) >= self._max_connections
            if full:
                refused_first = not self._refusing
                self._refusing = True
            else:
                self._refusing = False
                thread = threading.Thread(
                    target=self._serve, args=(connection,), name=f"cer-legacy-{connection.fileno()}", daemon=True
                )
                self._connections[connection] = thread
        if full:
            connection.close()
            if refused_first:
                logger.warning("{} has {} connections; refusing more until some close", self.path, self._max_connections)
            return
        try:
            thread.start()
        except RuntimeError as error:  # no more threads
            logger.error("cannot serve a connection on {}: {}", self.path, error)
            with self._lock:
                del self._connections[connection]
            connection.close()

    def _serve(self, connection: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                request = self._read_request(connection)
                if request is None:
                    return
                reply = self._answer(*request)
                connection.settimeout(self._timeout)
                connection.sendall(reply)
        except _Hangup as reason:
            logger.debug("closing a connection on {}: {}", self.path, reason)
        except OSError as error:
            logger.debug("closing a connection on {}: {}", self.path, error)
        except Exception:  # noqa: BLE001 - one connection's failure never reaches the others
            logger.exception("a legacy connection failed")
        finally:
            connection.close()
            with self._lock:
                self._connections.pop(connection, None)

    def _read_request(self, connection: socket.socket) -> tuple[int, bytes, bytes] | None:
        """The next request's three frames; None when the client closed between requests."""
        connection.settimeout(self._timeout)
        try:
            first = connection.recv(_SERVICE.size)
        except TimeoutError:
            raise _Hangup(f"idle for {self._timeout:g} s") from None
        if not first:
            return None
        # Once a request begins, all of it must come within the timeout: a trickle cannot hold a thread.
        deadline = time.monotonic() + self._timeout
        (service_type,) = _SERVICE.unpack(first + self._receive(connection, _SERVICE.size - len(first), deadline))
        method = self._frame(connection, MAX_METHOD_BYTES, "method name", deadline)
        request = self._frame(connection, MAX_REQUEST_BYTES, "request", deadline)
        return service_type, method, request

    def _frame(self, connection: socket.socket, limit: int, what: str, deadline: float) -> bytes:
        (length,) = _LENGTH.unpack(self._receive(connection, _LENGTH.size, deadline))
        if length > limit:
            # The rest cannot be skipped safely: answer, then hang up.
            message = f"bad_request: the {what} is {length} bytes; at most {limit} are accepted"
            try:
                connection.settimeout(self._timeout)
                connection.sendall(encode_frame(_any_error(message)))
            except OSError:
                pass
            raise _Hangup(message)
        return self._receive(connection, length, deadline)

    def _receive(self, connection: socket.socket, size: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Hangup(f"a request took more than {self._timeout:g} s to arrive")
            connection.settimeout(remaining)
            try:
                chunk = connection.recv(min(size - len(data), 65536))
            except TimeoutError:
                raise _Hangup(f"a request took more than {self._timeout:g} s to arrive") from None
            if not chunk:
                raise _Hangup("the connection closed inside a request")
            data += chunk
        return bytes(data)

    def _answer(self, service_type: int, raw_method: bytes, raw_request: bytes) -> bytes:
        route: _Route | None = None
        try:
            service = SERVICE_TYPES.get(service_type)
            if service is None:
                raise BadRequest(f"unknown service type {service_type}; 10 is namespace, 11 checkpoint")
            name = _json(raw_method, "method name")
            route = _ROUTES.get((service, name)) if isinstance(name, str) else None
            if route is None:
                names = ", ".join(method for known, method in _ROUTES if known == service)
                raise UnknownMethod(f"unknown {service} method {name!r}; this service has {names}")
            raw = load_object(raw_request, "the request")
            method = route.method.parse(_params(raw, route.fields))
            if self._debug:
                logger.debug("legacy request {}.{} {}", service, name, raw)
            reply = route.reply(method.handle(self._gateway))
        except CerError as error:
            reply = (route.error if route else _any_error)(_message(error))
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever broke
            logger.exception("legacy request failed")
            message = _message(InternalError(f"{type(error).__name__}: {error}"))
            reply = (route.error if route else _any_error)(message)
        if self._debug:
            logger.debug("legacy reply {}", reply)
        return encode_frame(reply)
