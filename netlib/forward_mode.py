"""Forward-mode derivatives (Jacobian-vector products) through a net.

Each layer declares its tangent rule as ``Layer.jvp(bottom, top, tangents,
param_tangents)``: given the bottoms' tangents (arrays, one per bottom) and
the parameter blobs' tangents (arrays or None, one per ``layer.blobs``), it
returns the tops' tangents, computed after the layer's ``forward`` on the
same blobs (so a rule may read the forward's state: masks, argmaxes, batch
statistics).  A rule never writes the blobs' data or diff.

Most rules are one of the helpers below:

* ``linear_jvp``: the layer is linear in its bottoms and parameters together
  (Split, Concat, Slice, Flatten, Reshape, Crop, Tile, AVE Pooling, Bias,
  Eltwise SUM...): the tangent is the forward of the tangents.
* ``multilinear_jvp``: linear in each of several factors (InnerProduct and
  Convolution: input and weights; Scale; Eltwise PROD): the sum over the
  factors of the forward with that factor replaced by its tangent and the
  affine (bias) parameters zeroed, plus the forward of the bias tangents.
* ``symmetric_jvp``: the Jacobian is symmetric (elementwise neurons, Softmax,
  MVN, BatchNorm in both modes, Dropout): the tangent is the layer's own
  backward applied to the tangent.
* ``scalar_jvp``: a one-top scalar loss: ``<d loss / d bottom, tangent>``
  from the layer's backward with a unit top diff.
* ``zero_jvp``: piecewise constant outputs or data layers.

``run_jvp`` drives a whole net (``Net.jvp``): one forward pass computing
each blob's value and tangent, tangents kept per blob version (an in-place
layer's top tangent replaces its bottom's after the rule has run).
"""
import numpy

from .blob import Blob
from .errors import LayerError


class JVPError(LayerError):
    """A forward-mode derivative cannot be computed (no rule, bad tangent)."""


def _temp(like, array):
    b = Blob(tuple(array.shape), dtype=like.dtype, xp=like.xp)
    b.data[...] = array
    return b


class kept_state:
    """Run a layer on scratch blobs without disturbing what its own forward
    left for its backward: the layer's attributes (flags such as Scale's
    kept-input mark, cached shapes, buffer references) are put back on exit.
    Scratch runs are never in place, so they write no buffer a backward
    reads."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.saved = dict(self.layer.__dict__)
        return self

    def __exit__(self, *exc):
        self.layer.__dict__.update(self.saved)


def _run(layer, bottom, n_top):
    tops = [Blob((), dtype=layer.dtype, xp=layer.xp) for _ in range(n_top)]
    with kept_state(layer):
        layer.reshape(bottom, tops)
        layer.forward(bottom, tops)
    return [t.data.copy() for t in tops]


class _ParamSwap:
    """Temporarily replace parameter blobs' data (restored on exit)."""

    def __init__(self, layer, values):
        self.layer, self.values = layer, values

    def __enter__(self):
        self.saved = []
        for k, v in self.values.items():
            blob = self.layer.blobs[k]
            self.saved.append((blob, blob.data.copy()))
            blob.data[...] = v
        return self

    def __exit__(self, *exc):
        for blob, data in self.saved:
            blob.data[...] = data


def _param_tangent(layer, param_tangents, k):
    t = param_tangents[k] if param_tangents and k < len(param_tangents) else None
    return t


def zero_jvp(layer, bottom, top, tangents, param_tangents):
    """d top = 0 (data layers, piecewise constant outputs)."""
    return [t.xp.zeros(t.shape, dtype=t.dtype) for t in top]


def linear_jvp(layer, bottom, top, tangents, param_tangents):
    """d top = forward(d bottom, d params): the layer is linear in both."""
    xp = layer.xp
    swap = {k: (_param_tangent(layer, param_tangents, k) if _param_tangent(layer, param_tangents, k) is not None
                else xp.zeros(b.shape, dtype=b.dtype)) for k, b in enumerate(layer.blobs)}
    with _ParamSwap(layer, swap):
        out = _run(layer, [_temp(b, t) for b, t in zip(bottom, tangents)], len(top))
    return out


