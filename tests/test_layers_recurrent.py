"""RNN, LSTM and LSTMUnit (netlib/builtin/recurrent.py).

* Real-Caffe goldens: the shared RNN_basic / LSTM_basic / LSTMUnit_basic cases
  (through tests/test_golden.py's procedure) and tests/golden/recurrent/*.npz
  (tools/make_recurrent_goldens.py: static input, expose_hidden, resets in
  the middle, T=1, carry-over between passes with N shrinking and growing,
  non-binary cont), forward and backward.
* A Caffe-written caffemodel of an LSTM -> RNN net loads by layer name and
  gives Caffe's outputs.
* Forward against naive references written here, one time step and one
  stream at a time, straight from the equations.
* float64 gradient checks over the variants; for expose_hidden a local
  checker puts the objective on top 0 only, because Caffe deliberately
  ignores the diffs of the exposed final-state tops and gives no gradient to
  the exposed initial states (both checked separately).
* Errors that name the layer.
"""
import glob
import json
import os

import numpy
import pytest

import netlib
import netlib.builtin.recurrent  # noqa: F401  (registers RNN, LSTM, LSTMUnit until the lead wires it)
from netlib.errors import ConfigError, LayerError, ShapeError
from netlib.layer import create_layer
from netlib.blob import Blob
from netlib.testing import check_gradient, _layer_param
from conftest import SHARED
from xp_mode import XP, dev, host

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "recurrent")
CASES = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(GOLDEN, "*.npz"))
               if not p.endswith("lstm_rnn_weights.npz"))
RTOL, ATOL = 1e-4, 1e-5


def assert_close(got, ref, what, rtol=RTOL, atol=ATOL):
    got = numpy.asarray(host(got), dtype=numpy.float64)
    ref = numpy.asarray(ref, dtype=numpy.float64)
    assert got.shape == ref.shape, "%s: shape %s, expected %s" % (what, got.shape, ref.shape)
    tol = rtol * numpy.abs(ref) + atol * max(numpy.abs(ref).max() if ref.size else 0, 1e-3)
    bad = numpy.abs(got - ref) > tol
    assert not bad.any(), "%s: %d of %d differ, worst %.3g" % (what, bad.sum(), bad.size, numpy.abs(got - ref).max())


# ---------------------------------------------------------------------------
# shared real-Caffe golden cases (tests/test_golden.py's procedure)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["RNN_basic", "LSTM_basic", "LSTMUnit_basic"])
def test_shared_golden(case, tmp_path, monkeypatch):
    if not os.path.exists(os.path.join(SHARED, "reference", "golden", "layers", case + ".h5")):
        pytest.skip("needs ../shared/reference/golden")
    import test_golden
    assert case.split("_")[0] in netlib.layer_type_list()
    test_golden.test_golden_case(case, tmp_path, monkeypatch)


# ---------------------------------------------------------------------------
# own real-Caffe goldens
# ---------------------------------------------------------------------------
def _load(case):
    z = numpy.load(os.path.join(GOLDEN, case + ".npz"))
    return {k: z[k] for k in z.files}


def test_golden_cases_exist():
    assert len(CASES) >= 14, CASES


@pytest.mark.parametrize("case", CASES)
def test_caffe_golden(case, tmp_path):
    g = _load(case)
    meta = json.loads(str(g["meta"]))
    path = tmp_path / "net.prototxt"
    path.write_text(str(g["prototxt"]))
    net = netlib.Net(str(path), netlib.TEST)
    params = net.params.get("rec", [])
    n_params = len([k for k in g if k.startswith("params/")])
    assert len(params) == n_params
    for i, p in enumerate(params):
        assert p.data.shape == g["params/%d" % i].shape, "param %d shape (Caffe's order)" % i
        p.data[...] = g["params/%d" % i]
    for k in range(meta["passes"]):
        for b in meta["bottoms"]:
            arr = g["pass%d/bottom/%s" % (k, b)]
            net.blobs[b].reshape(arr.shape)
            net.blobs[b].data[...] = arr
        net.forward()
        for t in meta["tops"]:
            assert_close(net.blobs[t].data, g["pass%d/top/%s" % (k, t)], "%s pass %d top %s" % (case, k, t))
    for p in params:
        p.diff[...] = 0
    for t in meta["tops"]:
        net.blobs[t].diff[...] = g["top_diff/" + t]
    net.backward()
    for b in meta["bottoms"]:
        if b != "cont":
            assert_close(net.blobs[b].diff, g["bottom_diff/" + b], "%s bottom diff %s" % (case, b))
    for i, p in enumerate(params):
        assert_close(p.diff, g["param_diff/%d" % i], "%s param %d diff" % (case, i))


