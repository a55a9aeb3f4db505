"""Loss layers (Caffe's LossLayer family) and Accuracy.

A loss layer takes (prediction, label) bottoms and writes a scalar top of
shape ().  Its loss weight defaults to 1 on top 0 (Caffe's LossLayer adds a
single ``loss_weight: 1`` when none is given, so a loss layer with a second top
needs one weight per top, exactly as in Caffe).  The loss weight lives in the
top's diff, so every backward scales by ``top[0].diff`` and a loss_weight != 1
flows through.  Backward to the label (bottom 1) is refused, and force_backward
skips it.

Normalization (SoftmaxWithLoss, SigmoidCrossEntropyLoss, InfogainLoss):
FULL = outer * inner, VALID = count of non-ignored positions, BATCH_SIZE =
outer, NONE = 1, then clamped to at least 1.  When ``loss_param.normalization``
is unset but the deprecated ``normalize`` is set, true means VALID and false
BATCH_SIZE.

Labels are read as Caffe does (``static_cast<int>``: truncation toward zero).
Caffe only DCHECKs label ranges; netlib raises LayerError for a label outside
[0, num_classes) that is not the ignore_label.
"""
import numpy

from ..blob import Blob
from .. import forward_mode
from .. import second_order
from ..errors import ConfigError, ShapeError
from ..files import read_blobproto
from ..layer import Layer, register_layer
from ..proto import caffe_pb2

FLT_MIN = float(numpy.finfo(numpy.float32).tiny)  # C's FLT_MIN, used by SoftmaxWithLoss
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD (MultinomialLogistic, Infogain)

_NORM = caffe_pb2.LossParameter


def _normalization_mode(loss_param, default):
    """The normalization a layer uses: the explicit field, else legacy
    ``normalize`` (true VALID, false BATCH_SIZE), else ``default``."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _NORM.VALID if loss_param.normalize else _NORM.BATCH_SIZE
    return default


def _normalizer(mode, outer, inner, valid_count):
    """Caffe's LossLayer::GetNormalizer (valid_count -1 means 'all')."""
    if mode == _NORM.FULL:
        n = outer * inner
    elif mode == _NORM.VALID:
        n = outer * inner if valid_count == -1 else valid_count
    elif mode == _NORM.BATCH_SIZE:
        n = outer
    elif mode == _NORM.NONE:
        n = 1
    else:
        raise ConfigError("unknown normalization mode %r" % mode)
    return max(1.0, float(n))


