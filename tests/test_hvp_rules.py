"""Second-order rules (Layer.backward_jvp, what Net.hvp runs) of LRN, MVN,
Normalize, ContrastiveLoss, InfogainLoss and the recurrent layers (RNN, LSTM
through time, LSTMUnit) against centred differences of
their backward (netlib.testing.check_hvp, float64), over their parameter
variants; and the same grid on the CuPy stand-in (tests/fakecupy.py), which
refuses implicit NumPy."""
import numpy
import pytest

from netlib import backend
from netlib.proto import caffe_pb2
from netlib.testing import check_hvp

LRN = [
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 1.5 }', (2, 5, 2, 2)),
    ('type: "LRN" lrn_param { local_size: 5 alpha: 0.3 beta: 0.6 }', (2, 4, 3, 1)),
    ('type: "LRN" lrn_param { local_size: 1 alpha: 1.2 beta: 1.5 k: 0.5 }', (1, 3, 2, 2)),
    ('type: "LRN" lrn_param { local_size: 7 alpha: 2 beta: 0.5 k: 2 }', (2, 3, 2, 1)),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.75 }', (2, 2, 4, 5)),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 5 alpha: 2 beta: 0.6 }', (1, 3, 3, 2)),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 1 beta: 1.2 k: 2 }',
     (1, 2, 5, 3)),
]

MVN = [
    ('type: "MVN"', (2, 3, 4, 4)),
    ('type: "MVN" mvn_param { across_channels: true }', (2, 3, 2, 2)),
    ('type: "MVN" mvn_param { across_channels: true eps: 0.3 }', (2, 3, 2, 2)),
    ('type: "MVN" mvn_param { eps: 0.5 }', (3, 4, 2)),
    ('type: "MVN" mvn_param { normalize_variance: false }', (2, 3, 4)),
    ('type: "MVN" mvn_param { normalize_variance: false across_channels: true }', (2, 3, 2, 2)),
]

NORMALIZE = [
    ('type: "Normalize" norm_param { across_spatial: %s channel_shared: %s eps: %s '
     'scale_filler { type: "gaussian" std: 1 } }' % (sp, cs, eps), shape)
    for sp in ("true", "false") for cs in ("true", "false")
    for eps, shape in (("1e-10", (2, 3, 2, 2)), ("0.5", (2, 4, 3)))
]


def _rng():
    return numpy.random.default_rng(11)


def _contrastive_bottoms(rng, legacy):
    """Pairs on both sides of the margin, away from its kink."""
    n, c = 8, 3
    a = rng.normal(size=(n, c))
    direction = rng.normal(size=(n, c))
    direction /= numpy.linalg.norm(direction, axis=1, keepdims=True)
    # distances 0.3 .. 1.7 against margin 1 (legacy: d^2 against 1)
    dist = numpy.array([0.3, 0.5, 0.7, 1.3, 1.5, 1.7, 0.4, 1.2])
    b = a - direction * dist[:, None]
    sim = numpy.array([0, 0, 0, 0, 0, 1, 1, 0.0])
    return a, b, sim


def _infogain_file(tmp_path, H):
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = 1, 1, H.shape[0], H.shape[1]
    proto.data.extend(H.ravel().tolist())
    path = tmp_path / "H.binaryproto"
    path.write_bytes(proto.SerializeToString())
    return path


def _check(text, **kw):
    result = check_hvp(text, **kw)
    assert result.ok and result.checked > 0
    return result


@pytest.mark.parametrize("text,shape", LRN)
def test_lrn_hvp(text, shape):
    _check(text, bottom_shapes=[shape])


@pytest.mark.parametrize("text,shape", MVN)
def test_mvn_hvp(text, shape):
    _check(text, bottom_shapes=[shape])


@pytest.mark.parametrize("text,shape", NORMALIZE)
def test_normalize_hvp(text, shape):
    _check(text, bottom_shapes=[shape])


@pytest.mark.parametrize("channel_shared", ["true", "false"])
def test_normalize_hvp_fixed_scale(channel_shared):
    """Bottom terms alone (no scale tangent, no scale diff)."""
    _check('type: "Normalize" norm_param { channel_shared: %s scale_filler { type: "constant" value: 2 } }'
           % channel_shared, bottom_shapes=[(2, 3, 2)], check_params=False)


