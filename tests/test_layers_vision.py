"""Vision layers (Convolution, Deconvolution, Pooling) and netlib.im2col.

Forward (and pooling backward) against naive Python-loop references written
here from Caffe's definitions, float64 gradient checks over parameter grids,
Caffe's size/divisor/tie quirks on hand-computed cases, error messages, and
the real-Caffe golden cases read directly with h5py.
"""
import itertools
import math

import numpy as np
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.errors import ConfigError, LayerError, ShapeError
from netlib.im2col import col2im, conv_out_size, im2col
from netlib.layer import create_layer
from netlib.builtin import pooling, vision
from netlib.proto import caffe_pb2
from netlib.testing import check_gradient
from xp_mode import XP, host

RNG = np.random.default_rng(1234)
FLT_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def make(text, phase="TEST", dtype=np.float32):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = "under_test"
    ph = caffe_pb2.TRAIN if phase == "TRAIN" else caffe_pb2.TEST
    return create_layer(lp, phase=ph, dtype=dtype, xp=XP)


def setup(text, xs, ntop=None, phase="TEST", params=None, dtype=np.float32):
    lay = make(text, phase, dtype)
    bottom = []
    for x in xs:
        b = Blob(x.shape, dtype=dtype)
        b.data[...] = x
        bottom.append(b)
    top = [Blob((), dtype=dtype) for _ in range(ntop or len(xs))]
    lay.SetUp(bottom, top)
    if params is not None:
        for blob, p in zip(lay.blobs, params):
            blob.data[...] = p
    lay.Forward(bottom, top)
    return lay, bottom, top


def f32(shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def close(got, ref, rtol=1e-5, atol=1e-5):
    got = np.asarray(host(got), np.float64)
    ref = np.asarray(host(ref), np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max(initial=0))))


def conv_text(num_output, extra="", type_="Convolution", fill=True):
    fillers = ('weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'
               if fill else "")
    return ('type: "%s" convolution_param { num_output: %d %s %s }'
            % (type_, num_output, extra, fillers))


# --------------------------------------------------------------------------
# naive references (Caffe's definitions, one output position at a time)
# --------------------------------------------------------------------------
def naive_conv(x, W, b, stride, pad, dil, group):
    """x (N, C, *sp), W (O, C/group, *k): cross-correlation with zero padding."""
    x = np.asarray(host(x), np.float64)
    W = np.asarray(host(W), np.float64)
    N, C = x.shape[:2]
    sp = x.shape[2:]
    nd = len(sp)
    O = W.shape[0]
    k = W.shape[2:]
    out_sp = tuple((sp[a] + 2 * pad[a] - (dil[a] * (k[a] - 1) + 1)) // stride[a] + 1 for a in range(nd))
    y = np.zeros((N, O) + out_sp)
    Cg, Og = C // group, O // group
    for o in itertools.product(*[range(s) for s in out_sp]):
        for kk in itertools.product(*[range(s) for s in k]):
            idx = tuple(o[a] * stride[a] - pad[a] + kk[a] * dil[a] for a in range(nd))
            if not all(0 <= idx[a] < sp[a] for a in range(nd)):
                continue
            for g in range(group):
                xs = x[(slice(None), slice(g * Cg, (g + 1) * Cg)) + idx]
                ws = W[(slice(g * Og, (g + 1) * Og), slice(None)) + kk]
                y[(slice(None), slice(g * Og, (g + 1) * Og)) + o] += xs @ ws.T
    if b is not None:
        y += np.asarray(host(b), np.float64).reshape((1, O) + (1,) * nd)
    return y


def naive_deconv(x, W, b, stride, pad, dil, group):
    """Transposed convolution by scattering: x (N, C, *sp), W (C, O/group, *k)."""
    x = np.asarray(host(x), np.float64)
    W = np.asarray(host(W), np.float64)
    N, C = x.shape[:2]
    sp = x.shape[2:]
    nd = len(sp)
    Og = W.shape[1]
    O = Og * group
    k = W.shape[2:]
    out_sp = tuple(stride[a] * (sp[a] - 1) + dil[a] * (k[a] - 1) + 1 - 2 * pad[a] for a in range(nd))
    y = np.zeros((N, O) + out_sp)
    Cg = C // group
    for i in itertools.product(*[range(s) for s in sp]):
        for kk in itertools.product(*[range(s) for s in k]):
            pos = tuple(i[a] * stride[a] - pad[a] + kk[a] * dil[a] for a in range(nd))
            if not all(0 <= pos[a] < out_sp[a] for a in range(nd)):
                continue
            for g in range(group):
                xs = x[(slice(None), slice(g * Cg, (g + 1) * Cg)) + i]
                ws = W[(slice(g * Cg, (g + 1) * Cg), slice(None)) + kk]
                y[(slice(None), slice(g * Og, (g + 1) * Og)) + pos] += xs @ ws
    if b is not None:
        y += np.asarray(host(b), np.float64).reshape((1, O) + (1,) * nd)
    return y


def naive_pool_size(H, k, p, s, ceil_mode=True):
    v = (H + 2 * p - k) / s
    return int(math.ceil(v) if ceil_mode else math.floor(v)) + 1


def naive_pool(x, method, kh, kw, sh=1, sw=1, ph=0, pw=0, ceil_mode=True, dy=None):
    """Caffe's CPU loops (MAX, AVE) per window, vectorised over (N, C) only.
    Returns (top, mask, bottom_diff or None)."""
    x = np.asarray(host(x), np.float64)
    N, C, H, W = x.shape
    PH = naive_pool_size(H, kh, ph, sh, ceil_mode)
    PW = naive_pool_size(W, kw, pw, sw, ceil_mode)
    if ph or pw:
        if (PH - 1) * sh >= H + ph:
            PH -= 1
        if (PW - 1) * sw >= W + pw:
            PW -= 1
    y = np.zeros((N, C, PH, PW))
    mask = np.full((N, C, PH, PW), -1.0)
    dx = np.zeros_like(x) if dy is not None else None
    for a in range(PH):
        for b in range(PW):
            hs, ws = a * sh - ph, b * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, H), min(ws + kw, W)
                hs, ws = max(hs, 0), max(ws, 0)
                best = np.full((N, C), -FLT_MAX)
                arg = np.full((N, C), -1)
                for h in range(hs, he):
                    for w in range(ws, we):
                        upd = x[:, :, h, w] > best
                        best = np.where(upd, x[:, :, h, w], best)
                        arg = np.where(upd, h * W + w, arg)
                y[:, :, a, b] = best
                mask[:, :, a, b] = arg
                if dx is not None:
                    for n in range(N):
                        for c in range(C):
                            if arg[n, c] >= 0:
                                dx[n, c].flat[arg[n, c]] += dy[n, c, a, b]
            else:
                he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                y[:, :, a, b] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
                if dx is not None:
                    dx[:, :, hs:he, ws:we] += (dy[:, :, a, b] / size)[:, :, None, None]
    return y, mask, dx


