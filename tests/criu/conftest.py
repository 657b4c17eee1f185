"""Fixtures for the CRIU image reader's tests: checkpoints to read, and crit to check against.

Tests that need CRIU or crit fail (never skip) when they are missing: CI installs them with
contrib/install-deps.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402


SAMPLE_CHECKPOINTS = {
    "sample": criu_support.SAMPLE_DIR / "checkpoint",
    "empty-ipc": criu_support.SAMPLE_DIR / "checkpoint-empty-ipc",
}


@pytest.fixture(scope="session")
def crit():
    """``decode(path)``: the image as Debian's ``crit decode -i PATH`` prints it (JSON, not pretty).

    crit is an independent decoder (pycriu's own descriptors and framing). Its ipc_shm handler
    predates in_pagemaps and garbles CRIU 4's ipcns-shm images: use ``decode_patched`` for those.
    """
    path = shutil.which("crit")
    if path is None:
        pytest.fail("crit is not installed (Debian package criu): run contrib/install-deps")

    def decode(image: Path) -> dict:
        result = subprocess.run([path, "decode", "-i", str(image)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"crit decode -i {image} failed:\n{result.stderr}"
        return json.loads(result.stdout)

    return decode


@pytest.fixture(scope="session")
def crit_encode():
    """``encode(image_dict, path)``: write an image the way ``crit encode`` does (pycriu's writer,
    its payload padding included)."""
    path = shutil.which("crit")
    if path is None:
        pytest.fail("crit is not installed (Debian package criu): run contrib/install-deps")

    def encode(image: dict, target: Path) -> Path:
        result = subprocess.run([path, "encode", "-o", str(target)], input=json.dumps(image),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"crit encode failed:\n{result.stderr}"
        return target

    return encode


@pytest.fixture(scope="session")
def decode_patched():
    """``decode(path)`` through contrib/install-deps' pycriu copy, whose ipc_shm handler knows
    in_pagemaps (otherwise the same decoder as crit)."""
    try:
        criu_support.decode_image(SAMPLE_CHECKPOINTS["sample"] / "inventory.img")
    except ImportError as e:
        pytest.fail(f"pycriu is not importable ({e}): run contrib/install-deps")
    return criu_support.decode_image


@pytest.fixture(scope="session")
def pycriu_pb():
    """pycriu's generated messages (CRIU's own .proto files, compiled by Debian)."""
    try:
        criu_support._pycriu()
        import pycriu.images.pb as pb
    except ImportError as e:
        pytest.fail(f"pycriu is not importable ({e}): run contrib/install-deps")
    return pb


@pytest.fixture(scope="session")
def live_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the sample workload dumped by CRIU 4 during this test run."""
    if criu_support.criu_binary() is None:
        pytest.fail("no working CRIU 4 at /usr/local/sbin/criu: run contrib/install-deps")
    directory = tmp_path_factory.mktemp("live-checkpoint")
    criu_support.dump_live_workload(directory, hostname="cer-live", domainname="live.example")
    return directory


@pytest.fixture(params=["sample", "empty-ipc", "live"])
def checkpoint_dir(request) -> Path:
    """Each checkpoint there is to read: the two shipped samples and a live dump."""
    if request.param == "live":
        return request.getfixturevalue("live_checkpoint")
    return SAMPLE_CHECKPOINTS[request.param]


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A writable copy of the sample checkpoint, to damage or rearrange."""
    target = tmp_path / "checkpoint"
    shutil.copytree(SAMPLE_CHECKPOINTS["sample"], target)
    return target


image_bytes = criu_support.image_bytes


@pytest.fixture
def make_image():
    """``make(path, image_type, entries)``: write an image (see ``image_bytes``)."""

    def make(path: Path, image_type, entries) -> Path:
        path.write_bytes(image_bytes(image_type.magic, entries, common_magic=image_type.common_magic))
        return path

    return make
