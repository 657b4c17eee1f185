"""Only root, or a client holding an authorized CURVE key, reaches the daemon."""

import os
import socket
import stat
import subprocess
import sys

import pytest
from conftest import as_unprivileged, sample_config, short_tempdir, start_daemon, unprivileged_can_connect

from cer.errors import Unavailable
from cer.protocol.client import Client
from cer.protocol.methods import AdminStatus



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_refused(endpoint: str, base=None) -> tuple[subprocess.CompletedProcess, object]:
    """``cer start --endpoint ENDPOINT`` on an empty configuration, expected to refuse: its result and base."""
    base = base or short_tempdir()
    config = base / "c.json"
    config.write_text('{"containerd_checkpoints": []}')
    result = subprocess.run(
        [sys.executable, "-m", "cer", "start", "--root", str(base / "root"), "--config", str(config),
         "--endpoint", endpoint],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0, result.stderr
    return result, base


def test_the_ipc_socket_sits_in_a_root_only_directory_whatever_the_umask():
    root = short_tempdir() / "root"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)  # an earlier owner left it open
    old = os.umask(0)
    try:
        daemon = start_daemon(sample_config(), root=root)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(root / "daemon.sock").st_mode) == 0o600
        assert not unprivileged_can_connect(root / "daemon.sock")
        assert daemon.status()["pools"]  # root gets in
    finally:
        assert daemon.stop() == 0


def test_a_non_loopback_tcp_endpoint_needs_curve_keys():
    result, base = start_refused(f"tcp://0.0.0.0:{free_port()}")
    assert "is not a loopback address: serving it needs --curve-keys" in result.stderr
    assert not os.path.exists(base / "root" / "bundles")


def test_tcp_without_curve_keys_is_refused_unless_asked_for_by_name():
    """Issue 15, finding 2: with a loopback tcp endpoint and no keys, an unprivileged user had the whole API."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    result, base = start_refused(endpoint)
    assert "would give every local user the whole API" in result.stderr and "--curve-keys" in result.stderr
    assert not os.path.exists(base / "root"), "refused only after the daemon had made things"

    # Asked for by its name, it is served, to every local user, and the log says so.
    daemon = start_daemon(sample_config(), "--endpoint", endpoint, "--insecure-tcp-any-local-user", wait=False)
    try:
        probe = (
            "from cer.protocol.client import Client\n"
            "from cer.protocol.methods import AdminStatus\n"
            f"with Client({endpoint!r}, timeout=20) as client:\n"
            "    print(client.call(AdminStatus())['pid'])\n"
        )
        unprivileged = as_unprivileged(probe)
        assert unprivileged.stdout.strip() == str(daemon.process.pid), unprivileged.stderr
        assert "EVERY LOCAL USER" in daemon.output()
    finally:
        assert daemon.stop() == 0


def test_with_curve_keys_an_unprivileged_user_without_a_key_gets_nothing():
    keys = short_tempdir() / "keys"
    subprocess.run([sys.executable, "-m", "cer", "keys", str(keys)], check=True, capture_output=True, timeout=30)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(sample_config(), "--endpoint", endpoint, "--curve-keys", str(keys), wait=False)
    try:
        probe = (
            "from cer.errors import Unavailable\n"
            "from cer.protocol.client import Client\n"
            "from cer.protocol.methods import AdminStatus\n"
            f"with Client({endpoint!r}, timeout=2) as client:\n"
            "    try:\n"
            "        client.call(AdminStatus())\n"
            "    except Unavailable:\n"
            "        raise SystemExit(7)\n"
        )
        assert as_unprivileged(probe).returncode == 7
        with Client(endpoint, timeout=20, curve_keys=str(keys)) as client:
            assert client.call(AdminStatus())["pid"] == daemon.process.pid
    finally:
        assert daemon.stop() == 0


@pytest.mark.timeout(120)
def test_curve_lets_in_only_authorized_clients():
    keys, stranger = short_tempdir() / "keys", short_tempdir() / "stranger"
    for directory in (keys, stranger):
        subprocess.run([sys.executable, "-m", "cer", "keys", str(directory)], check=True, capture_output=True, timeout=30)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(sample_config(), "--endpoint", endpoint, "--curve-keys", str(keys), wait=False)
    try:
        with Client(endpoint, timeout=20, curve_keys=str(keys)) as client:
            assert client.call(AdminStatus())["pid"] == daemon.process.pid
        with Client(endpoint, timeout=1) as plain, pytest.raises(Unavailable):
            plain.call(AdminStatus())
        # A well-formed key pair the daemon does not list, against the right server key.
        (stranger / "server.key").unlink()
        (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
        with Client(endpoint, timeout=1, curve_keys=str(stranger)) as unknown, pytest.raises(Unavailable):
            unknown.call(AdminStatus())
        with Client(endpoint, timeout=20, curve_keys=str(keys)) as client:
            assert client.call(AdminStatus())["pools"]  # still serving
    finally:
        assert daemon.stop() == 0


def test_an_abstract_ipc_socket_is_refused():
    result, _ = start_refused("ipc://@cer-test")
    assert "abstract socket, which any local user can reach" in result.stderr


def test_an_ipc_endpoint_replaces_no_file_and_is_root_only_whatever_the_umask():
    """libzmq replaces whatever file is at an ipc:// path, and creates the socket with the umask's mode: an
    endpoint outside ROOT was open to every local user until the chmod that followed the bind."""
    base = short_tempdir()
    os.chmod(base, 0o755)
    precious = base / "precious"
    precious.write_text("not a socket")
    result, _ = start_refused(f"ipc://{precious}", base)
    assert "exists and is not a socket: it is not replaced" in result.stderr
    assert precious.read_text() == "not a socket"

    endpoint = base / "cer.sock"
    old = os.umask(0)
    try:
        daemon = start_daemon(sample_config(), "--endpoint", f"ipc://{endpoint}", wait=False)
    finally:
        os.umask(old)
    try:
        with Client(f"ipc://{endpoint}", timeout=20) as client:
            assert client.call(AdminStatus())["pid"] == daemon.process.pid
        assert stat.S_IMODE(os.stat(endpoint).st_mode) == 0o600
        assert not [path for path in base.iterdir() if path.name.startswith(".cer-")], "the bind left its directory"
        assert not unprivileged_can_connect(endpoint)
    finally:
        assert daemon.stop() == 0
    assert not endpoint.exists()