def multilinear_jvp(layer, bottom, top, tangents, param_tangents, bottom_factors=(0,),
                    param_factors=(0,), affine=()):
    """Sum over factors of forward(factor -> its tangent, biases -> 0), the
    bias tangents riding on the first such run (the layer is affine in its
    biases); factors with zero tangents are skipped."""
    xp = layer.xp
    zeros = {k: xp.zeros(layer.blobs[k].shape, dtype=layer.dtype) for k in affine}
    bias = {k: _param_tangent(layer, param_tangents, k) for k in affine}
    bias = {k: v for k, v in bias.items() if v is not None}
    out = None

    def add(res):
        nonlocal out
        out = res if out is None else [a + b for a, b in zip(out, res)]

    def swap_for(extra):
        swap = dict(zeros)
        if out is None:  # the first run carries the bias tangents
            swap.update(bias)
        swap.update(extra)
        return swap

    for i in bottom_factors:
        if not bool(xp.any(tangents[i])):
            continue
        bots = list(bottom)
        bots[i] = _temp(bottom[i], tangents[i])
        with _ParamSwap(layer, swap_for({})):
            add(_run(layer, bots, len(top)))
    for k in param_factors:
        t = _param_tangent(layer, param_tangents, k)
        if t is None:
            continue
        with _ParamSwap(layer, swap_for({k: t})):
            add(_run(layer, bottom, len(top)))
    if out is None and bias:
        swap = swap_for({})
        bots = list(bottom)
        if bottom_factors:
            bots[bottom_factors[0]] = _temp(bottom[bottom_factors[0]], xp.zeros(bottom[bottom_factors[0]].shape,
                                                                                   dtype=layer.dtype))
        else:
            swap[param_factors[0]] = xp.zeros(layer.blobs[param_factors[0]].shape, dtype=layer.dtype)
        with _ParamSwap(layer, swap):
            add(_run(layer, bots, len(top)))
    if out is None:
        out = zero_jvp(layer, bottom, top, tangents, param_tangents)
    return out


def _backward_with(layer, bottom, top, top_diffs, propagate):
    """The layer's backward on scratch diffs: returns the bottoms' diffs;
    the parameters' diffs are restored."""
    saved = [(b, b.diff.copy()) for b in layer.blobs]
    tops, bots = [], []
    for t, d in zip(top, top_diffs):
        s = Blob((), dtype=t.dtype, xp=t.xp)
        s.reshape(t.shape)
        s.share_data(t)
        s.diff[...] = d
        tops.append(s)
    for b in bottom:
        same = [s for s, t in zip(tops, top) if t is b]
        if same:
            bots.append(same[0])
            continue
        s = Blob((), dtype=b.dtype, xp=b.xp)
        s.reshape(b.shape)
        s.share_data(b)
        s.diff[...] = 0
        bots.append(s)
    try:
        with kept_state(layer):
            layer.backward(tops, propagate, bots)
    finally:
        for b, d in saved:
            b.diff[...] = d
    return [b.diff.copy() for b in bots]


def symmetric_jvp(layer, bottom, top, tangents, param_tangents):
    """d top = J d bottom = J^T d bottom: the layer's backward of the tangent."""
    if any(t is not None for t in (param_tangents or ())):
        layer.fail("has no tangent rule for its parameters", error=JVPError)
    return _backward_with(layer, bottom, top, [tangents[0]], [True] + [False] * (len(bottom) - 1))[:1]


