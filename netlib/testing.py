"""Numerical gradient checking for layers (Caffe's GradientChecker, in float64).

Use it to check a layer you wrote yourself::

    from netlib.testing import check_gradient
    result = check_gradient('type: "ReLU" relu_param { negative_slope: 0.1 }',
                            bottom_shapes=[(2, 3, 4)])
    print(result)          # worst relative error and what was checked

The checker builds the layer in float64, runs forward, and takes as objective
``f = sum_t sum(top_t * R_t)`` with fixed random ``R_t`` (so ``top.diff = R``).
The analytic gradient from ``backward`` is compared, element by element, with
the centred difference ``(f(x + h) - f(x - h)) / 2h`` for every bottom that
propagates and every parameter blob.  An element passes when
``|analytic - numeric| <= threshold * max(|analytic|, |numeric|, 1)``.

Kink guard: at a non-smooth point (ReLU at 0, max ties, a clip boundary) the
centred difference is meaningless.  An element is skipped when its one-sided
differences disagree by more than ``kink_tolerance`` relative to their scale,
or when it lies within ``kink_range`` of ``kink`` (Caffe's explicit guard).
Layers that draw random numbers (Dropout) are re-seeded before every forward
so each evaluation sees the same draws; parameter blobs that forward updates
(running statistics) are restored before every forward.
"""
import numpy

from . import backend
from .blob import Blob
from .errors import NetlibError


class GradientCheckError(NetlibError, AssertionError):
    """The analytic and numerical gradients disagree."""


class GradientCheckResult:
    """What a check found: ``worst_error`` (relative), ``worst_where``,
    ``checked`` and ``skipped`` element counts and the list of ``failures``
    as (where, analytic, numeric) tuples."""

    def __init__(self):
        self.worst_error = 0.0
        self.worst_where = None
        self.checked = 0
        self.skipped = 0
        self.failures = []

    @property
    def ok(self):
        return not self.failures

    def __repr__(self):
        return ("GradientCheckResult(ok=%s, worst_error=%.3g at %s, checked=%d, skipped_kinks=%d)"
                % (self.ok, self.worst_error, self.worst_where, self.checked, self.skipped))


def _layer_param(layer):
    from google.protobuf import text_format
    from .proto import caffe_pb2
    if isinstance(layer, caffe_pb2.LayerParameter):
        return layer
    text = str(layer)
    param = caffe_pb2.LayerParameter()
    try:
        text_format.Parse(text, param)
    except text_format.ParseError:
        net = caffe_pb2.NetParameter()
        text_format.Parse(text, net)
        if len(net.layer) != 1:
            raise ValueError("check_gradient needs exactly one layer, got %d" % len(net.layer))
        param = net.layer[0]
    return param


class _Setup:
    """A layer built in float64 on the current array module, with its blobs."""

    def __init__(self, layer, bottom_shapes, bottoms, params, phase, num_tops, seed):
        from .layer import create_layer
        from .proto import caffe_pb2
        from .random import set_random_seed

        self.param = caffe_pb2.LayerParameter()
        self.param.CopyFrom(_layer_param(layer))
        phase_value = caffe_pb2.TRAIN if str(phase).upper() in ("TRAIN", "0") else caffe_pb2.TEST
        self.rng = numpy.random.default_rng(seed)  # draws the bottoms, then the caller's tangents
        if bottoms is None:
            bottoms = [self.rng.standard_normal(tuple(s)) for s in (bottom_shapes or [])]
        self.xp = xp = backend.default_xp()
        self.bottom_arrays = [numpy.array(backend.to_numpy(b), dtype=numpy.float64) for b in bottoms]
        self.bottom = []
        for arr in self.bottom_arrays:
            blob = Blob(arr.shape, dtype=numpy.float64, xp=xp)
            blob.data[...] = arr
            self.bottom.append(blob)
        self.n_top = num_tops if num_tops is not None else max(len(self.param.top), 1)
        self.top = [Blob((), dtype=numpy.float64, xp=xp) for _ in range(self.n_top)]
        set_random_seed(seed)
        self.layer = create_layer(self.param, phase=phase_value, dtype=numpy.float64, xp=xp)
        self.layer.SetUp(self.bottom, self.top)
        if params is not None:
            for blob, arr in zip(self.layer.blobs, params):
                blob.data[...] = numpy.asarray(backend.to_numpy(arr), dtype=numpy.float64)


