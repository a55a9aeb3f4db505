#!/usr/bin/env python3
"""Write tests/golden/recurrent/ with real BVLC Caffe (pycaffe): RNN, LSTM and
LSTMUnit variants the shared golden set does not cover.

Run with reference Caffe's Python (not netlib's)::

    source /opt/caffe/env.sh
    GLOG_minloglevel=2 python tools/make_recurrent_goldens.py

Each case is one small net (Input layers for the bottoms, then the layer under
test named ``rec``, ``force_backward: true``) and is written as
``<case>.npz`` holding:

* ``prototxt``: the net text;
* ``params/<i>``: the layer's blobs (fixed seeded values written before the
  first pass);
* ``pass<k>/bottom/<blob>`` and ``pass<k>/top/<blob>``: the bottoms written
  before forward pass k and Caffe's tops after it (several passes show the
  state carried from one pass to the next when expose_hidden is off, and the
  effect of a change of N);
* after the last pass: ``top_diff/<blob>`` (written before backward, for
  every top, exposed final states included), ``bottom_diff/<blob>`` for every
  bottom but cont (all blob diffs are zeroed first) and ``param_diff/<i>``
  (param diffs zeroed first);
* ``meta``: JSON with the bottoms, tops and the number of passes.

``lstm_rnn_weights.caffemodel`` + ``lstm_rnn_weights.prototxt`` +
``lstm_rnn_weights.npz``: a two-layer LSTM -> RNN net whose weights Caffe
drew from its own fillers and saved with ``Net.save``, with inputs and
Caffe's outputs, to check that Caffe-written recurrent weights load by name.

The script also prints whether Caffe writes the diff of an exposed initial
state (it fills that diff with a sentinel before backward and reports it).
"""
import json
import os

import numpy as np

import caffe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "golden", "recurrent")


def shape_text(shape):
    return "shape { %s }" % " ".join("dim: %d" % d for d in shape)


def net_text(name, layer_type, bottoms, tops, param_text):
    lines = ['name: "%s"' % name, "force_backward: true"]
    for b, shape in bottoms:
        lines.append('layer { name: "input_%s" type: "Input" top: "%s" input_param { %s } }'
                     % (b, b, shape_text(shape)))
    lines.append('layer { name: "rec" type: "%s" %s %s %s }' % (
        layer_type, " ".join('bottom: "%s"' % b for b, _ in bottoms),
        " ".join('top: "%s"' % t for t in tops), param_text))
    return "\n".join(lines) + "\n"


def run_case(case, layer_type, bottoms, tops, param_text, passes, seed):
    """passes: list of dicts blob -> array (the first pass must give every
    bottom; cont arrays are given explicitly)."""
    rng = np.random.RandomState(seed)
    shapes = [(b, passes[0][b].shape) for b in bottoms]
    text = net_text(case, layer_type, shapes, tops, param_text)
    path = os.path.join(OUT, case + ".prototxt.tmp")
    with open(path, "w") as f:
        f.write(text)
    net = caffe.Net(path, caffe.TEST)
    os.remove(path)
    out = {"prototxt": np.array(text)}
    params = net.params.get("rec", [])
    for i, p in enumerate(params):
        p.data[...] = rng.uniform(-0.8, 0.8, p.data.shape)
        out["params/%d" % i] = p.data.copy()
    for k, values in enumerate(passes):
        for b in bottoms:
            arr = np.asarray(values[b], dtype=np.float32)
            net.blobs[b].reshape(*arr.shape)
            net.blobs[b].data[...] = arr
            out["pass%d/bottom/%s" % (k, b)] = arr.copy()
        net.forward()
        for t in tops:
            out["pass%d/top/%s" % (k, t)] = net.blobs[t].data.copy()
    for blob in net.blobs.values():
        blob.diff[...] = 0
    for p in params:
        p.diff[...] = 0
    for t in tops:
        d = rng.uniform(-1, 1, net.blobs[t].data.shape).astype(np.float32)
        net.blobs[t].diff[...] = d
        out["top_diff/%s" % t] = d
    sentinel = {}
    for b in bottoms:
        if b.endswith("_0"):
            net.blobs[b].diff[...] = 7.0
            sentinel[b] = True
    net.backward()
    for b in bottoms:
        if b == "cont":
            continue
        d = net.blobs[b].diff.copy()
        if b in sentinel:
            print("%s: exposed %s diff after backward: untouched sentinel=%s" % (case, b, bool(np.all(d == 7.0))))
            d[d == 7.0] = 0  # Caffe leaves it untouched; a zeroed diff stays 0
        out["bottom_diff/%s" % b] = d
    for i, p in enumerate(params):
        out["param_diff/%d" % i] = p.diff.copy()
    out["meta"] = np.array(json.dumps({"type": layer_type, "bottoms": bottoms, "tops": tops,
                                       "passes": len(passes)}))
    np.savez_compressed(os.path.join(OUT, case + ".npz"), **out)
    print("wrote", case)


def rp(num_output, expose=False):
    return ("recurrent_param { num_output: %d%s }" % (num_output, " expose_hidden: true" if expose else ""))


