"""Common (utility / structural) layers: the glue between the big layers.

InnerProduct, Softmax, Split, Flatten, Reshape, Concat, Slice, Eltwise,
Silence, Tile, Reduction, ArgMax, Crop, BatchReindex, Filter, Bias, Scale,
Parameter and Embed, each with the semantics of BVLC Caffe's
``src/caffe/layers/<name>_layer.cpp`` (checks, shapes, quirks).

Conventions shared by every layer here:

* All math runs on the blob's array module (``xp = blob.xp``: numpy or cupy)
  in the layer's dtype; scalar parameters (coefficients) are cast to that
  dtype first, as Caffe stores them as ``Dtype``.
* Bottom diffs are overwritten, parameter diffs accumulate (``+=``), except
  where a Caffe quirk says otherwise (Scale, documented there).
* Layers that only re-view memory (Split, Flatten, Reshape, one-bottom
  Concat, one-top Slice, Parameter) share buffers with ``share_data`` /
  ``share_diff`` instead of copying, exactly where Caffe does.
* Errors go through ``self.fail`` (layer name, type and blob shapes):
  ``ShapeError`` for shapes a layer cannot take, ``ConfigError`` for
  inconsistent parameters, ``LayerError`` for bad values (indices).
"""
import numpy

from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..layer import Layer, register_layer
from ..proto import caffe_pb2


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _canonical_axis(layer, blob, axis, bottom, what="axis"):
    """Caffe's CanonicalAxisIndex with an error that names the layer."""
    n = blob.ndim
    axis = int(axis)
    if not -n <= axis < n:
        layer.fail("%s %d out of range for a %d-D blob (valid: -%d..%d)"
                   % (what, axis, n, n, n - 1), bottom=bottom, error=ShapeError)
    return axis + n if axis < 0 else axis


def _prod(dims):
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _index_add(xp, target, index, values):
    """``target[index[i]] += values[i]`` along axis 0; repeated indices add up."""
    at = getattr(getattr(xp, "add", None), "at", None)
    if at is not None:
        try:
            at(target, index, values)
            return
        except (NotImplementedError, TypeError):
            pass
    import cupyx  # pragma: no cover - GPU only
    cupyx.scatter_add(target, index, values)


def _no_backward_to(layer, propagate_down, bottom, indices, why):
    for i in indices:
        if i < len(propagate_down) and propagate_down[i]:
            layer.fail("cannot backpropagate to bottom %d (%s)" % (i, why), bottom=bottom)


# ---------------------------------------------------------------------------
# InnerProduct
# ---------------------------------------------------------------------------
@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected layer: ``y = x W^T + b`` as one matrix product.

    ``inner_product_param``: num_output N, bias_term (true), weight_filler /
    bias_filler (default constant 0), axis (1), transpose (false).

    Bottom: any shape; it is viewed as (M, K) with M = count(0, axis) and
    K = count(axis).  Top: ``bottom.shape[:axis] + (N,)``.
    Blobs: weight (N, K), or (K, N) when ``transpose``; bias (N,).
    Backward: dW += dy^T x (or x^T dy when transposed), db += sum_M dy,
    dx = dy W (or dy W^T).  K is fixed at setup; a later bottom whose K
    differs is refused (Caffe's "Input size incompatible with inner product
    parameters").
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        self.N = int(p.num_output)
        if self.N <= 0:
            # Caffe fails later in the filler (CHECK(count)); say what is missing.
            self.fail("inner_product_param.num_output must be set to a positive number",
                      bottom=bottom, error=ConfigError)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        axis = _canonical_axis(self, bottom[0], p.axis, bottom)
        self.K = bottom[0].count_axes(axis)
        if self.blobs:
            return  # parameters given already (Caffe: "Skipping parameter initialization")
        weight = self.new_blob((self.K, self.N) if self.transpose else (self.N, self.K))
        fill(weight, filler_param(p, "weight_filler", type="constant", value=0))
        self.blobs.append(weight)
        if self.bias_term:
            bias = self.new_blob((self.N,))
            fill(bias, filler_param(p, "bias_filler", type="constant", value=0))
            self.blobs.append(bias)

    def reshape(self, bottom, top):
        axis = _canonical_axis(self, bottom[0], self.layer_param.inner_product_param.axis, bottom)
        new_k = bottom[0].count_axes(axis)
        if new_k != self.K:
            self.fail("incompatible input dimension: the layer was set up for K=%d inputs per "
                      "item (count from axis %d) but the bottom now gives K=%d"
                      % (self.K, axis, new_k), bottom=bottom, error=ShapeError)
        self.axis = axis
        self.M = bottom[0].count_axes(0, axis)
        top[0].reshape(tuple(bottom[0].shape[:axis]) + (self.N,))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.M, self.K)
        y = top[0].data.reshape(self.M, self.N)
        w = self.blobs[0].data
        xp.matmul(x, w if self.transpose else w.T, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.M, self.N)
        if self.param_propagate_down[0]:
            x = bottom[0].data.reshape(self.M, self.K)
            if self.transpose:
                self.blobs[0].diff[...] += x.T @ dy
            else:
                self.blobs[0].diff[...] += dy.T @ x
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
            xp = bottom[0].xp
            w = self.blobs[0].data
            dx = bottom[0].diff.reshape(self.M, self.K)
            xp.matmul(dy, w.T if self.transpose else w, out=dx)


