"""Normalization layers: LRN, BatchNorm, MVN, plus SPP and Im2col, with Caffe's numbers.

LRN (``lrn_param``: local_size 5 (odd), alpha 1, beta 0.75, norm_region, k 1)
    bottom/top ``(N, C, H, W)`` (4-D only).

    * ACROSS_CHANNELS: ``scale = k + (alpha/n) * sum_{c'} x[c']^2`` over the
      channel window ``c - (n-1)/2 .. c + (n-1)/2`` (zero-padded at the ends),
      ``y = x * scale^-beta``.  Backward (Caffe's formula):
      ``dx = scale^-beta * dy - (2*alpha*beta/n) * x * sum_{window}(dy * y / scale)``.
    * WITHIN_CHANNEL: Caffe builds it from sub-layers (Split, Power 2, AVE
      Pooling n x n pad (n-1)/2 stride 1, Power(-beta, scale alpha, shift 1),
      Eltwise PROD):  ``y = x * (1 + alpha * box(x^2) / n^2)^-beta``.  Quirks
      kept: **k is ignored** (the shift is 1) and the divisor is always
      ``n*n`` (the padded cells count, as AVE pooling counts padding).
      The backward is the chain rule through those sub-layers.

    Vectorised as loops over the ``n`` window offsets (strided views of a
    zero-padded buffer), never over channels or pixels.  In place works: the
    bottom values are kept (copied) when the top is the same blob; the
    backward reads only the bottom values and the stored scale, so a later
    in-place layer that changes the top does not corrupt the gradient.  As
    in Caffe only the scale is kept; ``scale^-beta`` is recomputed in
    backward, and the per-call work arrays come from the shared scratch
    pool (:func:`netlib.builtin.neuron.scratch`), so no call allocates.

BatchNorm (``batch_norm_param``: use_global_stats (default: phase == TEST),
moving_average_fraction 0.999, eps 1e-5)
    bottom/top ``(N, C, ...)`` (any number of axes >= 1; C = 1 for a 1-D
    bottom), statistics per channel over N and all trailing axes.  Three
    state blobs: ``mean_sum (C)``, ``var_sum (C)``, ``scale_factor (1)``.

    * Batch statistics: ``mu = mean(x)``, ``var = mean((x-mu)^2)`` (biased),
      ``y = (x - mu) / sqrt(var + eps)``; running update
      ``s = s*maf + 1``, ``mean_sum = mu + maf*mean_sum``,
      ``var_sum = m/(m-1) * var + maf*var_sum`` (``m = count/C``; factor 1 if
      ``m == 1``) -- the stored variance is unbiased.
    * Global statistics: ``mu = mean_sum / s``, ``var = var_sum / s`` (both 0
      when ``s == 0``: Caffe's ``scale_factor == 0 ? 0 : 1/s``).
    * Backward (Caffe's batch_norm_layer.cpp): global: ``dx = dy / sqrt(var+eps)``;
      batch: ``dx = (dy - mean(dy) - mean(dy*y) * y) / sqrt(var+eps)``.
      The state blobs get no gradient (their diffs are never touched).
    * The state blobs' lr_mult is forced to 0 (Caffe appends ``param { lr_mult: 0 }``
      to the layer parameter for each blob without a ParamSpec); a ParamSpec with a
      non-zero lr_mult is a ConfigError naming the layer.  ``param_propagate_down``
      is False for all three.  In place is allowed.
    * Work per TRAIN pass: the channel sums are matrix-vector products with
      ones / row-wise dot products (no temporaries of the bottom's size);
      the centred values ``x - mu`` are kept (in place: one kept buffer,
      else they are the top until divided) and backward uses
      ``dx = (dy - mean(dy) - mean(dy*(x-mu)) * (x-mu) / (var+eps)) / sqrt(var+eps)``,
      Caffe's formula with ``y = (x-mu)/sqrt(var+eps)`` substituted.

MVN (``mvn_param``: normalize_variance true, across_channels false, eps 1e-9)
    Statistics per (n, c) over the trailing axes, or per n over ``C*H*W``
    with across_channels.  ``y = x - mean``, and with normalize_variance
    ``y = (x - mean) / (sqrt(mean((x-mean)^2)) + eps)`` (eps added to the
    standard deviation, not the variance).  Backward, Caffe's formula:
    ``dx = (dy - mean(dy) - mean(dy*y) * y) / (std + eps)`` -- Caffe quirk kept:
    it is the exact gradient only for eps -> 0 (it treats ``std + eps`` as the
    standard deviation); without normalize_variance ``dx = dy - mean(dy)``.

SPP (``spp_param``: pyramid_height, pool MAX/AVE)
    bottom ``(N, C, H, W)``.  Level ``l`` pools into ``2^l`` bins per axis
    with the vision family's Pooling layer: ``kernel = ceil(H / bins)``,
    ``pad = (kernel*bins - H + 1) / 2`` (integer division), ``stride = kernel``.
    Each level's output is flattened to ``(N, C*bh*bw)`` and the levels are
    concatenated on axis 1.  Caffe quirk kept: with ``pyramid_height: 1`` the
    top is the pooling output itself, ``(N, C, bh, bw)``, not flattened.
    Backward sums the levels' bottom gradients (Caffe's Split).

Im2col (``convolution_param``: kernel/stride/pad/dilation, axis)
    bottom ``(outer..., C, *spatial)``, top ``(outer..., C*prod(kernel), *out)``
    with Caffe's convolution output size; rows ordered channel, then kernel
    offsets in raster order (Caffe's column buffer).  Backward is col2im.
"""
import numpy

