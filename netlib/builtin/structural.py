"""Structural layers: views, joins and element-wise combinations of blobs.

Split, Flatten, Reshape, Concat, Slice, Eltwise, Silence and Tile, each with
the semantics of BVLC Caffe's ``src/caffe/layers/<name>_layer.cpp`` (split
out of :mod:`netlib.builtin.common`, whose conventions they share: math on
the blob's array module in the layer dtype, bottom diffs overwritten,
errors through ``self.fail``).

Memory rules kept from Caffe: Split tops share the bottom's data; Flatten,
Reshape, one-bottom Concat and one-top Slice share data *and* diff (no copy
in either direction).  Eltwise SUM of two bottoms with unit coefficients is
one pass (``add(x0, x1, out=top)``); a coefficient != 1 goes through a
shared scratch array instead of a temporary.
"""
import numpy

from ..errors import ConfigError, ShapeError
from .. import forward_mode
from .. import second_order
from ..layer import Layer, register_layer
from ..proto import caffe_pb2
from .common import _canonical_axis, _prod
from .neuron import scratch


# ---------------------------------------------------------------------------
# Split / Flatten / Reshape (views)
# ---------------------------------------------------------------------------
@register_layer("Split")
class SplitLayer(Layer):
    """One bottom to k tops that share its data (no copy).

    Every top has the bottom's shape and *shares its data buffer*; each top
    has its own diff.  Backward: bottom diff = sum of the top diffs (top 0 +
    top 1, then the others in order, as Caffe).  In-place is refused.
    The Net inserts these for blobs consumed by several layers.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        for i, t in enumerate(top):
            if t is bottom[0]:
                self.fail("Split does not allow in-place computation (top %d is the bottom)" % i,
                          bottom=bottom)
            t.reshape(bottom[0].shape)
            t.share_data(bottom[0])

    def forward(self, bottom, top):
        pass  # the tops share the bottom's data

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        dx = bottom[0].diff
        if len(top) == 1:
            dx[...] = top[0].diff
            return
        xp.add(top[0].diff, top[1].diff, out=dx)
        for t in top[2:]:
            dx += t.diff


@register_layer("Flatten")
class FlattenLayer(Layer):
    """Merge axes ``axis..end_axis`` (defaults 1 and -1) into one.

    Top shape: ``shape[:axis] + (count(axis, end_axis+1),) + shape[end_axis+1:]``.
    The top shares the bottom's data *and* diff (no copy, no work in
    forward/backward).  In-place is refused, as in Caffe.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("Flatten does not allow in-place computation", bottom=bottom)
        p = self.layer_param.flatten_param
        b = bottom[0]
        start = _canonical_axis(self, b, p.axis, bottom)
        end = _canonical_axis(self, b, p.end_axis, bottom, what="end_axis")
        if end < start:
            self.fail("end_axis %d comes before axis %d" % (p.end_axis, p.axis), bottom=bottom,
                      error=ShapeError)
        shape = b.shape
        new = tuple(shape[:start]) + (b.count_axes(start, end + 1),) + tuple(shape[end + 1:])
        top[0].reshape(new)
        top[0].share_data(b)
        top[0].share_diff(b)

    def forward(self, bottom, top):
        pass

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        pass  # diff is shared


