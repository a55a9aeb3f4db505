"""Shared fixtures: where ../shared is, and skipping cleanly without it."""
import os

import numpy
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("NETLIB_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))

# NETLIB_TEST_XP=fakecupy: build layers, blobs and nets on a CPU stand-in for CuPy (tests/xp_mode.py).
pytest_plugins = ["xp_mode"]


def shared_path(*parts):
    """Path under ../shared; skips the calling test when it is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip("needs %s (the ../shared reference folder)" % path)
    return path


@pytest.fixture
def shared():
    return shared_path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running end-to-end test (still run by .ci/run)")


@pytest.fixture(params=["numpy", "numba"])
def engine(request):
    """Run the test twice: on the NumPy paths (netlib.accel off) and on the
    optional numba kernels (skipped when numba is not installed)."""
    from netlib import accel
    if request.param == "numba" and not accel.available():
        pytest.skip("numba is not installed (the optional accelerator)")
    old = accel.set_enabled(request.param == "numba", everywhere=True)
    yield request.param
    accel.set_enabled(old)


@pytest.fixture
def on_fake():
    """netlib's default array module is tests/fakecupy.py (no implicit NumPy) for this test."""
    import fakecupy
    from netlib import backend
    old = backend.default_xp()
    backend.set_mode_device(fakecupy)
    yield fakecupy
    if old is numpy:
        backend.set_mode_cpu()
    else:
        backend.set_mode_device(old)
