"""Broadcast layers: Bias (``y = x + b``) and Scale (``y = x * s [+ b]``),
with BVLC Caffe's ``bias_layer.cpp`` / ``scale_layer.cpp`` semantics.

The operand (a second bottom or a learned blob) covers bottom 0's axes
``axis .. axis + num_axes`` and is broadcast over the rest, seen as
(outer, dim, inner).  The conventions of :mod:`netlib.builtin.common` hold
here (math on the blob's xp, bottom diffs overwritten, parameter diffs
accumulated, errors through ``self.fail``).
"""
import numpy

from .. import accel
from .. import forward_mode
from .. import second_order
from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from .blocks import per_row, row_blocks, row_dots
from .common import _canonical_axis


def _broadcast_shape(layer, bottom, p, what):
    """Shape of a learned bias/scale blob: bottom0.shape[axis:axis+num_axes]."""
    axis = _canonical_axis(layer, bottom[0], p.axis, bottom)
    num_axes = int(p.num_axes)
    if num_axes < -1:
        layer.fail("num_axes must be non-negative, or -1 to extend to the end of bottom[0]",
                   error=ConfigError)
    if num_axes >= 0 and bottom[0].ndim < axis + num_axes:
        layer.fail("%s blob's shape extends past bottom[0]'s shape when applied starting with "
                   "bottom[0] axis = %d (num_axes %d)" % (what, axis, num_axes),
                   bottom=bottom, error=ShapeError)
    shape = bottom[0].shape
    return tuple(shape[axis:]) if num_axes == -1 else tuple(shape[axis:axis + num_axes])


def _broadcast_dims(layer, bottom, operand, axis_param, what):
    """(outer, dim, inner) for broadcasting ``operand`` over bottom 0."""
    b0 = bottom[0]
    axis = 0 if operand.ndim == 0 else _canonical_axis(layer, b0, axis_param, bottom)
    if b0.ndim < axis + operand.ndim:
        layer.fail("%s blob's shape %s extends past bottom[0]'s shape when applied starting "
                   "with bottom[0] axis = %d" % (what, operand.shape, axis),
                   bottom=bottom, error=ShapeError)
    for i in range(operand.ndim):
        if b0.shape[axis + i] != operand.shape[i]:
            layer.fail("dimension mismatch between bottom[0]->shape(%d) = %d and %s->shape(%d) "
                       "= %d" % (axis + i, b0.shape[axis + i], what, i, operand.shape[i]),
                       bottom=bottom, error=ShapeError)
    return b0.count_axes(0, axis), operand.count, b0.count_axes(axis + operand.ndim)


def _outer_inner_sum(owner, xp, a, b=None):
    """sum over axes 0 and 2 of an (outer, dim, inner) array, or of ``a * b``.

    Row sums first (a matrix-vector product with ones, Caffe's gemv with its
    bias/sum multiplier; or row-wise dot products for ``a * b``), then the
    sum over ``outer``: no temporary of a's size, and faster than a reduction
    over two non-adjacent axes."""
    outer, dim, inner = a.shape
    rows = a.reshape(outer * dim, inner)
    if b is not None:
        per = xp.einsum("ij,ij->i", rows, b.reshape(outer * dim, inner))
    elif inner == 1:
        per = rows.reshape(-1)
    else:
        ones = getattr(owner, "_ones", None)
        if ones is None or ones.shape != (inner,) or ones.dtype != a.dtype:
            ones = owner._ones = xp.ones(inner, dtype=a.dtype)
        per = xp.matmul(rows, ones)
    return per.reshape(outer, dim).sum(axis=0)


