"""Fixtures for the mount namespace tests: real runc + CRIU 4 checkpoints of tests/mounts/mount-workload.c.

Tests that need runc, CRIU 4 or gcc fail (never skip) when they are missing: CI installs them with
contrib/install-deps.
"""

import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import mounts_support  # noqa: E402

from cer.pooled_namespaces import Namespace, Recipe, build, destroy  # noqa: E402


def _checkpoint(tmp_path_factory, name: str, host_bind: bool) -> mounts_support.ContainerCheckpoint:
    try:
        mounts_support.require()
    except mounts_support.MountSupportError as error:
        pytest.fail(str(error))
    directory = Path(tmp_path_factory.mktemp(name, numbered=True))
    return mounts_support.make_container_checkpoint(directory, host_bind=host_bind)


@pytest.fixture(scope="session")
def container_checkpoint(tmp_path_factory) -> mounts_support.ContainerCheckpoint:
    """A runc container with a read-only bind of a host directory at /data, checkpointed by CRIU 4."""
    return _checkpoint(tmp_path_factory, "runc-bind", host_bind=True)


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory) -> mounts_support.ContainerCheckpoint:
    """The same container without the host bind: every mount cer can make needs nothing from a config."""
    return _checkpoint(tmp_path_factory, "runc-plain", host_bind=False)


class Built:
    """Mount namespaces built like the factory builds them (a thread each), torn down at the end."""

    def __init__(self, bundles: Path) -> None:
        self.bundles = bundles
        self.live: list[Namespace] = []
        self.serial = 0

    def build(self, recipe: Recipe) -> Namespace:
        self.serial += 1
        result: dict = {}
        bundle = str(self.bundles / str(self.serial))

        def create() -> None:
            try:
                result["namespace"] = build("mnt", recipe, bundle, 2048)
            except BaseException as error:  # noqa: BLE001 - handed to the test (build removed the bundle)
                result["error"] = error

        thread = threading.Thread(target=create)
        thread.start()
        thread.join(30)
        if "error" in result:
            raise result["error"]
        self.live.append(result["namespace"])
        return result["namespace"]

    def destroy(self, namespace: Namespace) -> None:
        self.live.remove(namespace)
        errors: list[BaseException] = []

        def tear_down() -> None:
            try:
                destroy(namespace)
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        thread = threading.Thread(target=tear_down)
        thread.start()
        thread.join(30)
        if errors:
            raise errors[0]


@pytest.fixture
def built():
    """``built.build(recipe)`` / ``built.destroy(namespace)`` with bundles under ``built.bundles``; what a test
    leaves is destroyed after it."""
    root = Path(tempfile.mkdtemp(prefix="cer-mnt-", dir="/tmp"))
    bundles = root / "bundles"
    bundles.mkdir()
    keeper = Built(bundles)
    try:
        yield keeper
    finally:
        for namespace in list(keeper.live):
            keeper.destroy(namespace)
        shutil.rmtree(root, ignore_errors=True)
