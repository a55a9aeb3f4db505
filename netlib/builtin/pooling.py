"""Pooling, with Caffe's numbers.

Pooling (``pooling_param``)
    bottom ``(N, C, H, W)`` (4-D only), top ``(N, C, PH, PW)`` with
    ``PH = ceil((H + 2*pad - k) / stride) + 1`` (``floor`` with
    ``round_mode: FLOOR``, or with the fork field ``ceil_mode: false`` of
    DenseNet's Caffe, which when given takes precedence over round_mode) and
    Caffe's correction: when a pad is non-zero and the last window starts at
    or past ``H + pad``, it is dropped (whatever the rounding).  An output
    size below 1 (kernel larger than the padded input) is a ShapeError.

    * MAX: windows clipped to the image, top starts at ``-FLT_MAX``, strict
      ``>`` so the first maximum in raster order wins (NaNs never win; a
      window with no real pixel stays ``-FLT_MAX`` with index -1).  An optional
      second top holds the argmax as a float flat index ``h*W + w``.
    * AVE: the divisor is ``(hend-hstart)*(wend-wstart)`` with
      ``hend = min(hstart+k, H+pad)`` computed BEFORE clipping to the image
      (padding counts, overhang past H+pad does not); the sum covers only real
      pixels.  Caffe quirk kept: a window starting exactly at H+pad (possible
      with pad 0 and stride > kernel) divides 0 by 0.
    * STOCHASTIC: Caffe's CPU code is NOT_IMPLEMENTED.  TEST phase gives
      Caffe GPU's formula ``sum(a*a) / (FLT_MIN + sum(a))`` over the window;
      TRAIN phase (random sampling) and backward raise a clear error.
    * global_pooling: kernel = (H, W); needs pad 0 and stride 1.

    Forward runs over kernel offsets only (running ``fmax`` / running sums on
    strided views of the whole batch).  When a backward may follow (TRAIN
    phase, or a mask top) MAX tracks the running argmax (kernel offset, strict
    ``>``); otherwise it is recomputed from the bottom if backward is called.
    Backward adds per kernel offset in the order that reproduces Caffe's
    accumulation order exactly.
"""
import numpy

from ..errors import ConfigError, ShapeError
from ..im2col import axis_ranges, pool_clip_last, pool_out_size
from ..layer import Layer, register_layer

