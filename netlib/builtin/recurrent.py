"""Recurrent layers: RNN, LSTM and LSTMUnit, with BVLC Caffe's numbers.

Caffe implements RNN and LSTM by building an unrolled sub-net (one copy of
each step's layers per time step, weights shared) in
``src/caffe/layers/{recurrent,rnn,lstm}_layer.cpp``.  Here the same
computation runs directly: one matrix product for the input transform of all
``T*N`` rows, then one small hidden-to-hidden product per time step, then (RNN)
one matrix product for the output transform.  Forward values, the gradients to
``x`` and ``x_static`` and the parameter gradients are the unrolled net's.

Conventions shared by the two recurrent layers (``recurrent_param``:
num_output H > 0, weight_filler / bias_filler (default constant 0),
debug_info (ignored: there is no inner net to trace), expose_hidden):

* Bottoms: ``x`` (T, N, ...) with at least one feature axis, ``cont``
  (T, N), optional ``x_static`` (N, ...) likewise, then with expose_hidden the initial states, each (1, N, H):
  RNN ``h_0``; LSTM ``h_0, c_0``.  ``cont[t, n] == 0`` starts a new sequence
  at step t: the previous hidden state is multiplied by ``cont[t]`` before the
  hidden-to-hidden product (for the LSTM the forget gate is too, see LSTMUnit).
* Tops: the per-step output (T, N, H), then with expose_hidden the final
  states (RNN ``h_T``; LSTM ``h_T, c_T``), each (1, N, H).
* T is fixed at setup (Caffe refuses a change); N may change between passes.
* Without expose_hidden the state carries over between forward passes: the
  initial state of a pass is the final state of the previous one (zeros
  before the first pass), as Caffe copies its h_T / c_T blobs into h_0 / c_0.
  A pass with a larger N starts from zeros, a smaller N keeps the first
  streams (Caffe's blob memory reuse).  ``reset()`` zeroes the state.
* Caffe quirks kept on purpose: no gradient flows across passes, to ``cont``
  (refused), to the exposed initial states (Caffe shares only their data with
  the inner net: their diff is written as zeros here), nor from the exposed
  final-state tops (their diffs are ignored).  Parameter gradients
  accumulate (``+=``); bottom diffs are overwritten.
"""
import numpy

from ..blob import Blob
from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..layer import Layer, register_layer


def _sigmoid(xp, x, out=None):
    """1 / (1 + exp(-x)), in place into ``out`` when given."""
    out = xp.negative(x, out=out)
    xp.exp(out, out=out)
    out += 1
    xp.reciprocal(out, out=out)
    return out


