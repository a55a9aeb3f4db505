"""Neuron layers: element-wise maps from one bottom to one top of the same shape.

Every layer here takes exactly one bottom and one top, shapes the top like the
bottom and may run in place (``top`` is the same Blob as ``bottom``, as in
``layer { bottom: "x" top: "x" }``).  In place, the bottom's values are gone by
the time ``backward`` runs, so each layer computes its gradient from what is
still there, the way Caffe does:

* ReLU, ELU read the bottom blob, which then holds the top (the signs are
  unchanged, so the gradient is right for slopes/alpha >= 0; Caffe's quirk for
  other values is kept).
* Sigmoid, TanH, Exp, Swish use only the top (and Swish its stored sigmoid).
* Dropout uses its stored mask.
* PReLU keeps a copy of the bottom when in place (Caffe's ``bottom_memory_``).
* BNLL, Log, Power and Clip need the original input.  Caffe's CPU code reads
  the overwritten bottom there and returns a wrong gradient; netlib keeps a
  copy of the bottom instead (as PReLU does), so in-place gradients are right.
  Out of place the numbers are Caffe's.
* AbsVal refuses in-place computation, as Caffe does.
* Threshold has no backward.

All math runs on the blob's array module (``xp``) in the blob's dtype; scalar
parameters are float32 values from the prototxt, as in Caffe.
"""
import math
import threading

import numpy

from .. import accel
from .. import forward_mode
from .. import second_order
from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..layer import Layer, register_layer
from ..random import get_rng


_scratch_local = threading.local()


def scratch(xp, shape, dtype, slot=0):
    """A transient work array of ``shape`` (contents undefined).

    The buffers are shared by every layer in this thread (one per array
    module, dtype and ``slot``) and grow to the largest size asked for, so an
    element-wise layer needs no fresh allocation per call.  Use only within
    one forward or backward call: the next layer reuses the memory.
    """
    pool = getattr(_scratch_local, "pool", None)
    if pool is None:
        pool = _scratch_local.pool = {}
    device = 0
    if xp is not numpy:
        try:
            device = xp.cuda.runtime.getDevice()
        except Exception:  # pragma: no cover - not CuPy
            device = 0
    key = (xp.__name__, device, numpy.dtype(dtype).str, slot)
    count = 1
    for d in shape:
        count *= int(d)
    buf = pool.get(key)
    if buf is None or buf.size < count:
        buf = pool[key] = xp.empty(max(count, 1), dtype=dtype)
    return buf[:count].reshape(shape)


class NeuronLayer(Layer):
    """Base of the element-wise layers: 1 bottom, 1 top shaped like it.

    In-place computation is allowed.  ``_save_bottom`` / ``_bottom_data`` help a
    subclass whose gradient needs the original input keep a copy of it when
    the layer runs in place.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    _saved_bottom = None

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    @staticmethod
    def in_place(bottom, top):
        return top[0] is bottom[0]

    def _save_bottom(self, bottom, top):
        """Before an in-place forward: keep a copy of the bottom values."""
        if not self.in_place(bottom, top):
            self._saved_bottom = None
            return
        x = bottom[0].data
        saved = self._saved_bottom
        if saved is None or saved.shape != x.shape or saved.dtype != x.dtype:
            self._saved_bottom = x.copy()
        else:
            saved[...] = x

    def _bottom_data(self, bottom, top):
        """The forward input: the saved copy when in place, else bottom data."""
        if self.in_place(bottom, top) and self._saved_bottom is not None:
            return self._saved_bottom
        return bottom[0].data

    @staticmethod
    def _work(blob, slot=0):
        """A scratch array shaped like ``blob`` (see :func:`scratch`)."""
        return scratch(blob.xp, blob.shape, blob.dtype, slot)

    def _scalar(self, value):
        """A parameter as a scalar of the layer's dtype (float32 math stays float32)."""
        return self.dtype.type(value)


