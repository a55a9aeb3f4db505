"""Loss layers and Accuracy: naive loop references, gradient checks over the
parameter variants, error messages and the real-Caffe goldens."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from netlib.blob import Blob
from netlib.errors import ConfigError, LayerError, NetlibFileNotFoundError, ShapeError
from netlib.layer import create_layer
from netlib.builtin.loss import LossLayer
from netlib.proto import caffe_pb2
from netlib.testing import check_gradient
from xp_mode import XP, host

RNG = np.random.default_rng(77)
FLT_MIN = 1.1754943508222875e-38


def make(text, phase="TEST", dtype=np.float32):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = "under_test"
    ph = caffe_pb2.TRAIN if phase == "TRAIN" else caffe_pb2.TEST
    return create_layer(lp, phase=ph, dtype=dtype, xp=XP)


def run(text, bottoms, num_tops=1, top_diff=None, propagate=None):
    """SetUp + Forward (+ Backward) in float32.  Returns (layer, tops, loss,
    bottom diffs).  ``top_diff`` None keeps the loss weight SetUp wrote."""
    lay = make(text)
    bottom = []
    for arr in bottoms:
        arr = np.asarray(arr, np.float32)
        b = Blob(arr.shape)
        b.data[...] = arr
        bottom.append(b)
    top = [Blob(()) for _ in range(num_tops)]
    lay.SetUp(bottom, top)
    loss = lay.Forward(bottom, top)
    diffs = None
    if propagate is not None:
        if top_diff is not None:
            top[0].diff[...] = top_diff
        lay.Backward(top, propagate, bottom)
        diffs = [host(b.diff).copy() for b in bottom]
    return lay, top, loss, diffs


def labels_for(shape, classes):
    return RNG.integers(0, classes, size=shape).astype(np.float32)


# --------------------------------------------------------------------------
# SoftmaxWithLoss
# --------------------------------------------------------------------------
def softmax_loss_ref(x, label, axis, ignore=None, mode="VALID", weight=1.0):
    """Loop over every (outer, inner) position: softmax, -log p[label], gradient."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    outer = int(np.prod(x.shape[:axis]))
    C = x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, C, inner)
    lab = np.asarray(label).reshape(outer, inner)
    grad = np.zeros_like(x3)
    loss, count = 0.0, 0
    for o in range(outer):
        for i in range(inner):
            scores = [x3[o, c, i] for c in range(C)]
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            z = sum(e)
            p = [v / z for v in e]
            lv = int(lab[o, i])
            if ignore is not None and lv == ignore:
                continue
            loss -= math.log(max(p[lv], FLT_MIN))
            count += 1
            for c in range(C):
                grad[o, c, i] = p[c] - (1.0 if c == lv else 0.0)
    norm = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, (grad * weight / norm).reshape(x.shape)


SOFTMAX_VARIANTS = [
    # (shape, axis, loss_param text, ignore, mode)
    ((4, 5), 1, "", None, "VALID"),
    ((2, 4, 3), 1, "", None, "VALID"),
    ((2, 3, 4), 2, "", None, "VALID"),
    ((3, 5), -1, "", None, "VALID"),
    ((2, 4, 3), 1, "loss_param { ignore_label: 2 }", 2, "VALID"),
    ((2, 4, 3), 1, "loss_param { ignore_label: 2 normalization: FULL }", 2, "FULL"),
    ((2, 4, 3), 1, "loss_param { ignore_label: 2 normalization: BATCH_SIZE }", 2, "BATCH_SIZE"),
    ((2, 4, 3), 1, "loss_param { ignore_label: 2 normalization: NONE }", 2, "NONE"),
    ((2, 4, 3), 1, "loss_param { ignore_label: 2 normalize: true }", 2, "VALID"),
    ((2, 4, 3), 1, "loss_param { ignore_label: 2 normalize: false }", 2, "BATCH_SIZE"),
    ((2, 4, 3), 1, "loss_param { normalize: false normalization: FULL }", None, "FULL"),
]


def _softmax_text(axis, loss_text, extra=""):
    return 'type: "SoftmaxWithLoss" softmax_param { axis: %d } %s %s' % (axis, loss_text, extra)


def _softmax_labels(shape, axis):
    axis = axis % len(shape)
    lshape = shape[:axis] + shape[axis + 1:]
    return labels_for(lshape, shape[axis])


