"""Box utilities of the SSD fork (its ``bbox_util``), vectorized.

Boxes are arrays whose last axis is (xmin, ymin, xmax, ymax) in normalized
image coordinates.  Every function takes the array module ``xp`` of its
inputs and keeps their dtype, so float32 boxes give the fork's float32
arithmetic (it keeps boxes, sizes and overlaps in C ``float``).

Facts kept from the fork on purpose:

* a box with ``xmax < xmin`` or ``ymax < ymin`` has size 0 (``BBoxSize``);
* the overlap of two boxes is 0 unless the intersection has a positive width
  *and* height; otherwise ``inter / (size1 + size2 - inter)``
  (``JaccardOverlap`` on normalized boxes);
* greedy NMS keeps a candidate when its overlap with *every* box kept so far
  is ``<=`` the current threshold; after each kept box the threshold is
  multiplied by ``eta`` while it is above 0.5 (adaptive NMS,
  ``ApplyNMSFast``);
* candidates are the scores ``> score_threshold``, stably sorted by
  decreasing score, cut to ``top_k`` when ``top_k > -1``
  (``GetMaxScoreIndex``).
"""
import numpy

CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3
CODE_TYPE_NAMES = {CORNER: "CORNER", CENTER_SIZE: "CENTER_SIZE", CORNER_SIZE: "CORNER_SIZE"}


def box_sizes(xp, boxes):
    """Areas of ``boxes`` (..., 4); 0 for an inverted box (the fork's BBoxSize)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return xp.where((w < 0) | (h < 0), xp.zeros_like(w), w * h)


def decode_boxes(xp, loc, priors, variances, code_type, variance_encoded_in_target=False):
    """Decode predicted offsets ``loc`` (..., P, 4) against ``priors`` (P, 4).

    ``variances`` (P, 4) scale the offsets unless ``variance_encoded_in_target``.
    With offsets t and the prior p (corners) or (cx, cy, w, h):

    * CORNER:      box = p + v * t
    * CORNER_SIZE: box = p + v * t * (pw, ph, pw, ph)
    * CENTER_SIZE: cx = v0 t0 pw + pcx, cy = v1 t1 ph + pcy,
      w = exp(v2 t2) pw, h = exp(v3 t3) ph; box = (cx -+ w/2, cy -+ h/2).

    Returns an array of loc's shape and dtype.  The exponential is taken in
    float64 and rounded, and the half sizes are subtracted in float64, as the
    fork's ``exp(float)`` / ``x - w / 2.`` promote to double before storing a
    float.
    """
    dtype = loc.dtype
    if variance_encoded_in_target:
        variances = xp.ones_like(priors)
    else:
        variances = variances.astype(dtype, copy=False)
    priors = priors.astype(dtype, copy=False)
    if code_type == CORNER:
        return priors + variances * loc
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == CORNER_SIZE:
        size = xp.stack([pw, ph, pw, ph], axis=-1)
        return priors + variances * loc * size
    if code_type != CENTER_SIZE:
        raise ValueError("unknown code_type %r" % (code_type,))
    wide = numpy.float64
    pcx = ((priors[:, 0].astype(wide) + priors[:, 2]) / 2.0).astype(dtype)
    pcy = ((priors[:, 1].astype(wide) + priors[:, 3]) / 2.0).astype(dtype)
    cx = variances[:, 0] * loc[..., 0] * pw + pcx
    cy = variances[:, 1] * loc[..., 1] * ph + pcy
    w = (xp.exp((variances[:, 2] * loc[..., 2]).astype(wide)).astype(dtype) * pw).astype(wide) / 2.0
    h = (xp.exp((variances[:, 3] * loc[..., 3]).astype(wide)).astype(dtype) * ph).astype(wide) / 2.0
    cx = cx.astype(wide)
    cy = cy.astype(wide)
    return xp.stack([cx - w, cy - h, cx + w, cy + h], axis=-1).astype(dtype)


def overlap_matrix(xp, a, b):
    """Jaccard overlaps (len(a), len(b)) of boxes ``a`` (A, 4) and ``b`` (B, 4).

    The intersection sides are clamped at 0, so a pair without a positive
    width and height (or whose product underflows) has intersection 0 and
    overlap 0, the fork's rule; otherwise ``inter / (size_a + size_b - inter)``.
    """
    ix = xp.minimum(a[:, None, 2], b[None, :, 2])
    ix -= xp.maximum(a[:, None, 0], b[None, :, 0])
    iy = xp.minimum(a[:, None, 3], b[None, :, 3])
    iy -= xp.maximum(a[:, None, 1], b[None, :, 1])
    xp.maximum(ix, 0, out=ix)
    xp.maximum(iy, 0, out=iy)
    inter = ix
    inter *= iy
    union = box_sizes(xp, a)[:, None] + box_sizes(xp, b)[None, :]
    union -= inter
    inter /= xp.where(inter > 0, union, xp.ones_like(union))
    return inter


def max_score_indices(xp, scores, score_threshold, top_k=-1):
    """Indices of ``scores`` above ``score_threshold``, best first (ties keep
    index order), at most ``top_k`` of them when ``top_k > -1``."""
    idx = xp.nonzero(scores > score_threshold)[0]
    order = xp.argsort(-scores[idx], kind="stable")
    idx = idx[order]
    if top_k is not None and top_k > -1:
        idx = idx[:top_k]
    return idx


def nms(xp, boxes, scores, score_threshold, nms_threshold, eta=1.0, top_k=-1):
    """The fork's greedy (adaptive) NMS; returns kept indices, best first.

    ``boxes`` (P, 4), ``scores`` (P,).  The overlaps of the candidates are one
    broadcast (K x K for K candidates); the loop runs once per *kept* box: after a
    box is kept, ``worst[j]`` (the largest overlap of candidate j with any
    kept box) is updated and the next kept box is the first later candidate
    with ``worst <= threshold`` (the threshold only changes when a box is
    kept, so this is exactly the fork's candidate-by-candidate test).
    """
    cand = max_score_indices(xp, scores, score_threshold, top_k)
    n = int(cand.shape[0])
    if n == 0:
        return cand
    dtype = boxes.dtype.type
    cb = boxes[cand]
    ov = overlap_matrix(xp, cb, cb)
    thr = dtype(nms_threshold)
    eta = dtype(eta)
    half = dtype(0.5)
    worst = xp.zeros(n, dtype=ov.dtype)
    kept = []
    i = 0
    while True:
        kept.append(i)
        worst = xp.maximum(worst, ov[i])
        if eta < 1 and thr > half:
            thr = dtype(thr * eta)
        rest = worst[i + 1:] <= thr
        if rest.shape[0] == 0:
            break
        j = int(rest.argmax())
        if not bool(rest[j]):
            break
        i = i + 1 + j
    return cand[xp.asarray(kept)]
