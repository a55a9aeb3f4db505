"""Neuron layers: naive per-element references, gradient checks, in-place
behaviour, Dropout statistics, error messages and the real-Caffe goldens."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.errors import ConfigError, LayerError, ShapeError
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from netlib.random import set_random_seed
from netlib.testing import check_gradient
from xp_mode import XP, host

RNG = np.random.default_rng(20240611)


def make(text, phase="TEST", dtype=np.float32):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = "under_test"
    ph = caffe_pb2.TRAIN if phase == "TRAIN" else caffe_pb2.TEST
    return create_layer(lp, phase=ph, dtype=dtype, xp=XP)


def run(text, x, dy=None, in_place=False, phase="TEST", params=None, seed=None):
    """Forward (and backward if dy is given) on a float32 blob; returns
    (layer, top, bottom_diff or None)."""
    lay = make(text, phase)
    b = Blob(x.shape)
    b.data[...] = x
    t = b if in_place else Blob(())
    lay.SetUp([b], [t])
    if params is not None:
        for blob, p in zip(lay.blobs, params):
            blob.data[...] = p
    if seed is not None:
        set_random_seed(seed)
    lay.Forward([b], [t])
    y = host(t.data).copy()
    if dy is None:
        return lay, y, None
    for p in lay.blobs:
        p.diff[...] = 0
    t.diff[...] = dy
    lay.Backward([t], [True], [b])
    return lay, y, host(b.diff).copy()


def elementwise(fn, x):
    return np.array([fn(float(v)) for v in x.ravel()], dtype=np.float64).reshape(x.shape)


def sample(shape=(2, 3, 4, 5), scale=2.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def assert_close(got, ref, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(host(got), np.float64), ref, rtol=rtol, atol=atol)


def sigmoid_ref(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


# --------------------------------------------------------------------------
# naive references: (prototxt, forward(v), derivative(v, y))
# --------------------------------------------------------------------------
def _power_ref(power, scale, shift):
    def f(v):
        return (shift + scale * v) ** power

    def d(v, y):
        if power * scale == 0:
            return 0.0
        return power * scale * (shift + scale * v) ** (power - 1)
    return f, d


def _exp_ref(base, scale, shift):
    lb = 1.0 if base == -1 else math.log(base)

    def f(v):
        return math.exp(lb * (shift + scale * v))
    return f, (lambda v, y: lb * scale * math.exp(lb * (shift + scale * v)))


def _log_ref(base, scale, shift):
    lb = 1.0 if base == -1 else math.log(base)
    return (lambda v: math.log(shift + scale * v) / lb), (lambda v, y: scale / ((shift + scale * v) * lb))


def _swish_ref(beta):
    def d(v, y):
        s = sigmoid_ref(beta * v)
        return s + beta * v * s * (1 - s)
    return (lambda v: v * sigmoid_ref(beta * v)), d


CASES = {
    "relu": ('type: "ReLU"', lambda v: max(v, 0.0), lambda v, y: 1.0 if v > 0 else 0.0),
    "relu_slope": ('type: "ReLU" relu_param { negative_slope: 0.1 }',
                   lambda v: v if v > 0 else 0.1 * v, lambda v, y: 1.0 if v > 0 else 0.1),
    "relu_slope_big": ('type: "ReLU" relu_param { negative_slope: 1.5 }',
                       lambda v: v if v > 0 else 1.5 * v, lambda v, y: 1.0 if v > 0 else 1.5),
    "sigmoid": ('type: "Sigmoid"', sigmoid_ref, lambda v, y: sigmoid_ref(v) * (1 - sigmoid_ref(v))),
    "tanh": ('type: "TanH"', math.tanh, lambda v, y: 1 - math.tanh(v) ** 2),
    "absval": ('type: "AbsVal"', abs, lambda v, y: (v > 0) - (v < 0)),
    "bnll": ('type: "BNLL"', lambda v: math.log1p(math.exp(v)) if v < 30 else v + math.log1p(math.exp(-v)),
             lambda v, y: sigmoid_ref(v)),
    "elu": ('type: "ELU"', lambda v: v if v > 0 else math.exp(v) - 1,
            lambda v, y: 1.0 if v > 0 else math.exp(v)),
    "elu_alpha": ('type: "ELU" elu_param { alpha: 0.5 }', lambda v: v if v > 0 else 0.5 * (math.exp(v) - 1),
                  lambda v, y: 1.0 if v > 0 else 0.5 * math.exp(v)),
    "exp": ('type: "Exp"',) + _exp_ref(-1, 1, 0),
    "exp_base2": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }',) + _exp_ref(2.0, 0.5, 1.0),
    "power_square": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',) + _power_ref(2, 0.5, 1),
    "power_linear": ('type: "Power" power_param { power: 1 scale: -2 shift: 0.5 }',) + _power_ref(1, -2, 0.5),
    "power_cube": ('type: "Power" power_param { power: 3 scale: 1.5 }',) + _power_ref(3, 1.5, 0),
    "power_zero": ('type: "Power" power_param { power: 0 scale: 2 shift: 1 }', lambda v: 1.0, lambda v, y: 0.0),
    "power_scale0": ('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', lambda v: 8.0,
                     lambda v, y: 0.0),
    "clip": ('type: "Clip" clip_param { min: -0.5 max: 0.8 }', lambda v: max(-0.5, min(v, 0.8)),
             lambda v, y: 1.0 if -0.5 <= v <= 0.8 else 0.0),
    "swish": ('type: "Swish"',) + _swish_ref(1.0),
    "swish_beta": ('type: "Swish" swish_param { beta: 2.5 }',) + _swish_ref(2.5),
}

# Layers whose reference needs a positive argument (shift + scale * x > 0).
POSITIVE_CASES = {
    "log": ('type: "Log"',) + _log_ref(-1, 1, 0),
    "log_base10": ('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }',) + _log_ref(10.0, 2.0, 0.5),
    "power_sqrt": ('type: "Power" power_param { power: 0.5 scale: 1 shift: 3 }',) + _power_ref(0.5, 1, 3),
    "power_general": ('type: "Power" power_param { power: -1.5 scale: 2 shift: 0.5 }',)
    + _power_ref(-1.5, 2, 0.5),
}
ALL_CASES = dict(CASES, **POSITIVE_CASES)


def case_input(name, shape=(2, 3, 4, 5)):
    if name in POSITIVE_CASES:
        return (np.abs(RNG.standard_normal(shape)) + 0.2).astype(np.float32)
    return sample(shape)


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_forward_backward_match_naive_reference(name, engine):
    text, f, d = ALL_CASES[name]
    x = case_input(name)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    _, y, dx = run(text, x, dy)
    ref = elementwise(f, x)
    assert_close(y, ref, rtol=2e-5, atol=1e-6)
    deriv = np.array([d(float(v), 0.0) for v in x.ravel()]).reshape(x.shape)
    assert_close(dx, dy.astype(np.float64) * deriv, rtol=1e-4, atol=1e-5)


def test_threshold_forward_matches_reference():
    x = sample()
    x.ravel()[:3] = [0.3, 0.30000001, -1]
    _, y, _ = run('type: "Threshold" threshold_param { threshold: 0.3 }', x)
    assert_close(y, elementwise(lambda v: 1.0 if v > np.float32(0.3) else 0.0, x))
    _, y0, _ = run('type: "Threshold"', x)
    assert_close(y0, (x > 0).astype(np.float64))


def test_prelu_forward_backward_match_reference():
    x = sample((2, 3, 4, 2))
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    a = np.array([0.25, -0.5, 1.5], np.float32)
    lay, y, dx = run('type: "PReLU"', x, dy, params=[a])
    ref = np.empty(x.shape)
    ref_dx = np.empty(x.shape)
    ref_da = np.zeros(3)
    for n in range(2):
        for c in range(3):
            for h in range(4):
                for w in range(2):
                    v, g = float(x[n, c, h, w]), float(dy[n, c, h, w])
                    ref[n, c, h, w] = v if v > 0 else a[c] * v
                    ref_dx[n, c, h, w] = g if v > 0 else a[c] * g
                    if v <= 0:
                        ref_da[c] += g * v
    assert_close(y, ref)
    assert_close(dx, ref_dx)
    assert_close(lay.blobs[0].diff, ref_da, rtol=1e-5, atol=1e-5)


def test_prelu_parameter_gradient_accumulates():
    x = sample((2, 3, 4))
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    lay, _, _ = run('type: "PReLU"', x, dy)
    once = host(lay.blobs[0].diff).copy()
    assert np.abs(once).sum() > 0
    b, t = Blob(x.shape), Blob(x.shape)
    b.data[...] = x
    lay.Forward([b], [t])
    t.diff[...] = dy
    lay.Backward([t], [True], [b])  # param diff is not zeroed: it adds up (Caffe)
    np.testing.assert_allclose(host(lay.blobs[0].diff), 2 * once, rtol=1e-6)


def test_prelu_default_filler_and_shared_shape():
    lay, _, _ = run('type: "PReLU"', sample((2, 4, 3)))
    assert lay.blobs[0].shape == (4,)
    np.testing.assert_array_equal(host(lay.blobs[0].data), np.full(4, 0.25, np.float32))
    lay, y, _ = run('type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: 0.1 } }',
                    np.array([[-1.0, 2.0], [-3.0, 4.0]], np.float32))
    assert lay.blobs[0].shape == ()  # Caffe: a 0-axis blob
    assert_close(y, [[-0.1, 2.0], [-0.3, 4.0]])


def test_prelu_refuses_one_axis_bottom():
    with pytest.raises(ShapeError, match="under_test"):
        run('type: "PReLU"', sample((5,)))


def test_prelu_channel_mismatch_on_reshape():
    lay = make('type: "PReLU"')
    b, t = Blob((2, 3, 4)), Blob(())
    lay.SetUp([b], [t])
    b.reshape(2, 5, 4)
    with pytest.raises(ShapeError, match="3 values for 5 channels"):
        lay.Forward([b], [t])


# --------------------------------------------------------------------------
# gradient checks (float64, numerical)
# --------------------------------------------------------------------------
GRAD_VARIANTS = [
    ('type: "ReLU"', dict(kink=0.0, kink_range=0.01)),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', dict(kink=0.0, kink_range=0.01)),
    ('type: "ReLU" relu_param { negative_slope: -0.3 }', dict(kink=0.0, kink_range=0.01)),
    ('type: "ReLU" relu_param { negative_slope: 1.5 }', dict(kink=0.0, kink_range=0.01)),
    ('type: "Sigmoid"', {}),
    ('type: "TanH"', {}),
    ('type: "AbsVal"', dict(kink=0.0, kink_range=0.01)),
    ('type: "BNLL"', {}),
    ('type: "ELU"', {}),
    ('type: "ELU" elu_param { alpha: 0.5 }', dict(kink=0.0, kink_range=0.01)),
    ('type: "Exp"', {}),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', {}),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', {}),
    ('type: "Power" power_param { power: 3 scale: 1.5 }', {}),
    ('type: "Power" power_param { power: 1 scale: -2 shift: 0.5 }', {}),
    ('type: "Power" power_param { power: 0 scale: 2 shift: 1 }', {}),
    ('type: "Clip" clip_param { min: -0.5 max: 0.8 }', {}),
    ('type: "Swish"', {}),
    ('type: "Swish" swish_param { beta: 2.5 }', {}),
    ('type: "Dropout"', dict(phase="TEST")),
]


@pytest.mark.parametrize("text,kw", GRAD_VARIANTS, ids=[t for t, _ in GRAD_VARIANTS])
def test_gradient(text, kw, engine):
    res = check_gradient(text, bottom_shapes=[(2, 3, 4)], **kw)
    assert res.checked > 0


@pytest.mark.parametrize("text", [
    'type: "Log"',
    'type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }',
    'type: "Power" power_param { power: 0.5 scale: 1 shift: 3 }',
    'type: "Power" power_param { power: -1.5 scale: 2 shift: 0.5 }',
])
def test_gradient_positive_domain(text):
    x = np.abs(RNG.standard_normal((2, 3, 4))) + 0.3
    res = check_gradient(text, bottoms=[x])
    assert res.checked == x.size


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_dropout_train_gradient(ratio):
    res = check_gradient('type: "Dropout" dropout_param { dropout_ratio: %g }' % ratio,
                         bottom_shapes=[(3, 4, 5)], phase="TRAIN")
    assert res.checked == 60


@pytest.mark.parametrize("text", [
    'type: "PReLU"',
    'type: "PReLU" prelu_param { channel_shared: true }',
    'type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }',
])
def test_prelu_gradient_including_parameter(text):
    res = check_gradient(text, bottom_shapes=[(2, 3, 3, 2)], kink=0.0, kink_range=0.01)
    assert res.checked >= 36 + 1


def test_gradient_check_detects_a_wrong_backward(monkeypatch):
    """The checker really looks at our backward (a test that cannot fail is a defect)."""
    from netlib.builtin import neuron
    monkeypatch.setattr(neuron.TanHLayer, "backward",
                        lambda self, top, pd, bottom: bottom[0].diff.__setitem__(Ellipsis, top[0].diff))
    with pytest.raises(AssertionError):
        check_gradient('type: "TanH"', bottom_shapes=[(2, 3)])


# --------------------------------------------------------------------------
# in-place computation
# --------------------------------------------------------------------------
IN_PLACE = [
    'type: "ReLU"',
    'type: "ReLU" relu_param { negative_slope: 0.2 }',
    'type: "Sigmoid"',
    'type: "TanH"',
    'type: "ELU" elu_param { alpha: 0.7 }',
    'type: "Exp" exp_param { base: 3 scale: 0.5 }',
    'type: "Swish" swish_param { beta: 1.5 }',
    'type: "BNLL"',
    'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
    'type: "Power" power_param { power: 3 scale: 2 }',
    'type: "Clip" clip_param { min: -0.5 max: 0.8 }',
    'type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
    'type: "Threshold"',
]


@pytest.mark.parametrize("text", IN_PLACE)
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_in_place_matches_out_of_place(text, phase, engine):
    x = sample()
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    backward = "Threshold" not in text
    _, y1, dx1 = run(text, x, dy if backward else None, phase=phase, seed=7)
    _, y2, dx2 = run(text, x, dy if backward else None, in_place=True, phase=phase, seed=7)
    np.testing.assert_array_equal(y1, y2)
    if backward:
        np.testing.assert_allclose(dx1, dx2, rtol=1e-6, atol=1e-7)


def test_in_place_log_keeps_input():
    x = (np.abs(RNG.standard_normal((3, 4))) + 0.5).astype(np.float32)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    text = 'type: "Log" log_param { base: 2 scale: 3 shift: 0.25 }'
    _, y1, dx1 = run(text, x, dy)
    _, y2, dx2 = run(text, x, dy, in_place=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-6)


def test_in_place_prelu_keeps_bottom_copy():
    x = sample((2, 3, 4))
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    a = [np.array([0.1, -0.4, 0.9], np.float32)]
    l1, y1, dx1 = run('type: "PReLU"', x, dy, params=a)
    l2, y2, dx2 = run('type: "PReLU"', x, dy, params=a, in_place=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-6)
    np.testing.assert_allclose(host(l1.blobs[0].diff), host(l2.blobs[0].diff), rtol=1e-6)


def test_relu_in_place_negative_slope_quirk_kept(engine):
    """Caffe reads the overwritten bottom in place: with a negative slope a
    negative input becomes positive and then gets gradient 1, as in Caffe."""
    x = np.array([-2.0, 3.0], np.float32)
    _, _, dx = run('type: "ReLU" relu_param { negative_slope: -0.5 }', x, np.ones(2, np.float32),
                   in_place=True)
    np.testing.assert_array_equal(dx, [1.0, 1.0])
    _, _, dx = run('type: "ReLU" relu_param { negative_slope: -0.5 }', x, np.ones(2, np.float32))
    np.testing.assert_array_equal(dx, [-0.5, 1.0])


def test_absval_refuses_in_place():
    with pytest.raises(ConfigError, match="in-place"):
        run('type: "AbsVal"', sample(), in_place=True)


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.8])
def test_dropout_train_statistics_and_scaling(ratio):
    x = (np.abs(RNG.standard_normal((50, 40, 50))) + 0.1).astype(np.float32)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    _, y, dx = run('type: "Dropout" dropout_param { dropout_ratio: %g }' % ratio, x, dy,
                   phase="TRAIN", seed=3)
    kept = y != 0
    n = x.size
    rate = kept.mean()
    sigma = math.sqrt(ratio * (1 - ratio) / n)
    assert abs(rate - (1 - ratio)) < 5 * sigma
    scale = np.float32(1.0 / (1.0 - ratio))
    np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-6)
    # backward uses the same mask and scale
    np.testing.assert_allclose(dx[kept], dy[kept] * scale, rtol=1e-6)
    assert not dx[~kept].any()
    # expected value preserved
    assert abs(y.mean() / x.mean() - 1) < 0.02


def test_dropout_test_phase_is_identity():
    x = sample()
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    _, y, dx = run('type: "Dropout" dropout_param { dropout_ratio: 0.7 }', x, dy, phase="TEST")
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


def test_dropout_is_reproducible_with_seed_and_varies_without():
    x = np.ones((20, 30), np.float32)
    _, a, _ = run('type: "Dropout"', x, phase="TRAIN", seed=11)
    _, b, _ = run('type: "Dropout"', x, phase="TRAIN", seed=11)
    _, c, _ = run('type: "Dropout"', x, phase="TRAIN", seed=12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_dropout_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="dropout_ratio"):
        run('type: "Dropout" dropout_param { dropout_ratio: %g }' % ratio, sample(), phase="TRAIN")


# --------------------------------------------------------------------------
# Caffe quirks and errors
# --------------------------------------------------------------------------
def test_sigmoid_is_caffes_tanh_form_in_float32():
    x = sample((1000,), scale=6)
    _, y, _ = run('type: "Sigmoid"', x)
    expected = (np.float32(0.5) * np.tanh(np.float32(0.5) * x) + np.float32(0.5)).astype(np.float32)
    np.testing.assert_allclose(y, expected, rtol=0, atol=6e-8)


def test_power_shift_zero_gradient_at_zero_is_nan_like_caffe():
    x = np.array([0.0, 2.0], np.float32)
    _, y, dx = run('type: "Power" power_param { power: 3 }', x, np.ones(2, np.float32))
    np.testing.assert_array_equal(y, [0.0, 8.0])
    assert math.isnan(dx[0]) and dx[1] == pytest.approx(12.0)


def test_clip_min_above_max_gives_min():
    _, y, _ = run('type: "Clip" clip_param { min: 1 max: -1 }', np.array([-3.0, 0.0, 3.0], np.float32))
    np.testing.assert_array_equal(y, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("param,missing", [("min: 0", "max"), ("max: 1", "min"), ("", "min, max")])
def test_clip_requires_min_and_max(param, missing):
    with pytest.raises(ConfigError, match="missing: %s" % missing) as err:
        run('name: "clip1" type: "Clip" clip_param { %s }' % param, sample())
    assert "clip1" in str(err.value) and "Clip" in str(err.value)


def test_clip_without_clip_param_is_refused():
    with pytest.raises(ConfigError):
        run('type: "Clip"', sample())


@pytest.mark.parametrize("text", ['type: "Exp" exp_param { base: -2 }', 'type: "Log" log_param { base: 0 }'])
def test_bad_base_refused(text):
    with pytest.raises(ConfigError, match="base"):
        run(text, sample())


def test_threshold_has_no_backward():
    lay = make('type: "Threshold"')
    assert lay.allow_force_backward(0) is False
    b, t = Blob((2, 3)), Blob(())
    lay.SetUp([b], [t])
    lay.Forward([b], [t])
    with pytest.raises(LayerError, match="no backward"):
        lay.Backward([t], [True], [b])
    lay.Backward([t], [False], [b])  # nothing asked, nothing raised


def test_blob_count_errors_name_the_layer():
    lay = make('name: "r1" type: "ReLU"')
    with pytest.raises(LayerError, match="r1"):
        lay.SetUp([Blob((2,)), Blob((2,))], [Blob(())])


def test_bnll_large_inputs_are_finite():
    x = np.array([-100.0, -60.0, 0.0, 60.0, 100.0], np.float32)
    _, y, dx = run('type: "BNLL"', x, np.ones(5, np.float32))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert_close(y, [0.0, 0.0, math.log(2), 60.0, 100.0], atol=1e-6)
    assert_close(dx, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_layer_reshapes_top_with_bottom():
    lay = make('type: "TanH"')
    b, t = Blob((2, 3)), Blob(())
    lay.SetUp([b], [t])
    assert t.shape == (2, 3)
    b.reshape(4, 5, 6)
    b.data[...] = 1
    lay.Forward([b], [t])
    assert t.shape == (4, 5, 6)
    assert_close(t.data, np.full((4, 5, 6), math.tanh(1)))
