"""Common (utility / structural) layers: the glue between the big layers.

InnerProduct, Softmax, Reduction, ArgMax, Crop, BatchReindex, Filter,
Parameter and Embed, each with the semantics of BVLC Caffe's
``src/caffe/layers/<name>_layer.cpp`` (checks, shapes, quirks).  The
structural layers (Split, Flatten, Reshape, Concat, Slice, Eltwise, Silence,
Tile) live in :mod:`netlib.builtin.structural`, Bias and Scale in
:mod:`netlib.builtin.scale`; they share these conventions.

Conventions shared by every layer here:

* All math runs on the blob's array module (``xp = blob.xp``: numpy or cupy)
  in the layer's dtype; scalar parameters (coefficients) are cast to that
  dtype first, as Caffe stores them as ``Dtype``.
* Bottom diffs are overwritten, parameter diffs accumulate (``+=``), except
  where a Caffe quirk says otherwise (Scale, documented there).
* Layers that only re-view memory (Parameter here; Split, Flatten, Reshape,
  one-bottom Concat and one-top Slice in ``structural``) share buffers with
  ``share_data`` / ``share_diff`` instead of copying, exactly where Caffe does.
* Weight gradients accumulate inside one GEMM (:func:`gemm_accumulate`,
  Caffe's ``caffe_cpu_gemm`` with beta = 1) instead of ``diff += a @ b``.
* Errors go through ``self.fail`` (layer name, type and blob shapes):
  ``ShapeError`` for shapes a layer cannot take, ``ConfigError`` for
  inconsistent parameters, ``LayerError`` for bad values (indices).
"""
import os

import numpy

from .. import forward_mode
from .. import second_order
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


_CBLAS = {}


def _cblas_gemm(dtype):
    """NumPy's own CBLAS ``?gemm`` through ctypes, or None.

    NumPy exposes no ``beta`` for matmul, so ``c += a @ b`` costs a temporary
    the size of ``c`` and an extra pass over it; for a weight gradient
    (CaffeNet fc6: 37.7M values) that is most of the backward.  The wheels
    ship OpenBLAS (``numpy.libs/libscipy_openblas64_*``, symbols
    ``scipy_cblas_?gemm64_``, 64-bit ints); when it cannot be found (other
    builds, other platforms, ``NETLIB_NO_CBLAS=1``) this returns None and
    the caller falls back to plain NumPy.
    """
    key = numpy.dtype(dtype).char
    if key in _CBLAS:
        return _CBLAS[key]
    fn = None
    if key in "fd" and not os.environ.get("NETLIB_NO_CBLAS"):
        try:
            import ctypes
            import glob
            base = os.path.dirname(os.path.abspath(numpy.__file__))
            libs = []
            for sub in ("numpy.libs", os.path.join("numpy", ".dylibs"), ".dylibs"):
                libs += sorted(glob.glob(os.path.join(base, os.pardir, sub, "*openblas*"))
                               + glob.glob(os.path.join(base, sub, "*openblas*")))
            letter = "s" if key == "f" else "d"
            real = ctypes.c_float if key == "f" else ctypes.c_double
            for path in libs:
                lib = ctypes.CDLL(path)
                for sym, wide in (("scipy_cblas_%sgemm64_" % letter, True),
                                  ("cblas_%sgemm64_" % letter, True),
                                  ("scipy_cblas_%sgemm" % letter, False)):
                    f = getattr(lib, sym, None)
                    if f is None:
                        continue
                    i = ctypes.c_int64 if wide else ctypes.c_int
                    e = ctypes.c_int
                    f.argtypes = [e, e, e, i, i, i, real, ctypes.c_void_p, i, ctypes.c_void_p, i,
                                  real, ctypes.c_void_p, i]
                    f.restype = None
                    fn = f
                    break
                if fn is not None:
                    break
        except (OSError, AttributeError, ImportError):  # pragma: no cover - other builds
            fn = None
    _CBLAS[key] = fn
    return fn


def _blas_operand(arr, item):
    """(transposed, leading dimension) of a 2-D array BLAS can read in place, or None."""
    s0, s1 = arr.strides
    rows, cols = arr.shape
    if s1 == item and s0 % item == 0 and s0 // item >= max(cols, 1):
        return False, s0 // item
    if s0 == item and s1 % item == 0 and s1 // item >= max(rows, 1):
        return True, s1 // item
    return None


