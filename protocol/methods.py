"""Every method of the cer protocol, each defined once: its parameters, their checks and its handler.

A method is a frozen dataclass of its validated parameters. The daemon builds one with ``parse`` from
a request's params and runs ``handle``; clients build one directly and send ``params()``. Its docstring
is the method's documentation (protocol/README.md repeats it for readers of the wire format).
"""

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from cer.config import MAX_CAPACITY
from cer.criu.views import TRANSFORMS, view_kinds
from cer.documents import reject_unknown
from cer.errors import BadRequest, NotFound, Unavailable, UnknownMethod
from cer.linux.flags import NAMESPACE_TYPES
from cer.references import CheckpointRef

if TYPE_CHECKING:  # clients use these definitions without the daemon's actors
    from cer.protocol.gateway import Gateway
    from cer.actors.pool import Lease

_MAX_EXTRA_REFS = 64
_MAX_ID = 2**31 - 1


class _Params:
    """Reads one request's params; every problem is a BadRequest that names the field."""

    def __init__(self, raw: dict, fields: set[str]) -> None:
        reject_unknown(raw, fields, "params")
        self._raw = raw

    def namespace_type(self) -> str:
        value = self._raw.get("namespace_type")
        if value not in NAMESPACE_TYPES:
            raise BadRequest(f"namespace_type must be one of {', '.join(NAMESPACE_TYPES)}, not {value!r}")
        return value

    def integer(self, name: str, minimum: int, maximum: int, required: bool = True) -> int | None:
        value = self._raw.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise BadRequest(f"{name} must be a whole number from {minimum} to {maximum}, not {value!r}")
        return value

    def ref(self, name: str = "ref") -> CheckpointRef:
        return CheckpointRef.from_wire(self._raw.get(name), name)

    def kinds(self, name: str, allowed, required: bool = True) -> tuple[str, ...]:
        """A list of distinct names, each one of ``allowed``, as a sorted tuple."""
        values = self._raw.get(name)
        if values is None and not required:
            return ()
        allowed = sorted(allowed)
        if (not isinstance(values, list) or len(values) > len(allowed)
                or not all(isinstance(value, str) and value in allowed for value in values)
                or len(set(values)) != len(values)):
            raise BadRequest(f"{name} must be a list of distinct names from {', '.join(allowed)}, not {values!r}")
        return tuple(sorted(values))

    def images_digest(self, name: str = "images_digest") -> str | None:
        value = self._raw.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise BadRequest(f"{name} must be 'sha256:' and 64 lowercase hex digits, as cer.criu.views.images_digest "
                             f"computes it, not {value!r}")
        return value

    def refs(self, name: str) -> tuple[CheckpointRef, ...]:
        values = self._raw.get(name, [])
        if not isinstance(values, list) or len(values) > _MAX_EXTRA_REFS:
            raise BadRequest(f"{name} must be a list of at most {_MAX_EXTRA_REFS} refs")
        return tuple(CheckpointRef.from_wire(value, f"{name}[{index}]") for index, value in enumerate(values))


class Method:
    service: ClassVar[str]
    name: ClassVar[str]
    full_name: ClassVar[str]  # "service.name", as metrics label it

    @classmethod
    def parse(cls, raw: dict) -> "Method":
        raise NotImplementedError

    def params(self) -> dict:
        raise NotImplementedError

    def handle(self, gateway: "Gateway") -> dict:
        raise NotImplementedError

    def handle_now(self, gateway: "Gateway") -> dict | None:
        """The result if it can be had without waiting on any actor, else None (``handle`` then runs in a
        worker thread). The frontend's router thread calls this, so it must never block."""
        return None


METHODS: dict[tuple[str, str], type[Method]] = {}


def _method(service: str, name: str):
    def register(cls: type[Method]) -> type[Method]:
        cls.service, cls.name, cls.full_name = service, name, f"{service}.{name}"
        METHODS[(service, name)] = cls
        return cls

    return register


