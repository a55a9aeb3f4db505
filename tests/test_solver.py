"""Solvers: update rules, lr policies and the training loop against independent
float64 references (Caffe's test_gradient_based_solver.cpp idea: a linear
least-squares net, HDF5Data -> InnerProduct(1) -> EuclideanLoss, on
caffe_test_data/solver_data.h5, with every expected update computed here in
NumPy from the published formulas)."""
import logging
import math
import os
import re

import h5py
import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib import solver as solver_mod
from netlib.errors import ConfigError, NetlibFileNotFoundError, SolverError
from netlib.proto import caffe_pb2

from conftest import shared_path

NEEDED = ("HDF5Data", "InnerProduct", "EuclideanLoss")


def _need_layers(*types):
    have = set(netlib.layer_type_list())
    missing = [t for t in types if t not in have]
    if missing:
        pytest.skip("layer types not implemented yet: %s" % ", ".join(missing))


# -- fixtures: data and nets --------------------------------------------------------
@pytest.fixture
def solver_data():
    path = shared_path("reference", "models", "caffe_test_data", "solver_data.h5")
    with h5py.File(path, "r") as f:
        return f["data"][()].astype(numpy.float64), f["targets"][()].astype(numpy.float64)


def write_h5_list(folder, arrays_list, name="data"):
    """HDF5 files with datasets data/targets and a list file naming them."""
    paths = []
    for k, (x, y) in enumerate(arrays_list):
        p = os.path.join(str(folder), "%s_%d.h5" % (name, k))
        with h5py.File(p, "w") as f:
            f.create_dataset("data", data=numpy.asarray(x, numpy.float32))
            f.create_dataset("targets", data=numpy.asarray(y, numpy.float32))
        paths.append(p)
    lst = os.path.join(str(folder), name + "_list.txt")
    with open(lst, "w") as f:
        f.write("\n".join(paths) + "\n")
    return lst


@pytest.fixture
def data_list(tmp_path, solver_data):
    return write_h5_list(tmp_path, [solver_data])


def linreg_net(source, batch=4, lr_mult=(1, 1), decay_mult=(1, 1), std=0.1, extra="", shuffle=False):
    return """
name: "linreg"
layer { name: "data" type: "HDF5Data" top: "data" top: "targets"
  hdf5_data_param { source: "%s" batch_size: %d shuffle: %s } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  param { lr_mult: %g decay_mult: %g } param { lr_mult: %g decay_mult: %g }
  inner_product_param { num_output: 1
    weight_filler { type: "gaussian" std: %g } bias_filler { type: "gaussian" std: %g } } }
%s
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "targets" top: "loss" }
""" % (source, batch, "true" if shuffle else "false", lr_mult[0], decay_mult[0], lr_mult[1], decay_mult[1],
       std, std, extra)


def make_param(net_text, solver_text):
    param = text_format.Parse(solver_text, caffe_pb2.SolverParameter())
    text_format.Parse(net_text, param.net_param)
    return param


