"""Second-order derivatives through a net: Hessian-vector products
(Pearlmutter's R-operator), Gauss-Newton-vector products and Jacobians.

``Net.hvp(v)`` returns ``H v``, H the Hessian of the net's loss with respect
to its learnable parameters, exactly (up to float rounding), in about three
forward+backward passes:

1. a forward pass with tangents (:func:`netlib.forward_mode.forward_tangents`):
   every blob's value and its directional derivative along v;
2. the backward pass, as training runs it, and beside it, layer by layer
   from the loss down, the tangent of every diff: for a layer with top
   diffs g, bottom tangents dx, parameter tangents dw and top-diff tangents
   dg (from the layer above),

       R{bottom diff} = backward(dg) + d/de backward(x + e dx, w + e dw; g)

   and the same for the parameters' diffs.  The first term is the layer's own
   backward of dg.  The second, with g held fixed, is the layer's
   second-order rule ``Layer.backward_jvp``: zero for layers whose backward
   does not depend on their inputs (linear and piecewise linear layers:
   ReLU, max pooling, Concat...), the backward with one factor replaced by its
   tangent for multilinear layers (InnerProduct, Convolution, Scale...), and
   the second derivative for smooth ones (f''(x) dx g for the neurons, the
   Softmax and BatchNorm formulas, the loss Hessians).

The Gauss-Newton product ``G v = J^T H_loss J v`` (``Net.gnvp``) is the same
pass with the second-order terms kept for the loss layers only; for the
softmax and Euclidean losses it is positive semi-definite.

Rules are checked like gradients: :func:`netlib.testing.check_hvp` compares
a layer's ``backward_jvp`` with centred differences of its backward.
"""
import collections

import numpy

from .blob import Blob
from .forward_mode import JVPError, forward_tangents, kept_state


class HVPError(JVPError):
    """A second-order product cannot be computed (no rule, no loss, bad direction)."""


#: What a second-order rule sees besides the blobs: the tangents of the
#: bottoms, tops and parameter blobs (lists; None entries are zero).
Tangents = collections.namedtuple("Tangents", "bottom top params")


def _scratch(like, shape=None, data=None):
    b = Blob(tuple(like.shape if shape is None else shape), dtype=like.dtype, xp=like.xp)
    if data is not None:
        b.data[...] = data
    return b


def backward_parts(layer, bottom, top, top_diffs, propagate, want_params, bottom_data=None,
                   param_data=None, refresh=False):
    """The layer's backward on scratch blobs, its own blobs untouched.

    ``top_diffs``: one array per top.  ``propagate``: per bottom, compute
    its diff.  ``want_params``: per parameter blob, compute its diff.
    ``bottom_data`` / ``param_data``: {index: array} replacing those inputs'
    values for this run (the layer's parameters are restored after).  With
    ``refresh`` the layer's forward runs first on the scratch tops (for a
    backward that reads what forward computed).  Returns (bottom diffs,
    parameter diffs): arrays, None where not asked for.
    """
    bottom_data = bottom_data or {}
    param_data = param_data or {}
    alias = not bottom_data and not refresh
    in_place = {id(t) for t in top} & {id(b) for b in bottom} if alias else set()
    tops = []
    for t, d in zip(top, top_diffs):
        s = Blob((), dtype=t.dtype, xp=t.xp)
        s.reshape(t.shape)
        if not refresh:
            s.share_data(t)
        if id(t) in in_place or refresh or d.dtype != t.dtype or not d.flags.c_contiguous:
            s.diff[...] = d  # the backward writes the bottom's diff over it
        else:
            s._diff_buf = d.reshape(-1)  # read only: adopted without a copy
        tops.append(s)
    bots = []
    for i, b in enumerate(bottom):
        same = [s for s, t in zip(tops, top) if t is b] if alias else []
        if same:
            bots.append(same[0])  # in place: the layer sees the same blob, as in the net
            continue
        s = Blob((), dtype=b.dtype, xp=b.xp)
        s.reshape(b.shape)
        if i in bottom_data:
            s.data[...] = bottom_data[i]
        else:
            s.share_data(b)
        s.diff  # allocated as zeros
        bots.append(s)
    state = kept_state(layer).__enter__()
    saved_ppd = list(layer.param_propagate_down)
    saved = []
    try:
        for k, blob in enumerate(layer.blobs):
            saved.append((blob, blob.diff.copy() if want_params[k] else None,
                          blob.data.copy() if k in param_data else None))
            if want_params[k]:
                blob.diff[...] = 0
            if k in param_data:
                blob.data[...] = param_data[k]
        layer.param_propagate_down = [bool(w) for w in want_params]
        if refresh:
            layer.reshape(bots, tops)
            layer.forward(bots, tops)
            for s, d in zip(tops, top_diffs):
                s.diff[...] = d
        layer.backward(tops, list(propagate), bots)
        pdiffs = [blob.diff.copy() if w else None for blob, w in zip(layer.blobs, want_params)]
    finally:
        layer.param_propagate_down = saved_ppd
        for blob, diff, data in saved:
            if diff is not None:
                blob.diff[...] = diff
            if data is not None:
                blob.data[...] = data
        state.__exit__()  # what the layer's own forward left for its backward
    bdiffs = [b.diff if p else None for b, p in zip(bots, propagate)]  # the scratch blobs' own
    return bdiffs, pdiffs


