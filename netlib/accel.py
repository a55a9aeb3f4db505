"""Optional compiled kernels: numba, for the layer work that is not a GEMM.

netlib's layers are NumPy code on the blob's array module (``xp``), and that
code is always the reference.  Some non-GEMM work runs as many memory passes
in NumPy, one core at a time.  When the ``numba`` wheel is installed
(``pip install netlib[accel]``; no compiler needed), these layers run small
JIT-compiled loops instead, parallel over image planes or channels:

* Pooling MAX/AVE: Caffe's CPU loops, bit for bit (where they measured
  faster; see ``PoolingLayer._accel``);
* ReLU forward/backward: Caffe's formula element by element, bit for bit;
* BatchNorm (batch and global statistics) and Scale (with its bias): the
  same formulas in one pass per stage, per-channel sums in float64 (equal to
  Caffe's within float32 rounding, as the NumPy path is).

Small blobs stay on NumPy (each layer's ``accel_min_elements``), and so do
TEST-phase layers unless :func:`set_inference` says otherwise: numba's
compiler and runtime add about 90 MB resident when first used (measured on
CaffeNet inference, batch 10: 319 MB without, 423 MB with), more than its
kernels save in a forward-only pass.  Without numba, or with the accelerator
off, the NumPy path runs; the test suite runs both.

Switch: ``NETLIB_NO_NUMBA=1`` in the environment, or :func:`set_enabled`
(``netlib.accel.set_enabled(False)``) at run time.  A layer asks
:func:`kernels` for the compiled module on each call, so a switch takes effect
at the next forward.  The kernels only serve NumPy arrays (never CuPy) that are
C-contiguous, of float32 or float64.

Compiled code is cached on disk by numba (``cache=True``), so only the first
use on a machine pays the compile time (a few seconds per kernel).
"""
import os
import threading

_state = {"enabled": os.environ.get("NETLIB_NO_NUMBA", "") in ("", "0"), "module": None,
          "error": None, "everywhere": False,
          "inference": os.environ.get("NETLIB_NUMBA_INFERENCE", "") not in ("", "0")}


def available():
    """True when numba imports (whether or not the accelerator is enabled)."""
    return _load() is not None


def enabled():
    """True when the compiled kernels are in use."""
    return _state["enabled"] and available()


def set_enabled(flag, everywhere=False):
    """Turn the compiled kernels on (when numba is installed) or off; returns
    the previous setting.  ``everywhere``: also for arrays below the layers'
    size thresholds (the tests use it to run the kernels on small cases)."""
    old = _state["enabled"]
    _state["enabled"] = bool(flag)
    _state["everywhere"] = bool(flag and everywhere)
    return old


def kernels():
    """The compiled kernels (those of :mod:`netlib.builtin.kernels`, as
    attributes), or None (numba missing, or the accelerator off)."""
    if not _state["enabled"]:
        return None
    return _load()


def set_inference(flag):
    """Let TEST-phase layers use the compiled kernels too (default off, or
    ``NETLIB_NUMBA_INFERENCE=1``; see the module docstring); returns the
    previous setting."""
    old = _state["inference"]
    _state["inference"] = bool(flag)
    return old


def kernels_for(*arrays, min_elements=0, phase=None):
    """:func:`kernels` when they can serve these arrays: NumPy arrays (never
    CuPy), C-contiguous, float32 or float64, the largest with at least
    ``min_elements`` elements (below, NumPy is as fast), for a layer of
    ``phase`` TRAIN (0), or TEST (1) when :func:`set_inference` allows it;
    else None."""
    if not _state["enabled"]:
        return None
    if phase == 1 and not (_state["inference"] or _state["everywhere"]):
        return None          # (checked before numba is first imported)
    import numpy
    big = 0
    for a in arrays:
        if (not isinstance(a, numpy.ndarray) or not a.flags.c_contiguous
                or a.dtype not in (numpy.float32, numpy.float64)):
            return None
        big = max(big, a.size)
    if big < min_elements and not _state["everywhere"]:
        return None
    return _load()


def status():
    """One line for logs and ``netlib --version``-style reports."""
    mod = _load()
    if mod is None:
        return "numba accelerator: not installed (%s)" % (_state["error"] or "import failed")
    import numba
    return "numba accelerator: %s (numba %s)" % ("on" if _state["enabled"] else "off",
                                                   numba.__version__)


#: Kernels whose largest array has fewer elements run on one thread: waking
#: numba's pool costs more than it saves there, and its threads compete with
#: the BLAS threads still spinning after the previous GEMM (measured on 2
#: cores: LeNet's pooling 10% slower in parallel, CIFAR-10's 10x faster).
PARALLEL_MIN_ELEMENTS = 1 << 20


class _Kernels:
    """The kernels of :mod:`netlib.builtin.kernels`, each called under one
    lock (numba's workqueue threading layer refuses concurrent launches; each
    kernel uses every core anyway), on one thread for small arrays."""

    def __init__(self, mod):
        import numba
        self._numba = numba
        lock = threading.Lock()
        for name in mod.__all__:
            setattr(self, name, self._guarded(getattr(mod, name), lock))

    def _guarded(self, fn, lock):
        numba = self._numba

        def call(*args):
            size = max(getattr(a, "size", 0) for a in args)
            with lock:
                if size >= PARALLEL_MIN_ELEMENTS:
                    return fn(*args)
                n = numba.get_num_threads()
                numba.set_num_threads(1)
                try:
                    return fn(*args)
                finally:
                    numba.set_num_threads(n)
        call.__name__ = call.__qualname__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call


def _load():
    if _state["module"] is None and _state["error"] is None:
        try:
            from .builtin import kernels as mod
        except ImportError as exc:       # numba not installed (or broken)
            _state["error"] = str(exc)
            return None
        _state["module"] = _Kernels(mod)
    return _state["module"]
