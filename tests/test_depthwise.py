"""Depthwise convolution: Convolution's fast path (group == channels) and the
ConvolutionDepthwise / DepthwiseConvolution types (netlib.builtin.depthwise).

Forward and backward (data, weights, bias) against a naive loop reference
written here from Caffe's definition (float64), against netlib's general
grouped path (im2col + GEMM, ``depthwise_fast_path = False``) and against
real-Caffe goldens (tests/golden/depthwise, tools/make_depthwise_goldens.py);
float64 gradient checks; the type names' group/num_output rules; the typed
error for a kernel larger than the padded input.
"""
import itertools
import os

import numpy as np
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.builtin import depthwise, vision  # noqa: F401  (registers the types)
from netlib.errors import ConfigError, ShapeError
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from netlib.testing import check_gradient
from xp_mode import XP, host

RNG = np.random.default_rng(4321)
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "depthwise", "cases.npz")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def make(text, shape, fast=True, dtype=np.float32, params=None, x=None):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = "dw_under_test"
    lay = create_layer(lp, phase=caffe_pb2.TRAIN, dtype=dtype, xp=XP)
    lay.depthwise_fast_path = fast
    b = Blob(shape, dtype=dtype)
    b.data[...] = RNG.standard_normal(shape) if x is None else x
    t = Blob((), dtype=dtype)
    lay.SetUp([b], [t])
    if params is not None:
        for blob, p in zip(lay.blobs, params):
            blob.data[...] = p
    return lay, [b], [t]


def run(lay, bottom, top, dy):
    lay.Forward(bottom, top)
    y = host(top[0].data).copy()
    top[0].diff[...] = dy
    for blob in lay.blobs:
        blob.diff[...] = 0
    lay.Backward(top, [True], bottom)
    return y, host(bottom[0].diff).copy(), [host(blob.diff).copy() for blob in lay.blobs]


def conv_text(C, m, kh, kw, s, p, d, bias, type_="Convolution", group=True):
    k = "kernel_size: %d" % kh if kh == kw else "kernel_h: %d kernel_w: %d" % (kh, kw)
    return ('type: "%s" convolution_param { num_output: %d %s %s stride: %d pad: %d dilation: %d '
            'bias_term: %s weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }'
            % (type_, C * m, "group: %d" % C if group else "", k, s, p, d, "true" if bias else "false"))


