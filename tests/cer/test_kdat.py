"""CRIU's kernel probe cache, put in place by the daemon on a host whose /run is no tmpfs (CRIU then keeps
none itself and probes the kernel at every run)."""

import os
import subprocess

import pytest

from conftest import sample_config, start_daemon

from cer import kdat

CACHE = os.path.join(kdat.RUN, kdat.CACHE_NAME)
pytestmark = pytest.mark.skipif(kdat.run_is_tmpfs(), reason="/run is a tmpfs here: CRIU keeps its cache itself")


@pytest.fixture
def no_cache():
    """No cache before or after the test (a cache left by something else is kept aside and put back)."""
    kept = None
    if os.path.exists(CACHE):
        with open(CACHE, "rb") as file:
            kept = file.read()
        os.unlink(CACHE)
    yield
    if os.path.exists(CACHE):
        os.unlink(CACHE)
    if kept is not None:
        with open(CACHE, "wb") as file:
            file.write(kept)


def criu_loads_a_cache(tmp_path) -> bool:
    log = tmp_path / "check.log"
    subprocess.run(["criu", "check", "-v4", "-o", str(log)], capture_output=True, timeout=60, check=False)
    return "Loaded kdat cache" in log.read_text()


@pytest.mark.timeout(60)
def test_a_cache_that_criu_loads_exists_while_the_daemon_runs_and_goes_with_it(tmp_path, no_cache):
    assert not criu_loads_a_cache(tmp_path)  # the host alone: CRIU probes every time
    daemon = start_daemon(sample_config())
    try:
        assert os.stat(CACHE).st_mode & 0o777 == 0o600
        assert criu_loads_a_cache(tmp_path)
        assert daemon.status()["lazy"]["criu_kdat_cached"] is True
        assert not [name for name in os.listdir(kdat.RUN) if name.startswith(".cer-")]
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert not os.path.exists(CACHE)


@pytest.mark.timeout(60)
def test_a_cache_replaced_meanwhile_is_left_alone(no_cache):
    cache = kdat.prepare("criu")
    assert cache is not None and os.path.getsize(CACHE) > 0
    with open(CACHE, "wb") as file:
        file.write(b"another CRIU's cache")
    cache.remove()
    with open(CACHE, "rb") as file:
        assert file.read() == b"another CRIU's cache"


@pytest.mark.timeout(30)
def test_without_criu_there_is_no_cache_and_no_error(no_cache):
    assert kdat.prepare("no-such-criu") is None
    assert not os.path.exists(CACHE)
