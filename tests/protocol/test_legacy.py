"""The original CER-Manager protocol on ROOT/daemon.socket, driven by a client written from its description:
a 2-byte big-endian service type (10 namespace, 11 checkpoint), a 4-byte big-endian length and the JSON
method name, a 4-byte big-endian length and the JSON request; each reply a 4-byte length and JSON."""

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import pytest
from conftest import SAMPLE as SAMPLE_DIR
from conftest import sample_config, short_tempdir, start_daemon, wait_for

import mounts_support

from cer.actors.pool import Lease
from cer.errors import FrontendError, NotFound
from cer.pooled_namespaces import Namespace
from cer.protocol.legacy import MAX_CONNECTIONS, MAX_METHOD_BYTES, LegacyFrontend
from cer.protocol.methods import AdminStatus
from cer.protocol.wire import MAX_REQUEST_BYTES

NAMESPACE, CHECKPOINT = 10, 11
TIMEOUT = 2.0  # the daemon's --legacy-timeout in these tests
SAMPLE = {"name": "sample", "labels": {"namespace": "default"}}


def frame(payload) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return struct.pack(">I", len(body)) + body


def request(service: int, method, body) -> bytes:
    return struct.pack(">H", service) + frame(method) + frame(body)


class LegacyClient:
    """A client of the original protocol, as the Go client and the containerd patches speak it."""

    def __init__(self, path, timeout: float = 30.0) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(timeout)
        self.socket.connect(str(path))

    def __enter__(self) -> "LegacyClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.socket.close()

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def call(self, service: int, method, body) -> dict:
        self.send(request(service, method, body))
        return self.reply()

    def reply(self) -> dict:
        (length,) = struct.unpack(">I", self._exactly(4))
        return json.loads(self._exactly(length))

    def closed_by_daemon(self) -> bool:
        """True when the daemon hung up (end of file or reset) before the client's timeout."""
        try:
            return self.socket.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            assert chunk, "the daemon closed the connection instead of replying"
            data += chunk
        return data


@pytest.fixture(scope="module")
def legacy():
    running = start_daemon(sample_config(), "--legacy-socket", "--legacy-timeout", str(TIMEOUT))
    running.socket_path = running.root / "daemon.socket"
    yield running
    code = running.stop()
    assert code == 0, running.output()


def connect(daemon, timeout: float = 30.0) -> LegacyClient:
    return LegacyClient(daemon.socket_path, timeout)


def still_serving(daemon) -> None:
    with connect(daemon) as client:
        assert client.call(CHECKPOINT, "Get", {"ref": SAMPLE})["path"]
        assert client.call(CHECKPOINT, "Put", {"ref": SAMPLE}) == {}


def nsenter(option: str, path: str, *command: str) -> str:
    return subprocess.run(["nsenter", f"{option}={path}", *command], check=True, capture_output=True, text=True, timeout=10).stdout


# --- the methods, on one connection ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_namespace_get_and_put_of_every_type_on_one_connection(legacy):
    pid = legacy.process.pid
    with connect(legacy) as client:
        uts = client.call(NAMESPACE, "Get", {"namespace_type": "uts", "ref": SAMPLE})
        ipc = client.call(NAMESPACE, "Get", {"namespace_type": "ipc", "ref": SAMPLE})
        mnt = client.call(NAMESPACE, "Get", {"namespace_type": "mnt", "ref": SAMPLE})
        # The original's reply: pid and namespace_fd; info only for mnt, where it is the bundle directory.
        assert set(uts) == {"pid", "namespace_fd"} and uts["pid"] == pid
        assert set(ipc) == {"pid", "namespace_fd"}
        assert set(mnt) == {"pid", "namespace_fd", "info"}
        paths = {name: f"/proc/{pid}/fd/{reply['namespace_fd']}" for name, reply in (("uts", uts), ("ipc", ipc), ("mnt", mnt))}
        assert nsenter("--uts", paths["uts"], "hostname").strip() == "cer-sample"
        assert os.readlink(paths["ipc"]) != os.readlink("/proc/self/ns/ipc")
        assert "2097152" in nsenter("--ipc", paths["ipc"], "ipcs", "-m")  # the sample's 2 MiB segment
        bundle = mnt["info"]
        assert bundle.startswith(str(legacy.root / "bundles")) and os.path.isdir(bundle)
        # The namespace's root is the container's root filesystem (the original had it at bundle/rootfs).
        motd = mounts_support.read_file(paths["mnt"], "/etc/motd").decode()
        assert motd == (SAMPLE_DIR / "rootfs" / "etc" / "motd").read_text()
        assert not os.listdir(f"{bundle}/rootfs")  # the host sees the bare mount point
        # Put takes namespace_fd as namespace_id, as the original's clients send it.
        for namespace_type, reply in (("uts", uts), ("ipc", ipc), ("mnt", mnt)):
            assert client.call(NAMESPACE, "Put", {"namespace_type": namespace_type, "namespace_id": reply["namespace_fd"]}) == {}
        again = client.call(NAMESPACE, "Put", {"namespace_type": "uts", "namespace_id": uts["namespace_fd"]})
        assert again["error"].startswith("not_found:")
        wait_for(lambda: not os.path.exists(bundle), 10, 0.05, "the put mnt namespace's bundle to go")