def check_gradient(layer, bottom_shapes=None, bottoms=None, params=None, phase="TRAIN",
                   step=1e-3, threshold=1e-3, kink=None, kink_range=-1.0, kink_tolerance=1e-2,
                   check_bottoms=None, check_params=True, num_tops=None, seed=1701,
                   raise_on_failure=True):
    """Check ``layer``'s backward against centred differences.

    Args:
        layer: the layer as prototxt text (``type: "X" x_param {...}``, or a
            one-layer ``layer {...}``) or a LayerParameter.
        bottom_shapes: shapes of the bottoms, filled with N(0, 1) values.
        bottoms: explicit bottom arrays (for labels or chosen points) instead.
        params: optional arrays to load into the layer's blobs after setup.
        phase: "TRAIN" or "TEST".
        step, threshold: the difference step h and the relative tolerance.
        kink, kink_range: skip inputs with ``|x - kink| < kink_range``.
        kink_tolerance: one-sided differences disagreeing by more than this
            (relatively) mark a non-smooth point, which is skipped.
        check_bottoms: indices of bottoms to check (default: every bottom the
            layer allows backward to).
        check_params: also check every parameter blob.
        num_tops: number of tops (default: the layer's ``top`` list, or 1).
        seed: seed for the objective weights and the layer's random draws.
        raise_on_failure: raise GradientCheckError listing the worst failures.

    Returns:
        GradientCheckResult.

    The layer and its blobs live on netlib's current array module
    (:func:`netlib.backend.default_xp`: NumPy, or the device module of
    ``set_mode_gpu`` / ``backend.set_mode_device``); the differences are
    taken on the host.
    """
    from .random import set_random_seed

    s = _Setup(layer, bottom_shapes, bottoms, params, phase, num_tops, seed)
    param, rng, xp = s.param, s.rng, s.xp
    bottom, top, lay = s.bottom, s.top, s.layer
    param_snapshot = [b.data.copy() for b in lay.blobs]

    def run_forward():
        for blob, saved in zip(lay.blobs, param_snapshot):
            blob.data[...] = saved
        set_random_seed(seed + 1)
        lay.Forward(bottom, top)

    run_forward()
    weights = [rng.standard_normal(t.shape) for t in top]
    if xp is not numpy:
        weights = [xp.asarray(w) for w in weights]

    def objective():
        run_forward()
        return sum(float((t.data * w).sum()) for t, w in zip(top, weights))

    # Analytic gradients.
    if check_bottoms is None:
        check_bottoms = [i for i in range(len(bottom)) if lay.allow_force_backward(i)]
    propagate = [i in check_bottoms for i in range(len(bottom))]
    # Zero first: a top may share its diff with a bottom or a param (Flatten, Reshape).
    for b in bottom:
        b.diff[...] = 0
    for blob in lay.blobs:
        blob.diff[...] = 0
    for t, w in zip(top, weights):
        t.diff[...] = w
    lay.Backward(top, propagate, bottom)
    targets = [("bottom[%d]" % i, bottom[i], backend.to_numpy(bottom[i].diff.copy())) for i in check_bottoms]
    if check_params:
        targets += [("param[%d]" % k, blob, backend.to_numpy(blob.diff.copy()))
                    for k, blob in enumerate(lay.blobs) if lay.param_propagate_down[k]]

    result = GradientCheckResult()
    f0 = objective()
    for label, blob, analytic in targets:
        data = blob.data
        flat = data.reshape(-1)
        values = backend.to_numpy(flat)  # (itself on numpy; a host copy of a device array)
        ana = analytic.reshape(-1)
        is_param = label.startswith("param")
        for idx in range(flat.size):
            x0 = values[idx]
            if kink is not None and kink_range > 0 and abs(x0 - kink) < kink_range:
                result.skipped += 1
                continue
            if is_param:
                param_snapshot[int(label[6:-1])].reshape(-1)[idx] = x0 + step
            flat[idx] = x0 + step
            f_plus = objective()
            if is_param:
                param_snapshot[int(label[6:-1])].reshape(-1)[idx] = x0 - step
            flat[idx] = x0 - step
            f_minus = objective()
            if is_param:
                param_snapshot[int(label[6:-1])].reshape(-1)[idx] = x0
            flat[idx] = x0
            numeric = (f_plus - f_minus) / (2 * step)
            right, left = (f_plus - f0) / step, (f0 - f_minus) / step
            if abs(right - left) > kink_tolerance * max(abs(right), abs(left), 1.0):
                result.skipped += 1
                continue
            a = float(ana[idx])
            scale = max(abs(a), abs(numeric), 1.0)
            err = abs(a - numeric) / scale
            result.checked += 1
            where = "%s%s" % (label, numpy.unravel_index(idx, data.shape) if data.ndim else "")
            if err > result.worst_error:
                result.worst_error, result.worst_where = err, where
            if err > threshold:
                result.failures.append((where, a, numeric))
        objective()  # leave the layer in the unperturbed state
    if raise_on_failure and result.failures:
        lines = ["%s: analytic %.6g vs numeric %.6g" % f for f in result.failures[:10]]
        raise GradientCheckError("gradient check failed for %s (%d of %d elements); worst relative "
                                 "error %.3g at %s:\n  %s" % (param.type, len(result.failures),
                                                              result.checked, result.worst_error,
                                                              result.worst_where, "\n  ".join(lines)))
    return result


