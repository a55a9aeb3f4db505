"""Common (utility / structural) layers: naive loop references, gradient
checks over parameter variants, Reshape shape rules, error messages, buffer
sharing, and the real-Caffe goldens of every type in netlib/layers/common.py."""
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.errors import ConfigError, LayerError, ShapeError
from netlib.layer import create_layer
from netlib.builtin.structural import reshape_top_shape
from netlib.proto import caffe_pb2
from netlib.testing import check_gradient
from xp_mode import XP, dev, host

RNG = np.random.default_rng(77)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make(text, dtype=np.float32, name="under_test"):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = name
    return create_layer(lp, phase=caffe_pb2.TEST, dtype=dtype, xp=XP)


def blobs(arrays, dtype=np.float32):
    out = []
    for a in arrays:
        a = np.asarray(a)
        b = Blob(a.shape, dtype=dtype)
        b.data[...] = a
        out.append(b)
    return out


def fwd(text, arrays, ntop=1, dtype=np.float32, params=None):
    """SetUp + Forward; returns (layer, bottom, top)."""
    lay = make(text, dtype)
    bottom = blobs(arrays, dtype)
    top = [Blob((), dtype=dtype) for _ in range(ntop)]
    lay.SetUp(bottom, top)
    if params is not None:
        for blob, p in zip(lay.blobs, params):
            blob.data[...] = p
    lay.Forward(bottom, top)
    return lay, bottom, top


def bwd(lay, top, bottom, dys, propagate=None):
    for p in lay.blobs:
        p.diff[...] = 0
    for b in bottom:
        b.diff[...] = 0
    for t, dy in zip(top, dys):
        t.diff[...] = dy
    if propagate is None:
        propagate = [True] * len(bottom)
    lay.Backward(top, propagate, bottom)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(host(a), np.float64), np.asarray(host(b), np.float64),
                               rtol=tol, atol=tol)


def fd_check_shared(text, arrays, ntop=1, step=1e-3, tol=1e-6):
    """Finite-difference check for layers whose top shares the bottom's diff
    (Flatten, Reshape, one-bottom Concat, one-top Slice).  The generic checker
    zeroes the bottom diffs after writing the top diffs, which for a shared
    diff wipes the top diff; here bottoms are zeroed first, as a net does."""
    lay = make(text, np.float64)
    bottom = blobs([np.asarray(a, np.float64) for a in arrays], np.float64)
    top = [Blob((), dtype=np.float64) for _ in range(ntop)]
    lay.SetUp(bottom, top)
    lay.Forward(bottom, top)
    weights = [dev(RNG.standard_normal(t.shape)) for t in top]
    for b in bottom:
        b.diff[...] = 0
    for t, w in zip(top, weights):
        t.diff[...] = w
    lay.Backward(top, [True] * len(bottom), bottom)
    analytic = [host(b.diff).copy() for b in bottom]

    def objective():
        lay.Forward(bottom, top)
        return sum(float((t.data * w).sum()) for t, w in zip(top, weights))

    for b, ana in zip(bottom, analytic):
        flat = b.data.reshape(-1)
        for i in range(flat.size):
            x0 = flat[i]
            flat[i] = x0 + step
            fp = objective()
            flat[i] = x0 - step
            fm = objective()
            flat[i] = x0
            assert abs((fp - fm) / (2 * step) - ana.reshape(-1)[i]) < tol


# ---------------------------------------------------------------------------
# InnerProduct
# ---------------------------------------------------------------------------
def ip_naive(x, w, b, axis, transpose):
    m = int(np.prod(x.shape[:axis]))
    k = int(np.prod(x.shape[axis:]))
    x2 = x.reshape(m, k).astype(np.float64)
    n = w.shape[1] if transpose else w.shape[0]
    y = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            s = 0.0
            for kk in range(k):
                s += x2[i, kk] * (w[kk, j] if transpose else w[j, kk])
            y[i, j] = s + (b[j] if b is not None else 0.0)
    return y.reshape(x.shape[:axis] + (n,))


IP_VARIANTS = [
    ("", 1), ("axis: 2", 2), ("transpose: true", 1), ("bias_term: false", 1),
    ("axis: -1 transpose: true bias_term: false", 2), ("axis: 0", 0),
]


@pytest.mark.parametrize("extra,axis", IP_VARIANTS)
def test_inner_product_forward_backward_naive(extra, axis):
    x = randn(2, 3, 4)
    text = ('type: "InnerProduct" inner_product_param { num_output: 5 %s '
            'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }'
            % extra)
    lay, bottom, top = fwd(text, [x])
    transpose = "transpose" in extra
    k = int(np.prod(x.shape[axis:]))
    w = lay.blobs[0].data.copy()
    assert w.shape == ((k, 5) if transpose else (5, k))
    has_bias = "bias_term: false" not in extra
    assert len(lay.blobs) == (2 if has_bias else 1)
    b = lay.blobs[1].data.copy() if has_bias else None
    if has_bias:
        assert b.shape == (5,)
    y = top[0].data
    assert y.shape == x.shape[:axis] + (5,)
    close(y, ip_naive(x, w, b, axis, transpose), 1e-4)
    # backward against explicit loops
    dy = randn(*y.shape)
    bwd(lay, top, bottom, [dy])
    m = int(np.prod(x.shape[:axis]))
    x2, dy2 = x.reshape(m, k).astype(np.float64), dy.reshape(m, 5).astype(np.float64)
    dw = np.zeros(w.shape)
    dx = np.zeros((m, k))
    for i in range(m):
        for j in range(5):
            for kk in range(k):
                if transpose:
                    dw[kk, j] += dy2[i, j] * x2[i, kk]
                    dx[i, kk] += dy2[i, j] * w[kk, j]
                else:
                    dw[j, kk] += dy2[i, j] * x2[i, kk]
                    dx[i, kk] += dy2[i, j] * w[j, kk]
    close(lay.blobs[0].diff, dw, 1e-4)
    close(bottom[0].diff, dx.reshape(x.shape), 1e-4)
    if has_bias:
        close(lay.blobs[1].diff, dy2.sum(axis=0), 1e-4)


@pytest.mark.parametrize("extra", ["", "transpose: true", "bias_term: false", "axis: 2",
                                   "axis: 2 transpose: true bias_term: false"])
def test_inner_product_gradient(extra):
    check_gradient('type: "InnerProduct" inner_product_param { num_output: 3 %s '
                   'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" } }'
                   % extra, bottom_shapes=[(2, 3, 2)])