@pytest.mark.parametrize("shape,axis,loss_text,ignore,mode", SOFTMAX_VARIANTS)
@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_softmax_loss_matches_loop_reference(shape, axis, loss_text, ignore, mode, weight):
    x = RNG.standard_normal(shape).astype(np.float32) * 2
    label = _softmax_labels(shape, axis)
    if ignore is not None:
        label.ravel()[::3] = ignore  # make sure some positions are ignored
    text = _softmax_text(axis, loss_text, "loss_weight: %g" % weight)
    lay, top, loss, diffs = run(text, [x, label], propagate=[True, False])
    ref_loss, ref_grad = softmax_loss_ref(x, label, axis, ignore, mode, weight)
    assert top[0].shape == ()
    assert float(top[0].data) == pytest.approx(ref_loss, rel=1e-5)
    assert loss == pytest.approx(weight * ref_loss, rel=1e-5)
    np.testing.assert_allclose(diffs[0], ref_grad, rtol=1e-5, atol=1e-6)
    if ignore is not None:
        x3 = diffs[0].reshape(-1, shape[axis % len(shape)], int(np.prod(shape[axis % len(shape) + 1:])))
        ignored = (label.reshape(x3.shape[0], x3.shape[2]) == ignore)
        assert not x3.transpose(0, 2, 1)[ignored].any()


@pytest.mark.parametrize("shape,axis,loss_text,ignore,mode", SOFTMAX_VARIANTS)
def test_softmax_loss_gradient(shape, axis, loss_text, ignore, mode):
    x = RNG.standard_normal(shape)
    label = _softmax_labels(shape, axis).astype(np.float64)
    if ignore is not None:
        label.ravel()[::3] = ignore
    res = check_gradient(_softmax_text(axis, loss_text), bottoms=[x, label])
    assert res.checked == x.size


def test_softmax_loss_all_ignored_gives_zero_and_normalizer_clamped():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    label = np.full(3, 1, np.float32)
    _, top, _, diffs = run(_softmax_text(1, "loss_param { ignore_label: 1 }"), [x, label],
                           propagate=[True, False])
    assert float(top[0].data) == 0.0
    assert not diffs[0].any()


def test_softmax_loss_log_is_clamped_at_flt_min():
    x = np.array([[0.0, 200.0]], np.float32)  # p[0] underflows to 0 in float32
    _, top, _, _ = run(_softmax_text(1, ""), [x, np.zeros(1, np.float32)])
    assert float(top[0].data) == pytest.approx(-math.log(FLT_MIN), rel=1e-6)


def test_softmax_loss_prob_top_and_loss_weights():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    label = labels_for((3,), 4)
    lay, top, loss, _ = run(_softmax_text(1, "", "loss_weight: 1 loss_weight: 0"), [x, label], num_tops=2)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(host(top[1].data), e / e.sum(axis=1, keepdims=True), rtol=1e-6)
    assert top[1].shape == (3, 4)
    assert loss == pytest.approx(float(top[0].data))


def test_softmax_loss_two_tops_need_two_loss_weights_as_in_caffe():
    with pytest.raises(LayerError, match="once per top blob"):
        run(_softmax_text(1, ""), [np.zeros((2, 3)), np.zeros(2)], num_tops=2)


def test_softmax_loss_label_count_mismatch_names_layer_and_shapes():
    with pytest.raises(ShapeError) as err:
        run('name: "my_loss" ' + _softmax_text(1, ""), [np.zeros((2, 3, 4)), np.zeros((2, 5))])
    msg = str(err.value)
    assert "my_loss" in msg and "SoftmaxWithLoss" in msg
    assert "(2, 3, 4)" in msg and "(2, 5)" in msg and "8" in msg


def test_softmax_loss_first_dimension_mismatch():
    with pytest.raises(ShapeError, match="same first dimension"):
        run(_softmax_text(1, ""), [np.zeros((2, 3)), np.zeros((3,))])


def test_softmax_loss_label_out_of_range():
    with pytest.raises(LayerError, match="label value 7"):
        run(_softmax_text(1, ""), [np.zeros((2, 3)), np.array([0.0, 7.0])])
    with pytest.raises(LayerError, match="label value -1"):
        run(_softmax_text(1, ""), [np.zeros((2, 3)), np.array([0.0, -1.0])])


