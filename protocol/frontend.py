"""The ZeroMQ frontend: turns each request into actor asks, and always answers.

Clients speak plain REQ/REP. One router thread owns the bound ROUTER socket: it hands each request to
a pool of worker threads and sends their replies back, in whatever order they finish ("ROUTER with
asynchronous replies"), so a slow request, such as a get that waits for a mount namespace to be built,
holds up one worker and not the requests for other checkpoints. (A DEALER in front of REP workers would
not do: it deals round-robin, queueing requests behind a busy worker.) Each worker owns a PUSH socket
that carries its replies to the router thread; no socket is shared between threads.
"""

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable

import zmq
from loguru import logger

from cer.actors.gateway import Gateway
from cer.errors import CerError, InternalError, Unavailable
from cer.protocol.methods import find_method
from cer.protocol.security import INSECURE_TCP_FLAG, CurveServer, EndpointRefused, bind_ipc, check_endpoint
from cer.protocol.wire import MAX_REQUEST_BYTES, decode_request, encode_error, encode_result

# Larger messages make libzmq drop the connection before anything reads them; up to this size a
# too-large request still gets an error reply from decode_request.
_MAX_MESSAGE_BYTES = 16 * MAX_REQUEST_BYTES
# Requests waiting for a worker beyond this are refused at once rather than queued without bound.
_MAX_QUEUED = 1024
_WORKER_DONE = b"done"
_instances = itertools.count()


class FrontendError(CerError):
    """The endpoint cannot be served (bad URL, address in use, path too long)."""


# Told of every answered request: its method (``service.name``, None when it named no known method), the
# seconds taken and the error code of an error reply (see cer.metrics.Metrics.request_answered).
Observer = Callable[[str | None, float, str | None], None]