def method_names() -> frozenset[str]:
    """Every method as ``service.name`` (``namespace.get``): what metrics may label a request with."""
    return frozenset(method.full_name for method in METHODS.values())


def find_method(service: str, name: str) -> type[Method]:
    try:
        return METHODS[(service, name)]
    except KeyError:
        raise UnknownMethod(f"unknown method {service}.{name}") from None


@_method("namespace", "get")
@dataclass(frozen=True)
class NamespaceGet(Method):
    """Take a ready namespace of ``namespace_type`` for the checkpoint ``ref``.

    params: ``{"namespace_type": "ipc"|"uts"|"mnt", "ref": REF, "extra_refs": [REF, ...], "holder_pid": PID}``
    result: ``{"namespace_id": ID, "pid": PID, "path": "/proc/PID/fd/ID", "info": {...}}``

    The caller joins ``path`` (setns, ``nsenter``, or a runtime's namespace path) and gives the namespace
    back with ``namespace.put`` when the container that used it is gone; it is destroyed then, never
    handed out again. ``extra_refs`` lists the other containers that share the namespace (a pod): for
    ``ipc`` the one checkpoint whose IPC namespace holds objects or non-default settings is served, and
    two such checkpoints are refused, since one namespace cannot hold both. ``info`` has ``cold`` (it was
    built for this get because none was idle), ``ref`` (the checkpoint served), ``ipc_default``, and for
    ``mnt`` the ``bundle`` directory and ``rootfs``, where the root filesystem is inside the namespace ("/": it
    is pivoted into it). With ``holder_pid`` the namespace is bound to
    that process as it is handed out (see ``namespace.bind``), so no moment exists in which nobody holds it.
    """

    namespace_type: str
    ref: CheckpointRef
    extra_refs: tuple[CheckpointRef, ...] = ()
    holder_pid: int | None = None

    @classmethod
    def parse(cls, raw: dict) -> "NamespaceGet":
        params = _Params(raw, {"namespace_type", "ref", "extra_refs", "holder_pid"})
        return cls(
            params.namespace_type(),
            params.ref(),
            params.refs("extra_refs"),
            params.integer("holder_pid", 1, _MAX_ID, required=False),
        )

    def params(self) -> dict:
        params = {
            "namespace_type": self.namespace_type,
            "ref": self.ref.to_wire(),
            "extra_refs": [ref.to_wire() for ref in self.extra_refs],
        }
        return params if self.holder_pid is None else {**params, "holder_pid": self.holder_pid}

    def handle(self, gateway: "Gateway") -> dict:
        ref = self.ref
        if self.namespace_type == "ipc" and self.extra_refs:
            ref = self._ref_owning_ipc(gateway)
        return _namespace_reply(gateway.get_namespace(self.namespace_type, ref, self.holder_pid), ref)

    def handle_now(self, gateway: "Gateway") -> dict | None:
        """A warm get: a namespace off the pool's shelf (an ipc get for a pod asks pools first: not now)."""
        if self.namespace_type == "ipc" and self.extra_refs:
            return None
        lease = gateway.take_warm(self.namespace_type, self.ref, self.holder_pid)
        return None if lease is None else _namespace_reply(lease, self.ref)

    def _ref_owning_ipc(self, gateway: "Gateway") -> CheckpointRef:
        refs = list(dict.fromkeys((self.ref, *self.extra_refs)))
        verdicts = {ref: gateway.ipc_default(ref) for ref in refs}
        loading = [str(ref) for ref, verdict in verdicts.items() if verdict is None]
        if loading:
            raise Unavailable(f"checkpoints {', '.join(loading)} are not loaded yet: which one owns the IPC namespace is not known")
        not_default = [ref for ref, verdict in verdicts.items() if not verdict]
        if len(not_default) > 1:
            names = ", ".join(map(str, not_default))
            raise BadRequest(f"checkpoints {names} each hold IPC objects or settings; one IPC namespace cannot hold them all")
        return not_default[0] if not_default else self.ref


