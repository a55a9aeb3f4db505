"""Snapshots and restores: Caffe's file layouts, exact resumes, atomic writes,
and real Caffe snapshots continuing to train."""
import json
import logging
import os
import re

import h5py
import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib import checkpoint
from netlib import random as nrandom
from netlib.errors import NetlibFileNotFoundError, WeightsError
from netlib.proto import caffe_pb2

from conftest import shared_path
from test_solver import write_h5_list


def _need_layers(*types):
    have = set(netlib.layer_type_list())
    missing = [t for t in types if t not in have]
    if missing:
        pytest.skip("layer types not implemented yet: %s" % ", ".join(missing))


LINREG = ("HDF5Data", "InnerProduct", "EuclideanLoss", "Dropout")


@pytest.fixture
def data_list(tmp_path):
    """Two HDF5 files (5 and 3 rows) of a random regression problem."""
    rng = numpy.random.default_rng(0)
    x = rng.normal(size=(8, 2, 3, 3))
    y = x.reshape(8, -1) @ rng.normal(size=(18, 1)) + 0.1
    return write_h5_list(tmp_path, [(x[:5], y[:5]), (x[5:], y[5:])])


def net_text(source, shuffle=True, dropout=True):
    drop = ('layer { name: "drop" type: "Dropout" bottom: "data" top: "dropped" '
            'dropout_param { dropout_ratio: 0.3 } }') if dropout else ""
    return """
name: "resume"
layer { name: "data" type: "HDF5Data" top: "data" top: "targets"
  hdf5_data_param { source: "%s" batch_size: 3 shuffle: %s } }
%s
layer { name: "ip" type: "InnerProduct" bottom: "%s" top: "ip"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 }
    bias_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "targets" top: "loss" }
""" % (source, "true" if shuffle else "false", drop, "dropped" if dropout else "data")


def make_solver(source, extra="", seed=5, fmt="BINARYPROTO", kind="SGD", prefix="snap", **kw):
    text = ('type: "%s" base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "multistep" gamma: 0.5 '
            'stepvalue: 2 stepvalue: 4 display: 1 average_loss: 3 snapshot_format: %s snapshot_prefix: "%s" '
            'random_seed: %d %s' % (kind, fmt, prefix, seed, extra))
    param = text_format.Parse(text, caffe_pb2.SolverParameter())
    text_format.Parse(net_text(source, **kw), param.net_param)
    return netlib.get_solver(param)


def weights_of(solver):
    return [numpy.array(b.data) for b in solver.net.learnable_params]


def history_of(solver):
    return [numpy.array(h.data) for h in solver.history]


def _losses(caplog, first):
    """Logged smoothed train losses and test outputs from iteration ``first`` on."""
    out = {}
    test_iter = None
    for r in caplog.records:
        msg = r.getMessage()
        m = re.match(r"Iteration (\d+) \(.*\), loss = (\S+)$", msg)
        if m and int(m.group(1)) >= first:
            out[int(m.group(1))] = m.group(2)
        m = re.match(r"Iteration (\d+), Testing net", msg)
        if m:
            test_iter = int(m.group(1))
        m = re.match(r"    Test net output #0: loss = (\S+)", msg)
        if m and test_iter >= first:
            out["test %d" % test_iter] = m.group(1)
    return out


# -- file layouts ---------------------------------------------------------------------
def test_binaryproto_snapshot_layout(tmp_path, data_list, monkeypatch):
    _need_layers(*LINREG)
    monkeypatch.chdir(tmp_path)
    s = make_solver(data_list, extra="snapshot_diff: true")
    s.step(3)
    model, state_path = s.snapshot()
    assert (model, state_path) == ("snap_iter_3.caffemodel", "snap_iter_3.solverstate")
    raw = open(state_path, "rb").read()
    state = caffe_pb2.SolverState()
    state.ParseFromString(raw)  # the extra field is skipped as an unknown field
    assert state.iter == 3 and state.learned_net == "snap_iter_3.caffemodel" and state.current_step == 1
    assert len(state.history) == 2
    for proto, h in zip(state.history, s.history):
        assert list(proto.shape.dim) == list(h.shape)
        numpy.testing.assert_array_equal(numpy.array(proto.data, numpy.float32).reshape(h.shape), h.data)
    # the Caffe message is a prefix; the netlib entry is field 1000, length-delimited
    plain = caffe_pb2.SolverState()
    plain.CopyFrom(state)
    body = plain.SerializeToString()
    extra = checkpoint.find_extra_field(raw)
    assert extra is not None and raw.endswith(extra)
    assert raw[:len(raw) - len(extra)].startswith(body[:20])
    payload = json.loads(extra.decode())
    assert payload["format"] == "netlib-solver-extra" and "rng" in payload and "data" in payload["train_layers"]
    net = caffe_pb2.NetParameter()
    net.ParseFromString(open(model, "rb").read())
    assert net.name == "resume"
    layers = {l.name: l for l in net.layer}
    assert set(layers) >= {"data", "drop", "ip", "loss"}
    ip = layers["ip"]
    numpy.testing.assert_array_equal(numpy.array(ip.blobs[0].data, numpy.float32),
                                     s.net.params["ip"][0].data.ravel())
    assert len(ip.blobs[0].diff) == ip.blobs[0].shape.dim[1]  # snapshot_diff writes diffs


