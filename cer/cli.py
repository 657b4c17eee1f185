"""The ``cer`` command: ``cer start`` runs the daemon; the other verbs are clients of a running one."""

import os
import sys
import time

import click
import orjson

from cer.config import CONFIG_NAME, DEFAULT_ROOT, MAX_CAPACITY, default_endpoint
from cer.errors import CerError
from cer.linux.flags import NAMESPACE_TYPES
from cer.references import CheckpointRef

NAMESPACE_TYPE = click.Choice(NAMESPACE_TYPES)


class _Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        from cer.budget import parse_size  # noqa: PLC0415

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


_SIZE = _Size()


def _endpoint_option(command):
    command = click.option(
        "--timeout",
        default=30.0,
        show_default=True,
        type=click.FloatRange(0.1),
        help="Seconds to wait for the daemon's answer.",
    )(command)
    command = click.option(
        "--curve-keys",
        envvar="CER_CURVE_KEYS",
        type=click.Path(file_okay=False, exists=True),
        help="Keys directory for a CURVE-secured tcp:// endpoint ($CER_CURVE_KEYS).",
    )(command)
    return click.option(
        "--endpoint",
        envvar="CER_ENDPOINT",
        default=default_endpoint(),
        show_default=True,
        help="The daemon's ZeroMQ endpoint ($CER_ENDPOINT).",
    )(command)


def _ref_options(command):
    command = click.option("--namespace", "-n", default="default", show_default=True, help="containerd namespace")(command)
    return click.argument("checkpoint")(command)


def _ref(checkpoint: str, namespace: str) -> CheckpointRef:
    try:
        return CheckpointRef(checkpoint, namespace)
    except CerError as error:
        raise click.BadParameter(str(error)) from None


def _call(endpoint: str, timeout: float, curve_keys: str | None, method) -> dict:
    from cer.protocol.client import Client  # noqa: PLC0415 - keeps `cer start` free of client setup

    try:
        with Client(endpoint, timeout, curve_keys) as client:
            return client.call(method)
    except CerError as error:
        click.echo(f"error: {error.code}: {error}", err=True)
        sys.exit(1)


def _print_json(value: object) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@click.group()
@click.option("--debug", is_flag=True, help="Log every request and reply.")
@click.pass_context
def main(context: click.Context, debug: bool) -> None:
    """CER-Manager: pools of ready namespaces for restoring containers from CRIU checkpoints."""
    context.obj = {"debug": debug}


