"""numba kernels behind :mod:`netlib.accel` (imported only when numba is).

Each kernel is Caffe's CPU loop for one layer, parallel over the ``N*C``
image planes (``prange``) and sequential inside a plane, so every float
operation happens in Caffe's order: the results are Caffe's bit for bit.
Arrays are C-contiguous, viewed as planes ``(N*C, H, W)``; scalars in the
arithmetic keep the array's type (float32 stays float32: the divisors come
in as arrays of the data type).

Pooling geometry (Caffe's): window ``(ph, pw)`` starts at
``(ph*sh - pad_h, pw*sw - pad_w)``; MAX clips it to the image, AVE's divisor
``div[ph, pw]`` counts the padding but not the overhang past ``H + pad``.
"""
import os

import numba
from numba import prange

# numba's OpenMP layer keeps its threads spinning after a kernel, which starves
# the BLAS threads of the next GEMM (measured: LeNet's training step 2.7x
# slower); the workqueue layer's threads sleep.  A user's explicit choice
# (NUMBA_THREADING_LAYER) is kept.  workqueue is not safe for concurrent
# launches, so netlib.accel runs these kernels under one lock.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

__all__ = ["max_pool_forward", "max_pool_backward", "max_pool_backward_codes", "ave_pool_forward",
           "ave_pool_backward"]

_jit = numba.njit(parallel=True, cache=True, nogil=True)


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
