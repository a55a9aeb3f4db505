"""Array backends: NumPy on the CPU, CuPy on the GPU (the Chainer ``xp`` way).

Layer code never imports numpy for math on blob data; it uses the module a
blob carries (``blob.xp``) or :func:`get_array_module` on an array.
"""
import numpy

try:  # CuPy is optional: the GPU backend.
    import cupy  # type: ignore
except Exception:  # pragma: no cover - no GPU stack here
    cupy = None

_mode = {"xp": numpy, "device": 0}


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def default_xp():
    """The array module new blobs are created with (set by set_mode_*)."""
    return _mode["xp"]


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
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return numpy.asarray(array)
