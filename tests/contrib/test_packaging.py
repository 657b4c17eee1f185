"""The files that run cer on hosts and clusters: the systemd unit (checked by systemd-analyze), the
Kubernetes manifests (checked against the Kubernetes schemas that kubernetes-validate bundles, offline),
the containerd runtime handler behind the RuntimeClass (checked by containerd's own config parser), and the
daemon's side of Type=notify (READY=1 and STOPPING=1 through $NOTIFY_SOCKET)."""

import configparser
import json
import shlex
import shutil
import signal
import socket
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, sample_config, short_tempdir, start_daemon

from cer.cli import main
from cer.config import load_config
from cer.protocol.client import Client
from cer.protocol.methods import AdminStatus

UNIT = REPO / "contrib" / "systemd" / "cer.service"
KUBERNETES = REPO / "contrib" / "kubernetes"
CONTAINERD_SNIPPET = KUBERNETES / "containerd-cer-runc.toml"
# The oldest and the newest Kubernetes whose schemas the validator bundles.
KUBERNETES_VERSIONS = [kubernetes_validate.utils.all_versions()[0], kubernetes_validate.utils.latest_version()]


# --- systemd ------------------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


def parses(command: str, argv: list[str]) -> None:
    """Fail unless ``cer COMMAND ARGV`` is accepted by the CLI (parsed, not run)."""
    main.commands[command].make_context(command, list(argv))


def test_the_unit_is_a_notify_service_restarted_on_failure_after_containerd():
    service = unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert "containerd.service" in unit()["Unit"]["After"].split()
    assert "containerd.service" in unit()["Unit"]["Wants"].split()
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == ["/usr/local/bin/cer", "start"]
    parses("start", argv[2:])
    # The state directory systemd makes is the daemon's ROOT, root's alone.
    assert argv[argv.index("--root") + 1] == f"/var/lib/{service['StateDirectory']}"
    assert service["StateDirectoryMode"] == "0700"
    # cer makes exactly these namespaces; options that would give the service a mount namespace of its own
    # (which every pooled mount namespace would copy) or forbid sethostname stay out.
    assert service["RestrictNamespaces"].split() == ["ipc", "uts", "mnt"]
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectHostname",
                   "ProtectKernelTunables", "ProtectKernelModules", "ReadOnlyPaths", "ProtectProc"):
        assert option not in service, option
    dropped = service["CapabilityBoundingSet"].removeprefix("~").split()
    assert "CAP_SYS_ADMIN" not in dropped and "CAP_SYS_MODULE" in dropped


@pytest.mark.timeout(60)
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    cer = shutil.which("cer")
    assert cer, "the cer command is not installed"
    # verify checks that ExecStart's program exists: point it at this machine's cer.
    copy = tmp_path / "cer.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/cer", cer))
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=50)
    # verify exits 0 on unknown keys and bad values, but names them: any output is a finding.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr

    broken = tmp_path / "broken.service"
    broken.write_text(copy.read_text().replace("Restart=on-failure", "Restart=onfailure"))
    result = subprocess.run([analyze, "verify", "--man=no", str(broken)], capture_output=True, text=True, timeout=50)
    assert "onfailure" in result.stdout + result.stderr  # the check above would see a mistake


# --- sd_notify -------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_comes_once_every_socket_answers_and_stopping_at_shutdown(monkeypatch, abstract):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"cer-test-notify-{id(notify)}"
        notify.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = short_tempdir() / "notify"
        notify.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notify.settimeout(30)
    running = start_daemon(sample_config(), "--legacy-socket", wait=False)
    try:
        messages = [notify.recv(4096).decode()]
        # READY=1 promises that requests are answered now, on both sockets, without retrying.
        assert messages == ["READY=1"], running.output()
        with Client(running.endpoint, timeout=2) as client:
            assert client.call(AdminStatus())["pid"] == running.process.pid
        legacy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        legacy.connect(str(running.root / "daemon.socket"))
        legacy.close()
        running.process.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode() == "STOPPING=1", running.output()
        assert running.process.wait(30) == 0, running.output()
    finally:
        running.stop()
        notify.close()


@pytest.mark.timeout(60)
def test_an_unreachable_notify_socket_is_a_warning_not_a_failure(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tempdir() / "nobody-listens"))
    running = start_daemon(sample_config())
    assert running.stop() == 0, running.output()
    assert "cannot tell systemd READY=1" in running.output()


# --- Kubernetes ------------------------------------------------------------------------------------------


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc] for path in sorted(KUBERNETES.glob("*.yaml"))}


def resources() -> list[dict]:
    return [doc for name, docs in manifests().items() if name != "kustomization.yaml" for doc in docs]