def test_softmax_loss_refuses_label_backward():
    with pytest.raises(LayerError, match="label"):
        run(_softmax_text(1, ""), [np.zeros((2, 3)), np.zeros(2)], propagate=[True, True])


def test_loss_layer_contract():
    lay = make(_softmax_text(1, ""))
    assert isinstance(lay, LossLayer)
    assert lay.auto_top_blobs
    assert lay.default_loss_weight(0) == 1.0
    assert lay.allow_force_backward(0) and not lay.allow_force_backward(1)
    _, top, loss, _ = run(_softmax_text(1, ""), [np.zeros((2, 4)), np.zeros(2)])
    assert float(top[0].diff) == 1.0  # the loss weight lives in the top diff
    assert loss == pytest.approx(math.log(4), rel=1e-6)


# --------------------------------------------------------------------------
# EuclideanLoss
# --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 2, 2), (6,)])
def test_euclidean_matches_reference(shape):
    a = RNG.standard_normal(shape).astype(np.float32)
    b = RNG.standard_normal(shape).astype(np.float32)
    _, top, _, diffs = run('type: "EuclideanLoss"', [a, b], top_diff=3.0, propagate=[True, True])
    n = shape[0]
    ref = sum((float(u) - float(v)) ** 2 for u, v in zip(a.ravel(), b.ravel())) / (2 * n)
    assert float(top[0].data) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(diffs[0], 3.0 * (a.astype(np.float64) - b) / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(diffs[1], -3.0 * (a.astype(np.float64) - b) / n, rtol=1e-5, atol=1e-7)


def test_euclidean_gradient_both_bottoms():
    lay = make('type: "EuclideanLoss"')
    assert lay.allow_force_backward(0) and lay.allow_force_backward(1)
    res = check_gradient('type: "EuclideanLoss"', bottom_shapes=[(3, 4), (3, 4)])
    assert res.checked == 24


def test_euclidean_shape_mismatch():
    with pytest.raises(ShapeError) as err:
        run('name: "eu" type: "EuclideanLoss"', [np.zeros((4, 5)), np.zeros((4, 6))])
    assert "eu" in str(err.value) and "(4, 5)" in str(err.value) and "(4, 6)" in str(err.value)
    with pytest.raises(ShapeError, match="first dimension"):
        run('type: "EuclideanLoss"', [np.zeros((4, 5)), np.zeros((5, 4))])


# --------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------
def accuracy_ref(x, label, axis=1, top_k=1, ignore=None):
    x = np.asarray(x, np.float64)
    outer = int(np.prod(x.shape[:axis]))
    C = x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, C, inner)
    lab = np.asarray(label).reshape(outer, inner)
    hits, count = 0, 0
    per_hits, per_count = [0] * C, [0] * C
    for o in range(outer):
        for i in range(inner):
            lv = int(lab[o, i])
            if ignore is not None and lv == ignore:
                continue
            true = x3[o, lv, i]
            others = sum(1 for c in range(C) if c != lv and x3[o, c, i] >= true)
            ok = others < top_k
            hits += ok
            count += 1
            per_hits[lv] += ok
            per_count[lv] += 1
    per = [h / n if n else 0.0 for h, n in zip(per_hits, per_count)]
    return (hits / count if count else 0.0), per


@pytest.mark.parametrize("shape,axis,top_k,ignore", [
    ((20, 5), 1, 1, None),
    ((20, 5), 1, 3, None),
    ((3, 4, 5), 2, 2, None),
    ((2, 6, 3, 2), 1, 2, 4),
    ((10, 4), 1, 1, 0),
])
def test_accuracy_matches_reference(shape, axis, top_k, ignore):
    # Small integer scores make ties common, which exercises the >= rule.
    x = RNG.integers(0, 3, size=shape).astype(np.float32)
    lshape = shape[:axis] + shape[axis + 1:]
    label = labels_for(lshape, shape[axis])
    ign = "ignore_label: %d" % ignore if ignore is not None else ""
    text = 'type: "Accuracy" accuracy_param { axis: %d top_k: %d %s }' % (axis, top_k, ign)
    lay, top, loss, _ = run(text, [x, label], num_tops=2)
    ref, per = accuracy_ref(x, label, axis, top_k, ignore)
    assert float(top[0].data) == pytest.approx(ref, rel=1e-6)
    assert top[1].shape == (shape[axis],)
    np.testing.assert_allclose(host(top[1].data), per, rtol=1e-6)
    assert loss == 0.0