def test_hdf5_snapshot_layout_matches_real_caffe_file(tmp_path, data_list, monkeypatch):
    _need_layers(*LINREG)
    real = shared_path("reference", "caffe_made", "lenet_small_run", "lenet_small_iter_300.solverstate.h5")
    monkeypatch.chdir(tmp_path)
    s = make_solver(data_list, fmt="HDF5", kind="Adam")
    s.step(2)
    model, state_path = s.snapshot()
    assert (model, state_path) == ("snap_iter_2.caffemodel.h5", "snap_iter_2.solverstate.h5")
    with h5py.File(real, "r") as ref, h5py.File(state_path, "r") as got:
        assert set(ref.keys()) | {"netlib_state"} == set(got.keys())
        for key in ("iter", "current_step"):
            assert got[key].dtype == ref[key].dtype == numpy.dtype("<i4")
            assert got[key].shape == ref[key].shape == (1,)
        rt, gt = ref["learned_net"].id.get_type(), got["learned_net"].id.get_type()
        assert got["learned_net"].shape == ref["learned_net"].shape == ()
        assert isinstance(gt, h5py.h5t.TypeStringID) and not gt.is_variable_str()
        assert gt.get_strpad() == rt.get_strpad() == h5py.h5t.STR_NULLTERM
        assert gt.get_cset() == rt.get_cset()
        assert gt.get_size() == len(model) + 1 and rt.get_size() == len(ref["learned_net"][()]) + 1
        assert got["learned_net"][()] == model.encode()
        assert int(got["iter"][0]) == 2 and int(got["current_step"][0]) == 0  # stepvalue 2 not reached yet
        assert sorted(got["history"].keys(), key=int) == ["0", "1", "2", "3"]  # Adam: [m..., v...]
        for i, h in enumerate(s.history):
            assert got["history"][str(i)].dtype == ref["history"]["0"].dtype
            numpy.testing.assert_array_equal(got["history"][str(i)][()], h.data)
        json.loads(got["netlib_state"][()].rstrip(b"\0").decode())
    with h5py.File(model, "r") as f:
        assert sorted(f["data"].keys()) == sorted(n for n in s.net.layer_names)
        assert len(f["data"]["loss"]) == 0 and len(f["data"]["ip"]) == 2
        numpy.testing.assert_array_equal(f["data"]["ip"]["0"][()], s.net.params["ip"][0].data)
        assert "diff" not in f


# -- exact resume ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kind", [("BINARYPROTO", "SGD"), ("HDF5", "Adam"), ("BINARYPROTO", "AdaDelta"),
                                      ("HDF5", "Nesterov")])
