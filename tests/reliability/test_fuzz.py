"""Random input at the protocol boundary, in process and against a live daemon: always an answer.

Counts of inputs tried are printed (run with -s) and recorded in docs/reliability.md.
"""

import json
import os

import orjson
import pytest
import zmq
from conftest import sample_config, start_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cer.errors import CerError
from cer.protocol.methods import NamespacePut, find_method
from cer.protocol.wire import decode_request

ODD_NAMES = st.sampled_from(["..", "/", ".", "a/../../etc", "\x00", "a\x00b", "x" * 1025, "", " ", "sample", "é", "\u202e"])
JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=40), ODD_NAMES,
)
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=25)
REFS = st.one_of(JSON, st.fixed_dictionaries({"name": ODD_NAMES}, optional={"labels": st.fixed_dictionaries({}, optional={"namespace": ODD_NAMES | JSON})}))
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "namespace_type": st.sampled_from(["ipc", "uts", "mnt", "net", "", "IPC"]) | JSON,
        "namespace_id": st.integers(min_value=-(2**70), max_value=2**70) | JSON,
        "ref": REFS,
        "extra_refs": st.lists(REFS, max_size=5) | JSON,
        "capacity": st.integers(min_value=-5, max_value=2000) | JSON,
        "pid": st.integers() | JSON,
        "holder_pid": st.integers() | JSON,
    },
) | JSON
REQUESTS = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 1, 0, 2, "1", True, None]),
        "service": st.sampled_from(["namespace", "checkpoint", "admin", "", "x"]) | st.text(max_size=10),
        "method": st.sampled_from(["get", "put", "update", "bind", "status", "delete"]) | st.text(max_size=10),
        "params": PARAMS,
    }
).map(lambda document: json.dumps(document).encode())  # json: orjson refuses integers past 64 bits
NESTING = st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth)
RAW = st.one_of(st.binary(max_size=300), REQUESTS, NESTING, REQUESTS.map(lambda raw: raw[: len(raw) // 2]))
FRAMES = st.lists(RAW, min_size=0, max_size=3)

tried = {"decoder": 0, "live": 0}


def parse(frames: list[bytes]):
    service, name, params = decode_request(frames)
    return find_method(service, name).parse(params)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(FRAMES)
def test_the_decoder_answers_every_input_with_a_request_or_a_protocol_error(frames):
    tried["decoder"] += 1
    try:
        parse(frames)
    except CerError as error:
        assert error.code in ("bad_request", "unknown_method")
        assert str(error)


@pytest.fixture(scope="module")
def live_daemon():
    daemon = start_daemon(sample_config())
    daemon.wait_full("sample")
    yield daemon
    assert daemon.stop() == 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("VmRSS:"))


@pytest.mark.timeout(600)
def test_the_live_daemon_answers_every_input_and_keeps_serving(live_daemon):
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(live_daemon.endpoint)
    handed_out = []
    rss_before = rss_kib(live_daemon.process.pid)

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(RAW, min_size=1, max_size=3))
    def one(frames):
        tried["live"] += 1
        socket.send_multipart(frames)
        assert socket.poll(20000), f"no reply to {frames!r:.200}"
        reply = orjson.loads(socket.recv())
        assert isinstance(reply["ok"], bool)
        if reply["ok"] and "namespace_id" in reply["result"]:
            handed_out.append((parse(frames).namespace_type, reply["result"]["namespace_id"]))
        if not reply["ok"]:
            assert reply["error"]["code"] in ("bad_request", "unknown_method", "not_found", "unavailable", "exhausted")

    try:
        one()
    finally:
        socket.close()
    for ns_type, namespace_id in handed_out:
        live_daemon.call(NamespacePut(ns_type, namespace_id))
    assert live_daemon.status()["pools"]  # still serving
    growth = rss_kib(live_daemon.process.pid) - rss_before
    print(f"\ninputs tried: {tried}; daemon RSS growth {growth} KiB; namespaces handed out and put: {len(handed_out)}")
    assert growth < 64 * 1024
    assert os.path.exists(live_daemon.root / "daemon.sock")