def _namespace_reply(lease: "Lease", ref: CheckpointRef) -> dict:
    namespace = lease.namespace
    info = {"cold": lease.cold, "ref": ref.to_wire(), "ipc_default": lease.ipc_default}
    if lease.ipc is not None:
        info["ipc"] = lease.ipc
    if namespace.bundle is not None:
        info.update(bundle=namespace.bundle, rootfs=namespace.rootfs)
    return {"namespace_id": namespace.namespace_id, "pid": namespace.pid, "path": namespace.path, "info": info}


@_method("namespace", "put")
@dataclass(frozen=True)
class NamespacePut(Method):
    """Give back a namespace from ``namespace.get``; the daemon destroys it and builds a fresh one.

    params: ``{"namespace_type": T, "namespace_id": ID, "pid": PID}`` (``pid``, optional, is the daemon pid
    the get answered with: a namespace from an earlier run of the daemon is then told apart)
    result: ``{}``
    """

    namespace_type: str
    namespace_id: int
    pid: int | None = None

    @classmethod
    def parse(cls, raw: dict) -> "NamespacePut":
        params = _Params(raw, {"namespace_type", "namespace_id", "pid"})
        return cls(params.namespace_type(), params.integer("namespace_id", 0, _MAX_ID), params.integer("pid", 1, _MAX_ID, required=False))

    def params(self) -> dict:
        params = {"namespace_type": self.namespace_type, "namespace_id": self.namespace_id}
        return params if self.pid is None else {**params, "pid": self.pid}

    def handle(self, gateway: "Gateway") -> dict:
        self._check_daemon(gateway)
        gateway.put_namespace(self.namespace_type, self.namespace_id)
        return {}

    def handle_now(self, gateway: "Gateway") -> dict | None:
        """A namespace from a warm get goes back to its pool by message, answered at once."""
        self._check_daemon(gateway)
        return {} if gateway.put_warm(self.namespace_type, self.namespace_id) else None

    def _check_daemon(self, gateway: "Gateway") -> None:
        if self.pid is not None and self.pid != gateway.pid:
            raise NotFound(
                f"{self.namespace_type} namespace {self.namespace_id} came from daemon pid {self.pid}, which is no "
                f"longer running (this daemon is pid {gateway.pid}); it was released when that daemon exited"
            )


@_method("namespace", "bind")
@dataclass(frozen=True)
class NamespaceBind(Method):
    """Tie a namespace from ``namespace.get`` to a process: when it exits, the daemon takes the namespace back.

    params: ``{"namespace_type": T, "namespace_id": ID, "holder_pid": PID}``
    result: ``{}``

    Binding again moves the namespace to another process: a restore wrapper binds what it got to its own
    pid at once (so nothing is lost if it dies), then to the restored container's init. A put still works
    on a bound namespace. ``not_found`` when the namespace is not handed out or the process is not running.
    """

    namespace_type: str
    namespace_id: int
    holder_pid: int

    @classmethod
    def parse(cls, raw: dict) -> "NamespaceBind":
        params = _Params(raw, {"namespace_type", "namespace_id", "holder_pid"})
        return cls(params.namespace_type(), params.integer("namespace_id", 0, _MAX_ID), params.integer("holder_pid", 1, _MAX_ID))

    def params(self) -> dict:
        return {"namespace_type": self.namespace_type, "namespace_id": self.namespace_id, "holder_pid": self.holder_pid}

    def handle(self, gateway: "Gateway") -> dict:
        gateway.bind_namespace(self.namespace_type, self.namespace_id, self.holder_pid)
        return {}


