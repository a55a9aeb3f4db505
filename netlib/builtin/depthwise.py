"""Depthwise 2-D convolution: the fast path of Convolution with group == channels,
and the MobileNet ports' ``ConvolutionDepthwise`` / ``DepthwiseConvolution`` types.

Contract (Caffe's Convolution with ``group = C``; see :mod:`netlib.builtin.vision`)
    bottom ``(N, C, H, W)`` (the outer axes before the channel axis flattened
    into N), weights ``(C*m, 1, kh, kw)`` (``m = num_output / C``, the channel
    multiplier; output channel ``o`` reads input channel ``o // m``), bias
    ``(C*m,)``, top ``(N, C*m, OH, OW)`` with Caffe's output size
    ``OH = (H + 2*pad - (dilation*(kh-1)+1)) / stride + 1`` (C++ truncation)::

        top[n, c*m+j, p, q] = b[c*m+j] + sum_{a,e} W[c*m+j, 0, a, e]
                              * x[n, c, p*sh - ph + a*dh, q*sw - pw + e*dw]

    with zeros outside the image.

Implementation (no im2col of the general kind, no per-channel or per-pixel
Python loops).  Images and channels are flattened into ``N*C`` rows.  Each
row is copied once into a zero-bordered *phase* buffer: the padded image
split into its ``sh*sw`` stride phases (``phase[p, q][i, j] = xpad[p + i*sh,
q + j*sw]``; one phase when the stride is 1), each ``Hq x Wq`` plus a spare
zero row, stored flat.  Every kernel offset ``(a, e)`` then reads ONE
contiguous window of that flat row (phase ``(a*dh % sh, e*dw % sw)``, shifted
by ``(a*dh // sh) * Wq + e*dw // sw``) of length ``L = OH * Wq``: the output
computed on rows of width ``Wq`` whose columns ``>= OW`` are junk, dropped.
So every copy and every loop is long and contiguous whatever the image
size or stride:

* forward: the ``kh*kw`` windows are copied (contiguous copies) into a
  ``(rows, kh*kw, L)`` block and ONE batched GEMM per block of rows,
  ``(m, kh*kw) @ (kh*kw, L)`` per row, gives the output (Caffe's own GEMM
  shape, K = kh*kw), then ``top = out[..., :OW] + b``;
* backward: ``dy`` is copied once into a zero-bordered flat buffer of row
  width ``Wq`` (``D`` leading zeros, zero junk columns, trailing zeros; the
  zeros are never rewritten).  For every stride phase ``P`` holding pixels,
  the windows of that buffer shifted back by each offset ``k`` of ``P``
  (phase ``P``'s pixel rows, width ``Wq``) are copied (contiguous copies)
  into a ``(rows, m*n, Lx)`` block, ``dcol[j, k][u, v] = dy_j[u - sa_k,
  v - se_k]`` (zero outside), which serves both gradients:

  - data: ``dphase_P = W_P @ dcol``, one batched GEMV per phase (``K =
    m*n``): the transposed convolution computed as a correlation of the
    zero-bordered ``dy`` with the kernel, the forward's machinery; the
    phase's pixels are copied into the bottom diff (a phase with no offset
    gets zeros);
  - weights: ``dW[j, k] = dcol @ xphase_P``, one batched GEMV per phase
    over the phase layout of ``x`` (its padding cells are 0), summed over
    the images;
  - bias: ``sum(dy)``.

The rows go in blocks sized to the L2 cache; buffers are allocated once per
geometry and reused.  Caffe quirk kept: a kernel that overhangs the padded
input by less than a stride still gives an output (the division
truncates); its window reads zeros past the border.  Forward values and
all gradients equal Caffe's to float32 rounding: the BLAS kernels'
summation order, about 1 ulp per term; the bottom diff in particular sums
each pixel's terms in the engine's order (phase, then channel multiple,
then offset), not in Caffe's col2im order, so it is not bit-identical to
Caffe's (measured against real-Caffe goldens and the general path in
tests/test_depthwise.py, rtol 1e-5; the project's tolerance is 1e-4).
Bit-identity was given up on purpose: Caffe's order needs a scatter-add per
offset into a zeroed buffer, about 1.4x slower for the whole backward.
Not kept: the junk columns and borders multiply zeros, so an inf/NaN
bottom value (weight gradient) or weight (bottom diff) that they touch
gives NaN where Caffe's result would not.
"""
import numpy