def test_caffe_written_weights_load(tmp_path):
    g = _load("lstm_rnn_weights")
    net = netlib.Net(os.path.join(GOLDEN, "lstm_rnn_weights.prototxt"), netlib.TEST,
                     weights=os.path.join(GOLDEN, "lstm_rnn_weights.caffemodel"))
    assert [p.data.shape for p in net.params["lstm1"]] == [(20, 3), (20,), (20, 5)]
    assert [p.data.shape for p in net.params["rnn1"]] == [(3, 5), (3,), (3, 2), (3, 3), (3, 3), (3,)]
    for name in ("lstm1", "rnn1"):
        for i, p in enumerate(net.params[name]):
            numpy.testing.assert_array_equal(host(p.data), g["params/%s/%d" % (name, i)])
    for b in ("x", "cont", "x_static"):
        net.blobs[b].data[...] = g[b]
    net.forward()
    for t in ("lstm1", "rnn1", "ip"):
        assert_close(net.blobs[t].data, g["top/" + t], "top " + t)


# ---------------------------------------------------------------------------
# naive references (one step, one stream at a time)
# ---------------------------------------------------------------------------
def _sig(v):
    return 1.0 / (1.0 + numpy.exp(-v))


def rnn_reference(x, cont, p, h0, xs=None):
    """h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_s x_s]); o_t = tanh(W_ho h_t + b_o)."""
    T, N = cont.shape
    W_xh, b_h = p[0], p[1]
    rest = p[2:]
    if xs is not None:
        W_s, rest = rest[0], rest[1:]
    W_hh, W_ho, b_o = rest
    o = numpy.zeros((T, N, W_hh.shape[0]))
    h_last = numpy.zeros((N, W_hh.shape[0]))
    for n in range(N):
        h = h0[n].copy()
        for t in range(T):
            a = W_hh.dot(cont[t, n] * h) + W_xh.dot(x[t, n].ravel()) + b_h
            if xs is not None:
                a = a + W_s.dot(xs[n].ravel())
            h = numpy.tanh(a)
            o[t, n] = numpy.tanh(W_ho.dot(h) + b_o)
        h_last[n] = h
    return o, h_last


def lstm_reference(x, cont, p, h0, c0, xs=None):
    """Gates [i, f, o, g] = W_hc (cont h) + W_xc x + b_c [+ W_s x_s]; c = cont*f*c + i*g; h = o*tanh(c)."""
    T, N = cont.shape
    W_xc, b_c, W_hc = p[0], p[1], p[-1]
    H = W_hc.shape[1]
    out = numpy.zeros((T, N, H))
    h_last, c_last = numpy.zeros((N, H)), numpy.zeros((N, H))
    for n in range(N):
        h, c = h0[n].copy(), c0[n].copy()
        for t in range(T):
            a = W_hc.dot(cont[t, n] * h) + W_xc.dot(x[t, n].ravel()) + b_c
            if xs is not None:
                a = a + p[2].dot(xs[n].ravel())
            i, f, o, g = _sig(a[:H]), _sig(a[H:2 * H]), _sig(a[2 * H:3 * H]), numpy.tanh(a[3 * H:])
            c = cont[t, n] * f * c + i * g
            h = o * numpy.tanh(c)
            out[t, n] = h
        h_last[n], c_last[n] = h, c
    return out, h_last, c_last


def _make(text, bottoms, dtype=numpy.float64):
    param = _layer_param(text)
    bot = []
    for a in bottoms:
        b = Blob(numpy.shape(a), dtype=dtype, xp=XP)
        b.data[...] = a
        bot.append(b)
    top = [Blob((), dtype=dtype, xp=XP) for _ in range(max(len(param.top), 1))]
    lay = create_layer(param, dtype=dtype, xp=XP)
    lay.SetUp(bot, top)
    return lay, bot, top


def _text(kind, H, expose=False, static=False):
    states = (["h_0"] if kind == "RNN" else ["h_0", "c_0"]) if expose else []
    finals = (["h_T"] if kind == "RNN" else ["h_T", "c_T"]) if expose else []
    bottoms = ["x", "cont"] + (["x_static"] if static else []) + states
    tops = ["y"] + finals
    return ('name: "rec" type: "%s" %s %s recurrent_param { num_output: %d expose_hidden: %s '
            'weight_filler { type: "uniform" min: -0.7 max: 0.7 } bias_filler { type: "uniform" min: -0.5 max: 0.5 } }'
            % (kind, " ".join('bottom: "%s"' % b for b in bottoms), " ".join('top: "%s"' % t for t in tops),
               H, "true" if expose else "false"))