def reshape_top_shape(bottom_shape, new_dims, axis=0, num_axes=-1):
    """Caffe's ReshapeLayer shape rule; returns the top shape or raises ValueError.

    ``new_dims`` replaces ``bottom_shape[start:end]`` where start = axis
    (negative: counted from the end, -1 meaning *after* the last axis) and
    end = start + num_axes (-1: to the end).  In ``new_dims`` a 0 copies the
    bottom dim at the same position (relative to start) and a single -1 is
    inferred from the count.
    """
    bottom_shape = tuple(int(d) for d in bottom_shape)
    nb = len(bottom_shape)
    new_dims = [int(d) for d in new_dims]
    copy_axes, inferred, constant = [], -1, 1
    for i, d in enumerate(new_dims):
        if d == 0:
            copy_axes.append(i)
        elif d == -1:
            if inferred != -1:
                raise ValueError("new shape contains multiple -1 dims; at most a single (1) "
                                 "value of -1 may be specified")
            inferred = i
        elif d < -1:
            raise ValueError("new shape dim %d is %d; dims must be positive, 0 (copy) or -1 (infer)"
                             % (i, d))
        else:
            constant *= d
    start = axis if axis >= 0 else nb + axis + 1
    if start < 0 or start > nb:
        raise ValueError("axis %d out of range for a %d-D input blob" % (axis, nb))
    if num_axes < -1:
        raise ValueError("num_axes must be >= 0, or -1 for all")
    end = nb if num_axes == -1 else start + num_axes
    if end > nb:
        raise ValueError("end_axis = axis + num_axes = %d is out of range for a %d-D input blob"
                         % (end, nb))
    top = list(bottom_shape[:start]) + new_dims + list(bottom_shape[end:])
    for i in copy_axes:
        if start + i >= nb:
            raise ValueError("new shape contains a 0 at position %d, but there was no "
                             "corresponding bottom axis to copy" % i)
        top[start + i] = bottom_shape[start + i]
    count = _prod(bottom_shape)
    if inferred >= 0:
        explicit = constant * _prod(bottom_shape[:start]) * _prod(bottom_shape[end:])
        for i in copy_axes:
            explicit *= top[start + i]
        if explicit == 0 or count % explicit:
            raise ValueError("bottom count (%d) must be divisible by the product of the "
                             "specified dimensions (%d)" % (count, explicit))
        top[start + inferred] = count // explicit
    if _prod(top) != count:
        raise ValueError("output count must match input count: %s has %d elements, the input "
                         "%d" % (tuple(top), _prod(top), count))
    return tuple(top)