def test_accuracy_ties_count_against():
    x = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0], [0.5, 0.5, 0.5]], np.float32)
    label = np.array([0, 0, 2], np.float32)
    _, top, _, _ = run('type: "Accuracy"', [x, label])
    assert float(top[0].data) == pytest.approx(1.0 / 3)
    _, top, _, _ = run('type: "Accuracy" accuracy_param { top_k: 2 }', [x, label])
    assert float(top[0].data) == pytest.approx(2.0 / 3)


def test_accuracy_is_not_a_loss_and_has_no_backward():
    lay = make('type: "Accuracy"')
    assert not isinstance(lay, LossLayer)
    assert lay.default_loss_weight(0) == 0.0
    assert not lay.allow_force_backward(0)
    x, label = Blob((2, 3)), Blob((2,))
    top = [Blob(())]
    lay.SetUp([x, label], top)
    assert top[0].shape == ()
    with pytest.raises(LayerError, match="no backward"):
        lay.Backward(top, [True, False], [x, label])


def test_accuracy_errors():
    with pytest.raises(ShapeError, match="top_k"):
        run('type: "Accuracy" accuracy_param { top_k: 4 }', [np.zeros((2, 3)), np.zeros(2)])
    with pytest.raises(ShapeError, match="number of labels"):
        run('name: "acc" type: "Accuracy"', [np.zeros((2, 3, 4)), np.zeros(2)])


def test_accuracy_all_ignored_is_zero():
    _, top, _, _ = run('type: "Accuracy" accuracy_param { ignore_label: 1 }',
                       [np.zeros((3, 2)), np.ones(3)], num_tops=2)
    assert float(top[0].data) == 0.0
    assert not top[1].data.any()