class Frontend:
    def __init__(
        self,
        endpoint: str,
        gateway: Gateway,
        workers: int = 8,
        debug: bool = False,
        curve_keys: str | None = None,
        observe: Observer | None = None,
        insecure_tcp: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self._insecure_tcp = insecure_tcp
        self._observe = observe
        self._curve_keys = curve_keys
        self._curve: CurveServer | None = None
        self._gateway = gateway
        self._workers = workers
        self._debug = debug
        instance = next(_instances)
        self._replies_address = f"inproc://cer-replies-{instance}"
        self._control_address = f"inproc://cer-control-{instance}"
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._context: zmq.Context | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Bind the endpoint and start serving; raises FrontendError when the endpoint cannot be served."""
        try:
            check_endpoint(self.endpoint, self._curve_keys, self._insecure_tcp)
        except EndpointRefused as error:
            raise FrontendError(f"cannot serve {self.endpoint}: {error}") from None
        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        try:
            if self._curve_keys is not None:
                self._curve = CurveServer(self._context, self._curve_keys)
                self._curve.start()
                self._curve.secure(router)
            if self.endpoint.startswith("ipc://"):
                bind_ipc(router, self.endpoint[len("ipc://"):])
            else:
                router.bind(self.endpoint)
        except (zmq.ZMQError, EndpointRefused, OSError) as error:
            router.close()
            if self._curve is not None:
                self._curve.stop()
            self._context.term()
            self._context = None
            raise FrontendError(f"cannot serve {self.endpoint}: {error}") from None
        replies = self._context.socket(zmq.PULL)
        replies.bind(self._replies_address)
        control = self._context.socket(zmq.PAIR)
        control.bind(self._control_address)
        # The sockets move to the router thread here; starting a thread is the memory barrier ZeroMQ asks for.
        self._threads.append(
            threading.Thread(target=self._route, args=(router, replies, control), name="cer-frontend", daemon=True)
        )
        for index in range(self._workers):
            push = self._context.socket(zmq.PUSH)
            push.connect(self._replies_address)
            self._threads.append(
                threading.Thread(target=self._work, args=(push,), name=f"cer-worker-{index}", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        logger.info("serving {} with {} workers", self.endpoint, self._workers)
        if self.endpoint.startswith("tcp://") and self._curve_keys is None:
            logger.warning("{} has no authentication ({}): EVERY LOCAL USER can get, put and resize namespaces, "
                           "start lazy restores and read the status", self.endpoint, INSECURE_TCP_FLAG)

    def stop(self) -> None:
        """Stop taking requests; the ones already taken are answered first."""
        if self._context is None:
            return
        terminate = self._context.socket(zmq.PAIR)
        terminate.connect(self._control_address)
        terminate.send(b"TERMINATE")
        terminate.close()
        for thread in self._threads:
            thread.join(60)
        if self._curve is not None:
            self._curve.stop()
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            # Their sockets are still open, so term() would wait for ever; the process exit closes them.
            logger.error("frontend threads did not stop: {}", ", ".join(stuck))
        else:
            self._context.term()
        self._context = None
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass
        logger.info("stopped serving {}", self.endpoint)

    def _route(self, router: zmq.Socket, replies: zmq.Socket, control: zmq.Socket) -> None:
        poller = zmq.Poller()
        for socket in (router, replies, control):
            poller.register(socket, zmq.POLLIN)
        working = self._workers
        try:
            while working:
                events = dict(poller.poll())
                if control in events:
                    control.recv()
                    # Stop reading requests; workers finish what is queued, then report done.
                    poller.unregister(router)
                    poller.unregister(control)
                    for _ in range(self._workers):
                        self._tasks.put(None)
                if router in events:
                    self._take_requests(router)
                if replies in events:
                    working -= self._send_replies(router, replies)
        finally:
            for socket in (router, replies, control):
                socket.close()

    def _take_requests(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                # [peer identity, (REQ envelope...), b"", body...]: a peer without the empty delimiter
                # is not speaking REQ and could not read a reply anyway.
                delimiter = frames.index(b"", 1)
            except ValueError:
                logger.debug("dropping a message without a REQ envelope")
                continue
            envelope, body = frames[: delimiter + 1], frames[delimiter + 1 :]
            if self._tasks.qsize() >= _MAX_QUEUED:
                router.send_multipart([*envelope, encode_error(Unavailable("the daemon is too busy; try again"))])
            else:
                self._tasks.put((envelope, body))

    @staticmethod
    def _send_replies(router: zmq.Socket, replies: zmq.Socket) -> int:
        done = 0
        while True:
            try:
                frames = replies.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return done
            if frames == [_WORKER_DONE]:
                done += 1
            else:
                router.send_multipart(frames)

    def _work(self, push: zmq.Socket) -> None:
        try:
            while (task := self._tasks.get()) is not None:
                envelope, body = task
                push.send_multipart([*envelope, self._answer(body)])
            push.send(_WORKER_DONE)
        finally:
            push.close()

    def _answer(self, frames: list[bytes]) -> bytes:
        started = time.perf_counter()
        method_name = error_code = None
        try:
            service, name, raw_params = decode_request(frames)
            method_class = find_method(service, name)
            method_name = f"{method_class.service}.{method_class.name}"  # never an unknown name a client sent
            method = method_class.parse(raw_params)
            if self._debug:
                logger.debug("request {}.{} {}", service, name, raw_params)
            reply = encode_result(method.handle(self._gateway))
        except CerError as error:
            error_code = error.code
            reply = encode_error(error)
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever broke
            logger.exception("request failed")
            error_code = InternalError.code
            reply = encode_error(InternalError(f"{type(error).__name__}: {error}"))
        if self._debug:
            logger.debug("reply {}", reply.decode(errors="replace"))
        if self._observe is not None:
            try:
                self._observe(method_name, time.perf_counter() - started, error_code)
            except Exception:  # noqa: BLE001 - metrics never cost a reply
                logger.exception("observing a request failed")
        return reply