def check_jvp(layer, bottom_shapes=None, bottoms=None, params=None, phase="TRAIN", step=1e-4,
              threshold=1e-4, check_bottoms=None, check_params=True, num_tops=None, seed=1701,
              raise_on_failure=True):
    """Check ``layer``'s forward-mode rule (``Layer.jvp``) against centred
    differences of its forward, in float64.

    Arguments as :func:`check_gradient`.  One random N(0, 1) tangent is drawn
    for every checked bottom (default: those the layer allows backward to)
    and, with ``check_params``, every parameter blob; the tops' tangents from
    ``jvp`` are compared, element by element, with
    ``(f(x + h t) - f(x - h t)) / 2h``.  An element passes when
    ``|jvp - numeric| <= threshold * max(|jvp|, |numeric|, 1)``; an element
    whose one-sided differences disagree (a kink: ReLU at 0, a max switch) is
    skipped.  Returns a GradientCheckResult (``where`` names ``top[i](...)``).
    """
    from .random import set_random_seed

    s = _Setup(layer, bottom_shapes, bottoms, params, phase, num_tops, seed)
    param, rng, xp, bottom_arrays = s.param, s.rng, s.xp, s.bottom_arrays
    bottom, top, n_top, lay = s.bottom, s.top, s.n_top, s.layer
    param_values = [backend.to_numpy(b.data).copy() for b in lay.blobs]
    if check_bottoms is None:
        check_bottoms = [i for i in range(len(bottom)) if lay.allow_force_backward(i)]
    tangents = [rng.standard_normal(a.shape) if i in check_bottoms else numpy.zeros(a.shape)
                for i, a in enumerate(bottom_arrays)]
    ptangents = [rng.standard_normal(v.shape) if check_params and lay.param_propagate_down[k] else None
                 for k, v in enumerate(param_values)]

    def run(eps):
        for blob, v, t in zip(lay.blobs, param_values, ptangents):
            blob.data[...] = xp.asarray(v + eps * t if t is not None else v)
        for blob, a, t in zip(bottom, bottom_arrays, tangents):
            blob.data[...] = xp.asarray(a + eps * t)
        set_random_seed(seed + 1)
        lay.Forward(bottom, top)
        return [backend.to_numpy(t.data).astype(numpy.float64).copy() for t in top]

    f0 = run(0.0)
    jvp = lay.jvp(bottom, top, [xp.asarray(t) for t in tangents],
                  [xp.asarray(t) if t is not None else None for t in ptangents]
                  if any(t is not None for t in ptangents) else None)
    jvp = [backend.to_numpy(j) for j in jvp]
    fp, fm = run(step), run(-step)
    run(0.0)
    result = GradientCheckResult()
    for i in range(n_top):
        _compare(result, "top[%d]" % i, jvp[i], fp[i], f0[i], fm[i], step, threshold, "jvp of " + param.type)
    if raise_on_failure and result.failures:
        lines = ["%s: jvp %.6g vs numeric %.6g" % f for f in result.failures[:10]]
        raise GradientCheckError("jvp check failed for %s; worst relative error %.3g at %s:\n  %s"
                                 % (param.type, result.worst_error, result.worst_where, "\n  ".join(lines)))
    return result


