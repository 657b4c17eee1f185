"""Fixtures the contrib tests share: a private runc state root and a private work directory for the wrapper."""

import os
import subprocess

import pytest
from conftest import short_tempdir

import runc_support


@pytest.fixture
def private_runc():
    """A private runc state root for restored containers; every container in it is deleted afterwards."""
    with runc_support.private_runc() as runc:
        yield runc


@pytest.fixture
def wrapper_work():
    """Where ctr-wrapper puts its work directories ($CER_WRAPPER_WORKDIR): a killed wrapper cannot remove
    its own; removed afterwards."""
    path = short_tempdir("cer-wrapper-work-")
    os.environ["CER_WRAPPER_WORKDIR"] = str(path)
    yield path
    del os.environ["CER_WRAPPER_WORKDIR"]
    subprocess.run(["rm", "-rf", str(path)], timeout=60)
