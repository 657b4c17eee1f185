"""Method definitions: what clients send parses back to the same method, and the docs cover them all."""

import re
from pathlib import Path

import pytest

from cer.errors import BadRequest, UnknownMethod
from cer.protocol.methods import (
    METHODS,
    AdminReload,
    AdminStatus,
    NamespaceBind,
    CheckpointGet,
    CheckpointLazy,
    CheckpointLazyBind,
    CheckpointLazyPut,
    CheckpointPut,
    CheckpointRestore,
    NamespaceGet,
    NamespacePut,
    NamespaceUpdate,
    find_method,
)
from cer.protocol.wire import decode_request, encode_request
from cer.references import CheckpointRef

EXAMPLES = [
    NamespaceGet("ipc", CheckpointRef("a"), (CheckpointRef("b", "k8s.io"),)),
    NamespaceGet("mnt", CheckpointRef("docker.io/library/x:1")),
    NamespacePut("uts", 1030, 77),
    NamespacePut("uts", 1030),
    NamespaceBind("mnt", 1031, 4242),
    NamespaceUpdate(CheckpointRef("a"), 0),
    CheckpointGet(CheckpointRef("a")),
    CheckpointPut(CheckpointRef("a", "n")),
    AdminStatus(),
    AdminReload(),
    NamespaceGet("uts", CheckpointRef("a"), holder_pid=7),
    CheckpointLazy(CheckpointRef("a", "k8s.io"), holder_pid=7),
    CheckpointLazy(CheckpointRef("a")),
    CheckpointLazyBind("4242-1", 77),
    CheckpointLazyPut("4242-1"),
    CheckpointGet(CheckpointRef("a"), ("ipc",)),
    CheckpointRestore(CheckpointRef("a"), ("ipc", "mnt", "uts"), 7),
    CheckpointRestore(None, (), 7, "sha256:" + "0" * 64),
    CheckpointRestore(CheckpointRef("a", "k8s.io"), ("uts",), 7, "sha256:" + "f" * 64),
]


@pytest.mark.parametrize("method", EXAMPLES, ids=repr)
def test_what_a_client_sends_parses_back_to_the_same_method(method):
    service, name, params = decode_request([encode_request(method.service, method.name, method.params())])
    assert find_method(service, name).parse(params) == method


def test_every_method_is_documented_with_its_params():
    readme = (Path(__file__).parents[2] / "protocol" / "README.md").read_text()
    documented = set(re.findall(r"^### `(\w+)\.(\w+)`", readme, re.MULTILINE))
    assert documented == set(METHODS)
    for method in EXAMPLES:
        section = readme.split(f"### `{method.service}.{method.name}`")[1].split("\n### ")[0]
        for field in method.params():
            assert f'"{field}"' in section, f"{method.service}.{method.name} does not document {field}"


def test_unknown_methods_and_params_are_refused():
    with pytest.raises(UnknownMethod):
        find_method("namespace", "delete")
    with pytest.raises(BadRequest, match="params has unknown fields: colour"):
        AdminStatus.parse({"colour": "red"})
    with pytest.raises(BadRequest, match="namespace_type must be one of"):
        NamespaceGet.parse({"namespace_type": "pid", "ref": {"name": "a"}})
    with pytest.raises(BadRequest, match="extra_refs"):
        NamespaceGet.parse({"namespace_type": "ipc", "ref": {"name": "a"}, "extra_refs": [{"name": "b"}] * 65})
