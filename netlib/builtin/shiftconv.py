"""Stride-1 2-D convolution as a sum of shifted GEMMs (no im2col).

Contract: Caffe's Convolution (:mod:`netlib.builtin.vision`) for 2-D, one
group, stride 1 (any pad, any dilation)::

    top[n, o, r, s] = b[o] + sum_{c,a,e} W[o, c, a, e] * xpad[n, c, r + a*dh, s + e*dw]

Implementation.  A chunk of ``nb`` images is copied once into a zero-bordered
buffer laid out ``(C, Hp + 1, Wp, nb)`` (images innermost, one spare zero
row) and viewed flat per channel.  For a kernel offset ``(a, e)`` the values
``xpad[:, r + a*dh, s + e*dw, :]`` over all output rows ``r`` and *all* ``Wp``
columns ``s`` are ONE contiguous window of that flat buffer (start
``(a*dh*Wp + e*dw) * nb``, length ``OH * Wp * nb``): the output is computed on
rows of width ``Wp`` whose columns ``>= OW`` are junk, dropped.  So

* forward: ``acc = sum_k W[:, :, k] @ window_k`` — ``kh*kw`` GEMMs of shape
  ``(O, C) @ (C, OH*Wp*nb)`` accumulated inside the BLAS (beta = 1,
  :func:`netlib.builtin.common.gemm_accumulate`), no column buffer ``kh*kw``
  times the input;
* weight gradient: ``dW[:, :, k] += D @ window_k^T`` with ``D`` the top diff in
  the same row-extended layout (junk columns zero), one GEMM per offset with
  the long axis as K;
* bottom diff: the adjoint, the same machinery on the top diff placed in a
  zero-bordered buffer ``G`` (offset ``ke - 1`` rows and columns, ``ke`` the
  dilated kernel extent): ``dx_ext = sum_k W[:, :, k]^T @ window'_k`` with
  window ``k`` of ``G`` starting at row ``p + ke-1 - a*dh``, column
  ``p + ke-1 - e*dw``.

Values equal Caffe's to float32 rounding (different GEMM blocking and
summation order: per kernel offset, then per channel, not Caffe's single
K = C*kh*kw dot product), tested against naive loops in
tests/test_conv_paths.py.  Not kept: the junk columns multiply real or zero
values, so an inf/NaN bottom value can turn a weight gradient NaN where
Caffe's would not (the same holds for the depthwise engine).
"""
from .common import gemm_accumulate


