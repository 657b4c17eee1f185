"""The ZeroMQ frontend: turns each request into actor asks, and always answers.

Clients speak plain REQ/REP. One router thread owns the bound ROUTER socket. It reads and checks every
request and answers at once what needs no actor to wait for (a warm ``namespace.get`` takes a namespace
off its pool's shelf: ``Method.handle_now``), so the hot path crosses no thread. Everything else goes to
a pool of worker threads, whose replies it sends back in whatever order they finish ("ROUTER with
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

from cer.protocol.gateway import Gateway
from cer.errors import CerError, EndpointRefused, FrontendError, InternalError, Unavailable
from cer.protocol.methods import Method, find_method
from cer.protocol.security import INSECURE_TCP_FLAG, CurveServer, bind_ipc, check_endpoint
from cer.protocol.wire import MAX_REQUEST_BYTES, decode_request, encode_error, encode_result

# Plain ints: pyzmq's flag enums cost microseconds per operation, and the router thread uses them for every request.
_NOBLOCK, _SNDMORE, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)
# Larger messages make libzmq drop the connection before anything reads them; up to this size a
# too-large request still gets an error reply from decode_request.
_MAX_MESSAGE_BYTES = 16 * MAX_REQUEST_BYTES
# Requests waiting for a worker beyond this are refused at once rather than queued without bound.
_MAX_QUEUED = 1024
# Distinct requests whose parsed method is kept (a restore's gets name a few refs; holder pids vary).
_MAX_PARSED = 4096
# The pools hear what warm gets took after this long without requests (ms), or after this many replies.
_REPORT_IDLE_MS = 1
_REPORT_BATCH = 64
_WORKER_DONE = b"done"
_instances = itertools.count()


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
        self._unreported = 0  # replies answered in the router thread since the last report
        self._parsed: dict[bytes, Method] = {}  # the router thread's own: request bytes -> their method
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
                events = dict(poller.poll(_REPORT_IDLE_MS if self._unreported else None))
                if not events:
                    self._report()  # a quiet moment: now the pools may hear what was taken
                    continue
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
            self._report()  # the pools stop after the frontend: they hear of every take first
            for socket in (router, replies, control):
                socket.close()

    def _take_requests(self, router: zmq.Socket) -> None:
        try:
            while True:
                frames = router.recv_multipart(_NOBLOCK)
                started = time.perf_counter()
                self._take(router, frames, started)
                # Asking for the socket's events is far cheaper than a receive that raises zmq.Again.
                if not router.getsockopt(_EVENTS) & _POLLIN:
                    return
        except zmq.Again:
            return

    def _report(self) -> None:
        """Tell the pools what the replies sent here took off their shelves (Gateway.after_replies).

        Not after every reply: each report wakes a pool, whose thread then competes for the GIL with
        this one. Reports go out when requests pause for a moment, after a batch of replies, and always
        before a request goes to a worker, which could put or bind what was taken.
        """
        self._unreported = 0
        self._gateway.after_replies()

    def _take(self, router: zmq.Socket, frames: list[bytes], started: float) -> None:
        try:
            # [peer identity, (REQ envelope...), b"", body...]: a peer without the empty delimiter
            # is not speaking REQ and could not read a reply anyway.
            delimiter = frames.index(b"", 1)
        except ValueError:
            logger.debug("dropping a message without a REQ envelope")
            return
        envelope, body = frames[: delimiter + 1], frames[delimiter + 1 :]
        method, reply, error_code = self._parse(body)
        if method is not None:
            # Answered here when no actor needs to be waited for (a warm get): no hand-off to a worker.
            reply, error_code = self._run(method.handle_now, method)
        if reply is None:
            if self._tasks.qsize() >= _MAX_QUEUED:
                reply, error_code = encode_error(Unavailable("the daemon is too busy; try again")), Unavailable.code
            else:
                self._report()  # before a worker can put or bind what was just taken
                self._tasks.put((envelope, method, started))
                return
        seconds = time.perf_counter() - started
        for frame in envelope:
            router.send(frame, _SNDMORE)
        router.send(reply)
        self._unreported += 1
        if self._unreported >= _REPORT_BATCH:
            self._report()
        self._observed(method, seconds, error_code, reply)

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
                envelope, method, started = task
                reply, error_code = self._run(method.handle, method)
                seconds = time.perf_counter() - started
                push.send_multipart([*envelope, reply])
                self._observed(method, seconds, error_code, reply)
            push.send(_WORKER_DONE)
        finally:
            push.close()

    def _parse(self, frames: list[bytes]) -> tuple[Method | None, bytes | None, str | None]:
        """The request's method, or the error reply and its code."""
        # A restore asks the same few requests again and again: the same bytes parse to the same frozen
        # method, so a request seen before skips decoding and checking.
        known = self._parsed.get(frames[0]) if len(frames) == 1 else None
        if known is not None:
            if self._debug:
                logger.debug("request {}.{} {}", known.service, known.name, known.params())
            return known, None, None
        try:
            service, name, raw_params = decode_request(frames)
            if self._debug:
                logger.debug("request {}.{} {}", service, name, raw_params)
            method = find_method(service, name).parse(raw_params)
            if len(self._parsed) >= _MAX_PARSED:
                self._parsed.clear()
            self._parsed[frames[0]] = method
            return method, None, None
        except CerError as error:
            return None, encode_error(error), error.code
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever broke
            logger.exception("reading a request failed")
            return None, encode_error(InternalError(f"{type(error).__name__}: {error}")), InternalError.code

    def _run(self, handler: Callable[[Gateway], dict | None], method: Method) -> tuple[bytes | None, str | None]:
        """The reply of ``handler`` (None when it had none) and the error code of an error reply."""
        try:
            result = handler(self._gateway)
            return (None if result is None else encode_result(result)), None
        except CerError as error:
            return encode_error(error), error.code
        except Exception as error:  # noqa: BLE001 - the client gets an answer whatever broke
            logger.exception("request {}.{} failed", method.service, method.name)
            return encode_error(InternalError(f"{type(error).__name__}: {error}")), InternalError.code

    def _observed(self, method: Method | None, seconds: float, error_code: str | None, reply: bytes) -> None:
        # After the reply is sent: nothing but the answer is on the client's clock.
        if self._debug:
            logger.debug("reply {}", reply.decode(errors="replace"))
        if self._observe is None:
            return
        try:
            # The name of a method found in the table, never an unknown name a client sent.
            self._observe(None if method is None else method.full_name, seconds, error_code)
        except Exception:  # noqa: BLE001 - metrics never cost a reply
            logger.exception("observing a request failed")