def out_size(n, k, p, s, d):
    q = n + 2 * p - (d * (k - 1) + 1)
    return (abs(q) // s) * (1 if q >= 0 else -1) + 1      # C++ truncation


def naive(x, W, b, stride, pad, dil, dy):
    """Caffe's definition, one output position and kernel offset at a time
    (vectorised over batch and output channel only); float64.  W (C*m, 1, kh, kw)."""
    x = np.asarray(host(x), np.float64)
    W = np.asarray(host(W), np.float64)
    dy = np.asarray(host(dy), np.float64)
    N, C, H, Wd = x.shape
    O, _, kh, kw = W.shape
    m = O // C
    src = np.arange(O) // m                       # input channel of each output channel
    OH, OW = dy.shape[2:]
    y = np.zeros((N, O, OH, OW))
    dx = np.zeros_like(x)
    dW = np.zeros_like(W)
    for i, j in itertools.product(range(OH), range(OW)):
        for a, e in itertools.product(range(kh), range(kw)):
            r, c = i * stride[0] - pad[0] + a * dil[0], j * stride[1] - pad[1] + e * dil[1]
            if 0 <= r < H and 0 <= c < Wd:
                y[:, :, i, j] += x[:, src, r, c] * W[:, 0, a, e]
                np.add.at(dx, (slice(None), src, r, c), dy[:, :, i, j] * W[:, 0, a, e])
                dW[:, 0, a, e] += (x[:, src, r, c] * dy[:, :, i, j]).sum(axis=0)
    db = dy.sum(axis=(0, 2, 3))
    if b is not None:
        y += np.asarray(host(b), np.float64).reshape(1, O, 1, 1)
    return y, dx, dW, db


def close(got, ref, rtol=1e-5):
    got = np.asarray(host(got), np.float64)
    ref = np.asarray(host(ref), np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(1.0, float(np.abs(ref).max(initial=0))))


# --------------------------------------------------------------------------
# the grid: kernel 1/3/5, stride 1/2, pad 0/1/2, dilation 1/2, bias, batch 1/3, non-square
# --------------------------------------------------------------------------
GRID = [c for c in itertools.product((1, 3, 5), (1, 2), (0, 1, 2), (1, 2), (True, False), (1, 3))]


def _case_id(c):
    return "k%d_s%d_p%d_d%d_%s_n%d" % (c[0], c[1], c[2], c[3], "bias" if c[4] else "nobias", c[5])


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_forward_backward_match_naive_and_general_path(case):
    k, s, p, d, bias, N = case
    C, H, W = 3, 7, 9                                   # non-square image
    shape = (N, C, H, W)
    OH, OW = out_size(H, k, p, s, d), out_size(W, k, p, s, d)
    text = conv_text(C, 1, k, k, s, p, d, bias)
    if OH <= 0 or OW <= 0:
        with pytest.raises(ShapeError, match="larger than the padded input"):
            make(text, shape)
        return
    lay, bottom, top = make(text, shape)
    assert lay._dw is not None                          # the fast path runs
    params = [blob.data.copy() for blob in lay.blobs]
    x = bottom[0].data.copy()
    dy = RNG.standard_normal((N, C, OH, OW)).astype(np.float32)
    y, dx, pd = run(lay, bottom, top, dy)
    ry, rdx, rdW, rdb = naive(x, params[0], params[1] if bias else None, (s, s), (p, p), (d, d), dy)
    close(y, ry)
    close(dx, rdx)
    close(pd[0], rdW)
    if bias:
        close(pd[1], rdb)
    # the general grouped path (im2col + GEMM) on the same numbers
    glay, gbottom, gtop = make(text, shape, fast=False, params=params, x=x)
    assert glay._dw is None
    gy, gdx, gpd = run(glay, gbottom, gtop, dy)
    close(y, gy)
    close(dx, gdx)      # the engine's bottom diff sums the offsets in its own order: rounding only
    for a, b in zip(pd, gpd):
        close(a, b)


@pytest.mark.parametrize("case", [
    # (N, C, m, H, W, kh, kw, stride, pad, dilation)
    (2, 3, 2, 6, 7, 3, 3, 1, 1, 1),
    (1, 2, 3, 9, 8, 3, 2, 2, 1, 1),
    (3, 4, 2, 5, 5, 1, 1, 1, 0, 1),
    (2, 2, 2, 11, 9, 5, 3, 2, 2, 2),
])
def test_channel_multiplier_matches_naive_and_general(case):
    N, C, m, H, W, kh, kw, s, p, d = case
    shape = (N, C, H, W)
    text = conv_text(C, m, kh, kw, s, p, d, True)
    lay, bottom, top = make(text, shape)
    assert lay._dw is not None and lay._dw.m == m
    assert tuple(lay.blobs[0].shape) == (C * m, 1, kh, kw)
    params = [blob.data.copy() for blob in lay.blobs]
    x = bottom[0].data.copy()
    OH, OW = out_size(H, kh, p, s, d), out_size(W, kw, p, s, d)
    dy = RNG.standard_normal((N, C * m, OH, OW)).astype(np.float32)
    y, dx, pd = run(lay, bottom, top, dy)
    ry, rdx, rdW, rdb = naive(x, params[0], params[1], (s, s), (p, p), (d, d), dy)
    close(y, ry)
    close(dx, rdx)
    close(pd[0], rdW)
    close(pd[1], rdb)
    gy, gdx, gpd = run(*make(text, shape, fast=False, params=params, x=x), dy)
    close(y, gy)
    close(dx, gdx)
    close(pd[0], gpd[0])


def assert_matches_naive(lay, bottom, top, dy_shape, stride, pad, dilation):
    """Forward, bottom, weight and bias gradients of ``lay`` equal the naive loop's."""
    params = [blob.data.copy() for blob in lay.blobs]
    x = bottom[0].data.copy()
    dy = RNG.standard_normal(dy_shape).astype(np.float32)
    y, dx, pd = run(lay, bottom, top, dy)
    ry, rdx, rdW, rdb = naive(x, params[0], params[1], stride, pad, dilation, dy)
    close(y, ry)
    close(dx, rdx)
    close(pd[0], rdW)
    close(pd[1], rdb)


def test_rectangular_kernel_stride_pad_and_blocks(monkeypatch):
    # kernel_h/w, stride_h/w, pad_h/w; tiny blocks so the rows go in many blocks
    monkeypatch.setattr(depthwise.DepthwiseEngine, "block_elements", 64)
    monkeypatch.setattr(depthwise.DepthwiseEngine, "backward_block_elements", 64)
    text = ('type: "Convolution" convolution_param { num_output: 5 group: 5 kernel_h: 3 kernel_w: 2 '
            'stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 weight_filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }')
    shape = (3, 5, 8, 6)
    lay, bottom, top = make(text, shape)
    assert len(lay._dw.blocks) > 3 and len(lay._dw.backward_blocks) > 3
    assert_matches_naive(lay, bottom, top, (3, 5, 4, 5), (2, 1), (1, 0), (1, 1))


def test_backward_accumulates_params_and_honours_propagate_flags():
    text = conv_text(4, 1, 3, 3, 1, 1, 1, True)
    lay, bottom, top = make(text, (2, 4, 5, 5))
    lay.Forward(bottom, top)
    top[0].diff[...] = RNG.standard_normal(top[0].shape)
    for blob in lay.blobs:
        blob.diff[...] = 0
    lay.Backward(top, [True], bottom)
    once = [blob.diff.copy() for blob in lay.blobs]
    lay.Backward(top, [True], bottom)
    for blob, o in zip(lay.blobs, once):
        close(blob.diff, 2 * o)
    # propagate_down False leaves the bottom diff; param_propagate_down False the param diff
    bottom[0].diff[...] = 7
    lay.param_propagate_down = [False, True]
    w_before = host(lay.blobs[0].diff).copy()
    lay.Backward(top, [False], bottom)
    assert (bottom[0].diff == 7).all()
    np.testing.assert_array_equal(host(lay.blobs[0].diff), w_before)
    close(lay.blobs[1].diff, 3 * once[1])


def test_two_bottoms_share_weights_and_axis_flattening():
    text = 'type: "Convolution" convolution_param { num_output: 3 group: 3 kernel_size: 3 pad: 1 axis: 2 ' \
           'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    lp.name = "dw2"
    lay = create_layer(lp, phase=caffe_pb2.TRAIN, xp=XP)
    xs = [RNG.standard_normal((2, 2, 3, 5, 6)).astype(np.float32) for _ in range(2)]
    bottom = [Blob(x.shape) for x in xs]
    for b, x in zip(bottom, xs):
        b.data[...] = x
    top = [Blob(()), Blob(())]
    lay.SetUp(bottom, top)
    assert lay._dw is not None
    lay.Forward(bottom, top)
    W, bias = lay.blobs[0].data, lay.blobs[1].data
    for x, t in zip(xs, top):
        flat = x.reshape(4, 3, 5, 6)
        dy = np.zeros((4, 3, 5, 6))
        ry = naive(flat, W, bias, (1, 1), (1, 1), (1, 1), dy)[0]
        close(t.data, ry.reshape(2, 2, 3, 5, 6))


def test_empty_batch_and_non_2d_fall_back():
    lay, bottom, top = make(conv_text(3, 1, 3, 3, 1, 1, 1, True), (0, 3, 5, 5))
    assert top[0].shape == (0, 3, 5, 5)
    lay.Forward(bottom, top)
    lay.Backward(top, [True], bottom)
    # 1-D and 3-D depthwise convolutions use the general path (and are right)
    for shape in ((2, 3, 9), (1, 3, 4, 5, 6)):
        lay, bottom, top = make('type: "Convolution" convolution_param { num_output: 3 group: 3 '
                                'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } }', shape)
        assert lay._dw is None
    # one input channel (group 1): an ordinary convolution, general path
    lay, _, _ = make('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 '
                     'weight_filler { type: "gaussian" } }', (1, 1, 5, 5))
    assert lay._dw is None
    # group != channels: general path
    lay, _, _ = make('type: "Convolution" convolution_param { num_output: 4 group: 2 kernel_size: 3 '
                     'weight_filler { type: "gaussian" } }', (1, 4, 5, 5))
    assert lay._dw is None


def test_caffe_truncation_quirk_overhang():
    # (4 - 5) / 2 truncates to 0: one output whose window reads zeros past the edge
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    lay, bottom, top = make(conv_text(2, 1, 5, 5, 2, 0, 1, False), x.shape, x=x)
    lay.Forward(bottom, top)
    assert top[0].shape == (1, 2, 1, 1)
    W = host(lay.blobs[0].data)
    close(top[0].data.ravel(), (x[0] * W[:, 0, :4, :4]).sum(axis=(1, 2)))


# --------------------------------------------------------------------------
# float64 gradient checks over the parameter variants
# --------------------------------------------------------------------------
GRAD = [
    ("k3_s1_p1", 'num_output: 3 group: 3 kernel_size: 3 pad: 1', (2, 3, 5, 6)),
    ("k3_s2_p0_nobias", 'num_output: 3 group: 3 kernel_size: 3 stride: 2 bias_term: false', (1, 3, 7, 6)),
    ("k5_p2_d2", 'num_output: 2 group: 2 kernel_size: 5 pad: 2 dilation: 2', (1, 2, 6, 7)),
    ("k1_s2", 'num_output: 4 group: 4 kernel_size: 1 stride: 2', (2, 4, 5, 5)),
    ("rect", 'num_output: 2 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 1',
     (1, 2, 5, 6)),
    ("mult2", 'num_output: 4 group: 2 kernel_size: 3 pad: 1 stride: 2', (2, 2, 5, 5)),
]


@pytest.mark.parametrize("case", GRAD, ids=[c[0] for c in GRAD])
def test_gradient(case):
    _, params, shape = case
    text = ('type: "Convolution" convolution_param { %s weight_filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }' % params)
    check_gradient(text, bottom_shapes=[shape])


def test_gradient_of_the_type_names():
    check_gradient('type: "ConvolutionDepthwise" convolution_param { kernel_size: 3 pad: 1 stride: 2 '
                   'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
                   bottom_shapes=[(2, 3, 5, 5)])


# --------------------------------------------------------------------------
# real-Caffe goldens (group = channels Convolution, reference BVLC Caffe)
# --------------------------------------------------------------------------
def _golden_cases():
    if not os.path.exists(GOLDEN):
        return []
    with np.load(GOLDEN) as g:
        return sorted({k.split("/")[0] for k in g.files})


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize("name", _golden_cases() or ["<missing>"])
def test_matches_real_caffe_goldens(name, fast):
    if name == "<missing>":
        pytest.skip("tests/golden/depthwise/cases.npz is missing")
    with np.load(GOLDEN) as g:
        case = {k.split("/", 1)[1]: g[k] for k in g.files if k.startswith(name + "/")}
    text = str(case["prototxt"])
    lp = text_format.Parse(text[text.index("{") + 1:text.rindex("}")], caffe_pb2.LayerParameter())
    lay = create_layer(lp, phase=caffe_pb2.TEST, xp=XP)
    lay.depthwise_fast_path = fast
    b, t = Blob(case["x"].shape), Blob(())
    b.data[...] = case["x"]
    lay.SetUp([b], [t])
    assert (lay._dw is not None) == fast
    lay.blobs[0].data[...] = case["weight"]
    if "bias" in case:
        lay.blobs[1].data[...] = case["bias"]
    y, dx, pd = run(lay, [b], [t], case["dy"])
    np.testing.assert_allclose(y, case["y"], rtol=1e-5, atol=1e-6)
    if fast:    # the engine's own summation order: Caffe's values to float32 rounding
        np.testing.assert_allclose(dx, case["dx"], rtol=1e-5, atol=1e-6)
    else:       # the general path's col2im keeps Caffe's order: Caffe's exact bits
        np.testing.assert_array_equal(dx, case["dx"])
    np.testing.assert_allclose(pd[0], case["weight_diff"], rtol=1e-5, atol=1e-5)
    if "bias" in case:
        np.testing.assert_allclose(pd[1], case["bias_diff"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# ConvolutionDepthwise / DepthwiseConvolution
# --------------------------------------------------------------------------
@pytest.mark.parametrize("type_", ["ConvolutionDepthwise", "DepthwiseConvolution"])
@pytest.mark.parametrize("extra", ["", "num_output: 4", "group: 4", "group: 1 num_output: 4",
                                   "num_output: 4 group: 4"])
def test_type_names_are_convolution_with_group_channels(type_, extra):
    text = ('type: "%s" convolution_param { %s kernel_size: 3 pad: 1 stride: 2 '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }' % (type_, extra))
    lay, bottom, top = make(text, (2, 4, 7, 6))
    assert lay.type == type_
    assert lay.group == 4 and lay.num_output == 4 and lay._dw is not None
    assert tuple(lay.blobs[0].shape) == (4, 1, 3, 3) and tuple(lay.blobs[1].shape) == (4,)
    assert not lay.layer_param.convolution_param.HasField("group") or "group" in extra
    assert_matches_naive(lay, bottom, top, (2, 4, 4, 3), (2, 2), (1, 1), (1, 1))


def test_type_name_multiplier_and_errors():
    lay, _, top = make('type: "ConvolutionDepthwise" convolution_param { num_output: 6 kernel_size: 3 '
                       'weight_filler { type: "gaussian" } }', (1, 3, 5, 5))
    assert top[0].shape == (1, 6, 3, 3) and tuple(lay.blobs[0].shape) == (6, 1, 3, 3)
    with pytest.raises(ConfigError) as info:
        make('name: "dwbad" type: "ConvolutionDepthwise" convolution_param { group: 2 kernel_size: 3 }',
             (1, 4, 5, 5))
    assert "dwbad" in str(info.value) and "ConvolutionDepthwise" in str(info.value) and "group" in str(info.value)
    with pytest.raises(ConfigError, match="multiple of the channel"):
        make('type: "DepthwiseConvolution" convolution_param { num_output: 5 kernel_size: 3 }', (1, 4, 5, 5))


def test_kernel_larger_than_padded_input_is_a_typed_error():
    with pytest.raises(ShapeError) as info:
        make('name: "dwbig" type: "Convolution" convolution_param { num_output: 3 group: 3 kernel_size: 5 '
             'pad: 0 }', (1, 3, 4, 4))
    msg = str(info.value)
    assert "dwbig" in msg and "Convolution" in msg and "larger than the padded input" in msg
    assert "(1, 3, 4, 4)" in msg
    with pytest.raises(ShapeError) as info:
        make('name: "poolbig" type: "Pooling" pooling_param { pool: MAX kernel_size: 5 }', (1, 3, 4, 4))
    msg = str(info.value)
    assert "poolbig" in msg and "Pooling" in msg and "larger than the padded input" in msg
    # an overhang smaller than the stride is Caffe's truncation quirk: one output, no error
    make('type: "Pooling" pooling_param { pool: MAX kernel_size: 5 stride: 2 }', (1, 3, 4, 4))
