"""Parameter fillers (Caffe's include/caffe/filler.hpp).

``fill(blob, filler_param)`` initialises ``blob.data`` in place.  Fan-in and
fan-out are Caffe's: ``fan_in = count / shape[0]`` and
``fan_out = count / shape[1]`` (for a conv weight (O, I, kh, kw):
I*kh*kw and O*kh*kw).  Draws come from :mod:`netlib.random`, so they follow
Caffe's distributions, not its exact samples.
"""
import math

import numpy

from .errors import ConfigError
from .random import get_rng


def _fans(shape):
    count = int(numpy.prod(shape)) if shape else 1
    fan_in = count // shape[0] if len(shape) >= 1 and shape[0] else count
    fan_out = count // shape[1] if len(shape) >= 2 and shape[1] else count
    return fan_in, fan_out


def _norm_n(param, shape):
    from .proto import caffe_pb2
    fan_in, fan_out = _fans(shape)
    vn = param.variance_norm
    if vn == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if vn == caffe_pb2.FillerParameter.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def _draw_dtype(dtype):
    """The dtype NumPy's Generator can draw in directly (float32 or float64)."""
    dtype = numpy.dtype(dtype)
    return dtype if dtype in (numpy.float32, numpy.float64) else numpy.dtype(numpy.float64)


def fill_array(shape, param, dtype=numpy.float32, out=None):
    """A NumPy array of ``shape`` filled as the FillerParameter says.

    Values are drawn directly in ``dtype`` when it is float32 or float64 (no
    float64 temporary for a float32 blob: a CaffeNet fc6 weight is 151 MB, its
    float64 draw would be 302 MB more), into ``out`` when given (a
    C-contiguous NumPy array of that shape and dtype), else into a new array.
    """
    rng = get_rng()
    shape = tuple(int(d) for d in shape)
    kind = param.type
    if param.sparse != -1 and kind != "gaussian":
        raise ConfigError("filler %r does not support 'sparse' (only gaussian does)" % kind)
    dt = _draw_dtype(dtype)
    if out is None or out.dtype != dt or out.shape != shape or not out.flags.c_contiguous:
        target = numpy.empty(shape, dtype=dt)
    else:
        target = out

    def uniform(lo, hi):
        rng.random(out=target, dtype=dt)          # [0, 1)
        numpy.multiply(target, dt.type(hi - lo), out=target)
        numpy.add(target, dt.type(lo), out=target)

    def normal(mean, std):
        rng.standard_normal(out=target, dtype=dt)
        numpy.multiply(target, dt.type(std), out=target)
        numpy.add(target, dt.type(mean), out=target)

    if target.size == 0:
        pass                                      # nothing to draw (and no fan to divide by)
    elif kind == "constant":
        target.fill(param.value)
    elif kind == "uniform":
        uniform(param.min, param.max)
    elif kind == "gaussian":
        normal(param.mean, param.std)
        if param.sparse >= 0:
            if len(shape) < 1 or shape[0] == 0:
                raise ConfigError("a sparse gaussian filler needs a blob with a first axis")
            # Each weight is kept with probability sparse / num_outputs.
            non_zero_prob = min(1.0, param.sparse / float(shape[0]))
            target *= rng.random(size=shape, dtype=numpy.float32) < non_zero_prob
    elif kind == "positive_unitball":
        uniform(0.0, 1.0)
        rows = target.reshape(shape[0] if shape else 1, -1)
        rows /= rows.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _norm_n(param, shape))
        uniform(-scale, scale)
    elif kind == "msra":
        normal(0.0, math.sqrt(2.0 / _norm_n(param, shape)))
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ConfigError("the bilinear filler needs a 4-D blob with square kernels, got %s" % (shape,))
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        idx = numpy.arange(k)
        w1 = 1 - numpy.abs(idx / f - c)
        target[...] = w1[:, None] * w1[None, :]  # rows are y, columns x
    else:
        raise ConfigError("unknown filler type %r (constant, uniform, gaussian, positive_unitball, "
                          "xavier, msra, bilinear)" % kind)
    if out is not None and target is not out:
        out[...] = target
        return out
    return target.astype(dtype, copy=False)


def fill(blob, param):
    """Fill ``blob.data`` in place (drawn straight into it on NumPy)."""
    data = blob.data
    if isinstance(data, numpy.ndarray):
        fill_array(blob.shape, param, blob.dtype, out=data)
    else:
        data[...] = blob.xp.asarray(fill_array(blob.shape, param, blob.dtype))
    return blob


def filler_param(parent, field, **defaults):
    """``parent.<field>`` when the prototxt set it, else a FillerParameter
    built from ``defaults`` (e.g. ``type='constant', value=1`` for Scale)."""
    from .proto import caffe_pb2
    if parent.HasField(field):
        return getattr(parent, field)
    out = caffe_pb2.FillerParameter()
    for k, v in defaults.items():
        setattr(out, k, v)
    return out