@_method("namespace", "update")
@dataclass(frozen=True)
class NamespaceUpdate(Method):
    """Set the number of idle namespaces kept per type for ``ref``; creates the pool of a new ref.

    params: ``{"ref": REF, "capacity": N}`` (0 drains the pool)
    result: ``{"created": true|false}``

    Pools of refs the configuration does not name are created within a quota of their own (``exhausted``
    beyond), which never blocks the configuration's pools.
    """

    ref: CheckpointRef
    capacity: int

    @classmethod
    def parse(cls, raw: dict) -> "NamespaceUpdate":
        params = _Params(raw, {"ref", "capacity"})
        return cls(params.ref(), params.integer("capacity", 0, MAX_CAPACITY))

    def params(self) -> dict:
        return {"ref": self.ref.to_wire(), "capacity": self.capacity}

    def handle(self, gateway: "Gateway") -> dict:
        return {"created": gateway.update(self.ref, self.capacity)}


@_method("checkpoint", "get")
@dataclass(frozen=True)
class CheckpointGet(Method):
    """The directory of the checkpoint's CRIU images, ready for ``criu restore -D``/``--image-path``.

    params: ``{"ref": REF, "view": [KIND, ...]}``; result: ``{"path": DIR}``. Each get counts a user until
    ``checkpoint.put``. With ``view`` (kinds: ``ipc``), the path is the checkpoint's image view for a
    restore that joins cer's namespaces of those kinds: the checkpoint's own files, hard-linked, except
    the images that would make CRIU re-create what cer's namespace holds (see ``checkpoint.restore``).
    Made once per checkpoint and kind, shared, read-only, removed with the checkpoint.
    """

    ref: CheckpointRef
    view: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointGet":
        params = _Params(raw, {"ref", "view"})
        return cls(params.ref(), params.kinds("view", TRANSFORMS, required=False))

    def params(self) -> dict:
        params = {"ref": self.ref.to_wire()}
        return {**params, "view": list(self.view)} if self.view else params

    def handle(self, gateway: "Gateway") -> dict:
        return {"path": gateway.get_view(self.ref, self.view) if self.view else gateway.get_checkpoint(self.ref)}


@_method("checkpoint", "restore")
@dataclass(frozen=True)
class CheckpointRestore(Method):
    """Everything one restore of a checkpoint takes from cer, in one request.

    params: ``{"ref": REF, "images_digest": DIGEST, "types": ["ipc"|"uts"|"mnt", ...], "holder_pid": PID}``
    (``ref`` or ``images_digest``, or both, which must then name the same checkpoint)
    result: ``{"ref": REF, "images": DIR, "namespaces": {TYPE: {"namespace_id", "pid", "path", "info"}},
    "criu_config": [LINE, ...]}``

    ``images`` is the image view that a stock CRIU restore joining these namespaces needs (see
    ``checkpoint.get`` with ``view``), counted as one user of the checkpoint until ``checkpoint.put`` or, if
    none comes, ``holder_pid``'s exit.
    Each namespace is as ``namespace.get`` answers it, bound to ``holder_pid`` from the start; bind them to
    the restored container's init with ``namespace.bind`` afterwards, or give them back with
    ``namespace.put``. ``criu_config`` lists CRIU options the restore must add (in a file named by the
    spec's ``org.criu.config`` annotation, or ``criu restore --config``); empty when there are none. All or
    nothing: a failure gives back what was taken. ``images_digest`` names the checkpoint by its images:
    ``cer.criu.views.images_digest`` of the directory a runtime was told to restore from; a checkpoint cer
    does not hold (or has not read yet) is ``not_found`` at once.
    """

    ref: CheckpointRef | None
    types: tuple[str, ...]
    holder_pid: int
    images_digest: str | None = None

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointRestore":
        params = _Params(raw, {"ref", "images_digest", "types", "holder_pid"})
        digest = params.images_digest()
        ref = params.ref() if raw.get("ref") is not None or digest is None else None
        return cls(ref, params.kinds("types", NAMESPACE_TYPES), params.integer("holder_pid", 1, _MAX_ID), digest)

    def params(self) -> dict:
        params: dict = {"types": list(self.types), "holder_pid": self.holder_pid}
        if self.ref is not None:
            params["ref"] = self.ref.to_wire()
        if self.images_digest is not None:
            params["images_digest"] = self.images_digest
        return params

    def handle(self, gateway: "Gateway") -> dict:
        ref = self.ref
        if self.images_digest is not None:
            found = gateway.find_checkpoint(self.images_digest)
            if ref is not None and found != ref:
                raise NotFound(f"checkpoint {ref} does not have the images {self.images_digest} (checkpoint {found} has)")
            ref = found
        images, leases = gateway.prepare_restore(ref, self.types, view_kinds(self.types), self.holder_pid)
        return {
            "ref": ref.to_wire(),
            "images": images,
            "namespaces": {ns_type: _namespace_reply(lease, ref) for ns_type, lease in leases.items()},
            "criu_config": gateway.criu_config(self.types),
        }