@register_layer("ReLU")
class ReLULayer(NeuronLayer):
    """Rectified linear unit (``relu_param.negative_slope``, default 0).

    top = max(x, 0) + negative_slope * min(x, 0).
    Backward: dx = dy * (x > 0 ? 1 : negative_slope).  The test reads the
    bottom blob, which holds the top when in place (Caffe's behaviour: exact
    for negative_slope >= 0).
    """

    #: With :mod:`netlib.accel`: arrays of at least this many elements run on
    #: the compiled kernel (one parallel pass; 1.6-1.9x faster measured from
    #: 3M elements, a tie below ~200k).
    accel_min_elements = 1 << 18

    def setup(self, bottom, top):
        self.negative_slope = float(self.layer_param.relu_param.negative_slope)
        self._consts = None

    def _kernel_consts(self, dtype):
        c = self._consts
        if c is None or c.dtype != dtype:
            c = self._consts = numpy.array([0, 1, self.negative_slope], dtype=dtype)
        return c

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x, y = bottom[0].data, top[0].data
        ns = self.negative_slope
        k = accel.kernels_for(x, y, min_elements=self.accel_min_elements,
                              phase=self.phase)
        if k is not None:
            k.relu_forward(x.reshape(-1), y.reshape(-1), self._kernel_consts(x.dtype))
        elif ns == 0:
            xp.maximum(x, 0, out=y)
        elif 0 < ns <= 1:
            # max(x, ns*x) is exactly max(x,0) + ns*min(x,0) for 0 <= ns <= 1.
            t = self._work(bottom[0])
            xp.multiply(x, self._scalar(ns), out=t)
            xp.maximum(x, t, out=y)
        else:
            t = self._work(bottom[0])
            xp.minimum(x, 0, out=t)
            t *= self._scalar(ns)
            xp.maximum(x, 0, out=y)
            y += t

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        x, dy, dx = bottom[0].data, top[0].diff, bottom[0].diff
        ns = self.negative_slope
        k = accel.kernels_for(x, dy, dx, min_elements=self.accel_min_elements,
                              phase=self.phase)
        if k is not None:
            k.relu_backward(x.reshape(-1), dy.reshape(-1), dx.reshape(-1), self._kernel_consts(x.dtype))
            return
        if ns == 0:
            # the mask goes to a reused boolean scratch array (no allocation per call)
            mask = scratch(xp, x.shape, numpy.bool_)
            xp.greater(x, 0, out=mask)
            xp.multiply(dy, mask, out=dx)
            return
        s = self._work(bottom[0])
        xp.greater(x, 0, out=s)  # 1 where x > 0, else 0
        if 0 <= ns <= 1:
            xp.maximum(s, self._scalar(ns), out=s)  # 1 or ns, exactly
        else:
            t = self._work(bottom[0], 1)
            xp.subtract(1, s, out=t)
            t *= self._scalar(ns)
            s += t
        xp.multiply(dy, s, out=dx)


