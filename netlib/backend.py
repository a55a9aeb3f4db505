"""Array backends: NumPy on the CPU, CuPy on the GPU (the Chainer ``xp`` way).

Layer code never imports numpy for math on blob data; it uses the module a
blob carries (``blob.xp``) or :func:`get_array_module` on an array.

A *device module* is a CuPy-like array module whose arrays live off the host
(``module.ndarray``, ``module.asarray``, ``module.asnumpy``): CuPy registers
itself when it imports; :func:`register_device_module` adds another (the test
suite's CPU stand-in for CuPy, tests/fakecupy.py) and :func:`set_mode_device`
creates new nets and blobs on it.
"""
import importlib
import os

import numpy

try:  # CuPy is optional: the GPU backend.
    import cupy  # type: ignore
except Exception:  # pragma: no cover - no GPU stack here
    cupy = None
if os.environ.get("NETLIB_GPU_MODULE"):
    # A test's CuPy stand-in (tests/fakecupy.py) in the processes it starts (netlib train --gpu 0,1).
    cupy = importlib.import_module(os.environ["NETLIB_GPU_MODULE"])

_mode = {"xp": numpy, "device": 0}
_device_modules = []


def register_device_module(module):
    """Treat ``module`` as a device array module (see the module docstring);
    returns it.  Registering twice is harmless."""
    if module is numpy:
        raise ValueError("numpy is the host module, not a device module")
    if module not in _device_modules:
        _device_modules.append(module)
    return module


if cupy is not None:  # pragma: no cover - GPU stack only
    register_device_module(cupy)


def device_modules():
    """The registered device array modules (CuPy first when it imports)."""
    return tuple(_device_modules)


def get_array_module(*arrays):
    """The device module of the first device array among ``arrays``, else ``numpy``."""
    for a in arrays:
        if isinstance(a, numpy.ndarray):
            continue
        for module in _device_modules:
            if isinstance(a, module.ndarray):
                return module
    return numpy


def is_device_array(array):
    """True for an array of a registered device module (not host memory)."""
    return get_array_module(array) is not numpy


def default_xp():
    """The array module new blobs are created with (set by set_mode_*)."""
    return _mode["xp"]


def set_mode_device(module):
    """Create new nets and blobs on the device module ``module`` (registered
    here if it is not yet): ``set_mode_gpu`` for CuPy, or a test stand-in."""
    _mode["xp"] = register_device_module(module)


def set_mode_cpu():
    """Create new nets and blobs on the CPU (NumPy)."""
    _mode["xp"] = numpy


def set_mode_gpu():
    """Create new nets and blobs on the GPU (CuPy).

    Needs CuPy and a CUDA device; without them it raises ConfigError (and the
    mode stays CPU) rather than running on the CPU unnoticed.
    """
    from .errors import ConfigError
    if cupy is None:
        raise ConfigError("GPU mode needs CuPy and a CUDA GPU: pip install cupy-cuda12x "
                          "(or stay on the CPU: set_mode_cpu)")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - needs CuPy without a working driver
        raise ConfigError("GPU mode: CuPy is installed but finds no usable CUDA device (%s)" % exc) from exc
    if devices < 1:  # pragma: no cover
        raise ConfigError("GPU mode: CuPy is installed but there is no CUDA device")
    _mode["xp"] = cupy


def set_device(device_id):
    """Select the CUDA device used in GPU mode."""
    _mode["device"] = int(device_id)
    if cupy is not None:
        cupy.cuda.Device(int(device_id)).use()


def to_numpy(array):
    """A NumPy copy of a device array (the module's ``asnumpy``), or the
    NumPy array itself (anything else through ``numpy.asarray``)."""
    if isinstance(array, numpy.ndarray):
        return array
    module = get_array_module(array)
    if module is not numpy:
        return module.asnumpy(array)
    return numpy.asarray(array)