@_method("checkpoint", "put")
@dataclass(frozen=True)
class CheckpointPut(Method):
    """Drop one user of a checkpoint directory from ``checkpoint.get``.

    params: ``{"ref": REF}``; result: ``{"users": N}`` (the users left)
    """

    ref: CheckpointRef

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointPut":
        return cls(_Params(raw, {"ref"}).ref())

    def params(self) -> dict:
        return {"ref": self.ref.to_wire()}

    def handle(self, gateway: "Gateway") -> dict:
        return {"users": gateway.put_checkpoint(self.ref)}


@_method("admin", "status")
@dataclass(frozen=True)
class AdminStatus(Method):
    """Every pool with its state, last error, capacity, and per type idle/in-use/building counts and
    warm/cold gets; the factory's and the extractor's counters; the daemon's version, pid and uptime.

    params: ``{}``
    """

    @classmethod
    def parse(cls, raw: dict) -> "AdminStatus":
        _Params(raw, set())
        return cls()

    def params(self) -> dict:
        return {}

    def handle(self, gateway: "Gateway") -> dict:
        return gateway.status()


@_method("admin", "reload")
@dataclass(frozen=True)
class AdminReload(Method):
    """Read the configuration file again and apply it, as SIGHUP does: pools of new entries start,
    pools of removed entries stop (their namespaces are destroyed), changed capacities resize, entries
    whose path or rootfs changed get a new pool; pools whose entries did not change are left alone.

    params: ``{}``
    result: ``{"added": [REF, ...], "removed": [...], "resized": [...], "restarted": [...]}`` (as
    ``namespace/name`` strings). A configuration that does not load is ``bad_request`` and changes nothing.
    """

    @classmethod
    def parse(cls, raw: dict) -> "AdminReload":
        _Params(raw, set())
        return cls()

    def params(self) -> dict:
        return {}

    def handle(self, gateway: "Gateway") -> dict:
        return gateway.reload()


def _server_id(raw: dict, name: str = "server_id") -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,10}-[0-9]{1,10}", value):
        raise BadRequest(f"{name} must be a lazy-pages server id as checkpoint.lazy answers it, not {value!r}")
    return value


@_method("checkpoint", "lazy")
@dataclass(frozen=True)
class CheckpointLazy(Method):
    """Start a lazy-pages server for one lazy restore of ``ref``; it is ready when this answers.

    params: ``{"ref": REF, "holder_pid": PID}`` (``holder_pid`` optional)
    result: ``{"server_id": ID, "work_dir": DIR, "socket": PATH, "images": DIR, "pid": PID, "deadline_seconds": S}``

    Restore from ``images`` with ``work_dir`` as CRIU's work directory (``runc restore -d --lazy-pages
    --image-path IMAGES --work-path WORK_DIR``, ``criu restore --lazy-pages -D IMAGES -W WORK_DIR``): the
    restore finds the server at ``socket``, ``lazy-pages.socket`` in that directory. Each call gets a server
    of its own. The server exits once its restore has all its pages; then call ``checkpoint.lazy_bind`` with
    the restored process, so that it is killed rather than left with missing pages if the server ends any
    other way. A server still running ``deadline_seconds`` after this answer is stopped (and its bound
    process killed). With ``holder_pid`` the server is stopped when that process exits before a restore
    reached it (``not_found`` when it is not running). ``unavailable`` when the host cannot restore lazily;
    ``exhausted`` beyond the daemon's caps on servers per checkpoint and in all.
    """

    ref: CheckpointRef
    holder_pid: int | None = None

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointLazy":
        params = _Params(raw, {"ref", "holder_pid"})
        return cls(params.ref(), params.integer("holder_pid", 1, _MAX_ID, required=False))

    def params(self) -> dict:
        params = {"ref": self.ref.to_wire()}
        return params if self.holder_pid is None else {**params, "holder_pid": self.holder_pid}

    def handle(self, gateway: "Gateway") -> dict:
        return gateway.lazy_server(self.ref, self.holder_pid).to_wire()