# -- the independent reference --------------------------------------------------------
class Reference:
    """Float64 re-derivation of Caffe's update for y = W x + b with the
    Euclidean loss 1/(2N) sum (y - t)^2, written from the formulas."""

    def __init__(self, X, T, w, b, cfg):
        self.X = X.reshape(X.shape[0], -1)
        self.T = T.reshape(T.shape[0], -1)
        self.params = [numpy.array(w, numpy.float64), numpy.array(b, numpy.float64)]
        # SolverParameter/ParamSpec fields are proto floats: the solver sees them rounded to float32
        r32 = lambda v: float(numpy.float32(v))  # noqa: E731
        self.cfg = {k: (r32(v) if isinstance(v, float) else tuple(r32(x) for x in v) if isinstance(v, tuple) else v)
                    for k, v in cfg.items()}
        n_hist = 2 if cfg["type"] in ("AdaDelta", "Adam") else 1
        self.hist = [[numpy.zeros_like(p) for p in self.params] for _ in range(n_hist)]
        self.pos = 0
        self.it = 0
        self.losses = []
        self.last_batch_loss = []

    def batch(self):
        n = self.cfg.get("batch", 4)
        idx = [(self.pos + j) % self.X.shape[0] for j in range(n)]
        self.pos += n
        return self.X[idx], self.T[idx]

    def loss_and_grads(self, x, t):
        w, b = self.params
        r = x @ w.T + b - t
        n = x.shape[0]
        return (r ** 2).sum() / (2 * n), [r.T @ x / n, r.sum(0) / n]

    def rate(self):
        c = self.cfg
        it = self.it
        pol = c.get("lr_policy", "fixed")
        if pol == "fixed":
            return c["base_lr"]
        if pol == "inv":
            return c["base_lr"] * (1 + c["gamma"] * it) ** (-c["power"])
        if pol == "step":
            return c["base_lr"] * c["gamma"] ** (it // c["stepsize"])
        raise AssertionError(pol)

    def iterate(self):
        c = self.cfg
        iter_size = c.get("iter_size", 1)
        grads = [numpy.zeros_like(p) for p in self.params]
        loss = 0.0
        for _ in range(iter_size):
            lo, g = self.loss_and_grads(*self.batch())
            loss += lo
            for a, d in zip(grads, g):
                a += d
        self.losses.append(loss / iter_size)
        self.last_batch_loss.append(lo)
        clip = c.get("clip", -1)
        if clip >= 0:
            norm = math.sqrt(sum((g ** 2).sum() for g in grads))
            if norm > clip:
                grads = [g * (clip / norm) for g in grads]
        rate = self.rate()
        lr_mult = c.get("lr_mult", (1, 1))
        decay_mult = c.get("decay_mult", (1, 1))
        wd = c.get("weight_decay", 0.0)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g / iter_size
            if wd * decay_mult[i]:
                if c.get("reg", "L2") == "L2":
                    g = g + wd * decay_mult[i] * p
                else:
                    g = g + wd * decay_mult[i] * numpy.sign(p)
            lr = rate * lr_mult[i]
            step = self.rule(i, g, lr)
            p -= step
        self.it += 1

    def rule(self, i, g, lr):
        c = self.cfg
        kind = c["type"]
        mom = c.get("momentum", 0.0)
        delta = c.get("delta", 1e-8)
        h = self.hist[0]
        if kind == "SGD":
            h[i] = mom * h[i] + lr * g
            return h[i].copy()
        if kind == "Nesterov":
            old = h[i].copy()
            h[i] = mom * h[i] + lr * g
            return (1 + mom) * h[i] - mom * old
        if kind == "AdaGrad":
            h[i] = h[i] + g * g
            return lr * g / (numpy.sqrt(h[i]) + delta)
        if kind == "RMSProp":
            d = c.get("rms_decay", 0.99)
            h[i] = d * h[i] + (1 - d) * g * g
            return lr * g / (numpy.sqrt(h[i]) + delta)
        if kind == "AdaDelta":
            h2 = self.hist[1]
            h[i] = mom * h[i] + (1 - mom) * g * g
            u = g * numpy.sqrt((h2[i] + delta) / (h[i] + delta))
            h2[i] = mom * h2[i] + (1 - mom) * u * u
            return lr * u
        if kind == "Adam":
            v = self.hist[1]
            b1, b2 = mom, c.get("momentum2", 0.999)
            t = self.it + 1
            h[i] = b1 * h[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            return lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * h[i] / (numpy.sqrt(v[i]) + delta)
        raise AssertionError(kind)

    def history_flat(self):
        return [h for hs in self.hist for h in hs]


def solver_text_for(cfg):
    lines = ['type: "%s"' % cfg["type"], "base_lr: %r" % cfg["base_lr"], "display: 0", "max_iter: 100",
             'lr_policy: "%s"' % cfg.get("lr_policy", "fixed")]
    for key in ("momentum", "momentum2", "delta", "rms_decay", "weight_decay", "gamma", "power",
                "stepsize", "iter_size"):
        if key in cfg:
            lines.append("%s: %r" % (key, cfg[key]))
    if "clip" in cfg:
        lines.append("clip_gradients: %r" % cfg["clip"])
    if "reg" in cfg:
        lines.append('regularization_type: "%s"' % cfg["reg"])
    return "\n".join(lines)


BASE = {
    "SGD": dict(type="SGD", base_lr=0.01, momentum=0.9),
    "Nesterov": dict(type="Nesterov", base_lr=0.01, momentum=0.9),
    "AdaGrad": dict(type="AdaGrad", base_lr=0.01, delta=1e-6),
    "RMSProp": dict(type="RMSProp", base_lr=0.01, rms_decay=0.95, delta=1e-6),
    "AdaDelta": dict(type="AdaDelta", base_lr=0.5, momentum=0.95, delta=1e-6),
    "Adam": dict(type="Adam", base_lr=0.01, momentum=0.9, momentum2=0.999, delta=1e-8),
}
VARIANTS = {
    "plain": {},
    "l2_mults": dict(weight_decay=0.05, lr_mult=(1.0, 2.0), decay_mult=(1.0, 0.5)),
    "l1_inv": dict(weight_decay=0.02, reg="L1", lr_policy="inv", gamma=0.1, power=0.75),
    "clip": dict(clip=0.5, weight_decay=0.01),
    "itersize_clip": dict(iter_size=3, clip=0.8, weight_decay=0.01, batch=3),
}


def run_case(tmp_path, data, cfg, dtype, n_iter=5):
    lst = write_h5_list(tmp_path, [data], name="d%s" % numpy.dtype(dtype).name)
    net = linreg_net(lst, batch=cfg.get("batch", 4), lr_mult=cfg.get("lr_mult", (1, 1)),
                     decay_mult=cfg.get("decay_mult", (1, 1)))
    solver = netlib.get_solver(make_param(net, solver_text_for(cfg)), dtype=dtype)
    assert type(solver).__name__ == cfg["type"] + "Solver"
    w0, b0 = (numpy.array(p.data, numpy.float64) for p in solver.net.params["ip"])
    ref = Reference(data[0], data[1], w0, b0, cfg)
    for _ in range(n_iter):
        solver.step(1)
        ref.iterate()
        got = [numpy.array(p.data, numpy.float64) for p in solver.net.params["ip"]]
        yield solver, ref, got


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(BASE))
def test_update_rule_matches_closed_form(tmp_path, solver_data, kind, variant):
    _need_layers(*NEEDED)
    cfg = dict(BASE[kind], **VARIANTS[variant])
    # float64 nets: the formulas, to rounding
    for solver, ref, got in run_case(tmp_path, solver_data, cfg, numpy.float64):
        for g, e in zip(got, ref.params):
            numpy.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
        hist = [numpy.array(h.data, numpy.float64) for h in solver.history]
        exp_hist = ref.history_flat()
        assert len(hist) == len(exp_hist)
        for g, e in zip(hist, exp_hist):
            numpy.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
    assert solver.iter == 5
    # float32 nets (Caffe's arithmetic): close to the float64 reference
    for solver, ref, got in run_case(tmp_path, solver_data, cfg, numpy.float32):
        for g, e in zip(got, ref.params):
            numpy.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5 * max(1.0, numpy.abs(e).max()))
    assert solver.history[0].dtype == numpy.float32


