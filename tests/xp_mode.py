"""The array module the tests build layers, blobs and nets on.

``NETLIB_TEST_XP=fakecupy python -m pytest tests/test_layers_*.py ...`` runs
them on tests/fakecupy.py, a CPU stand-in for CuPy that refuses implicit
conversion to NumPy, so a NumPy call on device data in netlib fails there as
it would on a GPU; ``NETLIB_TEST_XP=cupy`` runs them on a real GPU.  Unset
(or ``numpy``), everything runs on NumPy as usual.

Tests use ``XP`` where they name an array module (``create_layer(..., xp=XP)``,
``Blob(shape, xp=XP)``), ``host(a)`` to read blob data back as NumPy before
comparing it with a NumPy reference, and ``host_only(reason)`` to mark the few
tests that are about host-only machinery (the numba kernels, NumPy's BLAS).
Loaded by tests/conftest.py as a plugin: in fakecupy mode the backend's
default module is the stand-in for every test (reset before each one).
"""
import os

import numpy
import pytest

from netlib import backend

NAME = os.environ.get("NETLIB_TEST_XP", "") or "numpy"
if NAME == "numpy":
    XP = numpy
elif NAME == "fakecupy":
    import fakecupy as XP
elif NAME == "cupy":  # pragma: no cover - a real GPU (the device check of a session lent one)
    try:
        import cupy as XP
        XP.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError("NETLIB_TEST_XP=cupy needs CuPy and a CUDA device: %s" % exc) from exc
else:  # pragma: no cover - a typo in the environment
    raise RuntimeError("NETLIB_TEST_XP=%r: use numpy, fakecupy or (on a GPU) cupy" % NAME)

ON_DEVICE = XP is not numpy


def host(array):
    """``array`` (NumPy, device or array-like) as a NumPy array: the explicit
    device-to-host copy a test makes before comparing with NumPy."""
    return backend.to_numpy(array)


def dev(array, dtype=None):
    """``array`` on the tests' array module (a host-to-device copy in fakecupy mode)."""
    return XP.asarray(array, dtype=dtype)


def host_only(reason):
    """Mark a test that is about host-only machinery: skipped in device mode."""
    return pytest.mark.skipif(ON_DEVICE, reason="host-only (NETLIB_TEST_XP=%s): %s" % (NAME, reason))


def pytest_report_header(config):
    return "netlib test array module: %s (NETLIB_TEST_XP)" % NAME


@pytest.fixture(autouse=True)
def _tests_array_module():
    """In device mode, every test starts with the device module as netlib's default."""
    if not ON_DEVICE:
        yield
        return
    old = backend.default_xp()
    backend.set_mode_device(XP)
    yield
    if old is numpy:
        backend.set_mode_cpu()
    else:
        backend.set_mode_device(old)
