"""numba kernels behind :mod:`netlib.accel` (imported only when numba is).

Each kernel is Caffe's CPU loop for one layer, parallel over the ``N*C``
image planes (``prange``) and sequential inside a plane, so every float
operation happens in Caffe's order: the results are Caffe's bit for bit.
Arrays are C-contiguous, viewed as planes ``(N*C, H, W)``; scalars in the
arithmetic keep the array's type (float32 stays float32: the divisors and
constants come in as arrays of the data type).  Reductions (BatchNorm's and
Scale's per-channel sums) accumulate in float64, then round to the data type
once: not Caffe's BLAS summation order, so equal to Caffe's values within
float32 rounding rather than bit for bit.

Pooling geometry (Caffe's): window ``(ph, pw)`` starts at
``(ph*sh - pad_h, pw*sw - pad_w)``; MAX clips it to the image, AVE's divisor
``div[ph, pw]`` counts the padding but not the overhang past ``H + pad``.
"""
import os

import numba
import numpy as np
from numba import prange

# numba's OpenMP layer keeps its threads spinning after a kernel, which starves
# the BLAS threads of the next GEMM (measured: LeNet's training step 2.7x
# slower); the workqueue layer's threads sleep.  A user's explicit choice
# (NUMBA_THREADING_LAYER) is kept.  workqueue is not safe for concurrent
# launches, so netlib.accel runs these kernels under one lock.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["max_pool_forward", "max_pool_backward", "max_pool_backward_codes", "ave_pool_forward",
           "ave_pool_backward", "relu_forward", "relu_backward", "bn_train_forward", "bn_train_backward",
           "bn_apply", "scale_forward", "scale_backward"]

_jit = numba.njit(parallel=True, cache=True, nogil=True)
# Reductions: float64 sums may be reassociated (vectorised partial sums);
# nothing else is relaxed (no FMA contraction, NaN/inf kept).
_jit_sums = numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})


@_jit
def max_pool_forward(x, y, idx, kh, kw, sh, sw, ph_, pw_, want_idx):
    """``y[p, i, j]`` = max over the clipped window (strict ``>`` from
    -FLT_MAX: the first maximum in raster order wins, NaN never does);
    ``idx[p, i, j]`` its flat index ``h*W + w`` (-1: no pixel won), written
    when ``want_idx``.  x (P, H, W), y and idx (P, PH, PW).  (Measured: this
    window-major loop beats offset-major, vectorisable orders here.)"""
    P, H, W = x.shape
    PH, PW = y.shape[1], y.shape[2]
    lowest = -3.4028234663852886e38
    for p in prange(P):
        for i in range(PH):
            hs = i * sh - ph_
            he = min(hs + kh, H)
            hs = max(hs, 0)
            for j in range(PW):
                ws = j * sw - pw_
                we = min(ws + kw, W)
                ws = max(ws, 0)
                best = lowest
                arg = -1
                for h in range(hs, he):
                    for w in range(ws, we):
                        v = x[p, h, w]
                        if v > best:
                            best = v
                            arg = h * W + w
                y[p, i, j] = best
                if want_idx:
                    idx[p, i, j] = arg


@_jit
def max_pool_backward(gy, idx, dx):
    """``dx`` = 0, then ``dx[argmax] += gy`` window by window in raster order
    (Caffe's sums for pixels that win several windows); dx (P, H, W)."""
    P, H, W = dx.shape
    PH, PW = gy.shape[1], gy.shape[2]
    for p in prange(P):
        d = dx[p].reshape(H * W)
        d[:] = 0
        for i in range(PH):
            for j in range(PW):
                a = idx[p, i, j]
                if a >= 0:
                    d[a] += gy[p, i, j]


@_jit
def max_pool_backward_codes(gy, code, dx, kw, sh, sw, ph_, pw_):
    """:func:`max_pool_backward` from the NumPy path's argmax: ``code[p, i, j]``
    is the winning kernel offset + 1 (0: none), any integer type and any
    strides (the channels-last path keeps it as ``(PH, PW, P)``)."""
    P, H, W = dx.shape
    PH, PW = gy.shape[1], gy.shape[2]
    for p in prange(P):
        d = dx[p].reshape(H * W)
        d[:] = 0
        for i in range(PH):
            for j in range(PW):
                c = int(code[p, i, j])
                if c > 0:
                    c -= 1
                    a = c // kw
                    d[(i * sh - ph_ + a) * W + j * sw - pw_ + c - a * kw] += gy[p, i, j]


@_jit
def ave_pool_forward(x, y, div, kh, kw, sh, sw, ph_, pw_):
    """``y[p, i, j]`` = (0 + the window's real pixels summed in raster order)
    / ``div[i, j]`` (Caffe's pool size)."""
    P, H, W = x.shape
    PH, PW = y.shape[1], y.shape[2]
    for p in prange(P):
        for i in range(PH):
            hs = max(i * sh - ph_, 0)
            he = min(i * sh - ph_ + kh, H)
            for j in range(PW):
                ws = max(j * sw - pw_, 0)
                we = min(j * sw - pw_ + kw, W)
                y[p, i, j] = 0
                for h in range(hs, he):
                    for w in range(ws, we):
                        y[p, i, j] += x[p, h, w]
                y[p, i, j] = y[p, i, j] / div[i, j]


