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


def fill_array(shape, param, dtype=numpy.float32):
    """A NumPy array of ``shape`` filled as the FillerParameter says."""
    rng = get_rng()
    shape = tuple(int(d) for d in shape)
    kind = param.type
    if param.sparse != -1 and kind != "gaussian":
        raise ConfigError("filler %r does not support 'sparse' (only gaussian does)" % kind)
    if kind == "constant":
        out = numpy.full(shape, param.value, dtype=numpy.float64)
    elif kind == "uniform":
        out = rng.uniform(param.min, param.max, size=shape)
    elif kind == "gaussian":
        out = rng.normal(param.mean, param.std, size=shape)
        if param.sparse >= 0:
            if len(shape) < 1 or shape[0] == 0:
                raise ConfigError("a sparse gaussian filler needs a blob with a first axis")
            # Each weight is kept with probability sparse / num_outputs.
            non_zero_prob = min(1.0, param.sparse / float(shape[0]))
            out *= rng.random(size=shape) < non_zero_prob
    elif kind == "positive_unitball":
        out = rng.uniform(0.0, 1.0, size=shape)
        rows = out.reshape(shape[0] if shape else 1, -1)
        rows /= rows.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _norm_n(param, shape))
        out = rng.uniform(-scale, scale, size=shape)
    elif kind == "msra":
        std = math.sqrt(2.0 / _norm_n(param, shape))
        out = rng.normal(0.0, std, size=shape)
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ConfigError("the bilinear filler needs a 4-D blob with square kernels, got %s" % (shape,))
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        idx = numpy.arange(k)
        w1 = 1 - numpy.abs(idx / f - c)
        kernel = w1[:, None] * w1[None, :]  # rows are y, columns x
        out = numpy.broadcast_to(kernel, shape).copy()
    else:
        raise ConfigError("unknown filler type %r (constant, uniform, gaussian, positive_unitball, "
                          "xavier, msra, bilinear)" % kind)
    return out.astype(dtype, copy=False)


def fill(blob, param):
    """Fill ``blob.data`` in place."""
    blob.data[...] = blob.xp.asarray(fill_array(blob.shape, param, blob.dtype))
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