@register_layer("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """Logistic sigmoid, computed as Caffe does: top = 0.5 * tanh(0.5 x) + 0.5.

    Backward uses the top only: dx = dy * y * (1 - y) (in-place safe).
    """

    def forward(self, bottom, top):
        xp = bottom[0].xp
        y = top[0].data
        xp.multiply(bottom[0].data, self._scalar(0.5), out=y)
        xp.tanh(y, out=y)
        y *= self._scalar(0.5)
        y += self._scalar(0.5)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = y (1 - y) (1 - 2 y), from the top (in-place safe)."""
        y = top[0].data
        return y * (1 - y) * (1 - 2 * y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = bottom[0].xp
            y = top[0].data
            s = self._work(top[0])
            xp.subtract(1, y, out=s)
            s *= y
            xp.multiply(top[0].diff, s, out=bottom[0].diff)


@register_layer("TanH")
class TanHLayer(NeuronLayer):
    """Hyperbolic tangent. Backward from the top: dx = dy * (1 - y^2)."""

    def forward(self, bottom, top):
        bottom[0].xp.tanh(bottom[0].data, out=top[0].data)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = -2 y (1 - y^2), from the top (in-place safe)."""
        y = top[0].data
        return -2 * y * (1 - y * y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = bottom[0].xp
            y = top[0].data
            s = self._work(top[0])
            xp.multiply(y, y, out=s)
            xp.subtract(1, s, out=s)
            xp.multiply(top[0].diff, s, out=bottom[0].diff)


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    """Dropout (``dropout_param.dropout_ratio`` p, default 0.5).

    TRAIN: mask ~ Bernoulli(1 - p) drawn from ``netlib.random.get_rng()``
    (uniforms of the layer dtype compared with 1 - p);
    top = x * mask * 1/(1 - p) (Caffe scales at train time); backward uses
    the same mask.  TEST: identity in both directions.
    Caffe only DCHECKs 0 < p < 1; netlib refuses p outside [0, 1).
    """

    def setup(self, bottom, top):
        p = float(self.layer_param.dropout_param.dropout_ratio)
        if not 0.0 <= p < 1.0:
            self.fail("dropout_ratio must be in [0, 1), got %g" % p, error=ConfigError)
        self.threshold = p
        # Caffe: scale_ = 1. / (1. - threshold_), stored as Dtype.
        self.scale = float(self.dtype.type(1.0 / (1.0 - p)))
        self._mask = None  # mask * scale, in the layer dtype

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self.phase != 0:  # TEST
            if not self.in_place(bottom, top):
                y[...] = x
            return
        xp = bottom[0].xp
        mask = self._mask
        if mask is None or mask.shape != x.shape or mask.dtype != x.dtype:
            mask = self._mask = xp.empty(x.shape, dtype=x.dtype)
        # Uniform draws in the layer dtype straight into the mask buffer, then
        # mask = (u < 1 - p) * scale in place: no float64 or boolean temporaries.
        if xp is numpy and mask.dtype in (numpy.float32, numpy.float64):
            get_rng().random(dtype=mask.dtype, out=mask)
        else:
            mask[...] = xp.asarray(get_rng().random(x.shape, dtype=numpy.float32))
        xp.less(mask, self._scalar(1.0 - self.threshold), out=mask)
        mask *= self._scalar(self.scale)
        xp.multiply(x, mask, out=y)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.phase != 0:
            if not self.in_place(bottom, top):
                dx[...] = dy
            return
        if self._mask is None:
            self.fail("backward called before a TRAIN forward (no dropout mask)")
        bottom[0].xp.multiply(dy, self._mask, out=dx)


@register_layer("AbsVal")
class AbsValLayer(NeuronLayer):
    """top = |x|; dx = dy * sign(x) (sign(0) = 0).

    Caffe refuses in-place computation for this layer; so does netlib.
    """

    def setup(self, bottom, top):
        if self.in_place(bottom, top):
            self.fail("AbsVal does not allow in-place computation (as in Caffe)",
                      bottom=bottom, error=ConfigError)

    def forward(self, bottom, top):
        bottom[0].xp.abs(bottom[0].data, out=top[0].data)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = bottom[0].xp
            xp.multiply(top[0].diff, xp.sign(bottom[0].data), out=bottom[0].diff)


@register_layer("BNLL")
class BNLLLayer(NeuronLayer):
    """Binomial normal log likelihood: top = log(1 + e^x), computed stably as
    max(x, 0) + log1p(e^-|x|) (Caffe's two-branch formula, same values).

    Backward: e = exp(min(x, 50)) (Caffe's kBNLL_THRESHOLD), dx = dy * e/(e+1).
    In place, a copy of the input is kept for backward.
    """

    THRESHOLD = 50.0

    def forward(self, bottom, top):
        self._save_bottom(bottom, top)
        xp = bottom[0].xp
        x = bottom[0].data
        soft = xp.log1p(xp.exp(-xp.abs(x)))
        top[0].data[...] = xp.maximum(x, 0) + soft

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = s (1 - s), s = sigmoid(x)."""
        x = self._bottom_data(bottom, top)
        s = 0.5 * self.xp.tanh(0.5 * x) + 0.5
        return s * (1 - s)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = bottom[0].xp
            x = self._bottom_data(bottom, top)
            e = xp.exp(xp.minimum(x, self._scalar(self.THRESHOLD)))
            bottom[0].diff[...] = top[0].diff * e / (e + 1)


@register_layer("ELU")
class ELULayer(NeuronLayer):
    """Exponential linear unit (``elu_param.alpha``, default 1).

    top = max(x, 0) + alpha * (exp(min(x, 0)) - 1).
    Backward: dx = dy * (x > 0 ? 1 : alpha + y), reading the bottom blob
    (which holds the top when in place: same sign for alpha > 0, as in Caffe).
    """

    def setup(self, bottom, top):
        self.alpha = float(self.layer_param.elu_param.alpha)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x, y = bottom[0].data, top[0].data
        neg = self._work(bottom[0])
        xp.minimum(x, 0, out=neg)
        xp.exp(neg, out=neg)  # Caffe: alpha * (exp(min(x, 0)) - 1)
        neg -= 1
        neg *= self._scalar(self.alpha)
        xp.maximum(x, 0, out=y)
        y += neg

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = 0 for x > 0, else alpha e^x = y + alpha (the sign read as backward does)."""
        x, y = bottom[0].data, top[0].data
        return self.xp.where(x > 0, self._scalar(0), y + self._scalar(self.alpha))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = bottom[0].xp
            x, y, dy = bottom[0].data, top[0].data, top[0].diff
            # dy * ((x > 0) + (alpha + y) * (x <= 0)), as Caffe.
            s = self._work(bottom[0])
            t = self._work(bottom[0], 1)
            xp.greater(x, 0, out=s)
            xp.add(y, self._scalar(self.alpha), out=t)
            t *= x <= 0
            s += t
            xp.multiply(dy, s, out=bottom[0].diff)


def _check_base(layer, base, name):
    if base != -1 and not base > 0:
        layer.fail("%s_param.base must be strictly positive (or -1 for e), got %g" % (name, base),
                   error=ConfigError)


@register_layer("Exp")
class ExpLayer(NeuronLayer):
    """top = base^(shift + scale * x) (``exp_param``: base -1 = e, scale 1, shift 0).

    As Caffe: top = outer * exp(inner * x) with inner = scale * ln(base) and
    outer = base^shift.  Backward from the top: dx = dy * y * inner.
    """

    def setup(self, bottom, top):
        p = self.layer_param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        _check_base(self, base, "exp")
        f = self.dtype.type
        log_base = 1.0 if base == -1 else float(f(math.log(base)))
        self.inner_scale = float(f(log_base * scale))
        if shift == 0:
            self.outer_scale = 1.0
        else:
            self.outer_scale = float(f(math.exp(shift) if base == -1 else base ** shift))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        y = top[0].data
        if self.inner_scale == 1:
            xp.exp(bottom[0].data, out=y)
        else:
            xp.multiply(bottom[0].data, self._scalar(self.inner_scale), out=y)
            xp.exp(y, out=y)
        if self.outer_scale != 1:
            y *= self._scalar(self.outer_scale)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = inner^2 y, inner = scale ln(base), from the top."""
        return self._scalar(self.inner_scale * self.inner_scale) * top[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = top[0].diff * top[0].data
            if self.inner_scale != 1:
                dx *= self._scalar(self.inner_scale)


@register_layer("Log")
class LogLayer(NeuronLayer):
    """top = log_base(shift + scale * x) (``log_param``: base -1 = e, scale 1, shift 0).

    Backward: dx = dy * (scale / ln(base)) / (shift + scale * x).  In place, a
    copy of the input is kept (Caffe would read the overwritten bottom).
    """

    def setup(self, bottom, top):
        p = self.layer_param.log_param
        base = float(p.base)
        _check_base(self, base, "log")
        f = self.dtype.type
        log_base = 1.0 if base == -1 else float(f(math.log(base)))
        self.base_scale = float(f(1.0 / log_base))
        self.input_scale = float(p.scale)
        self.input_shift = float(p.shift)
        self.backward_num_scale = float(f(self.input_scale / log_base))

    def _affine(self, x):
        z = x * self._scalar(self.input_scale) if self.input_scale != 1 else x.copy()
        if self.input_shift != 0:
            z += self._scalar(self.input_shift)
        return z

    def forward(self, bottom, top):
        self._save_bottom(bottom, top)
        xp = bottom[0].xp
        y = top[0].data
        with numpy.errstate(divide="ignore", invalid="ignore"):
            y[...] = xp.log(self._affine(bottom[0].data))
        if self.base_scale != 1:
            y *= self._scalar(self.base_scale)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = -(scale / ln base) scale / (shift + scale x)^2."""
        z = self._affine(self._bottom_data(bottom, top))
        return self._scalar(-self.backward_num_scale * self.input_scale) / (z * z)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            z = self._affine(self._bottom_data(bottom, top))
            with numpy.errstate(divide="ignore", invalid="ignore"):
                z = 1 / z
            if self.backward_num_scale != 1:
                z *= self._scalar(self.backward_num_scale)
            bottom[0].diff[...] = top[0].diff * z


@register_layer("Power")
class PowerLayer(NeuronLayer):
    """top = (shift + scale * x)^power (``power_param``: power 1, scale 1, shift 0).

    Caffe's special cases are kept: when power * scale == 0 the top is the
    constant (power == 0 ? 1 : shift^power) and the gradient is 0; power 1
    gives the constant gradient scale; power 2 uses 2*scale*(shift + scale*x);
    shift 0 uses power * y / x (so x = 0 gives NaN, as in Caffe); otherwise
    power * scale * y / (shift + scale * x).  In place, a copy of the input is
    kept for backward (Caffe would read the overwritten bottom).
    """

    def setup(self, bottom, top):
        p = self.layer_param.power_param
        f = self.dtype.type
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.diff_scale = float(f(self.power * self.scale))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        y = top[0].data
        if self.diff_scale == 0:
            value = 1.0 if self.power == 0 else float(self.dtype.type(self.shift) ** self.dtype.type(self.power))
            y[...] = value
            return
        self._save_bottom(bottom, top)
        x = bottom[0].data
        if self.scale != 1:
            xp.multiply(x, self._scalar(self.scale), out=y)
        elif y is not x:
            y[...] = x
        if self.shift != 0:
            y += self._scalar(self.shift)
        if self.power != 1:
            with numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):
                xp.power(y, self._scalar(self.power), out=y)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = power (power - 1) scale^2 (shift + scale x)^(power - 2); 0 in
        Caffe's constant-gradient cases (power * scale == 0, power == 1)."""
        if self.diff_scale == 0 or self.power == 1:
            return None
        x = self._bottom_data(bottom, top)
        z = x * self._scalar(self.scale) + self._scalar(self.shift)
        c = self._scalar(self.power * (self.power - 1) * self.scale * self.scale)
        if self.power == 2:
            return c * self.xp.ones_like(z)
        with numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return c * z ** self._scalar(self.power - 2)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        if self.diff_scale == 0:
            dx[...] = 0
            return
        if self.power == 1:
            xp = bottom[0].xp
            xp.multiply(top[0].diff, self._scalar(self.diff_scale), out=dx)
            return
        x = self._bottom_data(bottom, top)
        y = top[0].data
        with numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.power == 2:
                g = x * self._scalar(self.diff_scale * self.scale)
                if self.shift != 0:
                    g += self._scalar(self.diff_scale * self.shift)
            elif self.shift == 0:
                g = y / x
                g *= self._scalar(self.power)
            else:
                z = x * self._scalar(self.scale) if self.scale != 1 else x.copy()
                z += self._scalar(self.shift)
                g = y / z
                if self.diff_scale != 1:
                    g *= self._scalar(self.diff_scale)
            dx[...] = top[0].diff * g


@register_layer("Threshold")
class ThresholdLayer(NeuronLayer):
    """top = x > threshold ? 1 : 0 (``threshold_param.threshold``, default 0).

    No backward (Caffe: NOT_IMPLEMENTED).  force_backward does not reach it
    (``allow_force_backward`` is False, where Caffe would abort); a real
    gradient request raises LayerError.
    """

    def setup(self, bottom, top):
        self.threshold = float(self.layer_param.threshold_param.threshold)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data > self._scalar(self.threshold)

    def allow_force_backward(self, bottom_index):
        return False

    jvp = forward_mode.zero_jvp  # d top = 0 (data layers, piecewise constant outputs).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.fail("Threshold has no backward (it is a step function)", bottom=bottom)


@register_layer("Clip")
class ClipLayer(NeuronLayer):
    """top = max(min, min(x, max)) (``clip_param`` min and max, both required).

    Backward: dx = dy where min <= x <= max, else 0.  With min > max the top
    is min everywhere, as in Caffe.  In place, a copy of the input is kept.
    """

    def setup(self, bottom, top):
        p = self.layer_param.clip_param
        missing = [f for f in ("min", "max") if not p.HasField(f)]
        if missing:
            self.fail("clip_param needs both min and max (missing: %s)" % ", ".join(missing),
                      error=ConfigError)
        self.min, self.max = float(p.min), float(p.max)

    def forward(self, bottom, top):
        self._save_bottom(bottom, top)
        xp = bottom[0].xp
        y = top[0].data
        xp.minimum(bottom[0].data, self._scalar(self.max), out=y)
        xp.maximum(y, self._scalar(self.min), out=y)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            x = self._bottom_data(bottom, top)
            inside = (x >= self._scalar(self.min)) & (x <= self._scalar(self.max))
            bottom[0].xp.multiply(top[0].diff, inside, out=bottom[0].diff)


@register_layer("Swish")
class SwishLayer(NeuronLayer):
    """Swish (``swish_param.beta``, default 1): top = x * sigmoid(beta * x).

    The sigmoid is Caffe's 0.5 * tanh(0.5 z) + 0.5 and is kept for backward:
    dx = dy * (beta * y + s * (1 - beta * y)), from top and s only (in-place
    safe, as in Caffe).
    """

    def setup(self, bottom, top):
        self.beta = float(self.layer_param.swish_param.beta)
        self._sig = None

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data
        s = self._sig
        if s is None or s.shape != x.shape or s.dtype != x.dtype:
            s = self._sig = xp.empty(x.shape, dtype=x.dtype)
        xp.multiply(x, self._scalar(self.beta), out=s)
        s *= self._scalar(0.5)
        xp.tanh(s, out=s)
        s *= self._scalar(0.5)
        s += self._scalar(0.5)
        xp.multiply(x, s, out=top[0].data)

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.
    backward_jvp = second_order.neuron_rop  # d(dL/dx) = f''(x) dx g.
    def second_derivative(self, bottom, top):
        """f'' = beta (1 - s) (beta y + 2 s (1 - beta y)), s = sigmoid(beta x), from the top and s."""
        s, by = self._sig, self._scalar(self.beta) * top[0].data
        return self._scalar(self.beta) * (1 - s) * (by + 2 * s * (1 - by))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            by = top[0].data * self._scalar(self.beta)
            bottom[0].diff[...] = top[0].diff * (by + self._sig * (1 - by))


@register_layer("PReLU")
class PReLULayer(NeuronLayer):
    """Parametric ReLU: top = max(x, 0) + a_c * min(x, 0), c the axis-1 channel.

    Bottom: at least 2 axes (N, C, ...).  One parameter blob: shape (C,), or
    the 0-axis scalar shape () when ``prelu_param.channel_shared`` (Caffe's
    ``vector<int>(0)``).  Filler: ``prelu_param.filler``, default constant 0.25.
    Backward: da_c += sum dy * min(x, 0) over the channel (accumulated);
    dx = dy * (x > 0 ? 1 : a_c).  In place, a copy of the bottom is kept
    for backward, as Caffe's ``bottom_memory_``.
    """

    def setup(self, bottom, top):
        if bottom[0].ndim < 2:
            self.fail("the bottom needs at least 2 axes (N, C, ...)", bottom=bottom, error=ShapeError)
        p = self.layer_param.prelu_param
        self.channel_shared = bool(p.channel_shared)
        channels = bottom[0].shape[1]
        blob = self.new_blob(() if self.channel_shared else (channels,))
        fill(blob, filler_param(p, "filler", type="constant", value=0.25))
        self.blobs.append(blob)

    def reshape(self, bottom, top):
        if bottom[0].ndim < 2:
            self.fail("the bottom needs at least 2 axes (N, C, ...)", bottom=bottom, error=ShapeError)
        if not self.channel_shared and self.blobs[0].count != bottom[0].shape[1]:
            self.fail("negative slope blob has %d values for %d channels"
                      % (self.blobs[0].count, bottom[0].shape[1]), bottom=bottom, error=ShapeError)
        super().reshape(bottom, top)

    def _slope(self, shape):
        a = self.blobs[0].data
        if self.channel_shared:
            return a.reshape(())
        return a.reshape((1, shape[1]) + (1,) * (len(shape) - 2))

    def forward(self, bottom, top):
        self._save_bottom(bottom, top)
        xp = bottom[0].xp
        x, y = bottom[0].data, top[0].data
        t = self._work(bottom[0])
        xp.minimum(x, 0, out=t)
        t *= self._slope(x.shape)
        xp.maximum(x, 0, out=y)
        y += t

    def jvp(self, bottom, top, tangents, param_tangents):
        """dy = (x > 0 ? 1 : a) dx + min(x, 0) da."""
        xp = self.xp
        x = self._bottom_data(bottom, top)
        out = xp.where(x > 0, self.dtype.type(1), self._slope(x.shape)) * tangents[0]
        if param_tangents and param_tangents[0] is not None:
            da = param_tangents[0].reshape(self._slope(x.shape).shape)
            out = out + xp.minimum(x, 0) * da
        return [out.astype(self.dtype, copy=False)]

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """Bilinear in (a, min(x, 0)) with the mask x <= 0 fixed: d(dL/dx) =
        g da [x <= 0], d(dL/da) = sum g dx [x <= 0] over the channel."""
        xp = self.xp
        x = self._bottom_data(bottom, top)
        neg = (x <= 0).astype(self.dtype)
        g = top_diffs[0]
        db = dp = None
        da = t.params[0] if t.params else None
        if propagate_down[0] and da is not None:
            db = g * neg * da.reshape(self._slope(x.shape).shape)
        if self.param_propagate_down[0] and t.bottom[0] is not None:
            h = g * neg * t.bottom[0]
            dp = h.sum().reshape(()) if self.channel_shared else h.sum(axis=(0,) + tuple(range(2, h.ndim)))
            dp = xp.asarray(dp, dtype=self.dtype).reshape(self.blobs[0].shape)
        return [db], [dp]

    def backward(self, top, propagate_down, bottom):
        xp = bottom[0].xp
        x = self._bottom_data(bottom, top)
        dy = top[0].diff
        # Parameter gradient first: in place, the bottom diff overwrites dy.
        if self.param_propagate_down[0]:
            g = self._work(bottom[0])
            xp.minimum(x, 0, out=g)
            g *= dy
            if self.channel_shared:
                self.blobs[0].diff[...] += g.sum()
            else:
                axes = (0,) + tuple(range(2, g.ndim))
                self.blobs[0].diff[...] += g.sum(axis=axes)
        if propagate_down[0]:
            # dy * ((x > 0) + a * (x <= 0)), exactly: s = pos + (1 - pos) * a.
            s = self._work(bottom[0])
            t = self._work(bottom[0], 1)
            xp.greater(x, 0, out=s)
            xp.subtract(1, s, out=t)
            t *= self._slope(x.shape)
            s += t
            xp.multiply(dy, s, out=bottom[0].diff)