# ---------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------
@register_layer("Softmax")
class SoftmaxLayer(Layer):
    """Softmax along ``softmax_param.axis`` (default 1).

    Top shaped like the bottom.  For every (outer, inner) position:
    ``y = exp(x - max x) / sum exp(x - max x)`` (Caffe subtracts the max).
    Backward: ``dx = (dy - sum(dy * y)) * y`` (uses the top only, so in-place
    computation works).  The engine field is ignored (one implementation).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        axis = _canonical_axis(self, bottom[0], self.layer_param.softmax_param.axis, bottom)
        shape = bottom[0].shape
        self.view = (bottom[0].count_axes(0, axis), shape[axis], bottom[0].count_axes(axis + 1))
        if top[0] is not bottom[0]:
            top[0].reshape(shape)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.view)
        y = top[0].data.reshape(self.view)
        m = x.max(axis=1, keepdims=True)
        xp.subtract(x, m, out=y)
        xp.exp(y, out=y)
        y /= y.sum(axis=1, keepdims=True)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = top[0].xp
        y = top[0].data.reshape(self.view)
        dy = top[0].diff.reshape(self.view)
        dx = bottom[0].diff.reshape(self.view)
        dot = xp.einsum("ocj,ocj->oj", dy, y)[:, None, :]
        xp.subtract(dy, dot, out=dx)
        dx *= y


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
            c = self.coeffs
            if c[0] == 1:
                y[...] = xs[0]
            else:
                xp.multiply(xs[0], c[0], out=y)
            for ci, x in zip(c[1:], xs[1:]):
                if ci == 1:
                    y += x
                else:
                    y += ci * x
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

    def backward(self, top, propagate_down, bottom):
        for b, p in zip(bottom, propagate_down):
            if p:
                b.diff[...] = 0


# ---------------------------------------------------------------------------
# Tile / Reduction / ArgMax / Crop
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

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = top[0].xp
        xp.sum(top[0].diff.reshape(self.outer, self.tiles, self.inner), axis=1,
               out=bottom[0].diff.reshape(self.outer, self.inner))


_RED = caffe_pb2.ReductionParameter


@register_layer("Reduction")
class ReductionLayer(Layer):
    """Reduce all axes from ``reduction_param.axis`` (0) on: SUM (default),
    ASUM (sum |x|), SUMSQ (sum x^2) or MEAN, times ``coeff`` (1).

    Top shape: ``bottom.shape[:axis]`` (axis 0 gives a 0-D scalar blob).
    MEAN uses coeff / count(axis:) computed in the layer dtype (Caffe).
    Backward: SUM/MEAN dx = coeff*dy; ASUM dx = coeff*dy*sign(x) (sign(0) = 0);
    SUMSQ dx = 2*coeff*dy*x.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        self.op = self.layer_param.reduction_param.operation

    def reshape(self, bottom, top):
        p = self.layer_param.reduction_param
        axis = _canonical_axis(self, bottom[0], p.axis, bottom)
        top[0].reshape(tuple(bottom[0].shape[:axis]))
        self.num = bottom[0].count_axes(0, axis)
        self.dim = bottom[0].count_axes(axis)
        coeff = self.dtype.type(p.coeff)
        if self.op == _RED.MEAN:
            coeff = self.dtype.type(coeff / self.dtype.type(self.dim))
        self.coeff = coeff

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.num, self.dim)
        y = top[0].data.reshape(self.num)
        if self.op in (_RED.SUM, _RED.MEAN):
            xp.sum(x, axis=1, out=y)
        elif self.op == _RED.ASUM:
            xp.sum(xp.abs(x), axis=1, out=y)
        elif self.op == _RED.SUMSQ:
            y[...] = xp.einsum("ij,ij->i", x, x)
        else:
            self.fail("unknown reduction operation %r" % self.op, error=ConfigError)
        if self.coeff != 1:
            y *= self.coeff

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        g = top[0].diff.reshape(self.num, 1) * self.coeff
        dx = bottom[0].diff.reshape(self.num, self.dim)
        if self.op in (_RED.SUM, _RED.MEAN):
            dx[...] = g
        elif self.op == _RED.ASUM:
            xp.multiply(xp.sign(bottom[0].data.reshape(self.num, self.dim)), g, out=dx)
        else:
            xp.multiply(bottom[0].data.reshape(self.num, self.dim), 2 * g, out=dx)