def _softmax(x, out, xp):
    """Softmax over axis 1 of an (outer, C, inner) array, as Caffe: subtract
    the max, exp, divide by the sum."""
    xp.subtract(x, x.max(axis=1, keepdims=True), out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


class _LabelMixin:
    """Label helpers shared by the classification losses and Accuracy."""

    def _set_class_geometry(self, bottom, axis_param, what="axis"):
        """outer/channels/inner around the class axis; the labels must number
        outer * inner (ShapeError naming the shapes otherwise).  Returns the axis."""
        axis = self._axis(bottom[0], axis_param, bottom)
        self.outer = bottom[0].count_axes(0, axis)
        self.inner = bottom[0].count_axes(axis + 1)
        self.channels = bottom[0].shape[axis]
        if self.outer * self.inner != bottom[1].count:
            self.fail("number of labels must match number of predictions: with %s %d and "
                      "prediction shape %s the label count must be %d, got %d"
                      % (what, axis, bottom[0].shape, self.outer * self.inner, bottom[1].count),
                      bottom=bottom, error=ShapeError)
        return axis

    def _labels(self, label_blob, shape, num_classes, bottom):
        """(int64 labels safe for indexing (ignored positions read class 0),
        mask of non-ignored positions or None when there is no ignore_label).
        Raises LayerError for a non-ignored label outside [0, num_classes)."""
        xp = label_blob.xp
        lab = label_blob.data.reshape(shape).astype(numpy.int64)
        valid = (lab != self.ignore_label) if self.has_ignore_label else None
        bad = (lab < 0) | (lab >= num_classes)
        if valid is not None:
            bad &= valid
        if bool(bad.any()):
            first = int(lab[bad].ravel()[0])
            self.fail("label value %d is outside [0, %d) (and is not the ignore_label)"
                      % (first, num_classes), bottom=bottom)
        safe = lab if valid is None else xp.where(valid, lab, 0)
        return safe, valid

    @staticmethod
    def _grid(xp, outer, inner):
        return xp.arange(outer)[:, None], xp.arange(inner)[None, :]

    def _axis(self, blob, axis, bottom):
        try:
            return blob.canonical_axis_index(axis)
        except ShapeError as exc:
            self.fail("bad axis %d: %s" % (axis, exc), bottom=bottom, error=ShapeError)


class LossLayer(Layer, _LabelMixin):
    """Base of the loss layers: bottoms (prediction, label), top a scalar ().

    Loss weight 1 on top 0 by default; a top is created when none is named
    (auto_top_blobs); backward to bottom 1 (the label) is refused and
    force_backward skips it.  Reshape checks that both bottoms have the same
    first dimension (Caffe's "The data and label should have the same first
    dimension") and raises ShapeError naming the layer and shapes otherwise.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1
    auto_top_blobs = True
    has_ignore_label = False
    ignore_label = 0

    def default_loss_weight(self, top_index):
        return 1.0 if top_index == 0 else 0.0

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def SetUp(self, bottom, top):
        if not len(self.layer_param.loss_weight) and len(top) > 1:
            # Caffe's LossLayer::LayerSetUp adds one loss_weight (1), which then
            # fails SetLossWeights' "once per top blob" check.
            self.fail("loss_weight must be unspecified or specified once per top blob: a loss "
                      "layer with %d tops needs one loss_weight per top (for example "
                      "loss_weight: 1 loss_weight: 0), as in Caffe" % len(top), top=top)
        super().SetUp(bottom, top)

    def _read_loss_param(self):
        lp = self.layer_param.loss_param
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)

    def reshape(self, bottom, top):
        for b in bottom[:2]:
            if b.ndim < 1:
                self.fail("loss inputs need at least one axis", bottom=bottom, error=ShapeError)
        if bottom[0].shape[0] != bottom[1].shape[0]:
            self.fail("the data and label should have the same first dimension (%d vs %d)"
                      % (bottom[0].shape[0], bottom[1].shape[0]), bottom=bottom, error=ShapeError)
        top[0].reshape(())

    def _refuse_label_backward(self, propagate_down, bottom, indices=(1,)):
        for i in indices:
            if i < len(propagate_down) and propagate_down[i]:
                self.fail("cannot backpropagate to %s input (bottom %d)"
                          % ("label" if i == 1 else "infogain", i), bottom=bottom)

    def _top_diff(self, top):
        """top[0].diff[0] (the loss weight) as a scalar of the layer dtype."""
        return self.dtype.type(float(top[0].diff.reshape(-1)[0]))

    def _write_loss(self, top, log_terms, valid):
        """top[0] = -sum(log_terms over non-ignored positions) / normalizer,
        and the probabilities as top[1] when asked (Softmax/Infogain)."""
        xp = self.xp
        if valid is None:
            loss = -float(log_terms.sum(dtype=numpy.float64))
            count = self.outer * self.inner
        else:
            loss = -float(xp.where(valid, log_terms, 0).sum(dtype=numpy.float64))
            count = int(valid.sum())
        norm = _normalizer(self.normalization, self.outer, self.inner, count)
        top[0].data[...] = self.dtype.type(loss) / self.dtype.type(norm)
        if len(top) > 1:
            top[1].share_data(self._prob)


def _softmax_tangent(layer, dz):
    """dp = p (dz - <p, dz>) along the class axis of a softmax loss, (outer, C, inner)."""
    p = layer._prob.data.reshape(layer._shape3())
    dz = dz.reshape(layer._shape3())
    return p * (dz - layer.xp.einsum("ocj,ocj->oj", p, dz)[:, None, :])


def _prob_top_tangent(layer, bottom, top, tangents):
    """JVP of a softmax loss's probabilities top."""
    return [_softmax_tangent(layer, tangents[0]).reshape(bottom[0].shape).astype(layer.dtype, copy=False)]


def _normalized_rop(layer, out, valid, top_diff, shape):
    """The tail of the per-position softmax losses' second-order rules:
    ``out`` (outer, C, inner) zeroed where the label is ignored, divided by
    Caffe's normalizer over the valid count, times the loss's top diff."""
    count = layer.outer * layer.inner
    if valid is not None:
        out = out * valid[:, None, :]
        count = int(valid.sum())
    norm = _normalizer(layer.normalization, layer.outer, layer.inner, count)
    out = out * (top_diff.reshape(()) / layer.dtype.type(norm))
    return out.reshape(shape).astype(layer.dtype, copy=False)


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """Softmax followed by multinomial logistic loss.

    Bottoms: x with classes along ``softmax_param.axis`` (default 1), shape
    (outer..., C, inner...); label with outer * inner values (any shape).
    Tops: the loss (); optionally prob, shaped like x (shares the softmax).
    Loss = -sum over non-ignored positions of log(max(p[label], FLT_MIN)) /
    normalizer (``loss_param``: ignore_label, normalization, legacy normalize).
    Backward: dx = (p - onehot(label)) * top.diff / normalizer, zero at
    ignored positions.
    """

    exact_num_top_blobs = None
    min_top_blobs = 1
    max_top_blobs = 2

    def setup(self, bottom, top):
        self._read_loss_param()
        self.normalization = _normalization_mode(self.layer_param.loss_param, _NORM.VALID)
        self._prob = Blob(bottom[0].shape, dtype=self.dtype, xp=self.xp)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.softmax_axis = self._set_class_geometry(bottom, self.layer_param.softmax_param.axis,
                                                     "softmax axis")
        self._prob.reshape(bottom[0].shape)
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    extra_top_tangents = _prob_top_tangent  # the probabilities top: the softmax's tangent

    def _shape3(self):
        return (self.outer, self.channels, self.inner)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self._shape3())
        prob = _softmax(x, self._prob.data.reshape(self._shape3()), xp)
        safe, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        o, i = self._grid(xp, self.outer, self.inner)
        logp = xp.log(xp.maximum(prob[o, safe, i], self.dtype.type(FLT_MIN)))
        self._write_loss(top, logp, valid)

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """dx = w (p - onehot) / norm at the valid positions gives
        d(dx) = w p (dz - <p, dz>) / norm there (the softmax's Hessian)."""
        if not propagate_down[0] or t.bottom[0] is None:
            return [None, None], []
        out = _softmax_tangent(self, t.bottom[0])
        _, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        return [_normalized_rop(self, out, valid, top_diffs[0], bottom[0].shape), None], []

    def backward(self, top, propagate_down, bottom):
        self._refuse_label_backward(propagate_down, bottom)
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        dx = bottom[0].diff.reshape(self._shape3())
        dx[...] = self._prob.data.reshape(self._shape3())
        safe, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        o, i = self._grid(xp, self.outer, self.inner)
        if valid is None:
            dx[o, safe, i] -= 1
            count = self.outer * self.inner
        else:
            dx[o, safe, i] -= valid.astype(dx.dtype)
            dx *= valid[:, None, :]
            count = int(valid.sum())
        norm = _normalizer(self.normalization, self.outer, self.inner, count)
        dx *= self._top_diff(top) / self.dtype.type(norm)