def scalar_jvp(layer, bottom, top, tangents, param_tangents):
    """d loss = sum_i <d loss / d bottom_i, d bottom_i>; further tops (a loss
    layer's probabilities) from the layer's ``extra_top_tangents``."""
    extra = []
    if len(top) > 1:
        more = getattr(layer, "extra_top_tangents", None)
        if more is None:
            layer.fail("has a tangent rule only with one (loss) top", error=JVPError)
        extra = more(bottom, top, tangents)
    propagate = [layer.allow_force_backward(i) for i in range(len(bottom))]
    ones = top[0].xp.ones(top[0].shape, dtype=top[0].dtype)
    grads = _backward_with(layer, bottom, top, [ones], propagate)
    xp = layer.xp
    total = top[0].dtype.type(0)
    for g, t, p in zip(grads, tangents, propagate):
        if p:
            total = total + xp.sum(g * t)
    return [xp.full(top[0].shape, total, dtype=top[0].dtype)] + extra


def run_jvp(net, tangents):
    """Net.jvp: see there."""
    xp, dtype = net.layers[0].xp if net.layers else numpy, net.dtype
    blob_tan, param_tan = {}, {}
    for key, value in (tangents or {}).items():
        if isinstance(key, tuple):
            lname, k = key
            if lname not in net._layer_index:
                raise JVPError("jvp: tangent for a parameter of layer %r: the net has no such layer" % (lname,))
            layer = net.layers[net._layer_index[lname]]
            if not (0 <= k < len(layer.blobs)):
                raise JVPError("jvp: tangent for parameter %d of layer %r, which has %d parameter blobs"
                               % (k, lname, len(layer.blobs)))
            shape = layer.blobs[k].shape
            if tuple(numpy.shape(value)) != tuple(shape):
                raise JVPError("jvp: tangent for parameter (%r, %d) has shape %s, the parameter %s"
                               % (lname, k, tuple(numpy.shape(value)), tuple(shape)))
            param_tan[(net._layer_index[lname], k)] = xp.asarray(value, dtype=dtype)
        else:
            if key not in net.blobs:
                raise JVPError("jvp: tangent for blob %r: the net has no such blob" % (key,))
            shape = net.blobs[key].shape
            if tuple(numpy.shape(value)) != tuple(shape):
                raise JVPError("jvp: tangent for blob %r has shape %s, the blob %s"
                               % (key, tuple(numpy.shape(value)), tuple(shape)))
            blob_tan[key] = xp.asarray(value, dtype=dtype)
    current = forward_tangents(net, blob_tan, param_tan)
    names = net._blob_names
    return {names[tid]: (t if t is not None else xp.zeros(net._blob_list[tid].shape, dtype=dtype))
            for tid, t in current.items()}


def forward_tangents(net, blob_tan, param_tan, rerun=None, record=None):
    """One forward pass computing every blob version's tangent.

    ``blob_tan`` maps blob names to tangents, ``param_tan`` maps (layer
    index, blob index) to tangents.  A layer runs ``Forward`` unless
    ``rerun(i)`` is false (its tops keep their values), then its jvp rule
    (an in-place layer's rule gets a copy of its input taken before the
    forward, so it never reads the output in place of the input);
    a layer whose inputs all have zero tangents gets zero (None) tangents
    without running its rule (the rules are linear in the tangents).  With
    ``record`` (a list), appends (bottom tangents, top tangents, parameter
    tangents) per layer, None for zero.  Returns {blob id: tangent or None}
    for the final version of every blob.
    """
    xp = net.layers[0].xp if net.layers else numpy
    names = net._blob_names
    current = {}
    for tid in getattr(net, "_input_ids", ()):
        current[tid] = blob_tan.get(names[tid])
    if getattr(net, "_memory", None) is not None and net.layers:
        net._memory.prepare(0, len(net.layers) - 1, ())  # as Net.forward does
    for i, layer in enumerate(net.layers):
        bottom, top = net.bottom_vecs[i], net.top_vecs[i]
        bt = [current.get(bid) for bid in net.bottom_ids[i]]
        pt = [param_tan.get((i, k)) for k in range(len(layer.blobs))]
        active = any(t is not None for t in bt) or any(p is not None for p in pt)
        inputs = bottom
        if rerun is None or rerun(i):
            if active and any(b is t for b in bottom for t in top):
                # in place: the rule sees the input as it was (a copy), the layer as out of place
                inputs = [_temp(b, b.data) if any(b is t for t in top) else b for b in bottom]
            layer.Forward(bottom, top)
        if not active:
            out = [None] * len(top)
        else:
            out = layer.jvp(inputs, top, [t if t is not None else xp.zeros(b.shape, dtype=b.dtype)
                                          for t, b in zip(bt, bottom)],
                            pt if any(p is not None for p in pt) else None)
        for j, tid in enumerate(net.top_ids[i]):
            if names[tid] in blob_tan and tid not in net.bottom_ids[i]:
                out[j] = blob_tan[names[tid]]  # a given tangent replaces the producer's
            current[tid] = out[j]
        if record is not None:
            record.append((bt, list(out), pt))
    return current