def test_resume_continues_bit_for_bit(tmp_path, data_list, monkeypatch, caplog, fmt, kind):
    _need_layers(*LINREG)
    monkeypatch.chdir(tmp_path)
    K, M = 4, 5
    test = "test_iter: 1 test_interval: 3 snapshot: %d" % K
    with caplog.at_level(logging.INFO, logger="netlib"):
        a = make_solver(data_list, extra=test, fmt=fmt, kind=kind, prefix="a")
        a.step(K + M)
    want_w, want_h, want_log = weights_of(a), history_of(a), _losses(caplog, K)
    caplog.clear()
    b = make_solver(data_list, extra=test, fmt=fmt, kind=kind, prefix="b")
    b.step(K)  # snapshots at K inside the loop: the loss ring buffer is saved too
    state_path = b.snapshot_filename(".solverstate.h5" if fmt == "HDF5" else ".solverstate")
    # a new solver with another seed: everything must come from the snapshot
    with caplog.at_level(logging.INFO, logger="netlib"):
        c = make_solver(data_list, extra=test, fmt=fmt, kind=kind, prefix="c", seed=999)
        c.restore(state_path)
        assert c.iter == K and c.current_step == b.current_step
        c.step(M)
    assert c.iter == K + M
    for got, want in zip(weights_of(c) + history_of(c), want_w + want_h):
        numpy.testing.assert_array_equal(got, want)
    assert _losses(caplog, K) == want_log  # smoothed train losses and test outputs too
    assert sorted(k for k in want_log if isinstance(k, str)) == ["test 6", "test 9"] or \
        sorted(k for k in want_log if isinstance(k, str)) == ["test 6"]
    # the test is sensitive: the same restore with another RNG stream diverges
    d = make_solver(data_list, extra=test, fmt=fmt, kind=kind, prefix="d", seed=999)
    d.restore(state_path)
    nrandom.set_random_seed(12345)
    d.step(M)
    assert not all(numpy.array_equal(x, y) for x, y in zip(weights_of(d), want_w))


def test_resume_through_solve_and_snapshot_interval(tmp_path, data_list, monkeypatch):
    _need_layers(*LINREG)
    monkeypatch.chdir(tmp_path)
    a = make_solver(data_list, extra="max_iter: 7 snapshot: 3", prefix="a")
    a.solve()
    assert sorted(os.listdir(".")) == sorted(["a_iter_3.caffemodel", "a_iter_3.solverstate", "a_iter_6.caffemodel",
                                              "a_iter_6.solverstate", "a_iter_7.caffemodel", "a_iter_7.solverstate"]
                                             + [f for f in os.listdir(".") if not f.startswith("a_")])
    c = make_solver(data_list, extra="max_iter: 7 snapshot: 3", prefix="c", seed=1)
    c.solve(resume_file="a_iter_3.solverstate")
    for got, want in zip(weights_of(c) + history_of(c), weights_of(a) + history_of(a)):
        numpy.testing.assert_array_equal(got, want)
    assert os.path.exists("c_iter_6.caffemodel") and os.path.exists("c_iter_7.solverstate")


# -- restore errors and path rules ---------------------------------------------------------
def test_restore_history_count_mismatch(tmp_path, data_list, monkeypatch):
    _need_layers(*LINREG)
    monkeypatch.chdir(tmp_path)
    s = make_solver(data_list)
    s.step(1)
    _, state = s.snapshot()
    adam = make_solver(data_list, kind="Adam", prefix="x")
    with pytest.raises(WeightsError, match=r"has 2 history blobs but this AdamSolver needs 4"):
        adam.restore(state)
    assert adam.iter == 0  # nothing half-restored
    with pytest.raises(NetlibFileNotFoundError):
        adam.restore("nope.solverstate")


def test_learned_net_found_next_to_a_moved_state(tmp_path, data_list, monkeypatch):
    _need_layers(*LINREG)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    os.mkdir("snaps")
    s = make_solver(data_list, fmt="HDF5", prefix="snaps/r")
    s.step(2)
    _, state = s.snapshot()
    saved = weights_of(s)
    moved = tmp_path / "moved"
    os.rename("snaps", str(moved))
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    c = make_solver(data_list, fmt="HDF5", prefix="q", seed=77)
    assert not numpy.array_equal(weights_of(c)[0], saved[0])
    c.restore(str(moved / "r_iter_2.solverstate.h5"))  # learned_net "snaps/r_iter_2.caffemodel.h5"
    for got, want in zip(weights_of(c), saved):
        numpy.testing.assert_array_equal(got, want)
    os.remove(str(moved / "r_iter_2.caffemodel.h5"))
    with pytest.raises(NetlibFileNotFoundError, match="r_iter_2.caffemodel.h5"):
        c.restore(str(moved / "r_iter_2.solverstate.h5"))


# -- atomic writes -----------------------------------------------------------------------
def _listing(folder="."):
    return sorted(os.listdir(folder))


