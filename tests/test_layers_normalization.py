"""Normalization family: LRN, BatchNorm, MVN, SPP, Im2col.

Forward values are compared with naive Python-loop references written here
(small shapes); gradients with netlib.testing.check_gradient in float64.
"""
import math

import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib.blob import Blob
from netlib.errors import ConfigError, NetlibError
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from netlib.testing import check_gradient
from xp_mode import XP, host


def make_layer(text, phase=caffe_pb2.TRAIN, dtype=numpy.float64):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    return create_layer(lp, phase=phase, dtype=dtype, xp=XP)


def run(text, x, phase=caffe_pb2.TRAIN, dtype=numpy.float64, params=None):
    layer = make_layer(text, phase, dtype)
    b = Blob(x.shape, dtype=dtype, xp=XP)
    b.data[...] = x
    t = Blob((), dtype=dtype, xp=XP)
    layer.SetUp([b], [t])
    if params is not None:
        for blob, arr in zip(layer.blobs, params):
            blob.data[...] = arr
    layer.Forward([b], [t])
    return layer, b, t


def rng(seed=0):
    return numpy.random.default_rng(seed)


# ---------------------------------------------------------------------------
# naive references
# ---------------------------------------------------------------------------
def lrn_across_ref(x, n, alpha, beta, k):
    N, C, H, W = x.shape
    y = numpy.zeros_like(x)
    pre = (n - 1) // 2
    for a in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    s = 0.0
                    for cc in range(c - pre, c - pre + n):
                        if 0 <= cc < C:
                            s += x[a, cc, h, w] ** 2
                    y[a, c, h, w] = x[a, c, h, w] * (k + alpha / n * s) ** (-beta)
    return y


def lrn_within_ref(x, n, alpha, beta):
    N, C, H, W = x.shape
    y = numpy.zeros_like(x)
    pre = (n - 1) // 2
    for a in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    s = 0.0
                    for hh in range(h - pre, h - pre + n):
                        for ww in range(w - pre, w - pre + n):
                            if 0 <= hh < H and 0 <= ww < W:
                                s += x[a, c, hh, ww] ** 2
                    y[a, c, h, w] = x[a, c, h, w] * (1 + alpha * s / (n * n)) ** (-beta)
    return y


# ---------------------------------------------------------------------------
# LRN
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,alpha,beta,k", [(5, 1.0, 0.75, 1.0), (3, 0.5, 0.6, 2.0),
                                            (1, 2.0, 0.5, 1.5), (7, 1e-2, 0.75, 1.0)])
def test_lrn_across_forward(n, alpha, beta, k):
    x = rng(1).standard_normal((2, 6, 3, 4))
    text = 'type: "LRN" lrn_param { local_size: %d alpha: %r beta: %r k: %r }' % (n, alpha, beta, k)
    _, _, t = run(text, x)
    # float32 parameters as Caffe reads them
    f = lambda v: float(numpy.float32(v))  # noqa: E731
    numpy.testing.assert_allclose(host(t.data), lrn_across_ref(x, n, f(alpha), f(beta), f(k)), rtol=1e-6)


@pytest.mark.parametrize("n,alpha,beta,k", [(3, 1.0, 0.75, 1.0), (5, 0.5, 0.6, 7.0), (1, 2.0, 0.5, 1.0)])
def test_lrn_within_forward_ignores_k(n, alpha, beta, k):
    x = rng(2).standard_normal((2, 3, 5, 4))
    text = ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: %d alpha: %r beta: %r '
            'k: %r }' % (n, alpha, beta, k))
    _, _, t = run(text, x)
    f = lambda v: float(numpy.float32(v))  # noqa: E731
    numpy.testing.assert_allclose(host(t.data), lrn_within_ref(x, n, f(alpha), f(beta)), rtol=1e-6)


