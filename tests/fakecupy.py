"""fakecupy: a test-only array module that behaves like CuPy where CuPy and
NumPy differ, so netlib's GPU readiness can be tested on a machine without a
GPU (``NETLIB_TEST_XP=fakecupy``, tests/xp_mode.py, tests/test_fakecupy.py).

Its ``ndarray`` wraps a NumPy array (the "device memory") and reproduces:

* no implicit conversion to NumPy: ``numpy.asarray(x)``, ``numpy.array(x)``,
  ``numpy.exp(x)``, ``numpy.sum(x)``, ``numpy_array[...] = x`` raise
  ``TypeError`` with CuPy's message.  Stricter than CuPy here: real CuPy
  dispatches a NumPy ufunc or function called on its arrays (NEP 13/18) to
  its own; the fake refuses them (except ``numpy_scalar * x``, which CuPy
  computes too), so library code must name ``xp``.  Also stricter: no
  ``__index__`` and no ``asarray`` of a list of device arrays;
* no NumPy arrays as operands: ``x + numpy_array`` and the module's functions
  (other than ``asarray``/``array``/``asnumpy``) raise ``TypeError`` as
  CuPy's kernels do ("Unsupported type"); Python and NumPy scalars are fine;
* host data in explicitly: ``asarray``/``array`` copy a NumPy array (host to
  device), ``x[...] = numpy_array`` copies, and NumPy or list index arrays
  are accepted (CuPy copies them to the device);
* results stay on the device: reductions and integer indexing give 0-d
  arrays, not NumPy scalars; ``float()``, ``int()``, ``bool()`` of a size-1
  array, ``.item()``, ``.tolist()`` and ``.get()`` are the explicit (in CuPy,
  synchronising) ways back to the host;
* ``.base`` is the array that owns the memory (CuPy's rule), and
  ``__cuda_array_interface__`` gives the data pointer.

Not reproduced: asynchrony and streams, kernels (ElementwiseKernel,
RawKernel), ``cupyx``, ``cupy.cuda`` beyond the device count and choice
(``FAKECUPY_DEVICES``, default 2) and a current stream, memory pools, ``.data`` (a device
pointer object), dtype limits (CuPy has no object or string arrays), and
float rounding differences of real GPU math: numbers are NumPy's.  Only the
namespace subset netlib uses exists; anything else is an AttributeError.
"""
import builtins
import operator
import sys
import types

import numpy as _np

MESSAGE = ("Implicit conversion to a NumPy array is not allowed. "
           "Please use `.get()` to construct a NumPy array explicitly.")
_SCALARS = (bool, int, float, complex, _np.generic)


def _refuse(*args, **kwargs):
    raise TypeError(MESSAGE)


def _unsupported(x):
    return TypeError("Unsupported type %s (fakecupy, like CuPy, takes no NumPy array here: "
                     "copy host data to the device with xp.asarray)" % type(x))


def _arg(x):
    """An operand: a fake array's memory, or a scalar; anything else is refused."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise _unsupported(x)


def _pos(x):
    """A positional argument of a function: fake arrays unwrap, NumPy arrays
    are refused, anything else (axes, shapes, scalars) passes."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, _np.ndarray):
        raise _unsupported(x)
    return x


def _kw(kwargs):
    """Keyword arguments: fake arrays unwrap, NumPy arrays are refused."""
    out = {}
    for k, v in kwargs.items():
        if k == "out" and isinstance(v, tuple):
            v = tuple(_arg(o) for o in v)
        elif type(v) is ndarray or isinstance(v, _np.ndarray):
            v = _arg(v)
        out[k] = v
    return out


