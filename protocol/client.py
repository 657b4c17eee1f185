"""A client of the cer daemon, for the CLI, the restore wrapper and any Python program.

    with Client() as client:
        reply = client.call(NamespaceGet("uts", CheckpointRef("CKPT")))
"""

import zmq

from cer.config import client_endpoint
from cer.errors import Unavailable
from cer.protocol.methods import Method
from cer.protocol.security import secure_client
from cer.protocol.wire import decode_reply, encode_request


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = 30.0, curve_keys: str | None = None) -> None:
        self.endpoint = client_endpoint(endpoint)
        self._curve_keys = curve_keys
        self._timeout_ms = int(timeout * 1000)
        self._context = zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    def call(self, method: Method) -> dict:
        """Send one request and return its result; an error reply raises its CerError subclass."""
        return self.request(method.service, method.name, method.params())

    def request(self, service: str, name: str, params: dict) -> dict:
        socket = self._connect()
        socket.send(encode_request(service, name, params))
        try:
            reply = socket.recv()  # RCVTIMEO bounds it: one call, no poller to build per request
        except zmq.Again:
            # A REQ socket that sent and got nothing back cannot send again: start afresh next time.
            self.close()
            raise Unavailable(f"no answer from the cer daemon at {self.endpoint} within {self._timeout_ms / 1000:g} s") from None
        return decode_reply(reply)

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            self._socket = self._context.socket(zmq.REQ)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
            if self._curve_keys is not None:
                secure_client(self._socket, self._curve_keys)
            self._socket.connect(self.endpoint)
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