def test_inner_product_accumulates_param_grads_and_respects_propagate_flags():
    x = randn(4, 6)
    text = ('type: "InnerProduct" inner_product_param { num_output: 3 '
            'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "constant" value: 0.5 } }')
    lay, bottom, top = fwd(text, [x])
    close(lay.blobs[1].data, np.full(3, 0.5))
    dy = randn(4, 3)
    bwd(lay, top, bottom, [dy])
    dw1, db1, dx1 = lay.blobs[0].diff.copy(), lay.blobs[1].diff.copy(), bottom[0].diff.copy()
    lay.Backward(top, [True], bottom)  # second pass: params accumulate, bottom overwritten
    close(lay.blobs[0].diff, 2 * dw1)
    close(lay.blobs[1].diff, 2 * db1)
    close(bottom[0].diff, dx1)
    # param_propagate_down False: that param's diff is left alone
    lay.param_propagate_down = [False, True]
    lay.blobs[0].diff[...] = 7
    bottom[0].diff[...] = 9
    lay.Backward(top, [False], bottom)
    assert (lay.blobs[0].diff == 7).all()
    assert (bottom[0].diff == 9).all()
    close(lay.blobs[1].diff, 3 * db1)


def test_inner_product_default_fillers_are_zero():
    lay, _, top = fwd('type: "InnerProduct" inner_product_param { num_output: 2 }', [randn(3, 4)])
    assert (lay.blobs[0].data == 0).all() and (lay.blobs[1].data == 0).all()
    assert (top[0].data == 0).all()


def test_inner_product_needs_num_output():
    with pytest.raises(ConfigError, match="num_output") as err:
        fwd('name: "fc" type: "InnerProduct"', [randn(2, 3)])
    assert "'fc'" in str(err.value)


def test_inner_product_incompatible_input_dimension():
    lay, bottom, top = fwd('type: "InnerProduct" inner_product_param { num_output: 2 }',
                           [randn(2, 3, 4)])
    bottom[0].reshape(2, 3, 5)
    with pytest.raises(ShapeError) as err:
        lay.Forward(bottom, top)
    msg = str(err.value)
    assert "incompatible input dimension" in msg and "under_test" in msg
    assert "(2, 3, 5)" in msg and "12" in msg and "15" in msg
    bottom[0].reshape(5, 12)  # same K, another batch size is fine
    lay.Forward(bottom, top)
    assert top[0].shape == (5, 2)


# ---------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------
def softmax_naive(x, axis):
    x = x.astype(np.float64)
    axis = axis % x.ndim
    y = np.zeros_like(x)
    other = [range(d) for i, d in enumerate(x.shape) if i != axis]
    for idx in itertools.product(*other):
        sl = list(idx)
        sl.insert(axis, slice(None))
        v = x[tuple(sl)]
        m = max(v)
        e = [np.exp(a - m) for a in v]
        s = sum(e)
        y[tuple(sl)] = [a / s for a in e]
    return y


@pytest.mark.parametrize("axis", [1, 0, -1, 2])
def test_softmax_forward_backward_naive(axis):
    x = randn(2, 3, 4, scale=3)
    x[0, 0, 0] = 1000.0  # stability: Caffe subtracts the max
    text = 'type: "Softmax"' + ("" if axis == 1 else " softmax_param { axis: %d }" % axis)
    lay, bottom, top = fwd(text, [x])
    ref = softmax_naive(x, axis)
    close(top[0].data, ref, 1e-5)
    dy = randn(*x.shape)
    bwd(lay, top, bottom, [dy])
    # dx_c = y_c * (dy_c - sum_j dy_j y_j), written with loops over the axis
    ax = axis % x.ndim
    dx = np.zeros(x.shape)
    other = [range(d) for i, d in enumerate(x.shape) if i != ax]
    for idx in itertools.product(*other):
        sl = list(idx)
        sl.insert(ax, slice(None))
        sl = tuple(sl)
        yv, gv = ref[sl], dy[sl].astype(np.float64)
        dot = sum(a * b for a, b in zip(yv, gv))
        dx[sl] = [yv[c] * (gv[c] - dot) for c in range(len(yv))]
    close(bottom[0].diff, dx, 1e-5)


@pytest.mark.parametrize("axis", [1, 0, -1])
def test_softmax_gradient(axis):
    check_gradient('type: "Softmax" softmax_param { axis: %d }' % axis, bottom_shapes=[(2, 3, 2)])


def test_softmax_in_place():
    x = randn(3, 5)
    ref = softmax_naive(x, 1)
    lay = make('type: "Softmax"')
    b = blobs([x])[0]
    lay.SetUp([b], [b])
    lay.Forward([b], [b])
    close(b.data, ref)
    dy = randn(3, 5)
    b.diff[...] = dy
    lay.Backward([b], [True], [b])
    close(b.diff, ref * (dy - (dy * ref).sum(1, keepdims=True)), 1e-5)


# ---------------------------------------------------------------------------
# Split / Flatten / Reshape
# ---------------------------------------------------------------------------
def test_split_shares_data_and_sums_diffs():
    x = randn(2, 3, 2)
    lay, bottom, top = fwd('type: "Split"', [x], ntop=3)
    for t in top:
        assert t.shape == x.shape and t.shares_data_with(bottom[0])
    bottom[0].data[0, 0, 0] = 42.0
    assert all(t.data[0, 0, 0] == 42.0 for t in top)
    dys = [randn(2, 3, 2) for _ in range(3)]
    bwd(lay, top, bottom, dys)
    close(bottom[0].diff, dys[0].astype(np.float64) + dys[1] + dys[2])
    bottom[0].diff[...] = 5
    lay.Backward(top, [False], bottom)
    assert (bottom[0].diff == 5).all()


@pytest.mark.parametrize("ntop", [1, 2, 3])
def test_split_gradient(ntop):
    check_gradient('type: "Split"', bottom_shapes=[(2, 3)], num_tops=ntop)


def test_split_refuses_in_place():
    lay = make('type: "Split"')
    b = blobs([randn(2, 2)])[0]
    with pytest.raises(LayerError, match="in-place"):
        lay.SetUp([b], [b, Blob(())])


@pytest.mark.parametrize("extra,shape", [
    ("", (2, 60)), ("flatten_param { axis: 0 }", (120,)), ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
    ("flatten_param { axis: -3 end_axis: -2 }", (2, 12, 5)),
    ("flatten_param { axis: 2 end_axis: 2 }", (2, 3, 4, 5)),
])
def test_flatten_shapes_and_sharing(extra, shape):
    x = randn(2, 3, 4, 5)
    lay, bottom, top = fwd('type: "Flatten" ' + extra, [x])
    assert top[0].shape == shape
    close(top[0].data.reshape(-1), x.reshape(-1), 0)
    assert top[0].shares_data_with(bottom[0])
    dy = randn(*shape)
    top[0].diff[...] = dy
    lay.Backward(top, [True], bottom)
    close(bottom[0].diff, dy.reshape(x.shape), 0)


