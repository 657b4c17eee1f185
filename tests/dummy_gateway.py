"""A stand-in for the actors behind the frontend, for tests of the frontend alone.

It answers like the real Gateway but from fixed data; ``slow`` refs block until released, so tests can
hold a worker busy and watch the others go on.
"""

import threading

from cer.actors.pool import Lease
from cer.errors import NotFound
from cer.pooled_namespaces import Namespace


class DummyGateway:
    pid = 4242

    def __init__(self) -> None:
        self.release_slow = threading.Event()
        self.slow_started = threading.Event()
        self.calls: list[tuple] = []
        self._unreported = 0

    def get_namespace(self, ns_type, ref, holder_pid=None) -> Lease:
        self.calls.append(("get", ns_type, ref))
        if ref.name == "slow":
            self.slow_started.set()
            self.release_slow.wait(30)
        return Lease(Namespace(ns_type, 1500, self.pid), cold=ref.name == "slow", ipc_default=True)

    def take_warm(self, ns_type, ref, holder_pid=None) -> Lease | None:
        # Only "warm" refs are answered in the router thread; every other get goes to a worker, where
        # "slow" ones can hold it.
        if ref.name != "warm":
            return None
        self.calls.append(("take", ns_type, ref))
        self._unreported += 1
        return Lease(Namespace(ns_type, 1500, self.pid), cold=False, ipc_default=True)

    def after_replies(self) -> None:
        if self._unreported:
            self.calls.append(("report", self._unreported))
            self._unreported = 0

    def put_warm(self, ns_type, namespace_id) -> bool:
        return False

    def put_namespace(self, ns_type, namespace_id) -> None:
        self.calls.append(("put", ns_type, namespace_id))
        if namespace_id != 1500:
            raise NotFound(f"{ns_type} namespace {namespace_id} is not handed out by this daemon")

    def bind_namespace(self, ns_type, namespace_id, holder_pid) -> None:
        self.calls.append(("bind", ns_type, namespace_id, holder_pid))

    def ipc_default(self, ref) -> bool:
        return ref.name != "busy"

    def update(self, ref, capacity) -> bool:
        self.calls.append(("update", ref, capacity))
        return True

    def get_checkpoint(self, ref) -> str:
        if ref.name == "missing":
            raise NotFound("no such checkpoint")
        return f"/images/{ref.key}"

    def put_checkpoint(self, ref) -> int:
        return 0

    def status(self) -> dict:
        return {"version": "test", "pid": self.pid, "uptime_seconds": 0, "pools": []}
