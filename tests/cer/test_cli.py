"""The `cer` client verbs against a real daemon, as an operator types them."""

import json
import re
import signal
import subprocess
import sys
import time

from conftest import SAMPLE, short_tempdir, wait_for


def cer(*args: str, endpoint: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cer", *args, "--endpoint", endpoint]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_ns_get_and_put_round_trip(daemon):
    daemon.wait_full("sample")
    reply = json.loads(cer("ns", "get", "uts", "sample", endpoint=daemon.endpoint).stdout)
    hostname = subprocess.run(["nsenter", f"--uts={reply['path']}", "hostname"], capture_output=True, text=True, timeout=10)
    assert hostname.stdout.strip() == "cer-sample"
    cer("ns", "put", "uts", str(reply["namespace_id"]), "--pid", str(reply["pid"]), endpoint=daemon.endpoint)
    again = cer("ns", "put", "uts", str(reply["namespace_id"]), endpoint=daemon.endpoint, check=False)
    assert again.returncode == 1
    assert again.stderr.startswith("error: not_found: ")


def test_status_table_and_json(daemon):
    daemon.wait_full("sample")
    table = cer("status", endpoint=daemon.endpoint).stdout
    assert table.splitlines()[0].strip().startswith(f"cer 0.1.0, pid {daemon.process.pid}")
    lines = [line.split() for line in table.splitlines()[2:]]
    # checkpoint, state, type, target, idle, in use, bound, overdue, building, warm, cold, build ms
    assert any(line[:11] == ["default/sample", "ready", "uts", "2", "2", "0", "0", "0", "0", "0", "0"] for line in lines), table
    assert any(line[:4] == ["default/sample-empty-ipc", "ready", "mnt", "-"] for line in lines), table
    document = json.loads(cer("status", "--json", endpoint=daemon.endpoint).stdout)
    assert {pool["ref"]["name"] for pool in document["pools"]} == {"sample", "sample-empty-ipc"}


def test_status_watch_refreshes_until_interrupted(daemon):
    daemon.wait_full("sample")
    started = daemon.status()["uptime_seconds"]
    watch = subprocess.Popen([sys.executable, "-m", "cer", "status", "--watch", "0.3", "--endpoint", daemon.endpoint],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    watch.send_signal(signal.SIGINT)  # how an operator stops it
    out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    # Off a terminal only the last refresh is printed: it must be seconds newer than the first.
    uptime = int(re.search(r"up (\d+) s", out).group(1))
    assert uptime >= started + 2, out


def test_the_daemon_logs_when_every_pool_is_ready(daemon):
    daemon.wait_full("sample")
    wait_for(lambda: "every pool is ready" in daemon.output(), 10, what="the ready line")
    assert "filling pools" in daemon.output() or "every pool is ready: " in daemon.output()


def test_endpoint_comes_from_the_environment(daemon):
    result = subprocess.run(
        [sys.executable, "-m", "cer", "checkpoint", "get", "sample"],
        capture_output=True, text=True, timeout=30, env={"CER_ENDPOINT": daemon.endpoint, "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == str(SAMPLE / "checkpoint")


def test_update_and_bad_arguments(daemon):
    assert json.loads(cer("ns", "update", "sample", "4", endpoint=daemon.endpoint).stdout) == {"created": False}
    wait_for(lambda: daemon.pool("sample")["types"]["ipc"]["idle"] == 4, 20)
    bad = cer("ns", "update", "sample", "-1", endpoint=daemon.endpoint, check=False)
    assert bad.returncode == 2 and "-1" in bad.stderr
    bad = cer("ns", "get", "pid", "sample", endpoint=daemon.endpoint, check=False)
    assert bad.returncode == 2 and "'pid' is not one of" in bad.stderr
    bad = cer("ns", "get", "uts", "a\x01b", endpoint=daemon.endpoint, check=False)
    assert bad.returncode == 2 and "control characters" in bad.stderr


def test_a_client_with_no_daemon_says_so():
    endpoint = f"ipc://{short_tempdir()}/none.sock"
    result = subprocess.run(
        [sys.executable, "-m", "cer", "status", "--endpoint", endpoint, "--timeout", "0.5"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"error: unavailable: no answer from the cer daemon at {endpoint}" in result.stderr


def test_status_shows_told_messages_that_failed():
    from rich.console import Console

    from cer.cli import _status_table

    reply = {"version": "0", "pid": 1, "uptime_seconds": 1, "pools": [],
             "message_failures": [{"actor": "PoolActor", "message": "namespace_created", "count": 2, "last_error": "KeyError: 'x'"}]}
    console = Console(record=True, width=200)
    console.print(_status_table(reply))
    text = console.export_text()
    assert re.search(r"PoolActor\s+namespace_created\s+2\s+KeyError: 'x'", text), text
    console = Console(record=True, width=200)
    console.print(_status_table({**reply, "message_failures": []}))
    assert "failed messages" not in console.export_text()