def main():
    os.makedirs(OUT, exist_ok=True)
    r = np.random.RandomState(1234)
    u = lambda *s: r.uniform(-1, 1, s).astype(np.float32)  # noqa: E731
    reset = np.array([[0, 0], [1, 1], [0, 1], [1, 1]], np.float32)

    for kind, H in (("RNN", 3), ("LSTM", 3)):
        # Static input + a reset in the middle of the sequence.
        run_case(kind + "_static_reset", kind, ["x", "cont", "x_static"], [kind == "RNN" and "o" or "h"],
                 rp(H), [{"x": u(4, 2, 3), "cont": reset, "x_static": u(2, 5)}], seed=1)
        # expose_hidden: initial states as bottoms, final as tops, 4-D x.
        states = ["h_0"] if kind == "RNN" else ["h_0", "c_0"]
        finals = ["h_T"] if kind == "RNN" else ["h_T", "c_T"]
        first = {"x": u(3, 2, 2, 2), "cont": np.array([[1, 0], [1, 1], [0, 1]], np.float32)}
        first.update({s: u(1, 2, H) for s in states})
        run_case(kind + "_expose", kind, ["x", "cont"] + states, [kind == "RNN" and "o" or "h"] + finals,
                 rp(H, True), [first], seed=2)
        # expose_hidden and a static input.
        first = {"x": u(3, 3, 2), "cont": np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], np.float32),
                 "x_static": u(3, 2, 2)}
        first.update({s: u(1, 3, H) for s in states})
        run_case(kind + "_expose_static", kind, ["x", "cont", "x_static"] + states,
                 [kind == "RNN" and "o" or "h"] + finals, rp(H, True), [first], seed=3)
        # T = 1, N = 3: the state carries over between passes; then N shrinks
        # (Caffe keeps the first streams' state) and grows (zeros).
        passes = [{"x": u(1, 3, 4), "cont": np.array([[1, 1, 1]], np.float32)},
                  {"x": u(1, 3, 4), "cont": np.array([[1, 0, 1]], np.float32)},
                  {"x": u(1, 2, 4), "cont": np.array([[1, 1]], np.float32)},
                  {"x": u(1, 4, 4), "cont": np.array([[1, 1, 1, 1]], np.float32)}]
        run_case(kind + "_T1_carry", kind, ["x", "cont"], [kind == "RNN" and "o" or "h"], rp(H), passes, seed=4)
        # Longer sequence with carry-over and backward after the second pass.
        passes = [{"x": u(5, 2, 3), "cont": np.array([[0, 1], [1, 1], [1, 0], [1, 1], [1, 1]], np.float32)},
                  {"x": u(5, 2, 3), "cont": np.array([[1, 1], [1, 1], [0, 1], [1, 1], [1, 0]], np.float32)}]
        run_case(kind + "_carry", kind, ["x", "cont"], [kind == "RNN" and "o" or "h"], rp(H), passes, seed=5)

    # LSTM with non-binary cont: Caffe's cont-scaled forget gate (forward and
    # its gradient formula) and the cont-scaled hidden state.
    run_case("LSTM_nonbinary_cont", "LSTM", ["x", "cont"], ["h"], rp(2),
             [{"x": u(3, 2, 3), "cont": np.array([[0, 0.5], [2, 1], [0.25, 0]], np.float32)}], seed=6)
    run_case("RNN_nonbinary_cont", "RNN", ["x", "cont"], ["o"], rp(2),
             [{"x": u(3, 2, 3), "cont": np.array([[0, 0.5], [2, 1], [0.25, 0]], np.float32)}], seed=7)
    # LSTMUnit: resets in the batch, and non-binary cont.
    run_case("LSTMUnit_reset", "LSTMUnit", ["c_prev", "X", "cont"], ["c", "h"], "",
             [{"c_prev": u(1, 4, 3), "X": 2 * u(1, 4, 12), "cont": np.array([[1, 0, 1, 0]], np.float32)}], seed=8)
    run_case("LSTMUnit_nonbinary", "LSTMUnit", ["c_prev", "X", "cont"], ["c", "h"], "",
             [{"c_prev": u(1, 3, 2), "X": 2 * u(1, 3, 8), "cont": np.array([[0.5, 2, 0]], np.float32)}], seed=9)

    # Caffe-written weights of a small LSTM -> RNN net.
    text = """name: "lstm_rnn"
layer { name: "data" type: "Input" top: "x" top: "cont" top: "x_static"
        input_param { shape { dim: 4 dim: 2 dim: 3 } shape { dim: 4 dim: 2 } shape { dim: 2 dim: 2 } } }
layer { name: "lstm1" type: "LSTM" bottom: "x" bottom: "cont" top: "lstm1"
        recurrent_param { num_output: 5 weight_filler { type: "uniform" min: -0.5 max: 0.5 }
                          bias_filler { type: "uniform" min: -0.3 max: 0.3 } } }
layer { name: "rnn1" type: "RNN" bottom: "lstm1" bottom: "cont" bottom: "x_static" top: "rnn1"
        recurrent_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
                          bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "rnn1" top: "ip"
        inner_product_param { num_output: 2 axis: 2 weight_filler { type: "gaussian" std: 0.5 } } }
"""
    proto = os.path.join(OUT, "lstm_rnn_weights.prototxt")
    with open(proto, "w") as f:
        f.write(text)
    caffe.set_random_seed(11)
    net = caffe.Net(proto, caffe.TEST)
    net.save(os.path.join(OUT, "lstm_rnn_weights.caffemodel"))
    out = {"x": u(4, 2, 3), "cont": np.array([[0, 0], [1, 1], [1, 0], [1, 1]], np.float32), "x_static": u(2, 2)}
    for b in ("x", "cont", "x_static"):
        net.blobs[b].data[...] = out[b]
    net.forward()
    for t in ("lstm1", "rnn1", "ip"):
        out["top/" + t] = net.blobs[t].data.copy()
    for name in ("lstm1", "rnn1"):
        for i, p in enumerate(net.params[name]):
            out["params/%s/%d" % (name, i)] = p.data.copy()
    np.savez_compressed(os.path.join(OUT, "lstm_rnn_weights.npz"), **out)
    print("wrote lstm_rnn_weights")


if __name__ == "__main__":
    main()