@pytest.mark.parametrize("extra", ["local_size: 5", "local_size: 3 alpha: 0.5 beta: 0.6 k: 2",
                                   "local_size: 1 alpha: 3",
                                   "norm_region: WITHIN_CHANNEL local_size: 3",
                                   "norm_region: WITHIN_CHANNEL local_size: 5 alpha: 0.7 beta: 1.2"])
def test_lrn_gradient(extra):
    check_gradient('type: "LRN" lrn_param { %s }' % extra, bottom_shapes=[(2, 6, 3, 3)])


def test_lrn_in_place_matches_out_of_place():
    x = rng(3).standard_normal((2, 5, 3, 3))
    dy = rng(4).standard_normal(x.shape)
    for region in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
        text = 'type: "LRN" lrn_param { local_size: 3 norm_region: %s }' % region
        layer, b, t = run(text, x)
        t.diff[...] = dy
        layer.Backward([t], [True], [b])
        layer2 = make_layer(text)
        blob = Blob(x.shape, dtype=numpy.float64, xp=XP)
        blob.data[...] = x
        layer2.SetUp([blob], [blob])
        layer2.Forward([blob], [blob])
        numpy.testing.assert_allclose(host(blob.data), host(t.data), rtol=1e-12)
        blob.diff[...] = dy
        layer2.Backward([blob], [True], [blob])
        numpy.testing.assert_allclose(host(blob.diff), host(b.diff), rtol=1e-12)


def test_lrn_rejects_even_size_and_non_4d():
    with pytest.raises(ConfigError, match="odd"):
        run('name: "n1" type: "LRN" lrn_param { local_size: 4 }', numpy.zeros((1, 3, 2, 2)))
    with pytest.raises(NetlibError, match="4 axes"):
        run('type: "LRN"', numpy.zeros((2, 3)))


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------
def bn_ref_batch(x, eps):
    """Per-channel loops: returns y, mean, biased var."""
    N, C = x.shape[:2]
    xr = x.reshape(N, C, -1)
    y = numpy.zeros_like(xr)
    means, vars_ = [], []
    for c in range(C):
        vals = [xr[n, c, s] for n in range(N) for s in range(xr.shape[2])]
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        for n in range(N):
            for s in range(xr.shape[2]):
                y[n, c, s] = (xr[n, c, s] - mu) / math.sqrt(var + eps)
        means.append(mu)
        vars_.append(var)
    return y.reshape(x.shape), numpy.array(means), numpy.array(vars_)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 5), (3, 2, 2, 2, 3)])