def test_interrupted_snapshot_keeps_previous_files(tmp_path, data_list, monkeypatch):
    _need_layers(*LINREG)
    import netlib.files
    monkeypatch.chdir(tmp_path)
    os.mkdir("s")

    def state_dies(fmt):
        if fmt == "BINARYPROTO":
            def half_then_die(handle, data, chunk=None):
                handle.write(data[:len(data) // 2])
                raise OSError("disk full (simulated)")
            monkeypatch.setattr(checkpoint, "_write_all", half_then_die)
        else:
            real_create = h5py.Group.create_dataset
            calls = []

            def create_then_die(self, *args, **kwargs):
                calls.append(1)
                if len(calls) > 3:
                    raise OSError("disk full (simulated)")
                return real_create(self, *args, **kwargs)
            monkeypatch.setattr(h5py.Group, "create_dataset", create_then_die)

    def weights_die(fmt):
        def die(*args):
            raise OSError("power cut (simulated)")
        monkeypatch.setattr(netlib.files.os, "fsync", die)       # binaryproto: after the data, before the rename
        if fmt == "HDF5":
            monkeypatch.setattr(h5py.File, "close", die)      # HDF5: while finishing the file

    def undo():
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)

    for fmt in ("BINARYPROTO", "HDF5"):
        s = make_solver(data_list, fmt=fmt, prefix="s/p" + fmt)
        s.step(2)
        model, state = s.snapshot()
        before = {p: open(p, "rb").read() for p in (model, state)}
        listing = _listing("s")
        s.net.params["ip"][0].data[...] += 1.0
        s.history[0].data[...] += 1.0

        # 1. rewriting the same snapshot: the state dies halfway -> the old state is intact
        state_dies(fmt)
        with pytest.raises(OSError, match="simulated"):
            s.snapshot()
        undo()
        assert _listing("s") == listing  # no temp files left
        assert open(state, "rb").read() == before[state]

        # 2. the next snapshot's weights file dies -> no iter-3 file at all, iter 2 untouched
        s.step(1)
        weights_die(fmt)
        with pytest.raises(OSError, match="simulated"):
            s.snapshot()
        undo()
        assert _listing("s") == listing
        assert open(state, "rb").read() == before[state]

        # 3. the next snapshot's state dies -> a complete iter-3 weights file, no iter-3 state
        state_dies(fmt)
        with pytest.raises(OSError, match="simulated"):
            s.snapshot()
        undo()
        new_model = s.snapshot_filename(".caffemodel.h5" if fmt == "HDF5" else ".caffemodel")
        assert _listing("s") == sorted(listing + [os.path.basename(new_model)])
        check = make_solver(data_list, fmt=fmt, prefix="s/y", seed=4)
        check.net.copy_from(new_model)
        numpy.testing.assert_array_equal(check.net.params["ip"][0].data, s.net.params["ip"][0].data)

        # the intact snapshot still restores
        c = make_solver(data_list, fmt=fmt, prefix="s/z", seed=3)
        c.restore(state)
        assert c.iter == 2


# -- real Caffe snapshots ---------------------------------------------------------------
REAL = {
    "lenet_small_run_hdf5": ("caffe_made/lenet_small_run", "lenet_solver.prototxt", "lenet_train_test.prototxt",
                             "lenet_small_iter_300.solverstate.h5", (1, 28, 28)),
    "cifar10_quick_hdf5": ("models/cifar10_quick_trained_hdf5", "cifar10_quick_solver.prototxt",
                           "cifar10_quick_train_test.prototxt", "cifar10_quick_iter_5000.solverstate.h5", (3, 32, 32)),
    "lenet_binaryproto": ("models/lenet_trained_with_solverstate", "lenet_solver.prototxt",
                          "lenet_train_test.prototxt", "lenet_iter_10000.solverstate", (1, 28, 28)),
    "cifar10_full_binaryproto": ("models/cifar10_full_trained_binaryproto", "cifar10_full_solver.prototxt",
                                 "cifar10_full_train_test.prototxt", "cifar10_full_iter_70000.solverstate",
                                 (3, 32, 32)),
}


def _swap_data_layers(net_param, shape, batch):
    """Replace the LMDB Data layers with one Input layer (data, label)."""
    kept = [l for l in net_param.layer if l.type != "Data"]
    del net_param.layer[:]
    inp = net_param.layer.add()
    text_format.Parse('name: "input" type: "Input" top: "data" top: "label" '
                      'input_param { shape { dim: %d dim: %d dim: %d dim: %d } shape { dim: %d } }'
                      % ((batch,) + tuple(shape) + (batch,)), inp)
    for l in kept:
        net_param.layer.add().CopyFrom(l)


def _read_real_state(path):
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            return (int(f["iter"][0]), f["learned_net"][()].decode(),
                    [f["history"][str(i)][()] for i in range(len(f["history"]))])
    st = caffe_pb2.SolverState()
    st.ParseFromString(open(path, "rb").read())
    return st.iter, st.learned_net, [numpy.array(h.data, numpy.float32).reshape(tuple(h.shape.dim))
                                     for h in st.history]


def _read_real_weights(path):
    out = {}
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            for name in f["data"]:
                if len(f["data"][name]):
                    out[name] = [f["data"][name][str(i)][()] for i in range(len(f["data"][name]))]
        return out
    net = caffe_pb2.NetParameter()
    net.ParseFromString(open(path, "rb").read())
    for layer in list(net.layer) + list(net.layers):
        if len(layer.blobs):
            out[layer.name] = [numpy.array(b.data, numpy.float32) for b in layer.blobs]
    return out


@pytest.mark.parametrize("case", sorted(REAL))
def test_real_caffe_snapshot_restores_and_trains_on(case, tmp_path, monkeypatch):
    folder, solver_file, net_file, state_file, shape = REAL[case]
    folder = shared_path("reference", *folder.split("/"))
    _need_layers("Input", "Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss",
                 *(("LRN",) if "full" in case else ()))
    monkeypatch.chdir(tmp_path)
    from netlib.files import read_net_param
    from netlib.solver import read_solver
    param, _ = read_solver(os.path.join(folder, solver_file))  # upgrades solver_type
    net_param = read_net_param(os.path.join(folder, net_file))
    batch = 2
    _swap_data_layers(net_param, shape, batch)
    for f in ("net", "test_iter", "test_interval", "snapshot", "snapshot_prefix"):
        param.ClearField(f)
    param.net_param.CopyFrom(net_param)
    param.display = 0
    solver = netlib.get_solver(param)
    state_path = os.path.join(folder, state_file)
    it, learned, history = _read_real_state(state_path)
    solver.restore(state_path)  # learned_net is found next to the state file
    assert solver.iter == it and solver.current_step == 0
    weights = _read_real_weights(os.path.join(folder, os.path.basename(learned)))
    net = solver.net
    assert sorted(weights) == sorted(net.params)
    for name, blobs in weights.items():
        for got, want in zip(net.params[name], blobs):
            numpy.testing.assert_array_equal(got.data.ravel(), want.ravel())
    assert len(solver.history) == len(history)
    for got, want in zip(solver.history, history):
        numpy.testing.assert_array_equal(got.data, want.reshape(got.shape))

    # one more SGD step from the restored momentum, checked against the formula
    rng = numpy.random.default_rng(1)
    net.blobs["data"].data[...] = rng.uniform(0, 1, size=net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 10, size=batch)
    net.clear_param_diffs()
    net.forward_backward()
    specs = []  # (lr_mult, decay_mult) read from the prototxt, in learnable order
    for lp in net_param.layer:
        if lp.name in net.params:
            for k in range(len(net.params[lp.name])):
                spec = lp.param[k] if k < len(lp.param) else caffe_pb2.ParamSpec()
                specs.append((spec.lr_mult, spec.decay_mult))
    grads = [numpy.array(b.diff, numpy.float64) for b in net.learnable_params]
    w_old = [numpy.array(b.data, numpy.float64) for b in net.learnable_params]
    h_old = [numpy.array(h.data, numpy.float64) for h in solver.history]
    p = solver.param
    if p.lr_policy == "inv":
        rate = p.base_lr * (1 + p.gamma * it) ** (-p.power)
    else:
        assert p.lr_policy == "fixed"
        rate = p.base_lr
    solver.step(1)
    for (lr_mult, decay_mult), g, w, h, blob, hist in zip(specs, grads, w_old, h_old, net.learnable_params,
                                                          solver.history):
        want_h = p.momentum * h + rate * lr_mult * (g + p.weight_decay * decay_mult * w)
        scale = numpy.abs(want_h).max() + 1e-12
        numpy.testing.assert_allclose(hist.data, want_h, rtol=1e-3, atol=1e-4 * scale)
        numpy.testing.assert_allclose(blob.data, w - want_h, rtol=1e-5, atol=1e-4 * scale)
    solver.step(2)
    assert solver.iter == it + 3
    assert numpy.isfinite(net.forward_prefilled())
