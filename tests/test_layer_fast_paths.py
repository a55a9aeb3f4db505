"""The fast paths of the non-convolution layers against naive references.

Covered: ``gemm_accumulate`` (the BLAS beta = 1 path and its NumPy
fallback), InnerProduct's accumulated weight gradient, BatchNorm with batch
statistics (forward, running statistics, backward; in place and not), LRN
across channels (forward and Caffe's backward formula), Eltwise SUM with and
without coefficients, and Dropout's in-place mask.  Every reference is a
Python loop written here (small shapes), in float64 and float32.
"""
import numpy
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.builtin import common
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from netlib.random import set_random_seed
from xp_mode import XP, host

DTYPES = [numpy.float64, numpy.float32]


def f32(v):
    """A prototxt float field's value (LayerParameter stores float32)."""
    return float(numpy.float32(v))


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == numpy.float64 else dict(rtol=2e-4, atol=2e-5)


def make_layer(text, dtype, phase=caffe_pb2.TRAIN):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    return create_layer(lp, phase=phase, dtype=dtype, xp=XP)


def blob(arr, dtype):
    b = Blob(arr.shape, dtype=dtype, xp=XP)
    b.data[...] = arr
    return b


def naive_matmul(a, b):
    m, k = a.shape
    n = b.shape[1]
    out = numpy.zeros((m, n))
    for i in range(m):
        for j in range(n):
            s = 0.0
            for p in range(k):
                s += float(a[i, p]) * float(b[p, j])
            out[i, j] = s
    return out


# ---------------------------------------------------------------------------
# gemm_accumulate
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("blas", [True, False])
@pytest.mark.parametrize("mkn", [(5, 7, 3), (1, 7, 3), (5, 1, 3), (5, 7, 1), (1, 1, 1)])
def test_gemm_accumulate(dtype, ta, tb, blas, mkn, monkeypatch):
    monkeypatch.setattr(common, "_GEMM_MIN_SIZE", 1)   # small shapes take the BLAS path too
    if not blas:
        monkeypatch.setattr(common, "_CBLAS", {"f": None, "d": None})
    elif common._cblas_gemm(dtype) is None:
        pytest.skip("NumPy's CBLAS was not found in this build: only the fallback runs")
    r = numpy.random.default_rng(0)
    m, k, n = mkn
    a = r.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = r.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    a = a.T if ta else a
    b = b.T if tb else b
    c = r.standard_normal((m, n)).astype(dtype)
    want = c.astype(numpy.float64) + naive_matmul(a, b)
    out = common.gemm_accumulate(numpy, a, b, c)
    assert out is c
    numpy.testing.assert_allclose(c, want, **tol(dtype))


def test_gemm_accumulate_strided_and_empty(monkeypatch):
    monkeypatch.setattr(common, "_GEMM_MIN_SIZE", 1)
    r = numpy.random.default_rng(1)
    big = r.standard_normal((10, 14)).astype(numpy.float32)
    a = big[::2, :7]                      # rows with a gap: BLAS can't read it, NumPy path
    b = r.standard_normal((7, 4)).astype(numpy.float32)
    c = numpy.ones((5, 4), numpy.float32)
    common.gemm_accumulate(numpy, a, b, c)
    numpy.testing.assert_allclose(c, 1 + naive_matmul(a, b), rtol=1e-5, atol=1e-5)
    a0 = numpy.zeros((5, 0), numpy.float32)
    b0 = numpy.zeros((0, 4), numpy.float32)
    c0 = numpy.full((5, 4), 2, numpy.float32)
    common.gemm_accumulate(numpy, a0, b0, c0)   # K = 0: nothing to add
    assert (c0 == 2).all()