def _index(key):
    """An index: fake arrays unwrap; NumPy arrays and lists pass (CuPy copies them)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if type(key) is ndarray:
        return key._a
    return key


def _wrap(r, parent=None):
    """A NumPy result as device data: arrays and scalars become fake arrays."""
    if isinstance(r, _np.ndarray):
        x = ndarray.__new__(ndarray)
        x._a = r
        x._base = None
        if parent is not None and r.base is not None and _np.may_share_memory(r, parent._a):
            x._base = parent._base if parent._base is not None else parent
        return x
    if isinstance(r, _np.generic):
        return _wrap(_np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


class _Flags:
    def __init__(self, a):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]


class ndarray:
    """A device array (a NumPy array inside; no implicit way out)."""

    __slots__ = ("_a", "_base")
    __array_priority__ = 100

    def __init__(self, shape, dtype=float):
        self._a = _np.empty(shape, dtype=dtype)
        self._base = None

    # -- refused conversions ------------------------------------------------
    __array__ = _refuse

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(MESSAGE)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # ``numpy.float32(2) * x`` arrives here (as it does in CuPy, which
        # computes it); an explicit numpy ufunc on device data is refused.
        if method == "__call__" and not kwargs and len(inputs) == 2 and ufunc.__name__ in _UFUNC_OPS:
            a, b = inputs
            if isinstance(a, _np.generic) or isinstance(b, _np.generic):
                return _wrap(getattr(_np, ufunc.__name__)(_arg(a), _arg(b)))
        raise TypeError(MESSAGE)

    __hash__ = None

    # -- attributes -----------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: _Flags(self._a))
    base = property(lambda self: self._base)
    T = property(lambda self: _wrap(self._a.T, self))

    @property
    def __cuda_array_interface__(self):
        iface = self._a.__array_interface__
        return {"shape": iface["shape"], "typestr": iface["typestr"], "data": iface["data"],
                "strides": iface["strides"], "version": 3}

    # -- the ways back to the host ----------------------------------------------
    def get(self, stream=None, order="C", out=None):
        """A NumPy copy (CuPy's explicit device-to-host transfer)."""
        if out is not None:
            out[...] = self._a
            return out
        return _np.array(self._a, order=order, copy=True)

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __float__(self):
        return float(self._one())

    def __int__(self):
        return int(self._one())

    def __bool__(self):
        return bool(self._one())

    def _one(self):
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous."
                             if self._a.size else "The truth value of an empty array is ambiguous.")
        return self._a.reshape(-1)[0]

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __repr__(self):
        return "fakecupy." + repr(self._a)

    __str__ = lambda self: str(self._a)  # noqa: E731

    # -- indexing -----------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_index(key)], self)

    def __setitem__(self, key, value):
        if type(value) is ndarray:
            value = value._a
        elif isinstance(value, (list, tuple)):
            value = _np.asarray(value)
        self._a[_index(key)] = value     # NumPy values: a host-to-device copy, as in CuPy

    # -- methods ----------------------------------------------------------------
    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return _wrap(self._a.astype(dtype, order=order, copy=copy), self)

    def view(self, dtype=None):
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype), self)

    def reshape(self, *shape, order="C"):
        return _wrap(self._a.reshape(*shape, order=order), self)

    def transpose(self, *axes):
        return _wrap(self._a.transpose(*axes), self)

    def fill(self, value):
        self._a.fill(_arg(value))

    def dot(self, b, out=None):
        return _wrap(self._a.dot(_arg(b), **_kw({"out": out})))

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (array, (self._a,))


def _method(name, view=False):
    def method(self, *args, **kwargs):
        args = tuple(_pos(a) for a in args)
        return _wrap(getattr(self._a, name)(*args, **_kw(kwargs)), self if view else None)
    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "cumsum", "clip", "std", "var", "prod",
              "any", "all", "nonzero", "repeat", "argsort", "round", "conj"):
    setattr(ndarray, _name, _method(_name))
for _name in ("ravel", "squeeze", "swapaxes"):
    setattr(ndarray, _name, _method(_name, view=True))
ndarray.flatten = lambda self, order="C": _wrap(self._a.flatten(order))


def _take_method(self, indices, axis=None, out=None):
    return _wrap(self._a.take(_index(indices), axis=axis, **_kw({"out": out})))


ndarray.take = _take_method

# operators: the NumPy ufunc each one is (for the numpy-scalar case above)
_UFUNC_OPS = {"add": "add", "subtract": "sub", "multiply": "mul", "true_divide": "truediv",
              "divide": "truediv", "floor_divide": "floordiv", "remainder": "mod", "power": "pow",
              "matmul": "matmul", "bitwise_and": "and", "bitwise_or": "or", "bitwise_xor": "xor",
              "left_shift": "lshift", "right_shift": "rshift", "less": "lt", "less_equal": "le",
              "greater": "gt", "greater_equal": "ge", "equal": "eq", "not_equal": "ne"}