# --------------------------------------------------------------------------
# SigmoidCrossEntropyLoss
# --------------------------------------------------------------------------
def sigmoid_ce_ref(x, t, mode, ignore=None, weight=1.0):
    loss, count = 0.0, 0
    grad = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        v, tv = float(x[idx]), float(t[idx])
        if ignore is not None and int(tv) == ignore:
            continue
        p = 1.0 / (1.0 + math.exp(-v))
        loss -= tv * math.log(p) + (1 - tv) * math.log(1 - p)
        grad[idx] = p - tv
        count += 1
    norm = {"FULL": x.size, "VALID": count, "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, grad * weight / norm


@pytest.mark.parametrize("loss_text,mode,ignore", [
    ("", "BATCH_SIZE", None),
    ("loss_param { normalization: VALID }", "VALID", None),
    ("loss_param { normalization: FULL }", "FULL", None),
    ("loss_param { normalize: true ignore_label: -1 }", "VALID", -1),
    ("loss_param { ignore_label: -1 }", "BATCH_SIZE", -1),
    ("loss_param { normalization: NONE ignore_label: -1 }", "NONE", -1),
])
def test_sigmoid_cross_entropy_matches_reference(loss_text, mode, ignore):
    x = (RNG.standard_normal((4, 3, 2)) * 3).astype(np.float32)
    t = RNG.random((4, 3, 2)).astype(np.float32)  # soft targets
    if ignore is not None:
        t.ravel()[::4] = ignore
    text = 'type: "SigmoidCrossEntropyLoss" %s' % loss_text
    _, top, _, diffs = run(text, [x, t], top_diff=1.5, propagate=[True, False])
    ref_loss, ref_grad = sigmoid_ce_ref(x, t, mode, ignore, 1.5)
    assert float(top[0].data) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(diffs[0], ref_grad, rtol=1e-5, atol=1e-6)
    res = check_gradient(text, bottoms=[x.astype(np.float64), t.astype(np.float64)])
    assert res.checked == x.size


def test_sigmoid_cross_entropy_count_mismatch():
    with pytest.raises(ShapeError, match="same count"):
        run('type: "SigmoidCrossEntropyLoss"', [np.zeros((2, 3)), np.zeros((2, 4))])


# --------------------------------------------------------------------------
# HingeLoss
# --------------------------------------------------------------------------
def hinge_ref(x, label, norm, weight=1.0):
    n = x.shape[0]
    x2 = np.asarray(x, np.float64).reshape(n, -1)
    loss = 0.0
    grad = np.zeros_like(x2)
    for i in range(n):
        for j in range(x2.shape[1]):
            t = 1.0 if j == int(label[i]) else -1.0
            m = max(0.0, 1.0 - t * x2[i, j])
            loss += m if norm == "L1" else m * m
            if m > 0:
                grad[i, j] = -t if norm == "L1" else -2 * t * m
    return loss / n, (grad * weight / n).reshape(x.shape)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_matches_reference_and_gradient(norm):
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    label = labels_for((5,), 4)
    text = 'type: "HingeLoss" hinge_loss_param { norm: %s }' % norm
    _, top, _, diffs = run(text, [x, label], top_diff=0.7, propagate=[True, False])
    ref_loss, ref_grad = hinge_ref(x, label, norm, 0.7)
    assert float(top[0].data) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(diffs[0], ref_grad, rtol=1e-5, atol=1e-7)
    res = check_gradient(text, bottoms=[x.astype(np.float64), label.astype(np.float64)])
    assert res.checked > 0


# --------------------------------------------------------------------------
# MultinomialLogisticLoss
# --------------------------------------------------------------------------
def test_multinomial_logistic_matches_reference_and_gradient():
    p = RNG.random((5, 4)).astype(np.float32) + 0.05
    p[0, :] = 0.0  # clamped at 1e-20
    label = labels_for((5,), 4)
    _, top, _, diffs = run('type: "MultinomialLogisticLoss"', [p, label], top_diff=2.0,
                           propagate=[True, False])
    ref = 0.0
    grad = np.zeros((5, 4))
    for i in range(5):
        q = max(float(p[i, int(label[i])]), float(np.float32(1e-20)))
        ref -= math.log(q)
        grad[i, int(label[i])] = -2.0 / 5 / q
    assert float(top[0].data) == pytest.approx(ref / 5, rel=1e-5)
    np.testing.assert_allclose(diffs[0], grad, rtol=1e-5)
    res = check_gradient('type: "MultinomialLogisticLoss"',
                         bottoms=[p[1:].astype(np.float64), label[1:].astype(np.float64)], step=1e-4)
    assert res.checked == 16


def test_multinomial_logistic_label_shape():
    with pytest.raises(ShapeError, match="one value per item"):
        run('type: "MultinomialLogisticLoss"', [np.ones((2, 3)), np.zeros((2, 2))])


# --------------------------------------------------------------------------
# ContrastiveLoss
# --------------------------------------------------------------------------
def contrastive_ref(a, b, sim, margin, legacy, weight=1.0):
    n = a.shape[0]
    loss = 0.0
    ga = np.zeros(a.shape)
    for i in range(n):
        d = np.asarray(a[i], np.float64) - b[i]
        dsq = float((d * d).sum())
        dist = math.sqrt(dsq)
        if int(sim[i]):
            loss += dsq
            ga[i] = d * weight / n
        elif legacy:
            loss += max(margin - dsq, 0.0)
            if margin - dsq > 0:
                ga[i] = -d * weight / n
        else:
            loss += max(margin - dist, 0.0) ** 2
            if margin - dist > 0:
                ga[i] = -(margin - dist) / (dist + 1e-4) * d * weight / n  # Caffe's 1e-4
    return loss / (2 * n), ga


@pytest.mark.parametrize("param,margin,legacy", [
    ("", 1.0, False),
    ("contrastive_loss_param { margin: 2.0 }", 2.0, False),
    ("contrastive_loss_param { margin: 1.5 legacy_version: true }", 1.5, True),
])
def test_contrastive_matches_reference_and_gradient(param, margin, legacy):
    a = (RNG.standard_normal((6, 3)) * 0.5).astype(np.float32)
    b = (RNG.standard_normal((6, 3)) * 0.5).astype(np.float32)
    sim = np.array([1, 0, 0, 1, 0, 0], np.float32)
    text = 'type: "ContrastiveLoss" %s' % param
    lay, top, _, diffs = run(text, [a, b, sim], top_diff=1.3, propagate=[True, True, False])
    ref_loss, ref_ga = contrastive_ref(a, b, sim, margin, legacy, 1.3)
    assert float(top[0].data) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(diffs[0], ref_ga, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(diffs[1], -ref_ga, rtol=1e-5, atol=1e-7)
    assert not lay.allow_force_backward(2)
    res = check_gradient(text, bottoms=[a.astype(np.float64), b.astype(np.float64), sim.astype(np.float64)])
    assert res.checked == 36


def test_contrastive_shape_errors():
    with pytest.raises(ShapeError, match="same channels"):
        run('type: "ContrastiveLoss"', [np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2)])
    with pytest.raises(ShapeError, match="one value per pair"):
        run('type: "ContrastiveLoss"', [np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3)])


