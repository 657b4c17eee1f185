"""The configuration file: the original's format loads unchanged, and every mistake is named."""

import json
import os
import subprocess
import sys

import pytest
from conftest import SAMPLE, short_tempdir

from cer.config import load_config
from cer.errors import ConfigError
from cer.references import CheckpointRef


def write(tmp_path, content) -> str:
    path = tmp_path / "namespace_service.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_the_original_config_loads_unchanged(tmp_path):
    path = write(tmp_path, '{"containerd_checkpoints":[{"name":"CKPT","namespace":"default"}],"default_capacity":10}')
    config = load_config(path)
    assert config.default_capacity == 10
    (entry,) = config.checkpoints
    assert entry.ref == CheckpointRef("CKPT", "default")
    assert (entry.capacity, entry.path, entry.rootfs) == (10, None, None)


def test_namespace_and_capacity_have_defaults(tmp_path):
    path = write(tmp_path, {"containerd_checkpoints": [{"name": "A", "capacity": 3}, {"name": "B"}], "default_capacity": 7})
    a, b = load_config(path).checkpoints
    assert (a.ref.namespace, a.capacity, b.capacity) == ("default", 3, 7)


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    (tmp_path / "images").symlink_to(SAMPLE / "checkpoint")
    (tmp_path / "fs").mkdir()
    path = write(tmp_path, {"containerd_checkpoints": [{"name": "A", "path": "images", "rootfs": "fs"}]})
    (entry,) = load_config(path).checkpoints
    assert entry.path == str(SAMPLE / "checkpoint")
    assert entry.rootfs == str(tmp_path / "fs")


BAD = {
    "non-positive capacity": ({"containerd_checkpoints": [{"name": "A", "capacity": 0}]}, "containerd_checkpoints[0] ('A'): capacity must be between 1"),
    "negative default": ({"default_capacity": -1}, "default_capacity must be between 1"),
    "capacity a string": ({"containerd_checkpoints": [{"name": "A", "capacity": "3"}]}, "capacity must be a whole number"),
    "missing name": ({"containerd_checkpoints": [{"namespace": "default"}]}, "containerd_checkpoints[0]: the entry has no name"),
    "empty name": ({"containerd_checkpoints": [{"name": ""}]}, "name must be a non-empty string"),
    "bad namespace": ({"containerd_checkpoints": [{"name": "A", "namespace": "a/b"}]}, "not a valid containerd namespace"),
    "duplicate": ({"containerd_checkpoints": [{"name": "A"}, {"name": "A", "namespace": "default"}]}, "containerd_checkpoints[1] ('A'): duplicate of containerd_checkpoints[0]"),
    "unknown entry field": ({"containerd_checkpoints": [{"name": "A", "capacty": 3}]}, "the entry has unknown fields: capacty"),
    "entry not an object": ({"containerd_checkpoints": ["A"]}, "an entry must be an object"),
    "list not a list": ({"containerd_checkpoints": {"name": "A"}}, "containerd_checkpoints must be a list"),
    "top not an object": ([], "must be a JSON object"),
    "path missing": ({"containerd_checkpoints": [{"name": "A", "path": "/nonexistent/dir"}]}, "path /nonexistent/dir is not a directory"),
    "path not images": ({"containerd_checkpoints": [{"name": "A", "path": "/etc"}]}, "path /etc is not a CRIU image directory"),
    "max below capacity": ({"containerd_checkpoints": [{"name": "A", "capacity": 5, "max_capacity": 2}]}, "max_capacity 2 is below capacity 5"),
    "rootfs without path": ({"containerd_checkpoints": [{"name": "A", "rootfs": "/tmp"}]}, "rootfs goes with path"),
    "too many": ({"containerd_checkpoints": [{"name": f"c{i}"} for i in range(257)]}, "257 checkpoints; at most 256 are served"),
    "rootfs a file": ({"containerd_checkpoints": [{"name": "A", "path": str(SAMPLE / "checkpoint"), "rootfs": "/etc/hostname"}]}, "is not a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_the_file_the_entry_and_the_problem(tmp_path, case):
    content, message = BAD[case]
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_invalid_json_names_its_line(tmp_path):
    path = write(tmp_path, '{\n  "default_capacity": 3,\n  "containerd_checkpoints": [\n    {"name": "A",}\n  ]\n}')
    with pytest.raises(ConfigError, match=r"the configuration is not JSON: .* at line 4, column"):
        load_config(path)


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))


def test_cer_start_with_bad_config_fails_before_creating_anything():
    base = short_tempdir()
    config = base / "bad.json"
    config.write_text('{"containerd_checkpoints":[{"name":"A","capacity":0}]}')
    root = base / "root"
    result = subprocess.run(
        [sys.executable, "-m", "cer", "start", "--root", str(root), "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert f"{config}: containerd_checkpoints[0] ('A'): capacity must be between 1" in result.stderr
    assert not os.path.exists(root)