def _learned(layer):
    return [bool(p) for p in layer.param_propagate_down]


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def zero_rop(layer, top, propagate_down, bottom, top_diffs, t):
    """The backward does not depend on the inputs' values (linear layers) or
    only through a piecewise constant choice (ReLU, max, clip, dropout):
    the second-order term is zero."""
    return [None] * len(bottom), [None] * len(layer.blobs)


def multilinear_rop(layer, top, propagate_down, bottom, top_diffs, t, bottom_factors=(0,),
                    param_factors=(0,), refresh=False):
    """The layer is linear in each factor (the others fixed) plus terms
    without them (biases): the derivative of a factor's gradient is the sum,
    over the other factors j, of the backward with factor j replaced by its
    tangent.  One backward run per factor with a nonzero tangent."""
    nb, nk = len(bottom), len(layer.blobs)
    out_b, out_p = [None] * nb, [None] * nk
    learned = _learned(layer)
    factors = [("b", i) for i in bottom_factors] + [("p", k) for k in param_factors if k < nk]
    for kind, j in factors:
        tangent = t.bottom[j] if kind == "b" else (t.params[j] if t.params else None)
        if tangent is None:
            continue
        prop = [bool(propagate_down[i]) and i in bottom_factors and not (kind == "b" and i == j)
                for i in range(nb)]
        want = [learned[k] and k in param_factors and not (kind == "p" and k == j) for k in range(nk)]
        if not any(prop) and not any(want):
            continue
        bd, pd = backward_parts(layer, bottom, top, top_diffs, prop, want,
                                bottom_data={j: tangent} if kind == "b" else None,
                                param_data={j: tangent} if kind == "p" else None, refresh=refresh)
        out_b = [_add(a, b) for a, b in zip(out_b, bd)]
        out_p = [_add(a, b) for a, b in zip(out_p, pd)]
    return out_b, out_p


def weighted_rop(layer, top, propagate_down, bottom, top_diffs, t):
    """W*x + b (InnerProduct, Convolution, Deconvolution): d(dL/dx) = dW^T g,
    d(dL/dW) = g (x) dx, the bias gradient's derivative zero."""
    return multilinear_rop(layer, top, propagate_down, bottom, top_diffs, t, (0,), (0,))


def scale_rop(layer, top, propagate_down, bottom, top_diffs, t):
    """x*s + b: d(dL/dx) = g ds, d(dL/ds) = sum g dx (s a bottom or a parameter)."""
    if len(bottom) > 1:
        return multilinear_rop(layer, top, propagate_down, bottom, top_diffs, t, (0, 1), ())
    return multilinear_rop(layer, top, propagate_down, bottom, top_diffs, t, (0,), (0,))


def neuron_rop(layer, top, propagate_down, bottom, top_diffs, t):
    """Element-wise y = f(x): d(dL/dx) = f''(x) dx g, f'' from the layer's
    ``second_derivative(bottom, top)`` (None: zero, piecewise linear)."""
    if not propagate_down[0] or t.bottom[0] is None:
        return [None], [None] * len(layer.blobs)
    f2 = layer.second_derivative(bottom, top)
    if f2 is None:
        return [None], [None] * len(layer.blobs)
    return [(f2 * t.bottom[0] * top_diffs[0]).astype(layer.dtype, copy=False)], [None] * len(layer.blobs)


def no_rop(layer, top, propagate_down, bottom, top_diffs, t):
    layer.fail("has no second-order (hvp) rule", error=HVPError)


# -- the net driver --------------------------------------------------------------------------------

