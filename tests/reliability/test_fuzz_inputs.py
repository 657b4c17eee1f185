"""Random damage to CRIU images and random configuration files: a clear error or a result, nothing else.

Counts of inputs tried are printed (run with -s) and recorded in docs/reliability.md.
"""

import json
import shutil
import struct
import time

import pytest
from conftest import SAMPLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cer.config import load_config
from cer.criu.checkpoint import read_checkpoint
from cer.errors import ConfigError, ImageError

IMAGES = sorted(path.name for path in (SAMPLE / "checkpoint").glob("*.img"))
tried = {"images": 0, "configs": 0}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\ninputs tried: {tried}")


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("damaged")


def mutate(data: bytes, kind: str, where: int, value: int) -> bytes:
    where = where % max(len(data), 1)
    if kind == "truncate":
        return data[:where]
    if kind == "flip":
        return data[:where] + bytes([data[where] ^ (value & 0xFF or 1)]) + data[where + 1 :] if data else data
    if kind == "huge-length":
        # A size prefix claiming far more than the file holds, where an entry length would sit.
        return data[:where] + struct.pack("<I", 0xFFFFFFF0 - (value & 0xFF)) + data[where + 4 :]
    return data[:where] + bytes(value & 0xFF for _ in range(64)) + data[where:]  # "insert"


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(IMAGES),
    kind=st.sampled_from(["truncate", "flip", "huge-length", "insert"]),
    where=st.integers(min_value=0, max_value=1 << 22),
    value=st.integers(min_value=0, max_value=1 << 16),
)
def test_damaged_images_give_an_image_error_or_a_checkpoint(damaged_dir, name, kind, where, value):
    tried["images"] += 1
    target = damaged_dir / "ckpt"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(SAMPLE / "checkpoint", target)
    image = target / name
    image.write_bytes(mutate(image.read_bytes(), kind, where, value))
    started = time.monotonic()
    try:
        read_checkpoint(target)
    except ImageError as error:
        assert error.path.startswith(str(target)) and error.offset >= 0
    assert time.monotonic() - started < 5


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=30) | JSON,
        "namespace": st.sampled_from(["default", "k8s.io", "../x", ""]) | JSON,
        "capacity": st.integers(min_value=-3, max_value=2000) | JSON,
        "max_capacity": st.integers(min_value=-3, max_value=2000) | JSON,
        "path": st.sampled_from([str(SAMPLE / "checkpoint"), "/etc", "/nonexistent", "", "checkpoint\0"]) | JSON,
        "rootfs": st.sampled_from([str(SAMPLE / "rootfs"), "/a:b", "/tmp", ""]) | JSON,
    },
)
CONFIGS = st.one_of(
    st.fixed_dictionaries({}, optional={"containerd_checkpoints": st.lists(ENTRY | JSON, max_size=4) | JSON,
                                         "default_capacity": st.integers(min_value=-2, max_value=2000) | JSON}).map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=200),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(CONFIGS)
def test_random_configuration_files_load_or_fail_with_a_config_error(tmp_path_factory, text):
    tried["configs"] += 1
    path = tmp_path_factory.getbasetemp() / "fuzz-config.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        config = load_config(str(path))
    except ConfigError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert all(1 <= entry.capacity <= 1000 for entry in config.checkpoints)