def the(kind: str) -> dict:
    (found,) = [doc for doc in resources() if doc["kind"] == kind]
    return found


def test_kustomization_lists_every_manifest():
    (kustomization,) = manifests()["kustomization.yaml"]
    assert sorted(kustomization["resources"]) == sorted(name for name in manifests() if name != "kustomization.yaml")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly_against_the_kubernetes_schemas(version):
    kinds = []
    for document in resources():
        # validate() raises SchemaNotFoundError for an unknown kind; the CLI would only warn.
        kubernetes_validate.validate(document, version, strict=True)
        kinds.append(document["kind"])
    assert sorted(kinds) == ["ConfigMap", "DaemonSet", "Namespace", "RuntimeClass"]


def test_the_validator_works_offline_and_catches_mistakes():
    # Schemas come from the package itself; a misspelt field is refused, so a pass above means something.
    daemonset = the("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = daemonset["spec"]["template"]["spec"].pop("hostPID")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_daemonset_runs_cer_privileged_in_the_hosts_pid_namespace_with_the_hosts_paths():
    daemonset = the("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    command = container["command"]
    assert command[:2] == ["cer", "start"]
    parses("start", command[2:])
    options = dict(argument.split("=", 1) for argument in command[2:])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    # ROOT, containerd's socket and its snapshots sit at the node's own paths.
    assert volumes["root"]["hostPath"]["path"] == mounts["root"] == options["--root"] == "/var/lib/cermanager"
    socket_dir = str(Path(options["--containerd-address"]).parent)
    assert volumes["containerd-run"]["hostPath"]["path"] == mounts["containerd-run"] == socket_dir
    assert volumes["containerd-root"]["hostPath"]["path"] == mounts["containerd-root"] == "/var/lib/containerd"
    # The config comes from the ConfigMap.
    config_map = the("ConfigMap")
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    config_dir, config_name = options["--config"].rsplit("/", 1)
    assert mounts["config"] == config_dir and config_name in config_map["data"]
    assert {doc["metadata"]["namespace"] for doc in (daemonset, config_map)} == {the("Namespace")["metadata"]["name"]}
    assert the("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_configmaps_config_is_one_cer_accepts(tmp_path):
    (name, text), = the("ConfigMap")["data"].items()
    path = tmp_path / name
    path.write_text(text)
    config = load_config(str(path))
    assert config.checkpoints and all(entry.path is None for entry in config.checkpoints)  # from containerd
    assert json.loads(text)["default_capacity"] > 0


@pytest.mark.timeout(60)
def test_the_readiness_probe_passes_on_a_serving_daemon_and_fails_without_one(daemon):
    probe = the("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["cer", "status"]
    parses("status", probe[2:])
    assert "--endpoint=ipc:///var/lib/cermanager/daemon.sock" in probe
    here = [f"--endpoint={daemon.endpoint}" if argument.startswith("--endpoint=") else argument for argument in probe]
    assert subprocess.run(here, capture_output=True, timeout=30).returncode == 0
    daemon.stop()
    assert subprocess.run(here, capture_output=True, timeout=30).returncode != 0


def test_the_runtimeclass_selects_a_containerd_handler_whose_runc_is_cer_runc(tmp_path):
    """containerd itself reads the snippet: the handler the RuntimeClass names is runc's shim with cer-runc
    as BinaryName, and the binary it names is what contrib/ installs."""
    runtime_class = the("RuntimeClass")
    assert "namespace" not in runtime_class["metadata"]  # cluster-scoped
    containerd = shutil.which("containerd")
    assert containerd, "containerd is not installed (contrib/install-deps)"
    dump = subprocess.run([containerd, "--config", str(CONTAINERD_SNIPPET), "config", "dump"], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    runtimes = tomllib.loads(dump)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    handler = runtimes[runtime_class["handler"]]
    assert handler["runtime_type"] == "io.containerd.runc.v2"
    assert handler["options"]["BinaryName"] == "/usr/local/bin/cer-runc"
    assert (REPO / "contrib" / "cer-runc").exists() and (REPO / "contrib" / "cer-runc-restore").exists()


# --- the Python package ------------------------------------------------------------------------------


def test_every_package_directory_is_installed():
    """pyproject lists packages by hand (actors/ and protocol/ install as cer.actors and cer.protocol): a
    package left out would be missing from every installation but an editable one."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join((package, *init.parent.relative_to(REPO / folder).parts))
             for package, folder in setuptools["package-dir"].items() for init in (REPO / folder).rglob("__init__.py")}
    assert found == set(setuptools["packages"])