VARIANTS = [  # (T, N, x trailing shape, expose, static, cont)
    (4, 2, (3,), False, False, [[0, 0], [1, 1], [0, 1], [1, 1]]),
    (4, 2, (3,), False, True, [[0, 0], [1, 1], [1, 0], [1, 1]]),
    (1, 3, (2, 2), False, False, [[0, 0, 0]]),
    (3, 2, (3,), True, False, [[1, 0], [1, 1], [0, 1]]),
    (3, 3, (2,), True, True, [[1, 1, 0], [0, 1, 1], [1, 0, 1]]),
    (1, 3, (2,), True, True, [[1, 0, 1]]),
]
VARIANT_IDS = ["T%dN%d%s%s" % (v[0], v[1], "_expose" if v[3] else "", "_static" if v[4] else "") for v in VARIANTS]


def _variant_bottoms(kind, H, T, N, trail, expose, static, cont, rng):
    bottoms = [rng.uniform(-1, 1, (T, N) + trail), numpy.array(cont, dtype=numpy.float64)]
    if static:
        bottoms.append(rng.uniform(-1, 1, (N, 2)))
    if expose:
        bottoms += [rng.uniform(-1, 1, (1, N, H)) for _ in range(1 if kind == "RNN" else 2)]
    return bottoms


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_forward_against_naive_reference(kind, variant):
    T, N, trail, expose, static, cont = variant
    H = 3
    rng = numpy.random.default_rng(3)
    bottoms = _variant_bottoms(kind, H, T, N, trail, expose, static, cont, rng)
    lay, bot, top = _make(_text(kind, H, expose, static), bottoms)
    p = [host(b.data).copy() for b in lay.blobs]
    xs = bottoms[2] if static else None
    off = 3 if static else 2
    zeros = numpy.zeros((N, H))
    for pass_no in range(2):  # the second pass starts from the first's final state (no expose_hidden)
        lay.Forward(bot, top)
        if expose:
            h0 = bottoms[off][0]
            c0 = bottoms[off + 1][0] if kind == "LSTM" else None
        elif pass_no == 0:
            h0, c0 = zeros, zeros
        if kind == "RNN":
            ref, h_last = rnn_reference(bottoms[0], bottoms[1], p, h0, xs)
            finals = [h_last]
        else:
            ref, h_last, c_last = lstm_reference(bottoms[0], bottoms[1], p, h0, c0, xs)
            finals = [h_last, c_last]
        assert_close(top[0].data, ref, "%s output pass %d" % (kind, pass_no), rtol=1e-10, atol=1e-12)
        if expose:
            for t, f in zip(top[1:], finals):
                assert_close(t.data, f[None], "%s final state" % kind, rtol=1e-10, atol=1e-12)
        else:
            h0 = finals[0]
            c0 = finals[1] if kind == "LSTM" else None
            bot[1].data[0] = 1  # next pass continues the sequences
            bottoms[1] = host(bot[1].data).copy()


def test_rnn_param_shapes_and_reset():
    rng = numpy.random.default_rng(0)
    lay, bot, top = _make(_text("RNN", 4, static=True), [rng.normal(size=(2, 3, 5)), numpy.ones((2, 3)),
                                                        rng.normal(size=(3, 6))])
    assert [b.shape for b in lay.blobs] == [(4, 5), (4,), (4, 6), (4, 4), (4, 4), (4,)]
    lay.Forward(bot, top)
    first = host(top[0].data).copy()
    lay.Forward(bot, top)
    assert not numpy.allclose(first, host(top[0].data))  # the state carried over
    lay.reset()
    lay.Forward(bot, top)
    numpy.testing.assert_allclose(first, host(top[0].data))


def test_lstm_param_shapes():
    lay, _, _ = _make(_text("LSTM", 3, static=True), [numpy.zeros((2, 4, 5)), numpy.ones((2, 4)),
                                                      numpy.zeros((4, 2, 3))])
    assert [b.shape for b in lay.blobs] == [(12, 5), (12,), (12, 6), (12, 3)]