# --------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------
def naive_im2col(x, k, p, s, d):
    N, C = x.shape[:2]
    sp = x.shape[2:]
    nd = len(sp)
    out = tuple(conv_out_size(sp[a], k[a], p[a], s[a], d[a]) for a in range(nd))
    col = np.zeros((N, C) + tuple(k) + out)
    for kk in itertools.product(*[range(v) for v in k]):
        for o in itertools.product(*[range(v) for v in out]):
            idx = tuple(o[a] * s[a] - p[a] + kk[a] * d[a] for a in range(nd))
            if all(0 <= idx[a] < sp[a] for a in range(nd)):
                col[(slice(None), slice(None)) + kk + o] = x[(slice(None), slice(None)) + idx]
    return col


@pytest.mark.parametrize("sp,k,p,s,d", [
    ((7, 6), (3, 2), (1, 0), (2, 1), (1, 1)),
    ((9, 8), (3, 3), (2, 1), (3, 2), (2, 1)),
    ((5, 5), (1, 1), (0, 0), (1, 1), (1, 1)),
    ((4, 4), (5, 5), (0, 0), (2, 2), (1, 1)),   # C++ truncating division: one output
    ((8,), (3,), (1,), (2,), (2,)),
    ((4, 5, 3), (2, 3, 2), (1, 0, 1), (1, 2, 1), (1, 1, 2)),
])
def test_im2col_matches_naive_and_col2im_is_adjoint(sp, k, p, s, d):
    x = RNG.standard_normal((2, 3) + sp)
    col = im2col(x, k, p, s, d)
    ref = naive_im2col(x, k, p, s, d)
    np.testing.assert_array_equal(col, ref)
    out = np.full(ref.shape, 7.0)          # every element must be written
    np.testing.assert_array_equal(im2col(x, k, p, s, d, out=out), ref)
    g = RNG.standard_normal(col.shape)
    back = col2im(g, sp, k, p, s, d)
    assert back.shape == x.shape
    assert abs((col * g).sum() - (x * back).sum()) < 1e-9 * max(1.0, abs((col * g).sum()))


def test_im2col_writes_into_strided_view_and_float32():
    x = f32((3, 2, 6, 6))
    buf = np.empty((2, 3, 3, 3, 6, 6), np.float32)       # layout (C, kh, kw, N, oh, ow)
    view = buf.transpose(3, 0, 1, 2, 4, 5)
    im2col(x, 3, 1, 1, 1, out=view)
    assert view.dtype == np.float32
    np.testing.assert_array_equal(view, naive_im2col(x, (3, 3), (1, 1), (1, 1), (1, 1)))


def test_conv_out_size_truncates_like_cpp():
    assert conv_out_size(6, 3, 1, 1) == 6
    assert conv_out_size(7, 3, 1, 2) == 4
    assert conv_out_size(4, 5, 0, 2) == 1    # (4-5)/2 == 0 in C++
    assert conv_out_size(3, 5, 0, 2) == 0    # (3-5)/2 == -1