def test_history_layout_two_n_for_adadelta_and_adam(tmp_path, solver_data):
    _need_layers(*NEEDED)
    for kind, n in (("SGD", 2), ("Nesterov", 2), ("AdaGrad", 2), ("RMSProp", 2), ("AdaDelta", 4), ("Adam", 4)):
        lst = write_h5_list(tmp_path, [solver_data], name=kind)
        s = netlib.get_solver(make_param(linreg_net(lst), solver_text_for(BASE[kind])))
        assert len(s.history) == n
        shapes = [tuple(h.shape) for h in s.history]
        assert shapes[:2] == [(1, 300), (1,)] and shapes[2:] == shapes[:2] * (n // 2 - 1)


# -- learning rate policies -------------------------------------------------------------
def _policy_solver(tmp_path, data_list, text):
    return netlib.SGDSolver(make_param(linreg_net(data_list), "base_lr: 0.1\n" + text))


POLICIES = {
    "fixed": ("", lambda it: 0.1),
    "step": ("gamma: 0.5 stepsize: 3", lambda it: 0.1 * 0.5 ** (it // 3)),
    "exp": ("gamma: 0.9", lambda it: 0.1 * 0.9 ** it),
    "inv": ("gamma: 0.0001 power: 0.75", lambda it: 0.1 * (1 + 0.0001 * it) ** -0.75),
    "poly": ("power: 2 max_iter: 20", lambda it: 0.1 * (1 - it / 20) ** 2),
    "sigmoid": ("gamma: -0.5 stepsize: 6", lambda it: 0.1 / (1 + math.exp(0.5 * (it - 6)))),
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_lr_policy_formulas(tmp_path, data_list, policy):
    _need_layers(*NEEDED)
    extra, expect = POLICIES[policy]
    s = _policy_solver(tmp_path, data_list, 'lr_policy: "%s" %s' % (policy, extra))
    for it in (0, 1, 2, 3, 5, 6, 7, 11, 19):
        s.iter = it
        got = s.get_learning_rate()
        assert abs(got - expect(it)) <= 1e-6 * abs(expect(it)) + 1e-12, (policy, it, got, expect(it))
        assert isinstance(got, numpy.float32)
    if policy == "step":
        assert s.current_step == 19 // 3


def test_multistep_advances_at_most_one_step_per_call(tmp_path, data_list):
    _need_layers(*NEEDED)
    multistep = 'lr_policy: "multistep" gamma: 0.1 stepvalue: 2 stepvalue: 3 stepvalue: 10'
    s = _policy_solver(tmp_path, data_list, multistep)
    seen = []
    for it in range(12):
        s.iter = it
        seen.append((s.current_step, float(s.get_learning_rate())))
    steps = [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3]
    for (cur, lr), want in zip(seen, steps):
        assert lr == pytest.approx(0.1 * 0.1 ** want, rel=1e-6)
    # the quirk: jumping past several step values moves one step per call
    s2 = _policy_solver(tmp_path, data_list, multistep)
    s2.iter = 50
    assert s2.lr == pytest.approx(0.01, rel=1e-6)  # ``lr`` has no side effect
    assert s2.current_step == 0
    rates = [float(s2.get_learning_rate()) for _ in range(4)]
    assert rates == pytest.approx([1e-2, 1e-3, 1e-4, 1e-4], rel=1e-6)
    assert s2.current_step == 3


def test_training_uses_lr_of_iteration_before_increment(tmp_path, data_list, caplog):
    _need_layers(*NEEDED)
    s = _policy_solver(tmp_path, data_list, 'lr_policy: "step" gamma: 0.1 stepsize: 2 display: 1')
    with caplog.at_level(logging.INFO, logger="netlib"):
        s.step(4)
    lrs = [(int(m.group(1)), float(m.group(2))) for m in
           (re.match(r"Iteration (\d+), lr = (\S+)$", r.getMessage()) for r in caplog.records) if m]
    assert lrs == [(0, 0.1), (1, 0.1), (2, pytest.approx(0.01)), (3, pytest.approx(0.01))]


def test_bad_policy_and_solver_checks(tmp_path, data_list):
    _need_layers(*NEEDED)
    with pytest.raises(ConfigError, match="learning rate policy"):
        _policy_solver(tmp_path, data_list, 'lr_policy: "cosine"')
    with pytest.raises(ConfigError, match="Momentum cannot be used with AdaGrad"):
        netlib.AdaGradSolver(make_param(linreg_net(data_list), 'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9'))
    with pytest.raises(ConfigError, match="rms_decay"):
        netlib.RMSPropSolver(make_param(linreg_net(data_list), 'base_lr: 0.1 lr_policy: "fixed" rms_decay: 1.5'))
    with pytest.raises(ConfigError, match="average_loss"):
        _policy_solver(tmp_path, data_list, 'lr_policy: "fixed" average_loss: 0')


# -- solver type selection ---------------------------------------------------------------
def test_get_solver_by_type_and_legacy_enum(tmp_path, data_list):
    _need_layers(*NEEDED)
    net = linreg_net(data_list)
    for enum, name in ((0, "SGD"), (1, "Nesterov"), (2, "AdaGrad"), (3, "RMSProp"), (4, "AdaDelta"), (5, "Adam")):
        s = netlib.get_solver(make_param(net, 'base_lr: 0.1 lr_policy: "fixed" solver_type: %d' % enum))
        assert type(s).__name__ == name + "Solver" and s.param.type == name
        assert not s.param.HasField("solver_type")
        s = netlib.get_solver(make_param(net, 'base_lr: 0.1 lr_policy: "fixed" type: "%s"' % name))
        assert type(s) is getattr(netlib, name + "Solver")
    assert type(netlib.get_solver(make_param(net, 'base_lr: 0.1 lr_policy: "fixed"'))) is netlib.SGDSolver
    # both set and agreeing is accepted; disagreeing is an error
    s = netlib.get_solver(make_param(net, 'base_lr: 0.1 lr_policy: "fixed" type: "Adam" solver_type: ADAM'))
    assert type(s) is netlib.AdamSolver
    with pytest.raises(ConfigError, match="solver_type.*type"):
        netlib.get_solver(make_param(net, 'base_lr: 0.1 lr_policy: "fixed" type: "Adam" solver_type: SGD'))
    with pytest.raises(ConfigError, match="unknown solver type 'Adamax'"):
        netlib.get_solver(make_param(net, 'base_lr: 0.1 lr_policy: "fixed" type: "Adamax"'))


# -- the loop: logging, smoothing, tests ------------------------------------------------------
def _log_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "netlib"]


def test_display_and_average_loss_match_reference(tmp_path, solver_data, caplog):
    _need_layers(*NEEDED)
    cfg = dict(BASE["SGD"], iter_size=2, batch=3)
    lst = write_h5_list(tmp_path, [solver_data])
    param = make_param(linreg_net(lst, batch=3), solver_text_for(cfg))
    param.display, param.average_loss = 2, 3
    s = netlib.get_solver(param, dtype=numpy.float64)
    w0, b0 = (numpy.array(p.data) for p in s.net.params["ip"])
    ref = Reference(solver_data[0], solver_data[1], w0, b0, cfg)
    with caplog.at_level(logging.INFO, logger="netlib"):
        s.step(7)
    for _ in range(7):
        ref.iterate()
    lines = _log_lines(caplog)
    shown = {}
    for i, line in enumerate(lines):
        m = re.match(r"Iteration (\d+) \((\S+) iter/s, (\S+)s/2 iters\), loss = (\S+)$", line)
        if m:
            it = int(m.group(1))
            shown[it] = float(m.group(4))
            out = re.match(r"    Train net output #0: loss = (\S+) \(\* 1 = (\S+) loss\)$", lines[i + 1])
            assert out, lines[i + 1]
            # Caffe prints the output blob as the last of the iter_size forwards left it
            assert float(out.group(1)) == pytest.approx(ref.last_batch_loss[it], rel=1e-5)
            assert lines[i + 2] == "Iteration %d, lr = 0.01" % it
    assert sorted(shown) == [0, 2, 4, 6]
    for it, value in shown.items():
        window = ref.losses[max(0, it - 2):it + 1]
        assert value == pytest.approx(sum(window) / len(window), rel=1e-5)


def test_test_nets_log_and_average_like_caffe(tmp_path, solver_data, caplog):
    _need_layers(*NEEDED, "Power")
    lst = write_h5_list(tmp_path, [solver_data])
    extra = """layer { name: "copy" type: "Power" bottom: "ip" top: "ipcopy" include { phase: TEST } }"""
    param = make_param(linreg_net(lst, extra=extra), solver_text_for(BASE["SGD"]))
    param.test_iter.append(2)
    param.test_interval = 3
    param.test_compute_loss = True
    s = netlib.get_solver(param, dtype=numpy.float64)
    assert len(s.test_nets) == 1 and s.test_nets[0].phase == caffe_pb2.TEST and s.net.phase == caffe_pb2.TRAIN
    w0, b0 = (numpy.array(p.data) for p in s.net.params["ip"])
    ref = Reference(solver_data[0], solver_data[1], w0, b0, BASE["SGD"])
    snapshots = {}
    for it in range(4):
        if it % 3 == 0:
            snapshots[it] = [p.copy() for p in ref.params]
        ref.iterate()
    with caplog.at_level(logging.INFO, logger="netlib"):
        s.step(4)
    lines = _log_lines(caplog)
    starts = [i for i, l in enumerate(lines) if re.match(r"Iteration \d+, Testing net \(#0\)$", l)]
    assert [lines[i] for i in starts] == ["Iteration 0, Testing net (#0)", "Iteration 3, Testing net (#0)"]
    X = solver_data[0].reshape(8, -1)
    T = solver_data[1]
    test_pos = 0
    for i, it in zip(starts, (0, 3)):
        w, b = snapshots[it]
        outs, losses = [], []
        for _ in range(2):  # the test net reads its own batches
            idx = [(test_pos + j) % 8 for j in range(4)]
            test_pos += 4
            y = X[idx] @ w.T + b
            outs.append(y.ravel())
            losses.append(((y - T[idx]) ** 2).sum() / 8)
        mean_out = numpy.mean(outs, axis=0)
        mean_loss = numpy.mean(losses)
        block = lines[i + 1:i + 7]
        assert block[0].startswith("Test loss: ")
        assert float(block[0].split(": ")[1]) == pytest.approx(mean_loss, rel=1e-5)
        # outputs in alphabetical order, one score per element: ipcopy #0..#3, then loss #4
        for k in range(4):
            m = re.match(r"    Test net output #%d: ipcopy = (\S+)$" % k, block[1 + k])
            assert m, block[1 + k]
            assert float(m.group(1)) == pytest.approx(mean_out[k], rel=1e-5, abs=1e-6)
        m = re.match(r"    Test net output #4: loss = (\S+) \(\* 1 = (\S+) loss\)$", block[5])
        assert m, block[5]
        assert float(m.group(1)) == pytest.approx(mean_loss, rel=1e-5)
    # test nets use the train weights (shared by layer name)
    tw = s.test_nets[0].params["ip"][0]
    assert tw.shares_data_with(s.net.params["ip"][0])


def test_test_initialization_false_and_test_net_sources(tmp_path, data_list, caplog):
    _need_layers(*NEEDED)
    net = linreg_net(data_list)
    param = make_param(net, solver_text_for(BASE["SGD"]))
    param.test_iter.extend([1, 1])
    param.test_net_param.add().CopyFrom(text_format.Parse(net, caffe_pb2.NetParameter()))
    param.test_interval = 2
    param.test_initialization = False
    with caplog.at_level(logging.INFO, logger="netlib"):
        s = netlib.get_solver(param)
        s.step(3)
    lines = _log_lines(caplog)
    assert "Creating test net (#0) specified by test_net_param" in lines
    assert "Creating test net (#1) specified by net_param" in lines
    assert len(s.test_nets) == 2
    tests = [l for l in lines if "Testing net" in l]
    assert tests == ["Iteration 2, Testing net (#0)", "Iteration 2, Testing net (#1)"]
    bad = make_param(net, solver_text_for(BASE["SGD"]))
    bad.test_net_param.add().CopyFrom(text_format.Parse(net, caffe_pb2.NetParameter()))
    with pytest.raises(ConfigError, match="test_iter must be specified for each test network"):
        netlib.get_solver(bad)
    bad.test_iter.append(1)
    with pytest.raises(ConfigError, match="test_interval"):
        netlib.get_solver(bad)


def test_net_state_merging(tmp_path):
    _need_layers("Input", "AbsVal")
    net = """
    name: "states"
    state { stage: "fromnet" }
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "train_only" type: "AbsVal" bottom: "x" top: "a" include { phase: TRAIN } }
    layer { name: "test_only" type: "AbsVal" bottom: "x" top: "a" include { phase: TEST } }
    layer { name: "lvl" type: "AbsVal" bottom: "x" top: "l" include { min_level: 2 } }
    layer { name: "stg" type: "AbsVal" bottom: "x" top: "s" include { stage: "special" } }
    layer { name: "netstg" type: "AbsVal" bottom: "x" top: "n" include { stage: "fromnet" } }
    """
    param = make_param(net, """base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_iter: 1 test_interval: 5
        train_state { level: 2 } test_state { stage: "special" } test_state { }""")
    s = netlib.SGDSolver(param)

    def names(net):
        return [n for n, l in zip(net.layer_names, net.layers) if l.type != "Split"]

    assert names(s.net) == ["in", "train_only", "lvl", "netstg"]
    assert [names(n) for n in s.test_nets] == [["in", "test_only", "stg", "netstg"], ["in", "test_only", "netstg"]]
    assert s.net.phase == caffe_pb2.TRAIN and all(n.phase == caffe_pb2.TEST for n in s.test_nets)
    param.test_state.add()
    with pytest.raises(ConfigError, match="test_state"):
        netlib.SGDSolver(param)


def test_solve_sequence_snapshot_after_train_and_final_test(tmp_path, data_list, caplog, monkeypatch):
    _need_layers(*NEEDED)
    monkeypatch.chdir(tmp_path)
    param = make_param(linreg_net(data_list), solver_text_for(BASE["SGD"]))
    param.max_iter, param.display, param.test_interval = 4, 2, 4
    param.test_iter.append(1)
    param.snapshot_prefix = "snap/run"
    os.mkdir("snap")
    s = netlib.get_solver(param)
    with caplog.at_level(logging.INFO, logger="netlib"):
        s.solve()
    lines = _log_lines(caplog)
    assert s.iter == 4
    assert lines[0] == "Solving linreg" and lines[1] == "Learning Rate Policy: fixed"
    tail = lines[lines.index("Snapshotting to binary proto file snap/run_iter_4.caffemodel"):]
    assert tail[1] == "Snapshotting solver state to binary proto file snap/run_iter_4.solverstate"
    assert re.match(r"Iteration 4, loss = \S+$", tail[2])
    assert tail[3] == "Iteration 4, Testing net (#0)"
    assert tail[-1] == "Optimization Done."
    assert sorted(os.listdir("snap")) == ["run_iter_4.caffemodel", "run_iter_4.solverstate"]
    # snapshot_after_train false and no display/test at the end
    param.snapshot_after_train = False
    param.max_iter, param.display, param.test_interval = 3, 2, 2
    caplog.clear()
    s = netlib.get_solver(param)
    with caplog.at_level(logging.INFO, logger="netlib"):
        s.solve()
    lines = _log_lines(caplog)
    assert not any("Snapshotting" in l for l in lines)
    assert not any(l.startswith("Iteration 3, loss") for l in lines)
    assert lines[-1] == "Optimization Done." and lines[-2] != "Iteration 3, Testing net (#0)"


def test_snapshot_interval_and_prefix_checks(tmp_path, data_list, monkeypatch):
    _need_layers(*NEEDED)
    monkeypatch.chdir(tmp_path)
    param = make_param(linreg_net(data_list), solver_text_for(BASE["SGD"]))
    param.snapshot = 2
    with pytest.raises(ConfigError, match="snapshot_prefix"):
        netlib.get_solver(param)
    param.snapshot_prefix = "missing_dir/x"
    with pytest.raises(ConfigError, match="Cannot write to snapshot prefix"):
        netlib.get_solver(param)
    param.snapshot_prefix = "p"
    s = netlib.get_solver(param)
    s.step(5)
    assert sorted(f for f in os.listdir(".") if f.startswith("p_")) == [
        "p_iter_2.caffemodel", "p_iter_2.solverstate", "p_iter_4.caffemodel", "p_iter_4.solverstate"]


def test_solver_file_paths_and_snapshot_prefix_default(tmp_path, solver_data, monkeypatch):
    _need_layers(*NEEDED)
    sub = tmp_path / "models" / "m"
    sub.mkdir(parents=True)
    lst = write_h5_list(sub, [solver_data])
    (sub / "net.prototxt").write_text(linreg_net(lst))
    (sub / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    s = netlib.get_solver("../models/m/solver.prototxt")
    assert s.param.snapshot_prefix == "../models/m/solver"
    assert s.net.name == "linreg"
    # a zoo-style path: only the base name exists next to the solver
    (sub / "zoo.prototxt").write_text('net: "examples/m/net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                                      'snapshot_prefix: "%s"\n' % str(work))
    s = netlib.SGDSolver(str(sub / "zoo.prototxt"))
    assert s.param.snapshot_prefix == os.path.join(str(work), "zoo")  # a directory -> dir/<stem>
    # CWD wins when the path exists there
    (work / "net.prototxt").write_text(linreg_net(lst).replace('name: "linreg"', 'name: "cwd"'))
    assert netlib.get_solver(str(sub / "solver.prototxt")).net.name == "cwd"
    (sub / "bad.prototxt").write_text('net: "nope/absent.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n')
    with pytest.raises(NetlibFileNotFoundError) as err:
        netlib.get_solver(str(sub / "bad.prototxt"))
    assert "bad.prototxt" in str(err.value) and "nope/absent.prototxt" in str(err.value)


def test_train_net_field_rules(tmp_path, data_list):
    _need_layers(*NEEDED)
    net = linreg_net(data_list)
    param = make_param(net, 'base_lr: 0.1 lr_policy: "fixed"')
    param.train_net_param.CopyFrom(param.net_param)
    with pytest.raises(ConfigError, match="more than one"):
        netlib.SGDSolver(param)
    with pytest.raises(ConfigError, match="must specify a train net"):
        netlib.SGDSolver(text_format.Parse('base_lr: 0.1 lr_policy: "fixed"', caffe_pb2.SolverParameter()))
    param.ClearField("net_param")
    s = netlib.SGDSolver(param)
    assert s.net.phase == caffe_pb2.TRAIN and s.test_nets == []


def test_non_finite_loss_names_first_bad_layer(tmp_path, solver_data):
    _need_layers(*NEEDED)
    X, T = solver_data[0].copy(), solver_data[1]
    X[5, 0, 0, 0] = numpy.nan
    lst = write_h5_list(tmp_path, [(X, T)])
    s = netlib.get_solver(make_param(linreg_net(lst), solver_text_for(BASE["SGD"])))
    s.step(1)
    with pytest.raises(SolverError) as err:
        s.step(1)
    msg = str(err.value)
    assert "iteration 1" in msg and "'data'" in msg and "HDF5Data" in msg
    # a diverging run: the first non-finite output is the InnerProduct's
    lst = write_h5_list(tmp_path, [solver_data], name="ok")
    s = netlib.get_solver(make_param(linreg_net(lst), 'base_lr: 1e38 lr_policy: "fixed"'))
    with pytest.raises(SolverError) as err, numpy.errstate(all="ignore"):
        s.step(5)
    assert "layer 'ip' (type InnerProduct), top 'ip'" in str(err.value)


def test_callbacks_actions_and_seed(tmp_path, data_list, monkeypatch):
    _need_layers(*NEEDED)
    monkeypatch.chdir(tmp_path)
    param = make_param(linreg_net(data_list), solver_text_for(BASE["SGD"]))
    param.random_seed = 7
    param.snapshot_prefix = "cb"
    s = netlib.get_solver(param)
    s2 = netlib.get_solver(param)
    numpy.testing.assert_array_equal(s.net.params["ip"][0].data, s2.net.params["ip"][0].data)
    calls = []
    s.add_callback(lambda: calls.append(("start", s.iter)), lambda: calls.append(("grads", s.iter)))
    s.iteration_callbacks.append(lambda sv: calls.append(("done", sv.iter)))
    s.action_request = lambda: {2: "snapshot", 3: "stop"}.get(s.iter, "none")
    s.step(10)
    assert s.iter == 3 and s.requested_early_exit
    assert calls[:3] == [("start", 0), ("grads", 0), ("done", 1)]
    assert calls[-1] == ("done", 3)
    assert sorted(f for f in os.listdir(".") if f.startswith("cb")) == ["cb_iter_2.caffemodel", "cb_iter_2.solverstate"]
    param.random_seed = 8
    s3 = netlib.get_solver(param)
    assert not numpy.array_equal(s2.net.params["ip"][0].data, s3.net.params["ip"][0].data)
    with pytest.raises(ConfigError, match="action_request"):
        s3.action_request = lambda: "explode"
        s3.step(1)


def test_apply_update_pycaffe_style(tmp_path, solver_data):
    _need_layers(*NEEDED)
    lst = write_h5_list(tmp_path, [solver_data])
    cfg = BASE["SGD"]
    s = netlib.get_solver(make_param(linreg_net(lst), solver_text_for(cfg)), dtype=numpy.float64)
    w0, b0 = (numpy.array(p.data) for p in s.net.params["ip"])
    ref = Reference(solver_data[0], solver_data[1], w0, b0, cfg)
    for _ in range(2):
        s.net.clear_param_diffs()
        s.net.forward_backward()
        s.apply_update()
        ref.iterate()
    assert s.iter == 2
    numpy.testing.assert_allclose(s.net.params["ip"][0].data, ref.params[0], rtol=1e-10)
    other = netlib.Net(linreg_net(lst), netlib.TEST, dtype=numpy.float64)
    s.share_weights(other)
    assert other.params["ip"][0].shares_data_with(s.net.params["ip"][0])


def test_lr_matches_real_caffe_log():
    """Every ``Iteration N, lr = r`` line of a real Caffe run (inv policy),
    reproduced digit for digit by the float32 rate computation."""
    _need_layers(*NEEDED)
    folder = shared_path("reference", "caffe_made", "lenet_small_run")
    with open(os.path.join(folder, "caffe_train_lenet.log")) as f:
        lines = re.findall(r"sgd_solver.cpp:\d+\] Iteration (\d+), lr = (\S+)", f.read())
    assert len(lines) == 15
    param, _ = solver_mod.read_solver(os.path.join(folder, "lenet_solver.prototxt"))
    for field in ("net", "test_iter", "test_interval", "snapshot"):
        param.ClearField(field)
    s = _bare_solver(param)
    for it, text in lines:
        s.iter = int(it)
        assert "%g" % s.get_learning_rate() == text, (it, text)


def _bare_solver(param):
    """A solver on a one-parameter net (for lr checks only)."""
    _need_layers("Input", "InnerProduct", "EuclideanLoss")
    p = caffe_pb2.SolverParameter()
    p.CopyFrom(param)
    text_format.Parse("""
    layer { name: "x" type: "Input" top: "x" top: "t" input_param { shape { dim: 1 dim: 1 } shape { dim: 1 dim: 1 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 1 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """, p.net_param)
    return netlib.SGDSolver(p)


def test_weights_field_finetunes_train_and_test_nets(tmp_path, data_list, monkeypatch):
    _need_layers(*NEEDED)
    monkeypatch.chdir(tmp_path)
    net = linreg_net(data_list)
    src = netlib.Net(net, netlib.TEST)
    src.params["ip"][0].data[...] = numpy.arange(300, dtype=numpy.float32).reshape(1, 300)
    src.params["ip"][1].data[...] = 7
    src.save("a.caffemodel")
    src.params["ip"][1].data[...] = 9
    src.save_hdf5("b.caffemodel.h5")
    param = make_param(net, 'base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_interval: 5 '
                            'weights: "a.caffemodel, b.caffemodel.h5"')
    s = netlib.SGDSolver(param)
    for n in [s.net] + s.test_nets:  # later files win, as Caffe copies them in order
        numpy.testing.assert_array_equal(n.params["ip"][0].data.ravel(), numpy.arange(300))
        assert float(n.params["ip"][1].data[0]) == 9.0
    param.weights[:] = ["missing.caffemodel"]
    with pytest.raises(NetlibFileNotFoundError, match="missing.caffemodel"):
        netlib.SGDSolver(param)