@register_layer("Bias")
class BiasLayer(Layer):
    """``y = x + b`` with b broadcast over bottom 0 from ``bias_param.axis`` (1).

    One bottom: b is a learned blob of shape ``bottom0.shape[axis:axis+
    num_axes]`` (num_axes 1; -1 = to the end; 0 = a scalar blob of shape ()),
    filled by ``bias_param.filler`` (default constant 0).  Two bottoms: b is
    bottom 1 (its own number of axes; a 0-D bottom 1 is a scalar).
    Backward: dx = dy; db = sum of dy over the outer and inner axes
    (accumulated into the parameter, written into bottom 1's diff).
    In-place is allowed.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        if len(bottom) == 1 and not self.blobs:
            p = self.layer_param.bias_param
            blob = self.new_blob(_broadcast_shape(self, bottom, p, "bias"))
            fill(blob, filler_param(p, "filler", type="constant", value=0))
            self.blobs.append(blob)

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _broadcast_dims(self, bottom, self._bias(bottom),
                                    self.layer_param.bias_param.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        outer, dim, inner = self.dims
        b = self._bias(bottom).data.reshape(1, dim, 1)
        xp.add(bottom[0].data.reshape(self.dims), b, out=top[0].data.reshape(self.dims))

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = top[0].diff
        learned = len(bottom) == 1
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            g = _outer_inner_sum(self, top[0].xp, top[0].diff.reshape(self.dims))
            target = self._bias(bottom).diff.reshape(-1)
            if learned:
                target += g
            else:
                target[...] = g


@register_layer("Scale")
class ScaleLayer(Layer):
    """``y = x * s (+ b)`` with s broadcast over bottom 0 from ``scale_param.axis``.

    One bottom: s is learned, shape ``bottom0.shape[axis:axis+num_axes]``
    (num_axes 1; -1 = to the end; 0 = scalar), filler default constant 1.
    Two bottoms: s is bottom 1.  ``bias_term`` adds a learned bias through an
    internal Bias layer (Caffe's construction; its num_axes is bottom 1's
    number of axes with two bottoms), filled by ``bias_filler`` (default 0);
    the bias blob is the last of ``blobs``.
    Backward: dx = dy * s; ds = sum(dy * x) over outer/inner axes.  In place
    the bottom is copied before forward (Caffe's temp_), unless no scale
    gradient can be asked for (the Net marks the layer need_backward False,
    or the learned scale has lr_mult 0).

    Caffe quirk kept: the *learned* scale's gradient overwrites its diff
    instead of accumulating when bottom 0 and s have the same count, or when
    count(0, axis) == 1 with more than one scale value and more than one
    inner value (e.g. batch size 1 after a BatchNorm).  Everywhere else it
    accumulates, like every other parameter.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1
    #: With :mod:`netlib.accel`: bottoms of at least this many elements run
    #: forward (and backward with the learned bias) on the compiled kernels.
    accel_min_elements = 1 << 16

    def setup(self, bottom, top):
        p = self.layer_param.scale_param
        if len(bottom) == 1 and not self.blobs:
            blob = self.new_blob(_broadcast_shape(self, bottom, p, "scale"))
            fill(blob, filler_param(p, "filler", type="constant", value=1))
            self.blobs.append(blob)
        self.bias_layer = None
        if p.bias_term:
            lp = caffe_pb2.LayerParameter()
            lp.CopyFrom(self.layer_param)
            lp.type = "Bias"
            bp = lp.bias_param
            bp.axis = p.axis
            bp.num_axes = bottom[1].ndim if len(bottom) > 1 else p.num_axes
            bp.filler.CopyFrom(p.bias_filler)
            self.bias_layer = BiasLayer(lp, phase=self.phase, dtype=self.dtype, xp=self.xp)
            if len(self.blobs) + len(bottom) < 3:
                self.bias_layer.SetUp([bottom[0]], top)
                self.blobs.append(self.bias_layer.blobs[0])
            else:  # bias given already
                self.bias_layer.blobs.append(self.blobs[-1])
                self.bias_layer.SetUp([bottom[0]], top)
        self._saved = None

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _broadcast_dims(self, bottom, self._scale(bottom),
                                    self.layer_param.scale_param.axis, "scale")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)
        if self.bias_layer is not None:
            self.bias_layer.reshape([top[0]], top)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data
        self._saved_valid = False
        copy = top[0] is bottom[0] and self._needs_input_copy(bottom)
        if copy:
            if self._saved is None or self._saved.shape != x.shape:
                self._saved = xp.empty_like(x)
            self._saved_valid = True
        outer, dim, inner = self.dims
        s = self._scale(bottom).data.reshape(dim)
        bias = None
        fused_bias = self.bias_layer is not None and tuple(self.bias_layer.dims) == tuple(self.dims)
        k = accel.kernels_for(x, top[0].data, s, min_elements=self.accel_min_elements,
                              phase=self.phase)
        if k is not None:
            b = self.bias_layer._bias([top[0]]).data.reshape(dim) if fused_bias else s
            k.scale_forward(x.reshape(self.dims), self._saved.reshape(self.dims) if copy else x.reshape(self.dims),
                            top[0].data.reshape(self.dims), s, b.astype(x.dtype, copy=False), copy, fused_bias)
            if self.bias_layer is not None and not fused_bias:
                self.bias_layer.forward([top[0]], top)
            return
        if fused_bias:
            bias = per_row(xp, self.bias_layer._bias([top[0]]).data.reshape(dim), outer)
        # copy (in place), multiply, add bias: block by block of rows, while in cache
        x2, y2 = x.reshape(outer * dim, inner), top[0].data.reshape(outer * dim, inner)
        saved2 = self._saved.reshape(outer * dim, inner) if copy else None
        s_rows = per_row(xp, s, outer)
        for r0, r1 in row_blocks(outer * dim, inner):
            src = x2[r0:r1]
            if copy:
                xp.copyto(saved2[r0:r1], src)
                src = saved2[r0:r1]
            xp.multiply(src, s_rows[r0:r1], out=y2[r0:r1])
            if bias is not None:
                xp.add(y2[r0:r1], bias[r0:r1], out=y2[r0:r1])
        if self.bias_layer is not None and bias is None:
            self.bias_layer.forward([top[0]], top)

    def _needs_input_copy(self, bottom):
        """In place, the input is copied only when a scale gradient can be asked
        for: the Net says the layer runs backward, and the scale is bottom 1 or
        a learned blob with a gradient (lr_mult != 0).  Inference nets and
        frozen scales skip the copy."""
        if not getattr(self, "need_backward", True):
            return False
        if len(bottom) > 1:
            return True
        ppd = self.param_propagate_down
        return not ppd or bool(ppd[0])

    jvp = forward_mode.scale_jvp  # d(x*s + b) = dx*s + x*ds + db (s a bottom or a parameter).
    backward_jvp = second_order.scale_rop  # d(dL/dx) = g ds, d(dL/ds) = sum g dx.
    def backward(self, top, propagate_down, bottom):
        learned = len(bottom) == 1
        scale = self._scale(bottom)
        outer, dim, inner = self.dims
        want_bias = self.bias_layer is not None and self.param_propagate_down[-1]
        want_scale = (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1])
        x = None
        if want_scale:
            if top[0] is bottom[0] and not getattr(self, "_saved_valid", False):
                self.fail("the scale gradient needs the input, which in-place forward did not keep "
                          "(need_backward or param_propagate_down changed after forward)", bottom=bottom)
            x = (self._saved if top[0] is bottom[0] else bottom[0].data).reshape(self.dims)
        if want_bias and tuple(self.bias_layer.dims) == tuple(self.dims):
            self._backward_blocked(top, bottom, propagate_down, x)
            return
        if want_bias:
            self.bias_layer.backward(top, [False], [top[0]])
        dy = top[0].diff.reshape(self.dims)
        if want_scale:
            xp = top[0].xp
            g = _outer_inner_sum(self, xp, dy, x)
            self._store_scale_grad(bottom, scale, g)
        if propagate_down[0]:
            xp = top[0].xp
            s = scale.data.reshape(1, dim, 1)
            xp.multiply(dy, s, out=bottom[0].diff.reshape(self.dims))

    def _backward_blocked(self, top, bottom, propagate_down, x):
        """Backward with the learned bias: per block of rows, the bias and scale
        row sums, then dx = dy * s (in place dx is dy: the sums come first),
        each block's passes while it is in cache."""
        xp = top[0].xp
        outer, dim, inner = self.dims
        rows = outer * dim
        scale = self._scale(bottom)
        dy = top[0].diff
        dx = bottom[0].diff if propagate_down[0] else dy
        sv = scale.data.reshape(dim)
        k = accel.kernels_for(dy, dx, sv, *(() if x is None else (x,)),
                              min_elements=self.accel_min_elements,
                              phase=self.phase)
        if k is not None:
            gs, gb = numpy.empty(dim, dy.dtype), numpy.empty(dim, dy.dtype)
            k.scale_backward(dy.reshape(self.dims), dy.reshape(self.dims) if x is None else x.reshape(self.dims),
                             sv, dx.reshape(self.dims), gs, gb, x is not None, bool(propagate_down[0]))
            self.bias_layer._bias([top[0]]).diff.reshape(-1)[...] += gb
            if x is not None:
                self._store_scale_grad(bottom, scale, gs)
            return
        dy2 = top[0].diff.reshape(rows, inner)
        x2 = None if x is None else x.reshape(rows, inner)
        dx2 = bottom[0].diff.reshape(rows, inner) if propagate_down[0] else None
        s_rows = per_row(xp, scale.data.reshape(dim), outer)
        sums = xp.empty(rows, dtype=dy2.dtype)
        dots = None if x2 is None else xp.empty(rows, dtype=dy2.dtype)
        ones = None
        if inner != 1:
            ones = getattr(self, "_ones", None)
            if ones is None or ones.shape != (inner,) or ones.dtype != dy2.dtype:
                ones = self._ones = xp.ones(inner, dtype=dy2.dtype)
        for r0, r1 in row_blocks(rows, inner):
            g = dy2[r0:r1]
            if ones is None:
                sums[r0:r1] = g[:, 0]
            else:
                xp.matmul(g, ones, out=sums[r0:r1])
            if dots is not None:
                row_dots(xp, g, x2[r0:r1], dots[r0:r1])
            if dx2 is not None:
                xp.multiply(g, s_rows[r0:r1], out=dx2[r0:r1])
        self.bias_layer._bias([top[0]]).diff.reshape(-1)[...] += sums.reshape(outer, dim).sum(axis=0)
        if dots is not None:
            self._store_scale_grad(bottom, scale, dots.reshape(outer, dim).sum(axis=0))

    def _store_scale_grad(self, bottom, scale, g):
        """Write or accumulate the scale gradient ``g`` (dim,) as Caffe does."""
        learned = len(bottom) == 1
        outer, dim, inner = self.dims
        target = scale.diff.reshape(-1)
        overwrite = (not learned or bottom[0].count == scale.count
                     or (outer == 1 and inner > 1 and dim > 1))
        if overwrite:
            target[...] = g
        else:
            target += g
