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
    strided views).  When a backward may follow (TRAIN phase, or a mask top)
    MAX tracks the running argmax (kernel offset + 1 in the smallest unsigned
    type, updated arithmetically: ``idx = max(idx, (x > y) * (k + 1))``, as
    offsets only grow); otherwise it is recomputed from the bottom if backward
    is called.  Backward adds per kernel offset in reverse, so that every
    bottom pixel sums its windows in Caffe's (ph, pw) raster order.  Every
    path below does Caffe's float operations in Caffe's order, so the numbers
    are Caffe's bit for bit (tests/test_pooling_paths.py checks each path
    against Caffe's per-window loops, with ties, -inf/NaN and padding):

    * channels-last (numpy, when some kernel offset covers only part of the
      top -- padding or ceil overhang -- and planes of up to ``cl_max_plane``
      pixels): chunks of ``(n, c)`` planes are transposed (blocked copies) to
      ``(H, W, rows)``, so each kernel-offset view has a long contiguous inner
      axis.  On NCHW views numpy's per-row overhead on the ``PW``-long rows
      (16 on CIFAR) and partial (non-contiguous) outputs dominate: 1.5-3x
      slower.  The argmax is then kept as ``(PH, PW, N*C)``.
    * direct (every offset covers the whole top, e.g. 3x3/2 on 27x27 or
      2x2/2 on even sizes; large planes; another array module): strided
      views of batch chunks in NCHW, scratch outputs contiguous.
    * one window covering the image (global pooling, or a 7x7 kernel on
      7x7): MAX is an ``fmax`` reduction (NaN skipped, as Caffe's ``>``) with
      the argmax as the first pixel equal to it; AVE is Caffe's running sum
      in raster order on transposed chunks (numpy's pairwise ``sum`` rounds
      differently); backward writes ``0 + g`` (no ``-0``, as Caffe).

    * compiled (:mod:`netlib.accel`, when numba is installed): Caffe's
      per-window loops themselves, parallel over planes (the argmax as Caffe's
      flat index when the compiled forward made it, else read from the NumPy
      forward's offsets); used for backward and strided AVE forwards, where
      they measured faster (see ``_accel``).

    Known deviation (not Caffe's): the MAX offset loops compute
    ``g * (idx == k+1)``, so an inf or NaN top diff also makes the other
    pixels of its window NaN (Caffe routes it to the argmax only, as the
    global path here does); finite diffs are exact.
"""
import numpy

from .. import accel
from .. import forward_mode
from .. import second_order
from ..errors import ConfigError, ShapeError
from ..im2col import axis_ranges, pool_clip_last, pool_out_size
from ..layer import Layer, register_layer

FLT_MAX = float(numpy.finfo(numpy.float32).max)
FLT_MIN = float(numpy.finfo(numpy.float32).tiny)


def _to_rows_last(xp, src, dst, block):
    """``dst[:, :n] = src.T`` for ``src`` of shape ``(n, L)``: a transpose in
    blocks of ``block`` rows (one unblocked strided copy is ~5x slower)."""
    n = src.shape[0]
    for b in range(0, n, block):
        e = min(b + block, n)
        xp.copyto(dst[:, b:e], src[b:e].T)


def _from_rows_last(xp, src, dst, block):
    """``dst = src[:, :n].T`` for ``dst`` of shape ``(n, L)`` (blocked)."""
    n = dst.shape[0]
    for b in range(0, n, block):
        e = min(b + block, n)
        xp.copyto(dst[b:e], src[:, b:e].T)


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
    #: Channels-last path: planes (H*W) up to this many pixels take it.
    cl_max_plane = 64 * 64
    #: Channels-last path: bottom bytes per chunk of planes, clamped to
    #: ``cl_rows`` planes (the length of the inner loops).
    cl_chunk_bytes = 1 << 20
    #: The same for backward (its transpose back to NCHW prefers shorter chunks).
    cl_backward_chunk_bytes = 256 << 10
    cl_rows = (64, 512)
    #: Pixels per block of the blocked transposes (a block is a power of two
    #: of planes in ``cl_block_rows``): fewer, larger copies on small maps.
    cl_block_pixels = 16384
    cl_block_rows = (8, 256)
    #: Global AVE: bottom bytes per chunk of planes (its running sum costs
    #: H*W numpy calls per chunk).
    whole_chunk_bytes = 4 << 20
    #: With :mod:`netlib.accel` on: run every forward on the compiled kernels
    #: (by default only those measured faster; see ``_accel``).
    accel_forward_all = False

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
        self._argmax_cl = False
        self._argmax_flat = False
        self._bufs = {}
        self._views = {}

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
        full = [(ysl[1].stop - ysl[1].start, ysl[2].stop - ysl[2].start) == (PH, PW) for _, ysl, _ in plan]
        # The first offset covers the whole top: it initialises it (no fill).
        self._first_full = bool(plan) and full[0]
        # Some offset covers only part of the top (padding, ceil overhang): the
        # direct path's partial views are ~3x slower per element than full ones.
        self._partial = not all(full)
        # Windows never overlap (stride >= kernel): backward writes each bottom
        # pixel once, ``0 + g`` straight into it (a fill only if some pixel
        # is in no window).
        self._disjoint = sh >= kh and sw >= kw
        covered = sum((ysl[1].stop - ysl[1].start) * (ysl[2].stop - ysl[2].start) for _, ysl, _ in plan)
        self._covers_all = self._disjoint and covered == H * W
        # The same views on a channels-last (H, W, rows) chunk.
        self._cl_plan = [(k, ysl[1:], xsl[1:]) for k, ysl, xsl in plan]
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
        self._cl_divisor_host = self._divisor_host[:, :, None]
        self._cl_divisor = None
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

    def _buf(self, name, shape, dtype):
        """A scratch buffer kept across calls (reallocated on shape/dtype change)."""
        b = self._bufs.get(name)
        if b is None or tuple(b.shape) != tuple(shape) or b.dtype != dtype:
            b = self._bufs[name] = self.xp.empty(shape, dtype=dtype)
            self._views.clear()
        return b

    def _scratch(self, buf, shape):
        """A C-contiguous ``shape`` array at the start of the contiguous ``buf``
        (ufuncs into a contiguous output run ~3x faster than into a partial
        view); the views are cached (they are made per offset and chunk).  A
        view of a since-replaced buffer still owns valid scratch memory."""
        key = (id(buf), buf.dtype, shape)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 256:
                self._views.clear()
            v = self._views[key] = buf.reshape(-1)[:_prod(shape)].reshape(shape)
        return v

    def _cl_ok(self, shape):
        """Whether this bottom shape takes the channels-last path (numpy only:
        on a GPU module the direct views have no per-row loop overhead)."""
        return (not self._whole and self._partial and self.xp is numpy
                and shape[2] * shape[3] <= self.cl_max_plane)

    def _cl_geometry(self, NC, plane, itemsize, chunk_bytes=None):
        """(planes per chunk, planes per transpose block) for the channels-last path."""
        lo, hi = self.cl_block_rows
        blk = lo
        while blk * 2 <= min(hi, self.cl_block_pixels // max(plane, 1)):
            blk *= 2
        lo, hi = self.cl_rows
        chunk_bytes = self.cl_chunk_bytes if chunk_bytes is None else chunk_bytes
        nc = min(max(lo, chunk_bytes // max(plane * itemsize, 1)), hi)
        nc = max(blk, nc - nc % blk)
        return max(1, min(NC, nc)), blk

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

    def _offsets_forward(self, mode, plan, xc, yc, ic=None, mask=None, code=None, divisor=None):
        """One chunk's kernel-offset loop, in either layout (``plan``'s views
        index ``xc`` / ``yc`` / ``ic``).  ``mode`` "max": running ``fmax`` from
        -FLT_MAX (NaN never wins, as with Caffe's ``>``); "argmax": also the
        running offset + 1 in ``ic`` (``mask`` / ``code``: contiguous scratch);
        "ave": the running sum from 0 in raster order, then / ``divisor``.
        When the first offset covers the whole top it initialises the top
        (``max(x, -FLT_MAX)``, ``0 + x``) instead of a fill and an update."""
        xp = self.xp
        rest = plan
        if self._first_full:
            k, _, xsl = plan[0]
            xv = xc[xsl]
            rest = plan[1:]
            if mode == "ave":
                xp.add(xv, 0.0, out=yc)            # 0 + x: -0 becomes +0, as Caffe's sum
            else:
                if mode == "argmax":               # x > -FLT_MAX strictly: offset k wins
                    g = xp.greater(xv, -FLT_MAX, out=self._scratch(mask, xv.shape))
                    xp.multiply(g, ic.dtype.type(k + 1), out=ic)
                xp.fmax(xv, -FLT_MAX, out=yc)
        else:
            yc.fill(0 if mode == "ave" else -FLT_MAX)
            if mode == "argmax":
                ic.fill(0)
        if mode == "ave":
            for _, ysl, xsl in rest:
                yv = yc[ysl]
                xp.add(yv, xc[xsl], out=yv)
            with numpy.errstate(divide="ignore", invalid="ignore"):
                xp.divide(yc, divisor, out=yc)
        elif mode == "max":
            for _, ysl, xsl in rest:
                yv = yc[ysl]
                xp.fmax(yv, xc[xsl], out=yv)
        else:
            itype = ic.dtype.type
            for k, ysl, xsl in rest:
                yv, xv = yc[ysl], xc[xsl]
                g = xp.greater(xv, yv, out=self._scratch(mask, yv.shape))
                xp.fmax(yv, xv, out=yv)
                t = xp.multiply(g, itype(k + 1), out=self._scratch(code, yv.shape))
                iv = ic[ysl]
                xp.maximum(iv, t, out=iv)

    def _offsets_backward(self, plan, gc, dc, ic=None, mask=None, sel=None):
        """One chunk's backward loop, in either layout: ``dc`` = sum over
        offsets, in ``plan``'s (reversed) order, of the top diff ``gc``
        (already divided by the pool size for AVE) or, with the argmax ``ic``,
        ``gc * (ic == k+1)``.  Disjoint windows write ``0 + g`` once per pixel."""
        xp = self.xp
        if not self._covers_all:
            dc.fill(0)
        disjoint = self._disjoint
        for k, ysl, xsl in plan:
            if ic is None:
                t = gc[ysl]
            else:
                iv = ic[ysl]
                e = xp.equal(iv, ic.dtype.type(k + 1), out=self._scratch(mask, iv.shape))
                t = xp.multiply(gc[ysl], e, out=self._scratch(sel, iv.shape))
            dv = dc[xsl]
            if disjoint:
                xp.add(t, 0.0, out=dv)
            else:
                xp.add(dv, t, out=dv)

    def _accel(self, *arrays, forward=False):
        """The compiled kernels (:mod:`netlib.accel`) when they can serve these
        arrays (NumPy, C-contiguous, float32/float64) and pay here, else None.
        Measured against the NumPy paths (2 threads): backward gains 2.5-13x
        with overlapping windows (one pass instead of one per kernel offset),
        up to 8x on large maps with disjoint ones (VGG's 2x2/2; on small maps,
        LeNet's, NumPy's one pass per offset is as fast and needs no thread
        pool), reading the argmax of NumPy's forward.  Forward: AVE with
        strided windows (1.3-1.5x); MAX stays on NumPy: alone the compiled
        loop is 1.3-1.5x faster, but inside a training step it runs right
        after a GEMM whose BLAS threads still spin, gets one core, and
        measured slower (CaffeNet's step 0.87-0.95x with MAX forward on
        NumPy).  One window over the image (global) stays in NumPy."""
        if self.xp is not numpy or self._whole:
            return None
        if not self.accel_forward_all:
            if self._disjoint and max(a.size for a in arrays) < accel.PARALLEL_MIN_ELEMENTS:
                return None
            if forward and (self.method == self._P.MAX or self.stride_h == 1 or self.stride_w == 1):
                return None
        return accel.kernels_for(*arrays, phase=self.phase)

    @staticmethod
    def _planes(a):
        N, C, H, W = a.shape
        return a.reshape(N * C, H, W)

    def _geometry(self):
        return (self.kernel_h, self.kernel_w, self.stride_h, self.stride_w, self.pad_h, self.pad_w)

    def _forward_max(self, x, y, top):
        k = self._accel(x, y, forward=True)
        if self._wants_argmax(top):
            self._compute_argmax(x, y, k)
            return self._finish_max(x, top)
        self._argmax_valid = False  # an argmax a backward recomputed is of the last input
        if self.accel_forward_all and k is not None:
            # (by default NumPy: without an argmax its fmax passes are faster)
            k.max_pool_forward(self._planes(x), self._planes(y), self._no_index(), *self._geometry(), False)
        elif self._whole:
            self._whole_max(x, y, None)
        elif self._cl_ok(x.shape):
            self._cl_forward(x, y, "max")
        else:
            for c in self._chunks(x.shape):
                self._offsets_forward("max", self._plan, x[c], y[c])
        self._finish_max(x, top)

    def _finish_max(self, x, top):
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
        """One window covering the image: an ``fmax`` reduction (NaN skipped,
        as by Caffe's strict ``>``), the argmax as the first pixel equal to it
        (Caffe's first maximum in raster order).  Windows whose max is not above
        -FLT_MAX (all -inf / NaN / -FLT_MAX) give -FLT_MAX and no argmax."""
        xp = self.xp
        N, C, H, W = x.shape
        flat = x.reshape(N, C, H * W)
        reduce = getattr(xp.fmax, "reduce", None)
        if reduce is not None:
            m = reduce(flat, axis=2)
        else:                                      # array modules without ufunc.reduce
            m = xp.nanmax(flat, axis=2)
        bad = ~(m > -FLT_MAX)
        m[bad] = -FLT_MAX
        if idx is not None:
            eq = xp.equal(flat, m[:, :, None], out=self._buf("whole_eq", flat.shape, bool))
            first = eq.argmax(axis=2)
            first += 1
            first[bad] = 0
            idx[...] = first.reshape(idx.shape)
        y[...] = m.reshape(y.shape)

    def _no_index(self):
        b = self._bufs.get("no_index")
        if b is None:
            b = self._bufs["no_index"] = numpy.zeros((1, 1, 1), numpy.int32)
        return b

    def _compute_argmax(self, x, y, k=None):
        """Caffe's loop vectorised over kernel offsets: y starts at -FLT_MAX and
        offset k wins where ``x > y`` strictly (first maximum in raster order).
        The index update is arithmetic (offsets only grow, so
        ``idx = max(idx, (x > y) * (k + 1))``), much cheaper than masked copies.
        With the compiled kernels ``k``: Caffe's loop itself, the argmax kept
        as Caffe's flat index ``h*W + w`` (int32, -1 for none)."""
        self._argmax_cl = False
        self._argmax_flat = k is not None
        if k is not None:
            a = self._argmax
            if a is None or tuple(a.shape) != tuple(y.shape) or a.dtype != numpy.int32:
                a = self._argmax = numpy.empty(y.shape, numpy.int32)
            k.max_pool_forward(self._planes(x), self._planes(y), self._planes(a), *self._geometry(),
                               True)
            self._argmax_valid = True
            return a
        if self._cl_ok(x.shape):
            self._cl_forward(x, y, "argmax")
            self._argmax_cl = True
            self._argmax_valid = True
            return self._argmax
        idx = self._argmax_buffer(y.shape)
        if self._whole:
            self._whole_max(x, y, idx)
        else:
            chunks = self._chunks(x.shape)
            nb = chunks[0].stop - chunks[0].start if chunks else 0
            mask = self._buf("d_mask", (nb,) + tuple(y.shape[1:]), bool)
            code = self._buf("d_code", (nb,) + tuple(y.shape[1:]), idx.dtype)
            for c in chunks:
                self._offsets_forward("argmax", self._plan, x[c], y[c], idx[c], mask, code)
        self._argmax_valid = True
        return idx

    def _write_mask(self, mask, W):
        """Flat index ``h*W + w`` of each window's argmax (-1 where none)."""
        idx = self._argmax
        if self._argmax_flat:
            mask[...] = idx
            return
        if self._argmax_cl:
            PH, PW, NC = idx.shape
            idx = idx.reshape(PH * PW, NC).T.reshape(mask.shape)
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
        k = self._accel(x, y, forward=True)
        if k is not None:
            k.ave_pool_forward(self._planes(x), self._planes(y), self._device("_divisor", y.dtype),
                               *self._geometry())
            return
        if self._whole:
            self._whole_ave(x, y)
            return
        if self._cl_ok(x.shape):
            self._cl_forward(x, y, "ave")
            return
        divisor = self._device("_divisor", y.dtype)
        for c in self._chunks(x.shape):
            self._offsets_forward("ave", self._plan, x[c], y[c], divisor=divisor)

    def _whole_ave(self, x, y):
        """One window covering the image: Caffe's running sum in raster order
        (numpy's pairwise ``sum`` would round differently), on planes
        transposed in chunks so each of the H*W additions is one long vector."""
        xp = self.xp
        N, C, H, W = x.shape
        NC, HW = N * C, H * W
        x2 = x.reshape(NC, HW)
        contiguous = y.flags.c_contiguous
        y1 = y.reshape(NC) if contiguous else xp.empty(NC, dtype=y.dtype)
        _, blk = self._cl_geometry(NC, HW, x.dtype.itemsize)
        # long chunks: each chunk costs H*W + a few numpy calls
        nc = max(1, min(NC, max(self.cl_rows[1], self.whole_chunk_bytes // (HW * x.dtype.itemsize))))
        xt = self._buf("xt", (HW, nc), x.dtype)
        div = y.dtype.type(HW)
        for c0 in range(0, NC, nc):
            n = min(nc, NC - c0)
            _to_rows_last(xp, x2[c0:c0 + n], xt, blk)
            acc = y1[c0:c0 + n]
            xp.add(xt[0, :n], 0.0, out=acc)          # 0 + x: -0 becomes +0, as in Caffe
            for i in range(1, HW):
                xp.add(acc, xt[i, :n], out=acc)
            xp.divide(acc, div, out=acc)
        if not contiguous:
            y[...] = y1.reshape(y.shape)

    def _cl_forward(self, x, y, mode):
        """Channels-last forward, ``mode`` "max", "argmax" or "ave": per chunk
        of planes, transpose to (H, W, n), run the kernel-offset loop of the
        direct path (same operations, same order), transpose the top back."""
        xp = self.xp
        N, C, H, W = x.shape
        PH, PW = y.shape[2], y.shape[3]
        NC = N * C
        out = y if y.flags.c_contiguous else xp.empty(y.shape, dtype=y.dtype)
        x2 = x.reshape(NC, H * W)
        y2 = out.reshape(NC, PH * PW)
        nc, blk = self._cl_geometry(NC, H * W, x.dtype.itemsize)
        xt = self._buf("xt", (H, W, nc), x.dtype)
        yt = self._buf("yt", (PH, PW, nc), y.dtype)
        xt2, yt2 = xt.reshape(H * W, nc), yt.reshape(PH * PW, nc)
        ic = mask = code = divisor = None
        if mode == "argmax":
            idx = self._argmax_buffer((PH, PW, NC))
            mask = self._buf("mask", (PH, PW, nc), bool)
            code = self._buf("code", (PH, PW, nc), idx.dtype)
        elif mode == "ave":
            divisor = self._device("_cl_divisor", y.dtype)
        for c0 in range(0, NC, nc):
            n = min(nc, NC - c0)
            _to_rows_last(xp, x2[c0:c0 + n], xt2, blk)
            if mode == "argmax":
                ic = idx[:, :, c0:c0 + n]
            self._offsets_forward(mode, self._cl_plan, xt[:, :, :n], yt[:, :, :n], ic, mask, code, divisor)
            _from_rows_last(xp, yt2, y2[c0:c0 + n], blk)
        if out is not y:
            y[...] = out

    def _cl_backward(self, gy, dx, mode):
        """Channels-last backward ("max" from the (PH, PW, N*C) argmax, or
        "ave"): offsets in reverse, as the direct path, for Caffe's sums."""
        xp = self.xp
        N, C, H, W = dx.shape
        PH, PW = gy.shape[2], gy.shape[3]
        NC = N * C
        out = dx if dx.flags.c_contiguous else xp.empty(dx.shape, dtype=dx.dtype)
        g2 = gy.reshape(NC, PH * PW)
        d2 = out.reshape(NC, H * W)
        nc, blk = self._cl_geometry(NC, H * W, dx.dtype.itemsize, self.cl_backward_chunk_bytes)
        dt = self._buf("b_xt", (H, W, nc), dx.dtype)      # own buffers: another chunk size
        gt = self._buf("b_yt", (PH, PW, nc), gy.dtype)
        dt2, gt2 = dt.reshape(H * W, nc), gt.reshape(PH * PW, nc)
        plan = self._cl_plan[::-1]
        ic = mask = sel = divisor = None
        if mode == "max":
            idx = self._argmax
            mask = self._buf("b_mask", (PH, PW, nc), bool)
            sel = self._buf("b_gsel", (PH, PW, nc), gy.dtype)
        else:
            divisor = self._device("_cl_divisor", gy.dtype)
        for c0 in range(0, NC, nc):
            n = min(nc, NC - c0)
            _to_rows_last(xp, g2[c0:c0 + n], gt2, blk)
            gc = gt[:, :, :n]
            if mode == "ave":
                with numpy.errstate(divide="ignore", invalid="ignore"):
                    xp.divide(gc, divisor, out=gc)
            else:
                ic = idx[:, :, c0:c0 + n]
            self._offsets_backward(plan, gc, dt[:, :, :n], ic, mask, sel)
            _from_rows_last(xp, dt2, d2[c0:c0 + n], blk)
        if out is not dx:
            dx[...] = out

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
    jvp = forward_mode.max_pool_jvp  # MAX: d top = d bottom at each window's argmax; AVE: linear.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
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
        k = self._accel(gy, dx, x)
        if self._argmax_valid and self._argmax_flat and k is None:
            self._argmax_valid = False          # made by the compiled kernels, now off: recompute
        if not self._argmax_valid:
            self._compute_argmax(x, self._buf("recomputed_top", gy.shape, gy.dtype),
                                 self._accel(x, gy, forward=True))
        idx = self._argmax
        if self._argmax_flat:
            k.max_pool_backward(self._planes(gy), self._planes(idx), self._planes(dx))
            return
        if k is not None:                       # the NumPy forward's argmax (offset + 1)
            codes = idx.transpose(2, 0, 1) if self._argmax_cl else self._planes(idx)
            k.max_pool_backward_codes(self._planes(gy), codes, self._planes(dx),
                                      self.kernel_w, self.stride_h, self.stride_w,
                                      self.pad_h, self.pad_w)
            return
        if self._argmax_cl:
            self._cl_backward(gy, dx, "max")
            return
        if self._whole:
            # Caffe: zero, then 0 + g at each window's argmax (none where idx is 0)
            N, C, H, W = dx.shape
            out = dx if dx.flags.c_contiguous else xp.empty(dx.shape, dtype=dx.dtype)
            out.fill(0)
            i1 = idx.reshape(N * C)
            rows = xp.nonzero(i1)[0]
            out.reshape(N * C, H * W)[rows, i1[rows].astype(numpy.intp) - 1] = gy.reshape(N * C)[rows] + 0.0
            if out is not dx:
                dx[...] = out
            return
        chunks = self._chunks(dx.shape)
        nb = chunks[0].stop - chunks[0].start if chunks else 0
        mask = self._buf("d_mask", (nb,) + tuple(gy.shape[1:]), bool)
        sel = self._buf("d_gsel", (nb,) + tuple(gy.shape[1:]), gy.dtype)
        plan = self._plan[::-1]
        for c in chunks:
            self._offsets_backward(plan, gy[c], dx[c], idx[c], mask, sel)

    def _backward_ave(self, gy, dx):
        xp = self.xp
        k = self._accel(gy, dx)
        if k is not None:
            k.ave_pool_backward(self._planes(gy), self._planes(dx), self._device("_divisor", gy.dtype),
                                *self._geometry())
            return
        if self._whole:
            N, C, H, W = dx.shape
            dx[...] = gy.reshape(N, C, 1, 1) / gy.dtype.type(H * W) + 0.0   # Caffe's 0 + g/size
            return
        if self._cl_ok(dx.shape):
            self._cl_backward(gy, dx, "ave")
            return
        with numpy.errstate(divide="ignore", invalid="ignore"):
            g = xp.divide(gy, self._device("_divisor", gy.dtype), out=self._buf("d_g", gy.shape, gy.dtype))
        plan = self._plan[::-1]
        for c in self._chunks(dx.shape):
            self._offsets_backward(plan, g[c], dx[c])