def _binary(fn, reflected=False):
    def op(self, other):
        if isinstance(other, _np.ndarray):
            raise _unsupported(other)
        if type(other) is not ndarray and not isinstance(other, _SCALARS):
            return NotImplemented
        o = _arg(other)
        return _wrap(fn(o, self._a) if reflected else fn(self._a, o))
    return op


def _inplace(fn):
    def op(self, other):
        fn(self._a, _arg(other))
        return self
    return op


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
            "lshift", "rshift"):
    _fn = getattr(operator, _op + "_" if _op in ("and", "or") else _op)
    setattr(ndarray, "__%s__" % _op, _binary(_fn))
    setattr(ndarray, "__r%s__" % _op, _binary(_fn, reflected=True))
    setattr(ndarray, "__i%s__" % _op, _inplace(getattr(operator, "i" + _op)))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, "__%s__" % _op, _binary(getattr(operator, _op)))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, "__%s__" % _op, (lambda fn: lambda self: _wrap(fn(self._a)))(getattr(operator, _op)))


# -- the module's namespace ---------------------------------------------------------
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int8, int16, int32, int64 = _np.int8, _np.int16, _np.int32, _np.int64
uint8, uint16, uint32, uint64 = _np.uint8, _np.uint16, _np.uint32, _np.uint64
bool_, intp, dtype, finfo, iinfo = _np.bool_, _np.intp, _np.dtype, _np.finfo, _np.iinfo
integer, floating, number, generic = _np.integer, _np.floating, _np.number, _np.generic
newaxis, pi, e, inf, nan = None, _np.pi, _np.e, _np.inf, _np.nan
issubdtype, result_type, can_cast = _np.issubdtype, _np.result_type, _np.can_cast