@_method("checkpoint", "lazy_bind")
@dataclass(frozen=True)
class CheckpointLazyBind(Method):
    """Tell a lazy-pages server from ``checkpoint.lazy`` which process its restore made.

    params: ``{"server_id": ID, "restored_pid": PID}``
    result: ``{"state": "serving"|"completed"}``

    From now on, if the server ends before its restore has all its pages (killed, failed, past its
    deadline, given back), the daemon kills that process (a container's init: its whole pid namespace)
    before the process can read a page that never came. Only a process the daemon ties to this server's
    restore is taken (its userfaultfd-registered memory is the memory the server's userfaultfds serve);
    any other is ``bad_request``. ``completed``: the server has delivered everything already. A server that
    ended otherwise before this call is ``unavailable`` and nothing is killed: the client stops the process.
    ``not_found`` for an unknown server or a process that is not running.
    """

    server_id: str
    restored_pid: int

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointLazyBind":
        params = _Params(raw, {"server_id", "restored_pid"})
        return cls(_server_id(raw), params.integer("restored_pid", 1, _MAX_ID))

    def params(self) -> dict:
        return {"server_id": self.server_id, "restored_pid": self.restored_pid}

    def handle(self, gateway: "Gateway") -> dict:
        return {"state": gateway.bind_lazy_server(self.server_id, self.restored_pid)}


@_method("checkpoint", "lazy_put")
@dataclass(frozen=True)
class CheckpointLazyPut(Method):
    """Give back a lazy-pages server from ``checkpoint.lazy``: it is stopped now, its work directory removed.

    params: ``{"server_id": ID}``
    result: ``{"state": STATE}`` (``released``, or how the server had ended already, e.g. ``completed``)

    For a restore that failed or never ran. A process bound to the server that does not have all its
    pages yet is killed with it.
    """

    server_id: str

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointLazyPut":
        _Params(raw, {"server_id"})
        return cls(_server_id(raw))

    def params(self) -> dict:
        return {"server_id": self.server_id}

    def handle(self, gateway: "Gateway") -> dict:
        return {"state": gateway.put_lazy_server(self.server_id)}


@_method("checkpoint", "lazy_forget")
@dataclass(frozen=True)
class CheckpointLazyForget(Method):
    """Forget the working set recorded for ``ref``: its next lazy restore records one anew.

    params: ``{"ref": REF}``
    result: ``{"forgotten": true|false}`` (false: none was recorded)

    cer's lazy-pages server records which pages a checkpoint's first lazy restore faulted in its first
    moments and serves them first to every later restore (``admin.status``: ``lazy.working_sets``). A set
    that no longer fits the workload only costs page faults; forget it when the workload changed.
    """

    ref: CheckpointRef

    @classmethod
    def parse(cls, raw: dict) -> "CheckpointLazyForget":
        return cls(_Params(raw, {"ref"}).ref())

    def params(self) -> dict:
        return {"ref": self.ref.to_wire()}

    def handle(self, gateway: "Gateway") -> dict:
        return {"forgotten": gateway.forget_working_set(self.ref)}