@pytest.mark.parametrize("legacy", ["false", "true"])
@pytest.mark.parametrize("margin", [1.0, 0.6])
def test_contrastive_hvp(legacy, margin):
    a, b, sim = _contrastive_bottoms(_rng(), legacy == "true")
    text = 'type: "ContrastiveLoss" contrastive_loss_param { margin: %g legacy_version: %s }' % (margin, legacy)
    _check(text, bottoms=[a, b, sim])
    _check(text, bottoms=[a, b, sim], check_bottoms=[0])
    _check(text, bottoms=[a, b, sim], check_bottoms=[1])
    _check(text, bottoms=[a.reshape(8, 3, 1, 1), b.reshape(8, 3, 1, 1), sim.reshape(8, 1, 1, 1)])


INFOGAIN = [
    ('', (4, 3)),
    ('loss_param { ignore_label: 1 }', (5, 3)),
    ('loss_param { normalization: FULL }', (2, 3, 2)),
    ('loss_param { normalization: BATCH_SIZE ignore_label: 0 }', (2, 4, 3)),
    ('loss_param { normalization: NONE }', (3, 4)),
    ('infogain_loss_param { axis: 2 }', (2, 2, 3)),
]


def _infogain_case(rng, shape, axis=1):
    x = rng.normal(size=shape)
    c = shape[axis]
    label_shape = shape[:axis] + shape[axis + 1:]
    label = rng.integers(0, c, label_shape).astype(float)
    H = rng.uniform(0, 1, (c, c))
    return x, label, H


@pytest.mark.parametrize("param,shape", INFOGAIN)
def test_infogain_hvp_matrix_bottom(param, shape):
    axis = 2 if "axis: 2" in param else 1
    x, label, H = _infogain_case(_rng(), shape, axis)
    _check('type: "InfogainLoss" %s' % param, bottoms=[x, label, H], check_bottoms=[0])


def test_infogain_hvp_source_file(tmp_path):
    x, label, H = _infogain_case(_rng(), (4, 3))
    path = _infogain_file(tmp_path, H)
    _check('type: "InfogainLoss" infogain_loss_param { source: "%s" }' % path, bottoms=[x, label])


#: cont: a new sequence at t = 0 (the carried state is not read), then continued, restarted and fractional
#: values (Caffe multiplies by cont; LSTM's backward keeps its cont-scaled forget-gate formula, whose own
#: derivative the rule is).
CONTS = {"binary": [[0, 0], [1, 1], [1, 0.0]], "fractional": [[0, 0], [1, 0.5], [0.3, 0.0]]}
RECURRENT_FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def _recurrent_cases(typ, cont):
    """(layer text, bottoms, checked bottoms, top count): plain, with x_static, with exposed states."""
    rng = _rng()
    T, N = 3, 2
    text = 'type: "%s" recurrent_param { num_output: 4 %s %%s }' % (typ, RECURRENT_FILL)
    cont = numpy.array(CONTS[cont])
    n_states = 1 if typ == "RNN" else 2
    states = [rng.normal(size=(1, N, 4)) for _ in range(n_states)]
    return [(text % "", [rng.normal(size=(T, N, 3)), cont], [0], 1),
            (text % "", [rng.normal(size=(T, N, 3)), cont, rng.normal(size=(N, 2))], [0, 2], 1),
            (text % "", [rng.normal(size=(T, N, 2, 2)), cont, rng.normal(size=(N, 3))], [], 1),
            (text % "expose_hidden: true", [rng.normal(size=(T, N, 3)), cont] + states,
             [0] + list(range(2, 2 + n_states)), 1 + n_states)]


@pytest.mark.parametrize("cont", sorted(CONTS))
@pytest.mark.parametrize("typ", ["RNN", "LSTM"])
def test_recurrent_hvp(typ, cont):
    """Bottom, static-input, exposed-state and parameter tangents through every step."""
    for text, bottoms, checks, tops in _recurrent_cases(typ, cont):
        result = _check(text, bottoms=bottoms, check_bottoms=checks, num_tops=tops)
        # smooth: only where the third derivative makes the one-sided differences disagree at step 1e-4
        assert result.skipped <= result.checked // 10


@pytest.mark.parametrize("typ", ["RNN", "LSTM"])
def test_recurrent_hvp_bottoms_alone_and_frozen_weights(typ):
    """No parameter tangents (lr_mult 0 everywhere): only the bottoms' terms."""
    text, bottoms, checks, tops = _recurrent_cases(typ, "binary")[1]
    _check(text, bottoms=bottoms, check_bottoms=checks, num_tops=tops, check_params=False)