@register_layer("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (and optionally values) of the ``top_k`` largest entries.

    ``argmax_param``: out_max_val (false), top_k (1), axis (unset: per item n
    over the flattened ``count(1:)`` values).
    * With axis: top = bottom shape with ``shape[axis] = top_k``; holds the
      indices, or the values when out_max_val.
    * Without axis: top (N, 1, top_k) of indices, or (N, 2, top_k) with the
      indices then the values when out_max_val (padded with 1s to at least
      3 axes, as Caffe).
    Ties: Caffe sorts (value, index) pairs with std::greater, so among equal
    values the *larger index* comes first.  Indices are written as floats.
    No backward (force_backward skips this layer's bottom).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.argmax_param
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            self.fail("top_k must not be less than 1", error=ConfigError)

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        b = bottom[0]
        if self.has_axis:
            self.axis = _canonical_axis(self, b, self.layer_param.argmax_param.axis, bottom)
            if self.top_k > b.shape[self.axis]:
                self.fail("top_k (%d) must be less than or equal to the dimension of the axis "
                          "(%d)" % (self.top_k, b.shape[self.axis]), bottom=bottom,
                          error=ShapeError)
            shape = list(b.shape)
            shape[self.axis] = self.top_k
            self.view = (b.count_axes(0, self.axis), b.shape[self.axis], b.count_axes(self.axis + 1))
        else:
            if b.ndim < 1:
                self.fail("the bottom needs at least one axis", bottom=bottom, error=ShapeError)
            if self.top_k > b.count_axes(1):
                self.fail("top_k (%d) must be less than or equal to the dimension of the "
                          "flattened bottom blob per instance (%d)" % (self.top_k, b.count_axes(1)),
                          bottom=bottom, error=ShapeError)
            shape = [1] * max(b.ndim, 3)
            shape[0] = b.shape[0]
            shape[2] = self.top_k
            if self.out_max_val:
                shape[1] = 2
            self.view = (b.shape[0], b.count_axes(1), 1)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.view)
        k = self.top_k
        # Stable ascending sort keeps equal values in index order; reversed,
        # it is Caffe's descending (value, index) order.
        try:
            order = xp.argsort(x, axis=1, kind="stable")
        except TypeError:  # pragma: no cover - array modules without kind
            order = xp.argsort(x, axis=1)
        idx = order[:, ::-1, :][:, :k, :]
        if self.has_axis:
            y = top[0].data.reshape(self.view[0], k, self.view[2])
            if self.out_max_val:
                y[...] = xp.take_along_axis(x, idx, axis=1)
            else:
                y[...] = idx
        else:
            n = self.view[0]
            if self.out_max_val:
                y = top[0].data.reshape(n, 2, k)
                y[:, 0, :] = idx[:, :, 0]
                y[:, 1, :] = xp.take_along_axis(x, idx, axis=1)[:, :, 0]
            else:
                top[0].data.reshape(n, k)[...] = idx[:, :, 0]

    def backward(self, top, propagate_down, bottom):
        _no_backward_to(self, propagate_down, bottom, range(len(bottom)),
                        "ArgMax has no backward")


@register_layer("Crop")
class CropLayer(Layer):
    """Crop bottom 0 to the shape of bottom 1 from ``crop_param.axis`` (2) on.

    Axes before ``axis`` are kept; axis i >= axis takes bottom 1's size and
    starts at ``offset`` (one value for all cropped axes, one per cropped
    axis, or none = 0).  Backward: bottom 0's diff is zero except the cropped
    window, which receives the top diff.  Bottom 1 only gives a shape; if
    asked, its diff is set to zero (Caffe leaves it untouched).
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.crop_param
        start = _canonical_axis(self, bottom[0], p.axis, bottom)
        if len(p.offset) > 1 and start + len(p.offset) != bottom[0].ndim:
            self.fail("number of offset values specified (%d) must be equal to the number of "
                      "dimensions following axis %d" % (len(p.offset), start),
                      bottom=bottom, error=ConfigError)

    def reshape(self, bottom, top):
        p = self.layer_param.crop_param
        b0, b1 = bottom
        start = _canonical_axis(self, b0, p.axis, bottom)
        if b1.ndim < b0.ndim:
            self.fail("bottom 1 (the reference shape) needs at least as many axes as bottom 0",
                      bottom=bottom, error=ShapeError)
        offsets = list(p.offset)
        shape, slices = [], []
        for i in range(b0.ndim):
            off, size = 0, b0.shape[i]
            if i >= start:
                size = b1.shape[i]
                if len(offsets) == 1:
                    off = int(offsets[0])
                elif len(offsets) > 1:
                    off = int(offsets[i - start])
                if b0.shape[i] - off < size:
                    self.fail("the crop for dimension %d is out-of-bounds with size %d and offset "
                              "%d" % (i, size, off), bottom=bottom, error=ShapeError)
            shape.append(size)
            slices.append(slice(off, off + size))
        self.slices = tuple(slices)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            dx[self.slices] = top[0].diff
        if len(propagate_down) > 1 and propagate_down[1]:
            bottom[1].diff[...] = 0


# ---------------------------------------------------------------------------
# BatchReindex / Filter
# ---------------------------------------------------------------------------
@register_layer("BatchReindex")
class BatchReindexLayer(Layer):
    """Gather items of bottom 0 along axis 0 by the indices in bottom 1.

    Bottom 1: a 1-D blob of indices (floats, truncated to int as Caffe's
    static_cast; each must be in [0, N)).  Top: (len(bottom 1),) +
    bottom0.shape[1:], top[j] = bottom0[idx[j]].  Backward: bottom 0's diff
    accumulates the top diffs of every position that picked it (0 for items
    never picked).  No backward to the indices.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def reshape(self, bottom, top):
        if bottom[1].ndim != 1:
            self.fail("the index bottom must be 1-D", bottom=bottom, error=ShapeError)
        if bottom[0].ndim < 1:
            self.fail("bottom 0 needs at least one axis", bottom=bottom, error=ShapeError)
        top[0].reshape((bottom[1].shape[0],) + tuple(bottom[0].shape[1:]))

    def _indices(self, bottom):
        xp = bottom[1].xp
        r = bottom[1].data
        n = bottom[0].shape[0]
        if r.size:
            if bool((r < 0).any()):
                self.fail("index specified for reindex layer was negative (%s)"
                          % float(r.min()), bottom=bottom)
            if bool((r >= n).any()):
                self.fail("index specified for reindex layer was greater than batch size "
                          "(%s >= %d)" % (float(r.max()), n), bottom=bottom)
        return r.astype(xp.int64)

    def forward(self, bottom, top):
        idx = self._indices(bottom)
        if top[0].count == 0:
            return
        xp = bottom[0].xp
        xp.take(bottom[0].data, idx, axis=0, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        _no_backward_to(self, propagate_down, bottom, [1], "cannot backprop to index")
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        dx = bottom[0].diff
        dx[...] = 0
        if top[0].count:
            _index_add(xp, dx, self._indices(bottom), top[0].diff)


@register_layer("Filter")
class FilterLayer(Layer):
    """Keep the items (axis 0) whose selector is non-zero.

    Bottoms: k blobs to filter, then the selector (shape (N,) or (N, 1, ...)
    with singleton trailing dims).  Tops: k blobs with the selected items in
    order.  Caffe quirk kept: the setup reshape gives the tops the full batch
    size; every forward reshapes them to the selected count.  Backward:
    selected items get the top diff, the others 0; no backward to the
    selector.
    """

    min_bottom_blobs = 2
    min_top_blobs = 1

    def setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            self.fail("needs one top per filtered bottom (%d bottoms incl. the selector, %d tops)"
                      % (len(bottom), len(top)), bottom=bottom, error=ConfigError)
        self._first_reshape = True
        self._num_bottom = len(bottom)

    def allow_force_backward(self, bottom_index):
        n = getattr(self, "_num_bottom", len(self.layer_param.bottom))
        return bottom_index != n - 1

    def reshape(self, bottom, top):
        sel = bottom[-1]
        if sel.ndim < 1:
            self.fail("the selector needs at least one axis", bottom=bottom, error=ShapeError)
        for i in range(1, sel.ndim):
            if sel.shape[i] != 1:
                self.fail("selector blob dimensions must be singletons (1), except the first",
                          bottom=bottom, error=ShapeError)
        for i, b in enumerate(bottom[:-1]):
            if b.ndim < 1 or b.shape[0] != sel.shape[0]:
                self.fail("each bottom should have the same 0th dimension as the selector blob "
                          "(bottom %d)" % i, bottom=bottom, error=ShapeError)
        xp = sel.xp
        self.indices = xp.nonzero(sel.data.reshape(-1))[0]
        n = int(self.indices.shape[0])
        if self._first_reshape:
            n = sel.shape[0]
            self._first_reshape = False
        for t, b in zip(top, bottom):
            t.reshape((n,) + tuple(b.shape[1:]))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        for t, b in zip(top, bottom):
            if t.count:
                xp.take(b.data, self.indices, axis=0, out=t.data)

    def backward(self, top, propagate_down, bottom):
        _no_backward_to(self, propagate_down, bottom, [len(bottom) - 1],
                        "Filter cannot backpropagate to the selector input")
        for i, t in enumerate(top):
            if propagate_down[i]:
                dx = bottom[i].diff
                dx[...] = 0
                if t.count:
                    dx[self.indices] = t.diff


# ---------------------------------------------------------------------------
# Bias / Scale
# ---------------------------------------------------------------------------
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

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = top[0].diff
        learned = len(bottom) == 1
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            g = top[0].diff.reshape(self.dims).sum(axis=(0, 2))
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
    the bottom is copied before forward (Caffe's temp_).

    Caffe quirk kept: the *learned* scale's gradient overwrites its diff
    instead of accumulating when bottom 0 and s have the same count, or when
    count(0, axis) == 1 with more than one scale value and more than one
    inner value (e.g. batch size 1 after a BatchNorm).  Everywhere else it
    accumulates, like every other parameter.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

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
        if top[0] is bottom[0]:
            if self._saved is None or self._saved.shape != x.shape:
                self._saved = x.copy()
            else:
                self._saved[...] = x
        s = self._scale(bottom).data.reshape(1, self.dims[1], 1)
        xp.multiply(x.reshape(self.dims), s, out=top[0].data.reshape(self.dims))
        if self.bias_layer is not None:
            self.bias_layer.forward([top[0]], top)

    def backward(self, top, propagate_down, bottom):
        if self.bias_layer is not None and self.param_propagate_down[-1]:
            self.bias_layer.backward(top, [False], [top[0]])
        learned = len(bottom) == 1
        scale = self._scale(bottom)
        outer, dim, inner = self.dims
        dy = top[0].diff.reshape(self.dims)
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            xp = top[0].xp
            x = (self._saved if top[0] is bottom[0] else bottom[0].data).reshape(self.dims)
            g = xp.einsum("odi,odi->d", dy, x)
            target = scale.diff.reshape(-1)
            overwrite = (not learned or bottom[0].count == scale.count
                         or (outer == 1 and inner > 1 and dim > 1))
            if overwrite:
                target[...] = g
            else:
                target += g
        if propagate_down[0]:
            xp = top[0].xp
            s = scale.data.reshape(1, dim, 1)
            xp.multiply(dy, s, out=bottom[0].diff.reshape(self.dims))


# ---------------------------------------------------------------------------
# Parameter / Embed
# ---------------------------------------------------------------------------
@register_layer("Parameter")
class ParameterLayer(Layer):
    """No bottoms; outputs its single blob of ``parameter_param.shape``.

    The blob starts at zero (Caffe uses no filler); load or learn it.  Each
    forward makes the top share the blob's data and diff, so a gradient
    written into the top diff is the parameter gradient (Caffe).
    """

    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        shape = tuple(self.layer_param.parameter_param.shape.dim)
        if not self.blobs:
            self.blobs.append(self.new_blob(shape))
        top[0].reshape(shape)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        blob = self.blobs[0]
        if top[0].shape != blob.shape:
            top[0].reshape(blob.shape)
        top[0].share_data(blob)
        top[0].share_diff(blob)

    def backward(self, top, propagate_down, bottom):
        pass


@register_layer("Embed")
class EmbedLayer(Layer):
    """Look up rows of a (input_dim, num_output) table by integer indices.

    ``embed_param``: num_output N, input_dim K, bias_term (true),
    weight_filler / bias_filler (default constant 0).  Bottom: any shape of
    indices (float values that must be integers in [0, K); Caffe only
    checks this in debug builds, netlib always).  Top: bottom.shape + (N,).
    Backward: dW[idx] += dy (repeated indices add up), db += sum dy; no
    backward to the indices (force_backward skips them).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.embed_param
        self.N = int(p.num_output)
        self.K = int(p.input_dim)
        self.bias_term = bool(p.bias_term)
        if self.N <= 0:
            self.fail("EmbedLayer num_output must be positive", error=ConfigError)
        if self.K <= 0:
            self.fail("EmbedLayer input_dim must be positive", error=ConfigError)
        if self.blobs:
            return
        w = self.new_blob((self.K, self.N))
        fill(w, filler_param(p, "weight_filler", type="constant", value=0))
        self.blobs.append(w)
        if self.bias_term:
            b = self.new_blob((self.N,))
            fill(b, filler_param(p, "bias_filler", type="constant", value=0))
            self.blobs.append(b)

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        self.M = bottom[0].count
        top[0].reshape(tuple(bottom[0].shape) + (self.N,))

    def _indices(self, bottom):
        xp = bottom[0].xp
        r = bottom[0].data.reshape(-1)
        idx = r.astype(xp.int64)
        if r.size:
            if bool((idx != r).any()):
                self.fail("non-integer input index", bottom=bottom)
            if bool((idx < 0).any()) or bool((idx >= self.K).any()):
                self.fail("input index out of range [0, %d): min %d, max %d"
                          % (self.K, int(idx.min()), int(idx.max())), bottom=bottom)
        return idx

    def forward(self, bottom, top):
        xp = bottom[0].xp
        idx = self._indices(bottom)
        y = top[0].data.reshape(self.M, self.N)
        xp.take(self.blobs[0].data, idx, axis=0, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        _no_backward_to(self, propagate_down, bottom, [0], "can't backpropagate to EmbedLayer input")
        dy = top[0].diff.reshape(self.M, self.N)
        if self.param_propagate_down[0]:
            _index_add(top[0].xp, self.blobs[0].diff, self._indices(bottom), dy)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