@register_layer("Reshape")
class ReshapeLayer(Layer):
    """Change the shape without touching the data (shares data and diff).

    ``reshape_param``: shape (0 = copy the bottom dim at that position, one -1
    = infer from the count), axis (0) and num_axes (-1 = all) select the
    replaced range of bottom axes.  Examples (bottom (2, 3, 4, 5)):
    ``shape {dim: 0 dim: -1 dim: 4}`` gives (2, 15, 4); ``axis: 1 num_axes: 0
    shape {dim: 1}`` inserts an axis: (2, 1, 3, 4, 5); ``axis: -1 shape {dim:
    1}`` appends one: (2, 3, 4, 5, 1).  Errors (ConfigError / ShapeError):
    more than one -1, a 0 with no bottom axis, count mismatch.  In-place is
    refused.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("Reshape does not allow in-place computation", bottom=bottom)
        dims = list(self.layer_param.reshape_param.shape.dim)
        if sum(1 for d in dims if d == -1) > 1:
            self.fail("new shape %s contains multiple -1 dims; at most a single (1) value of -1 "
                      "may be specified" % dims, bottom=bottom, error=ConfigError)

    def reshape(self, bottom, top):
        p = self.layer_param.reshape_param
        try:
            shape = reshape_top_shape(bottom[0].shape, p.shape.dim, p.axis, p.num_axes)
        except ValueError as exc:
            self.fail("cannot reshape to %s (axis %d, num_axes %d): %s"
                      % (list(p.shape.dim), p.axis, p.num_axes, exc), bottom=bottom,
                      error=ShapeError)
        top[0].reshape(shape)
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def forward(self, bottom, top):
        pass

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        pass  # diff is shared


# ---------------------------------------------------------------------------
# Concat / Slice
# ---------------------------------------------------------------------------
@register_layer("Concat")
class ConcatLayer(Layer):
    """Concatenate bottoms along ``concat_param.axis`` (1; legacy concat_dim).

    All bottoms need the same number of axes and equal dims except on the
    concat axis (ShapeError naming every bottom shape otherwise).  Top: the
    common shape with the summed concat dim.  Backward copies each slice of
    the top diff back.  With a single bottom the top shares its data and
    diff (Caffe).
    """

    min_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            self.fail("either axis or concat_dim should be specified; not both", error=ConfigError)

    def reshape(self, bottom, top):
        p = self.layer_param.concat_param
        b0 = bottom[0]
        nd = b0.ndim
        if p.HasField("concat_dim"):
            axis = int(p.concat_dim)
            if axis >= nd:
                self.fail("concat_dim %d out of range for %d-D bottoms" % (axis, nd),
                          bottom=bottom, error=ShapeError)
        else:
            axis = _canonical_axis(self, b0, p.axis, bottom)
        shape = list(b0.shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.ndim != nd:
                self.fail("all inputs must have the same number of axes (bottom 0 has %d, "
                          "bottom %d has %d)" % (nd, i, b.ndim), bottom=bottom, error=ShapeError)
            for j in range(nd):
                if j != axis and b.shape[j] != shape[j]:
                    self.fail("all inputs must have the same shape, except at concat axis %d "
                              "(bottom %d differs at axis %d)" % (axis, i, j),
                              bottom=bottom, error=ShapeError)
            shape[axis] += b.shape[axis]
        self.axis = axis
        self.outer = b0.count_axes(0, axis)
        self.inner = b0.count_axes(axis + 1)
        top[0].reshape(shape)
        if len(bottom) == 1:
            top[0].share_data(b0)
            top[0].share_diff(b0)

    def _views(self, blobs, which):
        return [getattr(b, which).reshape(self.outer, b.shape[self.axis], self.inner) for b in blobs]

    def forward(self, bottom, top):
        if len(bottom) == 1:
            return
        y = top[0].data.reshape(self.outer, top[0].shape[self.axis], self.inner)
        off = 0
        for x in self._views(bottom, "data"):
            n = x.shape[1]
            y[:, off:off + n, :] = x
            off += n

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        dy = top[0].diff.reshape(self.outer, top[0].shape[self.axis], self.inner)
        off = 0
        for i, b in enumerate(bottom):
            n = b.shape[self.axis]
            if propagate_down[i]:
                b.diff.reshape(self.outer, n, self.inner)[...] = dy[:, off:off + n, :]
            off += n


@register_layer("Slice")
class SliceLayer(Layer):
    """Split the bottom along ``slice_param.axis`` (1; legacy slice_dim).

    With ``slice_point`` (k-1 increasing points for k tops) top i gets
    ``[point[i-1], point[i])``; with none the axis is split equally (it must
    divide by the number of tops).  Backward copies the top diffs back.  With
    a single top it shares the bottom's data and diff (Caffe).
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            self.fail("either axis or slice_dim should be specified; not both", error=ConfigError)
        self.slice_points = [int(s) for s in p.slice_point]

    def reshape(self, bottom, top):
        p = self.layer_param.slice_param
        b = bottom[0]
        if p.HasField("slice_dim"):
            axis = int(p.slice_dim)
            if axis >= b.ndim:
                self.fail("slice_dim %d out of range for a %d-D bottom" % (axis, b.ndim),
                          bottom=bottom, error=ShapeError)
        else:
            axis = _canonical_axis(self, b, p.axis, bottom)
        dim = b.shape[axis]
        ntop = len(top)
        if self.slice_points:
            if len(self.slice_points) != ntop - 1:
                self.fail("%d slice_point(s) given for %d tops (need one fewer than the tops)"
                          % (len(self.slice_points), ntop), bottom=bottom, error=ConfigError)
            if ntop > dim:
                self.fail("%d tops cannot slice an axis of size %d" % (ntop, dim),
                          bottom=bottom, error=ShapeError)
            sizes, prev = [], 0
            for s in self.slice_points:
                if s <= prev:
                    self.fail("slice points must be positive and strictly increasing, got %s"
                              % self.slice_points, bottom=bottom, error=ConfigError)
                sizes.append(s - prev)
                prev = s
            if prev > dim:  # prev == dim leaves an empty last top, as in Caffe
                self.fail("slice point %d is beyond the slice axis (size %d)" % (prev, dim),
                          bottom=bottom, error=ShapeError)
            sizes.append(dim - prev)
        else:
            if dim % ntop:
                self.fail("number of top blobs (%d) should evenly divide input slice axis (%d)"
                          % (ntop, dim), bottom=bottom, error=ShapeError)
            sizes = [dim // ntop] * ntop
        self.axis, self.sizes = axis, sizes
        self.outer = b.count_axes(0, axis)
        self.inner = b.count_axes(axis + 1)
        shape = list(b.shape)
        for t, n in zip(top, sizes):
            shape[axis] = n
            t.reshape(shape)
        if ntop == 1:
            top[0].share_data(b)
            top[0].share_diff(b)

    def forward(self, bottom, top):
        if len(top) == 1:
            return
        x = bottom[0].data.reshape(self.outer, bottom[0].shape[self.axis], self.inner)
        off = 0
        for t, n in zip(top, self.sizes):
            t.data.reshape(self.outer, n, self.inner)[...] = x[:, off:off + n, :]
            off += n

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or len(top) == 1:
            return
        dx = bottom[0].diff.reshape(self.outer, bottom[0].shape[self.axis], self.inner)
        off = 0
        for t, n in zip(top, self.sizes):
            dx[:, off:off + n, :] = t.diff.reshape(self.outer, n, self.inner)
            off += n


# ---------------------------------------------------------------------------
# Eltwise
# ---------------------------------------------------------------------------
_ELT = caffe_pb2.EltwiseParameter


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    """Element-wise PROD, SUM (default, with ``coeff``) or MAX of >= 2 bottoms.

    All bottoms must have identical shapes (ShapeError naming every shape).
    * SUM: ``y = sum_i coeff_i * x_i`` (coeff: none or one per bottom);
      dx_i = coeff_i * dy.
    * PROD: ``y = prod x_i``; dx_i = dy * prod_{j != i} x_j with
      ``stable_prod_grad`` (default), else dy * y / x_i (Caffe's unstable
      form: inf/nan where x_i == 0).
    * MAX: Caffe's routing: between bottoms 0 and 1 bottom 0 wins only if
      strictly greater (ties go to bottom 1); a later bottom k takes over only
      if strictly greater than the running max.  Backward sends dy to the
      winner, 0 elsewhere.
    In place (top == bottom 0) the original bottom 0 is kept for backward
    (Caffe would read the overwritten values).
    """

    min_bottom_blobs = 2
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.eltwise_param
        self.op = p.operation
        coeffs = list(p.coeff)
        if self.op == _ELT.PROD and coeffs:
            self.fail("Eltwise only takes coefficients for summation (operation SUM)",
                      error=ConfigError)
        if coeffs and len(coeffs) != len(bottom):
            self.fail("Eltwise takes one coefficient per bottom blob (%d coeff for %d bottoms)"
                      % (len(coeffs), len(bottom)), bottom=bottom, error=ConfigError)
        self.coeffs = [self.dtype.type(c) for c in coeffs] or [self.dtype.type(1)] * len(bottom)
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self._mask = None
        self._saved0 = None

    def reshape(self, bottom, top):
        s0 = bottom[0].shape
        for b in bottom[1:]:
            if b.shape != s0:
                self.fail("all bottoms must have the same shape", bottom=bottom, error=ShapeError)
        if top[0] is not bottom[0]:
            top[0].reshape(s0)
        if self.op == _ELT.MAX:
            xp = bottom[0].xp
            if self._mask is None or self._mask.shape != s0:
                self._mask = xp.zeros(s0, dtype=numpy.int32)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        in_place = top[0] is bottom[0]
        if in_place:
            x0 = bottom[0].data
            if self._saved0 is None or self._saved0.shape != x0.shape:
                self._saved0 = x0.copy()
            else:
                self._saved0[...] = x0
        xs = [self._saved0 if (in_place and i == 0) else b.data for i, b in enumerate(bottom)]
        y = top[0].data
        if self.op == _ELT.PROD:
            xp.multiply(xs[0], xs[1], out=y)
            for x in xs[2:]:
                y *= x
        elif self.op == _ELT.SUM:
            # One pass for the common y = x0 + x1; a coefficient != 1 is one
            # more pass (into the top, or a scratch array) instead of a temporary.
            c = self.coeffs
            if c[0] == 1 and c[1] == 1:
                xp.add(xs[0], xs[1], out=y)
                rest = 2
            else:
                if c[0] == 1:
                    y[...] = xs[0]
                else:
                    xp.multiply(xs[0], c[0], out=y)
                rest = 1
            work = None
            for ci, x in zip(c[rest:], xs[rest:]):
                if ci == 1:
                    y += x
                else:
                    if work is None:
                        work = scratch(xp, y.shape, y.dtype)
                    xp.multiply(x, ci, out=work)
                    y += work
        else:
            # Caffe: y = a > b ? a : b, then y = x_k > y ? x_k : y.  Without
            # NaNs that is the element-wise maximum (the fast SIMD path; equal
            # values can differ only in the sign of a zero); with NaNs the
            # selects are done literally so NaNs propagate as in Caffe.
            mask = self._mask
            win = xp.greater(xs[0], xs[1])
            xp.logical_not(win, out=mask)  # 0 where bottom 0 wins, else 1
            xp.maximum(xs[0], xs[1], out=y)
            literal = bool(xp.isnan(y).any())
            if literal:
                y[...] = xp.where(win, xs[0], xs[1])
            for k, x in enumerate(xs[2:], 2):
                better = xp.greater(x, y, out=win)
                xp.copyto(mask, k, where=better)
                if literal or bool(xp.isnan(x).any()):
                    literal = True
                    y[...] = xp.where(better, x, y)
                else:
                    xp.maximum(y, x, out=y)

    jvp = forward_mode.eltwise_jvp  # SUM linear; PROD: sum_i dx_i prod_{j!=i} x_j; MAX: dx at the argmax bottom.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """PROD is multilinear in its bottoms (d(dx_i) = g sum_{j != i} dx_j prod_{k != i, j} x_k);
        SUM and MAX backwards do not depend on the values (MAX: the winner fixed)."""
        if self.op != _ELT.PROD:
            return second_order.zero_rop(self, top, propagate_down, bottom, top_diffs, t)
        return second_order.multilinear_rop(self, top, propagate_down, bottom, top_diffs, t,
                                            tuple(range(len(bottom))), (), refresh=not self.stable_prod_grad)

    def backward(self, top, propagate_down, bottom):
        xp = top[0].xp
        in_place = top[0] is bottom[0]
        dy = top[0].diff
        y = top[0].data
        xs = [self._saved0 if (in_place and i == 0) else b.data for i, b in enumerate(bottom)]
        # When in place, bottom 0's diff is the top diff: write it last.
        order = list(range(1, len(bottom))) + [0]
        for i in order:
            if not propagate_down[i]:
                continue
            dx = bottom[i].diff
            if self.op == _ELT.PROD:
                if self.stable_prod_grad:
                    others = [x for j, x in enumerate(xs) if j != i]
                    g = others[0].copy()
                    for x in others[1:]:
                        g *= x
                else:
                    with numpy.errstate(divide="ignore", invalid="ignore"):
                        g = y / xs[i]
                xp.multiply(g, dy, out=dx)
            elif self.op == _ELT.SUM:
                c = self.coeffs[i]
                if c == 1:
                    if bottom[i] is not top[0]:
                        dx[...] = dy
                else:
                    xp.multiply(dy, c, out=dx)
            else:
                # dy where bottom i won, else 0 (dy * False is -0.0 for a
                # negative dy: equal to Caffe's 0 in value).
                xp.multiply(dy, self._mask == i, out=dx)


# ---------------------------------------------------------------------------
# Silence
# ---------------------------------------------------------------------------
@register_layer("Silence")
class SilenceLayer(Layer):
    """Consumes any number of bottoms and produces nothing.

    Keeps unused blobs from becoming net outputs.  Backward writes zeros to
    every bottom diff that propagates.
    """

    min_bottom_blobs = 1
    exact_num_top_blobs = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    jvp = forward_mode.zero_jvp  # no tops.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

    def backward(self, top, propagate_down, bottom):
        for b, p in zip(bottom, propagate_down):
            if p:
                b.diff[...] = 0


# ---------------------------------------------------------------------------
# Tile
# ---------------------------------------------------------------------------
@register_layer("Tile")
class TileLayer(Layer):
    """Repeat the bottom ``tiles`` times along ``tile_param.axis`` (1).

    Top: the axis dim multiplied by tiles; each block of
    ``count(axis:)`` values is repeated (numpy.tile along the axis).
    Backward: the sum of the tile diffs.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        p = self.layer_param.tile_param
        axis = _canonical_axis(self, bottom[0], p.axis, bottom)
        if not p.HasField("tiles"):
            self.fail("number of tiles must be specified (tile_param.tiles)", error=ConfigError)
        if p.tiles <= 0:
            self.fail("number of tiles must be positive, got %d" % p.tiles, error=ConfigError)
        self.tiles = int(p.tiles)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)
        self.outer = bottom[0].count_axes(0, axis)
        self.inner = bottom[0].count_axes(axis)

    def forward(self, bottom, top):
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = \
            bottom[0].data.reshape(self.outer, 1, self.inner)

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = top[0].xp
        xp.sum(top[0].diff.reshape(self.outer, self.tiles, self.inner), axis=1,
               out=bottom[0].diff.reshape(self.outer, self.inner))