# ---------------------------------------------------------------------------
# InnerProduct: the weight gradient accumulates
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_gradients_accumulate(dtype, transpose, monkeypatch):
    monkeypatch.setattr(common, "_GEMM_MIN_SIZE", 1)
    r = numpy.random.default_rng(2)
    M, K, N = 4, 6, 3
    text = ('type: "InnerProduct" inner_product_param { num_output: %d transpose: %s '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'
            % (N, "true" if transpose else "false"))
    layer = make_layer(text, dtype)
    x = r.standard_normal((M, 2, 3))
    b = blob(x, dtype)
    t = Blob((), dtype=dtype, xp=XP)
    layer.SetUp([b], [t])
    w = host(layer.blobs[0].data).astype(numpy.float64)
    bias = host(layer.blobs[1].data).astype(numpy.float64)
    layer.Forward([b], [t])
    x2 = x.reshape(M, K).astype(dtype).astype(numpy.float64)
    wn = w.T if transpose else w          # (N, K)
    y_ref = naive_matmul(x2, wn.T) + bias
    numpy.testing.assert_allclose(host(t.data), y_ref, **tol(dtype))
    dy = r.standard_normal((M, N)).astype(dtype)
    t.diff[...] = dy
    w_prev = r.standard_normal(layer.blobs[0].shape).astype(dtype)
    b_prev = r.standard_normal(layer.blobs[1].shape).astype(dtype)
    layer.blobs[0].diff[...] = w_prev
    layer.blobs[1].diff[...] = b_prev
    layer.backward([t], [True], [b])
    dy64 = dy.astype(numpy.float64)
    dwn = naive_matmul(dy64.T, x2)        # (N, K)
    numpy.testing.assert_allclose(host(layer.blobs[0].diff), w_prev + (dwn.T if transpose else dwn),
                                  **tol(dtype))
    numpy.testing.assert_allclose(host(layer.blobs[1].diff), b_prev + dy64.sum(axis=0), **tol(dtype))
    numpy.testing.assert_allclose(host(b.diff.reshape(M, K)), naive_matmul(dy64, wn), **tol(dtype))


# ---------------------------------------------------------------------------
# BatchNorm with batch statistics
# ---------------------------------------------------------------------------
def batch_norm_ref(x, dy, eps):
    """Caffe's batch_norm_layer.cpp, per channel with loops over the channels."""
    N, C = x.shape[:2]
    xs = x.reshape(N, C, -1).astype(numpy.float64)
    g = dy.reshape(N, C, -1).astype(numpy.float64)
    y = numpy.zeros_like(xs)
    dx = numpy.zeros_like(xs)
    means, variances = [], []
    for c in range(C):
        v = xs[:, c, :]
        m = v.size
        mu = v.sum() / m
        var = ((v - mu) ** 2).sum() / m
        std = (var + eps) ** 0.5
        yc = (v - mu) / std
        gc = g[:, c, :]
        dx[:, c, :] = (gc - gc.sum() / m - (gc * yc).sum() / m * yc) / std
        y[:, c, :] = yc
        means.append(mu)
        variances.append(var)
    return y.reshape(x.shape), dx.reshape(x.shape), numpy.array(means), numpy.array(variances)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (6, 3)])
@pytest.mark.parametrize("block", [None, 7, 10])   # elements per block of rows: one block, or many
def test_batch_norm_train(dtype, in_place, shape, block, monkeypatch, engine):
    if block is not None:
        from netlib.builtin import blocks
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", block)
    r = numpy.random.default_rng(3)
    eps = 1e-5
    x = (r.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = r.standard_normal(shape).astype(dtype)
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: false '
                       'moving_average_fraction: 0.9 }', dtype)
    b = blob(x, dtype)
    t = b if in_place else Blob((), dtype=dtype, xp=XP)
    layer.SetUp([b], [t])
    prev_mean = r.standard_normal(shape[1])
    prev_var = r.random(shape[1])
    layer.blobs[0].data[...] = prev_mean
    layer.blobs[1].data[...] = prev_var
    layer.blobs[2].data[...] = 2.0
    layer.Forward([b], [t])
    y_ref, dx_ref, mu, var = batch_norm_ref(x, dy, f32(eps))
    numpy.testing.assert_allclose(host(t.data), y_ref, **tol(dtype))
    m = x.size // shape[1]
    maf = f32(0.9)
    numpy.testing.assert_allclose(host(layer.blobs[2].data), [2.0 * maf + 1], **tol(dtype))
    numpy.testing.assert_allclose(host(layer.blobs[0].data), mu + maf * prev_mean.astype(dtype), **tol(dtype))
    numpy.testing.assert_allclose(host(layer.blobs[1].data), m / (m - 1) * var + maf * prev_var.astype(dtype),
                                  **tol(dtype))
    if in_place:
        t.data[...] = 123.0      # a later in-place layer overwrites the top: backward must not care
    t.diff[...] = dy
    layer.backward([t], [True], [b])
    numpy.testing.assert_allclose(host(b.diff), dx_ref, **tol(dtype))