from ..errors import ConfigError
from ..layer import register_layer


def _trunc_div(a, b):
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


class DepthwiseEngine:
    """Depthwise convolution kernels with reusable buffers for one layer.

    ``configure`` fixes the geometry (call it from the layer's reshape; cheap
    when nothing changed); ``forward`` / ``backward`` take plain arrays of the
    shapes in the module docstring (4-D, C-contiguous).  Images and channels
    are flattened into ``N*C`` rows, processed in cache-sized blocks of rows.
    (Worker threads over the blocks were tried: numpy's element-wise loops
    did not scale on the 2-core development VM, so the engine is serial.)
    """

    #: Target number of buffer elements per block of rows (phase buffer,
    #: window copies and output), about the size of the L2 cache.
    block_elements = 1 << 19
    #: The same for the backward pass's blocks.
    backward_block_elements = 1 << 19

    def __init__(self):
        self._key = None
        self._bufs = {}

    # -- geometry -------------------------------------------------------------
    def configure(self, N, C, m, H, W, kernel, pad, stride, dilation):
        key = (N, C, m, H, W, tuple(kernel), tuple(pad), tuple(stride), tuple(dilation))
        if key == self._key:
            return self.out_hw
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, pad, stride, dilation
        OH = _trunc_div(H + 2 * ph - (dh * (kh - 1) + 1), sh) + 1
        OW = _trunc_div(W + 2 * pw - (dw * (kw - 1) + 1), sw) + 1
        self.N, self.C, self.m, self.H, self.W = N, C, m, H, W
        self.kernel, self.pad, self.stride, self.dilation = (kh, kw), (ph, pw), (sh, sw), (dh, dw)
        self.out_hw = (OH, OW)
        # padded extent (more than H + 2*pad when the last window overhangs)
        Hp = max(H + 2 * ph, (OH - 1) * sh + dh * (kh - 1) + 1)
        Wp = max(W + 2 * pw, (OW - 1) * sw + dw * (kw - 1) + 1)
        Hq = -(-Hp // sh) + 1                       # + a spare zero row: junk reads stay inside
        Wq = -(-Wp // sw)
        self.Hq, self.Wq = Hq, Wq
        self.S = sh * sw * Hq * Wq                  # flat elements per channel
        self.L = OH * Wq                            # row-extended output length
        # per kernel offset (raster order): start of its window in a channel's flat buffer
        self.starts = []
        for a in range(kh):
            for e in range(kw):
                r, c = a * dh, e * dw
                phase = (r % sh) * sw + c % sw
                self.starts.append(phase * Hq * Wq + (r // sh) * Wq + c // sw)
        # per kernel offset: its phase and its shift inside the phase (flat, width Wq)
        self.offset_phase, self.shifts = [], []
        for a in range(kh):
            for e in range(kw):
                r, c = a * dh, e * dw
                self.offset_phase.append((r % sh) * sw + c % sw)
                self.shifts.append((r // sh) * Wq + c // sw)
        # backward: dy stored flat (width Wq, junk columns zero) after D zeros and
        # followed by zeros, G per channel, so every shifted read stays inside
        self.D = max(self.shifts)
        self.G = self.D + Hq * Wq
        # per phase: (p, q, phase rows, phase cols, x rows, x cols) of the real pixels
        self.phases = []
        for p in range(sh):
            i0 = max(0, -(-(ph - p) // sh))
            i1 = (H - 1 + ph - p) // sh + 1
            for q in range(sw):
                j0 = max(0, -(-(pw - q) // sw))
                j1 = (W - 1 + pw - q) // sw + 1
                if i1 <= i0 or j1 <= j0:
                    continue
                self.phases.append((p, q, slice(i0, i1), slice(j0, j1),
                                    slice(p + i0 * sh - ph, p + (i1 - 1) * sh - ph + 1, sh),
                                    slice(q + j0 * sw - pw, q + (j1 - 1) * sw - pw + 1, sw)))
        # backward plan, per phase holding pixels: (flat phase index, its offsets,
        # phase rows, phase cols, x rows, x cols); offsets of empty phases read
        # only padding (their weight gradient is 0)
        kk = len(self.starts)
        self._live_list = []
        for p, q, pr, pc, xr, xc in self.phases:
            P = p * sw + q
            ks = [k for k in range(kk) if self.offset_phase[k] == P]
            self._live_list.append((P, ks, pr, pc, xr, xc))
        self._dead_offsets = kk > sum(len(ks) for _, ks, *_ in self._live_list)
        # the largest window block of a phase and its output (per row)
        self._dcol_len = max([m * len(ks) * (pr.stop - pr.start) * Wq
                              for _, ks, pr, *_ in self._live_list] or [1])
        self._dres_len = max([(pr.stop - pr.start) * Wq for _, _, pr, *_ in self._live_list] or [1])
        # blocks of rows (row = one channel of one image)
        rows = N * C
        rpb = max(1, self.block_elements // max(1, self.S + (kk + m) * self.L))
        self.blocks = [(r0, min(r0 + rpb, rows)) for r0 in range(0, rows, rpb)]
        # backward: phase buffer, extended dy, a phase's window block and its result
        per_row = self.S + m * self.G + self._dcol_len + self._dres_len
        brpb = max(1, self.backward_block_elements // max(1, per_row))
        self.backward_blocks = [(r0, min(r0 + brpb, rows)) for r0 in range(0, rows, brpb)]
        self.rpb = max(rpb, brpb)
        self._key = key
        self._bufs = {}
        return self.out_hw

    def _buf(self, name, per_row, rows, xp, dtype, zero=False):
        """The first ``rows`` rows of a reusable (rpb, per_row) scratch array
        (zeroed once when created if ``zero``)."""
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or not isinstance(buf, xp.ndarray):
            buf = (xp.zeros if zero else xp.empty)((self.rpb, per_row), dtype=dtype)
            self._bufs[name] = buf
        return buf[:rows]

    def _to_phases(self, x3, r0, r1, xp):
        """Rows r0:r1 of x (N*C, H, W) in the phase layout, (rows, S); the
        padding and spare cells of the reused buffer are never written and
        stay zero."""
        sh, sw = self.stride
        buf = self._buf("phase", self.S, r1 - r0, xp, x3.dtype, zero=True)
        grid = buf.reshape(r1 - r0, sh, sw, self.Hq, self.Wq)
        xb = x3[r0:r1]
        for p, q, pr, pc, xr, xc in self.phases:
            grid[:, p, q, pr, pc] = xb[:, xr, xc]
        return buf

    def _row_weights(self, w, xp):
        """Weights per row: (N*C, m, kh*kw) (the (C, ...) weights tiled over images)."""
        wk = w.reshape(1, self.C, self.m, len(self.starts))
        if self.N == 1:
            return wk[0]
        return xp.broadcast_to(wk, (self.N,) + wk.shape[1:]).reshape(
            self.N * self.C, self.m, len(self.starts))

    # -- forward --------------------------------------------------------------
    def forward(self, x, w, b, y):
        """``y`` (N, C*m, OH, OW) = depthwise conv of ``x`` (N, C, H, W) with
        ``w`` (C*m, 1, kh, kw) plus ``b`` (C*m,) or None."""
        if y.size == 0:
            return
        xp = _module_of(y)
        m, L, Wq = self.m, self.L, self.Wq
        OH, OW = self.out_hw
        rows = self.N * self.C
        x3 = x.reshape(rows, self.H, self.W)
        y4 = y.reshape(rows, m, OH, OW)
        wr = self._row_weights(w, xp)
        br = None
        if b is not None:
            br = b.reshape(1, self.C, m, 1, 1)
            br = br[0] if self.N == 1 else xp.broadcast_to(br, (self.N,) + br.shape[1:]).reshape(rows, m, 1, 1)

        kk = len(self.starts)
        for r0, r1 in self.blocks:
            R = r1 - r0
            src = self._to_phases(x3, r0, r1, xp)                          # (R, S)
            col = self._buf("col", kk * L, R, xp, y.dtype).reshape(R, kk, L)
            for k, s0 in enumerate(self.starts):                            # contiguous copies
                col[:, k] = src[:, s0:s0 + L]
            acc = self._buf("acc", m * L, R, xp, y.dtype).reshape(R, m, L)
            _matmul(xp, wr[r0:r1], col, acc)                                 # Caffe's GEMM, K = kh*kw
            res = acc.reshape(R, m, OH, Wq)[..., :OW]
            if br is None:
                y4[r0:r1] = res
            else:
                xp.add(res, br[r0:r1], out=y4[r0:r1])

    # -- backward -------------------------------------------------------------
    def backward(self, x, w, dy, dx=None, dw=None, db=None):
        """Gradients of :meth:`forward`: ``dx`` (overwritten), ``dw`` and ``db``
        (accumulated, ``+=``); any of them None is skipped."""
        xp = _module_of(dy)
        N, C, m, L, Wq = self.N, self.C, self.m, self.L, self.Wq
        OH, OW = self.out_hw
        if db is not None and dy.size:
            db += dy.reshape(N, C * m, OH * OW).sum(axis=2).sum(axis=0)
        if dx is None and dw is None:
            return
        if dy.size == 0:
            if dx is not None:
                dx[...] = 0
            return
        kk = len(self.starts)
        rows = N * C
        D, G, HW = self.D, self.G, self.Hq * Wq
        dtype = dy.dtype
        x3 = x.reshape(rows, self.H, self.W)
        g4 = dy.reshape(rows, m, OH, OW)
        dx3 = None if dx is None else dx.reshape(rows, self.H, self.W)
        drow = None
        if dw is not None:
            drow = xp.empty((rows, m, kk), dtype=dtype)
            if self._dead_offsets:
                drow[...] = 0                   # offsets reading only padding: dW = 0
        # per phase: the weights of its offsets, (rows, 1, m*n) in (multiple, offset) order
        plan = []
        wr = None if dx3 is None else self._row_weights(w, xp)
        for P, ks, pr, pc, xr, xc in self._live_list:
            wk = None
            if ks and wr is not None:
                wk = wr[:, :, ks].reshape(rows, 1, m * len(ks))
            plan.append((P, ks, wk, pr, pc, xr, xc))

        for r0, r1 in self.backward_blocks:
            R = r1 - r0
            # dy flat at width Wq after D zeros; junk columns and borders never written (zero)
            gbuf = self._buf("gbuf", m * G, R, xp, dtype, zero=True).reshape(R, m, G)
            gbuf[:, :, D:D + L].reshape(R, m, OH, Wq)[..., :OW] = g4[r0:r1]
            src = None
            if drow is not None:
                src = self._to_phases(x3, r0, r1, xp).reshape(R, -1, HW)     # (R, phases, Hq*Wq)
            dxb = None if dx3 is None else dx3[r0:r1]
            for P, ks, wk, pr, pc, xr, xc in plan:
                if not ks:
                    if dxb is not None:
                        dxb[:, xr, xc] = 0
                    continue
                n = len(ks)
                nrow = pr.stop - pr.start
                Lx = nrow * Wq
                t0 = D + pr.start * Wq
                # the dy windows that land on the phase's pixel rows:
                # dcol[j, i][u, v] = dy_j[u - sa_k, v - se_k] (k = ks[i]; zero outside)
                dcol = self._buf("dcol", self._dcol_len, R, xp, dtype)[:, :m * n * Lx].reshape(R, m, n, Lx)
                for i, k in enumerate(ks):
                    s0 = t0 - self.shifts[k]
                    dcol[:, :, i] = gbuf[:, :, s0:s0 + Lx]
                dcol = dcol.reshape(R, m * n, Lx)
                if drow is not None:
                    # dW[j, k] = sum over the phase of x . dy shifted (padding cells of x are 0)
                    xrows = src[:, P, pr.start * Wq:pr.stop * Wq, None]           # (R, Lx, 1)
                    dots = self._buf("dots", kk * m, R, xp, dtype)[:, :m * n].reshape(R, m * n, 1)
                    xp.matmul(dcol, xrows, out=dots)
                    drow[r0:r1, :, ks] = dots.reshape(R, m, n)
                if dxb is not None:
                    # dphase_P = sum_{j, k in P} W[j, k] * dcol[j, k]: one batched GEMV
                    res = self._buf("dres", self._dres_len, R, xp, dtype)[:, :Lx].reshape(R, 1, Lx)
                    _matmul(xp, wk[r0:r1], dcol, res)
                    dxb[:, xr, xc] = res.reshape(R, nrow, Wq)[:, :, pc]
        if drow is not None:
            part = drow.reshape(N, C * m * kk)
            dw += (part[0] if N == 1 else part.sum(axis=0)).reshape(dw.shape)


def _matmul(xp, a, b, out):
    """``out = a @ b`` for stacks of matrices; with an inner dimension of 1
    (a phase holding a single kernel offset) as a broadcast product, which
    numpy computes about 7x faster than its matmul does for K = 1."""
    if a.shape[-1] == 1:
        xp.multiply(a, b, out=out)
    else:
        xp.matmul(a, b, out=out)


def _module_of(arr):
    if isinstance(arr, numpy.ndarray):
        return numpy
    from ..backend import get_array_module
    return get_array_module(arr)


# ---------------------------------------------------------------------------
# The MobileNet ports' layer types
# ---------------------------------------------------------------------------
def _depthwise_types():
    from .vision import ConvolutionLayer
    from ..proto import caffe_pb2

    class _DepthwiseTypeLayer(ConvolutionLayer):
        """Convolution with ``group`` forced to the bottom's channel count.

        As in the MobileNet Caffe ports (``ConvolutionDepthwise``: weights
        ``(C, 1, kh, kw)``, ``group`` and ``num_output`` not needed): ``group``
        may be unset, 1 or C (all mean depthwise; other values are an error);
        ``num_output`` may be unset (C outputs), C, or a multiple ``m*C``
        (channel multiplier, Convolution-with-group semantics; the ports
        themselves always give C outputs).  Everything else (kernel, pad,
        stride, dilation, bias_term, fillers, axis) is ``convolution_param``
        as for Convolution, and the math is :class:`DepthwiseEngine`'s.
        """

        def setup(self, bottom, top):
            p = self.layer_param.convolution_param
            b0 = bottom[0]
            try:
                axis = b0.canonical_axis_index(p.axis)
            except Exception:
                axis = 1 if b0.num_axes > 1 else 0
            C = int(b0.shape[axis]) if b0.num_axes else 0
            if p.HasField("group") and int(p.group) not in (1, C):
                self.fail("group (%d) must be unset, 1 or the channel count (%d): this layer type "
                          "is always depthwise" % (p.group, C), bottom=bottom, error=ConfigError)
            num_output = int(p.num_output) if p.HasField("num_output") else C
            if C <= 0 or num_output <= 0 or num_output % C:
                self.fail("num_output (%d) must be unset or a positive multiple of the channel "
                          "count (%d)" % (num_output, C), bottom=bottom, error=ConfigError)
            forced = caffe_pb2.LayerParameter()
            forced.CopyFrom(self.layer_param)
            forced.convolution_param.group = C
            forced.convolution_param.num_output = num_output
            original = self.layer_param
            self.layer_param = forced
            try:
                super().setup(bottom, top)
            finally:
                self.layer_param = original

    @register_layer("ConvolutionDepthwise")
    class ConvolutionDepthwiseLayer(_DepthwiseTypeLayer):
        __doc__ = _DepthwiseTypeLayer.__doc__
        type = "ConvolutionDepthwise"

    @register_layer("DepthwiseConvolution")
    class DepthwiseConvolutionLayer(_DepthwiseTypeLayer):
        __doc__ = _DepthwiseTypeLayer.__doc__
        type = "DepthwiseConvolution"

    return ConvolutionDepthwiseLayer, DepthwiseConvolutionLayer


ConvolutionDepthwiseLayer, DepthwiseConvolutionLayer = _depthwise_types()
