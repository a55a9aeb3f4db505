"""Convolution / Deconvolution engine paths against naive loop references.

The layers choose per shape between two memory layouts of their chunk buffers
(batch last / batch first, ``batch_last_layout``), chunk the batch by
``col_buffer_bytes`` and special-case 1x1 kernels; every combination must give
Caffe's numbers.  The references here loop over output positions and kernel
offsets, straight from Caffe's definitions (cross-correlation with zero
padding; backward = its adjoint), in float64.  Shapes cover odd sizes,
padding, strides, dilation, groups, several images, 1-D/3-D and Caffe's
truncation quirk; checked are the top, the bottom diff, and the weight and
bias diffs (accumulated, ``+=``), in float64 and float32.
"""
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.im2col import col2im_batch_last, im2col_batch_last, padded_extent
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from xp_mode import XP, host

RNG = np.random.default_rng(20261201)


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------
def _out_size(size, k, p, s, d):
    num = size + 2 * p - (d * (k - 1) + 1)
    q = abs(num) // s
    return (q if num >= 0 else -q) + 1          # C++ truncating division


def _windows(in_sp, out_sp, k, stride, pad, dil):
    """(output position, kernel offset, input index) for every read inside the input."""
    nd = len(in_sp)
    for o in itertools.product(*[range(s) for s in out_sp]):
        for kk in itertools.product(*[range(s) for s in k]):
            idx = tuple(o[a] * stride[a] - pad[a] + kk[a] * dil[a] for a in range(nd))
            if all(0 <= idx[a] < in_sp[a] for a in range(nd)):
                yield o, kk, idx


def ref_conv(x, W, b, gy, stride, pad, dil, group):
    """Forward y, and (with gy) dx, dW, db of a grouped N-D convolution."""
    x, W = np.asarray(host(x), np.float64), np.asarray(host(W), np.float64)
    N, C = x.shape[:2]
    in_sp, k = x.shape[2:], W.shape[2:]
    O = W.shape[0]
    out_sp = tuple(_out_size(in_sp[a], k[a], pad[a], stride[a], dil[a]) for a in range(len(in_sp)))
    Cg, Og = C // group, O // group
    y = np.zeros((N, O) + out_sp)
    dx, dW = np.zeros_like(x), np.zeros_like(W)
    gy = None if gy is None else np.asarray(host(gy), np.float64)
    all_ = slice(None)
    for o, kk, idx in _windows(in_sp, out_sp, k, stride, pad, dil):
        for g in range(group):
            cs, os_ = slice(g * Cg, (g + 1) * Cg), slice(g * Og, (g + 1) * Og)
            xs = x[(all_, cs) + idx]                 # (N, Cg)
            ws = W[(os_, all_) + kk]                 # (Og, Cg)
            y[(all_, os_) + o] += xs @ ws.T
            if gy is not None:
                g_o = gy[(all_, os_) + o]            # (N, Og)
                dx[(all_, cs) + idx] += g_o @ ws
                dW[(os_, all_) + kk] += g_o.T @ xs
    if b is not None:
        y += np.asarray(host(b), np.float64).reshape((1, O) + (1,) * len(in_sp))
    db = None if gy is None else gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))
    return y, dx, dW, db


def ref_deconv(x, W, b, gy, stride, pad, dil, group):
    """Deconvolution (the convolution's transpose): x (N, Cin, *in), W (Cin, O/group, *k)."""
    x, W = np.asarray(host(x), np.float64), np.asarray(host(W), np.float64)
    N, C = x.shape[:2]
    in_sp, k = x.shape[2:], W.shape[2:]
    O = W.shape[1] * group
    out_sp = tuple(stride[a] * (in_sp[a] - 1) + dil[a] * (k[a] - 1) + 1 - 2 * pad[a]
                   for a in range(len(in_sp)))
    Cg, Og = C // group, O // group
    y = np.zeros((N, O) + out_sp)
    dx, dW = np.zeros_like(x), np.zeros_like(W)
    gy = None if gy is None else np.asarray(host(gy), np.float64)
    all_ = slice(None)
    # the deconvolution's input positions play the convolution's output positions
    for o, kk, idx in _windows(out_sp, in_sp, k, stride, pad, dil):
        for g in range(group):
            cs, os_ = slice(g * Cg, (g + 1) * Cg), slice(g * Og, (g + 1) * Og)
            xs = x[(all_, cs) + o]                   # (N, Cg)
            ws = W[(cs, all_) + kk]                  # (Cg, Og)
            y[(all_, os_) + idx] += xs @ ws
            if gy is not None:
                g_i = gy[(all_, os_) + idx]          # (N, Og)
                dx[(all_, cs) + o] += g_i @ ws.T
                dW[(cs, all_) + kk] += xs.T @ g_i
    if b is not None:
        y += np.asarray(host(b), np.float64).reshape((1, O) + (1,) * len(in_sp))
    db = None if gy is None else gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))
    return y, dx, dW, db