# ---------------------------------------------------------------------------
# LRN across channels
# ---------------------------------------------------------------------------
def lrn_ref(x, dy, n, alpha, beta, k):
    """Forward and Caffe's backward formula, loops over the channels."""
    x = x.astype(numpy.float64)
    dy = dy.astype(numpy.float64)
    N, C, H, W = x.shape
    pre = (n - 1) // 2
    scale = numpy.zeros_like(x)
    for c in range(C):
        s = numpy.full((N, H, W), k)
        for cc in range(c - pre, c - pre + n):
            if 0 <= cc < C:
                s = s + alpha / n * x[:, cc] ** 2
        scale[:, c] = s
    y = x * scale ** (-beta)
    ratio = dy * y / scale
    dx = numpy.zeros_like(x)
    for c in range(C):
        acc = numpy.zeros((N, H, W))
        for cc in range(c - pre, c - pre + n):   # the windows that contain channel c
            if 0 <= cc < C:
                acc = acc + ratio[:, cc]
        dx[:, c] = scale[:, c] ** (-beta) * dy[:, c] - 2 * alpha * beta / n * x[:, c] * acc
    return y, dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("size,alpha,beta,k", [(5, 0.9, 0.75, 1.0), (3, 2.0, 0.5, 0.3), (1, 0.5, 1.0, 2.0)])
def test_lrn_across(dtype, in_place, size, alpha, beta, k):
    r = numpy.random.default_rng(4)
    shape = (2, 7, 3, 4)
    x = r.standard_normal(shape).astype(dtype)
    dy = r.standard_normal(shape).astype(dtype)
    layer = make_layer('type: "LRN" lrn_param { local_size: %d alpha: %g beta: %g k: %g }'
                       % (size, alpha, beta, k), dtype)
    b = blob(x, dtype)
    t = b if in_place else Blob((), dtype=dtype, xp=XP)
    layer.SetUp([b], [t])
    y_ref, dx_ref = lrn_ref(x, dy, size, f32(alpha), f32(beta), f32(k))
    for _ in range(2):           # twice: the kept buffers are reused
        b.data[...] = x
        layer.Forward([b], [t])
        numpy.testing.assert_allclose(host(t.data), y_ref, **tol(dtype))
        if in_place:
            t.data[...] = -5.0   # a later in-place layer changes the top
        t.diff[...] = dy
        layer.backward([t], [True], [b])
        numpy.testing.assert_allclose(host(b.diff), dx_ref, **tol(dtype))