def test_batchnorm_batch_stats_forward_and_running_update(shape, engine):
    x1 = rng(5).standard_normal(shape) * 2 + 1
    x2 = rng(6).standard_normal(shape) - 0.5
    text = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 eps: 1e-3 }'
    layer, b, t = run(text, x1)
    maf, eps = float(numpy.float32(0.9)), float(numpy.float32(1e-3))
    y1, m1, v1 = bn_ref_batch(x1, eps)
    numpy.testing.assert_allclose(host(t.data), y1, rtol=1e-10, atol=1e-12)
    m = x1.size // shape[1]
    numpy.testing.assert_allclose(host(layer.blobs[2].data), [1.0])
    numpy.testing.assert_allclose(host(layer.blobs[0].data), m1, rtol=1e-10)
    numpy.testing.assert_allclose(host(layer.blobs[1].data), v1 * m / (m - 1), rtol=1e-10)
    # second forward: s = 0.9 + 1, sums decay by maf
    b.data[...] = x2
    layer.Forward([b], [t])
    y2, m2, v2 = bn_ref_batch(x2, eps)
    numpy.testing.assert_allclose(host(t.data), y2, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(host(layer.blobs[2].data), [maf + 1], rtol=1e-12)
    numpy.testing.assert_allclose(host(layer.blobs[0].data), m2 + maf * m1, rtol=1e-10)
    numpy.testing.assert_allclose(host(layer.blobs[1].data), (v2 + maf * v1) * m / (m - 1), rtol=1e-10)
    # the stored statistics then normalise in TEST phase
    test_layer, _, tt = run('type: "BatchNorm" batch_norm_param { eps: 1e-3 }', x2,
                            phase=caffe_pb2.TEST, params=[bl.data for bl in layer.blobs])
    s = maf + 1
    mu = (m2 + maf * m1) / s
    var = (v2 + maf * v1) * m / (m - 1) / s
    bshape = (1, shape[1]) + (1,) * (len(shape) - 2)
    numpy.testing.assert_allclose(host(tt.data), (x2 - mu.reshape(bshape)) / numpy.sqrt(var.reshape(bshape) + eps),
                                  rtol=1e-10)


def test_batchnorm_global_stats_zero_scale_factor_and_default_phase(engine):
    x = rng(7).standard_normal((2, 3, 2))
    # TEST phase defaults to global stats; with s == 0 the mean and var are 0.
    layer, _, t = run('type: "BatchNorm"', x, phase=caffe_pb2.TEST,
                      params=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0]])
    assert layer.use_global_stats
    numpy.testing.assert_allclose(host(t.data), x / math.sqrt(float(numpy.float32(1e-5))), rtol=1e-10)
    layer, _, t = run('type: "BatchNorm" batch_norm_param { use_global_stats: true }', x,
                      params=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [2.0]])
    ref = (x - numpy.array([0.5, 1.0, 1.5]).reshape(1, 3, 1)) / numpy.sqrt(
        numpy.array([2.0, 2.5, 3.0]).reshape(1, 3, 1) + float(numpy.float32(1e-5)))
    numpy.testing.assert_allclose(host(t.data), ref, rtol=1e-10)
    assert layer.blobs[2].data[0] == 2.0   # global stats never update


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 3, 2)])
def test_batchnorm_gradient_batch_stats(shape, engine):
    check_gradient('type: "BatchNorm"', bottom_shapes=[shape], phase="TRAIN")


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 2)])
def test_batchnorm_gradient_global_stats(shape, engine):
    C = shape[1]
    params = [rng(8).standard_normal(C), rng(9).uniform(0.5, 2.0, C) * 3, [3.0]]
    check_gradient('type: "BatchNorm" batch_norm_param { eps: 0.01 }', bottom_shapes=[shape],
                   phase="TEST", params=params)


def test_batchnorm_in_place_matches_out_of_place(engine):
    x = rng(10).standard_normal((3, 2, 4))
    dy = rng(11).standard_normal(x.shape)
    layer, b, t = run('type: "BatchNorm"', x)
    t.diff[...] = dy
    layer.Backward([t], [True], [b])
    layer2 = make_layer('type: "BatchNorm"')
    blob = Blob(x.shape, dtype=numpy.float64, xp=XP)
    blob.data[...] = x
    layer2.SetUp([blob], [blob])
    layer2.Forward([blob], [blob])
    numpy.testing.assert_allclose(host(blob.data), host(t.data), rtol=1e-12)
    blob.data[...] = 123.0   # a later in-place layer may change the top: gradient unaffected
    blob.diff[...] = dy
    layer2.Backward([blob], [True], [blob])
    numpy.testing.assert_allclose(host(blob.diff), host(b.diff), rtol=1e-12)


BN_NET = """
name: "bn"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "x" top: "y" %s }
"""


def test_batchnorm_lr_mult_forced_to_zero_in_net():
    net = netlib.Net(BN_NET % "", netlib.TRAIN)
    layer = net.layer_dict["bn1"]
    assert layer.param_propagate_down == [False, False, False]
    assert [spec.lr_mult for spec in layer.layer_param.param] == [0, 0, 0]
    assert net.params_lr == [0, 0, 0]
    net2 = netlib.Net(BN_NET % "param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 0 }", netlib.TRAIN)
    assert net2.params_lr == [0, 0, 0]
    with pytest.raises(ConfigError, match="bn1"):
        netlib.Net(BN_NET % "param { lr_mult: 0 } param { lr_mult: 1 }", netlib.TRAIN)


