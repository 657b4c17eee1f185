"""The HTTP server of a real daemon (`cer start --http-port N`): capacity updates as the original took
them (with root's token), the Prometheus metrics matching what was done, malformed requests, and who may
reach it: an unprivileged uid made by the test (setpriv) plays the other local users."""

import http.client
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import as_unprivileged, sample_config, short_tempdir, start_daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families

from cer.errors import CerError
from cer.protocol.methods import CheckpointGet, NamespaceGet, NamespacePut, method_names
from cer.protocol.wire import MAX_REQUEST_BYTES
from cer.references import CheckpointRef

pytestmark = pytest.mark.timeout(90)

SAMPLE = {"checkpoint": "sample", "checkpoint_namespace": "default"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Http:
    """A daemon's HTTP server, asked through http.client so that tests control every header; updates carry
    ``token`` (root's, from ROOT/http.token) unless told otherwise."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def request(self, verb: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        if self.token is not None and path.startswith("/namespace/"):
            headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        try:
            connection.request(verb, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def update(self, **fields) -> tuple[int, dict]:
        status, _, body = self.request("POST", "/namespace/update", json.dumps(fields).encode())
        return status, orjson.loads(body)

    def metrics(self) -> dict[tuple, float]:
        status, headers, body = self.request("GET", "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def text(self) -> str:
        return self.request("GET", "/metrics")[2].decode()


def metric(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def served():
    port = free_port()
    daemon = start_daemon(sample_config(), "--http-port", str(port))
    yield daemon, Http(port, token_of(daemon))
    code = daemon.stop()
    assert code == 0, daemon.output()


def token_of(daemon) -> str:
    return (daemon.root / "http.token").read_text().strip()


def listening_sockets(pid: int) -> set[str]:
    """Inodes of the TCP sockets process ``pid`` listens on."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[len("socket:["):-1])
    return listening & held


def test_update_over_http_resizes_the_pool(served):
    daemon, web = served
    daemon.wait_full("sample")
    status, reply = web.update(checkpoint_name="sample", checkpoint_namespace="default", capacity=3)
    assert (status, reply) == (200, {"v": 1, "ok": True, "result": {"created": False}})
    assert daemon.pool("sample")["capacity"] == 3
    daemon.wait_full("sample")
    # checkpoint_namespace may be left out, as in the protocol's refs.
    status, reply = web.update(checkpoint_name="sample-empty-ipc", capacity=0)
    assert status == 200 and reply["ok"] is True
    wait_for(lambda: daemon.pool("sample-empty-ipc")["types"]["uts"]["idle"] == 0, 10, what="the pool to drain")
    samples = web.metrics()
    for ns_type in ("ipc", "uts", "mnt"):
        assert metric(samples, "cer_pool_capacity", type=ns_type, **SAMPLE) == 3
        assert metric(samples, "cer_pool_idle", type=ns_type, **SAMPLE) == 3
    empty = {"checkpoint": "sample-empty-ipc", "checkpoint_namespace": "default"}
    assert metric(samples, "cer_pool_capacity", type="uts", **empty) == 0
    assert metric(samples, "cer_pool_idle", type="uts", **empty) == 0
    assert metric(samples, "cer_pool_idle", type="mnt", **empty) is None  # no rootfs: no mnt namespaces
    assert metric(samples, "cer_request_duration_seconds_count", method="namespace.update") == 2


def test_metrics_count_the_gets_and_creations_the_test_made(served):
    daemon, web = served
    ref = CheckpointRef("sample")
    daemon.wait_full("sample")
    before = web.metrics()
    assert metric(before, "cer_pool_idle", type="uts", **SAMPLE) == 2
    assert metric(before, "cer_pool_in_use", type="uts", **SAMPLE) == 0
    # Every creation so far went through the histogram: its counts add up to the factory's.
    wait_for(lambda: daemon.status()["factory"]["running"] == 0, 10, what="creations to finish")
    created = daemon.status()["factory"]["created"]
    counts = web.metrics()
    assert sum(metric(counts, "cer_namespace_creation_seconds_count", type=t) for t in ("ipc", "uts", "mnt")) == created
    assert metric(counts, "cer_namespace_creation_seconds_sum", type="uts") > 0

    replies = [daemon.call(NamespaceGet("uts", ref)) for _ in range(2)]
    assert [reply["info"]["cold"] for reply in replies] == [False, False]
    assert web.update(checkpoint_name="sample", capacity=0)[0] == 200
    wait_for(lambda: daemon.pool("sample")["types"]["uts"]["idle"] == 0, 10, what="the pool to drain")
    replies.append(daemon.call(NamespaceGet("uts", ref)))
    assert replies[-1]["info"]["cold"] is True

    after = web.metrics()
    assert metric(after, "cer_pool_gets_total", type="uts", kind="warm", **SAMPLE) == 2
    assert metric(after, "cer_pool_gets_total", type="uts", kind="cold", **SAMPLE) == 1
    assert metric(after, "cer_pool_gets_total", type="ipc", kind="warm", **SAMPLE) == 0
    assert metric(after, "cer_pool_in_use", type="uts", **SAMPLE) == 3
    assert metric(after, "cer_pool_capacity", type="uts", **SAMPLE) == 0

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("cer_request_duration_seconds_count", method="namespace.get") == 3
    assert delta("cer_request_duration_seconds_sum", method="namespace.get") > 0
    assert delta("cer_request_duration_seconds_bucket", method="namespace.get", le="+Inf") == 3
    assert delta("cer_request_duration_seconds_count", method="namespace.update") == 1
    assert metric(after, "cer_request_errors_total", method="namespace.get", code="not_found") is None
    for reply in replies:
        daemon.call(NamespacePut("uts", reply["namespace_id"], reply["pid"]))
    assert metric(web.metrics(), "cer_pool_in_use", type="uts", **SAMPLE) == 0


def test_unknown_refs_are_counted_as_errors_without_labels_of_their_own(served):
    daemon, web = served
    codes = []
    for method in (
        NamespaceGet("uts", CheckpointRef("no-such-checkpoint")),
        NamespaceGet("ipc", CheckpointRef("sample", "elsewhere-ns")),
        CheckpointGet(CheckpointRef("also-unknown")),
    ):
        with pytest.raises(CerError) as raised:
            daemon.call(method)
        codes.append((f"{method.service}.{method.name}", raised.value.code))
    assert codes[0] == ("namespace.get", "not_found")
    text = web.text()
    for name in ("no-such-checkpoint", "elsewhere-ns", "also-unknown"):
        assert name not in text
    samples = web.metrics()
    assert metric(samples, "cer_request_errors_total", method="namespace.get", code="not_found") == 2
    for method, code in codes[2:]:
        assert metric(samples, "cer_request_errors_total", method=method, code=code) == 1
    checkpoints = {dict(labels).get("checkpoint") for name, labels in samples if name.startswith("cer_pool_")}
    assert checkpoints == {"sample", "sample-empty-ipc"}


def _json(fields: dict) -> bytes:
    return json.dumps(fields).encode()


MALFORMED = {
    "not json": (b"{capacity: 3", "not JSON"),
    "not utf-8": (b"\xff\xfe\x00", "not JSON"),
    "empty": (b"", "not JSON"),
    "a list": (b"[1, 2]", "JSON object"),
    "capacity a string": (_json({"checkpoint_name": "sample", "capacity": "3"}), "capacity"),
    "capacity a bool": (_json({"checkpoint_name": "sample", "capacity": True}), "capacity"),
    "capacity a float": (_json({"checkpoint_name": "sample", "capacity": 2.5}), "capacity"),
    "capacity negative": (_json({"checkpoint_name": "sample", "capacity": -1}), "capacity"),
    "capacity too large": (_json({"checkpoint_name": "sample", "capacity": 10**6}), "capacity"),
    "capacity missing": (_json({"checkpoint_name": "sample"}), "capacity"),
    "name missing": (_json({"capacity": 1}), "name"),
    "name a number": (_json({"checkpoint_name": 7, "capacity": 1}), "name"),
    "name with a newline": (_json({"checkpoint_name": "a\nb", "capacity": 1}), "control characters"),
    "namespace a list": (_json({"checkpoint_name": "sample", "checkpoint_namespace": ["x"], "capacity": 1}), "namespace"),
    "namespace a path": (_json({"checkpoint_name": "sample", "checkpoint_namespace": "../..", "capacity": 1}), "namespace"),
    "unknown field": (_json({"checkpoint_name": "sample", "capacity": 1, "name": "x"}), "unknown fields: name"),
    "too large": (_json({"checkpoint_name": "x" * (MAX_REQUEST_BYTES + 1), "capacity": 1}), "at most"),
}


def test_malformed_bodies_get_400_and_the_daemon_keeps_serving(served):
    daemon, web = served
    before = web.metrics()
    for case, (body, words) in MALFORMED.items():
        status, _, raw = web.request("POST", "/namespace/update", body, {"Content-Type": "application/json"})
        reply = orjson.loads(raw)
        assert status == 400, case
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", case
        assert words in reply["error"]["message"], (case, reply)
    # Bodies that are never read: no length, a length that is not a number, a huge declared length.
    for case, headers in {
        "no length": {},
        "length not a number": {"Content-Length": "12abc"},
        "huge length": {"Content-Length": str(10**12)},
        "chunked": {"Transfer-Encoding": "chunked"},
    }.items():
        connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=15)
        try:
            connection.putrequest("POST", "/namespace/update")
            connection.putheader("Authorization", f"Bearer {web.token}")
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            assert response.status == 400, case
            assert orjson.loads(response.read())["error"]["code"] == "bad_request", case
        finally:
            connection.close()
    after = web.metrics()
    refused = 4 + len(MALFORMED)
    key = ("cer_request_errors_total", (("code", "bad_request"), ("method", "invalid")))
    assert after[key] - before.get(key, 0) == refused
    # Nothing changed, and both servers still answer.
    assert daemon.pool("sample")["capacity"] == 2
    assert metric(after, "cer_pool_capacity", type="uts", **SAMPLE) == 2
    assert web.update(checkpoint_name="sample", capacity=1) == (200, {"v": 1, "ok": True, "result": {"created": False}})
    assert daemon.pool("sample")["capacity"] == 1


def test_unknown_paths_and_wrong_verbs(served):
    daemon, web = served
    status, _, body = web.request("GET", "/namespace/updates")
    assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"
    assert web.request("POST", "/", b"{}")[0] == 404
    status, headers, _ = web.request("GET", "/namespace/update")
    assert (status, headers["Allow"]) == (405, "POST")
    status, headers, _ = web.request("POST", "/metrics", b"{}")
    assert (status, headers["Allow"]) == (405, "GET")
    assert web.request("PUT", "/namespace/update", _json({"checkpoint_name": "sample", "capacity": 0}))[0] == 405
    assert web.request("GET", "/metrics?name[]=x")[0] == 200  # a query string does not make another path
    assert daemon.pool("sample")["capacity"] == 2


def test_http_is_off_unless_asked_for_and_on_loopback_by_default(served):
    daemon, web = served
    listening = listening_sockets(daemon.process.pid)
    assert len(listening) == 1
    assert f"serving HTTP on http://127.0.0.1:{web.port}" in daemon.output()
    plain = start_daemon(sample_config())
    try:
        assert listening_sockets(plain.process.pid) == set()
    finally:
        assert plain.stop() == 0


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.7"])
def test_a_non_loopback_address_is_refused_at_start(address):
    daemon = start_daemon(sample_config(), "--http-port", str(free_port()), "--http-address", address, wait=False)
    code = daemon.process.wait(30)
    assert code != 0
    output = daemon.output()
    assert f"--http-address {address} is not a loopback address" in output
    assert "--http-allow-remote" in output
    assert not daemon.root.exists()  # refused before the daemon made anything


def test_an_address_that_is_not_an_ip_is_refused():
    daemon = start_daemon(sample_config(), "--http-port", str(free_port()), "--http-address", "cer.example", wait=False)
    assert daemon.process.wait(30) != 0
    assert "'cer.example' is not an IP address" in daemon.output()


def test_http_options_need_a_port():
    root = short_tempdir()
    result = subprocess.run(
        [sys.executable, "-m", "cer", "start", "--root", str(root / "root"), "--http-address", "127.0.0.1"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "need --http-port" in result.stderr
    assert not (root / "root").exists()


def test_a_remote_address_is_served_with_a_loud_warning_when_allowed():
    port = free_port()
    daemon = start_daemon(sample_config(), "--http-port", str(port), "--http-address", "0.0.0.0", "--http-allow-remote")
    try:
        assert "to OTHER HOSTS" in daemon.output()
        assert "WARNING" in next(line for line in daemon.output().splitlines() if "to OTHER HOSTS" in line)
        assert Http(port).request("GET", "/metrics")[0] == 200
    finally:
        assert daemon.stop() == 0


def test_a_taken_port_stops_the_start_with_a_clear_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = start_daemon(sample_config(), "--http-port", str(port), wait=False)
        assert daemon.process.wait(30) != 0
    assert f"cannot serve HTTP on http://127.0.0.1:{port}" in daemon.output()
    assert not (daemon.root / "bundles").exists()  # torn down as after any failed start


@pytest.fixture
def in_process(monkeypatch):
    """The HTTP server alone, in this process, in front of a stand-in gateway; short socket timeouts."""
    from dummy_gateway import DummyGateway

    from cer.metrics import Metrics
    from cer.protocol import http as http_module

    monkeypatch.setattr(http_module._Handler, "timeout", 1.0)
    gateway = DummyGateway()
    token_file = short_tempdir() / "http.token"
    server = http_module.HttpServer("127.0.0.1", free_port(), gateway, Metrics(method_names()), token_file=str(token_file))
    server.start()
    yield server, gateway, Http(int(server.url.rsplit(":", 1)[1]), token_file.read_text().strip())
    server.stop()
    assert not token_file.exists()


def closed_by_peer(connection: socket.socket, within: float) -> bool:
    connection.settimeout(within)
    try:
        return connection.recv(4096) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_a_client_that_stalls_mid_body_is_dropped_and_others_are_served(in_process):
    server, gateway, web = in_process
    stalled = socket.create_connection(("127.0.0.1", web.port))
    try:
        stalled.sendall(b"POST /namespace/update HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                        b"Authorization: Bearer " + web.token.encode() + b"\r\n\r\n{\"checkp")
        # Served meanwhile: the stalled client holds one thread, not the server.
        assert web.update(checkpoint_name="a", capacity=1)[0] == 200
        assert closed_by_peer(stalled, 5), "the stalled connection was not closed"
    finally:
        stalled.close()
    assert [call for call in gateway.calls if call[0] == "update"] == [("update", CheckpointRef("a"), 1)]


def test_connections_beyond_the_bounds_are_closed_at_once(in_process, monkeypatch):
    from cer.protocol import http as http_module

    server, _, web = in_process
    monkeypatch.setattr(http_module._Handler, "timeout", 10.0)
    monkeypatch.setattr(http_module, "_REQUEST_DEADLINE", 30.0)
    monkeypatch.setattr(http_module, "_MAX_CONNECTIONS", http_module._MAX_PER_PEER + 2)
    idle = [socket.create_connection(("127.0.0.1", web.port)) for _ in range(http_module._MAX_PER_PEER)]
    try:
        # Each idle connection holds its thread; one more from the same user is refused at once.
        wait_for(lambda: server._server.open_connections == http_module._MAX_PER_PEER, 5, what="the peer's slots to be taken")
        extra = socket.create_connection(("127.0.0.1", web.port))
        try:
            assert closed_by_peer(extra, 5)
        finally:
            extra.close()
        # Another user still gets in, up to the bound on all connections.
        others = as_unprivileged(
            "import socket, time\n"
            f"held = [socket.create_connection(('127.0.0.1', {web.port})) for _ in range(3)]\n"
            "closed = []\n"
            "for connection in held:\n"
            "    connection.settimeout(1.5)\n"
            "    try:\n"
            "        closed.append(connection.recv(1) == b'')\n"
            "    except TimeoutError:\n"
            "        closed.append(False)\n"
            "print(sum(closed))\n"
        )
        assert others.stdout.strip() == "1", others.stderr  # two fit under the bound, the third does not
    finally:
        for connection in idle:
            connection.close()

    def served_again():
        try:
            return web.request("GET", "/metrics")[0] == 200
        except (http.client.HTTPException, ConnectionError):
            return False  # refused while the slots were still being given back

    wait_for(served_again, 10, interval=0.1, what="a slot to free up")


SLOWLORIS = """
import socket, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
started, opened, longest = time.monotonic(), {}, 0.0

def connect():
    try:
        connection = socket.create_connection(("127.0.0.1", port), timeout=2)
        connection.sendall(b"P")
        opened[connection] = time.monotonic()
    except OSError:
        pass

for _ in range(count):
    connect()
while time.monotonic() - started < seconds:
    time.sleep(4)
    for connection, since in list(opened.items()):
        try:
            connection.sendall(b"O")  # one byte every 4 s, as in the issue
            connection.setblocking(False)
            alive = connection.recv(1) != b""
        except BlockingIOError:
            alive = True
        except OSError:
            alive = False
        connection.setblocking(True)
        if not alive:
            longest = max(longest, time.monotonic() - since)
            del opened[connection]
            connection.close()
            connect()  # and straight back in
longest = max([longest, *(time.monotonic() - since for since in opened.values())])
print(round(longest, 1))
"""


@pytest.mark.timeout(120)
def test_slow_clients_of_another_user_keep_nobody_out(in_process, monkeypatch):
    """Issue 15, finding 3: 32 clients sending a byte every 4 s kept every other HTTP request out, for as long
    as they liked (a per-read timeout, no whole-request deadline, one bound for everyone)."""
    from cer.protocol import http as http_module

    server, gateway, web = in_process
    monkeypatch.setattr(http_module._Handler, "timeout", http_module._SOCKET_TIMEOUT)  # the daemon's own
    attack_seconds = 3 * http_module._REQUEST_DEADLINE + 6
    attacker = as_unprivileged(SLOWLORIS, str(web.port), "32", str(attack_seconds), wait=False)
    try:
        wait_for(lambda: server._server.open_connections >= http_module._MAX_PER_PEER, 10, what="the slow clients")
        served = 0
        deadline = time.monotonic() + attack_seconds - 2
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert web.request("GET", "/metrics")[0] == 200
            assert web.update(checkpoint_name="a", capacity=1)[0] == 200
            assert time.monotonic() - started < 2, "a request waited behind the slow clients"
            served += 1
            time.sleep(0.25)
        out, err = attacker.communicate(timeout=60)
    finally:
        attacker.kill()
    assert attacker.returncode == 0, err
    # However they trickle, no connection outlives the whole-request deadline (the attacker checks every 4 s).
    assert float(out) <= http_module._REQUEST_DEADLINE + 4.5, out
    assert served >= 10


def test_updates_need_roots_token_and_metrics_stay_open():
    """Issue 15, finding 3: an unprivileged user's POST /namespace/update built 3,000 namespaces."""
    port = free_port()
    daemon = start_daemon(sample_config(), "--http-port", str(port))
    try:
        token_file = daemon.root / "http.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.stat().st_uid == 0
        probe = (
            "import http.client, json\n"
            f"token = None\n"
            "try:\n"
            f"    token = open({str(token_file)!r}).read()\n"
            "except PermissionError:\n"
            "    pass\n"
            "def ask(verb, path, body=None, headers={}):\n"
            f"    connection = http.client.HTTPConnection('127.0.0.1', {port}, timeout=15)\n"
            "    connection.request(verb, path, body=body, headers=headers)\n"
            "    response = connection.getresponse()\n"
            "    return response.status, response.read()\n"
            "body = json.dumps({'checkpoint_name': 'sample', 'capacity': 1000}).encode()\n"
            "update, reply = ask('POST', '/namespace/update', body)\n"
            "guessed, _ = ask('POST', '/namespace/update', body, {'Authorization': 'Bearer guessed'})\n"
            "metrics, _ = ask('GET', '/metrics')\n"
            "print(json.dumps({'token': token, 'update': update, 'guessed': guessed, 'metrics': metrics,\n"
            "                  'code': json.loads(reply)['error']['code']}))\n"
        )
        unprivileged = as_unprivileged(probe)
        assert json.loads(unprivileged.stdout) == {"token": None, "update": 401, "guessed": 401, "metrics": 200,
                                                   "code": "unauthorized"}, unprivileged.stderr
        assert daemon.pool("sample")["capacity"] == 2
        root = Http(port, token_of(daemon))
        assert root.update(checkpoint_name="sample", capacity=3)[0] == 200
        assert daemon.pool("sample")["capacity"] == 3
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert not (daemon.root / "http.token").exists()


def test_unauthenticated_updates_only_when_asked_for_by_name():
    port = free_port()
    daemon = start_daemon(sample_config(), "--http-port", str(port), "--http-unauthenticated-updates")
    try:
        assert not (daemon.root / "http.token").exists()
        assert Http(port).update(checkpoint_name="sample", capacity=1)[0] == 200
        assert daemon.pool("sample")["capacity"] == 1
        assert "WITHOUT AUTHENTICATION" in daemon.output()
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_updates_create_pools_of_unconfigured_refs_only_within_their_quota(served):
    """Issue 15, finding 3: 254 junk refs made 254 pools, and then a new ref of root's own was refused."""
    from cer.actors.supervisor import MAX_RUNTIME_POOLS

    daemon, web = served
    for index in range(MAX_RUNTIME_POOLS):
        assert web.update(checkpoint_name=f"junk-{index}", capacity=0) == (200, {"v": 1, "ok": True, "result": {"created": True}})
    status, reply = web.update(checkpoint_name="one-too-many", capacity=0)
    assert (status, reply["error"]["code"]) == (503, "exhausted"), reply
    assert "not added" in reply["error"]["message"]
    assert len(daemon.status()["pools"]) == 2 + MAX_RUNTIME_POOLS
    # The configuration's own pools are resized as ever.
    assert web.update(checkpoint_name="sample", capacity=1)[0] == 200