# ---------------------------------------------------------------------------
# Eltwise SUM
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coeffs", [(), (1.0, 1.0, 1.0), (2.0, -1.0, 0.5), (1.0, 1.0, -3.0)])
@pytest.mark.parametrize("in_place", [False, True])
def test_eltwise_sum(dtype, coeffs, in_place):
    r = numpy.random.default_rng(5)
    xs = [r.standard_normal((2, 3, 4)).astype(dtype) for _ in range(3)]
    dy = r.standard_normal((2, 3, 4)).astype(dtype)
    text = 'type: "Eltwise" eltwise_param { operation: SUM %s }' % " ".join("coeff: %g" % c for c in coeffs)
    layer = make_layer(text, dtype)
    bottoms = [blob(x, dtype) for x in xs]
    t = bottoms[0] if in_place else Blob((), dtype=dtype, xp=XP)
    layer.SetUp(bottoms, [t])
    layer.Forward(bottoms, [t])
    c = coeffs or (1.0, 1.0, 1.0)
    want = numpy.zeros(xs[0].shape)
    for ci, x in zip(c, xs):
        for idx in numpy.ndindex(x.shape):
            want[idx] += ci * float(x[idx])
    numpy.testing.assert_allclose(host(t.data), want, **tol(dtype))
    t.diff[...] = dy
    layer.backward([t], [True] * 3, bottoms)
    for ci, bt in zip(c[::-1], bottoms[::-1]):
        numpy.testing.assert_allclose(host(bt.diff), ci * dy.astype(numpy.float64), **tol(dtype))


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_in_place(dtype):
    r = numpy.random.default_rng(6)
    x = (r.random((50, 40)) + 0.5).astype(dtype)
    dy = r.standard_normal(x.shape).astype(dtype)
    ratio = 0.3
    text = 'type: "Dropout" dropout_param { dropout_ratio: %g }' % ratio
    results = []
    for in_place in (False, True):
        set_random_seed(9)
        layer = make_layer(text, dtype)
        b = blob(x, dtype)
        t = b if in_place else Blob((), dtype=dtype, xp=XP)
        layer.SetUp([b], [t])
        layer.Forward([b], [t])
        y = host(t.data).copy()
        t.diff[...] = dy
        layer.backward([t], [True], [b])
        results.append((y, host(b.diff).copy()))
    (y1, dx1), (y2, dx2) = results
    numpy.testing.assert_array_equal(y1, y2)
    numpy.testing.assert_array_equal(dx1, dx2)
    scale = dtype(1.0 / (1.0 - f32(ratio)))   # Caffe: scale_ = 1. / (1. - threshold_) as Dtype
    kept = y1 != 0
    for idx in numpy.ndindex(x.shape):
        if kept[idx]:
            assert y1[idx] == x[idx] * scale
            assert dx1[idx] == dy[idx] * scale
        else:
            assert dx1[idx] == 0
    assert y1.dtype == dtype
    assert abs(kept.mean() - (1 - ratio)) < 0.05


# ---------------------------------------------------------------------------
# Scale in place: the input copy only when a scale gradient can be asked for
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("block", [None, 3, 11])   # elements per block of rows: one block, or many
def test_scale_in_place_gradients(dtype, frozen, block, monkeypatch, engine):
    if block is not None:
        from netlib.builtin import blocks
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", block)
    r = numpy.random.default_rng(7)
    shape = (3, 4, 5)
    x = r.standard_normal(shape).astype(dtype)
    dy = r.standard_normal(shape).astype(dtype)
    s = r.standard_normal(4).astype(dtype)
    bias = r.standard_normal(4).astype(dtype)
    layer = make_layer('type: "Scale" scale_param { bias_term: true }', dtype)
    b = blob(x, dtype)
    layer.SetUp([b], [b])
    layer.blobs[0].data[...] = s
    layer.blobs[1].data[...] = bias
    layer.param_propagate_down = [not frozen, True]
    layer.Forward([b], [b])
    assert (layer._saved is None) == frozen
    want = numpy.zeros(shape)
    for idx in numpy.ndindex(shape):
        want[idx] = float(x[idx]) * float(s[idx[1]]) + float(bias[idx[1]])
    numpy.testing.assert_allclose(host(b.data), want, **tol(dtype))
    b.data[...] = 7.0            # a later in-place layer changes the top
    b.diff[...] = dy
    layer.blobs[0].diff[...] = 0
    layer.blobs[1].diff[...] = 0
    layer.backward([b], [True], [b])
    ds, db = numpy.zeros(4), numpy.zeros(4)
    for idx in numpy.ndindex(shape):
        ds[idx[1]] += float(dy[idx]) * float(x[idx])
        db[idx[1]] += float(dy[idx])
    if not frozen:
        numpy.testing.assert_allclose(host(layer.blobs[0].diff), ds, **tol(dtype))
    numpy.testing.assert_allclose(host(layer.blobs[1].diff), db, **tol(dtype))
    numpy.testing.assert_allclose(host(b.diff), dy.astype(numpy.float64) * s.astype(numpy.float64)[None, :, None],
                                  **tol(dtype))


def test_scale_in_place_without_backward_keeps_no_copy():
    layer = make_layer('type: "Scale"', numpy.float32)
    b = blob(numpy.ones((2, 3, 4)), numpy.float32)
    layer.SetUp([b], [b])
    layer.need_backward = False
    layer.Forward([b], [b])
    assert layer._saved is None