FLT_MAX = float(numpy.finfo(numpy.float32).max)
FLT_MIN = float(numpy.finfo(numpy.float32).tiny)


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------
@register_layer("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling (MAX / AVE / STOCHASTIC-TEST); see the module docstring."""

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 2
    #: Bottom bytes per batch chunk of the kernel-offset loops (cache-sized).
    chunk_bytes = 2 << 20

    def setup(self, bottom, top):
        from ..proto import caffe_pb2
        P = caffe_pb2.PoolingParameter
        p = self.layer_param.pooling_param
        self.method = p.pool
        if self.method not in (P.MAX, P.AVE, P.STOCHASTIC):
            self.fail("unknown pooling method %d" % self.method, error=ConfigError)
        if len(top) > 1 and self.method != P.MAX:
            self.fail("only MAX pooling can have a second (mask) top; this layer has %d tops"
                      % len(top), bottom=bottom, error=ConfigError)
        self.global_pooling = bool(p.global_pooling)
        has_k, has_kh, has_kw = p.HasField("kernel_size"), p.HasField("kernel_h"), p.HasField("kernel_w")
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                self.fail("with global_pooling: true the filter size cannot be specified",
                          error=ConfigError)
        else:
            if has_k == (has_kh and has_kw):
                if has_k:
                    self.fail("filter size is kernel_size OR kernel_h and kernel_w; not both",
                              error=ConfigError)
                self.fail("kernel size missing: give kernel_size, or both kernel_h and kernel_w "
                          "(or global_pooling: true)", error=ConfigError)
        if not ((not p.HasField("pad") and p.HasField("pad_h") and p.HasField("pad_w"))
                or (not p.HasField("pad_h") and not p.HasField("pad_w"))):
            self.fail("pad is pad OR pad_h and pad_w are required", error=ConfigError)
        if not ((not p.HasField("stride") and p.HasField("stride_h") and p.HasField("stride_w"))
                or (not p.HasField("stride_h") and not p.HasField("stride_w"))):
            self.fail("stride is stride OR stride_h and stride_w are required", error=ConfigError)
        if self.global_pooling:
            self.kernel_h, self.kernel_w = 0, 0   # set from the bottom in reshape
        elif has_k:
            self.kernel_h = self.kernel_w = int(p.kernel_size)
        else:
            self.kernel_h, self.kernel_w = int(p.kernel_h), int(p.kernel_w)
        if not self.global_pooling and (self.kernel_h <= 0 or self.kernel_w <= 0):
            self.fail("filter dimensions cannot be zero (kernel %dx%d)"
                      % (self.kernel_h, self.kernel_w), error=ConfigError)
        if p.HasField("pad_h"):
            self.pad_h, self.pad_w = int(p.pad_h), int(p.pad_w)
        else:
            self.pad_h = self.pad_w = int(p.pad)
        if p.HasField("stride_h"):
            self.stride_h, self.stride_w = int(p.stride_h), int(p.stride_w)
        else:
            self.stride_h = self.stride_w = int(p.stride)
        if self.stride_h <= 0 or self.stride_w <= 0:
            self.fail("stride must be positive (stride %dx%d)" % (self.stride_h, self.stride_w),
                      error=ConfigError)
        if self.global_pooling and (self.pad_h or self.pad_w or self.stride_h != 1 or self.stride_w != 1):
            self.fail("with global_pooling: true only pad = 0 and stride = 1 are allowed",
                      error=ConfigError)
        if self.pad_h or self.pad_w:
            if self.method not in (P.MAX, P.AVE):
                self.fail("padding is implemented only for average and max pooling",
                          error=ConfigError)
            if not self.global_pooling and (self.pad_h >= self.kernel_h or self.pad_w >= self.kernel_w):
                self.fail("pad (%d, %d) must be smaller than the kernel (%d, %d)"
                          % (self.pad_h, self.pad_w, self.kernel_h, self.kernel_w),
                          error=ConfigError)
        # The fork field ceil_mode (DenseNet's Caffe), when given, overrides round_mode.
        if p.HasField("ceil_mode"):
            self.ceil_mode = bool(p.ceil_mode)
        else:
            self.ceil_mode = p.round_mode == P.CEIL
        self._P = P
        self._geom_key = None
        self._argmax = None
        self._argmax_valid = False

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            self.fail("input must have 4 axes, corresponding to (num, channels, height, width)",
                      bottom=bottom, error=ShapeError)
        N, C, H, W = b.shape
        if self.global_pooling:
            self.kernel_h, self.kernel_w = H, W
        kh, kw, ph, pw, sh, sw = (self.kernel_h, self.kernel_w, self.pad_h, self.pad_w,
                                  self.stride_h, self.stride_w)
        PH = pool_out_size(H, kh, ph, sh, self.ceil_mode)
        PW = pool_out_size(W, kw, pw, sw, self.ceil_mode)
        if ph or pw:
            PH = pool_clip_last(PH, H, ph, sh)
            PW = pool_clip_last(PW, W, pw, sw)
        if PH <= 0 or PW <= 0:
            self.fail("kernel %dx%d (pad %d,%d, stride %d,%d) does not fit the %dx%d input "
                      "(kernel larger than the padded input): output size %dx%d"
                      % (kh, kw, ph, pw, sh, sw, H, W, PH, PW), bottom=bottom, error=ShapeError)
        top[0].reshape(N, C, PH, PW)
        if len(top) > 1:
            top[1].reshape(N, C, PH, PW)
        self.out_hw = (PH, PW)
        key = (H, W, kh, kw, ph, pw, sh, sw, PH, PW)
        if key != self._geom_key:
            self._geom_key = key
            self._build_plan(H, W, PH, PW)
        self._argmax_valid = False

    def _build_plan(self, H, W, PH, PW):
        kh, kw, ph, pw, sh, sw = (self.kernel_h, self.kernel_w, self.pad_h, self.pad_w,
                                  self.stride_h, self.stride_w)
        rh = axis_ranges(H, PH, kh, ph, sh, 1)
        rw = axis_ranges(W, PW, kw, pw, sw, 1)
        plan = []
        for i in range(kh):
            lo_h, hi_h, st_h = rh[i]
            if lo_h >= hi_h:
                continue
            for j in range(kw):
                lo_w, hi_w, st_w = rw[j]
                if lo_w >= hi_w:
                    continue
                ysl = (Ellipsis, slice(lo_h, hi_h), slice(lo_w, hi_w))
                xsl = (Ellipsis, slice(st_h, st_h + (hi_h - lo_h - 1) * sh + 1, sh),
                       slice(st_w, st_w + (hi_w - lo_w - 1) * sw + 1, sw))
                plan.append((i * kw + j, ysl, xsl))
        self._plan = plan
        self._n_offsets = kh * kw
        # A single window covering the whole image: a plain reduction.
        self._whole = (PH == 1 and PW == 1 and ph == 0 and pw == 0 and kh >= H and kw >= W)
        # AVE divisor (Caffe's pool_size, computed before clipping to the image).
        hs = numpy.arange(PH) * sh - ph
        ws = numpy.arange(PW) * sw - pw
        dh = numpy.minimum(hs + kh, H + ph) - hs
        dw = numpy.minimum(ws + kw, W + pw) - ws
        self._divisor_host = (dh[:, None] * dw[None, :]).astype(numpy.float64)
        self._divisor = None
        # Mask top: flat index of the window's top-left corner (may be negative).
        self._corner_host = hs[:, None] * W + ws[None, :]
        self._corner = None

    def _device(self, name, dtype):
        arr = getattr(self, name)
        host = getattr(self, name + "_host")
        if arr is None or arr.dtype != dtype or not isinstance(arr, self.xp.ndarray):
            arr = self.xp.asarray(host.astype(dtype))
            setattr(self, name, arr)
        return arr

    def _index_dtype(self):
        # argmax is stored as kernel offset + 1 (0: no pixel won), in the smallest type
        n = self._n_offsets + 1
        return numpy.uint8 if n <= 255 else numpy.uint16 if n <= 65535 else numpy.int32

    def _chunks(self, shape):
        """Batch chunks whose bottom slice is about ``chunk_bytes`` (cache-sized:
        the offset loops are memory-bound, 3-4x faster on a cached chunk)."""
        n = shape[0]
        per_image = _prod(shape[1:]) * 4
        nb = max(1, min(n, self.chunk_bytes // max(per_image, 1)))
        return [slice(b, min(b + nb, n)) for b in range(0, n, nb)]

    # -- forward ----------------------------------------------------------------
    def _wants_argmax(self, top):
        if len(top) > 1:
            return True
        return self.phase == 0 and getattr(self, "need_backward", True)

    def forward(self, bottom, top):
        P = self._P
        x = bottom[0].data
        y = top[0].data
        if self.method == P.MAX:
            self._forward_max(x, y, top)
        elif self.method == P.AVE:
            self._forward_ave(x, y)
        else:
            self._forward_stochastic(x, y)

    def _forward_max(self, x, y, top):
        xp = self.xp
        if self._wants_argmax(top):
            self._compute_argmax(x, y)
        elif self._whole:
            self._whole_max(x, y, None)
        else:
            for c in self._chunks(x.shape):
                xc, yc = x[c], y[c]
                yc.fill(-FLT_MAX)
                for _, ysl, xsl in self._plan:
                    yv = yc[ysl]
                    xp.fmax(yv, xc[xsl], out=yv)      # fmax: NaN never wins, as with Caffe's >
        if len(top) > 1:
            self._write_mask(top[1].data, x.shape[3])

    def _argmax_buffer(self, shape):
        xp = self.xp
        dtype = self._index_dtype()
        a = self._argmax
        if a is None or tuple(a.shape) != tuple(shape) or a.dtype != dtype or not isinstance(a, xp.ndarray):
            self._argmax = xp.empty(shape, dtype=dtype)
        return self._argmax

    def _whole_max(self, x, y, idx):
        """One window covering the image: reductions.  Windows whose max is not
        above -FLT_MAX (all -inf / NaN) give -FLT_MAX and no argmax, as in Caffe;
        a NaN among real values makes the max NaN -> -FLT_MAX here (Caffe would
        skip the NaN)."""
        N, C, H, W = x.shape
        flat = x.reshape(N, C, H * W)
        y[...] = flat.max(axis=2).reshape(y.shape)
        bad = ~(y > -FLT_MAX)
        if idx is not None:
            idx[...] = (flat.argmax(axis=2) + 1).reshape(y.shape)
            idx[bad] = 0
        y[bad] = -FLT_MAX

    def _compute_argmax(self, x, y):
        """Caffe's loop vectorised over kernel offsets: y starts at -FLT_MAX and
        offset k wins where ``x > y`` strictly (first maximum in raster order).
        The index update is arithmetic (offsets only grow, so
        ``idx = max(idx, (x > y) * (k + 1))``), much cheaper than masked copies."""
        xp = self.xp
        idx = self._argmax_buffer(y.shape)
        if self._whole:
            self._whole_max(x, y, idx)
        else:
            itype = idx.dtype.type
            chunks = self._chunks(x.shape)
            nb = chunks[0].stop - chunks[0].start if chunks else 0
            gt_buf = xp.empty((nb,) + tuple(y.shape[1:]), dtype=bool)
            tmp_buf = xp.empty((nb,) + tuple(y.shape[1:]), dtype=idx.dtype)
            for c in chunks:
                xc, yc, ic = x[c], y[c], idx[c]
                yc.fill(-FLT_MAX)
                ic.fill(0)
                gt, tmp = gt_buf[:c.stop - c.start], tmp_buf[:c.stop - c.start]
                for k, ysl, xsl in self._plan:
                    yv, xv = yc[ysl], xc[xsl]
                    g = xp.greater(xv, yv, out=gt[ysl])
                    xp.fmax(yv, xv, out=yv)
                    t = xp.multiply(g, itype(k + 1), out=tmp[ysl])
                    iv = ic[ysl]
                    xp.maximum(iv, t, out=iv)
        self._argmax_valid = True
        return idx

    def _write_mask(self, mask, W):
        """Flat index ``h*W + w`` of each window's argmax (-1 where none)."""
        idx = self._argmax
        dt = mask.dtype
        if self._whole:
            mask[...] = idx.astype(dt) - 1
            return
        kw = self.kernel_w
        corner = self._device("_corner", dt)
        k = idx.astype(numpy.int32) - 1
        i = k // kw
        j = k - i * kw
        mask[...] = corner + (i.astype(dt) * dt.type(W) + j.astype(dt))
        mask[idx == 0] = -1

    def _forward_ave(self, x, y):
        xp = self.xp
        if self._whole:
            N, C, H, W = x.shape
            y[...] = x.reshape(N, C, H * W).sum(axis=2).reshape(y.shape) / y.dtype.type(H * W)
            return
        divisor = self._device("_divisor", y.dtype)
        for c in self._chunks(x.shape):
            xc, yc = x[c], y[c]
            yc.fill(0)
            for _, ysl, xsl in self._plan:       # raster order: Caffe's summation order
                yv = yc[ysl]
                yv += xc[xsl]
            with numpy.errstate(divide="ignore", invalid="ignore"):
                xp.divide(yc, divisor, out=yc)

    def _forward_stochastic(self, x, y):
        if self.phase == 0:
            self.fail("STOCHASTIC pooling in TRAIN phase is not implemented (Caffe's CPU code is "
                      "NOT_IMPLEMENTED; only its GPU kernel samples); use MAX or AVE, or TEST phase",
                      error=ConfigError)
        xp = self.xp
        total = xp.empty_like(y)
        total.fill(FLT_MIN)
        squares = xp.zeros_like(y)
        for _, ysl, xsl in self._plan:
            xv = x[xsl]
            tv = total[ysl]
            tv += xv
            sv = squares[ysl]
            sv += xv * xv
        with numpy.errstate(divide="ignore", invalid="ignore"):
            xp.divide(squares, total, out=y)

    # -- backward -----------------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        P = self._P
        gy = top[0].diff
        dx = bottom[0].diff
        if self.method == P.MAX:
            self._backward_max(gy, dx, bottom[0].data)
        elif self.method == P.AVE:
            self._backward_ave(gy, dx)
        else:
            self.fail("STOCHASTIC pooling has no backward here (Caffe implements it on the GPU "
                      "only, from TRAIN-phase samples)", error=ConfigError)

    def _backward_max(self, gy, dx, x):
        """Route each top diff to its window's argmax.  The argmax comes from
        forward, or is recomputed from the bottom when forward took the fast
        path (never from the top data, which an in-place layer may change).
        Offsets run in reverse so every bottom pixel sums its windows in
        Caffe's (ph, pw) raster order: the same float sums as Caffe."""
        xp = self.xp
        if not self._argmax_valid:
            self._compute_argmax(x, xp.empty_like(gy))
        idx = self._argmax
        if self._whole:
            N, C, H, W = dx.shape
            hw = xp.arange(1, H * W + 1, dtype=idx.dtype).reshape(1, 1, H * W)
            dx[...] = ((idx.reshape(N, C, 1) == hw) * gy.reshape(N, C, 1)).reshape(dx.shape)
            return
        itype = idx.dtype.type
        for c in self._chunks(dx.shape):
            dc, gc, ic = dx[c], gy[c], idx[c]
            dc.fill(0)
            for k, ysl, xsl in reversed(self._plan):
                dv = dc[xsl]
                dv += gc[ysl] * (ic[ysl] == itype(k + 1))

    def _backward_ave(self, gy, dx):
        if self._whole:
            N, C, H, W = dx.shape
            dx[...] = gy.reshape(N, C, 1, 1) / gy.dtype.type(H * W)
            return
        with numpy.errstate(divide="ignore", invalid="ignore"):
            g = gy / self._device("_divisor", gy.dtype)
        for c in self._chunks(dx.shape):
            dc, gc = dx[c], g[c]
            dc.fill(0)
            for _, ysl, xsl in reversed(self._plan):
                dv = dc[xsl]
                dv += gc[ysl]