@pytest.mark.timeout(60)
def test_get_with_extra_refs_serves_the_checkpoint_holding_ipc_objects(legacy):
    with connect(legacy) as client:
        reply = client.call(NAMESPACE, "Get", {
            "namespace_type": "ipc",
            "ref": {"name": "sample-empty-ipc", "labels": {"namespace": "default"}},
            "extra_refs": [SAMPLE],
        })
        path = f"/proc/{reply['pid']}/fd/{reply['namespace_fd']}"
        assert "2097152" in nsenter("--ipc", path, "ipcs", "-m")
        assert client.call(NAMESPACE, "Put", {"namespace_type": "ipc", "namespace_id": reply["namespace_fd"]}) == {}


@pytest.mark.timeout(60)
def test_refs_as_bare_names_and_null_labels_or_extra_refs_are_accepted(legacy):
    # Older clients sent a checkpoint as its name; Go sends nil maps and slices as null.
    with connect(legacy) as client:
        reply = client.call(NAMESPACE, "Get", {"namespace_type": "uts", "ref": {"name": "sample", "labels": None}, "extra_refs": None})
        assert reply["namespace_fd"] >= 0
        assert client.call(NAMESPACE, "Put", {"namespace_type": "uts", "namespace_id": reply["namespace_fd"]}) == {}
        assert client.call(CHECKPOINT, "Get", {"ref": "sample"})["path"]
        assert client.call(CHECKPOINT, "Put", {"ref": "sample"}) == {}


@pytest.mark.timeout(60)
def test_update_resizes_the_pool(legacy):
    with connect(legacy) as client:
        assert client.call(NAMESPACE, "Update", {"ref": {"name": "sample-empty-ipc"}, "capacity": 3}) == {}
        assert legacy.pool("sample-empty-ipc")["capacity"] == 3
        assert client.call(NAMESPACE, "Update", {"ref": {"name": "sample-empty-ipc"}, "capacity": 2}) == {}
        assert legacy.pool("sample-empty-ipc")["capacity"] == 2
        refused = client.call(NAMESPACE, "Update", {"ref": {"name": "sample-empty-ipc"}, "capacity": -1})
        assert set(refused) == {"error"} and refused["error"].startswith("bad_request:")
        assert legacy.pool("sample-empty-ipc")["capacity"] == 2


@pytest.mark.timeout(60)
def test_checkpoint_get_and_put(legacy):
    with connect(legacy) as client:
        got = client.call(CHECKPOINT, "Get", {"ref": SAMPLE})
        assert set(got) == {"path"} and os.path.isfile(os.path.join(got["path"], "inventory.img"))
        assert client.call(CHECKPOINT, "Put", {"ref": SAMPLE}) == {}
        assert client.call(CHECKPOINT, "Put", {"ref": SAMPLE})["error"].startswith("not_found:")
        missing = client.call(CHECKPOINT, "Get", {"ref": {"name": "nope"}})
        # The original answered a failed get with an empty path; the message comes along for people.
        assert missing["path"] == "" and missing["error"].startswith("not_found:")