def _compare(result, label, got, fp, f0, fm, step, threshold, what):
    """Element-wise check of ``got`` against the centred difference of
    fp/fm (values at +h and -h; f0 at 0), skipping kinks (one-sided
    differences disagreeing); adds to ``result``."""
    got = numpy.asarray(got)
    if tuple(got.shape) != tuple(f0.shape):
        raise GradientCheckError("%s returned shape %s for %s, expected %s" % (what, got.shape, label, f0.shape))
    if got.dtype != numpy.float64:
        raise GradientCheckError("%s returned dtype %s for %s, not the blob dtype float64" % (what, got.dtype, label))
    num = (fp - fm) / (2 * step)
    right, left = (fp - f0) / step, (f0 - fm) / step
    kinked = numpy.abs(right - left) > 1e-2 * numpy.maximum(numpy.maximum(abs(right), abs(left)), 1.0)
    scale = numpy.maximum(numpy.maximum(abs(got), abs(num)), 1.0)
    err = numpy.where(kinked, 0.0, abs(got - num) / scale)
    result.skipped += int(kinked.sum())
    result.checked += int(err.size - kinked.sum())

    def where(k):
        return "%s%s" % (label, tuple(int(v) for v in numpy.unravel_index(k, err.shape)) if err.ndim else "")

    err = numpy.where(numpy.isnan(err), numpy.inf, err)
    if err.size:
        k = int(err.argmax())
        if err.flat[k] > result.worst_error:
            result.worst_error, result.worst_where = float(err.flat[k]), where(k)
        for k in numpy.flatnonzero(~(err <= threshold))[:20]:  # NaN fails too
            result.failures.append((where(k), float(got.flat[k]), float(num.flat[k])))


