"""The SSD fork's deploy layers: Permute, PriorBox, Normalize, DetectionOutput.

Real Caffe has no such layers, so every forward is compared with an
independent reference written here as plain Python loops (the fork's
documented behaviour: its prior order, where eps goes, its NMS and output
order), and Permute / Normalize gradients with the float64 checker.
"""
import math

import numpy
import pytest
from google.protobuf import text_format

import netlib.detection  # noqa: F401  (registers the layers until the lead wires it in)
from netlib.blob import Blob
from netlib.errors import ConfigError, NetlibError, ShapeError
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from netlib.testing import check_gradient
from xp_mode import XP, host


def make_layer(text, dtype=numpy.float32):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    if not lp.name:
        lp.name = "under_test"
    return create_layer(lp, phase=caffe_pb2.TEST, dtype=dtype, xp=XP)


def run(text, arrays, dtype=numpy.float32, params=None):
    layer = make_layer(text, dtype)
    bottom = []
    for a in arrays:
        b = Blob(numpy.shape(a), dtype=dtype, xp=XP)
        b.data[...] = a
        bottom.append(b)
    top = [Blob((), dtype=dtype, xp=XP)]
    layer.SetUp(bottom, top)
    if params is not None:
        for blob, arr in zip(layer.blobs, params):
            blob.data[...] = arr
    layer.Forward(bottom, top)
    return layer, bottom, top


def setup_error(text, shapes):
    layer = make_layer(text)
    bottom = [Blob(s, xp=XP) for s in shapes]
    with pytest.raises(NetlibError) as info:
        layer.SetUp(bottom, [Blob((), xp=XP)])
    assert "under_test" in str(info.value)
    return info.value


# ===========================================================================
# Permute
# ===========================================================================
def permute_ref(x, order):
    order = list(order) + [a for a in range(x.ndim) if a not in order]
    out_shape = [x.shape[a] for a in order]
    y = numpy.zeros(out_shape, dtype=x.dtype)
    for idx in numpy.ndindex(*out_shape):
        src = [0] * x.ndim
        for i, a in enumerate(order):
            src[a] = idx[i]
        y[idx] = x[tuple(src)]
    return y


def permute_text(order):
    return 'type: "Permute" permute_param { %s }' % " ".join("order: %d" % o for o in order)


PERMUTE_CASES = [((2, 3, 4, 5), [0, 2, 3, 1]), ((2, 3, 4, 5), [3, 1, 0, 2]), ((2, 3, 4, 5), [0, 2]),
                 ((2, 3, 4, 5), [1]), ((3, 4, 5), [2, 0, 1]), ((2, 3, 4, 5), [])]


@pytest.mark.parametrize("shape,order", PERMUTE_CASES)
def test_permute_forward_matches_naive(shape, order):
    x = numpy.random.default_rng(0).standard_normal(shape).astype(numpy.float32)
    _, _, top = run(permute_text(order), [x])
    ref = permute_ref(x, order)
    assert top[0].shape == ref.shape
    numpy.testing.assert_array_equal(host(top[0].data), ref)


def test_permute_identity_shares_bottom():
    x = numpy.arange(24, dtype=numpy.float32).reshape(2, 3, 4)
    layer, bottom, top = run(permute_text([0, 1]), [x])
    assert top[0].shares_data_with(bottom[0])
    numpy.testing.assert_array_equal(host(top[0].data), x)


@pytest.mark.parametrize("shape,order", PERMUTE_CASES)
def test_permute_gradient(shape, order):
    check_gradient(permute_text(order), bottom_shapes=[shape])


def test_permute_backward_is_inverse_transpose():
    x = numpy.zeros((2, 3, 4, 5), numpy.float32)
    layer, bottom, top = run(permute_text([0, 2, 3, 1]), [x])
    dy = numpy.random.default_rng(1).standard_normal(top[0].shape).astype(numpy.float32)
    top[0].diff[...] = dy
    layer.Backward(top, [True], bottom)
    for n, c, h, w in numpy.ndindex(2, 3, 4, 5):
        assert bottom[0].diff[n, c, h, w] == dy[n, h, w, c]