def weighted_jvp(layer, bottom, top, tangents, param_tangents):
    """d(W*x + b) = W*dx + dW*x + db (InnerProduct, Convolution, Deconvolution)."""
    return multilinear_jvp(layer, bottom, top, tangents, param_tangents, (0,), (0,),
                           (1,) if len(layer.blobs) > 1 else ())


def embed_jvp(layer, bottom, top, tangents, param_tangents):
    """d(W[i] + b) = dW[i] + db (the indices have no tangent)."""
    return multilinear_jvp(layer, bottom, top, tangents, param_tangents, (), (0,),
                           (1,) if len(layer.blobs) > 1 else ())


def scale_jvp(layer, bottom, top, tangents, param_tangents):
    """d(x*s + b) = dx*s + x*ds + db (s a bottom or a parameter)."""
    if len(bottom) > 1:
        return multilinear_jvp(layer, bottom, top, tangents, param_tangents, (0, 1), (),
                               (0,) if layer.blobs else ())
    return multilinear_jvp(layer, bottom, top, tangents, param_tangents, (0,), (0,),
                           (1,) if len(layer.blobs) > 1 else ())


def max_pool_jvp(layer, bottom, top, tangents, param_tangents):
    """MAX: d top = d bottom at each window's argmax; AVE: linear."""
    from .proto import caffe_pb2
    method = layer.layer_param.pooling_param.pool
    if method == caffe_pb2.PoolingParameter.AVE:
        return linear_jvp(layer, bottom, top, tangents, param_tangents)[:1] + \
            [layer.xp.zeros(t.shape, dtype=t.dtype) for t in top[1:]]
    if method != caffe_pb2.PoolingParameter.MAX:
        layer.fail("has a tangent rule only for MAX and AVE pooling", error=JVPError)
    from .layer import create_layer
    xp = layer.xp
    if getattr(layer, "_argmax_valid", False):  # forward kept its argmax (TRAIN): no second pass
        flat = xp.empty(top[0].shape, dtype=layer.dtype)
        layer._write_mask(flat, bottom[0].shape[3])
    else:
        probe = getattr(layer, "_jvp_probe", None)
        if probe is None:
            param = caffe_pb2.LayerParameter()
            param.CopyFrom(layer.layer_param)
            del param.top[:]
            param.top.extend(["y", "mask"])
            probe = layer._jvp_probe = create_layer(param, phase=layer.phase, dtype=layer.dtype, xp=xp)
            probe.SetUp([bottom[0]], [Blob((), dtype=layer.dtype, xp=xp), Blob((), dtype=layer.dtype, xp=xp)])
        outs = [Blob((), dtype=layer.dtype, xp=xp), Blob((), dtype=layer.dtype, xp=xp)]
        probe.reshape([bottom[0]], outs)
        probe.forward([bottom[0]], outs)
        flat = outs[1].data
    idx = flat.astype(numpy.int64)
    n, c = idx.shape[:2]
    out = xp.take_along_axis(tangents[0].reshape(n, c, -1), idx.reshape(n, c, -1), axis=2).reshape(idx.shape)
    return [out.astype(layer.dtype)] + [xp.zeros(t.shape, dtype=t.dtype) for t in top[1:]]


