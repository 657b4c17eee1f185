"""The ZeroMQ frontend: turns each request into actor asks, and always answers.

Clients speak plain REQ/REP. Behind the bound ROUTER socket a ``zmq.proxy`` spreads requests over a
few REP worker threads (the ZeroMQ guide's mtserver), so a slow request, such as a get that waits for a
mount namespace to be built, holds up one worker and not the requests for other checkpoints. A REP socket
must answer every request it receives or it wedges: every path through ``_answer`` returns a reply.
"""

import itertools
import os
import threading

import zmq
from loguru import logger

from cer.actors.gateway import Gateway
from cer.errors import CerError, InternalError
from cer.protocol.methods import find_method
from cer.protocol.wire import MAX_REQUEST_BYTES, decode_request, encode_error, encode_result

# Larger messages make libzmq drop the connection before anything reads them; up to this size a
# too-large request still gets an error reply from decode_request.
_MAX_MESSAGE_BYTES = 16 * MAX_REQUEST_BYTES
_instances = itertools.count()


class FrontendError(CerError):
    """The endpoint cannot be served (bad URL, address in use, path too long)."""


class Frontend:
    def __init__(self, endpoint: str, gateway: Gateway, workers: int = 8, debug: bool = False) -> None:
        self.endpoint = endpoint
        self._gateway = gateway
        self._workers = workers
        self._debug = debug
        self._backend = f"inproc://cer-workers-{next(_instances)}"
        self._control = f"inproc://cer-control-{self._backend.rsplit('-', 1)[1]}"
        self._context: zmq.Context | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Bind the endpoint and start serving; raises FrontendError when the endpoint cannot be bound."""
        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        try:
            router.bind(self.endpoint)
        except zmq.ZMQError as error:
            router.close()
            self._context.term()
            raise FrontendError(f"cannot serve {self.endpoint}: {error}") from None
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.bind(self._backend)
        control = self._context.socket(zmq.PAIR)
        control.bind(self._control)
        # The sockets move to the proxy thread here; starting a thread is the memory barrier ZeroMQ asks for.
        self._threads.append(
            threading.Thread(target=_run_proxy, args=(router, dealer, control), name="cer-frontend-proxy", daemon=True)
        )
        for index in range(self._workers):
            socket = self._context.socket(zmq.REP)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self._backend)
            self._threads.append(
                threading.Thread(target=self._serve, args=(socket,), name=f"cer-frontend-{index}", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        logger.info("serving {} with {} workers", self.endpoint, self._workers)

    def stop(self) -> None:
        """Stop taking requests; requests being handled are answered first."""
        if self._context is None:
            return
        terminate = self._context.socket(zmq.PAIR)
        terminate.connect(self._control)
        terminate.send(b"TERMINATE")
        terminate.close()
        # term() wakes the workers blocked in recv with ContextTerminated and waits for their sockets.
        self._context.term()
        for thread in self._threads:
            thread.join(10)
        self._context = None
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass
        logger.info("stopped serving {}", self.endpoint)

    def _serve(self, socket: zmq.Socket) -> None:
        try:
            while True:
                try:
                    frames = socket.recv_multipart()
                except zmq.ContextTerminated:
                    return
                socket.send(self._answer(frames))
        finally:
            socket.close()

    def _answer(self, frames: list[bytes]) -> bytes:
        try:
            service, name, raw_params = decode_request(frames)
            method = find_method(service, name).parse(raw_params)
            if self._debug:
                logger.debug("request {}.{} {}", service, name, raw_params)
            reply = encode_result(method.handle(self._gateway))
        except CerError as error:
            reply = encode_error(error)
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever broke
            logger.exception("request failed")
            reply = encode_error(InternalError(f"{type(error).__name__}: {error}"))
        if self._debug:
            logger.debug("reply {}", reply.decode(errors="replace"))
        return reply


def _run_proxy(router: zmq.Socket, dealer: zmq.Socket, control: zmq.Socket) -> None:
    try:
        zmq.proxy_steerable(router, dealer, None, control)
    except zmq.ContextTerminated:
        pass
    finally:
        for socket in (router, dealer, control):
            socket.close()