def test_lstm_unit_against_naive_reference():
    rng = numpy.random.default_rng(5)
    N, D = 4, 3
    c_prev, X = rng.normal(size=(1, N, D)), 2 * rng.normal(size=(1, N, 4 * D))
    cont = numpy.array([[1, 0, 0.5, 1]])
    lay, bot, top = _make('type: "LSTMUnit" top: "c" top: "h"', [c_prev, X, cont])
    lay.Forward(bot, top)
    for n in range(N):
        for d in range(D):
            i, f = _sig(X[0, n, d]), cont[0, n] * _sig(X[0, n, D + d])
            o, g = _sig(X[0, n, 2 * D + d]), numpy.tanh(X[0, n, 3 * D + d])
            c = f * c_prev[0, n, d] + i * g
            assert abs(top[0].data[0, n, d] - c) < 1e-12
            assert abs(top[1].data[0, n, d] - o * numpy.tanh(c)) < 1e-12


# ---------------------------------------------------------------------------
# gradient checks (float64)
# ---------------------------------------------------------------------------
def _local_gradient_check(text, bottoms, check_bottoms, step=1e-5, threshold=1e-6):
    """Centred differences of f = sum(top0 * R) w.r.t. the listed bottoms and
    every parameter; the exposed final-state tops get zero weight."""
    lay, bot, top = _make(text, bottoms)
    snapshot = [b.data.copy() for b in lay.blobs]
    rng = numpy.random.default_rng(11)
    lay.Forward(bot, top)
    R = dev(rng.normal(size=top[0].shape))

    def f():
        for b, s in zip(lay.blobs, snapshot):
            b.data[...] = s
        lay.Forward(bot, top)
        return float((top[0].data * R).sum())

    f()
    for b in lay.blobs:
        b.diff[...] = 0
    top[0].diff[...] = R
    for t in top[1:]:
        t.diff[...] = rng.normal(size=t.shape)  # Caffe ignores these
    for b in bot:
        b.diff[...] = 123.0
    propagate = [i != 1 for i in range(len(bot))]
    lay.Backward(top, propagate, bot)
    targets = [(bot[i].data, host(bot[i].diff).copy()) for i in check_bottoms]
    targets += [(s, host(b.diff).copy()) for s, b in zip(snapshot, lay.blobs)]
    worst = 0.0
    for data, ana in targets:
        flat, a = data.reshape(-1), ana.reshape(-1)
        for k in range(flat.size):
            x0 = flat[k]
            flat[k] = x0 + step
            fp = f()
            flat[k] = x0 - step
            fm = f()
            flat[k] = x0
            num = (fp - fm) / (2 * step)
            worst = max(worst, abs(num - a[k]) / max(abs(num), abs(a[k]), 1.0))
    assert worst < threshold, worst
    return lay, bot


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_gradient(kind, variant):
    T, N, trail, expose, static, cont = variant
    H = 3 if kind == "RNN" else 2
    rng = numpy.random.default_rng(7)
    bottoms = _variant_bottoms(kind, H, T, N, trail, expose, static, cont, rng)
    text = _text(kind, H, expose, static)
    data_bottoms = [0, 2] if static else [0]
    if not expose:
        # cont[0] == 0 everywhere, so the carried state does not affect the checker's repeated passes.
        check_gradient(text, bottoms=bottoms, check_bottoms=data_bottoms, step=1e-4, threshold=1e-6)
        return
    lay, bot = _local_gradient_check(text, bottoms, data_bottoms)
    off = 3 if static else 2
    for b in bot[off:]:  # Caffe gives the exposed initial states no gradient
        assert not b.diff.any()


@pytest.mark.parametrize("cont", [[1, 1, 1], [1, 0, 1], [0, 0, 0]])
def test_lstm_unit_gradient(cont):
    rng = numpy.random.default_rng(2)
    bottoms = [rng.normal(size=(1, 3, 2)), 2 * rng.normal(size=(1, 3, 8)), numpy.array([cont], float)]
    check_gradient('type: "LSTMUnit" top: "c" top: "h"', bottoms=bottoms, check_bottoms=[0, 1],
                   step=1e-4, threshold=1e-6)


def test_lstm_unit_cont_zero_cuts_state_gradient():
    rng = numpy.random.default_rng(4)
    lay, bot, top = _make('type: "LSTMUnit" top: "c" top: "h"',
                          [rng.normal(size=(1, 2, 3)), rng.normal(size=(1, 2, 12)), numpy.array([[0, 1]], float)])
    lay.Forward(bot, top)
    top[0].diff[...] = 1
    top[1].diff[...] = 1
    lay.Backward(top, [True, True, False], bot)
    assert not bot[0].diff[0, 0].any() and bot[0].diff[0, 1].all()
    assert not bot[1].diff[0, 0, 3:6].any()  # forget-gate gradient of the cut stream