def eltwise_jvp(layer, bottom, top, tangents, param_tangents):
    """SUM linear; PROD: sum_i dx_i prod_{j!=i} x_j; MAX: dx at the argmax bottom."""
    from .proto import caffe_pb2
    op = layer.layer_param.eltwise_param.operation
    E = caffe_pb2.EltwiseParameter
    if op == E.SUM:
        return linear_jvp(layer, bottom, top, tangents, param_tangents)
    if op == E.PROD:
        return multilinear_jvp(layer, bottom, top, tangents, param_tangents, tuple(range(len(bottom))), (), ())
    xp = layer.xp
    arg = xp.argmax(xp.stack([b.data for b in bottom]), axis=0)
    return [xp.take_along_axis(xp.stack(tangents), arg[None], axis=0)[0]]


def reduction_jvp(layer, bottom, top, tangents, param_tangents):
    """SUM/MEAN linear; ASUM: c*sum(sign(x) dx); SUMSQ: c*sum(2 x dx)."""
    from .proto import caffe_pb2
    R = caffe_pb2.ReductionParameter
    op = layer.layer_param.reduction_param.operation
    if op in (R.SUM, R.MEAN):
        return linear_jvp(layer, bottom, top, tangents, param_tangents)
    xp = layer.xp
    x = bottom[0].data
    w = xp.sign(x) if op == R.ASUM else 2 * x
    coeff = layer.layer_param.reduction_param.coeff
    shape = top[0].shape
    return [(coeff * (w * tangents[0]).reshape(int(numpy.prod(shape)) if shape else 1, -1).sum(axis=1))
            .reshape(shape).astype(layer.dtype)]


def first_bottom_linear_jvp(layer, bottom, top, tangents, param_tangents):
    """d top = forward(d bottom 0, the other bottoms as they are) (BatchReindex: indices)."""
    return multilinear_jvp(layer, bottom, top, tangents, param_tangents, (0,), (), ())


def filter_jvp(layer, bottom, top, tangents, param_tangents):
    """d top_i = the selected items of d bottom_i (the selector has no tangent)."""
    bots = [_temp(b, t) for b, t in zip(bottom[:-1], tangents[:-1])] + [bottom[-1]]
    return _run(layer, bots, len(top))


def lrn_window(layer, x):
    """(win, a, k) of an LRN layer on input x: s = k + a win(x^2).
    ACROSS_CHANNELS: win the zero-padded channel window of n, a = alpha/n;
    WITHIN_CHANNEL: win the zero-padded n x n box, a = alpha/n^2, k = 1.
    Both windows are centred, so win is its own transpose."""
    xp = layer.xp
    size, pre = layer.size, layer.pre_pad
    if layer.across:
        n = x.shape[1]

        def win(v):
            pad = [(0, 0)] * v.ndim
            pad[1] = (pre + 1, size - 1 - pre)
            c = xp.cumsum(xp.pad(v, pad), axis=1)
            return c[:, size:size + n] - c[:, :n]

        return win, layer.alpha / size, layer.k
    H, W = x.shape[2:]

    def box(v):
        return layer._box(xp.pad(v, [(0, 0), (0, 0), (pre, pre), (pre, pre)]), H, W, xp)

    return box, layer.alpha / (size * size), 1.0


def lrn_jvp(layer, bottom, top, tangents, param_tangents):
    """y = x s^-b, s = k + a win(x^2) (see lrn_window): dy = dx s^-b - b x s^(-b-1) a win(2 x dx)."""
    x, dx = bottom[0].data, tangents[0]
    win, a, k = lrn_window(layer, x)
    s = k + a * win(x * x)
    out = dx * s ** -layer.beta - layer.beta * x * s ** (-layer.beta - 1) * a * win(2 * x * dx)
    return [out.astype(layer.dtype, copy=False)]