def _param_map(net):
    """(layer index, blob index) -> learnable param index (sharers map to the owner)."""
    out = {}
    for net_id, (li, k) in enumerate(net._param_layer_indices):
        owner = net._param_owner[net_id]
        out[(li, k)] = net._learnable_param_ids.index(owner if owner >= 0 else net_id)
    return out


def _owner_keys(net):
    """learnable index -> (layer name, blob index) of its owner."""
    keys = []
    for net_id in net._learnable_param_ids:
        li, k = net._param_layer_indices[net_id]
        keys.append((net.layer_names[li], k))
    return keys


def _directions(net, v):
    """v as {learnable index: array}, and whether it came as a list."""
    xp, dtype = net.xp, net.dtype
    params, keys = net.learnable_params, _owner_keys(net)
    if isinstance(v, (list, tuple)):
        if len(v) != len(params):
            raise HVPError("hvp: %d directions for the %d learnable parameter blobs of net %r "
                           "(net.learnable_params)" % (len(v), len(params), net.name))
        items = [(keys[l], a) for l, a in enumerate(v)]
        as_list = True
    elif isinstance(v, dict):
        items, as_list = list(v.items()), False
    else:
        raise HVPError("hvp: the direction must be a dict {(layer name, blob index): array} or a list "
                       "aligned with net.learnable_params, not %s" % type(v).__name__)
    pmap = _param_map(net)
    out = {}
    for key, value in items:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise HVPError("hvp: direction key %r is not (layer name, blob index)" % (key,))
        lname, k = key
        if lname not in net._layer_index:
            raise HVPError("hvp: direction for a parameter of layer %r: the net has no such layer" % (lname,))
        li = net._layer_index[lname]
        if (li, k) not in pmap:
            raise HVPError("hvp: direction for parameter %r of layer %r, which has %d parameter blobs"
                           % (k, lname, len(net.layers[li].blobs)))
        l = pmap[(li, k)]
        shape = tuple(params[l].shape)
        if value is None:
            continue
        if tuple(numpy.shape(value)) != shape:
            raise HVPError("hvp: direction for parameter (%r, %d) has shape %s, the parameter %s"
                           % (lname, k, tuple(numpy.shape(value)), shape))
        if l in out:
            raise HVPError("hvp: two directions for the same (shared) parameter %r" % (keys[l],))
        out[l] = xp.asarray(value, dtype=dtype)
    return out, as_list


def _loss_layers(net, loss):
    """Indices of the layers with a weighted top, after selecting ``loss``
    (None: every loss of the net; a blob name or a list of them)."""
    weighted = {}
    for i, layer in enumerate(net.layers):
        for j, tid in enumerate(net.top_ids[i]):
            if layer.loss(j):
                weighted.setdefault(net._blob_names[tid], []).append((i, j))
    if not weighted:
        raise HVPError("hvp: net %r has no loss (no top with a non-zero loss_weight): the Hessian is "
                       "of a scalar objective; add a loss layer or set loss_weight on a top" % net.name)
    if loss is None:
        return weighted, set(weighted)
    chosen = [loss] if isinstance(loss, str) else list(loss)
    for name in chosen:
        if name not in weighted:
            raise HVPError("hvp: %r is not a loss of net %r (its losses: %s)"
                           % (name, net.name, ", ".join(sorted(weighted))))
    return weighted, set(chosen)


