"""Optional compiled kernels: numba, for the layer work that is not a GEMM.

netlib's layers are NumPy code on the blob's array module (``xp``), and that
code is always the reference.  Some non-GEMM work (Caffe's per-window pooling
loops, say) runs as many memory passes in NumPy, one core at a time.  When the
``numba`` wheel is installed (``pip install netlib[accel]``; no compiler
needed), such layers run small JIT-compiled loops instead, parallel over the
image planes, written as Caffe's CPU loops so the numbers stay Caffe's bit for
bit.  Without numba, or with the accelerator off, the NumPy path runs.

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
          "error": None, "everywhere": False}


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


def kernels_for(*arrays, min_elements=0):
    """:func:`kernels` when they can serve these arrays: NumPy arrays (never
    CuPy), C-contiguous, float32 or float64, the largest with at least
    ``min_elements`` elements (below, NumPy is as fast); else None."""
    k = kernels()
    if k is None:
        return None
    import numpy
    big = 0
    for a in arrays:
        if (not isinstance(a, numpy.ndarray) or not a.flags.c_contiguous
                or a.dtype not in (numpy.float32, numpy.float64)):
            return None
        big = max(big, a.size)
    return k if big >= min_elements or _state["everywhere"] else None


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