@pytest.mark.timeout(60)
def test_many_requests_on_one_connection_and_several_connections_at_once(legacy):
    def session(results: list) -> None:
        with connect(legacy) as client:
            for _ in range(10):
                reply = client.call(NAMESPACE, "Get", {"namespace_type": "uts", "ref": SAMPLE})
                results.append(reply["namespace_fd"])
                assert client.call(NAMESPACE, "Put", {"namespace_type": "uts", "namespace_id": reply["namespace_fd"]}) == {}

    results: list = []
    threads = [threading.Thread(target=session, args=(results,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert len(results) == 40 and all(fd >= 0 for fd in results)


# --- malformed input that leaves the stream in step: an error reply, and the connection goes on --------------

NOT_JSON = b"\xff{not json"
GET_ERROR = {"pid", "namespace_fd", "info"}
ANY_ERROR = {"error", "pid", "namespace_fd", "info", "path"}

MALFORMED = {
    # name: (request bytes, expected reply fields, expected code)
    "service type 12": (request(12, "Get", {}), ANY_ERROR, "bad_request"),
    "service type 0": (request(0, "Get", {}), ANY_ERROR, "bad_request"),
    "method not JSON": (request(NAMESPACE, NOT_JSON, {}), ANY_ERROR, "bad_request"),
    "method empty": (request(NAMESPACE, b"", {}), ANY_ERROR, "bad_request"),
    "method a number": (request(NAMESPACE, 42, {}), ANY_ERROR, "unknown_method"),
    "method an object": (request(NAMESPACE, {"Get": 1}, {}), ANY_ERROR, "unknown_method"),
    "method unknown": (request(NAMESPACE, "Steal", {}), ANY_ERROR, "unknown_method"),
    "method in lower case": (request(NAMESPACE, "get", {}), ANY_ERROR, "unknown_method"),
    "Update on checkpoints": (request(CHECKPOINT, "Update", {"ref": SAMPLE, "capacity": 1}), ANY_ERROR, "unknown_method"),
    "request not JSON": (request(NAMESPACE, "Get", NOT_JSON), GET_ERROR, "bad_request"),
    "request empty": (request(NAMESPACE, "Put", b""), {"error"}, "bad_request"),
    "request a list": (request(NAMESPACE, "Get", [1, 2]), GET_ERROR, "bad_request"),
    "request a string": (request(CHECKPOINT, "Get", "sample"), {"path", "error"}, "bad_request"),
    "unknown field": (request(NAMESPACE, "Get", {"namespace_type": "uts", "ref": SAMPLE, "holder_pid": 1}), GET_ERROR, "bad_request"),
    "namespace_type net": (request(NAMESPACE, "Get", {"namespace_type": "net", "ref": SAMPLE}), GET_ERROR, "bad_request"),
    "no ref": (request(NAMESPACE, "Get", {"namespace_type": "uts"}), GET_ERROR, "bad_request"),
    "ref a number": (request(NAMESPACE, "Get", {"namespace_type": "uts", "ref": 7}), GET_ERROR, "bad_request"),
    "ref name with NUL": (request(NAMESPACE, "Get", {"namespace_type": "uts", "ref": {"name": "a\u0000b"}}), GET_ERROR, "bad_request"),
    "ref namespace ../..": (request(NAMESPACE, "Get", {"namespace_type": "uts", "ref": {"name": "a", "labels": {"namespace": "../.."}}}), GET_ERROR, "bad_request"),
    "unknown ref": (request(NAMESPACE, "Get", {"namespace_type": "uts", "ref": {"name": "nope"}}), GET_ERROR, "not_found"),
    "extra_refs an object": (request(NAMESPACE, "Get", {"namespace_type": "ipc", "ref": SAMPLE, "extra_refs": {}}), GET_ERROR, "bad_request"),
    "id a string": (request(NAMESPACE, "Put", {"namespace_type": "uts", "namespace_id": "7"}), {"error"}, "bad_request"),
    "id huge": (request(NAMESPACE, "Put", b'{"namespace_type":"uts","namespace_id":99999999999999999999999}'), {"error"}, "bad_request"),
    "id not handed out": (request(NAMESPACE, "Put", {"namespace_type": "uts", "namespace_id": 3}), {"error"}, "not_found"),
    "capacity a bool": (request(NAMESPACE, "Update", {"ref": SAMPLE, "capacity": True}), {"error"}, "bad_request"),
    "capacity huge": (request(NAMESPACE, "Update", {"ref": SAMPLE, "capacity": 10**9}), {"error"}, "bad_request"),
    "deep nesting": (request(CHECKPOINT, "Get", b'{"ref":' + b"[" * 5000 + b"]" * 5000 + b"}"), {"path", "error"}, "bad_request"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_requests_get_an_error_in_the_original_shape_and_the_connection_goes_on(legacy, name):
    data, fields, code = MALFORMED[name]
    with connect(legacy) as client:
        client.send(data)
        reply = client.reply()
        assert set(reply) == fields, reply
        message = reply.get("error", reply.get("info"))
        assert message.startswith(f"{code}:"), reply
        if "namespace_fd" in reply:
            assert reply["namespace_fd"] == -1
        if "path" in reply:
            assert reply["path"] == ""
        # Same connection, next request: still in step.
        assert client.call(CHECKPOINT, "Get", {"ref": SAMPLE})["path"]
        assert client.call(CHECKPOINT, "Put", {"ref": SAMPLE}) == {}


# --- input that breaks the framing: the daemon hangs up, and serves everyone else --------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["method", "request"])
def test_a_length_over_the_cap_is_answered_then_the_connection_is_closed(legacy, where):
    if where == "method":
        data = struct.pack(">H", NAMESPACE) + struct.pack(">I", MAX_METHOD_BYTES + 1)
    else:
        data = struct.pack(">H", NAMESPACE) + frame("Get") + struct.pack(">I", MAX_REQUEST_BYTES + 1)
    with connect(legacy, timeout=10) as client:
        client.send(data + b"x" * 1000)
        reply = client.reply()
        assert reply["error"].startswith("bad_request:") and reply["namespace_fd"] == -1
        assert client.closed_by_daemon()
    still_serving(legacy)


@pytest.mark.timeout(60)
def test_a_length_of_four_gigabytes_is_refused_without_reading_it(legacy):
    with connect(legacy, timeout=10) as client:
        client.send(struct.pack(">H", CHECKPOINT) + b"\xff\xff\xff\xff")
        assert "bad_request" in client.reply()["error"]
        assert client.closed_by_daemon()
    still_serving(legacy)


TRUNCATED = {
    "half a service type": b"\x00",
    "service type only": struct.pack(">H", NAMESPACE),
    "half a length": struct.pack(">H", NAMESPACE) + b"\x00\x00",
    "method cut short": struct.pack(">H", NAMESPACE) + struct.pack(">I", 5) + b'"Ge',
    "no request": struct.pack(">H", NAMESPACE) + frame("Get"),
    "request cut short": struct.pack(">H", NAMESPACE) + frame("Get") + struct.pack(">I", 100) + b'{"namespace_type"',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", TRUNCATED)
def test_a_truncated_request_closes_the_connection_without_a_reply(legacy, name):
    with connect(legacy, timeout=10) as client:
        client.send(TRUNCATED[name])
        client.socket.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert client.socket.recv(4) == b""  # no reply, just the hang-up
        assert time.monotonic() - started < TIMEOUT
    still_serving(legacy)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["idle", "half a request"])
def test_a_silent_client_is_closed_after_the_timeout(legacy, name):
    with connect(legacy, timeout=10) as client:
        if name == "half a request":
            client.send(TRUNCATED["method cut short"])
        started = time.monotonic()
        assert client.closed_by_daemon()
        assert TIMEOUT - 0.5 < time.monotonic() - started < TIMEOUT + 3
    still_serving(legacy)


@pytest.mark.timeout(60)
def test_a_trickling_client_cannot_stretch_a_request_past_the_timeout(legacy):
    data = request(CHECKPOINT, "Get", {"ref": SAMPLE})
    with connect(legacy, timeout=10) as client:
        started = time.monotonic()
        for byte in data:
            try:
                client.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.3)  # each byte well within the timeout; the whole request not
        assert client.closed_by_daemon()
        assert time.monotonic() - started < TIMEOUT + 3
    still_serving(legacy)


@pytest.mark.timeout(60)
def test_connections_beyond_the_bound_are_closed_at_once(legacy):
    held = [connect(legacy, timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        # The daemon took them all (each answers), so the next one is over the bound.
        for client in held[:3]:
            assert client.call(CHECKPOINT, "Put", {"ref": SAMPLE})["error"].startswith("not_found:")
        with connect(legacy, timeout=5) as extra:
            assert extra.closed_by_daemon()
    finally:
        for client in held:
            client.socket.close()
    wait_for(lambda: _answers(legacy), 10, 0.1, "the daemon to take connections again")


def _answers(daemon) -> bool:
    try:
        still_serving(daemon)
        return True
    except (AssertionError, OSError):
        return False


@pytest.mark.timeout(90)
def test_hostile_connections_leak_neither_fds_nor_threads(legacy):
    legacy.wait_full("sample")
    pid = legacy.process.pid

    def counts() -> tuple[int, int]:
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))

    fds, threads = counts()
    clients = []
    for _ in range(3):
        for data, _, _ in MALFORMED.values():
            with connect(legacy) as client:
                client.send(data)
                client.reply()
        for data in TRUNCATED.values():
            with connect(legacy) as client:
                client.send(data)
        clients += [connect(legacy, timeout=10) for _ in range(10)]  # left silent: closed by the timeout
        with connect(legacy) as client:
            client.send(struct.pack(">H", NAMESPACE) + b"\xff\xff\xff\xff")
            client.reply()
    for client in clients:
        assert client.closed_by_daemon()
        client.socket.close()

    def back_to_baseline():
        now = counts()
        return now if now[0] <= fds and now[1] <= threads else None

    wait_for(back_to_baseline, TIMEOUT + 10, 0.1, f"fds and threads back to {fds} and {threads} (now {counts()})")


# --- the socket itself -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_socket_is_off_by_default(daemon):
    assert not (daemon.root / "daemon.socket").exists()


@pytest.mark.timeout(90)
def test_the_socket_is_root_only_and_removed_at_stop_even_with_clients_connected():
    running = start_daemon(sample_config(), "--legacy-socket")
    path = running.root / "daemon.socket"
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(running.root).st_mode) == 0o700
        idle = LegacyClient(path)
        midway = LegacyClient(path)
        midway.send(TRUNCATED["method cut short"])
        assert idle.call(CHECKPOINT, "Get", {"ref": SAMPLE})["path"]
        started = time.monotonic()
        assert running.stop() == 0, running.output()
        assert time.monotonic() - started < 20
        assert not path.exists()
        assert idle.closed_by_daemon() and midway.closed_by_daemon()
    finally:
        running.stop()


@pytest.mark.timeout(90)
def test_a_stale_socket_from_a_killed_daemon_is_replaced():
    first = start_daemon(sample_config(), "--legacy-socket")
    first.stop(signal.SIGKILL)
    assert (first.root / "daemon.socket").exists()
    second = start_daemon(sample_config(), "--legacy-socket", root=first.root)
    try:
        second.socket_path = second.root / "daemon.socket"
        still_serving(second)
    finally:
        assert second.stop() == 0, second.output()


# --- the frontend alone -------------------------------------------------------------------------------


class _BrokenGateway:
    pid = 4242

    def get_namespace(self, ns_type, ref, holder_pid=None) -> Lease:
        raise RuntimeError("boom")

    def put_namespace(self, ns_type, namespace_id) -> None:
        raise NotFound(f"{ns_type} namespace {namespace_id} is not handed out by this daemon")

    def get_checkpoint(self, ref) -> str:
        return "/images"


@pytest.fixture
def alone():
    path = short_tempdir() / "daemon.socket"
    frontend = LegacyFrontend(str(path), _BrokenGateway(), timeout=TIMEOUT)
    frontend.start()
    yield path
    frontend.stop()
    assert not path.exists()


@pytest.mark.timeout(30)
def test_an_unexpected_failure_is_an_internal_error_reply(alone):
    with LegacyClient(alone) as client:
        reply = client.call(NAMESPACE, "Get", {"namespace_type": "uts", "ref": SAMPLE})
        assert reply == {"pid": 0, "namespace_fd": -1, "info": "internal: RuntimeError: boom"}
        assert client.call(NAMESPACE, "Put", {"namespace_type": "uts", "namespace_id": 1})["error"].startswith("not_found:")
        assert client.call(CHECKPOINT, "Get", {"ref": SAMPLE}) == {"path": "/images"}


@pytest.mark.timeout(30)
def test_a_path_that_is_not_a_socket_is_never_removed():
    path = short_tempdir() / "daemon.socket"
    path.write_text("keep me")
    with pytest.raises(FrontendError, match="not a socket"):
        LegacyFrontend(str(path), _BrokenGateway()).start()
    assert path.read_text() == "keep me"


@pytest.mark.timeout(30)
def test_the_mnt_info_is_the_bundle_as_the_original_had_it():
    class Gateway(_BrokenGateway):
        def get_namespace(self, ns_type, ref, holder_pid=None) -> Lease:
            return Lease(Namespace(ns_type, 1500, self.pid, "/root/bundles/1"), cold=False, ipc_default=True)

    path = short_tempdir() / "daemon.socket"
    frontend = LegacyFrontend(str(path), Gateway())
    frontend.start()
    try:
        with LegacyClient(path) as client:
            reply = client.call(NAMESPACE, "Get", {"namespace_type": "mnt", "ref": SAMPLE})
            assert reply == {"pid": 4242, "namespace_fd": 1500, "info": "/root/bundles/1"}
    finally:
        frontend.stop()


def test_admin_status_has_no_legacy_method():
    # The original had no status method: it stays on the ZeroMQ socket only.
    from cer.protocol import legacy

    assert all(route.method is not AdminStatus for route in legacy._ROUTES.values())