def run_hvp(net, v, loss=None, weight_decay=0.0, regularization="L2", keep_batch=True,
            gauss_newton=False):
    """Net.hvp / Net.gnvp: see there."""
    if getattr(net, "_memory", None) is not None:
        raise HVPError("hvp on net %r with reuse_memory() on: call net.reuse_memory(False)" % net.name)
    weighted, chosen = _loss_layers(net, loss)
    directions, as_list = _directions(net, v)
    pmap = _param_map(net)
    # parameters no layer computes a gradient for (lr_mult 0, BatchNorm's statistics) are held fixed
    learned = {l for (li, k), l in pmap.items() if net.layers[li].param_propagate_down[k]}
    directions = {l: d for l, d in directions.items() if l in learned}
    param_tan = {key: directions[l] for key, l in pmap.items() if l in directions}
    xp = net.xp
    # the objective: the chosen losses (the others' top diffs zeroed for this pass)
    muted = []
    for name, where in weighted.items():
        if name not in chosen:
            for i, j in where:
                t = net.top_vecs[i][j]
                muted.append((t, t.diff.copy()))
                t.diff[...] = 0
    try:
        record = []
        rerun = (lambda i: _rerun(net, i)) if keep_batch else None
        forward_tangents(net, {}, param_tan, rerun=rerun, record=record)
        net.clear_param_diffs()
        hv = [None] * len(net.learnable_params)
        rdiff = {}
        for i in range(len(net.layers) - 1, -1, -1):
            if not net.layer_need_backward[i]:
                continue
            layer, bottom, top = net.layers[i], net.bottom_vecs[i], net.top_vecs[i]
            need = net.bottom_need_backward[i]
            g = [t.diff.copy() if any(t is b for b in bottom) else t.diff for t in top]
            layer.Backward(top, need, bottom)
            bt, tt, pt = record[i]
            dg = [rdiff.get(tid) for tid in net.top_ids[i]]
            rb, rp = [None] * len(bottom), [None] * len(layer.blobs)
            if any(d is not None for d in dg):
                rb, rp = backward_parts(layer, bottom, top,
                                        [d if d is not None else xp.zeros(t.shape, dtype=t.dtype)
                                         for d, t in zip(dg, top)], need, _learned(layer))
            is_loss = any(layer.loss(j) for j in range(len(top)))
            if (not gauss_newton or is_loss) and (any(x is not None for x in bt) or
                                                 any(p is not None for p in pt)):
                sb, sp = layer.backward_jvp(top, need, bottom, g, Tangents(bt, tt, pt))
                rb = [_add(a, b) for a, b in zip(rb, sb)]
                rp = [_add(a, b) for a, b in zip(rp, sp)]
            for bid, r, n in zip(net.bottom_ids[i], rb, need):
                rdiff[bid] = r if n else None
            for k, r in enumerate(rp):
                if r is not None and layer.param_propagate_down[k] and (i, k) in pmap:
                    l = pmap[(i, k)]
                    hv[l] = _add(hv[l], r)
    finally:
        for t, d in muted:
            t.diff[...] = d
    if weight_decay and str(regularization).upper() == "L2":
        for l, d in directions.items():
            local = weight_decay * net.params_weight_decay[l]
            if local:
                hv[l] = _add(hv[l], net.dtype.type(local) * d)
    elif weight_decay and str(regularization).upper() != "L1":
        raise HVPError("hvp: unknown regularization %r (L2 or L1)" % (regularization,))
    out = [h if h is not None and l in learned else xp.zeros(p.shape, dtype=p.dtype)
           for l, (h, p) in enumerate(zip(hv, net.learnable_params))]
    out = [o.astype(net.dtype, copy=False) for o in out]
    if as_list:
        return out
    return dict(zip(_owner_keys(net), out))


def run_jacobian(net, of, wrt, max_columns=1 << 14):
    """Net.jacobian: see there."""
    if of not in net.blobs:
        raise HVPError("jacobian: the net has no blob %r" % (of,))
    if isinstance(wrt, tuple):
        lname, k = wrt
        if lname not in net._layer_index or not (0 <= k < len(net.layers[net._layer_index[lname]].blobs)):
            raise HVPError("jacobian: the net has no parameter %r" % (wrt,))
        li = net._layer_index[lname]
        shape = tuple(net.layers[li].blobs[k].shape)
    else:
        if wrt not in net.blobs:
            raise HVPError("jacobian: the net has no blob %r" % (wrt,))
        shape = tuple(net.blobs[wrt].shape)
    n = int(numpy.prod(shape)) if shape else 1
    if n > max_columns:
        raise HVPError("jacobian: %r has %d elements, more than max_columns=%d (one forward-mode pass "
                       "each); use net.jvp for directional derivatives" % (wrt, n, max_columns))
    xp, dtype = net.xp, net.dtype
    oid = net._blob_names.index(of)
    out_shape = tuple(net.blobs[of].shape)
    jac = xp.zeros((int(numpy.prod(out_shape)) if out_shape else 1, n), dtype=dtype)
    for c in range(n):
        e = xp.zeros(n, dtype=dtype)
        e[c] = 1
        e = e.reshape(shape)
        if isinstance(wrt, tuple):
            cur = forward_tangents(net, {}, {(li, k): e}, rerun=lambda i: _rerun(net, i))
        else:
            cur = forward_tangents(net, {wrt: e}, {}, rerun=lambda i: _rerun(net, i))
        col = cur.get(oid)
        if col is not None:
            jac[:, c] = col.reshape(-1)
    return jac.reshape(out_shape + shape)


def _rerun(net, i):
    """Whether a pass re-runs layer i: every layer except data sources (no
    bottoms, no parameters: Data, Input, DummyData...), whose tops keep the
    batch now in the net."""
    return bool(net.bottom_ids[i]) or bool(len(net.layers[i].blobs))