class _RecurrentLayer(Layer):
    """Shared setup, shape checks and parameter creation for RNN and LSTM.

    Subclasses set ``gate_mult`` (how many H-blocks the input transform
    produces: 1 for RNN, 4 for LSTM), ``state_names`` (the recurrent states)
    and implement ``_extra_param_specs``, ``forward`` and ``backward``.
    """

    gate_mult = 1
    state_names = ("h",)

    def __init__(self, layer_param=None, phase=None, dtype=numpy.float32, xp=None):
        super().__init__(layer_param, phase=phase, dtype=dtype, xp=xp)
        p = self.layer_param.recurrent_param
        self.expose_hidden = bool(p.expose_hidden)
        n_states = len(self.state_names) if self.expose_hidden else 0
        self.min_bottom_blobs = 2 + n_states
        self.max_bottom_blobs = 3 + n_states
        self.exact_num_top_blobs = 1 + n_states

    def check_blob_counts(self, bottom, top):
        if len(bottom) < 2:
            self.fail("needs the bottoms x (T x N x ...) and cont (T x N); the sequence "
                      "continuation bottom 'cont' is missing (%d bottom given)" % len(bottom),
                      bottom=bottom, error=ConfigError)
        n_states = len(self.state_names) if self.expose_hidden else 0
        if self.expose_hidden and len(bottom) < 2 + n_states:
            self.fail("expose_hidden needs the initial state bottom(s) %s after x, cont [, x_static]"
                      % ", ".join(s + "_0" for s in self.state_names), bottom=bottom, error=ConfigError)
        super().check_blob_counts(bottom, top)

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1  # never to the sequence indicators

    # -- setup / reshape -----------------------------------------------------
    def setup(self, bottom, top):
        p = self.layer_param.recurrent_param
        self.H = int(p.num_output)
        if self.H <= 0:
            self.fail("recurrent_param.num_output must be positive (got %d)" % self.H,
                      bottom=bottom, error=ConfigError)
        n_states = len(self.state_names) if self.expose_hidden else 0
        self.static_input = len(bottom) > 2 + n_states
        x = bottom[0]
        # Caffe's inner transform runs at axis 2 of x and axis 1 of x_static,
        # so x needs a feature axis (T, N, ...) and x_static one too (N, ...).
        if x.ndim < 3:
            self.fail("bottom[0] (x) must have at least 3 axes (T timesteps, N streams, features...)",
                      bottom=bottom, error=ShapeError)
        self.T = x.shape[0]
        self.K = x.count_axes(2)
        if self.static_input:
            if bottom[2].ndim < 2:
                self.fail("bottom[2] (x_static) must have at least 2 axes (N streams, features...)",
                          bottom=bottom, error=ShapeError)
            self.K_static = bottom[2].count_axes(1)
        self._check_shapes(bottom)
        # Carried state (Caffe's h_T / c_T blobs), with Blob memory-reuse semantics.
        self._state = [Blob((), dtype=self.dtype, xp=self.xp) for _ in self.state_names]
        if self.blobs:
            return  # parameters given already
        G = self.gate_mult * self.H
        wf = filler_param(p, "weight_filler", type="constant", value=0)
        bf = filler_param(p, "bias_filler", type="constant", value=0)
        # Caffe's order: input transform weight and bias, static weight, then
        # the subclass's recurrent (and output) parameters.
        specs = [((G, self.K), wf), ((G,), bf)]
        if self.static_input:
            specs.append(((G, self.K_static), wf))
        specs += self._extra_param_specs(wf, bf)
        for shape, filler in specs:
            blob = self.new_blob(shape)
            fill(blob, filler)
            self.blobs.append(blob)

    def _check_shapes(self, bottom):
        x, cont = bottom[0], bottom[1]
        if x.ndim < 3:
            self.fail("bottom[0] (x) must have at least 3 axes (T timesteps, N streams, features...)",
                      bottom=bottom, error=ShapeError)
        if x.shape[0] != self.T:
            self.fail("the number of timesteps changed: set up for T=%d, x now has T=%d"
                      % (self.T, x.shape[0]), bottom=bottom, error=ShapeError)
        if x.count_axes(2) != self.K:
            self.fail("x has %d values per step and stream, the layer was set up for %d"
                      % (x.count_axes(2), self.K), bottom=bottom, error=ShapeError)
        N = x.shape[1]
        if cont.ndim != 2 or tuple(cont.shape) != (self.T, N):
            self.fail("bottom[1] (cont) must have shape (T, N) = (%d, %d) like x's first two axes"
                      % (self.T, N), bottom=bottom, error=ShapeError)
        offset = 2
        if self.static_input:
            xs = bottom[2]
            if xs.ndim < 2 or xs.shape[0] != N or xs.count_axes(1) != self.K_static:
                self.fail("bottom[2] (x_static) must have shape (N=%d, ...) with %d values per stream"
                          % (N, self.K_static), bottom=bottom, error=ShapeError)
            offset = 3
        if self.expose_hidden:
            for j, name in enumerate(self.state_names):
                b = bottom[offset + j]
                if tuple(b.shape) != (1, N, self.H):
                    self.fail("bottom[%d] (%s_0) must have shape (1, N, num_output) = (1, %d, %d)"
                              % (offset + j, name, N, self.H), bottom=bottom, error=ShapeError)
        return N

    def reshape(self, bottom, top):
        self.N = self._check_shapes(bottom)
        T, N, H = self.T, self.N, self.H
        top[0].reshape((T, N, H))
        for t in top[1:]:
            t.reshape((1, N, H))
        self._hidden_offset = 3 if self.static_input else 2

    def reset(self):
        """Zero the carried state (Caffe's RecurrentLayer::Reset)."""
        for s in self._state:
            s.data[...] = 0

    # -- helpers ------------------------------------------------------------
    def _buffer(self, name, shape):
        """A reusable internal array of ``shape`` (reallocated when it grows)."""
        buf = getattr(self, name, None)
        count = 1
        for d in shape:
            count *= d
        if buf is None or buf.size < count or buf.dtype != self.dtype:
            buf = self.xp.empty(max(count, 1), dtype=self.dtype)
            setattr(self, name, buf)
        return buf[:count].reshape(shape)

    def _initial_states(self, bottom):
        """The (N, H) initial states: exposed bottoms or the carried state."""
        N, H = self.N, self.H
        out = []
        for j, s in enumerate(self._state):
            if self.expose_hidden:
                out.append(bottom[self._hidden_offset + j].data.reshape(N, H))
            else:
                s.reshape((1, N, H))
                out.append(s.data.reshape(N, H))
        return out

    def _input_transform(self, bottom):
        """pre = x W^T + b (+ x_static W_static^T on every step), (T, N, G)."""
        xp = bottom[0].xp
        T, N = self.T, self.N
        G = self.gate_mult * self.H
        pre = self._buffer("_pre", (T, N, G))
        xp.matmul(bottom[0].data.reshape(T * N, self.K), self.blobs[0].data.T, out=pre.reshape(T * N, G))
        pre += self.blobs[1].data
        if self.static_input:
            pre += bottom[2].data.reshape(N, self.K_static) @ self.blobs[2].data.T
        return pre

    def _input_tangent(self, bottom, tangents, pt):
        """d pre = dx W^T + x dW^T + db (+ dx_static W_static^T + x_static dW_static^T), (T, N, G)."""
        T, N = self.T, self.N
        G = self.gate_mult * self.H
        x = bottom[0].data.reshape(T * N, self.K)
        d = tangents[0].reshape(T * N, self.K) @ self.blobs[0].data.T
        if pt[0] is not None:
            d = d + x @ pt[0].T
        if pt[1] is not None:
            d = d + pt[1]
        d = d.reshape(T, N, G)
        if self.static_input:
            xs = bottom[2].data.reshape(N, self.K_static)
            s = tangents[2].reshape(N, self.K_static) @ self.blobs[2].data.T
            if pt[2] is not None:
                s = s + xs @ pt[2].T
            d = d + s
        return d.astype(self.dtype, copy=False)


    def _input_backward(self, dpre, propagate_down, bottom):
        """Gradients of ``pre`` into W, b, W_static, x and x_static."""
        xp = bottom[0].xp
        T, N = self.T, self.N
        G = self.gate_mult * self.H
        d2 = dpre.reshape(T * N, G)
        if self.param_propagate_down[0]:
            self.blobs[0].diff[...] += d2.T @ bottom[0].data.reshape(T * N, self.K)
        if self.param_propagate_down[1]:
            self.blobs[1].diff[...] += d2.sum(axis=0)
        if propagate_down[0]:
            xp.matmul(d2, self.blobs[0].data, out=bottom[0].diff.reshape(T * N, self.K))
        if self.static_input:
            ds = dpre.sum(axis=0)  # the static term enters every step
            xs = bottom[2]
            if self.param_propagate_down[2]:
                self.blobs[2].diff[...] += ds.T @ xs.data.reshape(N, self.K_static)
            if len(propagate_down) > 2 and propagate_down[2]:
                xp.matmul(ds, self.blobs[2].data, out=xs.diff.reshape(N, self.K_static))
        if self.expose_hidden:
            for j in range(len(self.state_names)):
                i = self._hidden_offset + j
                if i < len(propagate_down) and propagate_down[i]:
                    bottom[i].diff[...] = 0  # Caffe computes no gradient for the initial state

    def _input_backward_jvp(self, dpre, rdpre, propagate_down, bottom, tb, pt):
        """The second-order terms of :meth:`_input_backward`: its derivative
        along the tangents of x, x_static and the input weights (``tb``,
        ``pt``; None is zero) with ``dpre`` moving by ``rdpre``.  Returns
        (per bottom, per parameter) lists; the exposed initial states get
        None (their diff is a constant zero)."""
        T, N = self.T, self.N
        G = self.gate_mult * self.H
        learned = self.param_propagate_down
        rb, rp = [None] * len(bottom), [None] * len(self.blobs)
        d2, r2 = dpre.reshape(T * N, G), rdpre.reshape(T * N, G)
        if learned[0]:
            rp[0] = r2.T @ bottom[0].data.reshape(T * N, self.K)
            if tb[0] is not None:
                rp[0] = rp[0] + d2.T @ tb[0].reshape(T * N, self.K)
        if learned[1]:
            rp[1] = r2.sum(axis=0)
        if propagate_down[0]:
            rb[0] = r2 @ self.blobs[0].data
            if pt[0] is not None:
                rb[0] = rb[0] + d2 @ pt[0]
            rb[0] = rb[0].reshape(bottom[0].shape)
        if self.static_input:
            ds, rds = dpre.sum(axis=0), rdpre.sum(axis=0)
            if learned[2]:
                rp[2] = rds.T @ bottom[2].data.reshape(N, self.K_static)
                if tb[2] is not None:
                    rp[2] = rp[2] + ds.T @ tb[2].reshape(N, self.K_static)
            if len(propagate_down) > 2 and propagate_down[2]:
                rb[2] = rds @ self.blobs[2].data
                if pt[2] is not None:
                    rb[2] = rb[2] + ds @ pt[2]
                rb[2] = rb[2].reshape(bottom[2].shape)
        return rb, rp

    def _zero_filled(self, bottom, tangents):
        """Bottom tangents with zeros for None (what :meth:`jvp` takes)."""
        xp = self.xp
        return [t if t is not None else xp.zeros(b.shape, dtype=self.dtype) for t, b in zip(tangents, bottom)]

    def _previous(self, first, steps):
        """(T, N, H): the states entering each step, ``first`` then steps[:-1]."""
        return self.xp.concatenate([first[None], steps[:-1]], axis=0)

    def _check_backward(self, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            self.fail("cannot backpropagate to the sequence continuation indicators (bottom 1, cont)",
                      bottom=bottom)


@register_layer("RNN")
class RNNLayer(_RecurrentLayer):
    """Caffe's vanilla RNN (``rnn_layer.cpp``), H = num_output.

    For t = 1..T (``cont_t`` broadcast over units)::

        h_t = tanh(W_hh (cont_t * h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static])
        o_t = tanh(W_ho h_t + b_o)

    Top 0 is ``o`` (T, N, H), not h: Caffe's RNN squashes its output with a
    second tanh.  Blobs, in Caffe's order: W_xh (H, K), b_h (H,),
    [W_xh_static (H, K_static)], W_hh (H, H), W_ho (H, H), b_o (H,), with
    K = count of x from axis 2.  With expose_hidden: bottom h_0, top h_T.
    """

    gate_mult = 1
    state_names = ("h",)

    def _extra_param_specs(self, wf, bf):
        H = self.H
        return [((H, H), wf), ((H, H), wf), ((H,), bf)]

    def _param_index(self):
        base = 3 if self.static_input else 2
        return base, base + 1, base + 2  # W_hh, W_ho, b_o

    def forward(self, bottom, top):
        xp = bottom[0].xp
        T, N, H = self.T, self.N, self.H
        i_hh, i_ho, i_bo = self._param_index()
        W_hh = self.blobs[i_hh].data
        cont = bottom[1].data
        pre = self._input_transform(bottom)
        (h_prev,) = self._initial_states(bottom)
        hs = self._buffer("_hs", (T, N, H))      # h_t
        hc = self._buffer("_hc", (T, N, H))      # cont_t * h_{t-1}
        for t in range(T):
            xp.multiply(h_prev, cont[t][:, None], out=hc[t])
            xp.matmul(hc[t], W_hh.T, out=hs[t])
            hs[t] += pre[t]
            xp.tanh(hs[t], out=hs[t])
            h_prev = hs[t]
        o = self._buffer("_o", (T, N, H))
        xp.matmul(hs.reshape(T * N, H), self.blobs[i_ho].data.T, out=o.reshape(T * N, H))
        o += self.blobs[i_bo].data
        xp.tanh(o, out=o)
        top[0].data[...] = o
        self._saved = (hs, hc, o)
        final = hs[T - 1]
        if self.expose_hidden:
            top[1].data[...] = final.reshape(1, N, H)
        else:
            self._state[0].data[...] = final.reshape(1, N, H)

    def _step_tangents(self, bottom, tangents, pt):
        """Forward tangents through time: dh_t = (1 - h_t^2) (dpre_t +
        W_hh (cont_t dh_{t-1}) + dW_hh hc_t), then do = (1 - o^2) (W_ho dh +
        dW_ho h + db_o).  The carried state has no tangent, an exposed h_0 its
        bottom's.  Returns (dh_0 (N, H), dh (T, N, H), do (T, N, H))."""
        xp = self.xp
        T, N, H = self.T, self.N, self.H
        i_hh, i_ho, i_bo = self._param_index()
        hs, hc, o = self._saved
        cont = bottom[1].data
        dpre = self._input_tangent(bottom, tangents, pt)
        W_hh, dW_hh = self.blobs[i_hh].data, pt[i_hh]
        dh = dh0 = (tangents[self._hidden_offset].reshape(N, H) if self.expose_hidden
                    else xp.zeros((N, H), dtype=self.dtype))
        dhs = xp.empty((T, N, H), dtype=self.dtype)
        for t in range(T):
            dz = dpre[t] + (cont[t][:, None] * dh) @ W_hh.T
            if dW_hh is not None:
                dz = dz + hc[t] @ dW_hh.T
            dh = dhs[t] = (1 - hs[t] * hs[t]) * dz
        dz = dhs.reshape(T * N, H) @ self.blobs[i_ho].data.T
        if pt[i_ho] is not None:
            dz = dz + hs.reshape(T * N, H) @ pt[i_ho].T
        if pt[i_bo] is not None:
            dz = dz + pt[i_bo]
        return dh0, dhs, (1 - o * o) * dz.reshape(T, N, H)

    def jvp(self, bottom, top, tangents, param_tangents):
        """See :meth:`_step_tangents`; with expose_hidden also dh_T."""
        pt = list(param_tangents) if param_tangents else [None] * len(self.blobs)
        dh0, dhs, do = self._step_tangents(bottom, tangents, pt)
        out = [do]
        if self.expose_hidden:
            out.append(dhs[self.T - 1].reshape(1, self.N, self.H))
        return out

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """The backward (top diff g fixed) differentiated along the forward
        tangents, in step with a rerun of its recurrence: R{dzo} = -2 o do g,
        R{u_t} = R{dzo_t} W_ho + dzo_t dW_ho + R{dh_next}, R{dz_t} = R{u_t}
        (1 - h_t^2) - 2 h_t dh_t u_t, R{dh_next} = cont_t (R{dz_t} W_hh + dz_t
        dW_hh), and each parameter product's two factor terms."""
        xp = self.xp
        T, N, H = self.T, self.N, self.H
        n = T * N
        i_hh, i_ho, i_bo = self._param_index()
        W_hh, W_ho = self.blobs[i_hh].data, self.blobs[i_ho].data
        hs, hc, o = self._saved
        cont = bottom[1].data
        pt = list(t.params) if t.params else [None] * len(self.blobs)
        dh0, dhs, do = self._step_tangents(bottom, self._zero_filled(bottom, t.bottom), pt)
        learned = self.param_propagate_down
        g = top_diffs[0].reshape(T, N, H)
        dzo = (1 - o * o) * g
        rdzo = -2 * o * do * g
        u = (dzo.reshape(n, H) @ W_ho).reshape(T, N, H)
        ru = rdzo.reshape(n, H) @ W_ho
        if pt[i_ho] is not None:
            ru = ru + dzo.reshape(n, H) @ pt[i_ho]
        ru = ru.reshape(T, N, H)
        dz, rdz = xp.empty((T, N, H), dtype=self.dtype), xp.empty((T, N, H), dtype=self.dtype)
        for s in range(T - 1, -1, -1):
            dtanh = 1 - hs[s] * hs[s]
            dz[s] = u[s] * dtanh
            rdz[s] = ru[s] * dtanh - 2 * hs[s] * dhs[s] * u[s]
            if s:
                c = cont[s][:, None]
                u[s - 1] += c * (dz[s] @ W_hh)
                r = rdz[s] @ W_hh
                if pt[i_hh] is not None:
                    r = r + dz[s] @ pt[i_hh]
                ru[s - 1] += c * r
        rb, rp = self._input_backward_jvp(dz, rdz, propagate_down, bottom, t.bottom, pt)
        if learned[i_ho]:
            rp[i_ho] = rdzo.reshape(n, H).T @ hs.reshape(n, H) + dzo.reshape(n, H).T @ dhs.reshape(n, H)
        if learned[i_bo]:
            rp[i_bo] = rdzo.reshape(n, H).sum(axis=0)
        if learned[i_hh]:
            dhc = cont[:, :, None] * self._previous(dh0, dhs)
            rp[i_hh] = rdz.reshape(n, H).T @ hc.reshape(n, H) + dz.reshape(n, H).T @ dhc.reshape(n, H)
        return rb, rp

    def backward(self, top, propagate_down, bottom):
        self._check_backward(propagate_down, bottom)
        xp = bottom[0].xp
        T, N, H = self.T, self.N, self.H
        i_hh, i_ho, i_bo = self._param_index()
        W_hh, W_ho = self.blobs[i_hh].data, self.blobs[i_ho].data
        cont = bottom[1].data
        hs, hc, o = self._saved
        # Output transform (one product over all steps).
        dzo = self._buffer("_dzo", (T * N, H))
        xp.multiply(o, o, out=dzo.reshape(T, N, H))
        xp.subtract(1, dzo, out=dzo)
        dzo *= top[0].diff.reshape(T * N, H)
        if self.param_propagate_down[i_ho]:
            self.blobs[i_ho].diff[...] += dzo.T @ hs.reshape(T * N, H)
        if self.param_propagate_down[i_bo]:
            self.blobs[i_bo].diff[...] += dzo.sum(axis=0)
        dz = self._buffer("_dz", (T, N, H))   # gradient at the hidden tanh's input
        xp.matmul(dzo, W_ho, out=dz.reshape(T * N, H))  # dL/dh_t from o_t
        dtanh = self._buffer("_dtanh", (T, N, H))
        xp.multiply(hs, hs, out=dtanh)
        xp.subtract(1, dtanh, out=dtanh)
        dh_next = self._buffer("_dhnext", (N, H))
        for t in range(T - 1, -1, -1):
            if t != T - 1:
                dz[t] += dh_next
            dz[t] *= dtanh[t]
            xp.matmul(dz[t], W_hh, out=dh_next)
            dh_next *= cont[t][:, None]
        if self.param_propagate_down[i_hh]:
            self.blobs[i_hh].diff[...] += dz.reshape(T * N, H).T @ hc.reshape(T * N, H)
        self._input_backward(dz, propagate_down, bottom)


@register_layer("LSTM")
class LSTMLayer(_RecurrentLayer):
    """Caffe's LSTM (``lstm_layer.cpp`` + ``lstm_unit_layer.cpp``), H = num_output.

    For t = 1..T, with the gate pre-activations in Caffe's block order
    i, f, o, g along the last axis::

        [i', f', o', g'] = W_hc (cont_t * h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static]
        i = sigmoid(i'), f = cont_t * sigmoid(f'), o = sigmoid(o'), g = tanh(g')
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)

    Top 0 is ``h`` (T, N, H).  Blobs, in Caffe's order: W_xc (4H, K),
    b_c (4H,), [W_xc_static (4H, K_static)], W_hc (4H, H).  With
    expose_hidden: bottoms h_0, c_0 and tops h_T, c_T.  Backward uses
    LSTMUnit's formula (the forget-gate gradient is written with the
    cont-scaled f, exact for binary cont).
    """

    gate_mult = 4
    state_names = ("h", "c")

    def _extra_param_specs(self, wf, bf):
        return [((4 * self.H, self.H), wf)]

    def forward(self, bottom, top):
        xp = bottom[0].xp
        T, N, H = self.T, self.N, self.H
        H3 = 3 * H
        cont = bottom[1].data
        pre = self._input_transform(bottom)
        # sigmoid(a) = 0.5 * tanh(a / 2) + 0.5: halve the i, f, o columns of
        # the input term and of W_hc (exact in floating point), so one tanh
        # call per step activates all four gates.
        pre[:, :, :H3] *= 0.5
        w = self._buffer("_w_hc_t", (H, 4 * H))
        w[...] = self.blobs[-1].data.T
        w[:, :H3] *= 0.5
        h_prev, c_prev = self._initial_states(bottom)
        acts = self._buffer("_acts", (T, N, 4 * H))   # i, f (cont-scaled), o, g
        cs = self._buffer("_cs", (T + 1, N, H))       # c_0 .. c_T
        tcs = self._buffer("_tcs", (T, N, H))         # tanh(c_t)
        hs = self._buffer("_hs", (T, N, H))           # h_1 .. h_T
        hc = self._buffer("_hc", (T, N, H))           # cont_t * h_{t-1}
        ig = self._buffer("_ig", (N, H))
        cs[0] = c_prev
        for t in range(T):
            ct = cont[t][:, None]
            xp.multiply(h_prev, ct, out=hc[t])
            a = acts[t]
            xp.matmul(hc[t], w, out=a)
            a += pre[t]
            xp.tanh(a, out=a)
            sig = a[:, :H3]
            sig *= 0.5
            sig += 0.5
            f = a[:, H: 2 * H]
            f *= ct  # cont 0 gives f = 0 exactly (Caffe: cont == 0 ? 0 : cont * sigmoid)
            xp.multiply(f, cs[t], out=cs[t + 1])
            xp.multiply(a[:, :H], a[:, 3 * H:], out=ig)
            cs[t + 1] += ig
            xp.tanh(cs[t + 1], out=tcs[t])
            xp.multiply(a[:, 2 * H: H3], tcs[t], out=hs[t])
            h_prev = hs[t]
        top[0].data[...] = hs
        self._saved = (acts, cs, tcs, hc)
        if self.expose_hidden:
            top[1].data[...] = h_prev.reshape(1, N, H)
            top[2].data[...] = cs[T].reshape(1, N, H)
        else:
            self._state[0].data[...] = h_prev.reshape(1, N, H)
            self._state[1].data[...] = cs[T].reshape(1, N, H)

    def _slopes(self, bottom):
        """The gates' local derivatives, all steps: i (1 - i), the forget
        gate's true slope cont s (1 - s) (s = sigmoid(f'), f = cont s),
        o (1 - o) and 1 - g^2, each (T, N, H)."""
        xp = self.xp
        H = self.H
        acts = self._saved[0]
        i, f, o, g = acts[:, :, :H], acts[:, :, H:2 * H], acts[:, :, 2 * H:3 * H], acts[:, :, 3 * H:]
        cont = bottom[1].data[:, :, None]
        s = f / xp.where(cont == 0, 1, cont)  # the unscaled sigmoid (any value where cont is 0)
        return i * (1 - i), f * (1 - s), o * (1 - o), 1 - g * g

    def _step_tangents(self, bottom, tangents, pt, slopes):
        """Forward tangents through time: da = dpre_t + W_hc (cont_t dh_{t-1})
        + dW_hc hc_t; the gates' tangents slope * da; dc_t = df c_{t-1} + f
        dc_{t-1} + di g + i dg; dh_t = do tanh(c_t) + o (1 - tanh(c_t)^2)
        dc_t.  The carried state has no tangent, exposed h_0 / c_0 their
        bottoms'.  Returns (dh_0 (N, H), d gates (T, N, 4H) in the order i,
        f, o, g, dc_0..dc_T (T + 1, N, H), dh_1..dh_T (T, N, H))."""
        xp = self.xp
        T, N, H = self.T, self.N, self.H
        acts, cs, tcs, hc = self._saved
        li, lf, lo, lg = slopes
        cont = bottom[1].data
        dpre = self._input_tangent(bottom, tangents, pt)
        W, dW = self.blobs[-1].data, pt[-1]
        if self.expose_hidden:
            dh = dh0 = tangents[self._hidden_offset].reshape(N, H)
            dc = tangents[self._hidden_offset + 1].reshape(N, H)
        else:
            dh = dh0 = dc = xp.zeros((N, H), dtype=self.dtype)
        dacts = xp.empty((T, N, 4 * H), dtype=self.dtype)
        dcs = xp.empty((T + 1, N, H), dtype=self.dtype)
        dhs = xp.empty((T, N, H), dtype=self.dtype)
        dcs[0] = dc
        for t in range(T):
            da = dpre[t] + (cont[t][:, None] * dh) @ W.T
            if dW is not None:
                da = da + hc[t] @ dW.T
            a, d = acts[t], dacts[t]
            i, f, o, g = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            for k, slope in enumerate((li, lf, lo, lg)):
                d[:, k * H:(k + 1) * H] = slope[t] * da[:, k * H:(k + 1) * H]
            dc = dcs[t + 1] = d[:, H:2 * H] * cs[t] + f * dc + d[:, :H] * g + i * d[:, 3 * H:]
            dh = dhs[t] = d[:, 2 * H:3 * H] * tcs[t] + o * (1 - tcs[t] * tcs[t]) * dc
        return dh0, dacts, dcs, dhs

    def jvp(self, bottom, top, tangents, param_tangents):
        """See :meth:`_step_tangents`; with expose_hidden also dh_T, dc_T."""
        pt = list(param_tangents) if param_tangents else [None] * len(self.blobs)
        dh0, dacts, dcs, dhs = self._step_tangents(bottom, tangents, pt, self._slopes(bottom))
        out = [dhs]
        if self.expose_hidden:
            N, H = self.N, self.H
            out += [dhs[self.T - 1].reshape(1, N, H), dcs[self.T].reshape(1, N, H)]
        return out

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """The backward (top diff fixed) differentiated along the forward
        tangents, in step with a rerun of its recurrence.  Each gate
        gradient is a product a * P (a = dc_term or dh, P a product of
        forward values, e.g. g i (1 - i)): R = R{a} P + a R{P}, with R{i (1 -
        i)} = (1 - 2i) di, R{f (1 - f)} = (1 - 2f) df (the cont-scaled f of
        Caffe's formula), R{1 - g^2} = -2 g dg; R{dc_prev} = R{dc_term} f +
        dc_term df; R{dh_next} = cont_t (R{d gates} W_hc + d gates dW_hc)."""
        xp = self.xp
        T, N, H = self.T, self.N, self.H
        n = T * N
        H2, H3 = 2 * H, 3 * H
        W = self.blobs[-1].data
        acts, cs, tcs, hc = self._saved
        cont = bottom[1].data
        pt = list(t.params) if t.params else [None] * len(self.blobs)
        slopes = self._slopes(bottom)
        dh0, dacts, dcs, dhs = self._step_tangents(bottom, self._zero_filled(bottom, t.bottom), pt, slopes)
        i, f, o, g = acts[:, :, :H], acts[:, :, H:H2], acts[:, :, H2:H3], acts[:, :, H3:]
        di, df, do, dg = dacts[:, :, :H], dacts[:, :, H:H2], dacts[:, :, H2:H3], dacts[:, :, H3:]
        li, lo, lg = slopes[0], slopes[2], slopes[3]
        lf = f * (1 - f)  # Caffe's forget-gate factor, with the cont-scaled f
        c_prev, dc_prev = cs[:T], dcs[:T]
        dtc = (1 - tcs * tcs) * dcs[1:]
        # gate gradients = (dc_term, dc_term, dh, dc_term) * P; R{P} below
        P = xp.concatenate([g * li, c_prev * lf, tcs * lo, i * lg], axis=2)
        RP = xp.concatenate([dg * li + g * (1 - 2 * i) * di, dc_prev * lf + c_prev * (1 - 2 * f) * df,
                             dtc * lo + tcs * (1 - 2 * o) * do, di * lg - 2 * i * g * dg], axis=2)
        oc = o * (1 - tcs * tcs)
        roc = do * (1 - tcs * tcs) - 2 * o * tcs * dtc
        gtop = top_diffs[0].reshape(T, N, H)
        dgates, rgates = xp.empty((T, N, 4 * H), dtype=self.dtype), xp.empty((T, N, 4 * H), dtype=self.dtype)
        dh_next = rdh_next = dc = rdc = 0
        for s in range(T - 1, -1, -1):
            dh, rdh = gtop[s] + dh_next, rdh_next
            dct = dh * oc[s] + dc
            rdct = rdh * oc[s] + dh * roc[s] + rdc
            d, r = dgates[s], rgates[s]
            for k in range(4):
                a, ra = (dh, rdh) if k == 2 else (dct, rdct)
                sl = slice(k * H, (k + 1) * H)
                d[:, sl] = a * P[s, :, sl]
                r[:, sl] = ra * P[s, :, sl] + a * RP[s, :, sl]
            dc, rdc = dct * f[s], rdct * f[s] + dct * df[s]
            c = cont[s][:, None]
            dh_next = c * (d @ W)
            r2 = r @ W
            if pt[-1] is not None:
                r2 = r2 + d @ pt[-1]
            rdh_next = c * r2
        rb, rp = self._input_backward_jvp(dgates, rgates, propagate_down, bottom, t.bottom, pt)
        if self.param_propagate_down[len(self.blobs) - 1]:
            dhc = cont[:, :, None] * self._previous(dh0, dhs)
            rp[-1] = (rgates.reshape(n, 4 * H).T @ hc.reshape(n, H)
                      + dgates.reshape(n, 4 * H).T @ dhc.reshape(n, H))
        return rb, rp

    def backward(self, top, propagate_down, bottom):
        self._check_backward(propagate_down, bottom)
        xp = bottom[0].xp
        T, N, H = self.T, self.N, self.H
        H3 = 3 * H
        n = T * N
        W_hc = self.blobs[-1].data
        cont = bottom[1].data
        acts, cs, tcs, hc = self._saved
        # Local derivatives for all steps at once: s (1 - s) for i, f, o,
        # 1 - g^2 for g, and o (1 - tanh(c)^2).
        local = self._buffer("_local", (T, N, 4 * H))
        sig = acts[:, :, :H3]
        xp.subtract(1, sig, out=local[:, :, :H3])
        local[:, :, :H3] *= sig
        g_all = acts[:, :, 3 * H:]
        xp.multiply(g_all, g_all, out=local[:, :, 3 * H:])
        xp.subtract(1, local[:, :, 3 * H:], out=local[:, :, 3 * H:])
        oc = self._buffer("_oc", (T, N, H))
        xp.multiply(tcs, tcs, out=oc)
        xp.subtract(1, oc, out=oc)
        oc *= acts[:, :, 2 * H: H3]
        dgates = self._buffer("_dgates", (T, N, 4 * H))
        dh = self._buffer("_dh", (N, H))
        dc_term = self._buffer("_dcterm", (N, H))
        dc = self._buffer("_dc", (N, H))
        dh_next = self._buffer("_dhnext", (N, H))
        dh_top = top[0].diff
        for t in range(T - 1, -1, -1):
            a, d = acts[t], dgates[t]
            if t == T - 1:
                dh[...] = dh_top[t]
            else:
                xp.add(dh_top[t], dh_next, out=dh)
            # LSTMUnit backward (Caffe's formulas; f is the cont-scaled gate).
            xp.multiply(dh, oc[t], out=dc_term)
            if t != T - 1:
                dc_term += dc
            xp.multiply(dc_term, a[:, 3 * H:], out=d[:, :H])
            xp.multiply(dc_term, cs[t], out=d[:, H: 2 * H])
            xp.multiply(dh, tcs[t], out=d[:, 2 * H: H3])
            xp.multiply(dc_term, a[:, :H], out=d[:, 3 * H:])
            d *= local[t]
            xp.multiply(dc_term, a[:, H: 2 * H], out=dc)
            xp.matmul(d, W_hc, out=dh_next)
            dh_next *= cont[t][:, None]
        if self.param_propagate_down[len(self.blobs) - 1]:
            self.blobs[-1].diff[...] += dgates.reshape(n, 4 * H).T @ hc.reshape(n, H)
        self._input_backward(dgates, propagate_down, bottom)


def _lstm_unit_forward(xp, gates, c_prev, cont, H, c_out, tanh_c_out, h_out):
    """In place: ``gates`` (M, 4H) pre-activations become i, f*cont, o, g;
    write c, tanh(c) and h (each (M, H)).  ``cont`` is (M, 1)."""
    _sigmoid(xp, gates[:, : 3 * H], out=gates[:, : 3 * H])
    xp.tanh(gates[:, 3 * H:], out=gates[:, 3 * H:])
    f = gates[:, H: 2 * H]
    f *= cont  # cont 0 gives f = 0 exactly (Caffe: cont == 0 ? 0 : cont * sigmoid)
    xp.multiply(f, c_prev, out=c_out)
    c_out += gates[:, :H] * gates[:, 3 * H:]
    xp.tanh(c_out, out=tanh_c_out)
    xp.multiply(gates[:, 2 * H: 3 * H], tanh_c_out, out=h_out)


def _lstm_unit_backward(acts, c_prev, tanh_c, dh, dc, H, dgates):
    """LSTMUnit backward from activated gates; fills ``dgates`` (M, 4H) and
    returns dc_prev.  ``dc`` None means a zero cell gradient."""
    i, f, o, g = acts[:, :H], acts[:, H: 2 * H], acts[:, 2 * H: 3 * H], acts[:, 3 * H:]
    dc_term = dh * o * (1 - tanh_c * tanh_c)
    if dc is not None:
        dc_term += dc
    dgates[:, :H] = dc_term * g * i * (1 - i)
    dgates[:, H: 2 * H] = dc_term * c_prev * f * (1 - f)   # Caffe's formula: f is cont-scaled
    dgates[:, 2 * H: 3 * H] = dh * tanh_c * o * (1 - o)
    dgates[:, 3 * H:] = dc_term * i * (1 - g * g)
    return dc_term * f


@register_layer("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step (Caffe's ``lstm_unit_layer.cpp``), no parameters.

    Bottoms: c_prev (1, N, D), gates X (1, N, 4D) pre-activations in the
    blocks i, f, o, g along the last axis, cont (1, N).  Tops: c (1, N, D),
    h (1, N, D)::

        i = sigmoid(X_i), f = cont * sigmoid(X_f) (0 where cont == 0),
        o = sigmoid(X_o), g = tanh(X_g), c = f * c_prev + i * g, h = o * tanh(c)

    Backward to c_prev and X (not to cont, refused).  The forget-gate
    gradient is Caffe's ``dc * c_prev * f * (1 - f)`` with the cont-scaled f:
    the true derivative for binary cont, kept as is for other values; a cont
    of 0 cuts both the state and its gradient.
    """

    exact_num_bottom_blobs = 3
    exact_num_top_blobs = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        c, x, cont = bottom
        for i, b in enumerate(bottom):
            want = 2 if i == 2 else 3
            if b.ndim != want:
                self.fail("bottom %d must have %d axes (c_prev (1,N,D), X (1,N,4D), cont (1,N))" % (i, want),
                          bottom=bottom, error=ShapeError)
        N = c.shape[1]
        if any(b.shape[0] != 1 or b.shape[1] != N for b in bottom):
            self.fail("every bottom must have shape (1, N, ...) with the same N", bottom=bottom, error=ShapeError)
        self.D = c.shape[2]
        if x.shape[2] != 4 * self.D:
            self.fail("X must have 4 * D = %d channels (i, f, o, g blocks), got %d"
                      % (4 * self.D, x.shape[2]), bottom=bottom, error=ShapeError)
        self.N = N
        top[0].reshape(c.shape)
        top[1].reshape(c.shape)

    def _acts(self, bottom):
        xp = bottom[0].xp
        N, D = self.N, self.D
        buf = getattr(self, "_act_buf", None)
        if buf is None or buf.size < N * 4 * D or buf.dtype != self.dtype:
            buf = self._act_buf = xp.empty(max(N * 4 * D, 1), dtype=self.dtype)
        return buf[: N * 4 * D].reshape(N, 4 * D)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        N, D = self.N, self.D
        acts = self._acts(bottom)
        acts[...] = bottom[1].data.reshape(N, 4 * D)
        tanh_c = self._tanh_c = xp.empty((N, D), dtype=self.dtype)
        h = xp.empty((N, D), dtype=self.dtype)
        c = xp.empty((N, D), dtype=self.dtype)
        _lstm_unit_forward(xp, acts, bottom[0].data.reshape(N, D), bottom[2].data.reshape(N, 1), D,
                           c, tanh_c, h)
        top[0].data[...] = c.reshape(1, N, D)
        top[1].data[...] = h.reshape(1, N, D)

    def jvp(self, bottom, top, tangents, param_tangents):
        """dc = df c_prev + f dc_prev + di g + i dg, dh = do tanh(c) + o (1 - tanh(c)^2) dc (cont: no tangent)."""
        xp = self.xp
        N, D = self.N, self.D
        one = self.dtype.type(1)
        X = bottom[1].data.reshape(N, 4 * D)
        dX = tangents[1].reshape(N, 4 * D)
        cont = bottom[2].data.reshape(N, 1)
        sig = one / (one + xp.exp(-X[:, :3 * D]))
        i, f, o = sig[:, :D], sig[:, D:2 * D] * cont, sig[:, 2 * D:]
        g = xp.tanh(X[:, 3 * D:])
        di = i * (one - i) * dX[:, :D]
        df = cont * sig[:, D:2 * D] * (one - sig[:, D:2 * D]) * dX[:, D:2 * D]
        do = o * (one - o) * dX[:, 2 * D:3 * D]
        dg = (one - g * g) * dX[:, 3 * D:]
        c_prev, dc_prev = bottom[0].data.reshape(N, D), tangents[0].reshape(N, D)
        dc = df * c_prev + f * dc_prev + di * g + i * dg
        tc = xp.tanh(f * c_prev + i * g)
        dh = do * tc + o * (one - tc * tc) * dc
        return [dc.reshape(1, N, D).astype(self.dtype, copy=False), dh.reshape(1, N, D).astype(self.dtype, copy=False)]

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """Caffe's backward differentiated along dc_prev and dX, the top
        diffs (dc, dh) fixed: with dc_term = dh o (1 - tanh(c)^2) + dc,
        R{dc_term} = dh (do (1 - tanh(c)^2) - 2 o tanh(c) d tanh(c)), each
        gate gradient a * P gives R{a} P + a R{P} (R{i (1 - i)} = (1 - 2i)
        di, R{f (1 - f)} = (1 - 2f) df with the cont-scaled f, R{1 - g^2} =
        -2 g dg) and R{dc_prev} = R{dc_term} f + dc_term df."""
        xp = self.xp
        N, D = self.N, self.D
        if not (propagate_down[0] or propagate_down[1]):
            return [None] * 3, []
        a = self._acts(bottom)
        i, f, o, g = a[:, :D], a[:, D:2 * D], a[:, 2 * D:3 * D], a[:, 3 * D:]
        c_prev = bottom[0].data.reshape(N, D)
        cont = bottom[2].data.reshape(N, 1)
        dc_prev = (t.bottom[0].reshape(N, D) if t.bottom[0] is not None
                   else xp.zeros((N, D), dtype=self.dtype))
        dX = (t.bottom[1].reshape(N, 4 * D) if t.bottom[1] is not None
              else xp.zeros((N, 4 * D), dtype=self.dtype))
        s = f / xp.where(cont == 0, 1, cont)  # the unscaled forget sigmoid
        di, df = i * (1 - i) * dX[:, :D], f * (1 - s) * dX[:, D:2 * D]
        do, dg = o * (1 - o) * dX[:, 2 * D:3 * D], (1 - g * g) * dX[:, 3 * D:]
        tc = self._tanh_c
        dtc = (1 - tc * tc) * (df * c_prev + f * dc_prev + di * g + i * dg)
        dh, dc = top_diffs[1].reshape(N, D), top_diffs[0].reshape(N, D)
        dct = dh * o * (1 - tc * tc) + dc
        rdct = dh * (do * (1 - tc * tc) - 2 * o * tc * dtc)
        lf = f * (1 - f)
        rgates = xp.concatenate([
            rdct * g * i * (1 - i) + dct * (dg * i * (1 - i) + g * (1 - 2 * i) * di),
            rdct * c_prev * lf + dct * (dc_prev * lf + c_prev * (1 - 2 * f) * df),
            dh * (dtc * o * (1 - o) + tc * (1 - 2 * o) * do),
            rdct * i * (1 - g * g) + dct * (di * (1 - g * g) - 2 * i * g * dg)], axis=1)
        rb = [None, None, None]
        if propagate_down[0]:
            rb[0] = (rdct * f + dct * df).reshape(1, N, D)
        if propagate_down[1]:
            rb[1] = rgates.reshape(1, N, 4 * D)
        return rb, []

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            self.fail("cannot backpropagate to the sequence continuation indicators (bottom 2, cont)",
                      bottom=bottom)
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = bottom[0].xp
        N, D = self.N, self.D
        acts = self._acts(bottom)  # activated gates from forward
        dgates = xp.empty((N, 4 * D), dtype=self.dtype)
        dc_prev = _lstm_unit_backward(acts, bottom[0].data.reshape(N, D), self._tanh_c,
                                      top[1].diff.reshape(N, D), top[0].diff.reshape(N, D), D, dgates)
        if propagate_down[0]:
            bottom[0].diff[...] = dc_prev.reshape(1, N, D)
        if propagate_down[1]:
            bottom[1].diff[...] = dgates.reshape(1, N, 4 * D)