# Below this many outputs the temporary is cheap and NumPy's call overhead
# (a few microseconds) is lower than the ctypes call's.
_GEMM_MIN_SIZE = 1 << 14


def gemm_accumulate(xp, a, b, c):
    """``c += a @ b`` for 2-D arrays, as one GEMM with beta = 1 when it can.

    ``a`` and ``b`` may be transposed views (no copy is made); ``c`` must be
    C-contiguous and not overlap them.  On NumPy float32/float64 this calls
    the BLAS NumPy links (see :func:`_cblas_gemm`): no temporary, one pass
    over ``c``, the product accumulated in the BLAS as Caffe's
    ``caffe_cpu_gemm(..., 1., diff)``.  Otherwise (CuPy, other dtypes, no
    BLAS found, or ``c`` smaller than ``_GEMM_MIN_SIZE``) it is ``c += a @ b``.
    """
    fn = None
    if (xp is numpy and c.size >= _GEMM_MIN_SIZE and a.dtype == b.dtype == c.dtype
            and c.flags.c_contiguous and a.ndim == b.ndim == c.ndim == 2 and a.shape[1]):
        fn = _cblas_gemm(c.dtype)
    if fn is not None:
        item = c.itemsize
        oa, ob = _blas_operand(a, item), _blas_operand(b, item)
        if oa is not None and ob is not None:
            m, k = a.shape
            n = b.shape[1]
            fn(101, 112 if oa[0] else 111, 112 if ob[0] else 111, m, n, k, 1.0,
               a.ctypes.data, oa[1], b.ctypes.data, ob[1], 1.0, c.ctypes.data, n)
            return c
    c += a @ b
    return c


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

    jvp = forward_mode.weighted_jvp  # d(W*x + b) = W*dx + dW*x + db (InnerProduct, Convolution, Deconvolution).
    backward_jvp = second_order.weighted_rop  # d(dL/dx) = dW^T g, d(dL/dW) = g (x) dx.
    def backward(self, top, propagate_down, bottom):
        xp = bottom[0].xp
        dy = top[0].diff.reshape(self.M, self.N)
        if self.param_propagate_down[0]:
            x = bottom[0].data.reshape(self.M, self.K)
            dw = self.blobs[0].diff
            if self.transpose:
                gemm_accumulate(xp, x.T, dy, dw)
            else:
                gemm_accumulate(xp, dy.T, x, dw)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
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

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """dx = (g - <g, y>) y  gives  d(dx) = (g - <g, y>) dy - <g, dy> y (dy: the top's tangent)."""
        if not propagate_down[0] or t.top[0] is None:
            return [None], []
        xp = self.xp
        y = top[0].data.reshape(self.view)
        g, dy = top_diffs[0].reshape(self.view), t.top[0].reshape(self.view)
        out = (g - xp.einsum("ocj,ocj->oj", g, y)[:, None, :]) * dy - xp.einsum("ocj,ocj->oj", g, dy)[:, None, :] * y
        return [out.reshape(bottom[0].shape)], []

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
# Reduction / ArgMax / Crop
# ---------------------------------------------------------------------------
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

    jvp = forward_mode.reduction_jvp  # SUM/MEAN linear; ASUM: c*sum(sign(x) dx); SUMSQ: c*sum(2 x dx).

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """SUMSQ: dx = 2 c g x gives d(dx) = 2 c g dx; the others' backward does not
        depend on x (ASUM: piecewise constant sign)."""
        if self.op != _RED.SUMSQ or not propagate_down[0] or t.bottom[0] is None:
            return [None], []
        g = top_diffs[0].reshape(self.num, 1) * self.coeff
        return [(2 * g * t.bottom[0].reshape(self.num, self.dim)).reshape(bottom[0].shape)], []

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

    jvp = forward_mode.zero_jvp  # d top = 0 (data layers, piecewise constant outputs).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
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

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
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

    jvp = forward_mode.first_bottom_linear_jvp  # d top = d bottom 0 reindexed (the indices have no tangent).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
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

    jvp = forward_mode.filter_jvp  # d top_i = the selected items of d bottom_i.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

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

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
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

    jvp = forward_mode.embed_jvp  # d(W[i] + b) = dW[i] + db (the indices have no tangent).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        _no_backward_to(self, propagate_down, bottom, [0], "can't backpropagate to EmbedLayer input")
        dy = top[0].diff.reshape(self.M, self.N)
        if self.param_propagate_down[0]:
            _index_add(top[0].xp, self.blobs[0].diff, self._indices(bottom), dy)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