def asarray(a, dtype=None, order=None):
    """Device data from anything array-like; NumPy input is copied (host to device)."""
    if type(a) is ndarray:
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    return _wrap(_np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    if type(obj) is ndarray:
        obj = obj._a
    return _wrap(_np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    return _wrap(_np.ascontiguousarray(_arg(a), dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    """A NumPy array of ``a`` (device arrays copied; NumPy passes through)."""
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if builtins.any(type(a) is ndarray for a in args) else _np


def _creator(fn):
    def create(*args, **kwargs):
        return _wrap(fn(*[_pos(a) for a in args], **_kw(kwargs)))
    create.__name__ = fn.__name__
    return create


empty, zeros, ones, full, arange, linspace, eye, identity = (
    _creator(f) for f in (_np.empty, _np.zeros, _np.ones, _np.full, _np.arange, _np.linspace, _np.eye,
                          _np.identity))


def _like(fn):
    def create(a, *args, **kwargs):
        if type(a) is not ndarray:
            raise _unsupported(a)
        return _wrap(fn(a._a, *[_pos(v) for v in args], **_kw(kwargs)))
    create.__name__ = fn.__name__
    return create


empty_like, zeros_like, ones_like, full_like = (
    _like(f) for f in (_np.empty_like, _np.zeros_like, _np.ones_like, _np.full_like))


def _function(fn, view=False):
    """A function of device arrays and scalars; NumPy arrays refused."""
    def call(*args, **kwargs):
        r = fn(*[_pos(a) for a in args], **_kw(kwargs))
        return _wrap(r, args[0] if view and type(args[0]) is ndarray else None)
    call.__name__ = fn.__name__
    return call


class _ufunc:
    """A CuPy-like ufunc: callable on device arrays and scalars, with ``.at``."""

    def __init__(self, fn):
        self._fn = fn
        self.__name__ = fn.__name__
        self.nin, self.nout = fn.nin, fn.nout

    def __call__(self, *args, **kwargs):
        return _wrap(self._fn(*[_arg(a) for a in args], **_kw(kwargs)))

    def at(self, a, indices, b=None):
        """CuPy 13's ``ufunc.at`` (cupyx.scatter_add before it): unbuffered in place."""
        self._fn.at(_arg(a), _index(indices), *(() if b is None else (_arg(b),)))

    def reduce(self, a, axis=0, dtype=None, out=None, keepdims=False):
        return _wrap(self._fn.reduce(_arg(a), axis=axis, dtype=dtype, keepdims=keepdims,
                                     **_kw({"out": out})))


_UFUNCS = ("add subtract multiply divide true_divide floor_divide negative power remainder mod fmod "
           "maximum minimum fmax fmin exp expm1 log log1p log2 log10 sqrt square reciprocal abs absolute "
           "sign tanh sin cos arctan floor ceil rint trunc greater greater_equal less less_equal equal "
           "not_equal logical_and logical_or logical_not logical_xor isfinite isnan isinf signbit "
           "copysign hypot arctan2 bitwise_and bitwise_or invert")
for _name in _UFUNCS.split():
    globals()[_name] = _ufunc(getattr(_np, _name))

(sum, prod, mean, std, var, max, min, amax, amin, argmax, argmin, nanmax, nanmin, cumsum, any, all,  # noqa: A001
 clip, sort, argsort, take_along_axis, bincount, unique, count_nonzero, dot, matmul, vdot, tensordot, outer,
 broadcast_arrays, around, round, tile, flip, tril, triu, diag, nonzero, flatnonzero, argwhere, allclose,
 array_equal, isclose, searchsorted, cumprod) = (
    _function(getattr(_np, n)) for n in (
        "sum prod mean std var max min amax amin argmax argmin nanmax nanmin cumsum any all clip sort "
        "argsort take_along_axis bincount unique count_nonzero dot matmul vdot tensordot outer "
        "broadcast_arrays around round tile flip tril triu diag nonzero flatnonzero argwhere allclose "
        "array_equal isclose searchsorted cumprod").split())
(reshape, ravel, transpose, swapaxes, moveaxis, squeeze, expand_dims, broadcast_to, atleast_1d) = (
    _function(getattr(_np, n), view=True) for n in
    "reshape ravel transpose swapaxes moveaxis squeeze expand_dims broadcast_to atleast_1d".split())


def einsum(subscripts, *operands, **kwargs):
    return _wrap(_np.einsum(subscripts, *[_arg(o) for o in operands], **_kw(kwargs)))


def where(condition, x=None, y=None):
    if x is None and y is None:
        return _wrap(_np.where(_arg(condition)))
    return _wrap(_np.where(_arg(condition), _arg(x), _arg(y)))


def take(a, indices, axis=None, out=None):
    return _wrap(_np.take(_arg(a), _index(indices), axis=axis, **_kw({"out": out})))


def _sequence(fn):
    def call(arrays, *args, **kwargs):
        return _wrap(fn([_arg(a) for a in arrays], *args, **_kw(kwargs)))
    call.__name__ = fn.__name__
    return call


concatenate, stack, vstack, hstack = (_sequence(f) for f in (_np.concatenate, _np.stack, _np.vstack,
                                                              _np.hstack))


def split(ary, indices_or_sections, axis=0):
    return _wrap(_np.split(_arg(ary), indices_or_sections, axis=axis), ary)


def copyto(dst, src, casting="same_kind", where=None):
    _np.copyto(_arg(dst), _arg(src), casting=casting, where=True if where is None else _arg(where))


def pad(array, pad_width, mode="constant", **kwargs):
    return _wrap(_np.pad(_arg(array), pad_width, mode=mode, **_kw(kwargs)))


def _as_strided(x, shape=None, strides=None):
    return _wrap(_np.lib.stride_tricks.as_strided(_arg(x), shape=shape, strides=strides), x)


lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))



class _Device:
    """``cupy.cuda.Device``: ``use()`` records the current id; nothing runs asynchronously."""

    def __init__(self, device=None):
        self.id = _current["device"] if device is None else int(device)

    def use(self):
        if not 0 <= self.id < _device_count():
            raise RuntimeError("fakecupy: invalid device ordinal %d (FAKECUPY_DEVICES=%d)"
                               % (self.id, _device_count()))
        _current["device"] = self.id

    def synchronize(self):
        pass


def _device_count():
    import os
    return int(os.environ.get("FAKECUPY_DEVICES", "2"))


_current = {"device": 0}

#: The corner of ``cupy.cuda`` netlib touches: the device count and choice, and the current stream
#: (pointer 0, the default stream; the fake has no asynchrony).
cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(getDeviceCount=_device_count, getDevice=lambda: _current["device"]),
    get_current_stream=lambda: types.SimpleNamespace(ptr=0))