# --------------------------------------------------------------------------
# running the layer
# --------------------------------------------------------------------------
def _per_axis(v, nd):
    return tuple(v) if isinstance(v, tuple) else (v,) * nd


def run_layer(type_, shape, num_output, kernel, stride=1, pad=0, dil=1, group=1, bias=True,
              dtype=np.float64, layout=None, budget=None, shift=False):
    nd = len(shape) - 2
    k, s, p, d = (_per_axis(v, nd) for v in (kernel, stride, pad, dil))
    params = "num_output: %d group: %d bias_term: %s" % (num_output, group, "true" if bias else "false")
    params += "".join(" kernel_size: %d" % v for v in k) + "".join(" stride: %d" % v for v in s)
    params += "".join(" pad: %d" % v for v in p) + "".join(" dilation: %d" % v for v in d)
    lp = text_format.Parse('name: "c" type: "%s" convolution_param { %s }' % (type_, params),
                           caffe_pb2.LayerParameter())
    lay = create_layer(lp, phase=caffe_pb2.TRAIN, dtype=dtype, xp=XP)
    lay.batch_last_layout = layout
    lay.depthwise_fast_path = False
    lay.shift_gemm_forward = shift
    if budget is not None:
        lay.col_buffer_bytes = budget
    x = RNG.standard_normal(shape).astype(dtype)
    bottom, top = Blob(shape, dtype=dtype), Blob((), dtype=dtype)
    bottom.data[...] = x
    lay.SetUp([bottom], [top])
    for blob in lay.blobs:
        blob.data[...] = RNG.standard_normal(blob.shape)
        blob.diff[...] = 0.5                  # param diffs accumulate onto this
    lay.Forward([bottom], [top])
    y = top.data.copy()
    gy = RNG.standard_normal(top.shape).astype(dtype)
    top.diff[...] = gy
    lay.Backward([top], [True], [bottom])
    got = (y, bottom.diff.copy(), lay.blobs[0].diff - 0.5,
           lay.blobs[1].diff - 0.5 if bias else None)
    ref_fn = ref_conv if type_ == "Convolution" else ref_deconv
    ref = ref_fn(x, lay.blobs[0].data, lay.blobs[1].data if bias else None, gy, s, p, d, group)
    if not bias:
        ref = ref[:3] + (None,)
    return lay, got, ref


def assert_matches(got, ref, dtype):
    rtol = 1e-10 if dtype == np.float64 else 2e-5
    for name, g, r in zip(("top", "bottom diff", "weight diff", "bias diff"), got, ref):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max(initial=0)))
        np.testing.assert_allclose(np.asarray(host(g), np.float64), r, rtol=rtol, atol=rtol * scale,
                                   err_msg=name)


CASES = [
    # id, shape, num_output, kernel, stride, pad, dilation, group
    ("k5p2_many", (7, 3, 9, 9), 4, 5, 1, 2, 1, 1),
    ("k5_nopad_odd", (5, 2, 11, 9), 3, 5, 1, 0, 1, 1),
    ("k3p1", (6, 4, 7, 8), 5, 3, 1, 1, 1, 1),
    ("k3s2p1", (5, 3, 9, 7), 4, 3, 2, 1, 1, 1),
    ("k3s2_nopad", (4, 2, 8, 8), 3, 3, 2, 0, 1, 1),
    ("rect", (3, 2, 7, 6), 3, (3, 2), (1, 2), (1, 0), 1, 1),
    ("dil2", (3, 2, 9, 9), 2, 3, 1, 2, 2, 1),
    ("group2", (4, 4, 6, 6), 6, 3, 1, 1, 1, 2),
    ("group2_s2", (3, 6, 7, 7), 4, 3, 2, 1, 1, 2),
    ("big_pad", (2, 2, 3, 3), 2, 3, 1, 3, 1, 1),
    ("trunc_quirk", (3, 1, 4, 4), 2, 5, 2, 0, 1, 1),
    ("1x1", (5, 6, 4, 5), 3, 1, 1, 0, 1, 1),
    ("1x1_group", (3, 4, 3, 3), 4, 1, 1, 0, 1, 2),
    ("1x1_s2", (3, 3, 5, 5), 2, 1, 2, 0, 1, 1),
    ("1x1_pad", (2, 3, 3, 4), 2, 1, 1, 1, 1, 1),
    ("single_image", (1, 3, 6, 6), 4, 3, 1, 1, 1, 1),
    ("1d", (4, 3, 10), 2, 3, 2, 1, 1, 1),
    ("3d", (3, 2, 4, 5, 4), 3, 2, 1, 1, 1, 1),
]
LAYOUTS = [(None, None), (True, None), (False, None), (True, 1), (False, 1), (True, 2000), (None, 2000)]