@pytest.mark.parametrize("cont", [[[1, 0, 1.0]], [[1, 1, 1.0]], [[0.5, 0.3, 1.0]]])
@pytest.mark.parametrize("checks", [[0, 1], [1], [0]])
def test_lstm_unit_hvp(cont, checks):
    rng = _rng()
    _check('type: "LSTMUnit" top: "c" top: "h"', bottoms=[rng.normal(size=(1, 3, 2)), rng.normal(size=(1, 3, 8)),
                                                       numpy.array(cont)], check_bottoms=checks)


def run_grid(tmp_path):
    for text, shape in LRN + MVN + NORMALIZE:
        _check(text, bottom_shapes=[shape])
    for legacy in ("false", "true"):
        a, b, sim = _contrastive_bottoms(_rng(), legacy == "true")
        _check('type: "ContrastiveLoss" contrastive_loss_param { legacy_version: %s }' % legacy,
               bottoms=[a, b, sim])
    for param, shape in INFOGAIN:
        x, label, H = _infogain_case(_rng(), shape, 2 if "axis: 2" in param else 1)
        _check('type: "InfogainLoss" %s' % param, bottoms=[x, label, H], check_bottoms=[0])
    test_infogain_hvp_source_file(tmp_path)
    test_infogain_hvp_matrix_tangent('')
    for typ in ("RNN", "LSTM"):
        test_recurrent_hvp(typ, "fractional")
    test_lstm_unit_hvp([[1, 0, 1.0]], [0, 1])




def test_hvp_rules_use_the_blob_array_module(on_fake, tmp_path):
    """Every rule above goes through the layer's xp: the whole grid on the CuPy stand-in."""
    run_grid(tmp_path)


def _infogain_layer(text, x, label, H):
    from netlib.blob import Blob
    from netlib.layer import create_layer
    from netlib.proto import caffe_pb2
    from google.protobuf import text_format
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    xp = backend.default_xp()
    bottom = []
    for arr in (x, label, H):
        blob = Blob(arr.shape, dtype=numpy.float64, xp=xp)
        blob.data[...] = xp.asarray(arr)
        bottom.append(blob)
    top = [Blob((), dtype=numpy.float64, xp=xp)]
    layer = create_layer(param, dtype=numpy.float64, xp=xp)
    layer.SetUp(bottom, top)
    return layer, bottom, top


@pytest.mark.parametrize("param", ['', 'loss_param { ignore_label: 2 normalization: FULL }'])
def test_infogain_hvp_matrix_tangent(param):
    """A tangent of the matrix bottom (H computed upstream) enters bottom 0's diff's derivative:
    the rule against centred differences of the backward (check_hvp cannot draw it: H gets no diff)."""
    from netlib.second_order import Tangents
    rng = _rng()
    x, label, H = _infogain_case(rng, (5, 3))
    label[0] = 2
    dz, dH = rng.normal(size=x.shape), rng.normal(size=H.shape)
    layer, bottom, top = _infogain_layer('type: "InfogainLoss" %s' % param, x, label, H)
    xp = layer.xp
    g = xp.asarray(numpy.array(1.7))
    h = 1e-5

    def grad(e, tz, tH):
        bottom[0].data[...] = xp.asarray(x + e * tz)
        bottom[2].data[...] = xp.asarray(H + e * tH)
        layer.Forward(bottom, top)
        top[0].diff[...] = g
        layer.Backward(top, [True, False, False], bottom)
        return backend.to_numpy(bottom[0].diff).copy()

    zero = numpy.zeros_like(dz)
    for tz in (dz, None):
        tzv = zero if tz is None else tz
        numeric = (grad(h, tzv, dH) - grad(-h, tzv, dH)) / (2 * h)
        grad(0, tzv, dH)
        t = Tangents([None if tz is None else xp.asarray(tz), None, xp.asarray(dH)], [None], [])
        out, _ = layer.backward_jvp(top, [True, False, False], bottom, [g.reshape(())], t)
        numpy.testing.assert_allclose(backend.to_numpy(out[0]), numeric, rtol=1e-6, atol=1e-8)
        assert out[1] is None and out[2] is None