@pytest.mark.parametrize("order,word", [([0, 2, 2, 1], "repeats axis 2"), ([0, 4], "order value 4"),
                                        ([1, 1], "repeats axis 1")])
def test_permute_bad_order_is_a_config_error(order, word):
    err = setup_error(permute_text(order), [(2, 3, 4, 5)])
    assert isinstance(err, ConfigError) and word in str(err)
    assert "Permute" in str(err) and "(2, 3, 4, 5)" in str(err)


# ===========================================================================
# PriorBox
# ===========================================================================
def priorbox_ref(lh, lw, ih, iw, min_sizes, max_sizes=(), ratios=(), flip=True, clip=False,
                 variance=(0.1,), step_h=None, step_w=None, offset=0.5):
    """The fork's loops: cells row by row; per min_size: s x s, sqrt(s*max),
    then the other ratios (1 first, duplicates dropped, 1/r after r)."""
    ars = [1.0]
    for r in ratios:
        if any(abs(r - a) < 1e-6 for a in ars):
            continue
        ars.append(r)
        if flip:
            ars.append(1.0 / r)
    sw = step_w if step_w else iw / lw
    sh = step_h if step_h else ih / lh
    boxes = []
    for h in range(lh):
        for w in range(lw):
            cx, cy = (w + offset) * sw, (h + offset) * sh
            for k, s in enumerate(min_sizes):
                s = int(s)
                sizes = [(s, s)]
                if max_sizes:
                    side = math.sqrt(s * int(max_sizes[k]))
                    sizes.append((side, side))
                for a in ars:
                    if abs(a - 1) < 1e-6:
                        continue
                    sizes.append((s * math.sqrt(a), s / math.sqrt(a)))
                for bw, bh in sizes:
                    box = [(cx - bw / 2) / iw, (cy - bh / 2) / ih, (cx + bw / 2) / iw, (cy + bh / 2) / ih]
                    if clip:
                        box = [min(max(v, 0.0), 1.0) for v in box]
                    boxes.append(box)
    n = len(boxes)
    var = [list(variance) * (4 // len(variance))] * n
    return numpy.array([numpy.ravel(boxes), numpy.ravel(var)])[None]


def test_priorbox_hand_computed_2x2_300():
    # 2x2 map on a 300x300 image: step 150, centres 75 and 225.  Priors per
    # cell: 30x30, sqrt(30*60)=42.43 square, 42.43x21.21 (ratio 2), 21.21x42.43.
    text = ('type: "PriorBox" prior_box_param { min_size: 30 max_size: 60 aspect_ratio: 2 flip: true '
            'clip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }')
    _, _, top = run(text, [numpy.zeros((1, 8, 2, 2)), numpy.zeros((1, 3, 300, 300))])
    assert top[0].shape == (1, 2, 2 * 2 * 4 * 4)
    boxes = host(top[0].data)[0, 0].reshape(2, 2, 4, 4)
    r = math.sqrt(1800) / 2                    # 21.213
    a, b = 30 * math.sqrt(2) / 2, 30 / math.sqrt(2) / 2   # 21.213, 10.607
    for (h, w), (cx, cy) in {(0, 0): (75, 75), (0, 1): (225, 75), (1, 0): (75, 225), (1, 1): (225, 225)}.items():
        expect = [[cx - 15, cy - 15, cx + 15, cy + 15], [cx - r, cy - r, cx + r, cy + r],
                  [cx - a, cy - b, cx + a, cy + b], [cx - b, cy - a, cx + b, cy + a]]
        numpy.testing.assert_allclose(boxes[h, w], numpy.array(expect) / 300, rtol=0, atol=1e-7)
    numpy.testing.assert_allclose(boxes[0, 0, 0], [0.2, 0.2, 0.3, 0.3], atol=1e-7)
    numpy.testing.assert_allclose(host(top[0].data[0, 1].reshape(-1, 4)), [[0.1, 0.1, 0.2, 0.2]] * 16, atol=0)


def test_priorbox_clip_and_single_variance():
    base = 'type: "PriorBox" prior_box_param { min_size: 200 variance: 0.3 %s }'
    bottoms = [numpy.zeros((1, 1, 2, 2)), numpy.zeros((1, 3, 300, 300))]
    _, _, t0 = run(base % "clip: false", bottoms)
    _, _, t1 = run(base % "clip: true", bottoms)
    # cell (0, 0): centre 75, half size 100 -> (-25, -25, 175, 175) / 300
    numpy.testing.assert_allclose(host(t0[0].data[0, 0, :4]), numpy.array([-25, -25, 175, 175]) / 300, atol=1e-7)
    numpy.testing.assert_allclose(host(t1[0].data[0, 0, :4]), [0, 0, 175 / 300, 175 / 300], atol=1e-7)
    assert t1[0].data[0, 0].min() >= 0 and t1[0].data[0, 0].max() <= 1
    numpy.testing.assert_array_equal(host(t1[0].data[0, 1]), numpy.float32(0.3))


PRIOR_CASES = [
    dict(min_sizes=[30], ratios=[2], flip=True),
    dict(min_sizes=[60], ratios=[2, 3], flip=False, clip=True),
    dict(min_sizes=[30, 70.7], max_sizes=[60, 90], ratios=[2, 3, 2, 0.5]),   # duplicates ignored; 70.7 -> 70
    dict(min_sizes=[45], max_sizes=[99], ratios=[1, 1.5], step_h=8, step_w=12, offset=0.25,
         variance=(0.1, 0.2, 0.3, 0.4)),
]


@pytest.mark.parametrize("case", PRIOR_CASES)
@pytest.mark.parametrize("fmap,img", [((3, 5), (120, 200)), ((4, 4), (300, 300))])
def test_priorbox_matches_naive(case, fmap, img):
    p = ["min_size: %r" % s for s in case["min_sizes"]] + ["max_size: %r" % s for s in case.get("max_sizes", [])]
    p += ["aspect_ratio: %r" % r for r in case.get("ratios", [])]
    p += ["flip: %s" % str(case.get("flip", True)).lower(), "clip: %s" % str(case.get("clip", False)).lower()]
    p += ["variance: %r" % v for v in case.get("variance", (0.1,))]
    if case.get("step_h"):
        p += ["step_h: %r" % case["step_h"], "step_w: %r" % case["step_w"]]
    p += ["offset: %r" % case.get("offset", 0.5)]
    _, _, top = run('type: "PriorBox" prior_box_param { %s }' % " ".join(p),
                    [numpy.zeros((2, 4) + fmap), numpy.zeros((2, 3) + img)])
    ref = priorbox_ref(fmap[0], fmap[1], img[0], img[1], **case)
    assert top[0].shape == ref.shape
    numpy.testing.assert_allclose(host(top[0].data), ref, rtol=0, atol=2e-7)


def test_priorbox_img_size_overrides_the_image_bottom():
    text = 'type: "PriorBox" prior_box_param { min_size: 16 aspect_ratio: 2 img_h: 64 img_w: 96 }'
    _, _, top = run(text, [numpy.zeros((1, 1, 4, 6)), numpy.zeros((1, 3, 7, 7))])
    ref = priorbox_ref(4, 6, 64, 96, [16], ratios=[2])
    numpy.testing.assert_allclose(host(top[0].data), ref, atol=2e-7)
    _, _, top2 = run(text.replace("img_h: 64 img_w: 96", "img_size: 64"),
                     [numpy.zeros((1, 1, 4, 6)), numpy.zeros((1, 3, 7, 7))])
    numpy.testing.assert_allclose(host(top2[0].data), priorbox_ref(4, 6, 64, 64, [16], ratios=[2]), atol=2e-7)


@pytest.mark.parametrize("params,word", [
    ("aspect_ratio: 2", "min_size is required"),
    ("min_size: 30 max_size: 20", "greater than min_size"),
    ("min_size: 30 max_size: 40 max_size: 50", "one max_size per min_size"),
    ("min_size: 30 variance: 0.1 variance: 0.2", "1 or 4 variance"),
    ("min_size: 30 step: 8 step_h: 4 step_w: 4", "not both"),
])
def test_priorbox_config_errors(params, word):
    err = setup_error('type: "PriorBox" prior_box_param { %s }' % params, [(1, 1, 2, 2), (1, 3, 8, 8)])
    assert isinstance(err, ConfigError) and word in str(err) and "PriorBox" in str(err)


# ===========================================================================
# Normalize
# ===========================================================================
def normalize_ref(x, scale, across_spatial, channel_shared, eps):
    N, C = x.shape[:2]
    xs = x.reshape(N, C, -1).astype(numpy.float64)
    S = xs.shape[2]
    y = numpy.zeros_like(xs)
    for n in range(N):
        if across_spatial:
            tot = sum(xs[n, c, s] ** 2 for c in range(C) for s in range(S))
            norm = math.sqrt(tot + eps)
            for c in range(C):
                for s in range(S):
                    y[n, c, s] = xs[n, c, s] / norm
        else:
            for s in range(S):
                norm = math.sqrt(sum(xs[n, c, s] ** 2 for c in range(C)) + eps)
                for c in range(C):
                    y[n, c, s] = xs[n, c, s] / norm
        for c in range(C):
            y[n, c] *= scale if channel_shared else scale[c]
    return y.reshape(x.shape)


def norm_text(across, shared, eps=None, filler='scale_filler { type: "gaussian" std: 1 }'):
    extra = (" eps: %r" % eps) if eps is not None else ""
    return ('type: "Normalize" norm_param { across_spatial: %s channel_shared: %s %s%s }'
            % (str(across).lower(), str(shared).lower(), filler, extra))


NORM_VARIANTS = [(a, s) for a in (False, True) for s in (False, True)]


@pytest.mark.parametrize("across,shared", NORM_VARIANTS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 6)])
def test_normalize_forward_matches_naive(across, shared, shape):
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal(shape).astype(numpy.float32)
    scale = numpy.float32(1.7) if shared else rng.uniform(0.5, 3, shape[1]).astype(numpy.float32)
    layer, _, top = run(norm_text(across, shared), [x], params=[scale])
    assert layer.blobs[0].shape == (() if shared else (shape[1],))
    ref = normalize_ref(x, scale, across, shared, 1e-10)
    numpy.testing.assert_allclose(host(top[0].data), ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("across", [False, True])
def test_normalize_eps_is_inside_the_square_root(across):
    # tiny inputs: sqrt(sum + eps) and sqrt(sum) + eps differ by orders of magnitude
    x = numpy.full((1, 2, 1, 1), 1e-3, numpy.float32)
    _, _, top = run(norm_text(across, True, eps=1e-4, filler=""), [x])
    expect = 1e-3 / math.sqrt(2e-6 + 1e-4)
    numpy.testing.assert_allclose(host(top[0].data.ravel()), [expect, expect], rtol=1e-5)
    # the default scale filler is constant 1 and an all-zero image gives zeros, not NaN
    layer, _, top0 = run('type: "Normalize" norm_param { across_spatial: %s }' % str(across).lower(),
                         [numpy.zeros((1, 3, 2, 2), numpy.float32)])
    assert float(layer.blobs[0].data) == 1.0
    assert numpy.all(host(top0[0].data) == 0)


@pytest.mark.parametrize("across,shared", NORM_VARIANTS)
def test_normalize_gradient(across, shared):
    check_gradient(norm_text(across, shared, filler='scale_filler { type: "uniform" min: 0.5 max: 2 }'),
                   bottom_shapes=[(2, 3, 2, 3)])


@pytest.mark.parametrize("across,shared", NORM_VARIANTS)
def test_normalize_scale_gradient_matches_naive(across, shared):
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((2, 3, 2, 2))
    scale = numpy.float64(2.0) if shared else numpy.array([0.5, 1.5, -2.0])
    layer, bottom, top = run(norm_text(across, shared), [x], dtype=numpy.float64, params=[scale])
    dy = rng.standard_normal(x.shape)
    top[0].diff[...] = dy
    layer.blobs[0].diff[...] = 0
    layer.Backward(top, [False], bottom)
    unit = normalize_ref(x, 1.0, across, True, 1e-10)
    want = (unit * dy).sum() if shared else (unit * dy).sum(axis=(0, 2, 3))
    numpy.testing.assert_allclose(host(layer.blobs[0].diff), want, rtol=1e-10)


def test_normalize_errors():
    err = setup_error('type: "Normalize"', [(4,)])
    assert isinstance(err, ShapeError) and "at least 2 axes" in str(err)
    layer = make_layer('type: "Normalize"')
    b = Blob((1, 2, 2, 2), xp=XP)
    with pytest.raises(ConfigError, match="in place"):
        layer.SetUp([b], [b])


# ===========================================================================
# DetectionOutput
# ===========================================================================
def ref_decode(prior, var, t, code, encoded):
    if encoded:
        var = [1.0, 1.0, 1.0, 1.0]
    px0, py0, px1, py1 = prior
    pw, ph = px1 - px0, py1 - py0
    if code == "CORNER":
        return [px0 + var[0] * t[0], py0 + var[1] * t[1], px1 + var[2] * t[2], py1 + var[3] * t[3]]
    if code == "CORNER_SIZE":
        return [px0 + var[0] * t[0] * pw, py0 + var[1] * t[1] * ph,
                px1 + var[2] * t[2] * pw, py1 + var[3] * t[3] * ph]
    cx = var[0] * t[0] * pw + (px0 + px1) / 2
    cy = var[1] * t[1] * ph + (py0 + py1) / 2
    w = math.exp(var[2] * t[2]) * pw
    h = math.exp(var[3] * t[3]) * ph
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def ref_size(b):
    if b[2] < b[0] or b[3] < b[1]:
        return 0.0
    return (b[2] - b[0]) * (b[3] - b[1])


def ref_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (ref_size(a) + ref_size(b) - inter)


def ref_nms(boxes, scores, conf_thr, nms_thr, eta, top_k):
    cand = sorted([i for i in range(len(scores)) if scores[i] > conf_thr], key=lambda i: (-scores[i], i))
    if top_k > -1:
        cand = cand[:top_k]
    kept, thr = [], nms_thr
    for i in cand:
        if all(ref_iou(boxes[i], boxes[k]) <= thr for k in kept):
            kept.append(i)
            if eta < 1 and thr > 0.5:
                thr *= eta
    return kept


def reference_detection_output(loc, conf, priors, num_classes, share_location=True, background=0,
                               code="CORNER", encoded=False, nms_thr=0.3, eta=1.0, top_k=-1,
                               keep_top_k=-1, conf_thr=None):
    """Plain-loop DetectionOutput: rows [image, label, score, box]."""
    loc = numpy.asarray(loc, numpy.float64)
    conf = numpy.asarray(conf, numpy.float64)
    N = loc.shape[0]
    P = priors.shape[2] // 4
    L = 1 if share_location else num_classes
    pri = numpy.asarray(priors, numpy.float64).reshape(2, P, 4)
    conf_thr = -3.4e38 if conf_thr is None else conf_thr
    rows = []
    for n in range(N):
        lp = loc[n].reshape(P, L, 4)
        sc = conf[n].reshape(P, num_classes)
        dets = []
        for c in range(num_classes):
            if c == background:
                continue
            lc = 0 if share_location else c
            boxes = [ref_decode(pri[0, p], pri[1, p], lp[p, lc], code, encoded) for p in range(P)]
            for i in ref_nms(boxes, list(sc[:, c]), conf_thr, nms_thr, eta, top_k):
                dets.append((c, sc[i, c], boxes[i]))
        if keep_top_k > -1 and len(dets) > keep_top_k:
            order = sorted(range(len(dets)), key=lambda j: (-dets[j][1], j))[:keep_top_k]
            dets = [dets[j] for j in sorted(order, key=lambda j: (dets[j][0], -dets[j][1], j))]
        rows += [[n, c, s] + list(b) for c, s, b in dets]
    if not rows:
        rows = [[n, -1, -1, -1, -1, -1, -1] for n in range(N)]
    return numpy.array(rows, numpy.float64).reshape(1, 1, -1, 7)


def det_text(num_classes, share_location=True, background=0, code="CORNER", encoded=False, nms_thr=0.3,
             eta=1.0, top_k=None, keep_top_k=-1, conf_thr=None):
    nms_p = "nms_threshold: %r eta: %r" % (nms_thr, eta) + (" top_k: %d" % top_k if top_k is not None else "")
    text = ('type: "DetectionOutput" detection_output_param { num_classes: %d share_location: %s '
            'background_label_id: %d code_type: %s variance_encoded_in_target: %s keep_top_k: %d '
            'nms_param { %s }' % (num_classes, str(share_location).lower(), background, code,
                                  str(encoded).lower(), keep_top_k, nms_p))
    if conf_thr is not None:
        text += " confidence_threshold: %r" % conf_thr
    return text + " }"


def det_inputs(seed, N=2, P=40, C=4, share_location=True):
    """Priors clustered around a few centres (so NMS has work), small offsets,
    softmaxed scores."""
    rng = numpy.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.8, (5, 2))
    c = centres[rng.integers(0, 5, P)] + rng.normal(0, 0.03, (P, 2))
    wh = rng.uniform(0.1, 0.3, (P, 2))
    boxes = numpy.concatenate([c - wh / 2, c + wh / 2], axis=1)
    var = numpy.tile([0.1, 0.1, 0.2, 0.2], (P, 1))
    priors = numpy.stack([boxes.ravel(), var.ravel()])[None].astype(numpy.float32)
    L = 1 if share_location else C
    loc = rng.normal(0, 0.5, (N, P * L * 4)).astype(numpy.float32)
    logits = rng.normal(0, 1.5, (N, P, C))
    e = numpy.exp(logits)
    conf = (e / e.sum(-1, keepdims=True)).reshape(N, P * C).astype(numpy.float32)
    return loc, conf, priors