from .. import accel
from .. import forward_mode
from .. import second_order
from ..errors import ConfigError, ShapeError
from ..im2col import col2im, geometry, im2col
from ..layer import Layer, register_layer
from .blocks import per_row as _per_row, row_blocks as _row_blocks, row_dots as _row_dots
from .neuron import scratch
from .pooling import PoolingLayer


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


def _buffer(owner, name, shape, dtype, xp, zero=False):
    """A per-layer work array kept between calls (re-made when the shape changes)."""
    arr = getattr(owner, name, None)
    shape = tuple(int(s) for s in shape)
    if (arr is None or tuple(arr.shape) != shape or arr.dtype != dtype
            or not isinstance(arr, xp.ndarray)):
        arr = xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
        setattr(owner, name, arr)
    return arr


# ---------------------------------------------------------------------------
# LRN
# ---------------------------------------------------------------------------
@register_layer("LRN")
class LRNLayer(Layer):
    """Caffe's LRN (ACROSS_CHANNELS / WITHIN_CHANNEL); see the module docstring."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        from ..proto import caffe_pb2
        p = self.layer_param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            self.fail("LRN only supports odd values for local_size (got %d)" % self.size,
                      bottom=bottom, error=ConfigError)
        self.pre_pad = (self.size - 1) // 2
        self.alpha = float(p.alpha)
        self.beta = float(p.beta)
        self.k = float(p.k)
        self.region = int(p.norm_region)
        R = caffe_pb2.LRNParameter
        if self.region not in (R.ACROSS_CHANNELS, R.WITHIN_CHANNEL):
            self.fail("unknown normalization region %d" % self.region, error=ConfigError)
        self.across = self.region == R.ACROSS_CHANNELS

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            self.fail("input must have 4 axes, corresponding to (num, channels, height, width)",
                      bottom=bottom, error=ShapeError)
        if top[0] is not b:
            top[0].reshape(b.shape)

    # forward ------------------------------------------------------------------
    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data
        dt = x.dtype.type
        N, C, H, W = x.shape
        n, pp = self.size, self.pre_pad
        if top[0] is bottom[0]:
            keep = _buffer(self, "_x_copy", x.shape, x.dtype, xp)
            keep[...] = x
            x = keep
        else:
            self._x_copy = None
        if self.across:
            # scale = k + sum over the zero-padded channel window of (alpha/n) x^2
            # (Caffe adds alpha_over_size * x^2 terms to k): the window sum is
            # n - 1 adds of shifted views, written into the kept scale buffer.
            padded = _buffer(self, "_padded", (N, C + n - 1, H, W), x.dtype, xp, zero=True)
            sq = padded[:, pp:pp + C]
            xp.multiply(x, x, out=sq)
            sq *= dt(self.alpha) / dt(n)
            scale = _buffer(self, "_scale", x.shape, x.dtype, xp)
            self._window_sum(padded, C, scale, xp)
            scale += dt(self.k)
            power = scratch(xp, x.shape, x.dtype)
            xp.power(scale, dt(-self.beta), out=power)
        else:
            # P = 1 + alpha * AVEpool_{n x n, pad (n-1)/2, stride 1}(x^2); k ignored.
            padded = _buffer(self, "_padded", (N, C, H + n - 1, W + n - 1), x.dtype, xp,
                             zero=True)
            xp.multiply(x, x, out=padded[:, :, pp:pp + H, pp:pp + W])
            pooled = self._box(padded, H, W, xp) / dt(n * n)
            scale = _buffer(self, "_scale", x.shape, x.dtype, xp)
            xp.multiply(pooled, dt(self.alpha), out=scale)
            scale += dt(1)
            power = _buffer(self, "_power", x.shape, x.dtype, xp)
            xp.power(scale, dt(-self.beta), out=power)
        xp.multiply(x, power, out=top[0].data)

    def _window_sum(self, padded, C, out, xp):
        """out = sum_{i < n} padded[:, i:i + C] (the channel window, n - 1 passes)."""
        n = self.size
        if n == 1:
            out[...] = padded[:, 0:C]
            return out
        xp.add(padded[:, 0:C], padded[:, 1:1 + C], out=out)
        for i in range(2, n):
            out += padded[:, i:i + C]
        return out

    def _box(self, padded, H, W, xp):
        """Sum over the n x n window (separable: n row offsets, then n column offsets)."""
        n = self.size
        rows = padded[:, :, 0:H, :].copy()
        for i in range(1, n):
            rows += padded[:, :, i:i + H, :]
        out = rows[:, :, :, 0:W].copy()
        for j in range(1, n):
            out += rows[:, :, :, j:j + W]
        return out

    # backward -----------------------------------------------------------------
    jvp = forward_mode.lrn_jvp  # dy = dx s^-b - b x s^(-b-1) (a/n) win(2 x dx).

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """s = k + a win(x^2), backward dx = g s^-b - 2 a b x win(g x s^(-b-1))
        (win its own transpose); along the tangent u, with ds = 2 a win(x u):
        d(dx) = -b g s^(-b-1) ds - 2 a b (u win(Q) + x win(dQ)), Q = g x s^(-b-1),
        dQ = g (u s^(-b-1) - (b + 1) x s^(-b-2) ds)."""
        if not propagate_down[0] or t.bottom[0] is None:
            return [None], []
        x = self._x_copy if getattr(self, "_x_copy", None) is not None else bottom[0].data
        u, g, b = t.bottom[0], top_diffs[0], self.beta
        win, a, k = forward_mode.lrn_window(self, x)
        s = k + a * win(x * x)
        ds = 2 * a * win(x * u)
        s1 = s ** (-b - 1)
        q = g * x * s1
        dq = g * (u * s1 - (b + 1) * x * s1 / s * ds)
        out = -b * g * s1 * ds - 2 * a * b * (u * win(q) + x * win(dq))
        return [out.astype(self.dtype, copy=False)], []

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        x = self._x_copy if self._x_copy is not None else bottom[0].data
        dy = top[0].diff
        dt = x.dtype.type
        N, C, H, W = x.shape
        n, pp = self.size, self.pre_pad
        scale = self._scale
        if self.across:
            # dx = scale^-beta dy - 2 alpha beta / n * x * sum_window(dy * y / scale)
            # with y / scale = x * scale^(-beta-1).  As Caffe, scale^-beta is
            # recomputed from the kept scale (no second kept buffer).  In
            # place dx is dy: dy is read (the ratio) before dx is written.
            power = scratch(xp, x.shape, x.dtype, 0)
            xp.power(scale, dt(-self.beta), out=power)
            padded = self._padded
            ratio = padded[:, pp:pp + C]
            xp.multiply(dy, x, out=ratio)
            ratio *= power
            ratio /= scale
            accum = self._window_sum(padded, C, scratch(xp, x.shape, x.dtype, 1), xp)
            accum *= x
            accum *= dt(2) * dt(self.alpha) * dt(self.beta) / dt(n)
            dx = bottom[0].diff
            xp.multiply(power, dy, out=dx)
            dx -= accum
        else:
            power = self._power
            # Eltwise PROD -> Power(-beta, alpha, 1) -> AVE pool -> Power(2) -> Split.
            d_pool = dy * x
            d_pool *= dt(-self.beta) * dt(self.alpha)
            d_pool *= power
            d_pool /= scale
            padded = self._padded
            padded[:, :, pp:pp + H, pp:pp + W] = d_pool
            d_sq = self._box(padded, H, W, xp) / dt(n * n)
            dx = dy * power
            dx += dt(2) * x * d_sq
            bottom[0].diff[...] = dx


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------
@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    """Caffe's BatchNorm; see the module docstring."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    #: With :mod:`netlib.accel`: bottoms of at least this many elements run on
    #: the compiled kernels (per-channel passes in parallel, sums in float64).
    accel_min_elements = 1 << 16

    def setup(self, bottom, top):
        p = self.layer_param.batch_norm_param
        self.moving_average_fraction = float(p.moving_average_fraction)
        if p.HasField("use_global_stats"):
            self.use_global_stats = bool(p.use_global_stats)
        else:
            self.use_global_stats = self.phase == 1
        self.eps = float(p.eps)
        b = bottom[0]
        self.channels = 1 if b.num_axes == 1 else int(b.shape[1])
        if len(self.blobs):
            shapes = [tuple(bl.shape) for bl in self.blobs]
            want = [(self.channels,), (self.channels,), (1,)]
            if len(self.blobs) != 3 or [_prod(s) for s in shapes] != [_prod(s) for s in want]:
                self.fail("needs 3 blobs of shapes %s, has %s" % (want, shapes), bottom=bottom)
        else:
            for shape in ((self.channels,), (self.channels,), (1,)):
                blob = self.new_blob(shape)
                blob.data[...] = 0
                self.blobs.append(blob)
        # Mask the statistics from optimisation: lr_mult 0 for every blob.
        params = self.layer_param.param
        for i in range(len(self.blobs)):
            if i == len(params):
                params.add().lr_mult = 0.0
            elif params[i].lr_mult != 0:
                self.fail("cannot configure batch normalization statistics as layer parameters "
                          "(param %d has lr_mult %g; it must be 0 or absent)"
                          % (i, params[i].lr_mult), bottom=bottom, error=ConfigError)
        self.param_propagate_down = [False] * len(self.blobs)
        self._z = None

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes >= 1 and (1 if b.num_axes == 1 else b.shape[1]) != self.channels:
            self.fail("channel count changed: set up with %d channels" % self.channels,
                      bottom=bottom, error=ShapeError)
        if top[0] is not b:
            top[0].reshape(b.shape)

    def _view(self, arr):
        n = arr.shape[0] if arr.ndim else 1
        return arr.reshape(n, self.channels, -1)

    def _ones_for(self, sp, dtype, xp):
        ones = getattr(self, "_ones", None)
        if ones is None or ones.shape != (sp,) or ones.dtype != dtype:
            ones = self._ones = xp.ones(sp, dtype=dtype)
        return ones

    def _channel_sum(self, a, xp, b=None):
        """Per-channel sum over N and the trailing axes of an (N, C, S) array
        (of ``a * b`` when ``b`` is given), without a temporary of a's size:
        a matrix-vector product with ones (Caffe's gemv with its
        spatial_sum_multiplier) or a row-wise dot product, then the sum over N."""
        n, c, sp = a.shape
        rows = a.reshape(n * c, sp)
        if b is None:
            ones = getattr(self, "_ones", None)
            if ones is None or ones.shape != (sp,) or ones.dtype != a.dtype:
                ones = self._ones = xp.ones(sp, dtype=a.dtype)
            per = xp.matmul(rows, ones)
        else:
            per = xp.einsum("ij,ij->i", rows, b.reshape(n * c, sp))
        return per.reshape(n, c).sum(axis=0)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = self._view(bottom[0].data)
        y = self._view(top[0].data)
        dt = x.dtype.type
        mean_sum, var_sum, sf = (bl.data for bl in self.blobs[:3])
        m = x.shape[0] * x.shape[2]
        k = accel.kernels_for(x, y, min_elements=self.accel_min_elements,
                              phase=self.phase)
        if self.use_global_stats:
            s = float(sf.reshape(-1)[0])   # Caffe reads the scale factor on the host
            factor = dt(0) if s == 0 else dt(1) / dt(s)
            mean = factor * mean_sum.reshape(-1)
            var = factor * var_sum.reshape(-1)
            std = xp.sqrt(var + dt(self.eps))
            if k is not None:
                k.bn_apply(x, y, mean, std)
            else:
                xp.subtract(x, mean.reshape(1, -1, 1), out=y)
                y /= std.reshape(1, -1, 1)
            self._z = None
        elif k is not None:
            # the compiled kernel: the same three passes per channel, in parallel
            z = _buffer(self, "_z_store", x.shape, x.dtype, xp) if top[0] is bottom[0] else y
            c = self.channels
            mean, var, std = (numpy.empty(c, x.dtype) for _ in range(3))
            k.bn_train_forward(x, y, z, mean, var, std, numpy.array([self.eps], x.dtype))
            self._update_moving_averages(mean, var, m, dt)
            self._z = z if z is not y else None
        else:
            # Two passes as Caffe (mean, then the mean of (x - mean)^2).  The
            # centred values z = x - mean are what backward needs; in place
            # they go to a kept buffer (the top overwrites x and a later
            # in-place layer overwrites the top), else straight into the top.
            mean = self._channel_sum(x, xp) / dt(m)
            z = _buffer(self, "_z_store", x.shape, x.dtype, xp) if top[0] is bottom[0] else y
            # z = x - mean and the row sums of z*z, block by block while the
            # block is in cache (the same operations as unblocked)
            n, c, sp = x.shape
            x2, z2 = x.reshape(n * c, sp), z.reshape(n * c, sp)
            mean_rows = _per_row(xp, mean, n)
            per = xp.empty(n * c, dtype=x.dtype)
            for r0, r1 in _row_blocks(n * c, sp):
                zb = z2[r0:r1]
                xp.subtract(x2[r0:r1], mean_rows[r0:r1], out=zb)
                _row_dots(xp, zb, zb, per[r0:r1])
            var = per.reshape(n, c).sum(axis=0) / dt(m)
            self._update_moving_averages(mean, var, m, dt)
            std = xp.sqrt(var + dt(self.eps))
            xp.divide(z, std.reshape(1, -1, 1), out=y)
            self._z = z if z is not y else None
        self._std = std
        self._mean = mean

    def _update_moving_averages(self, mean, var, m, dt):
        """Caffe's running sums: s = maf*s + 1, mean_sum = mean + maf*mean_sum,
        var_sum = m/(m-1) var + maf*var_sum (the unbiased variance)."""
        mean_sum, var_sum, sf = (bl.data for bl in self.blobs[:3])
        maf = dt(self.moving_average_fraction)
        sf *= maf
        sf += dt(1)
        mean_sum[...] = mean.reshape(mean_sum.shape) + maf * mean_sum
        corr = dt(m) / dt(m - 1) if m > 1 else dt(1)
        var_sum[...] = corr * var.reshape(var_sum.shape) + maf * var_sum

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """Global statistics: linear, zero.  Batch statistics, per channel over
        the m = N*S values, y = z / std: dx = (g - mean g - y mean(g y)) / std
        gives d(dx) = -mean(y dx) dx / std - (dy mean(g y) + y mean(g dy)) / std,
        dx on the right the gradient itself and dy the top's tangent."""
        if self.use_global_stats or not propagate_down[0] or t.bottom[0] is None:
            return [None], [None] * len(self.blobs)
        std = self._std.reshape(1, -1, 1)
        z = self._z if self._z is not None else self._view(bottom[0].data) - self._mean.reshape(1, -1, 1)
        y = z / std
        g, dx = self._view(top_diffs[0]), self._view(t.bottom[0])

        def mean(a):
            return a.mean(axis=(0, 2), keepdims=True)

        dy = self._view(t.top[0]) if t.top[0] is not None else (dx - mean(dx) - y * mean(y * dx)) / std
        gy = mean(g * y)
        grad = (g - mean(g) - y * gy) / std
        out = -mean(y * dx) * grad / std - (dy * gy + y * mean(g * dy)) / std
        return [out.reshape(bottom[0].shape).astype(self.dtype, copy=False)], [None] * len(self.blobs)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        dy = self._view(top[0].diff)
        dx = self._view(bottom[0].diff)
        std = self._std.reshape(1, -1, 1)
        if self.use_global_stats:
            xp.divide(dy, std, out=dx)
            return
        dt = dy.dtype.type
        m = dy.shape[0] * dy.shape[2]
        z = self._z
        src = self._view(bottom[0].data) if z is None else z
        k = accel.kernels_for(dy, dx, src, min_elements=self.accel_min_elements,
                              phase=self.phase)
        if k is not None and isinstance(self._std, numpy.ndarray):
            c = self.channels
            mean = self._mean if z is None else numpy.zeros(c, dy.dtype)   # z - 0 is z
            k.bn_train_backward(dy, src, mean.astype(dy.dtype, copy=False),
                                self._std.astype(dy.dtype, copy=False), dx,
                                numpy.empty(c, dy.dtype), numpy.empty(c, dy.dtype))
            return
        work = scratch(xp, dy.shape, dy.dtype)
        if z is None:   # out of place: the bottom still holds x
            z = xp.subtract(self._view(bottom[0].data), self._mean.reshape(1, -1, 1), out=work)
        # Caffe: dx = (dy - mean(dy) - mean(dy * y) * y) / std with y = z / std,
        # i.e. dx = (dy + k1 * z + k0) / std, k1 = -mean(dy * z) / std^2, k0 = -mean(dy).
        # dx may be dy itself (in place): the sums are taken first.
        # Two blocked passes: the row sums of dy*z and of dy, then dx, each
        # block's operations running while it is in cache.
        n, c, sp = dy.shape
        dy2, z2, dx2 = dy.reshape(n * c, sp), z.reshape(n * c, sp), dx.reshape(n * c, sp)
        blocks = _row_blocks(n * c, sp)
        ones = self._ones_for(sp, dy.dtype, xp)
        dots = xp.empty(n * c, dtype=dy.dtype)
        sums = xp.empty(n * c, dtype=dy.dtype)
        for r0, r1 in blocks:
            _row_dots(xp, dy2[r0:r1], z2[r0:r1], dots[r0:r1])
            xp.matmul(dy2[r0:r1], ones, out=sums[r0:r1])
        k1 = dots.reshape(n, c).sum(axis=0) / (dt(-m) * self._std * self._std)
        k0 = sums.reshape(n, c).sum(axis=0) / dt(-m)
        k1r, k0r, stdr = _per_row(xp, k1, n), _per_row(xp, k0, n), _per_row(xp, self._std, n)
        w2 = scratch(xp, (blocks[0][1] - blocks[0][0], sp), dy.dtype, slot=1) if blocks else None
        for r0, r1 in blocks:
            wb = w2[:r1 - r0]
            xp.multiply(z2[r0:r1], k1r[r0:r1], out=wb)
            wb += k0r[r0:r1]
            wb += dy2[r0:r1]
            xp.divide(wb, stdr[r0:r1], out=dx2[r0:r1])