@_jit
def ave_pool_backward(gy, dx, div, kh, kw, sh, sw, ph_, pw_):
    """``dx`` = 0, then every real pixel of window ``(i, j)`` gets
    ``+= gy[p, i, j] / div[i, j]``, windows in raster order (Caffe's)."""
    P, H, W = dx.shape
    PH, PW = gy.shape[1], gy.shape[2]
    for p in prange(P):
        dx[p] = 0
        for i in range(PH):
            hs = max(i * sh - ph_, 0)
            he = min(i * sh - ph_ + kh, H)
            for j in range(PW):
                ws = max(j * sw - pw_, 0)
                we = min(j * sw - pw_ + kw, W)
                g = gy[p, i, j] / div[i, j]
                for h in range(hs, he):
                    for w in range(ws, we):
                        dx[p, h, w] += g


@_jit
def relu_forward(x, y, k):
    """Caffe's ReLU on flat arrays: ``y = max(x, 0) + k[2] * min(x, 0)`` with
    C++'s ``std::max``/``std::min`` (NaN and -0 pass through as in Caffe);
    ``k = [0, 1, negative_slope]`` in the data type."""
    zero, ns = k[0], k[2]
    if ns == zero:
        for i in prange(x.size):
            v = x[i]
            y[i] = zero if v < zero else v
    else:
        for i in prange(x.size):
            v = x[i]
            y[i] = (zero if v < zero else v) + ns * (zero if zero < v else v)


@_jit
def relu_backward(x, dy, dx, k):
    """``dx = dy * ((x > 0) + negative_slope * (x <= 0))`` (Caffe's) on flat
    arrays; ``k = [0, 1, negative_slope]``.  dx may be dy (in place)."""
    zero, one, ns = k[0], k[1], k[2]
    for i in prange(x.size):
        v = x[i]
        f = one if v > zero else (ns if v <= zero else zero)
        dx[i] = dy[i] * f


@_jit_sums
def bn_train_forward(x, y, z, mean, var, std, eps):
    """BatchNorm with batch statistics, per channel c of (N, C, S) arrays:
    ``mean[c]``, ``var[c]`` (biased, of ``z = x - mean``), ``std[c] =
    sqrt(var + eps)``, ``z`` stored (it may be ``y``), ``y = z / std``.  In
    place (y is x) z must be another buffer.  ``eps``: a 1-element array of
    the data type."""
    N, C, S = x.shape
    m = N * S
    for c in prange(C):
        acc = 0.0
        for n in range(N):
            for i in range(S):
                acc += x[n, c, i]
        mean[c] = acc / m
        mu = mean[c]
        acc = 0.0
        for n in range(N):
            for i in range(S):
                d = x[n, c, i] - mu
                z[n, c, i] = d
                acc += d * d
        var[c] = acc / m
        std[c] = np.sqrt(var[c] + eps[0])
        sd = std[c]
        for n in range(N):
            for i in range(S):
                y[n, c, i] = z[n, c, i] / sd


@_jit_sums
def bn_train_backward(dy, src, mean, std, dx, k1, k0):
    """BatchNorm's backward with batch statistics, per channel:
    ``z = src - mean`` (``src`` the kept z with ``mean`` 0, or the bottom),
    ``k1 = -sum(dy z) / (m std^2)``, ``k0 = -sum(dy) / m``,
    ``dx = (z k1 + k0 + dy) / std`` (Caffe's formula; dx may be dy)."""
    N, C, S = dy.shape
    m = N * S
    for c in prange(C):
        mu = mean[c]
        sd = std[c]
        a = 0.0
        b = 0.0
        for n in range(N):
            for i in range(S):
                g = dy[n, c, i]
                a += g * (src[n, c, i] - mu)
                b += g
        k1[c] = -a / (m * (float(sd) * float(sd)))
        k0[c] = -b / m
        p, q = k1[c], k0[c]
        for n in range(N):
            for i in range(S):
                dx[n, c, i] = ((src[n, c, i] - mu) * p + q + dy[n, c, i]) / sd


@_jit
def bn_apply(x, y, mean, std):
    """``y = (x - mean[c]) / std[c]`` per channel of (N, C, S) (global stats)."""
    N, C, S = x.shape
    for r in prange(N * C):
        n = r // C
        c = r - n * C
        mu = mean[c]
        sd = std[c]
        for i in range(S):
            y[n, c, i] = (x[n, c, i] - mu) / sd


@_jit
def scale_forward(x, saved, y, s, b, copy, has_bias):
    """Scale over (outer, dim, inner) arrays: ``y = x * s[d] (+ b[d])``;
    with ``copy`` the input first goes to ``saved`` (in place, for backward)."""
    O, D, I = x.shape
    for r in prange(O * D):
        o = r // D
        d = r - o * D
        sv = s[d]
        bv = b[d]
        for i in range(I):
            v = x[o, d, i]
            if copy:
                saved[o, d, i] = v
            if has_bias:
                y[o, d, i] = v * sv + bv
            else:
                y[o, d, i] = v * sv


@_jit_sums
def scale_backward(dy, x, s, dx, gs, gb, want_x, want_dx):
    """Scale's backward over (outer, dim, inner): ``gb[d] = sum dy``,
    ``gs[d] = sum dy * x`` (when ``want_x``), ``dx = dy * s[d]`` (when
    ``want_dx``; dx may be dy: the sums come first, row by row)."""
    O, D, I = dy.shape
    for d in prange(D):
        a = 0.0
        bsum = 0.0
        sv = s[d]
        for o in range(O):
            for i in range(I):
                g = dy[o, d, i]
                bsum += g
                if want_x:
                    a += g * x[o, d, i]
                if want_dx:
                    dx[o, d, i] = g * sv
        gb[d] = bsum
        gs[d] = a