DET_CASES = [
    dict(code="CORNER"), dict(code="CENTER_SIZE"), dict(code="CORNER_SIZE"),
    dict(code="CENTER_SIZE", encoded=True, nms_thr=0.45),
    dict(code="CORNER_SIZE", encoded=True, background=-1),
    dict(code="CENTER_SIZE", share_location=False),
    dict(code="CORNER", share_location=False, background=2),
    dict(code="CENTER_SIZE", top_k=6, keep_top_k=7, conf_thr=0.1),
    dict(code="CENTER_SIZE", nms_thr=0.7, eta=0.8, conf_thr=0.05),       # adaptive NMS
    dict(code="CORNER_SIZE", share_location=False, background=-1, keep_top_k=5, eta=0.9, nms_thr=0.6),
    dict(code="CENTER_SIZE", top_k=0),
]


@pytest.mark.parametrize("case", DET_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_detection_output_matches_naive(case, seed):
    C = 4
    loc, conf, priors = det_inputs(seed, C=C, share_location=case.get("share_location", True))
    _, _, top = run(det_text(C, **case), [loc, conf, priors])
    ref = reference_detection_output(loc, conf, priors, C, **case)
    assert top[0].shape == ref.shape
    numpy.testing.assert_array_equal(host(top[0].data[..., :3]), ref[..., :3].astype(numpy.float32))
    numpy.testing.assert_allclose(host(top[0].data[..., 3:]), ref[..., 3:], rtol=0, atol=2e-6)


def test_detection_output_no_detection_gives_one_minus_one_row_per_image():
    loc, conf, priors = det_inputs(0, N=3)
    _, _, top = run(det_text(4, conf_thr=0.999), [loc, conf, priors])
    expect = numpy.full((1, 1, 3, 7), -1, numpy.float32)
    expect[0, 0, :, 0] = [0, 1, 2]
    numpy.testing.assert_array_equal(host(top[0].data), expect)


def test_detection_output_rows_ordered_by_image_label_then_score():
    loc, conf, priors = det_inputs(4, N=2)
    _, _, top = run(det_text(4, keep_top_k=9, conf_thr=0.05), [loc, conf, priors])
    rows = host(top[0].data)[0, 0]
    assert rows.shape[0] <= 18
    key = [(r[0], r[1], -r[2]) for r in rows]
    assert key == sorted(key)
    assert set(rows[:, 1]) <= {1, 2, 3}
    for img in (0, 1):
        assert (rows[:, 0] == img).sum() <= 9


def test_detection_output_suppresses_overlapping_boxes():
    # three priors: two almost identical, one apart; one foreground class
    priors = numpy.array([[0.1, 0.1, 0.5, 0.5, 0.12, 0.1, 0.52, 0.5, 0.6, 0.6, 0.9, 0.9],
                          [0.1] * 12], numpy.float32)[None]
    loc = numpy.zeros((1, 12), numpy.float32)
    conf = numpy.array([[0.2, 0.8, 0.1, 0.9, 0.4, 0.6]], numpy.float32)   # P x (bg, fg)
    _, _, top = run(det_text(2, nms_thr=0.5), [loc, conf, priors])
    numpy.testing.assert_allclose(host(top[0].data[0, 0]), [[0, 1, 0.9, 0.12, 0.1, 0.52, 0.5],
                                                      [0, 1, 0.6, 0.6, 0.6, 0.9, 0.9]], atol=1e-7)


@pytest.mark.parametrize("param,shapes,word,error", [
    ("num_classes: 0", None, "num_classes must be set", ConfigError),
    ("share_location: true", None, "num_classes must be set", ConfigError),
    ("num_classes: 3 nms_param { eta: 1.5 }", None, "eta", ConfigError),
    ("num_classes: 3", [(1, 40), (1, 30), (1, 2, 40)], None, None),
    ("num_classes: 3", [(1, 44), (1, 30), (1, 2, 40)], "location predictions", ShapeError),
    ("num_classes: 3", [(1, 40), (1, 33), (1, 2, 40)], "confidence predictions", ShapeError),
    ("num_classes: 3", [(2, 40), (1, 30), (1, 2, 40)], "same number of images", ShapeError),
    ("num_classes: 3 share_location: false", [(1, 40), (1, 30), (1, 2, 40)], "location predictions",
     ShapeError),
])
def test_detection_output_errors(param, shapes, word, error):
    text = 'type: "DetectionOutput" detection_output_param { %s }' % param
    shapes = shapes or [(1, 40), (1, 30), (1, 2, 40)]
    if word is None:
        layer = make_layer(text)
        layer.SetUp([Blob(s, xp=XP) for s in shapes], [Blob((), xp=XP)])
        return
    err = setup_error(text, shapes)
    assert isinstance(err, error) and word in str(err) and "DetectionOutput" in str(err)


def test_detection_output_refuses_backward():
    loc, conf, priors = det_inputs(0)
    layer, bottom, top = run(det_text(4), [loc, conf, priors])
    layer.Backward(top, [False, False, False], bottom)        # nothing asked: fine
    with pytest.raises(NetlibError, match="no backward"):
        layer.Backward(top, [True, False, False], bottom)