# ---------------------------------------------------------------------------
# MVN
# ---------------------------------------------------------------------------
@register_layer("MVN")
class MVNLayer(Layer):
    """Caffe's MVN; see the module docstring."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        self._y_copy = None

    def reshape(self, bottom, top):
        if bottom[0].num_axes < 1:
            self.fail("needs a bottom with at least one axis", bottom=bottom, error=ShapeError)
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _view(self, arr):
        shape = arr.shape
        num = shape[0] if self.across_channels else shape[0] * (shape[1] if len(shape) > 1 else 1)
        return arr.reshape(num, -1)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = self._view(bottom[0].data)
        y = self._view(top[0].data)
        dt = x.dtype.type
        mean = x.mean(axis=1, dtype=x.dtype).reshape(-1, 1)
        xp.subtract(x, mean, out=y)
        self._mean = mean
        if self.normalize_variance:
            var = (y * y).mean(axis=1, dtype=x.dtype).reshape(-1, 1)
            std = xp.sqrt(var)
            std += dt(self.eps)
            y /= std
            self._std = std
            if top[0] is bottom[0]:
                keep = _buffer(self, "_y_store", y.shape, y.dtype, xp)
                keep[...] = y
                self._y_copy = keep
            else:
                self._y_copy = None

    jvp = forward_mode.symmetric_jvp  # d top = J d bottom = J^T d bottom: the layer's backward of the tangent.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """Mean only: linear, zero.  With the variance, per row (s = std + eps,
        y = z / s): the backward dx = (g - mean g - y mean(g y)) / s gives
        d(dx) = -(ds / s) dx - (dy mean(g y) + y mean(g dy)) / s, with
        dz = dx_t - mean(dx_t), ds = mean(z dz) / std, dy = (dz - y ds) / s."""
        if not self.normalize_variance or not propagate_down[0] or t.bottom[0] is None:
            return [None], []
        s = self._std
        y = self._y_copy if self._y_copy is not None else (self._view(bottom[0].data) - self._mean) / s
        g, dxt = self._view(top_diffs[0]), self._view(t.bottom[0])

        def mean(a):
            return a.mean(axis=1, keepdims=True)

        dz = dxt - mean(dxt)
        std = s - self.dtype.type(self.eps)
        ds = mean(y * dz) * s / self.xp.where(std > 0, std, 1)  # a constant row (std 0): y = 0, ds = 0
        dy = (dz - y * ds) / s
        gy = mean(g * y)
        grad = (g - mean(g) - y * gy) / s
        out = -(ds / s) * grad - (dy * gy + y * mean(g * dy)) / s
        return [out.reshape(bottom[0].shape).astype(self.dtype, copy=False)], []

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        dy = self._view(top[0].diff)
        dx = self._view(bottom[0].diff)
        dt = dy.dtype.type
        dim = dy.shape[1]
        if not self.normalize_variance:
            mean_dy = dy.mean(axis=1, dtype=dy.dtype).reshape(-1, 1)
            xp.subtract(dy, mean_dy, out=dx)
            return
        if self._y_copy is not None:
            y = self._y_copy
        else:
            y = self._view(bottom[0].data) - self._mean
            y /= self._std
        sum_dyy = (dy * y).sum(axis=1, dtype=dy.dtype).reshape(-1, 1)
        sum_dy = dy.sum(axis=1, dtype=dy.dtype).reshape(-1, 1)
        g = y * sum_dyy
        g += sum_dy
        g *= dt(-1.0 / dim)
        g += dy
        xp.divide(g, self._std, out=dx)


# ---------------------------------------------------------------------------
# SPP
# ---------------------------------------------------------------------------
@register_layer("SPP")
class SPPLayer(Layer):
    """Caffe's spatial pyramid pooling; see the module docstring."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        from ..proto import caffe_pb2
        p = self.layer_param.spp_param
        self.pyramid_height = int(p.pyramid_height)
        if self.pyramid_height < 1:
            self.fail("pyramid_height must be at least 1 (got %d)" % self.pyramid_height,
                      bottom=bottom, error=ConfigError)
        P = caffe_pb2.SPPParameter
        if p.pool not in (P.MAX, P.AVE, P.STOCHASTIC):
            self.fail("unknown pooling method %d" % p.pool, error=ConfigError)
        self.pool = int(p.pool)    # SPPParameter.PoolMethod values equal PoolingParameter's
        self._geom = None

    def _pooling_param(self, level, H, W):
        from ..proto import caffe_pb2
        bins = 2 ** level
        lp = caffe_pb2.LayerParameter(name="%s_pool%d" % (self.name, level), type="Pooling")
        pp = lp.pooling_param
        kh = -(-H // bins)
        kw = -(-W // bins)
        pp.kernel_h, pp.kernel_w = kh, kw
        pp.pad_h, pp.pad_w = (kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2
        pp.stride_h, pp.stride_w = kh, kw
        pp.pool = self.pool
        return lp

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            self.fail("input must have 4 axes, corresponding to (num, channels, height, width)",
                      bottom=bottom, error=ShapeError)
        N, C, H, W = b.shape
        if H <= 0 or W <= 0:
            self.fail("input dimensions cannot be zero", bottom=bottom, error=ShapeError)
        if self._geom != b.shape:
            self._geom = b.shape
            self._levels = []
            for level in range(self.pyramid_height):
                layer = PoolingLayer(self._pooling_param(level, H, W), phase=self.phase,
                                     dtype=self.dtype, xp=self.xp)
                layer.need_backward = getattr(self, "need_backward", True)
                src = self.new_blob(b.shape)
                out = self.new_blob()
                try:
                    layer.SetUp([src], [out])
                except ConfigError as exc:
                    self.fail("pyramid level %d: %s" % (level, exc), bottom=bottom,
                              error=ConfigError)
                self._levels.append((layer, src, out))
        for layer, src, out in self._levels:
            src.reshape(b.shape)
            src.share_data(b)
            layer.reshape([src], [out])
        if self.pyramid_height == 1:
            top[0].reshape(self._levels[0][2].shape)
        else:
            top[0].reshape(N, sum(o.count_axes(1) for _, _, o in self._levels))

    def forward(self, bottom, top):
        y = top[0].data.reshape(top[0].shape[0], -1)
        start = 0
        for layer, src, out in self._levels:
            layer.forward([src], [out])
            width = out.count_axes(1)
            y[:, start:start + width] = out.data.reshape(out.shape[0], width)
            start += width

    backward_jvp = second_order.zero_rop  # its levels' pooling (MAX, AVE) and concatenation: piecewise linear.

    def jvp(self, bottom, top, tangents, param_tangents):
        """d top = the levels' pooling tangents, flattened and concatenated."""
        parts = [layer.jvp([src], [out], tangents, None)[0] for layer, src, out in self._levels]
        if self.pyramid_height == 1:
            return [parts[0].reshape(top[0].shape)]
        return [self.xp.concatenate([p.reshape(top[0].shape[0], -1) for p in parts], axis=1)]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(top[0].shape[0], -1)
        dx = bottom[0].diff
        start = 0
        for i, (layer, src, out) in enumerate(self._levels):
            width = out.count_axes(1)
            out.diff[...] = dy[:, start:start + width].reshape(out.shape)
            start += width
            layer.backward([out], [True], [src])
            if i == 0:
                dx[...] = src.diff
            else:
                dx += src.diff


# ---------------------------------------------------------------------------
# Im2col
# ---------------------------------------------------------------------------
@register_layer("Im2col")
class Im2colLayer(Layer):
    """Caffe's Im2col layer; see the module docstring."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def _values(self, p, name, hw, default, bottom):
        nsp = self.num_spatial_axes
        rep = [int(v) for v in getattr(p, name)]
        if hw is not None and (p.HasField(hw + "_h") or p.HasField(hw + "_w")):
            if nsp != 2:
                self.fail("%s_h & %s_w can only be used for 2-D im2col" % (hw, hw),
                          bottom=bottom, error=ConfigError)
            if rep:
                self.fail("either %s or %s_h/w should be specified, not both" % (name, hw),
                          bottom=bottom, error=ConfigError)
            return (int(getattr(p, hw + "_h")), int(getattr(p, hw + "_w")))
        if not rep:
            if default is None:
                self.fail("kernel size missing: give kernel_size (or kernel_h and kernel_w)",
                          bottom=bottom, error=ConfigError)
            return (default,) * nsp
        if len(rep) == 1:
            return tuple(rep) * nsp
        if len(rep) != nsp:
            self.fail("%s must be specified once, or once per spatial dimension (%d given, %d "
                      "spatial axes)" % (name, len(rep), nsp), bottom=bottom, error=ConfigError)
        return tuple(rep)

    def setup(self, bottom, top):
        p = self.layer_param.convolution_param
        b = bottom[0]
        try:
            self.channel_axis = b.canonical_axis_index(p.axis)
        except ShapeError:
            self.fail("axis %d is out of range" % p.axis, bottom=bottom, error=ShapeError)
        self.num_spatial_axes = b.num_axes - self.channel_axis - 1
        if self.num_spatial_axes < 1:
            self.fail("needs at least one spatial axis after the channel axis %d"
                      % self.channel_axis, bottom=bottom, error=ShapeError)
        self.kernel = self._values(p, "kernel_size", "kernel", None, bottom)
        self.stride = self._values(p, "stride", "stride", 1, bottom)
        self.pad = self._values(p, "pad", "pad", 0, bottom)
        self.dilation = self._values(p, "dilation", None, 1, bottom)
        for name in ("kernel", "stride", "dilation"):
            if any(v <= 0 for v in getattr(self, name)):
                self.fail("%s dimensions must be positive (%s)" % (name, getattr(self, name)),
                          bottom=bottom, error=ConfigError)

    def reshape(self, bottom, top):
        b = bottom[0]
        ax = self.channel_axis
        if b.num_axes != ax + 1 + self.num_spatial_axes:
            self.fail("bottom num_axes may not change", bottom=bottom, error=ShapeError)
        spatial = b.shape[ax + 1:]
        _, _, _, _, out = geometry(spatial, self.kernel, self.pad, self.stride, self.dilation)
        if any(o <= 0 for o in out):
            self.fail("kernel %s does not fit the input (output size %s)" % (self.kernel, out),
                      bottom=bottom, error=ShapeError)
        self.out_shape = out
        top[0].reshape(b.shape[:ax] + (b.shape[ax] * _prod(self.kernel),) + out)

    def forward(self, bottom, top):
        b = bottom[0]
        ax = self.channel_axis
        num, C = b.count_axes(0, ax), b.shape[ax]
        x = b.data.reshape((num, C) + b.shape[ax + 1:])
        col = top[0].data.reshape((num, C) + self.kernel + self.out_shape)
        im2col(x, self.kernel, self.pad, self.stride, self.dilation, out_shape=self.out_shape,
               out=col)

    jvp = forward_mode.linear_jvp  # d top = forward(d bottom, d params): the layer is linear in both.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        b = bottom[0]
        ax = self.channel_axis
        num, C = b.count_axes(0, ax), b.shape[ax]
        spatial = b.shape[ax + 1:]
        col = top[0].diff.reshape((num, C) + self.kernel + self.out_shape)
        col2im(col, spatial, self.kernel, self.pad, self.stride, self.dilation,
               out=b.diff.reshape((num, C) + spatial))