def test_exposed_final_state_diffs_are_ignored():
    rng = numpy.random.default_rng(8)
    bottoms = _variant_bottoms("LSTM", 2, 3, 2, (3,), True, False, [[1, 1], [1, 0], [1, 1]], rng)
    grads, params = [], None
    for scale in (0.0, 5.0):
        lay, bot, top = _make(_text("LSTM", 2, expose=True), bottoms)
        params = params or [b.data.copy() for b in lay.blobs]
        for b, v in zip(lay.blobs, params):
            b.data[...] = v
        lay.Forward(bot, top)
        top[0].diff[...] = 1
        top[1].diff[...] = scale
        top[2].diff[...] = scale
        lay.Backward(top, [True, False, True, True], bot)
        grads.append([host(bot[0].diff).copy()] + [host(b.diff).copy() for b in lay.blobs])
    for a, b in zip(*grads):
        numpy.testing.assert_array_equal(a, b)


def test_param_gradients_accumulate():
    rng = numpy.random.default_rng(9)
    bottoms = [rng.normal(size=(2, 2, 3)), numpy.array([[0, 0], [1, 1]], float)]
    lay, bot, top = _make(_text("RNN", 2), bottoms)
    lay.Forward(bot, top)
    top[0].diff[...] = 1
    for b in lay.blobs:
        b.diff[...] = 0
    lay.Backward(top, [True, False], bot)
    once = [host(b.diff).copy() for b in lay.blobs]
    lay.Backward(top, [True, False], bot)
    for a, b in zip(once, lay.blobs):
        numpy.testing.assert_allclose(host(b.diff), 2 * a)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def _expect(text, bottoms, error, words):
    with pytest.raises(error) as info:
        _make(text, bottoms)
    msg = str(info.value)
    assert "'rec'" in msg or "LSTMUnit" in msg, msg
    for w in words:
        assert w in msg, msg


def test_errors():
    x, cont = numpy.zeros((3, 2, 4)), numpy.ones((3, 2))
    _expect('name: "rec" type: "LSTM" bottom: "x" top: "h" recurrent_param { num_output: 2 }', [x],
            ConfigError, ["cont", "missing"])
    _expect(_text("RNN", 0), [x, cont], ConfigError, ["num_output"])
    _expect(_text("RNN", 2), [x, numpy.ones((3, 3))], ShapeError, ["cont", "(3, 2)"])
    _expect(_text("LSTM", 2), [x, numpy.ones((2, 2))], ShapeError, ["cont"])
    _expect(_text("LSTM", 2), [x, numpy.ones(6)], ShapeError, ["cont"])
    _expect(_text("RNN", 2), [numpy.zeros((3, 2)), numpy.ones((3, 2))], ShapeError, ["at least 3 axes"])
    _expect(_text("RNN", 2, static=True), [x, cont, numpy.zeros(2)], ShapeError, ["x_static", "2 axes"])
    _expect(_text("LSTM", 2, static=True), [x, cont, numpy.zeros((3, 4))], ShapeError, ["x_static"])
    _expect(_text("RNN", 2, expose=True), [x, cont, numpy.zeros((1, 2, 3))], ShapeError, ["h_0", "(1, 2, 2)"])
    _expect(_text("LSTM", 2, expose=True), [x, cont, numpy.zeros((1, 2, 2))], ConfigError, ["c_0"])
    _expect(_text("LSTM", 2, expose=True), [x, cont, numpy.zeros((1, 2, 2)), numpy.zeros((2, 2))],
            ShapeError, ["c_0"])
    _expect('name: "rec" type: "LSTMUnit" top: "c" top: "h"',
            [numpy.zeros((1, 2, 3)), numpy.zeros((1, 2, 10)), numpy.ones((1, 2))], ShapeError, ["4 * D"])
    _expect('name: "rec" type: "LSTMUnit" top: "c" top: "h"',
            [numpy.zeros((1, 2, 3)), numpy.zeros((1, 3, 12)), numpy.ones((1, 2))], ShapeError, ["same N"])


def test_timestep_change_and_cont_backward_refused():
    lay, bot, top = _make(_text("RNN", 2), [numpy.zeros((3, 2, 4)), numpy.ones((3, 2))])
    assert not lay.allow_force_backward(1) and lay.allow_force_backward(0)
    bot[0].reshape((4, 2, 4))
    bot[1].reshape((4, 2))
    with pytest.raises(ShapeError, match="timesteps"):
        lay.Forward(bot, top)
    bot[0].reshape((3, 5, 4))
    bot[1].reshape((3, 5))
    lay.Forward(bot, top)  # N may change
    assert top[0].shape == (3, 5, 2)
    with pytest.raises(LayerError, match="cont"):
        lay.Backward(top, [True, True], bot)