# --------------------------------------------------------------------------
# Convolution / Deconvolution forward against the naive references
# --------------------------------------------------------------------------
CONV_CASES = [
    # (id, bottom shape, num_output, extra params, stride, pad, dilation, group)
    ("k3", (2, 3, 6, 6), 4, "kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ("k3p1", (2, 3, 6, 5), 4, "kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1), 1),
    ("k3s2p1", (3, 2, 7, 7), 3, "kernel_size: 3 stride: 2 pad: 1", (2, 2), (1, 1), (1, 1), 1),
    ("rect_hw", (2, 2, 7, 6), 3, "kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1",
     (2, 1), (1, 0), (1, 1), 1),
    ("rect_rep", (2, 2, 8, 7), 3, "kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 pad: 0 pad: 1",
     (1, 2), (0, 1), (1, 1), 1),
    ("dil2", (2, 2, 9, 8), 3, "kernel_size: 3 dilation: 2 pad: 2", (1, 1), (2, 2), (2, 2), 1),
    ("dil_rect", (1, 2, 9, 9), 2, "kernel_size: 3 dilation: 3 dilation: 1 stride: 2",
     (2, 2), (0, 0), (3, 1), 1),
    ("group2", (2, 4, 5, 5), 6, "kernel_size: 3 pad: 1 group: 2", (1, 1), (1, 1), (1, 1), 2),
    ("group4_s2", (2, 8, 6, 6), 4, "kernel_size: 2 stride: 2 group: 4", (2, 2), (0, 0), (1, 1), 4),
    ("1x1", (3, 5, 4, 3), 4, "kernel_size: 1", (1, 1), (0, 0), (1, 1), 1),
    ("1x1_group", (2, 6, 3, 3), 4, "kernel_size: 1 group: 2", (1, 1), (0, 0), (1, 1), 2),
    ("1x1_s2", (2, 3, 5, 5), 2, "kernel_size: 1 stride: 2", (2, 2), (0, 0), (1, 1), 1),
    ("k5_lenet", (4, 3, 12, 12), 5, "kernel_size: 5", (1, 1), (0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_convolution_forward_matches_naive(case):
    _, shape, O, extra, s, p, d, g = case
    x = f32(shape)
    lay, bottom, top = setup(conv_text(O, extra), [x])
    W, b = lay.blobs[0].data, lay.blobs[1].data
    assert W.shape[:2] == (O, shape[1] // g)
    close(top[0].data, naive_conv(x, W, b, s, p, d, g))


@pytest.mark.parametrize("case", CONV_CASES[:9], ids=[c[0] for c in CONV_CASES[:9]])
def test_deconvolution_forward_matches_naive(case):
    _, shape, O, extra, s, p, d, g = case
    x = f32(shape)
    lay, bottom, top = setup(conv_text(O, extra, "Deconvolution"), [x])
    W, b = lay.blobs[0].data, lay.blobs[1].data
    assert W.shape[:2] == (shape[1], O // g)      # (C_in, num_output/group, k...)
    close(top[0].data, naive_deconv(x, W, b, s, p, d, g))


def test_convolution_1d_and_3d_match_naive():
    x = f32((2, 3, 9))
    lay, _, top = setup(conv_text(4, "kernel_size: 3 stride: 2 pad: 1"), [x])
    close(top[0].data, naive_conv(x, lay.blobs[0].data, lay.blobs[1].data, (2,), (1,), (1,), 1))
    x = f32((2, 4, 5, 4, 6))
    lay, _, top = setup(conv_text(4, "kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1 pad: 0 pad: 1 "
                                     "stride: 1 stride: 1 stride: 2 dilation: 1 dilation: 1 dilation: 2 group: 2"),
                        [x])
    assert top[0].shape == (2, 4, 6, 2, 3)
    close(top[0].data, naive_conv(x, lay.blobs[0].data, lay.blobs[1].data, (1, 1, 2), (1, 0, 1), (1, 1, 2), 2))
    lay, _, top = setup(conv_text(3, "kernel_size: 3 stride: 2", "Deconvolution"), [x])
    close(top[0].data, naive_deconv(x, lay.blobs[0].data, lay.blobs[1].data, (2,) * 3, (0,) * 3, (1,) * 3, 1))


def test_convolution_without_spatial_axes_is_a_matmul():
    x = f32((3, 4))            # channel axis 1 and no spatial axis: Caffe allows it (a 1x1 convolution)
    lay, _, top = setup(conv_text(6, "group: 2"), [x])
    W, b = host(lay.blobs[0].data), host(lay.blobs[1].data)
    assert W.shape == (6, 2)
    ref = np.concatenate([x[:, :2] @ W[:3].T, x[:, 2:] @ W[3:].T], axis=1) + b
    close(top[0].data, ref)
    check_gradient(conv_text(2, ""), bottom_shapes=[(3, 4)])


def test_empty_batch():
    for text in (conv_text(2, "kernel_size: 3"), conv_text(2, "kernel_size: 1"),
                 conv_text(2, "kernel_size: 3", "Deconvolution"),
                 'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 }',
                 'type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }'):
        for phase in ("TEST", "TRAIN"):
            lay, bottom, top = setup(text, [f32((0, 2, 5, 5))], phase=phase)
            assert top[0].shape[0] == 0
            lay.Backward(top, [True], bottom)


def test_convolution_axis_flattens_outer_dims():
    x = f32((2, 3, 4, 5, 6))          # axis 2: outer (2, 3), C = 4, spatial (5, 6)
    lay, _, top = setup(conv_text(3, "kernel_size: 3 pad: 1 axis: 2"), [x])
    assert top[0].shape == (2, 3, 3, 5, 6)
    ref = naive_conv(x.reshape(6, 4, 5, 6), lay.blobs[0].data, lay.blobs[1].data, (1, 1), (1, 1), (1, 1), 1)
    close(top[0].data, ref.reshape(2, 3, 3, 5, 6))
    lay, _, top = setup(conv_text(3, "kernel_size: 3 axis: -3"), [f32((2, 4, 5, 6))])
    assert top[0].shape == (2, 3, 3, 4)


def test_convolution_force_nd_and_chunking_give_the_same_numbers(monkeypatch):
    x = f32((5, 3, 7, 7))
    text = conv_text(4, "kernel_size: 3 stride: 2 pad: 1 group: 1")
    lay, _, top = setup(text, [x])
    ref = naive_conv(x, lay.blobs[0].data, lay.blobs[1].data, (2, 2), (1, 1), (1, 1), 1)
    close(top[0].data, ref)
    params = [b.data.copy() for b in lay.blobs]
    # two images per chunk (5 images: chunks 2, 2, 1), then one per chunk
    per_image = 3 * 9 * 16 * 4
    for budget in (2 * per_image, 1):
        monkeypatch.setattr(vision._BaseConvolutionLayer, "col_buffer_bytes", budget)
        lay2, _, top2 = setup(text.replace("group: 1", "group: 1 force_nd_im2col: true"), [x], params=params)
        assert lay2.chunk == (2 if budget > 1 else 1)
        close(top2[0].data, ref)


def test_convolution_cpp_truncation_quirk():
    # (4 + 0 - 5) / 2 truncates to 0 in C++: one output whose window reads zeros past the edge.
    x = f32((1, 1, 4, 4))
    lay, _, top = setup(conv_text(1, "kernel_size: 5 stride: 2 bias_term: false"), [x])
    assert top[0].shape == (1, 1, 1, 1)
    W = host(lay.blobs[0].data)[0, 0]
    close(top[0].data.ravel(), [float((x[0, 0] * W[:4, :4]).sum())])


def test_convolution_default_fillers_are_zero_and_bias_term_false():
    lay, _, top = setup('type: "Convolution" convolution_param { num_output: 2 kernel_size: 2 }', [f32((1, 2, 3, 3))])
    assert len(lay.blobs) == 2 and not lay.blobs[0].data.any() and not lay.blobs[1].data.any()
    lay, _, _ = setup(conv_text(2, "kernel_size: 2 bias_term: false"), [f32((1, 2, 3, 3))])
    assert len(lay.blobs) == 1


# --------------------------------------------------------------------------
# gradient checks (float64)
# --------------------------------------------------------------------------
GRAD_CONV = [
    ("k3", (2, 3, 5, 5), conv_text(2, "kernel_size: 3")),
    ("k3s2p1", (2, 2, 6, 5), conv_text(3, "kernel_size: 3 stride: 2 pad: 1")),
    ("rect_nobias", (2, 2, 6, 5),
     conv_text(2, "kernel_h: 3 kernel_w: 2 pad_h: 1 stride_h: 1 stride_w: 2 bias_term: false")),
    ("dil2", (1, 2, 7, 7), conv_text(2, "kernel_size: 3 dilation: 2 pad: 1")),
    ("group2", (2, 4, 4, 4), conv_text(4, "kernel_size: 2 group: 2 pad: 1 stride: 2")),
    ("1x1_group", (2, 4, 3, 3), conv_text(2, "kernel_size: 1 group: 2")),
    ("1d", (2, 3, 7), conv_text(2, "kernel_size: 3 stride: 2 pad: 1")),
    ("3d", (1, 2, 4, 3, 4), conv_text(2, "kernel_size: 2 pad: 1 stride: 2")),
    ("axis2", (2, 2, 2, 4, 4), conv_text(2, "kernel_size: 3 axis: 2 pad: 1")),
    ("deconv_k3s2p1", (2, 2, 3, 3), conv_text(2, "kernel_size: 3 stride: 2 pad: 1", "Deconvolution")),
    ("deconv_group_dil", (1, 4, 3, 3), conv_text(2, "kernel_size: 2 group: 2 dilation: 2", "Deconvolution")),
    ("deconv_1x1", (2, 3, 3, 3), conv_text(2, "kernel_size: 1 bias_term: false", "Deconvolution")),
    ("deconv_1d", (2, 2, 4), conv_text(3, "kernel_size: 3 stride: 2", "Deconvolution")),
]


@pytest.mark.parametrize("case", GRAD_CONV, ids=[c[0] for c in GRAD_CONV])
def test_convolution_gradient(case):
    _, shape, text = case
    res = check_gradient(text, bottom_shapes=[shape])
    assert res.checked > 0


def test_convolution_gradient_chunked_and_two_bottoms(monkeypatch):
    monkeypatch.setattr(vision._BaseConvolutionLayer, "col_buffer_bytes", 1)   # one image per chunk
    check_gradient(conv_text(2, "kernel_size: 3 pad: 1 stride: 2"), bottom_shapes=[(3, 2, 4, 4)])
    check_gradient(conv_text(2, "kernel_size: 3 stride: 2", "Deconvolution"), bottom_shapes=[(3, 2, 3, 3)])
    monkeypatch.undo()
    check_gradient(conv_text(2, "kernel_size: 2 pad: 1"), bottom_shapes=[(2, 2, 3, 3), (2, 2, 3, 3)], num_tops=2)


# --------------------------------------------------------------------------
# backward bookkeeping
# --------------------------------------------------------------------------
@pytest.mark.parametrize("type_", ["Convolution", "Deconvolution"])
def test_conv_backward_accumulates_params_and_respects_propagate_flags(type_):
    x = f32((2, 2, 5, 5))
    text = conv_text(3, "kernel_size: 3 stride: 2", type_)
    lay, bottom, top = setup(text, [x])
    top[0].diff[...] = f32(top[0].shape)
    for blob in lay.blobs:
        blob.diff[...] = 0
    lay.Backward(top, [True], bottom)
    dW, db, dx = host(lay.blobs[0].diff).copy(), host(lay.blobs[1].diff).copy(), host(bottom[0].diff).copy()
    assert np.abs(dW).sum() > 0 and np.abs(db).sum() > 0 and np.abs(dx).sum() > 0
    close(db, top[0].diff.sum(axis=(0, 2, 3)))
    # a second backward: params accumulate, bottom diff is overwritten
    lay.Backward(top, [True], bottom)
    close(lay.blobs[0].diff, 2 * dW)
    close(lay.blobs[1].diff, 2 * db)
    close(bottom[0].diff, dx)
    # param_propagate_down / propagate_down: untouched buffers
    lay.param_propagate_down = [False, True]
    lay.blobs[0].diff[...] = 7
    lay.blobs[1].diff[...] = 0
    bottom[0].diff[...] = 5
    lay.Backward(top, [False], bottom)
    assert (lay.blobs[0].diff == 7).all() and (bottom[0].diff == 5).all()
    close(lay.blobs[1].diff, db)
    lay.param_propagate_down = [True, False]
    lay.blobs[0].diff[...] = 0
    lay.blobs[1].diff[...] = 3
    lay.Backward(top, [True], bottom)
    assert (lay.blobs[1].diff == 3).all()
    close(lay.blobs[0].diff, dW)
    close(bottom[0].diff, dx)


def test_conv_two_bottoms_share_weights():
    xa, xb = f32((2, 2, 5, 5)), f32((2, 2, 5, 5))
    text = conv_text(3, "kernel_size: 3 pad: 1")
    lay, bottom, top = setup(text, [xa, xb])
    W, b = lay.blobs[0].data, lay.blobs[1].data
    close(top[0].data, naive_conv(xa, W, b, (1, 1), (1, 1), (1, 1), 1))
    close(top[1].data, naive_conv(xb, W, b, (1, 1), (1, 1), (1, 1), 1))
    ga, gb = f32(top[0].shape), f32(top[1].shape)
    top[0].diff[...], top[1].diff[...] = ga, gb
    for blob in lay.blobs:
        blob.diff[...] = 0
    lay.Backward(top, [True, True], bottom)
    both = lay.blobs[0].diff.copy()
    single = []
    for x, g in ((xa, ga), (xb, gb)):
        l1, b1, t1 = setup(text, [x], params=[W, b])
        t1[0].diff[...] = g
        for blob in l1.blobs:
            blob.diff[...] = 0
        l1.Backward(t1, [True], b1)
        single.append(l1.blobs[0].diff.copy())
    close(both, single[0] + single[1], rtol=1e-4)


def test_deconvolution_is_the_adjoint_of_convolution():
    # conv (7x5 -> 4x3, k3 s2 p1) and deconv (4x3 -> 7x5) with the same weights: <conv x, y> == <x, deconv y>
    text = "kernel_size: 3 stride: 2 pad: 1 group: 2 bias_term: false"
    x = f32((2, 4, 7, 5))
    conv, _, ctop = setup(conv_text(6, text), [x])
    y = f32(ctop[0].shape)
    deconv, _, dtop = setup(conv_text(4, text, "Deconvolution"), [y], params=[conv.blobs[0].data])
    assert dtop[0].shape == x.shape
    lhs = float((host(ctop[0].data).astype(np.float64) * y).sum())
    rhs = float((x.astype(np.float64) * host(dtop[0].data)).sum())
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs))


# --------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------
POOL_CASES = [
    # (id, shape, text params, method, kh, kw, sh, sw, ph, pw, ceil)
    ("max_k3s2", (2, 3, 7, 7), "pool: MAX kernel_size: 3 stride: 2", "MAX", 3, 3, 2, 2, 0, 0, True),
    ("max_k2s2", (2, 2, 6, 5), "pool: MAX kernel_size: 2 stride: 2", "MAX", 2, 2, 2, 2, 0, 0, True),
    ("max_k3s2p1", (2, 2, 6, 7), "pool: MAX kernel_size: 3 stride: 2 pad: 1", "MAX", 3, 3, 2, 2, 1, 1, True),
    ("max_clip", (1, 2, 5, 5), "pool: MAX kernel_size: 2 stride: 2 pad: 1", "MAX", 2, 2, 2, 2, 1, 1, True),
    ("max_rect", (2, 2, 7, 6), "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     "MAX", 3, 2, 2, 1, 1, 0, True),
    ("max_floor", (2, 2, 7, 7), "pool: MAX kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR",
     "MAX", 3, 3, 2, 2, 1, 1, False),
    ("max_s_gt_k", (1, 2, 5, 7), "pool: MAX kernel_size: 1 stride: 3", "MAX", 1, 1, 3, 3, 0, 0, True),
    ("ave_k3s2", (2, 3, 7, 7), "pool: AVE kernel_size: 3 stride: 2", "AVE", 3, 3, 2, 2, 0, 0, True),
    ("ave_k3s2p1", (2, 2, 6, 7), "pool: AVE kernel_size: 3 stride: 2 pad: 1", "AVE", 3, 3, 2, 2, 1, 1, True),
    ("ave_overhang", (1, 2, 4, 4), "pool: AVE kernel_size: 3 stride: 2 pad: 1", "AVE", 3, 3, 2, 2, 1, 1, True),
    ("ave_rect", (2, 2, 7, 6), "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1",
     "AVE", 3, 2, 2, 1, 1, 1, True),
    ("ave_floor", (2, 2, 8, 8), "pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR",
     "AVE", 3, 3, 2, 2, 0, 0, False),
    ("max_global", (2, 3, 5, 4), "pool: MAX global_pooling: true", "MAX", 5, 4, 1, 1, 0, 0, True),
    ("ave_global", (2, 3, 5, 4), "pool: AVE global_pooling: true", "AVE", 5, 4, 1, 1, 0, 0, True),
]


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_pooling_matches_naive_forward_and_backward(case, phase, engine):
    _, shape, params, method, kh, kw, sh, sw, ph, pw, ceil_mode = case
    x = f32(shape)
    ntop = 2 if method == "MAX" and phase == "TRAIN" else 1      # mask top in one run
    lay, bottom, top = setup('type: "Pooling" pooling_param { %s }' % params, [x], ntop=ntop, phase=phase)
    dy = f32(top[0].shape)
    y, mask, dx = naive_pool(x, method, kh, kw, sh, sw, ph, pw, ceil_mode, dy=dy.astype(np.float64))
    close(top[0].data, y)
    if ntop == 2:
        np.testing.assert_array_equal(host(top[1].data), mask)
    top[0].diff[...] = dy
    bottom[0].diff[...] = 99
    lay.Backward(top, [True], bottom)
    close(bottom[0].diff, dx)


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[0] in ("max_k3s2p1", "max_rect", "ave_k3s2p1",
                                                                    "max_global", "max_s_gt_k")],
                         ids=lambda c: c[0])
def test_pooling_in_batch_chunks(case, monkeypatch, engine):
    # 5 images in chunks of 2, 2, 1: the kernel-offset loops run per chunk
    _, shape, params, method, kh, kw, sh, sw, ph, pw, ceil_mode = case
    shape = (5,) + shape[1:]
    monkeypatch.setattr(pooling.PoolingLayer, "chunk_bytes", 2 * 4 * int(np.prod(shape[1:])))
    x = f32(shape)
    for phase in ("TEST", "TRAIN"):
        lay, bottom, top = setup('type: "Pooling" pooling_param { %s }' % params, [x], phase=phase)
        assert len(lay._chunks(shape)) == 3
        dy = f32(top[0].shape)
        y, _, dx = naive_pool(x, method, kh, kw, sh, sw, ph, pw, ceil_mode, dy=dy.astype(np.float64))
        close(top[0].data, y)
        top[0].diff[...] = dy
        lay.Backward(top, [True], bottom)
        close(bottom[0].diff, dx)


def test_pooling_output_size_rules():
    def shape(params, hw):
        return setup('type: "Pooling" pooling_param { %s }' % params, [f32((1, 1) + hw)])[2][0].shape[2:]
    assert shape("pool: MAX kernel_size: 3 stride: 2", (6, 6)) == (3, 3)          # ceil(3/2)+1
    assert shape("pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR", (6, 6)) == (2, 2)
    assert shape("pool: MAX kernel_size: 2 stride: 2 pad: 1", (5, 5)) == (3, 3)   # 4, last window clipped
    assert shape("pool: MAX kernel_size: 2 stride: 2 pad: 1", (6, 6)) == (4, 4)
    assert shape("pool: AVE kernel_size: 3 stride: 2 pad: 1", (4, 4)) == (3, 3)
    assert shape("pool: MAX kernel_h: 2 kernel_w: 3 stride: 2 pad_h: 1 pad_w: 0", (5, 5)) == (3, 2)
    assert shape("pool: AVE global_pooling: true", (5, 3)) == (1, 1)


def test_ave_pooling_divisor_counts_padding_not_overhang():
    x = np.ones((1, 1, 3, 3), np.float32)
    y = setup('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }', [x])[2][0].data
    close(y[0, 0], np.array([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9.0)
    # H=4, k=3, s=2, p=1: windows start at -1, 1, 3; the last one ends at min(6, H+pad=5): divisor 2*.. not 3*..
    x = np.ones((1, 1, 4, 4), np.float32)
    y = setup('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }', [x])[2][0].data
    close(y[0, 0], np.array([[4 / 9, 6 / 9, 2 / 6], [6 / 9, 9 / 9, 3 / 6], [2 / 6, 3 / 6, 1 / 4]]))


def test_max_pooling_ties_first_in_raster_order_and_empty_windows():
    x = np.zeros((1, 1, 4, 4), np.float32)
    lay, bottom, top = setup('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }',
                             [x], ntop=2)
    np.testing.assert_array_equal(host(top[1].data[0, 0]), [[0, 1, 3], [4, 5, 7], [12, 13, 15]])
    # stride 3 > kernel 1 and pad 0: the ceil rule makes a third window that starts past the image
    x = f32((1, 2, 5, 5))
    lay, bottom, top = setup('type: "Pooling" pooling_param { pool: MAX kernel_size: 1 stride: 3 }', [x], ntop=2)
    assert top[0].shape == (1, 2, 3, 3)
    assert (top[0].data[:, :, 2, :] == -FLT_MAX).all() and (top[1].data[:, :, :, 2] == -1).all()
    close(top[0].data[:, :, :2, :2], x[:, :, ::3, ::3])
    top[0].diff[...] = 1
    lay.Backward(top, [True], bottom)
    assert bottom[0].diff.sum() == 8
    # -inf and NaN never win (strict > from -FLT_MAX)
    x = np.array([[[[-np.inf, np.nan], [np.nan, -np.inf]]]], np.float32)
    for phase in ("TEST", "TRAIN"):
        for params in ("kernel_size: 2", "global_pooling: true"):
            _, _, top = setup('type: "Pooling" pooling_param { pool: MAX %s }' % params, [x], ntop=2, phase=phase)
            assert top[0].data.ravel().tolist() == [-FLT_MAX] and top[1].data.ravel().tolist() == [-1]
    # the fast TEST path (no mask top) also skips NaN like Caffe's strict >
    x = np.array([[[[1, np.nan, 0, 2], [-1, -np.inf, np.nan, 3]]]], np.float32)
    _, _, top = setup('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }', [x])
    assert top[0].data.ravel().tolist() == [1, 3]


def test_max_pooling_test_phase_backward_recomputes_argmax():
    # TEST phase without a mask top takes the fast path; backward must still be Caffe's.
    x = f32((2, 3, 9, 9))
    lay, bottom, top = setup('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', [x])
    top[0].data[...] = 0         # an in-place layer above may overwrite the top; backward must not care
    dy = f32(top[0].shape)
    top[0].diff[...] = dy
    lay.Backward(top, [True], bottom)
    close(bottom[0].diff, naive_pool(x, "MAX", 3, 3, 2, 2, dy=dy.astype(np.float64))[2])


def test_pooling_backward_propagate_down_false_leaves_diff():
    lay, bottom, top = setup('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }', [f32((1, 1, 4, 4))])
    bottom[0].diff[...] = 3
    top[0].diff[...] = 1
    lay.Backward(top, [False], bottom)
    assert (bottom[0].diff == 3).all()


def test_stochastic_pooling_test_formula_and_train_error():
    x = np.abs(f32((2, 2, 5, 5))) + 0.1
    _, _, top = setup('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }', [x])
    ref = np.zeros((2, 2, 2, 2))
    for a in range(2):
        for b in range(2):
            win = x[:, :, 2 * a:2 * a + 3, 2 * b:2 * b + 3].astype(np.float64)
            ref[:, :, a, b] = (win ** 2).sum(axis=(2, 3)) / (win.sum(axis=(2, 3)) + np.finfo(np.float32).tiny)
    close(top[0].data, ref)
    with pytest.raises(ConfigError, match="STOCHASTIC"):
        setup('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 }', [x], phase="TRAIN")


GRAD_POOL = [
    ("max_k3s2", (2, 2, 7, 7), "pool: MAX kernel_size: 3 stride: 2", "TRAIN", 1),
    ("max_k3s2p1_test", (1, 2, 6, 5), "pool: MAX kernel_size: 3 stride: 2 pad: 1", "TEST", 1),
    ("max_rect_mask", (1, 2, 6, 5), "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     "TRAIN", 2),
    ("max_floor", (1, 2, 7, 7), "pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR", "TRAIN", 1),
    ("max_global", (2, 2, 4, 3), "pool: MAX global_pooling: true", "TRAIN", 1),
    ("ave_k3s2", (2, 2, 7, 7), "pool: AVE kernel_size: 3 stride: 2", "TRAIN", 1),
    ("ave_k3s2p1", (1, 2, 6, 5), "pool: AVE kernel_size: 3 stride: 2 pad: 1", "TRAIN", 1),
    ("ave_rect_pad", (1, 2, 5, 6), "pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 1",
     "TRAIN", 1),
    ("ave_floor", (1, 2, 7, 7), "pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR", "TRAIN", 1),
    ("ave_global", (2, 2, 4, 3), "pool: AVE global_pooling: true", "TRAIN", 1),
]


@pytest.mark.parametrize("case", GRAD_POOL, ids=[c[0] for c in GRAD_POOL])
def test_pooling_gradient(case, engine):
    _, shape, params, phase, ntop = case
    res = check_gradient('type: "Pooling" pooling_param { %s }' % params, bottom_shapes=[shape],
                         phase=phase, num_tops=ntop)
    assert res.checked > 0


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
CONV_ERRORS = [
    ("group_C", (1, 3, 5, 5), 'num_output: 4 kernel_size: 3 group: 2', "multiple of group"),
    ("group_O", (1, 4, 5, 5), 'num_output: 3 kernel_size: 3 group: 2', "num_output"),
    ("no_kernel", (1, 3, 5, 5), 'num_output: 2', "kernel"),
    ("no_num_output", (1, 3, 5, 5), 'kernel_size: 3', "num_output"),
    ("mix_kernel", (1, 3, 5, 5), 'num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3', "not both"),
    ("hw_on_3d", (1, 3, 5, 5, 5), 'num_output: 2 kernel_h: 3 kernel_w: 3', "2-D"),
    ("kernel_count", (1, 3, 5, 5), 'num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3', "once per"),
    ("pad_count", (1, 3, 5, 5, 5), 'num_output: 2 kernel_size: 3 pad: 1 pad: 1', "pad must be"),
    ("kernel_w_zero", (1, 3, 5, 5), 'num_output: 2 kernel_h: 3', "nonzero"),
    ("bad_axis", (1, 3, 5, 5), 'num_output: 2 kernel_size: 3 axis: 4', "axis"),
    ("too_big", (1, 3, 2, 2), 'num_output: 2 kernel_size: 5', "does not fit"),
]


@pytest.mark.parametrize("case", CONV_ERRORS, ids=[c[0] for c in CONV_ERRORS])
def test_convolution_errors(case):
    _, shape, params, words = case
    with pytest.raises((LayerError, ConfigError)) as info:
        setup('name: "conv9" type: "Convolution" convolution_param { %s }' % params, [f32(shape)])
    msg = str(info.value)
    assert words in msg and "conv9" in msg and "Convolution" in msg
    if case[0] in ("group_C", "too_big", "bad_axis"):
        assert str(shape) in msg


def test_convolution_reshape_errors():
    lay, bottom, top = setup(conv_text(2, "kernel_size: 3"), [f32((1, 3, 5, 5))])
    bottom[0].reshape(1, 4, 5, 5)
    with pytest.raises(ShapeError, match="channels"):
        lay.Forward(bottom, top)
    with pytest.raises(ShapeError, match="same shape"):
        setup(conv_text(2, "kernel_size: 3"), [f32((1, 3, 5, 5)), f32((1, 3, 6, 5))])
    with pytest.raises(LayerError, match="tops as bottoms"):
        setup(conv_text(2, "kernel_size: 3"), [f32((1, 3, 5, 5))], ntop=2)


POOL_ERRORS = [
    ("pad_ge_kernel", (1, 1, 5, 5), "pool: MAX kernel_size: 2 pad: 2", "smaller than the kernel"),
    ("no_kernel", (1, 1, 5, 5), "pool: MAX stride: 2", "kernel size missing"),
    ("kernel_and_hw", (1, 1, 5, 5), "pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("only_kernel_h", (1, 1, 5, 5), "pool: MAX kernel_h: 2", "kernel size missing"),
    ("global_kernel", (1, 1, 5, 5), "pool: AVE global_pooling: true kernel_size: 2", "global_pooling"),
    ("global_stride", (1, 1, 5, 5), "pool: AVE global_pooling: true stride: 2", "stride = 1"),
    ("pad_mix", (1, 1, 5, 5), "pool: MAX kernel_size: 3 pad: 1 pad_h: 1", "pad_h and pad_w"),
    ("stride_h_only", (1, 1, 5, 5), "pool: MAX kernel_size: 3 stride_h: 2", "stride_h and stride_w"),
    ("stochastic_pad", (1, 1, 5, 5), "pool: STOCHASTIC kernel_size: 3 pad: 1", "padding"),
    ("five_d", (1, 1, 2, 5, 5), "pool: MAX kernel_size: 2", "4 axes"),
]


@pytest.mark.parametrize("case", POOL_ERRORS, ids=[c[0] for c in POOL_ERRORS])
def test_pooling_errors(case):
    _, shape, params, words = case
    with pytest.raises((LayerError, ConfigError)) as info:
        setup('name: "pool7" type: "Pooling" pooling_param { %s }' % params, [f32(shape)])
    assert words in str(info.value) and "pool7" in str(info.value)
    if case[0] == "five_d":
        assert str(shape) in str(info.value)


def test_pooling_mask_top_only_for_max():
    with pytest.raises(ConfigError, match="mask"):
        setup('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }', [f32((1, 1, 4, 4))], ntop=2)
    with pytest.raises(LayerError, match="at most 2"):
        setup('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 }', [f32((1, 1, 4, 4))], ntop=3)