def check_hvp(layer, bottom_shapes=None, bottoms=None, params=None, phase="TRAIN", step=1e-4,
              threshold=1e-4, check_bottoms=None, check_params=True, num_tops=None, seed=1701,
              raise_on_failure=True):
    """Check ``layer``'s second-order rule (``Layer.backward_jvp``, what
    ``Net.hvp`` runs) against centred differences of its backward, in float64.

    Arguments as :func:`check_gradient`.  The top diffs are fixed random
    ``R`` (the objective ``sum_t <top_t, R_t>``); one random tangent is drawn
    for every checked bottom and, with ``check_params``, every learned
    parameter blob.  The rule's derivatives of the bottoms' and parameters'
    diffs are compared, element by element, with ``(g(x + h t) - g(x - h t))
    / 2h``, g the backward's diffs; kinks are skipped as in :func:`check_jvp`.
    Returns a GradientCheckResult (``where`` names ``bottom[i](...)`` or
    ``param[k](...)``).
    """
    from .random import set_random_seed
    from .second_order import Tangents

    s = _Setup(layer, bottom_shapes, bottoms, params, phase, num_tops, seed)
    param, rng, xp, bottom_arrays = s.param, s.rng, s.xp, s.bottom_arrays
    bottom, top, lay = s.bottom, s.top, s.layer
    param_values = [backend.to_numpy(b.data).copy() for b in lay.blobs]
    if check_bottoms is None:
        check_bottoms = [i for i in range(len(bottom)) if lay.allow_force_backward(i)]
    propagate = [i in check_bottoms for i in range(len(bottom))]
    learned = [bool(check_params and p) for p in lay.param_propagate_down]
    tangents = [rng.standard_normal(a.shape) if i in check_bottoms else None for i, a in enumerate(bottom_arrays)]
    ptangents = [rng.standard_normal(v.shape) if learned[k] else None for k, v in enumerate(param_values)]
    set_random_seed(seed + 1)
    lay.Forward(bottom, top)
    weights = [xp.asarray(rng.standard_normal(t.shape)) for t in top]

    def grads(eps):
        for blob, v, t in zip(lay.blobs, param_values, ptangents):
            blob.data[...] = xp.asarray(v + eps * t if t is not None else v)
        for blob, a, t in zip(bottom, bottom_arrays, tangents):
            blob.data[...] = xp.asarray(a + eps * t if t is not None else a)
        set_random_seed(seed + 1)
        lay.Forward(bottom, top)
        for b in bottom:
            b.diff[...] = 0
        for blob in lay.blobs:
            blob.diff[...] = 0
        for t, w in zip(top, weights):
            t.diff[...] = w
        lay.Backward(top, propagate, bottom)
        return ([backend.to_numpy(b.diff).astype(numpy.float64).copy() if p else None
                 for b, p in zip(bottom, propagate)],
                [backend.to_numpy(b.diff).astype(numpy.float64).copy() if w else None
                 for b, w in zip(lay.blobs, learned)])

    fp, fm = grads(step), grads(-step)
    f0 = grads(0.0)
    dev = [xp.asarray(t) if t is not None else None for t in tangents]
    pdev = [xp.asarray(t) if t is not None else None for t in ptangents]
    set_random_seed(seed + 1)
    tops_t = lay.jvp(bottom, top, [d if d is not None else xp.zeros(b.shape, dtype=b.dtype)
                                   for d, b in zip(dev, bottom)], pdev if any(p is not None for p in pdev) else None)
    lay.Forward(bottom, top)  # the state backward_jvp reads: forward, then backward, at x
    for t, w in zip(top, weights):
        t.diff[...] = w
    lay.Backward(top, propagate, bottom)
    sb, sp = lay.backward_jvp(top, propagate, bottom, list(weights), Tangents(dev, list(tops_t), pdev))
    result = GradientCheckResult()
    for label, got, p, m, z in ([("bottom[%d]" % i, sb[i], fp[0][i], fm[0][i], f0[0][i])
                                 for i in range(len(bottom)) if propagate[i]] +
                                [("param[%d]" % k, sp[k], fp[1][k], fm[1][k], f0[1][k])
                                 for k in range(len(lay.blobs)) if learned[k]]):
        got = numpy.zeros_like(z) if got is None else backend.to_numpy(got)
        _compare(result, label, got, p, z, m, step, threshold, "backward_jvp of " + param.type)
    if raise_on_failure and result.failures:
        lines = ["%s: rule %.6g vs numeric %.6g" % f for f in result.failures[:10]]
        raise GradientCheckError("hvp check failed for %s; worst relative error %.3g at %s:\n  %s"
                                 % (param.type, result.worst_error, result.worst_where, "\n  ".join(lines)))
    return result
