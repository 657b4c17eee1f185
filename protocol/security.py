"""Who may talk to the daemon.

- ``ipc://``: libzmq creates the socket file with whatever mode the umask gives, and replaces whatever
  file is at the path. ``bind_ipc`` binds in a fresh directory only root can enter, makes the socket 0600
  there and only then moves it to the endpoint's path, so no other user can connect in between wherever
  the endpoint is; a path that holds anything but a socket is refused, never replaced. The default
  endpoint is also in ROOT, which only root can enter. Abstract sockets (``ipc://@name``) have no
  permissions at all and are refused.
- ``tcp://``: only with CURVE keys: every connection must present a client key listed in the keys
  directory (the ZeroMQ "ironhouse" pattern). Loopback is no access control on a shared host (every local
  user reaches 127.0.0.1), so tcp without keys is refused, unless the operator asks for exactly that with
  ``--insecure-tcp-any-local-user`` (loopback addresses only, and said loudly in the log).

A keys directory holds ``server.key_secret`` (the daemon's key pair), ``server.key`` (its public half,
for clients), and ``authorized/*.key`` (the public keys of the clients allowed in). ``cer keys DIR``
makes one with a first client key pair, ``client.key_secret``.
"""

import ipaddress
import os
import shutil
import socket
import stat
import tempfile
from urllib.parse import urlsplit

import zmq
import zmq.auth

from cer.errors import EndpointRefused


INSECURE_TCP_FLAG = "--insecure-tcp-any-local-user"


def check_endpoint(endpoint: str, curve_keys: str | None, insecure_tcp: bool = False) -> None:
    """Refuse an endpoint that would let anyone but root (or an authorized CURVE key) in; ``insecure_tcp``
    lets a loopback tcp endpoint be served without keys, open to every local user."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        if rest.startswith("@"):
            raise EndpointRefused(f"{endpoint} is an abstract socket, which any local user can reach")
        if curve_keys:
            raise EndpointRefused("CURVE keys are for tcp:// endpoints; ipc:// is guarded by its directory's mode")
        return
    if scheme != "tcp":
        raise EndpointRefused(f"{endpoint}: only ipc:// and tcp:// endpoints are served")
    if curve_keys is not None:
        return
    if not _is_loopback(urlsplit(f"tcp://{rest}").hostname or ""):
        raise EndpointRefused(f"{endpoint} is not a loopback address: serving it needs --curve-keys")
    if not insecure_tcp:
        raise EndpointRefused(
            f"{endpoint} without --curve-keys would give every local user the whole API (loopback is no access "
            f"control): make keys with `cer keys DIR` and pass --curve-keys DIR, use an ipc:// endpoint, or accept "
            f"exactly that with {INSECURE_TCP_FLAG}"
        )


def bind_ipc(server: zmq.Socket, path: str) -> None:
    """Bind ``server`` to the unix socket ``path``, reachable by root alone from its first moment on."""
    try:
        existing = os.lstat(path).st_mode
    except FileNotFoundError:
        existing = None
    if existing is not None and not stat.S_ISSOCK(existing):
        raise EndpointRefused(f"{path} exists and is not a socket: it is not replaced")
    private = tempfile.mkdtemp(prefix=".cer-", dir=os.path.dirname(path) or ".")  # 0700
    try:
        staged = os.path.join(private, "s")
        server.bind(f"ipc://{staged}")
        os.chmod(staged, 0o600)
        os.rename(staged, path)  # the bound socket goes with its file
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a host name: not provably loopback


class CurveServer:
    """The daemon's side of CURVE: an authenticator thread and the server key on the bound socket."""

    def __init__(self, context: zmq.Context, keys: str) -> None:
        # Imported here: it pulls in asyncio, which clients of this module (every `cer` verb) do not need.
        from zmq.auth.thread import ThreadAuthenticator  # noqa: PLC0415

        self._public, self._secret = _load(os.path.join(keys, "server.key_secret"))
        self._authenticator = ThreadAuthenticator(context)
        self._authorized = os.path.join(keys, "authorized")
        if not os.path.isdir(self._authorized):
            raise EndpointRefused(f"{keys} has no authorized/ directory of client keys")

    def start(self) -> None:
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=self._authorized)

    def secure(self, server: zmq.Socket) -> None:
        server.curve_secretkey = self._secret
        server.curve_publickey = self._public
        server.curve_server = True

    def stop(self) -> None:
        self._authenticator.stop()


def secure_client(client: zmq.Socket, keys: str) -> None:
    """Give a client socket its key pair and the server's public key from ``keys``."""
    client.curve_publickey, client.curve_secretkey = _load(os.path.join(keys, "client.key_secret"))
    client.curve_serverkey, _ = _load(os.path.join(keys, "server.key"))


def make_keys(directory: str) -> None:
    """Create a keys directory: the server's key pair and one authorized client key pair."""
    os.makedirs(os.path.join(directory, "authorized"), mode=0o700, exist_ok=True)
    zmq.auth.create_certificates(directory, "server")
    client_public, _ = zmq.auth.create_certificates(directory, "client")
    os.replace(client_public, os.path.join(directory, "authorized", f"client-{socket.gethostname()}.key"))
    # Clients need the server's public half; create_certificates wrote it as server.key already.


def _load(path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise EndpointRefused(f"cannot read the CURVE key {path}: {error}") from None