@register_layer("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """loss = sum((a - b)^2) / (2 N), N = a.shape[0].

    Bottoms a and b: same first dimension and same count(1) (Caffe's "Inputs
    must have the same dimension").  Both bottoms get gradients:
    da = (a - b) * top.diff / N, db = -da; force_backward reaches both.
    """

    def allow_force_backward(self, bottom_index):
        return True

    def setup(self, bottom, top):
        self._diff = None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count_axes(1) != bottom[1].count_axes(1):
            self.fail("inputs must have the same dimension (count(1) %d vs %d)"
                      % (bottom[0].count_axes(1), bottom[1].count_axes(1)), bottom=bottom, error=ShapeError)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        a = bottom[0].data.reshape(-1)
        d = self._diff
        if d is None or d.shape != a.shape or d.dtype != a.dtype:
            d = self._diff = xp.empty(a.shape, dtype=a.dtype)
        xp.subtract(a, bottom[1].data.reshape(-1), out=d)
        f = self.dtype.type
        dot = f(float(xp.dot(d, d)))
        top[0].data[...] = dot / f(bottom[0].shape[0]) / f(2)

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """da = w (a - b) / N, db = -da: d(da) = w (d a - d b) / N, d(db) = -d(da)."""
        da, db = t.bottom
        if da is None and db is None:
            return [None, None], []
        d = da if db is None else (-db if da is None else da - db)
        d = d.reshape(bottom[0].shape) * (top_diffs[0].reshape(()) / self.dtype.type(bottom[0].shape[0]))
        return [d if propagate_down[0] else None,
                (-d).reshape(bottom[1].shape) if propagate_down[1] else None], []

    def backward(self, top, propagate_down, bottom):
        n = self.dtype.type(bottom[0].shape[0])
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = self.dtype.type(sign) * self._top_diff(top) / n
                bottom[i].xp.multiply(self._diff.reshape(bottom[i].shape), alpha, out=bottom[i].diff)


@register_layer("Accuracy")
class AccuracyLayer(Layer, _LabelMixin):
    """Classification accuracy (not a loss: loss weight 0, no backward).

    Bottoms: scores with classes along ``accuracy_param.axis`` (default 1) and
    labels (outer * inner values).  Tops: accuracy (); optionally per-class
    accuracy of shape (C,).  A position is correct iff fewer than ``top_k``
    OTHER classes score >= the true class's score (Caffe's rule: ties count
    against).  Positions with ``ignore_label`` are skipped; the accuracy
    divides by the non-ignored count (0 when there is none); a class never
    seen gets per-class accuracy 0.  force_backward does not reach it (Caffe
    would abort with NOT_IMPLEMENTED).
    """

    exact_num_bottom_blobs = 2
    min_top_blobs = 1
    max_top_blobs = 2

    def setup(self, bottom, top):
        p = self.layer_param.accuracy_param
        self.top_k = int(p.top_k)
        self.has_ignore_label = p.HasField("ignore_label")
        self.ignore_label = int(p.ignore_label)

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        if bottom[1].count == 0 or self.top_k > bottom[0].count // bottom[1].count:
            self.fail("top_k must be less than or equal to the number of classes (top_k %d)"
                      % self.top_k, bottom=bottom, error=ShapeError)
        self._set_class_geometry(bottom, self.layer_param.accuracy_param.axis)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        safe, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        o, i = self._grid(xp, self.outer, self.inner)
        true_score = x[o, safe, i]
        better = (x >= true_score[:, None, :]).sum(axis=1) - 1  # the true class counts itself
        correct = better < self.top_k
        if valid is not None:
            correct &= valid
            count = int(valid.sum())
        else:
            count = self.outer * self.inner
        hits = int(correct.sum())
        f = self.dtype.type
        top[0].data[...] = 0 if count == 0 else f(hits) / f(count)
        if len(top) > 1:
            labels = safe if valid is None else safe[valid]
            nums = xp.bincount(labels.ravel(), minlength=self.channels)
            good = xp.bincount(safe[correct].ravel(), minlength=self.channels)
            per_class = top[1].data
            per_class[...] = 0
            seen = nums > 0
            per_class[seen] = good[seen].astype(self.dtype) / nums[seen].astype(self.dtype)

    jvp = forward_mode.zero_jvp  # d top = 0 (data layers, piecewise constant outputs).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.fail("Accuracy has no backward", bottom=bottom)


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """Cross-entropy of sigmoid(x) against targets t in [0, 1] (same count as x).

    loss = -sum over non-ignored i of [x (t - [x >= 0]) - log(1 + e^(x - 2x[x >= 0]))]
    / normalizer.  Default normalization BATCH_SIZE (x.shape[0]) when neither
    ``normalization`` nor ``normalize`` is set (Caffe's choice for this layer);
    an element is ignored when int(t) == ignore_label.  The sigmoid is
    Caffe's 0.5 tanh(0.5 x) + 0.5.  Backward: dx = (sigmoid(x) - t) *
    top.diff / normalizer, zero where ignored.
    """

    def setup(self, bottom, top):
        self._read_loss_param()
        self.normalization = _normalization_mode(self.layer_param.loss_param, _NORM.BATCH_SIZE)
        self._sig = None
        self._norm = 1.0

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            self.fail("inputs must have the same count (%d vs %d)"
                      % (bottom[0].count, bottom[1].count), bottom=bottom, error=ShapeError)
        self.outer = bottom[0].shape[0]
        self.inner = bottom[0].count_axes(1)

    def _valid(self, bottom):
        if not self.has_ignore_label:
            return None
        return bottom[1].data.reshape(bottom[0].shape).astype(numpy.int64) != self.ignore_label

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        s = self._sig
        if s is None or s.shape != x.shape or s.dtype != x.dtype:
            s = self._sig = xp.empty(x.shape, dtype=x.dtype)
        half = self.dtype.type(0.5)
        xp.multiply(x, half, out=s)
        xp.tanh(s, out=s)
        s *= half
        s += half
        pos = (x >= 0).astype(x.dtype)
        term = x * (t - pos) - xp.log1p(xp.exp(-xp.abs(x)))
        valid = self._valid(bottom)
        if valid is None:
            loss = -float(term.sum(dtype=numpy.float64))
            count = x.size
        else:
            loss = -float(xp.where(valid, term, 0).sum(dtype=numpy.float64))
            count = int(valid.sum())
        self._norm = _normalizer(self.normalization, self.outer, self.inner, count)
        top[0].data[...] = self.dtype.type(loss) / self.dtype.type(self._norm)

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """dx = w (s - t) / norm gives d(dx) = w s (1 - s) dx / norm (valid positions)."""
        if not propagate_down[0] or t.bottom[0] is None:
            return [None, None], []
        s = self._sig
        out = s * (1 - s) * t.bottom[0].reshape(s.shape)
        valid = self._valid(bottom)
        if valid is not None:
            out = out * valid
        out = out * (top_diffs[0].reshape(()) / self.dtype.type(self._norm))
        return [out.reshape(bottom[0].shape).astype(self.dtype, copy=False), None], []

    def backward(self, top, propagate_down, bottom):
        self._refuse_label_backward(propagate_down, bottom)
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        xp = bottom[0].xp
        xp.subtract(self._sig, bottom[1].data.reshape(dx.shape), out=dx)
        valid = self._valid(bottom)
        if valid is not None:
            dx *= valid
        dx *= self._top_diff(top) / self.dtype.type(self._norm)


@register_layer("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge loss (``hinge_loss_param.norm``: L1 default, or L2).

    Bottoms: scores x (N, ...) flattened to (N, D), labels (N values in
    [0, D)).  With t = +1 at the label and -1 elsewhere, m = max(0, 1 - t x):
    L1 loss = sum(m) / N, L2 loss = sum(m^2) / N.  Backward: L1 dx = -t *
    [m > 0] * top.diff / N, L2 dx = -2 t m * top.diff / N.
    """

    def setup(self, bottom, top):
        self.norm = self.layer_param.hinge_loss_param.norm
        self._margin = None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[1].count != bottom[0].shape[0]:
            self.fail("needs one label per item (%d items, %d labels)"
                      % (bottom[0].shape[0], bottom[1].count), bottom=bottom, error=ShapeError)

    def _signed(self, bottom):
        """(x with the label entries negated, as (N, D), row indices, labels)."""
        xp = bottom[0].xp
        n = bottom[0].shape[0]
        dim = bottom[0].count // n if n else 0
        lab = bottom[1].data.reshape(-1).astype(numpy.int64)
        if bool(((lab < 0) | (lab >= dim)).any()):
            first = int(lab[(lab < 0) | (lab >= dim)][0])
            self.fail("label value %d is outside [0, %d)" % (first, dim), bottom=bottom)
        return xp.arange(n), lab

    def forward(self, bottom, top):
        xp = bottom[0].xp
        n = bottom[0].shape[0]
        rows, lab = self._signed(bottom)
        m = bottom[0].data.reshape(n, -1).copy()
        m[rows, lab] *= -1
        m += 1
        xp.maximum(m, 0, out=m)
        self._margin = m
        f = self.dtype.type
        flat = m.reshape(-1)
        if self.norm == caffe_pb2.HingeLossParameter.L2:
            total = f(float(xp.dot(flat, flat)))
        else:
            total = f(float(flat.sum()))
        top[0].data[...] = total / f(n)

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """L1: piecewise constant gradient (zero); L2: dx = 2 w s m / N with the
        margin m = max(0, 1 + s x) gives d(dx) = 2 w [m > 0] dx / N."""
        if (self.norm != caffe_pb2.HingeLossParameter.L2 or not propagate_down[0]
                or t.bottom[0] is None):
            return [None, None], []
        n = bottom[0].shape[0]
        active = (self._margin > 0).astype(self.dtype)
        out = active * t.bottom[0].reshape(n, -1) * (top_diffs[0].reshape(()) * self.dtype.type(2)
                                                      / self.dtype.type(n))
        return [out.reshape(bottom[0].shape), None], []

    def backward(self, top, propagate_down, bottom):
        self._refuse_label_backward(propagate_down, bottom)
        if not propagate_down[0]:
            return
        xp = bottom[0].xp
        n = bottom[0].shape[0]
        rows, lab = self._signed(bottom)
        g = self._margin.copy()
        g[rows, lab] *= -1
        f = self.dtype.type
        if self.norm == caffe_pb2.HingeLossParameter.L2:
            g *= self._top_diff(top) * f(2) / f(n)
        else:
            g = xp.sign(g)
            g *= self._top_diff(top) / f(n)
        bottom[0].diff[...] = g.reshape(bottom[0].shape)


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """loss = -sum_n log(max(p[n, label_n], 1e-20)) / N for probabilities p.

    Bottoms: p (N, ...) flattened to (N, D); labels with one value per item
    (Caffe: channels = height = width = 1).  Backward: dp[n, label_n] =
    -top.diff / N / max(p, 1e-20), zero elsewhere.
    """

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[1].count_axes(1) != 1:
            self.fail("the label must hold one value per item (shape (N,) or (N,1,1,1))",
                      bottom=bottom, error=ShapeError)

    def _pick(self, bottom):
        xp = bottom[0].xp
        n = bottom[0].shape[0]
        p = bottom[0].data.reshape(n, -1)
        lab = bottom[1].data.reshape(-1).astype(numpy.int64)
        bad = (lab < 0) | (lab >= p.shape[1])
        if bool(bad.any()):
            self.fail("label value %d is outside [0, %d)" % (int(lab[bad][0]), p.shape[1]),
                      bottom=bottom)
        rows = xp.arange(n)
        return rows, lab, xp.maximum(p[rows, lab], self.dtype.type(LOG_THRESHOLD))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        _, _, prob = self._pick(bottom)
        f = self.dtype.type
        loss = -float(xp.log(prob).sum(dtype=numpy.float64))
        top[0].data[...] = f(loss) / f(bottom[0].shape[0])

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """dp[label] = -w / (N p[label]) gives d(dp[label]) = w dp[label] / (N p[label]^2)
        (zero where p was clipped at 1e-20)."""
        if not propagate_down[0] or t.bottom[0] is None:
            return [None, None], []
        xp = self.xp
        n = bottom[0].shape[0]
        rows, lab, prob = self._pick(bottom)
        raw = bottom[0].data.reshape(n, -1)[rows, lab]
        dp = t.bottom[0].reshape(n, -1)[rows, lab]
        out = xp.zeros((n, bottom[0].count // max(n, 1)), dtype=self.dtype)
        w = top_diffs[0].reshape(()) / self.dtype.type(n)
        out[rows, lab] = xp.where(raw > self.dtype.type(LOG_THRESHOLD), w * dp / (prob * prob), 0)
        return [out.reshape(bottom[0].shape), None], []

    def backward(self, top, propagate_down, bottom):
        self._refuse_label_backward(propagate_down, bottom)
        if not propagate_down[0]:
            return
        n = bottom[0].shape[0]
        rows, lab, prob = self._pick(bottom)
        dx = bottom[0].diff.reshape(n, -1)
        dx[...] = 0
        scale = -self._top_diff(top) / self.dtype.type(n)
        dx[rows, lab] = scale / prob


@register_layer("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Contrastive loss (``contrastive_loss_param``: margin 1, legacy_version false).

    Bottoms: a and b (N, C) or (N, C, 1, 1), and sim (N values; similar iff
    int(sim) != 0).  With d = ||a - b||:
    loss = sum [sim d^2 + (1 - sim) max(margin - d, 0)^2] / (2N), or with
    legacy_version max(margin - d^2, 0) for dissimilar pairs.
    Backward (a gets +, b gets -; alpha = top.diff / N): similar pairs
    alpha (a - b); dissimilar pairs with positive margin term
    -alpha (margin - d) / (d + 1e-4) (a - b) (Caffe's 1e-4 kept; legacy:
    -alpha (a - b)).  No gradient to sim.
    """

    exact_num_bottom_blobs = 3

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def setup(self, bottom, top):
        p = self.layer_param.contrastive_loss_param
        self.margin = float(p.margin)
        self.legacy = bool(p.legacy_version)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b, sim = bottom
        for blob in (a, b):
            if blob.ndim > 4 or blob.count_axes(2) != 1:
                self.fail("a and b must be (N, C) or (N, C, 1, 1)", bottom=bottom, error=ShapeError)
        if a.count_axes(1) != b.count_axes(1):
            self.fail("a and b must have the same channels (%d vs %d)" % (a.count_axes(1), b.count_axes(1)),
                      bottom=bottom, error=ShapeError)
        if sim.ndim < 1 or sim.ndim > 4 or sim.count != a.shape[0]:
            self.fail("sim must hold one value per pair (%d pairs)" % a.shape[0],
                      bottom=bottom, error=ShapeError)

    def _similar(self, bottom):
        return bottom[2].data.reshape(-1).astype(numpy.int64) != 0

    def forward(self, bottom, top):
        xp = bottom[0].xp
        n = bottom[0].shape[0]
        d = bottom[0].data.reshape(n, -1) - bottom[1].data.reshape(n, -1)
        self._diff = d
        self._dist_sq = dist_sq = (d * d).sum(axis=1)
        f = self.dtype.type
        margin = f(self.margin)
        if self.legacy:
            dissim = xp.maximum(margin - dist_sq, 0)
        else:
            dissim = xp.maximum(margin - xp.sqrt(dist_sq), 0)
            dissim = dissim * dissim
        per_pair = xp.where(self._similar(bottom), dist_sq, dissim)
        loss = f(float(per_pair.sum(dtype=numpy.float64)))
        top[0].data[...] = loss / f(n) / f(2)

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """da = c(r) e, db = -da, e = a - b, r = |e|, the active set fixed: c = w/N
        (similar), -w/N (legacy dissimilar), -w/N (m - r) / (r + 1e-4) (dissimilar):
        d(da) = c de + (dc/dr) (e . de / r) e with dc/dr = (w/N) (m + 1e-4) / (r + 1e-4)^2."""
        xp = self.xp
        da, db = t.bottom[0], t.bottom[1]
        if da is None and db is None:
            return [None, None, None], []
        n = bottom[0].shape[0]
        f = self.dtype.type
        e = self._diff
        de = (da if da is not None else 0) - (db if db is not None else 0)
        de = xp.asarray(de, dtype=self.dtype).reshape(n, -1)
        w = top_diffs[0].reshape(()) / f(n)
        similar = self._similar(bottom)
        margin = f(self.margin)
        if self.legacy:
            active = (margin - self._dist_sq) > 0
            c = xp.where(similar, w, xp.where(active, -w, f(0)))
            dc = xp.zeros(n, dtype=self.dtype)
        else:
            r = xp.sqrt(self._dist_sq)
            active = (margin - r) > 0
            c = xp.where(similar, w, xp.where(active, -w * (margin - r) / (r + f(1e-4)), f(0)))
            slope = w * (margin + f(1e-4)) / ((r + f(1e-4)) ** 2)
            dr = (e * de).sum(axis=1) / xp.where(r > 0, r, f(1))
            dc = xp.where(similar | ~active, f(0), slope * dr)
        out = (c[:, None] * de + dc[:, None] * e).astype(self.dtype)
        return [out.reshape(bottom[0].shape) if propagate_down[0] else None,
                (-out).reshape(bottom[1].shape) if propagate_down[1] else None, None], []

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 2 and propagate_down[2]:
            self.fail("cannot backpropagate to the similarity input (bottom 2)", bottom=bottom)
        xp = bottom[0].xp
        n = bottom[0].shape[0]
        f = self.dtype.type
        margin = f(self.margin)
        similar = self._similar(bottom)
        for i, sign in ((0, 1), (1, -1)):
            if not propagate_down[i]:
                continue
            alpha = f(sign) * self._top_diff(top) / f(n)
            if self.legacy:
                mdist = margin - self._dist_sq
                beta = xp.full(mdist.shape, -alpha, dtype=self.dtype)
            else:
                dist = xp.sqrt(self._dist_sq)
                mdist = margin - dist
                beta = -alpha * mdist / (dist + f(1e-4))
            coeff = xp.where(similar, alpha, xp.where(mdist > 0, beta, 0)).astype(self.dtype)
            bottom[i].diff[...] = (self._diff * coeff[:, None]).reshape(bottom[i].shape)


@register_layer("InfogainLoss")
class InfogainLossLayer(LossLayer):
    """Infogain loss: softmax (applied internally) weighted by an infogain matrix H.

    Bottoms: x with classes along ``infogain_loss_param.axis`` (default 1),
    labels (outer * inner values), and optionally H (C x C values); without a
    third bottom H is read from the binaryproto ``infogain_loss_param.source``.
    Tops: the loss (); optionally the softmax probabilities.
    loss = -sum over non-ignored positions of sum_k H[label, k] *
    log(max(p_k, 1e-20)) / normalizer (``loss_param.normalization``, default
    VALID; the deprecated ``normalize`` is rejected, as in Caffe).
    Backward: dx_k = (p_k * sum_j H[label, j] - H[label, k]) * top.diff /
    normalizer, zero at ignored positions; no gradient to labels or H.
    """

    exact_num_bottom_blobs = None
    min_bottom_blobs = 2
    max_bottom_blobs = 3
    exact_num_top_blobs = None
    min_top_blobs = 1
    max_top_blobs = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom, top):
        self._read_loss_param()
        lp = self.layer_param.loss_param
        if lp.HasField("normalize"):
            self.fail("loss_param.normalize is deprecated for InfogainLoss; use normalization",
                      error=ConfigError)
        self.normalization = lp.normalization
        self._prob = Blob(bottom[0].shape, dtype=self.dtype, xp=self.xp)
        self._H = None
        if len(bottom) < 3:
            source = self.layer_param.infogain_loss_param.source
            if not source:
                self.fail("infogain matrix source must be specified (infogain_loss_param.source) "
                          "when there is no third bottom", error=ConfigError)
            proto = read_blobproto(source)
            self._H = Blob((), dtype=self.dtype, xp=self.xp).from_proto(proto)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self._set_class_geometry(bottom, self.layer_param.infogain_loss_param.axis)
        H = self._H if self._H is not None else bottom[2]
        if H.count != self.channels * self.channels:
            self.fail("the infogain matrix must hold %d x %d values, got shape %s"
                      % (self.channels, self.channels, H.shape), bottom=bottom, error=ShapeError)
        self._prob.reshape(bottom[0].shape)
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def _matrix(self, bottom):
        H = self._H if self._H is not None else bottom[2]
        return H.data.reshape(self.channels, self.channels)

    extra_top_tangents = _prob_top_tangent  # the probabilities top: the softmax's tangent

    def _shape3(self):
        return (self.outer, self.channels, self.inner)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self._shape3())
        prob = _softmax(x, self._prob.data.reshape(self._shape3()), xp)
        safe, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        logp = xp.log(xp.maximum(prob, self.dtype.type(LOG_THRESHOLD)))
        rows = self._matrix(bottom)[safe]                # (outer, inner, C)
        terms = (rows.transpose(0, 2, 1) * logp).sum(axis=1)  # (outer, inner)
        self._write_loss(top, terms, valid)

    jvp = forward_mode.scalar_jvp  # d loss = sum_i <d loss / d bottom_i, d bottom_i>.

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """dx = w (p rowsum(H)[label] - H[label]) / norm gives d(dx) = w rowsum(H)[label] dp / norm,
        dp = p (dz - <p, dz>) (valid positions).  A tangent dH of a third
        bottom adds w (p rowsum(dH)[label] - dH[label]) / norm (H gets no diff)."""
        none = [None] * len(bottom)
        dz = t.bottom[0]
        dH = t.bottom[2] if len(bottom) > 2 and len(t.bottom) > 2 else None
        if not propagate_down[0] or (dz is None and dH is None):
            return none, []
        H = self._matrix(bottom)
        safe, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        p = self._prob.data.reshape(self._shape3())
        out = 0
        if dz is not None:
            out = _softmax_tangent(self, dz) * H.sum(axis=1)[safe][:, None, :]
        if dH is not None:
            dH = dH.reshape(self.channels, self.channels)
            out = out + p * dH.sum(axis=1)[safe][:, None, :] - dH[safe].transpose(0, 2, 1)
        return [_normalized_rop(self, out, valid, top_diffs[0], bottom[0].shape)] + none[1:], []

    def backward(self, top, propagate_down, bottom):
        self._refuse_label_backward(propagate_down, bottom, indices=(1, 2))
        if not propagate_down[0]:
            return
        H = self._matrix(bottom)
        safe, valid = self._labels(bottom[1], (self.outer, self.inner), self.channels, bottom)
        prob = self._prob.data.reshape(self._shape3())
        row_sums = H.sum(axis=1)
        dx = bottom[0].diff.reshape(self._shape3())
        dx[...] = prob * row_sums[safe][:, None, :] - H[safe].transpose(0, 2, 1)
        if valid is None:
            count = self.outer * self.inner
        else:
            dx *= valid[:, None, :]
            count = int(valid.sum())
        norm = _normalizer(self.normalization, self.outer, self.inner, count)
        dx *= self._top_diff(top) / self.dtype.type(norm)
