"""The frontend alone, in front of a stand-in gateway: every input gets an answer, nothing wedges."""

import os
import threading
import time

import orjson
import pytest
import zmq
from conftest import short_tempdir, wait_for
from dummy_gateway import DummyGateway

from cer.errors import FrontendError, NotFound
from cer.protocol.client import Client
from cer.protocol.frontend import Frontend
from cer.protocol.methods import AdminStatus, NamespaceGet, NamespacePut
from cer.protocol.wire import MAX_REQUEST_BYTES
from cer.references import CheckpointRef


@pytest.fixture
def served():
    gateway = DummyGateway()
    endpoint = f"ipc://{short_tempdir()}/test.sock"
    frontend = Frontend(endpoint, gateway, workers=4)
    frontend.start()
    yield frontend, gateway
    gateway.release_slow.set()
    frontend.stop()


def raw_request(endpoint: str, *frames: bytes, timeout_ms: int = 5000) -> dict:
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send_multipart(list(frames))
        assert socket.poll(timeout_ms), "no reply"
        return orjson.loads(socket.recv())
    finally:
        socket.close()


def request(service="admin", method="status", params=None, v=1) -> bytes:
    return orjson.dumps({"v": v, "service": service, "method": method, "params": params or {}})


def still_serving(endpoint: str) -> None:
    assert raw_request(endpoint, request())["ok"] is True