class ShiftGemmEngine:
    """Buffers and geometry of one layer's shifted-GEMM convolution.

    ``configure`` (from the layer's reshape, cheap when unchanged) fixes the
    geometry; ``forward`` / ``backward`` take plain 4-D arrays.
    """

    #: Target elements of the accumulator block (O x OH*Wp x images): it is
    #: read and written once per kernel offset, so it should stay in cache.
    acc_elements = 1 << 18

    def __init__(self):
        self._key = None
        self._bufs = {}

    def configure(self, N, C, O, H, W, kernel, pad, dilation):
        key = (N, C, O, H, W, tuple(kernel), tuple(pad), tuple(dilation))
        if key == self._key:
            return self.out_hw
        (kh, kw), (ph, pw), (dh, dw) = kernel, pad, dilation
        keh, kew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        OH, OW = H + 2 * ph - keh + 1, W + 2 * pw - kew + 1
        self.N, self.C, self.O, self.H, self.W = N, C, O, H, W
        self.kernel, self.pad, self.dilation = (kh, kw), (ph, pw), (dh, dw)
        self.out_hw = (OH, OW)
        self.Hp, self.Wp = H + 2 * ph, W + 2 * pw
        # bottom-diff buffer: dy at (keh-1, kew-1), wide enough that every read
        # for a real input pixel stays inside its row
        self.Hg = max(keh - 1 + OH, H + ph + keh - 1) + 1
        self.Wg = max(kew - 1 + OW, W + pw + kew - 1)
        self.offsets = [(a, e) for a in range(kh) for e in range(kw)]
        per_image = max(1, O * OH * self.Wp, C * H * self.Wg)
        self.nb = max(1, min(N, self.acc_elements // per_image))
        self._key = key
        self._bufs = {}
        return self.out_hw

    def _buf(self, name, shape, xp, dtype):
        """A reusable zero-initialised buffer (borders are never written)."""
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or not isinstance(buf, xp.ndarray):
            buf = xp.zeros(shape, dtype=dtype)
            self._bufs[name] = buf
        return buf

    def _chunks(self):
        for b0 in range(0, self.N, self.nb):
            yield b0, min(self.nb, self.N - b0)

    def _load_x(self, x, b0, nb, xp):
        """The flat padded buffer (C, (Hp+1)*Wp*nb) holding images b0:b0+nb."""
        C, H, W, (ph, pw) = self.C, self.H, self.W, self.pad
        buf = self._buf("x%d" % nb, (C, self.Hp + 1, self.Wp, nb), xp, x.dtype)
        buf[:, ph:ph + H, pw:pw + W, :] = x[b0:b0 + nb].transpose(1, 2, 3, 0)
        return buf.reshape(C, -1)

    # -- forward --------------------------------------------------------------
    def forward(self, x, w, b, y):
        """``y`` (N, O, OH, OW) = conv of ``x`` (N, C, H, W) with ``w`` (O, C, kh, kw) (+ b)."""
        xp = _module_of(y)
        O, Wp = self.O, self.Wp
        OH, OW = self.out_hw
        (dh, dw) = self.dilation
        wk = self._weights_by_offset(w, xp)                         # (kk, O, C)
        for b0, nb in self._chunks():
            flat = self._load_x(x, b0, nb, xp)
            L = OH * Wp * nb
            acc = self._buf("acc%d" % nb, (O, L), xp, y.dtype)
            for i, (a, e) in enumerate(self.offsets):
                s0 = (a * dh * Wp + e * dw) * nb
                win = flat[:, s0:s0 + L]
                if i == 0:
                    xp.matmul(wk[0], win, out=acc)
                else:
                    gemm_accumulate(xp, wk[i], win, acc)
            res = acc.reshape(O, OH, Wp, nb)[:, :, :OW, :].transpose(3, 0, 1, 2)
            if b is None:
                y[b0:b0 + nb] = res
            else:
                xp.add(res, b.reshape(1, O, 1, 1), out=y[b0:b0 + nb])

    def _weights_by_offset(self, w, xp):
        kk = len(self.offsets)
        wk = self._buf("wk", (kk, self.O, self.C), xp, w.dtype)
        wk[...] = w.reshape(self.O, self.C, kk).transpose(2, 0, 1)
        return wk

    # -- backward -------------------------------------------------------------
    def backward(self, x, w, dy, dx=None, dw=None):
        """``dx`` (overwritten) and ``dw`` (accumulated) of :meth:`forward`;
        either may be None."""
        if dx is None and dw is None:
            return
        xp = _module_of(dy)
        C, O, H, W, Wp, Wg = self.C, self.O, self.H, self.W, self.Wp, self.Wg
        OH, OW = self.out_hw
        (kh, kw), (ph, pw), (dh, dwl) = self.kernel, self.pad, self.dilation
        keh, kew = dh * (kh - 1) + 1, dwl * (kw - 1) + 1
        kk = len(self.offsets)
        dwk = None
        if dw is not None:
            dwk = self._buf("dwk", (kk, O, C), xp, dy.dtype)
            dwk[...] = 0
        wT = None
        if dx is not None:
            wT = self._buf("wT", (kk, C, O), xp, w.dtype)
            wT[...] = w.reshape(O, C, kk).transpose(2, 1, 0)
        for b0, nb in self._chunks():
            gy = dy[b0:b0 + nb].transpose(1, 2, 3, 0)                 # (O, OH, OW, nb)
            if dw is not None:
                flat = self._load_x(x, b0, nb, xp)
                L = OH * Wp * nb
                D = self._buf("D%d" % nb, (O, OH, Wp, nb), xp, dy.dtype)
                D[:, :, :OW, :] = gy                                  # junk columns stay 0
                D2 = D.reshape(O, L)
                for i, (a, e) in enumerate(self.offsets):
                    s0 = (a * dh * Wp + e * dwl) * nb
                    gemm_accumulate(xp, D2, flat[:, s0:s0 + L].T, dwk[i])
            if dx is not None:
                G = self._buf("G%d" % nb, (O, self.Hg, Wg, nb), xp, dy.dtype)
                G[:, keh - 1:keh - 1 + OH, kew - 1:kew - 1 + OW, :] = gy
                Gf = G.reshape(O, -1)
                Lx = H * Wg * nb
                acc = self._buf("dacc%d" % nb, (C, Lx), xp, dy.dtype)
                for i, (a, e) in enumerate(self.offsets):
                    s0 = ((ph + keh - 1 - a * dh) * Wg + (pw + kew - 1 - e * dwl)) * nb
                    win = Gf[:, s0:s0 + Lx]
                    if i == 0:
                        xp.matmul(wT[0], win, out=acc)
                    else:
                        gemm_accumulate(xp, wT[i], win, acc)
                dx[b0:b0 + nb] = acc.reshape(C, H, Wg, nb)[:, :, :W, :].transpose(3, 0, 1, 2)
        if dw is not None:
            dw.reshape(O, C, kk)[...] += dwk.transpose(1, 2, 0)


def _module_of(arr):
    import numpy
    if isinstance(arr, numpy.ndarray):
        return numpy
    from ..backend import get_array_module
    return get_array_module(arr)