@pytest.mark.parametrize("layout,budget", LAYOUTS, ids=["%s-%s" % lb for lb in LAYOUTS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_convolution_paths_float64(case, layout, budget):
    _, shape, O, k, s, p, d, g = case
    lay, got, ref = run_layer("Convolution", shape, O, k, s, p, d, g, layout=layout, budget=budget)
    if layout is not None:
        assert lay.batch_last == layout
    if budget == 1:
        assert lay.chunk == 1
    assert_matches(got, ref, np.float64)


SHIFT_CASES = [c for c in CASES if len(c[1]) == 4 and c[4] == 1 and c[7] == 1 and c[3] != 1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", SHIFT_CASES + [("chunks", (9, 3, 6, 7), 4, 3, 1, 1, 1, 1),
                                                ("dil2_rect", (3, 2, 9, 8), 3, (3, 2), 1, (2, 1), 2, 1)],
                         ids=[c[0] for c in SHIFT_CASES] + ["chunks", "dil2_rect"])
def test_shift_gemm_forward(case, dtype, monkeypatch):
    """The shifted-GEMM engine (ShiftGemmEngine: forward and bottom diff; the
    weight diff stays on im2col), forced on, against the loops; small
    accumulator blocks so that several chunks of images are used."""
    from netlib.builtin import shiftconv
    monkeypatch.setattr(shiftconv.ShiftGemmEngine, "acc_elements", 150)
    _, shape, O, k, s, p, d, g = case
    lay, got, ref = run_layer("Convolution", shape, O, k, s, p, d, g, dtype=dtype, shift="always")
    assert lay._shift is not None
    if case[0] == "chunks":
        assert lay._shift.nb < shape[0]
    assert_matches(got, ref, dtype)


def test_shift_gemm_rule():
    """The measured rule: CIFAR-10's 5x5 layer on 16x16 maps takes the shifted
    GEMMs, a small 8x8 map and a strided layer do not."""
    assert run_layer("Convolution", (2, 32, 16, 16), 8, 5, 1, 2, shift=True)[0]._shift is not None
    assert run_layer("Convolution", (2, 32, 8, 8), 8, 5, 1, 2, shift=True)[0]._shift is None
    assert run_layer("Convolution", (2, 32, 16, 16), 8, 3, 2, 1, shift=True)[0]._shift is None
    assert run_layer("Convolution", (2, 32, 16, 16), 8, 5, 1, 2, shift=False)[0]._shift is None


@pytest.mark.parametrize("layout", [None, True, False])
@pytest.mark.parametrize("case", CASES[:9] + CASES[11:13], ids=[c[0] for c in CASES[:9] + CASES[11:13]])
def test_convolution_paths_float32(case, layout):
    _, shape, O, k, s, p, d, g = case
    _, got, ref = run_layer("Convolution", shape, O, k, s, p, d, g, dtype=np.float32, layout=layout)
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32
    assert_matches(got, ref, np.float32)


DECONV = [
    ("k3s2p1", (3, 2, 4, 5), 3, 3, 2, 1, 1, 1),
    ("k4s2p1", (4, 3, 5, 5), 2, 4, 2, 1, 1, 1),
    ("k3_group_dil", (2, 4, 3, 3), 4, 2, 1, 0, 2, 2),
    ("k5p2", (5, 2, 6, 6), 3, 5, 1, 2, 1, 1),
    ("1x1", (3, 3, 3, 3), 2, 1, 1, 0, 1, 1),
    ("1d", (3, 2, 4), 3, 3, 2, 0, 1, 1),
]


@pytest.mark.parametrize("layout,budget", [(None, None), (True, None), (False, None), (True, 1)])
@pytest.mark.parametrize("case", DECONV, ids=[c[0] for c in DECONV])
def test_deconvolution_paths(case, layout, budget):
    _, shape, O, k, s, p, d, g = case
    for dtype in (np.float64, np.float32):
        _, got, ref = run_layer("Deconvolution", shape, O, k, s, p, d, g, dtype=dtype, layout=layout,
                                budget=budget)
        assert_matches(got, ref, dtype)


def test_no_bias_and_propagate_flags():
    for layout in (True, False):
        lay, got, ref = run_layer("Convolution", (4, 3, 6, 6), 2, 3, 1, 1, bias=False, layout=layout)
        assert_matches(got, ref, np.float64)
        # propagate_down False: the bottom diff is left alone, the weight diff still accumulates
        bottom, top = Blob((4, 3, 6, 6), dtype=np.float64), Blob((), dtype=np.float64)
        bottom.data[...] = RNG.standard_normal(bottom.shape)
        lay.reshape([bottom], [top])
        top.diff[...] = RNG.standard_normal(top.shape)
        bottom.diff[...] = 7.0
        before = lay.blobs[0].diff.copy()
        lay.Backward([top], [False], [bottom])
        assert (bottom.diff == 7.0).all()
        ref_dw = ref_conv(bottom.data, lay.blobs[0].data, None, top.diff, (1, 1), (1, 1), (1, 1), 1)[2]
        np.testing.assert_allclose(host(lay.blobs[0].diff - before), ref_dw, rtol=1e-10, atol=1e-10)


def test_cifar_like_shape_picks_batch_last_and_large_maps_batch_first():
    lp = text_format.Parse('name: "c" type: "Convolution" convolution_param { num_output: 32 '
                           'kernel_size: 5 pad: 2 }', caffe_pb2.LayerParameter())
    for shape, expect in (((100, 32, 16, 16), True), ((2, 64, 56, 56), False)):
        lay = create_layer(lp, phase=caffe_pb2.TRAIN, dtype=np.float32, xp=XP)
        lay.SetUp([Blob(shape)], [Blob(())])
        assert lay.batch_last == expect


# --------------------------------------------------------------------------
# the batch-last im2col / col2im helpers
# --------------------------------------------------------------------------
@pytest.mark.parametrize("sp,k,p,s,d", [((7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
                                         ((8, 7), (3, 2), (0, 1), (2, 1), (1, 2)),
                                         ((4, 4), (5, 5), (0, 0), (2, 2), (1, 1)),
                                         ((9,), (3,), (2,), (3,), (1,))])
def test_batch_last_im2col_and_col2im_against_loops(sp, k, p, s, d):
    B, C = 3, 2
    out = tuple(_out_size(sp[a], k[a], p[a], s[a], d[a]) for a in range(len(sp)))
    ext = padded_extent(sp, out, k, p, s, d)
    x = RNG.standard_normal((C,) + sp + (B,))
    xpad = np.zeros((C,) + ext + (B,))
    xpad[(slice(None),) + tuple(slice(q, q + n) for q, n in zip(p, sp))] = x
    col = np.full((C,) + k + out + (B,), np.nan)
    im2col_batch_last(xpad, k, s, d, out, col)
    ref = np.zeros_like(col)
    for o, kk, idx in _windows(sp, out, k, s, p, d):
        ref[(slice(None),) + kk + o] = x[(slice(None),) + idx]
    np.testing.assert_array_equal(col, ref)
    # adjoint: <im2col(x), g> == <x, col2im(g)> on the interior, and col2im sums per pixel
    g = RNG.standard_normal(col.shape)
    back = np.full(xpad.shape, np.nan)
    col2im_batch_last(g, k, s, d, back)
    inner = back[(slice(None),) + tuple(slice(q, q + n) for q, n in zip(p, sp))]
    ref_back = np.zeros_like(x)
    for o, kk, idx in _windows(sp, out, k, s, p, d):
        ref_back[(slice(None),) + idx] += g[(slice(None),) + kk + o]
    np.testing.assert_allclose(inner, ref_back, rtol=1e-12, atol=1e-12)