GARBAGE = {
    "not json": b"\xff\xfe not json",
    "empty": b"",
    "a list": b"[1, 2, 3]",
    "a string": b'"namespace.get"',
    "no version": orjson.dumps({"service": "admin", "method": "status"}),
    "version 2": request(v=2),
    "version true": request(v=True),
    "unknown service": request("nope", "get"),
    "unknown method": request("namespace", "steal"),
    "params a list": orjson.dumps({"v": 1, "service": "admin", "method": "status", "params": []}),
    "unknown top field": orjson.dumps({"v": 1, "service": "admin", "method": "status", "x": 1}),
    "wrong namespace_type": request("namespace", "get", {"namespace_type": "net", "ref": {"name": "a"}}),
    "ref not an object": request("namespace", "get", {"namespace_type": "uts", "ref": "a"}),
    "ref name with NUL": request("namespace", "get", {"namespace_type": "uts", "ref": {"name": "a\u0000b"}}),
    "ref name too long": request("namespace", "get", {"namespace_type": "uts", "ref": {"name": "a" * 5000}}),
    "namespace with slash": request("namespace", "get", {"namespace_type": "uts", "ref": {"name": "a", "labels": {"namespace": "../.."}}}),
    "id a string": request("namespace", "put", {"namespace_type": "uts", "namespace_id": "7"}),
    "id negative": request("namespace", "put", {"namespace_type": "uts", "namespace_id": -1}),
    "id huge": b'{"v":1,"service":"namespace","method":"put","params":{"namespace_type":"uts","namespace_id":99999999999999999999999}}',
    "id a float": request("namespace", "put", {"namespace_type": "uts", "namespace_id": 1.5}),
    "capacity bool": request("namespace", "update", {"ref": {"name": "a"}, "capacity": True}),
    "capacity huge": request("namespace", "update", {"ref": {"name": "a"}, "capacity": 10**9}),
    "deep nesting": b'{"v":1,"service":"admin","method":"status","params":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}",
    "too large": b'{"v":1,"pad":"' + b"x" * (MAX_REQUEST_BYTES + 1) + b'"}',
    "extra_refs not a list": request("namespace", "get", {"namespace_type": "ipc", "ref": {"name": "a"}, "extra_refs": {}}),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_malformed_requests_get_an_error_reply_and_serving_goes_on(served, name):
    frontend, gateway = served
    reply = raw_request(frontend.endpoint, GARBAGE[name])
    assert reply["ok"] is False
    assert reply["error"]["code"] in ("bad_request", "unknown_method")
    assert reply["error"]["message"]
    assert not [call for call in gateway.calls if call[0] in ("get", "put", "update")]
    still_serving(frontend.endpoint)


def test_several_frames_are_refused(served):
    frontend, _ = served
    reply = raw_request(frontend.endpoint, request(), request())
    assert reply["error"]["code"] == "bad_request"
    assert "one message frame" in reply["error"]["message"]
    still_serving(frontend.endpoint)


def test_a_message_past_the_socket_limit_drops_that_peer_only(served):
    frontend, _ = served
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(frontend.endpoint)
    socket.send(b"x" * (64 * MAX_REQUEST_BYTES))
    assert not socket.poll(300)
    socket.close()
    still_serving(frontend.endpoint)


def test_a_dealer_without_envelope_does_not_wedge_the_workers(served):
    frontend, _ = served
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(frontend.endpoint)
    for _ in range(20):
        socket.send(request())  # no empty delimiter frame: REP discards it
    time.sleep(0.1)
    socket.close()
    for _ in range(10):
        still_serving(frontend.endpoint)


def test_a_slow_request_does_not_hold_up_the_others(served):
    frontend, gateway = served
    slow_reply = {}

    def slow_get():
        with Client(frontend.endpoint, timeout=30) as client:
            slow_reply.update(client.call(NamespaceGet("mnt", CheckpointRef("slow"))))

    thread = threading.Thread(target=slow_get)
    thread.start()
    assert gateway.slow_started.wait(5)
    with Client(frontend.endpoint, timeout=5) as client:
        for _ in range(20):
            assert client.call(NamespaceGet("uts", CheckpointRef("fast")))["namespace_id"] == 1500
            assert client.call(AdminStatus())["pid"] == gateway.pid
    assert thread.is_alive()  # the slow one is still waiting
    gateway.release_slow.set()
    thread.join(10)
    assert slow_reply["info"]["cold"] is True


def test_a_warm_get_is_answered_while_every_worker_is_busy(served):
    frontend, gateway = served
    threads = [threading.Thread(target=lambda: Client(frontend.endpoint, timeout=30).call(NamespaceGet("mnt", CheckpointRef("slow"))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(call[0] == "get" for call in gateway.calls) == 4, 5, what="every worker to be held")
    with Client(frontend.endpoint, timeout=5) as client:
        for _ in range(3):  # the same bytes each time: parsed once, answered each time
            reply = client.call(NamespaceGet("uts", CheckpointRef("warm")))
            assert (reply["namespace_id"], reply["info"]["cold"]) == (1500, False)
    assert [call[0] for call in gateway.calls].count("take") == 3
    gateway.release_slow.set()
    for thread in threads:
        thread.join(10)


def test_what_was_taken_is_reported_before_a_worker_gets_a_request(served):
    frontend, gateway = served
    with Client(frontend.endpoint, timeout=5) as client:
        reply = client.call(NamespaceGet("ipc", CheckpointRef("warm")))
        client.call(NamespacePut("ipc", reply["namespace_id"]))  # not warm: a worker puts it
    calls = [call[0] for call in gateway.calls]
    assert calls == ["take", "report", "put"], gateway.calls
    # With nothing else to do, a take is reported within moments.
    with Client(frontend.endpoint, timeout=5) as client:
        client.call(NamespaceGet("uts", CheckpointRef("warm")))
    wait_for(lambda: gateway.calls[-1][0] == "report", 2, what="the report")


def test_errors_raised_by_the_gateway_keep_their_code(served):
    frontend, _ = served
    with Client(frontend.endpoint, timeout=5) as client:
        with pytest.raises(NotFound):
            client.call(NamespacePut("uts", 7))
        assert client.call(NamespacePut("uts", 1500)) == {}


def test_an_unexpected_failure_is_an_internal_error_reply(served):
    frontend, gateway = served
    gateway.status = lambda: 1 / 0
    reply = raw_request(frontend.endpoint, request())
    assert reply["error"]["code"] == "internal"
    assert "ZeroDivisionError" in reply["error"]["message"]


def test_stop_removes_the_socket_file(served):
    frontend, _ = served
    path = frontend.endpoint[len("ipc://"):]
    assert os.path.exists(path)
    frontend.stop()
    assert not os.path.exists(path)


def test_an_endpoint_that_cannot_be_bound_is_a_clear_error():
    frontend = Frontend("ipc:///nonexistent-dir/x/cer.sock", DummyGateway())
    with pytest.raises(FrontendError, match="cannot serve ipc:///nonexistent-dir"):
        frontend.start()
    with pytest.raises(FrontendError, match="cannot serve"):
        Frontend("bogus://where", DummyGateway()).start()


def test_a_client_without_a_daemon_times_out_clearly():
    from cer.errors import Unavailable

    with Client(f"ipc://{short_tempdir()}/none.sock", timeout=0.3) as client:
        with pytest.raises(Unavailable, match="no answer from the cer daemon"):
            client.call(AdminStatus())