@main.command()
@click.option("--debug", is_flag=True, help="Log every request and reply.")
@click.option("--root", default=DEFAULT_ROOT, show_default=True, type=click.Path(file_okay=False), help="State directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=f"Default: ROOT/{CONFIG_NAME}.")
@click.option("--endpoint", help="ZeroMQ endpoint to serve. Default: ipc://ROOT/daemon.sock.")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1, 256), help="Requests served at once.")
@click.option("--pool-threads", default=4, show_default=True, type=click.IntRange(1, 256), help="Threads all pools share, however many checkpoints there are (a pool's messages are short: builds run in the factory's threads).")
@click.option("--cold-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 600), help="Longest wait, in seconds, for a namespace built on demand.")
@click.option("--curve-keys", type=click.Path(file_okay=False, exists=True), help="Keys directory (see `cer keys`): tcp:// clients must present an authorized key.")
@click.option("--insecure-tcp-any-local-user", "insecure_tcp", is_flag=True, help="Serve a loopback tcp:// --endpoint without --curve-keys. EVERY LOCAL USER then has the whole API (get and put anyone's namespaces, lazy restores, status): only for a host with no other users.")
@click.option("--lease-timeout", default=300.0, show_default=True, type=click.FloatRange(1), help="Seconds after which a namespace neither put nor bound to a process is reported overdue.")
@click.option("--containerd-address", default="/run/containerd/containerd.sock", show_default=True, help="containerd's socket, for entries without a path.")
@click.option("--containerd-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 600), help="Seconds a containerd call may take before containerd counts as unavailable.")
@click.option("--http-port", type=click.IntRange(1, 65535), help="Serve POST /namespace/update and GET /metrics over HTTP on this port (off by default).")
@click.option("--http-address", help="Address of the HTTP server.  [default: 127.0.0.1]")
@click.option("--http-allow-remote", is_flag=True, help="Let --http-address be a non-loopback address (updates need the token; /metrics is open to all who reach it).")
@click.option("--http-unauthenticated-updates", is_flag=True, help="Take POST /namespace/update without the token of ROOT/http.token, as the original did: EVERY LOCAL USER (and with --http-allow-remote every host that reaches the port) can then resize pools and create new ones.")
@click.option("--legacy-socket", is_flag=True, help="Also serve the original CER-Manager's protocol on ROOT/daemon.socket.")
@click.option("--legacy-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600), help="Seconds a --legacy-socket client may stay idle, or take to send one request.")
@click.option("--lazy-deadline", default=300.0, show_default=True, type=click.FloatRange(0.5, 86400), help="Seconds a lazy-pages server (checkpoint.lazy) may live after it is handed out; then it and its restored process are stopped.")
@click.option("--lazy-spares", default=1, show_default=True, type=click.IntRange(0, 16), help="Ready lazy-pages servers kept per checkpoint once it has been restored lazily.")
@click.option("--lazy-max-servers", default=64, show_default=True, type=click.IntRange(1, 4096), help="Lazy-pages servers alive at once, spares included; checkpoint.lazy beyond is answered `exhausted`.")
@click.option("--lazy-max-per-checkpoint", default=16, show_default=True, type=click.IntRange(1, 4096), help="Lazy-pages servers of one checkpoint handed out at once.")
@click.option("--criu", default="criu", show_default=True, help="The CRIU that lazy restores use (and that runs lazy-pages servers with --lazy-server criu).")
@click.option("--lazy-server", default="cer", show_default=True, type=click.Choice(["cer", "criu"]), help="Whose lazy-pages server serves lazy restores: cer's own (records each checkpoint's working set and serves it first) or CRIU's `criu lazy-pages` (the fallback).")
@click.option("--prefill-budget", type=_SIZE, help="Most SysV memory (shm pages, queued messages) pre-filled into pooled IPC namespaces, all pools together, e.g. 8G; a pool that would pass it is refused.  [default: a quarter of the machine's memory]")
@click.pass_context
def start(
    context, debug, root, config_path, endpoint, workers, pool_threads, cold_timeout, curve_keys, insecure_tcp, lease_timeout, containerd_address,
    containerd_timeout, http_port, http_address, http_allow_remote, http_unauthenticated_updates, legacy_socket,
    legacy_timeout, lazy_deadline,
    lazy_spares, lazy_max_servers, lazy_max_per_checkpoint, criu, lazy_server, prefill_budget,
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from cer.config import load_config  # noqa: PLC0415
    from cer.actors.lazy import LazySettings  # noqa: PLC0415
    from cer.actors.pool import PoolSettings  # noqa: PLC0415
    from cer.daemon import Settings, run  # noqa: PLC0415
    from cer.logs import setup_logging  # noqa: PLC0415

    debug = debug or context.obj["debug"]
    setup_logging(debug)
    if os.geteuid() != 0:
        raise click.ClickException("cer start needs root: it creates namespaces and mounts")
    root = os.path.abspath(root)
    if http_port is None and (http_address is not None or http_allow_remote or http_unauthenticated_updates):
        raise click.UsageError("--http-address, --http-allow-remote and --http-unauthenticated-updates need --http-port")
    try:
        config = load_config(config_path or os.path.join(root, CONFIG_NAME))
        settings = Settings(
            root=root,
            endpoint=endpoint or default_endpoint(root),
            debug=debug,
            workers=workers,
            pool_threads=pool_threads,
            pool=PoolSettings(cold_timeout=cold_timeout, lease_timeout=lease_timeout),
            curve_keys=curve_keys,
            insecure_tcp=insecure_tcp,
            containerd_address=containerd_address,
            containerd_timeout=containerd_timeout,
            legacy_socket=legacy_socket,
            legacy_timeout=legacy_timeout,
            http_port=http_port,
            http_address=http_address or "127.0.0.1",
            http_allow_remote=http_allow_remote,
            http_unauthenticated_updates=http_unauthenticated_updates,
            lazy=LazySettings(deadline=lazy_deadline, spares=lazy_spares, criu=criu, max_servers=lazy_max_servers,
                              max_per_checkpoint=lazy_max_per_checkpoint, server=lazy_server),
            prefill_budget=prefill_budget,
        )
        run(config, settings)
    except CerError as error:
        raise click.ClickException(str(error)) from None


@main.group()
def ns() -> None:
    """Take, give back and size pooled namespaces."""


@ns.command("get")
@_endpoint_option
@click.argument("namespace_type", type=NAMESPACE_TYPE)
@_ref_options
@click.option("--extra", "extra", multiple=True, help="Another checkpoint sharing the namespace (repeatable).")
def ns_get(endpoint, curve_keys, timeout, namespace_type, checkpoint, namespace, extra) -> None:
    """Take a namespace of NAMESPACE_TYPE for CHECKPOINT; prints the reply as JSON."""
    from cer.protocol.methods import NamespaceGet  # noqa: PLC0415

    extra_refs = tuple(_ref(name, namespace) for name in extra)
    _print_json(_call(endpoint, timeout, curve_keys, NamespaceGet(namespace_type, _ref(checkpoint, namespace), extra_refs)))


@ns.command("put")
@_endpoint_option
@click.argument("namespace_type", type=NAMESPACE_TYPE)
@click.argument("namespace_id", type=click.IntRange(0))
@click.option("--pid", type=click.IntRange(1), help="The daemon pid that handed it out.")
def ns_put(endpoint, curve_keys, timeout, namespace_type, namespace_id, pid) -> None:
    """Give back namespace NAMESPACE_ID of NAMESPACE_TYPE."""
    from cer.protocol.methods import NamespacePut  # noqa: PLC0415

    _call(endpoint, timeout, curve_keys, NamespacePut(namespace_type, namespace_id, pid))


@ns.command("update")
@_endpoint_option
@_ref_options
@click.argument("capacity", type=click.IntRange(0, MAX_CAPACITY))
def ns_update(endpoint, curve_keys, timeout, checkpoint, namespace, capacity) -> None:
    """Keep CAPACITY idle namespaces of each type for CHECKPOINT."""
    from cer.protocol.methods import NamespaceUpdate  # noqa: PLC0415

    _print_json(_call(endpoint, timeout, curve_keys, NamespaceUpdate(_ref(checkpoint, namespace), capacity)))


@main.group()
def checkpoint() -> None:
    """Get and release checkpoint image directories."""


@checkpoint.command("get")
@_endpoint_option
@_ref_options
def checkpoint_get(endpoint, curve_keys, timeout, checkpoint, namespace) -> None:
    """Print the directory of CHECKPOINT's CRIU images."""
    from cer.protocol.methods import CheckpointGet  # noqa: PLC0415

    click.echo(_call(endpoint, timeout, curve_keys, CheckpointGet(_ref(checkpoint, namespace)))["path"])


@checkpoint.command("put")
@_endpoint_option
@_ref_options
def checkpoint_put(endpoint, curve_keys, timeout, checkpoint, namespace) -> None:
    """Release one get of CHECKPOINT's directory."""
    from cer.protocol.methods import CheckpointPut  # noqa: PLC0415

    _call(endpoint, timeout, curve_keys, CheckpointPut(_ref(checkpoint, namespace)))


@checkpoint.command("lazy")
@_endpoint_option
@_ref_options
@click.option("--holder-pid", type=click.IntRange(1), help="Stop the server when this process exits before a restore reached it.")
def checkpoint_lazy(endpoint, curve_keys, timeout, checkpoint, namespace, holder_pid) -> None:
    """Start a lazy-pages server for one lazy restore of CHECKPOINT; print where the restore finds it."""
    from cer.protocol.methods import CheckpointLazy  # noqa: PLC0415

    _print_json(_call(endpoint, timeout, curve_keys, CheckpointLazy(_ref(checkpoint, namespace), holder_pid)))


@checkpoint.command("forget-working-set")
@_endpoint_option
@_ref_options
def checkpoint_forget_working_set(endpoint, curve_keys, timeout, checkpoint, namespace) -> None:
    """Forget the working set recorded for CHECKPOINT's lazy restores: the next one records it anew."""
    from cer.protocol.methods import CheckpointLazyForget  # noqa: PLC0415

    forgotten = _call(endpoint, timeout, curve_keys, CheckpointLazyForget(_ref(checkpoint, namespace)))["forgotten"]
    click.echo("forgotten" if forgotten else "no working set was recorded")


@main.command()
@_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole status as JSON.")
@click.option("--watch", type=click.FloatRange(0.2), is_flag=False, flag_value=2.0, default=None,
              help="Refresh every SECONDS (2 if not given) until interrupted.")
def status(endpoint, curve_keys, timeout, as_json, watch) -> None:
    """Show every pool: its state and, per type, target, idle, in use, gets and build time."""
    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from cer.protocol.methods import AdminStatus  # noqa: PLC0415

    reply = _call(endpoint, timeout, curve_keys, AdminStatus())
    if as_json:
        _print_json(reply)
        return
    # Off a terminal (a pipe, a log) rich would wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=240)
    if watch is None:
        console.print(_status_table(reply))
        return
    with Live(_status_table(reply), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(_status_table(_call(endpoint, timeout, curve_keys, AdminStatus())), refresh=True)
        except KeyboardInterrupt:
            pass


def _status_table(reply: dict):
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"cer {reply['version']}, pid {reply['pid']}, up {reply['uptime_seconds']:.0f} s",
                  title_justify="left", box=None, header_style="bold")
    for column in ("CHECKPOINT", "STATE", "TYPE", "TARGET", "IDLE", "IN USE", "BOUND", "OVERDUE", "BUILDING",
                   "WARM", "COLD", "BUILD MS", "LAST ERROR"):
        table.add_column(column, justify="left" if column in ("CHECKPOINT", "STATE", "TYPE", "LAST ERROR") else "right")
    styles = {"ready": "green", "loading": "yellow", "failing": "yellow", "unavailable": "yellow"}
    for pool in reply["pools"]:
        name = f"{pool['ref']['labels']['namespace']}/{pool['ref']['name']}"
        state = f"[{styles.get(pool['state'], 'red')}]{pool['state']}[/]"
        error = pool.get("last_error") or ""
        types = pool.get("types") or {"-": None}
        for ns_type, counts in types.items():
            if counts is None or not counts["supported"]:
                table.add_row(name, state, ns_type, *["-"] * 9, error)
                continue
            target = str(counts["target"]) + (f"/{pool['max_capacity']}" if pool.get("max_capacity") else "")
            build = counts["last_build_seconds"]
            table.add_row(
                name, state, ns_type, target, *(str(counts[key]) for key in ("idle", "in_use", "bound", "overdue", "building", "warm_gets", "cold_gets")),
                "-" if build is None else f"{build * 1000:.1f}", error,
            )
    parts = [table]
    lazy = reply.get("lazy")
    if lazy and (lazy["servers"] or lazy.get("working_sets")):
        parts.append(_lazy_table(lazy))
    failures = reply.get("message_failures")
    if failures:
        # Messages nobody waited for whose handler failed: each is in the log at ERROR too.
        failed = Table(title="failed messages (see the log)", title_justify="left", box=None, header_style="bold red")
        for column in ("ACTOR", "MESSAGE", "COUNT", "LAST ERROR"):
            failed.add_column(column, justify="right" if column == "COUNT" else "left")
        for failure in failures:
            failed.add_row(failure["actor"], failure["message"], str(failure["count"]), failure["last_error"])
        parts.append(failed)
    if len(parts) == 1:
        return table
    from rich.console import Group  # noqa: PLC0415

    return Group(*parts)


def _lazy_table(lazy: dict):
    """Lazy-pages servers, then the checkpoints with a recorded working set."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"lazy-pages servers ({lazy.get('server', 'criu')})", title_justify="left", box=None,
                  header_style="bold")
    for column in ("CHECKPOINT", "SERVER", "STATE", "PID", "RESTORED PID", "AGE S", "DEADLINE S", "WORKING SET"):
        table.add_column(column, justify="left" if column in ("CHECKPOINT", "SERVER", "STATE", "WORKING SET") else "right")
    sets = lazy.get("working_sets") or {}

    def described(ref: str) -> str:
        found = sets.get(ref)
        return "-" if found is None else f"{found['pages']} pages ({found['bytes'] / 2**20:.1f} MiB)"

    shown = set()
    for server in lazy["servers"]:
        shown.add(server["ref"])
        table.add_row(server["ref"], server["server_id"], server["state"], str(server["pid"] or "-"),
                      str(server["restored_pid"] or "-"), f"{server['age_seconds']:.1f}",
                      f"{server['deadline_in_seconds']:.0f}", described(server["ref"]))
    for ref in sorted(set(sets) - shown):
        table.add_row(ref, "-", "-", "-", "-", "-", "-", described(ref))
    return table


@main.command()
@_endpoint_option
def reload(endpoint, curve_keys, timeout) -> None:
    """Make the daemon read its configuration file again (as SIGHUP does); prints what changed."""
    from cer.protocol.methods import AdminReload  # noqa: PLC0415

    _print_json(_call(endpoint, timeout, curve_keys, AdminReload()))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
def keys(directory) -> None:
    """Make a CURVE keys DIRECTORY: the daemon's key pair and one authorized client key pair."""
    from cer.protocol.security import make_keys  # noqa: PLC0415

    make_keys(directory)
    click.echo(f"{directory}: server.key_secret for `cer start --curve-keys`; copy server.key and client.key_secret to clients")