def test_flatten_gradient_and_errors():
    fd_check_shared('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [RNG.standard_normal((2, 3, 2, 2))])
    lay = make('type: "Flatten"')
    b = blobs([randn(2, 3)])[0]
    with pytest.raises(LayerError, match="in-place"):
        lay.SetUp([b], [b])
    with pytest.raises(ShapeError, match="axis 3 out of range"):
        fwd('type: "Flatten" flatten_param { axis: 3 }', [randn(2, 3)])
    with pytest.raises(ShapeError, match="end_axis"):
        fwd('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [randn(2, 3, 4)])


RESHAPE_CASES = [
    # Caffe's caffe.proto documentation, input 2 x 8
    ((2, 8), [2, 2, 4], 0, -1, (2, 2, 4)),
    ((2, 8), [0, 2, 4], 0, -1, (2, 2, 4)),
    ((2, 8), [0, 2, -1], 0, -1, (2, 2, 4)),
    ((2, 8), [0, -1, 4], 0, -1, (2, 2, 4)),
    ((2, 8), [2, 4], 1, -1, (2, 2, 4)),
    ((2, 8), [2, 4], -2, -1, (2, 2, 4)),
    ((2, 8), [1, 2, 8], 0, -1, (1, 2, 8)),
    ((2, 8), [1, 2], 0, 1, (1, 2, 8)),
    ((2, 8), [1], 0, 0, (1, 2, 8)),
    ((2, 8), [2, 1, 8], 0, -1, (2, 1, 8)),
    ((2, 8), [1], 1, 0, (2, 1, 8)),
    # Caffe's test_reshape_layer.cpp, input 2 x 3 x 6 x 5
    ((2, 3, 6, 5), [0, -1], 0, -1, (2, 90)),
    ((2, 3, 6, 5), [0, 0, 0, 0], 0, -1, (2, 3, 6, 5)),
    ((2, 3, 6, 5), [0, 3, 10, -1], 0, -1, (2, 3, 10, 3)),
    ((2, 3, 6, 5), [3, 10, -1], 1, -1, (2, 3, 10, 3)),
    ((2, 3, 6, 5), [1, 1, 1], 0, 0, (1, 1, 1, 2, 3, 6, 5)),
    ((2, 3, 6, 5), [1, 1, 1], 2, 0, (2, 3, 1, 1, 1, 6, 5)),
    ((2, 3, 6, 5), [1, 1, 1], -1, 0, (2, 3, 6, 5, 1, 1, 1)),
    ((2, 3, 6, 5), [-1], 1, 2, (2, 18, 5)),
    ((2, 3, 6, 5), [6, 2, 3, 5], 0, -1, (6, 2, 3, 5)),
    ((2, 3, 4, 5), [0, -1, 4], 0, -1, (2, 15, 4)),
    ((2, 3, 4, 5), [-1], -1, -1, (2, 3, 4, 5, 1)),  # axis -1: append after the last axis
    ((2, 3, 4, 5), [0, -1], 2, -1, (2, 3, 4, 5)),
]


@pytest.mark.parametrize("bottom_shape,dims,axis,num_axes,expect", RESHAPE_CASES)
def test_reshape_shape_rules(bottom_shape, dims, axis, num_axes, expect):
    assert reshape_top_shape(bottom_shape, dims, axis, num_axes) == expect
    text = 'type: "Reshape" reshape_param { shape { %s } axis: %d num_axes: %d }' % (
        " ".join("dim: %d" % d for d in dims), axis, num_axes)
    x = randn(*bottom_shape)
    lay, bottom, top = fwd(text, [x])
    assert top[0].shape == expect
    assert top[0].shares_data_with(bottom[0])
    close(top[0].data.reshape(-1), x.reshape(-1), 0)
    dy = randn(*expect)
    top[0].diff[...] = dy
    lay.Backward(top, [True], bottom)
    close(bottom[0].diff.reshape(-1), dy.reshape(-1), 0)


@pytest.mark.parametrize("dims,axis,num_axes,match,error", [
    ([-1, -1], 0, -1, "multiple -1", ConfigError),
    ([5, 5], 0, -1, "output count must match input count", ShapeError),
    ([7, -1], 0, -1, "must be divisible", ShapeError),
    ([2, 4], -3, -1, "output count must match", ShapeError),  # caffe.proto's erroneous example
    ([0, 0, 0], 0, -1, "no corresponding bottom axis", ShapeError),
    ([1], 3, 0, "out of range", ShapeError),
    ([1], 1, 2, "out of range", ShapeError),
    ([1], 0, -2, "num_axes must be", ShapeError),
])
def test_reshape_errors(dims, axis, num_axes, match, error):
    text = 'name: "rs" type: "Reshape" reshape_param { shape { %s } axis: %d num_axes: %d }' % (
        " ".join("dim: %d" % d for d in dims), axis, num_axes)
    with pytest.raises(error, match=match) as err:
        fwd(text, [randn(2, 8)])
    assert "'rs'" in str(err.value) and "Reshape" in str(err.value)


def test_reshape_follows_bottom_reshape_and_gradient():
    lay, bottom, top = fwd('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [randn(2, 3, 4)])
    assert top[0].shape == (2, 12)
    bottom[0].reshape(5, 2, 2)
    lay.Forward(bottom, top)
    assert top[0].shape == (5, 4)
    fd_check_shared('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } axis: 1 }',
                    [RNG.standard_normal((2, 3, 2))])
    b = blobs([randn(2, 2)])[0]
    with pytest.raises(LayerError, match="in-place"):
        make('type: "Reshape" reshape_param { shape { dim: -1 } }').SetUp([b], [b])


# ---------------------------------------------------------------------------
# Concat / Slice
# ---------------------------------------------------------------------------
def concat_naive(xs, axis):
    axis = axis % xs[0].ndim
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    y = np.zeros(shape)
    off = 0
    for x in xs:
        for idx in itertools.product(*[range(d) for d in x.shape]):
            j = list(idx)
            j[axis] += off
            y[tuple(j)] = x[idx]
        off += x.shape[axis]
    return y


@pytest.mark.parametrize("param,axis", [("", 1), ("concat_param { axis: 0 }", 0),
                                        ("concat_param { axis: -1 }", 2),
                                        ("concat_param { concat_dim: 2 }", 2)])
def test_concat_forward_backward_naive(param, axis):
    shapes = [[2, 3, 2], [2, 3, 2], [2, 3, 2]]
    for s, n in zip(shapes, (1, 2, 3)):
        s[axis] = n
    xs = [randn(*s) for s in shapes]
    lay, bottom, top = fwd('type: "Concat" ' + param, xs)
    ref = concat_naive(xs, axis)
    close(top[0].data, ref, 0)
    dy = randn(*ref.shape)
    bwd(lay, top, bottom, [dy], propagate=[True, False, True])
    off = 0
    for i, x in enumerate(xs):
        n = x.shape[axis]
        sl = [slice(None)] * 3
        sl[axis] = slice(off, off + n)
        if i == 1:
            assert (bottom[i].diff == 0).all()
        else:
            close(bottom[i].diff, dy[tuple(sl)], 0)
        off += n


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_gradient(axis):
    shapes = [[2, 2, 3], [2, 2, 3]]
    shapes[1][axis] = 1
    check_gradient('type: "Concat" concat_param { axis: %d }' % axis, bottom_shapes=shapes)


def test_concat_single_bottom_shares():
    lay, bottom, top = fwd('type: "Concat"', [randn(2, 3)])
    assert top[0].shares_data_with(bottom[0])
    fd_check_shared('type: "Concat"', [RNG.standard_normal((2, 3))])


def test_concat_shape_mismatch_names_layer_and_every_shape():
    with pytest.raises(ShapeError) as err:
        fwd('name: "cat" type: "Concat"', [randn(2, 3, 4), randn(2, 5, 4), randn(3, 1, 4)])
    msg = str(err.value)
    assert "'cat'" in msg and "Concat" in msg
    for s in ("(2, 3, 4)", "(2, 5, 4)", "(3, 1, 4)"):
        assert s in msg
    with pytest.raises(ShapeError, match="same number of axes"):
        fwd('type: "Concat"', [randn(2, 3), randn(2, 3, 1)])
    with pytest.raises(ConfigError, match="not both"):
        fwd('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [randn(2, 3), randn(2, 3)])


@pytest.mark.parametrize("param,ntop,sizes,axis", [
    ("slice_param { slice_point: 1 slice_point: 4 }", 3, [1, 3, 2], 1),
    ("", 3, [2, 2, 2], 1),
    ("slice_param { axis: 0 }", 2, [1, 1], 0),
    ("slice_param { axis: -1 slice_point: 1 }", 2, [1, 2], 2),
    ("slice_param { slice_dim: 2 }", 3, [1, 1, 1], 2),
])
def test_slice_forward_backward_naive(param, ntop, sizes, axis):
    x = randn(2, 6, 3)
    lay, bottom, top = fwd('type: "Slice" ' + param, [x], ntop=ntop)
    off = 0
    dys = []
    for t, n in zip(top, sizes):
        exp_shape = list(x.shape)
        exp_shape[axis] = n
        assert t.shape == tuple(exp_shape)
        for idx in itertools.product(*[range(d) for d in t.shape]):
            j = list(idx)
            j[axis] += off
            assert t.data[idx] == x[tuple(j)]
        off += n
        dys.append(randn(*t.shape))
    bwd(lay, top, bottom, dys)
    close(bottom[0].diff, concat_naive(dys, axis), 0)


@pytest.mark.parametrize("param,ntop", [("slice_param { slice_point: 1 slice_point: 3 }", 3),
                                        ("slice_param { axis: 0 }", 2), ("slice_param { axis: 2 }", 3)])
def test_slice_gradient(param, ntop):
    check_gradient('type: "Slice" ' + param, bottom_shapes=[(2, 4, 3)], num_tops=ntop)


def test_slice_single_top_and_errors():
    lay, bottom, top = fwd('type: "Slice"', [randn(2, 3)])
    assert top[0].shares_data_with(bottom[0]) and top[0].shape == (2, 3)
    fd_check_shared('type: "Slice"', [RNG.standard_normal((2, 3))])
    with pytest.raises(ShapeError) as err:
        fwd('name: "sl" type: "Slice"', [randn(2, 5)], ntop=2)
    assert "evenly divide" in str(err.value) and "'sl'" in str(err.value) and "(2, 5)" in str(err.value)
    with pytest.raises(ConfigError, match="slice_point"):
        fwd('type: "Slice" slice_param { slice_point: 1 }', [randn(2, 6)], ntop=3)
    with pytest.raises(ConfigError, match="increasing"):
        fwd('type: "Slice" slice_param { slice_point: 3 slice_point: 2 }', [randn(2, 6)], ntop=3)
    with pytest.raises(ShapeError, match="beyond"):
        fwd('type: "Slice" slice_param { slice_point: 7 }', [randn(2, 6)], ntop=2)
    lay, bottom, top = fwd('type: "Slice" slice_param { slice_point: 6 }', [randn(2, 6)], ntop=2)
    assert top[0].shape == (2, 6) and top[1].shape == (2, 0)  # Caffe allows an empty last top
    with pytest.raises(ConfigError, match="not both"):
        fwd('type: "Slice" slice_param { axis: 1 slice_dim: 1 }', [randn(2, 6)], ntop=2)


# ---------------------------------------------------------------------------
# Eltwise
# ---------------------------------------------------------------------------
def eltwise_naive(xs, op, coeffs=None):
    """Loop reference; MAX returns (y, argmax) with Caffe's tie rules."""
    shape = xs[0].shape
    y = np.zeros(shape)
    arg = np.zeros(shape, dtype=int)
    for idx in itertools.product(*[range(d) for d in shape]):
        v = [float(x[idx]) for x in xs]
        if op == "SUM":
            c = coeffs or [1.0] * len(v)
            y[idx] = sum(ci * vi for ci, vi in zip(c, v))
        elif op == "PROD":
            p = 1.0
            for vi in v:
                p *= vi
            y[idx] = p
        else:
            best, k = (v[0], 0) if v[0] > v[1] else (v[1], 1)
            for j in range(2, len(v)):
                if v[j] > best:
                    best, k = v[j], j
            y[idx], arg[idx] = best, k
    return y, arg


@pytest.mark.parametrize("op,param,nb", [
    ("SUM", "", 2), ("SUM", "coeff: 1 coeff: -0.5 coeff: 2", 3), ("PROD", "", 3),
    ("PROD", "stable_prod_grad: false", 2), ("MAX", "", 2), ("MAX", "", 3),
])
def test_eltwise_forward_backward_naive(op, param, nb):
    xs = [randn(2, 3, 2) for _ in range(nb)]
    if op == "MAX":  # ties: bottom 1 wins over bottom 0; a later bottom needs a strict >
        xs[0][0, 0, 0] = xs[1][0, 0, 0] = 5.0
        if nb == 3:
            xs[2][0, 0, 0] = 5.0
            xs[0][1, 0, 0], xs[1][1, 0, 0], xs[2][1, 0, 0] = 6.0, 1.0, 6.0
    lay, bottom, top = fwd('type: "Eltwise" eltwise_param { operation: %s %s }' % (op, param), xs)
    coeffs = [float(c) for c in param.replace("coeff:", "").split()] if "coeff" in param else None
    ref, arg = eltwise_naive(xs, op, coeffs)
    close(top[0].data, ref, 1e-6)
    dy = randn(2, 3, 2)
    bwd(lay, top, bottom, [dy])
    for i in range(nb):
        if op == "SUM":
            expect = dy * (coeffs[i] if coeffs else 1.0)
        elif op == "PROD":
            expect = dy.astype(np.float64)
            for j in range(nb):
                if j != i:
                    expect = expect * xs[j]
        else:
            expect = np.where(arg == i, dy, 0.0)
        close(bottom[i].diff, expect, 1e-5)
    if op == "MAX":
        assert arg[0, 0, 0] == 1 and bottom[1].diff[0, 0, 0] == dy[0, 0, 0]
        assert bottom[0].diff[0, 0, 0] == 0
        if nb == 3:
            assert bottom[2].diff[0, 0, 0] == 0 and arg[1, 0, 0] == 0


@pytest.mark.parametrize("param,nb", [
    ("operation: SUM", 2), ("operation: SUM coeff: 0.5 coeff: -2 coeff: 3", 3),
    ("operation: PROD", 3), ("operation: PROD stable_prod_grad: false", 3),
    ("operation: MAX", 2), ("operation: MAX", 4),
])
def test_eltwise_gradient(param, nb):
    check_gradient('type: "Eltwise" eltwise_param { %s }' % param, bottom_shapes=[(2, 3, 2)] * nb)


def test_eltwise_prod_grad_with_zero_input():
    xs = [np.array([[0.0, 2.0]], np.float32), np.array([[3.0, 4.0]], np.float32)]
    dy = np.ones((1, 2), np.float32)
    lay, bottom, top = fwd('type: "Eltwise" eltwise_param { operation: PROD }', xs)
    bwd(lay, top, bottom, [dy])
    close(bottom[0].diff, [[3.0, 4.0]])  # stable: product of the others
    lay, bottom, top = fwd('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', xs)
    bwd(lay, top, bottom, [dy])
    assert np.isnan(float(bottom[0].diff[0, 0]))  # Caffe's unstable form: top / bottom = 0 / 0
    close(bottom[0].diff[0, 1], 4.0)


def test_eltwise_max_nan_follows_caffe_comparisons():
    nan = np.nan
    xs = [np.array([nan, 1.0, 2.0], np.float32), np.array([1.0, nan, 0.0], np.float32),
          np.array([nan, 5.0, 3.0], np.float32)]
    lay, bottom, top = fwd('type: "Eltwise" eltwise_param { operation: MAX }', xs)
    ref, arg = eltwise_naive(xs, "MAX")
    np.testing.assert_array_equal(host(top[0].data), ref.astype(np.float32))  # [1, nan, 3]: literal a > b ? a : b
    dy = np.array([1.0, 2.0, 3.0], np.float32)
    bwd(lay, top, bottom, [dy])
    for i in range(3):
        np.testing.assert_array_equal(host(bottom[i].diff), np.where(arg == i, dy, 0))
    lay, bottom, top = fwd('type: "Eltwise" eltwise_param { operation: MAX }', xs[1:])
    np.testing.assert_array_equal(host(top[0].data), eltwise_naive(xs[1:], "MAX")[0].astype(np.float32))


@pytest.mark.parametrize("op", ["SUM", "PROD", "MAX"])
def test_eltwise_in_place_matches_out_of_place(op):
    xs = [randn(3, 4), randn(3, 4), randn(3, 4)]
    dy = randn(3, 4)
    text = 'type: "Eltwise" eltwise_param { operation: %s }' % op
    lay, bottom, top = fwd(text, xs)
    bwd(lay, top, bottom, [dy])
    ref_y, ref_dx = top[0].data.copy(), [b.diff.copy() for b in bottom]
    lay2 = make(text)
    b2 = blobs(xs)
    lay2.SetUp(b2, [b2[0]])
    lay2.Forward(b2, [b2[0]])
    close(b2[0].data, ref_y, 0)
    for b in b2[1:]:
        b.diff[...] = 0
    b2[0].diff[...] = dy
    lay2.Backward([b2[0]], [True] * 3, b2)
    for b, r in zip(b2, ref_dx):
        close(b.diff, r, 1e-6)


def test_eltwise_errors():
    with pytest.raises(ShapeError) as err:
        fwd('name: "elt" type: "Eltwise"', [randn(2, 3), randn(3, 2)])
    msg = str(err.value)
    assert "'elt'" in msg and "Eltwise" in msg and "(2, 3)" in msg and "(3, 2)" in msg
    with pytest.raises(ConfigError, match="one coefficient per bottom"):
        fwd('type: "Eltwise" eltwise_param { coeff: 1 }', [randn(2), randn(2)])
    with pytest.raises(ConfigError, match="only takes coefficients for summation"):
        fwd('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [randn(2), randn(2)])
    with pytest.raises(LayerError, match="at least 2"):
        fwd('type: "Eltwise"', [randn(2)])


# ---------------------------------------------------------------------------
# Silence
# ---------------------------------------------------------------------------
def test_silence_zeroes_propagating_bottom_diffs():
    lay = make('type: "Silence"')
    bottom = blobs([randn(2, 3), randn(4)])
    lay.SetUp(bottom, [])
    lay.Forward(bottom, [])
    for b in bottom:
        b.diff[...] = 7
    lay.Backward([], [True, False], bottom)
    assert (bottom[0].diff == 0).all() and (bottom[1].diff == 7).all()
    with pytest.raises(LayerError, match="exactly 0 top"):
        make('type: "Silence"').SetUp(blobs([randn(2)]), [Blob(())])


# ---------------------------------------------------------------------------
# Tile / Reduction / ArgMax / Crop
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("axis,tiles", [(1, 3), (0, 2), (-1, 2), (2, 1)])
def test_tile_naive(axis, tiles):
    x = randn(2, 3, 2)
    lay, bottom, top = fwd('type: "Tile" tile_param { axis: %d tiles: %d }' % (axis, tiles), [x])
    ax = axis % 3
    shape = list(x.shape)
    shape[ax] *= tiles
    assert top[0].shape == tuple(shape)
    for idx in itertools.product(*[range(d) for d in shape]):
        j = list(idx)
        j[ax] %= x.shape[ax]
        assert top[0].data[idx] == x[tuple(j)]
    dy = randn(*shape)
    bwd(lay, top, bottom, [dy])
    dx = np.zeros(x.shape)
    for idx in itertools.product(*[range(d) for d in shape]):
        j = list(idx)
        j[ax] %= x.shape[ax]
        dx[tuple(j)] += dy[idx]
    close(bottom[0].diff, dx, 1e-5)
    check_gradient('type: "Tile" tile_param { axis: %d tiles: %d }' % (axis, tiles),
                   bottom_shapes=[(2, 3, 2)])


def test_tile_needs_tiles():
    with pytest.raises(ConfigError, match="tiles"):
        fwd('type: "Tile"', [randn(2, 3)])


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, -0.5), (2, 2.0), (-1, 1.0)])
def test_reduction_naive(op, axis, coeff):
    x = randn(2, 3, 4)
    text = 'type: "Reduction" reduction_param { operation: %s axis: %d coeff: %g }' % (op, axis, coeff)
    lay, bottom, top = fwd(text, [x])
    ax = axis % 3
    assert top[0].shape == x.shape[:ax]
    num = int(np.prod(x.shape[:ax]))
    x2 = x.reshape(num, -1).astype(np.float64)
    ref = np.zeros(num)
    for i in range(num):
        for v in x2[i]:
            ref[i] += {"SUM": v, "MEAN": v, "ASUM": abs(v), "SUMSQ": v * v}[op]
        ref[i] *= coeff / (x2.shape[1] if op == "MEAN" else 1)
    close(top[0].data.reshape(-1), ref, 1e-5)
    dy = randn(*top[0].shape)
    bwd(lay, top, bottom, [dy])
    dx = np.zeros(x2.shape)
    for i in range(num):
        g = float(dy.reshape(-1)[i]) * coeff / (x2.shape[1] if op == "MEAN" else 1)
        for j, v in enumerate(x2[i]):
            dx[i, j] = {"SUM": g, "MEAN": g, "ASUM": g * np.sign(v), "SUMSQ": 2 * g * v}[op]
    close(bottom[0].diff.reshape(num, -1), dx, 1e-5)
    check_gradient(text, bottom_shapes=[(2, 3, 2)])


def argmax_naive(x, top_k, out_max_val, axis=None):
    if axis is None:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        out = np.zeros((n, 2 if out_max_val else 1, top_k))
        for i in range(n):
            pairs = sorted(((float(v), j) for j, v in enumerate(flat[i])), reverse=True)[:top_k]
            for j, (v, k) in enumerate(pairs):
                out[i, 0, j] = k
                if out_max_val:
                    out[i, 1, j] = v
        return out
    ax = axis % x.ndim
    shape = list(x.shape)
    shape[ax] = top_k
    out = np.zeros(shape)
    other = [range(d) for i, d in enumerate(x.shape) if i != ax]
    for idx in itertools.product(*other):
        sl = list(idx)
        sl.insert(ax, slice(None))
        v = x[tuple(sl)]
        pairs = sorted(((float(a), j) for j, a in enumerate(v)), reverse=True)[:top_k]
        out[tuple(sl)] = [a if out_max_val else j for a, j in pairs]
    return out


@pytest.mark.parametrize("param,axis,k,maxval", [
    ("", None, 1, False), ("top_k: 3", None, 3, False), ("top_k: 2 out_max_val: true", None, 2, True),
    ("axis: 1", 1, 1, False), ("axis: 2 top_k: 2 out_max_val: true", 2, 2, True),
    ("axis: -1 top_k: 3", -1, 3, False), ("axis: 0 top_k: 2", 0, 2, False),
])
def test_argmax_naive_with_ties(param, axis, k, maxval):
    x = np.round(randn(3, 4, 5) * 2) / 2  # coarse values: many ties
    lay, _, top = fwd('type: "ArgMax" argmax_param { %s }' % param, [x])
    ref = argmax_naive(x, k, maxval, axis)
    if axis is None:
        assert top[0].shape == ref.shape
    close(top[0].data, ref, 0)


def test_argmax_shape_and_errors():
    _, _, top = fwd('type: "ArgMax"', [randn(4, 7)])
    assert top[0].shape == (4, 1, 1)
    _, _, top = fwd('type: "ArgMax" argmax_param { out_max_val: true top_k: 2 }', [randn(2, 3, 2, 2, 2)])
    assert top[0].shape == (2, 2, 2, 1, 1)
    with pytest.raises(ShapeError, match="top_k"):
        fwd('type: "ArgMax" argmax_param { top_k: 8 }', [randn(2, 7)])
    with pytest.raises(ShapeError, match="top_k"):
        fwd('type: "ArgMax" argmax_param { axis: 0 top_k: 3 }', [randn(2, 7)])
    lay = make('type: "ArgMax"')
    assert not lay.allow_force_backward(0)


@pytest.mark.parametrize("param,ref_shape,offsets", [
    ("crop_param { axis: 2 offset: 1 offset: 2 }", (2, 3, 5, 4), (0, 0, 1, 2)),
    ("", (2, 3, 3, 3), (0, 0, 0, 0)),
    ("crop_param { axis: 1 offset: 1 }", (2, 2, 3, 3), (0, 1, 1, 1)),
    ("crop_param { axis: -1 offset: 4 }", (2, 3, 6, 2), (0, 0, 0, 4)),
    ("crop_param { axis: 0 offset: 0 offset: 1 offset: 2 offset: 3 }", (1, 2, 3, 3), (0, 1, 2, 3)),
])
def test_crop_naive(param, ref_shape, offsets):
    x = randn(2, 3, 6, 6)
    ref = randn(*ref_shape)
    lay, bottom, top = fwd('type: "Crop" ' + param, [x, ref])
    assert top[0].shape == ref_shape
    for idx in itertools.product(*[range(d) for d in ref_shape]):
        assert top[0].data[idx] == x[tuple(i + o for i, o in zip(idx, offsets))]
    dy = randn(*ref_shape)
    bwd(lay, top, bottom, [dy])
    dx = np.zeros(x.shape)
    for idx in itertools.product(*[range(d) for d in ref_shape]):
        dx[tuple(i + o for i, o in zip(idx, offsets))] = dy[idx]
    close(bottom[0].diff, dx, 0)
    check_gradient('type: "Crop" ' + param, bottoms=[RNG.standard_normal(x.shape), ref],
                   check_bottoms=[0])


def test_crop_errors():
    with pytest.raises(ShapeError, match="out-of-bounds"):
        fwd('type: "Crop" crop_param { offset: 3 }', [randn(1, 1, 5, 5), randn(1, 1, 3, 3)])
    with pytest.raises(ConfigError, match="number of offset"):
        fwd('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }', [randn(1, 1, 5, 5), randn(1, 1, 3, 3)])


# ---------------------------------------------------------------------------
# BatchReindex / Filter
# ---------------------------------------------------------------------------
def test_batch_reindex_naive_with_repeats():
    x = randn(4, 3, 2)
    idx = np.array([2, 0, 2, 3, 2], np.float32)
    lay, bottom, top = fwd('type: "BatchReindex"', [x, idx])
    assert top[0].shape == (5, 3, 2)
    for j in range(5):
        close(top[0].data[j], x[int(idx[j])], 0)
    dy = randn(5, 3, 2)
    bwd(lay, top, bottom, [dy], propagate=[True, False])
    dx = np.zeros(x.shape)
    for j in range(5):
        dx[int(idx[j])] += dy[j]
    close(bottom[0].diff, dx, 1e-6)
    assert (bottom[0].diff[1] == 0).all()
    check_gradient('type: "BatchReindex"', bottoms=[RNG.standard_normal((4, 2)), idx], check_bottoms=[0])
    assert not lay.allow_force_backward(1)
    with pytest.raises(LayerError, match="index"):
        lay.Backward(top, [True, True], bottom)


@pytest.mark.parametrize("idx,match", [([0, -1], "negative"), ([0, 4], "greater than batch size")])
def test_batch_reindex_bad_index(idx, match):
    with pytest.raises(LayerError, match=match):
        fwd('type: "BatchReindex"', [randn(4, 2), np.array(idx, np.float32)])


def test_filter_naive_and_setup_quirk():
    x, z = randn(5, 3, 2), randn(5, 4)
    sel = np.array([1, 0, 0, 2, 1], np.float32).reshape(5, 1)
    lay = make('type: "Filter"')
    bottom = blobs([x, z, sel])
    top = [Blob(()), Blob(())]
    lay.SetUp(bottom, top)
    assert top[0].shape == (5, 3, 2) and top[1].shape == (5, 4)  # Caffe: full batch at setup
    lay.Forward(bottom, top)
    keep = [0, 3, 4]
    assert top[0].shape == (3, 3, 2) and top[1].shape == (3, 4)
    for j, n in enumerate(keep):
        close(top[0].data[j], x[n], 0)
        close(top[1].data[j], z[n], 0)
    dys = [randn(3, 3, 2), randn(3, 4)]
    bwd(lay, top, bottom, dys, propagate=[True, True, False])
    for b, dy in zip(bottom[:2], dys):
        expect = np.zeros(b.shape)
        for j, n in enumerate(keep):
            expect[n] = dy[j]
        close(b.diff, expect, 0)
    assert lay.allow_force_backward(0) and not lay.allow_force_backward(2)
    with pytest.raises(LayerError, match="selector"):
        lay.Backward(top, [True, True, True], bottom)
    check_gradient('type: "Filter"', bottoms=[RNG.standard_normal((5, 2)), sel.ravel()], check_bottoms=[0])


def test_filter_errors_and_empty_selection():
    with pytest.raises(ShapeError, match="singletons"):
        fwd('type: "Filter"', [randn(3, 2), randn(3, 2)])
    with pytest.raises(ShapeError, match="0th dimension"):
        fwd('type: "Filter"', [randn(3, 2), np.ones(4, np.float32)])
    lay, bottom, top = fwd('type: "Filter"', [randn(3, 2), np.zeros(3, np.float32)])
    assert top[0].shape == (0, 2)
    bwd(lay, top, bottom, [np.zeros((0, 2))], propagate=[True, False])
    assert (bottom[0].diff == 0).all()


# ---------------------------------------------------------------------------
# Bias / Scale
# ---------------------------------------------------------------------------
def broadcast_naive(x, s, axis, op):
    """Loop reference of Bias/Scale: s covers x.shape[axis:axis+s.ndim]."""
    y = np.zeros(x.shape)
    for idx in itertools.product(*[range(d) for d in x.shape]):
        sv = s[idx[axis:axis + s.ndim]] if s.ndim else s[()]
        y[idx] = x[idx] + sv if op == "add" else x[idx] * sv
    return y


def reduce_to(g, x_shape, axis, s_shape):
    out = np.zeros(s_shape)
    for idx in itertools.product(*[range(d) for d in x_shape]):
        out[idx[axis:axis + len(s_shape)]] += g[idx]
    return out


BROADCAST_VARIANTS = [  # (param text, axis used, operand shape for x (2, 3, 4))
    ("", 1, (3,)), ("axis: 0 num_axes: 2", 0, (2, 3)), ("num_axes: 0", 0, ()),
    ("axis: -1", 2, (4,)), ("axis: 1 num_axes: -1", 1, (3, 4)),
]


@pytest.mark.parametrize("param,axis,shape", BROADCAST_VARIANTS)
def test_bias_learned_naive_and_gradient(param, axis, shape):
    x = randn(2, 3, 4)
    text = 'type: "Bias" bias_param { %s filler { type: "gaussian" } }' % param
    lay, bottom, top = fwd(text, [x])
    b = lay.blobs[0].data.copy()
    assert b.shape == shape
    close(top[0].data, broadcast_naive(x, b, axis, "add"), 1e-6)
    dy = randn(*x.shape)
    bwd(lay, top, bottom, [dy])
    close(bottom[0].diff, dy, 0)
    close(lay.blobs[0].diff, reduce_to(dy, x.shape, axis, shape), 1e-5)
    lay.Backward(top, [True], bottom)  # accumulates
    close(lay.blobs[0].diff, 2 * reduce_to(dy, x.shape, axis, shape), 1e-5)
    check_gradient(text, bottom_shapes=[(2, 3, 4)])


def test_bias_default_filler_zero_and_two_bottoms():
    lay, _, _ = fwd('type: "Bias"', [randn(2, 3)])
    assert (lay.blobs[0].data == 0).all()
    x, b = randn(2, 3, 4), randn(3, 4)
    lay, bottom, top = fwd('type: "Bias"', [x, b])
    assert not lay.blobs
    close(top[0].data, broadcast_naive(x, b, 1, "add"), 1e-6)
    dy = randn(2, 3, 4)
    bwd(lay, top, bottom, [dy])
    bottom[1].diff[...] = 99  # bottom diffs are overwritten, not accumulated
    lay.Backward(top, [True, True], bottom)
    close(bottom[1].diff, reduce_to(dy, x.shape, 1, (3, 4)), 1e-5)
    check_gradient('type: "Bias"', bottom_shapes=[(2, 3, 2), (3, 2)])
    check_gradient('type: "Bias" bias_param { axis: 0 }', bottom_shapes=[(2, 3, 2), (2,)])
    with pytest.raises(ShapeError, match="dimension mismatch"):
        fwd('type: "Bias"', [randn(2, 3, 4), randn(4)])


@pytest.mark.parametrize("param,axis,shape", BROADCAST_VARIANTS)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_learned_naive_and_gradient(param, axis, shape, bias_term, engine):
    x = randn(2, 3, 4)
    text = ('type: "Scale" scale_param { %s bias_term: %s filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }' % (param, "true" if bias_term else "false"))
    lay, bottom, top = fwd(text, [x])
    s = lay.blobs[0].data.copy()
    assert s.shape == shape and len(lay.blobs) == (2 if bias_term else 1)
    ref = broadcast_naive(x, s, axis, "mul")
    if bias_term:
        assert lay.blobs[1].shape == shape
        ref = broadcast_naive(ref, lay.blobs[1].data.copy(), axis, "add")
    close(top[0].data, ref, 1e-5)
    dy = randn(*x.shape)
    bwd(lay, top, bottom, [dy])
    close(bottom[0].diff, broadcast_naive(dy, s, axis, "mul"), 1e-5)
    close(lay.blobs[0].diff, reduce_to(dy.astype(np.float64) * x, x.shape, axis, shape), 1e-5)
    if bias_term:
        close(lay.blobs[1].diff, reduce_to(dy, x.shape, axis, shape), 1e-5)
    check_gradient(text, bottom_shapes=[(2, 3, 4)])


def test_scale_defaults_two_bottoms_and_in_place(engine):
    lay, _, top = fwd('type: "Scale" scale_param { bias_term: true }', [randn(2, 3)])
    assert (lay.blobs[0].data == 1).all() and (lay.blobs[1].data == 0).all()
    x, s = randn(2, 3, 4), randn(3)
    lay, bottom, top = fwd('type: "Scale" scale_param { bias_term: true }', [x, s])
    assert len(lay.blobs) == 1 and lay.blobs[0].shape == (3,)
    check_gradient('type: "Scale" scale_param { bias_term: true bias_filler { type: "gaussian" } }',
                   bottom_shapes=[(2, 3, 2), (3,)])
    check_gradient('type: "Scale"', bottom_shapes=[(2, 3, 2), ()])
    check_gradient('type: "Scale" scale_param { axis: 0 }', bottom_shapes=[(2, 3, 2), (2, 3)])
    # in place: same numbers as out of place
    text = 'type: "Scale" scale_param { filler { type: "gaussian" } }'
    lay, bottom, top = fwd(text, [x])
    dy = randn(*x.shape)
    bwd(lay, top, bottom, [dy])
    ref_y, ref_dx, ref_ds = top[0].data.copy(), bottom[0].diff.copy(), lay.blobs[0].diff.copy()
    lay2 = make(text)
    b = blobs([x])[0]
    lay2.SetUp([b], [b])
    lay2.blobs[0].data[...] = lay.blobs[0].data
    lay2.Forward([b], [b])
    close(b.data, ref_y, 0)
    lay2.blobs[0].diff[...] = 0
    b.diff[...] = dy
    lay2.Backward([b], [True], [b])
    close(b.diff, ref_dx, 1e-6)
    close(lay2.blobs[0].diff, ref_ds, 1e-6)


@pytest.mark.parametrize("x_shape,param,accumulates", [
    ((2, 3, 4), "", True),           # outer 2: accumulates
    ((1, 3, 4), "", False),          # outer 1, inner > 1, several scales: Caffe overwrites
    ((1, 3, 4), "num_axes: 0", True),  # a single scale value: accumulates
    ((3, 4), "axis: 0 num_axes: 2", False),  # same count: eltwise product written directly
    ((2, 3), "", True),              # inner 1: accumulates
])
def test_scale_param_diff_accumulation_quirk(x_shape, param, accumulates):
    lay, bottom, top = fwd('type: "Scale" scale_param { %s }' % param, [randn(*x_shape)])
    dy = randn(*x_shape)
    bwd(lay, top, bottom, [dy])
    g = host(lay.blobs[0].diff).copy()
    assert np.abs(g).sum() > 0
    lay.Backward(top, [True], bottom)
    close(lay.blobs[0].diff, 2 * g if accumulates else g, 1e-6)


# ---------------------------------------------------------------------------
# Parameter / Embed
# ---------------------------------------------------------------------------
def test_parameter_layer_shares_blob():
    lay = make('type: "Parameter" parameter_param { shape { dim: 3 dim: 4 } }')
    top = [Blob(())]
    lay.SetUp([], top)
    assert top[0].shape == (3, 4) and lay.blobs[0].shape == (3, 4)
    assert (lay.blobs[0].data == 0).all()
    v = randn(3, 4)
    lay.blobs[0].data[...] = v
    lay.Forward([], top)
    close(top[0].data, v, 0)
    top[0].diff[...] = 2.5
    assert (lay.blobs[0].diff == 2.5).all()


def test_embed_naive_and_gradient():
    idx = np.array([[3, 0, 3], [9, 1, 3]], np.float32)
    text = ('type: "Embed" embed_param { num_output: 4 input_dim: 10 '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    lay, bottom, top = fwd(text, [idx])
    w, b = lay.blobs[0].data.copy(), lay.blobs[1].data.copy()
    assert w.shape == (10, 4) and b.shape == (4,)
    assert top[0].shape == (2, 3, 4)
    for i, j in itertools.product(range(2), range(3)):
        close(top[0].data[i, j], w[int(idx[i, j])] + b, 1e-6)
    dy = randn(2, 3, 4)
    bwd(lay, top, bottom, [dy], propagate=[False])
    dw = np.zeros(w.shape)
    for i, j in itertools.product(range(2), range(3)):
        dw[int(idx[i, j])] += dy[i, j]
    close(lay.blobs[0].diff, dw, 1e-6)
    close(lay.blobs[1].diff, dy.reshape(-1, 4).sum(0), 1e-5)
    assert not lay.allow_force_backward(0)
    with pytest.raises(LayerError, match="backpropagate"):
        lay.Backward(top, [True], bottom)
    check_gradient(text.replace("bias_filler", "bias_term: true bias_filler"), bottoms=[idx], check_bottoms=[])
    check_gradient('type: "Embed" embed_param { num_output: 2 input_dim: 3 bias_term: false '
                   'weight_filler { type: "gaussian" } }', bottoms=[np.array([2, 2, 0])], check_bottoms=[])


@pytest.mark.parametrize("idx,match", [([0.5], "non-integer"), ([10], "out of range"), ([-1], "out of range")])
def test_embed_bad_index(idx, match):
    with pytest.raises(LayerError, match=match):
        fwd('type: "Embed" embed_param { num_output: 2 input_dim: 10 }', [np.array(idx, np.float32)])