# --------------------------------------------------------------------------
# InfogainLoss
# --------------------------------------------------------------------------
def infogain_ref(x, label, H, ignore=None, mode="VALID", weight=1.0):
    n, C = x.shape
    loss, count = 0.0, 0
    grad = np.zeros((n, C))
    for i in range(n):
        lv = int(label[i])
        if ignore is not None and lv == ignore:
            continue
        e = [math.exp(float(v) - float(x[i].max())) for v in x[i]]
        p = [v / sum(e) for v in e]
        for k in range(C):
            loss -= H[lv, k] * math.log(max(p[k], 1e-20))
            grad[i, k] = p[k] * H[lv].sum() - H[lv, k]
        count += 1
    norm = max(1.0, {"VALID": count, "FULL": n, "BATCH_SIZE": n, "NONE": 1}[mode])
    return loss / norm, grad * weight / norm


@pytest.mark.parametrize("loss_text,ignore,mode", [
    ("", None, "VALID"),
    ("loss_param { ignore_label: 1 }", 1, "VALID"),
    ("loss_param { ignore_label: 1 normalization: BATCH_SIZE }", 1, "BATCH_SIZE"),
])
def test_infogain_bottom_h_matches_reference_and_gradient(loss_text, ignore, mode):
    x = RNG.standard_normal((6, 4)).astype(np.float32)
    label = np.array([0, 1, 2, 3, 1, 2], np.float32)
    H = RNG.random((4, 4)).astype(np.float32)
    text = 'type: "InfogainLoss" %s' % loss_text
    lay, top, _, diffs = run(text, [x, label, H], top_diff=0.5, propagate=[True, False, False])
    ref_loss, ref_grad = infogain_ref(x, label, H.astype(np.float64), ignore, mode, 0.5)
    assert float(top[0].data) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(diffs[0], ref_grad, rtol=1e-5, atol=1e-6)
    assert lay.allow_force_backward(0) and not lay.allow_force_backward(2)
    res = check_gradient(text, bottoms=[x.astype(np.float64), label.astype(np.float64),
                                        H.astype(np.float64)])
    assert res.checked == x.size


def test_infogain_source_file_and_prob_top(tmp_path):
    H = RNG.random((3, 3)).astype(np.float32)
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = 1, 1, 3, 3  # legacy layout
    proto.data.extend(H.ravel().tolist())
    path = tmp_path / "H.binaryproto"
    path.write_bytes(proto.SerializeToString())
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    label = np.array([0, 2, 1, 2], np.float32)
    text = 'type: "InfogainLoss" infogain_loss_param { source: "%s" } loss_weight: 1 loss_weight: 0' % path
    _, top, _, diffs = run(text, [x, label], num_tops=2, propagate=[True, False])
    ref_loss, ref_grad = infogain_ref(x, label, H.astype(np.float64))
    assert float(top[0].data) == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(diffs[0], ref_grad, rtol=1e-5, atol=1e-6)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(host(top[1].data), e / e.sum(axis=1, keepdims=True), rtol=1e-6)


def test_infogain_errors(tmp_path):
    x, label = np.zeros((2, 3)), np.zeros(2)
    with pytest.raises(ConfigError, match="normalize"):
        run('type: "InfogainLoss" loss_param { normalize: true }', [x, label, np.eye(3)])
    with pytest.raises(ConfigError, match="source"):
        run('type: "InfogainLoss"', [x, label])
    with pytest.raises(NetlibFileNotFoundError):
        run('type: "InfogainLoss" infogain_loss_param { source: "%s" }' % (tmp_path / "nope"), [x, label])
    with pytest.raises(ShapeError, match="3 x 3"):
        run('type: "InfogainLoss"', [x, label, np.eye(2)])
    with pytest.raises(LayerError, match="infogain"):
        run('type: "InfogainLoss"', [x, label, np.eye(3)], propagate=[True, False, True])