# ---------------------------------------------------------------------------
# MVN
# ---------------------------------------------------------------------------
def mvn_ref(x, normalize_variance, across, eps):
    N, C = x.shape[:2]
    y = numpy.zeros_like(x)
    groups = [(n, None) for n in range(N)] if across else [(n, c) for n in range(N) for c in range(C)]
    for n, c in groups:
        sub = x[n] if c is None else x[n, c]
        vals = list(sub.ravel())
        mu = sum(vals) / len(vals)
        out = sub - mu
        if normalize_variance:
            std = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
            out = out / (std + eps)
        if c is None:
            y[n] = out
        else:
            y[n, c] = out
    return y


@pytest.mark.parametrize("nv", [True, False])
@pytest.mark.parametrize("across", [True, False])
def test_mvn_forward(nv, across):
    x = rng(12).standard_normal((2, 3, 3, 4)) * 3 + 1
    text = ('type: "MVN" mvn_param { normalize_variance: %s across_channels: %s eps: 0.01 }'
            % (str(nv).lower(), str(across).lower()))
    _, _, t = run(text, x)
    numpy.testing.assert_allclose(host(t.data), mvn_ref(x, nv, across, float(numpy.float32(0.01))),
                                  rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nv", [True, False])
@pytest.mark.parametrize("across", [True, False])
def test_mvn_gradient(nv, across):
    text = ('type: "MVN" mvn_param { normalize_variance: %s across_channels: %s }'
            % (str(nv).lower(), str(across).lower()))
    check_gradient(text, bottom_shapes=[(2, 3, 2, 3)])


def test_mvn_backward_keeps_caffe_eps_quirk():
    """With a large eps Caffe's backward divides by (std + eps) and ignores eps
    in the projection: check that formula (it is not the exact gradient)."""
    x = rng(13).standard_normal((2, 2, 3, 3))
    dy = rng(14).standard_normal(x.shape)
    layer, b, t = run('type: "MVN" mvn_param { eps: 0.5 }', x)
    t.diff[...] = dy
    layer.Backward([t], [True], [b])
    xr, dr, yr = x.reshape(4, 9), dy.reshape(4, 9), host(t.data).reshape(4, 9)
    std = xr.std(axis=1, keepdims=True) + 0.5
    ref = (dr - dr.mean(1, keepdims=True) - (dr * yr).mean(1, keepdims=True) * yr) / std
    numpy.testing.assert_allclose(host(b.diff.reshape(4, 9)), ref, rtol=1e-10)


# ---------------------------------------------------------------------------
# SPP
# ---------------------------------------------------------------------------
def spp_ref(x, height, method):
    N, C, H, W = x.shape
    levels = []
    for lvl in range(height):
        bins = 2 ** lvl
        kh, kw = -(-H // bins), -(-W // bins)
        ph, pw = (kh * bins - H + 1) // 2, (kw * bins - W + 1) // 2
        out = numpy.zeros((N, C, bins, bins))
        for i in range(bins):
            for j in range(bins):
                hs, ws = i * kh - ph, j * kw - pw
                he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                size = (he - hs) * (we - ws)
                hs2, ws2, he2, we2 = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                win = x[:, :, hs2:he2, ws2:we2]
                if method == "MAX":
                    out[:, :, i, j] = win.max(axis=(2, 3))
                else:
                    out[:, :, i, j] = win.sum(axis=(2, 3)) / size
        levels.append(out)
    if height == 1:
        return levels[0]
    return numpy.concatenate([lv.reshape(N, -1) for lv in levels], axis=1)


@pytest.mark.parametrize("height,method,hw", [(1, "MAX", (5, 6)), (2, "AVE", (7, 7)),
                                              (3, "MAX", (9, 8)), (3, "AVE", (8, 10))])
def test_spp_forward(height, method, hw):
    x = rng(15).standard_normal((2, 3) + hw)
    _, _, t = run('type: "SPP" spp_param { pyramid_height: %d pool: %s }' % (height, method), x)
    numpy.testing.assert_allclose(host(t.data), spp_ref(x, height, method), rtol=1e-12)


@pytest.mark.parametrize("height,method", [(1, "AVE"), (2, "MAX"), (3, "AVE")])
def test_spp_gradient(height, method):
    check_gradient('type: "SPP" spp_param { pyramid_height: %d pool: %s }' % (height, method),
                   bottom_shapes=[(2, 2, 8, 6)])


def test_spp_level_with_pad_not_below_kernel_is_an_error():
    # Caffe quirk kept: H=5 with 4 bins gives kernel 2, pad 2 -> Pooling refuses it.
    with pytest.raises(ConfigError, match="pyramid level 2"):
        run('name: "spp" type: "SPP" spp_param { pyramid_height: 3 }', numpy.zeros((1, 1, 5, 8)))


def test_spp_reshape_to_new_size():
    layer, b, t = run('type: "SPP" spp_param { pyramid_height: 2 pool: MAX }',
                      rng(16).standard_normal((1, 2, 4, 4)))
    x = rng(17).standard_normal((2, 2, 6, 5))
    b.reshape(x.shape)
    b.data[...] = x
    layer.Forward([b], [t])
    numpy.testing.assert_allclose(host(t.data), spp_ref(x, 2, "MAX"))


# ---------------------------------------------------------------------------
# Im2col
# ---------------------------------------------------------------------------
def im2col_ref(x, kh, kw, ph, pw, sh, sw, dh=1, dw=1):
    N, C, H, W = x.shape
    oh = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    out = numpy.zeros((N, C * kh * kw, oh, ow))
    for n in range(N):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    for a in range(oh):
                        for b in range(ow):
                            h, w = a * sh - ph + i * dh, b * sw - pw + j * dw
                            if 0 <= h < H and 0 <= w < W:
                                out[n, row, a, b] = x[n, c, h, w]
    return out


@pytest.mark.parametrize("conv,args", [
    ("kernel_size: 3", (3, 3, 0, 0, 1, 1)),
    ("kernel_size: 3 pad: 1 stride: 2", (3, 3, 1, 1, 2, 2)),
    ("kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2", (2, 3, 1, 0, 1, 2)),
    ("kernel_size: 2 dilation: 2 pad: 1", (2, 2, 1, 1, 1, 1, 2, 2)),
])
def test_im2col_forward(conv, args):
    x = rng(18).standard_normal((2, 3, 5, 6))
    _, _, t = run('type: "Im2col" convolution_param { %s }' % conv, x)
    numpy.testing.assert_allclose(host(t.data), im2col_ref(x, *args), rtol=0, atol=0)


@pytest.mark.parametrize("conv", ["kernel_size: 3 pad: 1", "kernel_size: 2 stride: 2 pad: 1",
                                  "kernel_size: 2 dilation: 2"])
def test_im2col_gradient(conv):
    check_gradient('type: "Im2col" convolution_param { %s }' % conv, bottom_shapes=[(1, 2, 4, 5)])


def test_float32_paths_run():
    """The layers run in float32 (Caffe's dtype) and agree with float64 closely."""
    x = rng(19).standard_normal((2, 4, 5, 5))
    for text in ['type: "LRN"', 'type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL }',
                 'type: "BatchNorm"', 'type: "MVN"', 'type: "SPP" spp_param { pyramid_height: 2 }',
                 'type: "Im2col" convolution_param { kernel_size: 3 }']:
        _, _, t32 = run(text, x.astype(numpy.float32), dtype=numpy.float32)
        _, _, t64 = run(text, x)
        assert t32.data.dtype == numpy.float32
        numpy.testing.assert_allclose(host(t32.data), host(t64.data), rtol=1e-4, atol=1e-5)
