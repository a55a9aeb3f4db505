"""pycaffe's Solver surface, as pycaffe's own suite (python/caffe/test/test_solver.py)
exercises it, checked against real pycaffe's answers.

The goldens (tests/golden/pycaffe_api/, tools/make_pycaffe_api_goldens.py)
come from real BVLC pycaffe running the same net and solver texts from the
same starting weights and inputs: the learning rate and loss of every
iteration, the weights after 10 SGD steps and after 3 steps of each solver
type, callback order, snapshot file names, what restore resumes.
"""
import gc
import json
import os

import numpy
import pytest

import netlib as caffe

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "pycaffe_api")
with open(os.path.join(GOLDEN, "api.json")) as _f:
    API = json.load(_f)
with numpy.load(os.path.join(GOLDEN, "numbers.npz")) as _z:
    NUM = {k: _z[k] for k in _z.files}
G = API["solver"]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """The numeric net and the suite's solver file in a fresh working folder
    (snapshot_prefix 'model' is relative to it, as in pycaffe's suite)."""
    monkeypatch.chdir(tmp_path)
    net = tmp_path / "numeric.prototxt"
    net.write_text(API["nets"]["numeric"])
    solver = tmp_path / "solver.prototxt"
    solver.write_text("net: '%s'\n%s" % (net, API["solver_suite"]))
    return {"net": str(net), "solver": str(solver), "dir": tmp_path}


def start(solver):
    """Real Caffe's starting weights and inputs in the train and test nets."""
    for name, blobs in solver.net.params.items():
        for i, b in enumerate(blobs):
            b.data[...] = NUM["w0/%s/%d" % (name, i)]
    for net in [solver.net] + list(solver.test_nets):
        net.blobs["data"].data[...] = NUM["x"]
        net.blobs["label"].data[...] = NUM["y"]
    return solver


def params_of(net):
    return {"%s/%d" % (name, i): b.data.copy() for name, blobs in net.params.items() for i, b in enumerate(blobs)}


def test_solve_runs_to_max_iter(files):
    solver = start(caffe.SGDSolver(files["solver"]))
    caffe.get_solver(files["solver"])  # the suite also checks get_solver builds
    assert solver.iter == G["iter0"] == 0
    solver.solve()
    assert solver.iter == G["iter_after_solve"] == 20
    assert not [f for f in os.listdir(files["dir"]) if f.startswith("model")]  # snapshot_after_train: false


def test_sgd_trajectory_matches_real_caffe(files):
    solver = start(caffe.SGDSolver(files["solver"]))
    calls = []
    solver.add_callback(lambda: calls.append(["start", solver.iter]),
                        lambda: calls.append(["grads", solver.iter]))
    lrs, losses = [], []
    for k in range(10):
        lrs.append(solver.lr)
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
        if k == 4:
            before = set(os.listdir(files["dir"]))
            solver.snapshot()
            assert sorted(set(os.listdir(files["dir"])) - before) == G["snapshot_files"]
    assert isinstance(lrs[0], float)
    numpy.testing.assert_allclose(lrs, G["lrs"], rtol=1e-7)  # 'inv' policy, float32 arithmetic
    numpy.testing.assert_allclose(losses, G["losses"], rtol=1e-5)
    assert calls[:6] == G["callback_calls"]  # on_start, then on_gradients_ready, every iteration
    assert solver.iter == G["iter_after_steps"] == 10
    got = params_of(solver.net)
    for key, value in got.items():
        numpy.testing.assert_allclose(value, NUM["sgd10/" + key], rtol=1e-5, atol=1e-6)
    # the test net got the train weights by sharing when it ran (test_initialization)
    assert G["test_net_shares_after_test"]
    numpy.testing.assert_array_equal(solver.test_nets[0].params["ip"][0].data, solver.net.params["ip"][0].data)
    solver.net.params["ip"][0].data[0, 0] = 123.0
    assert solver.test_nets[0].params["ip"][0].data[0, 0] == 123.0


def test_restore_continues_where_the_snapshot_left_off(files):
    run = start(caffe.SGDSolver(files["solver"]))
    run.step(5)
    run.snapshot()
    run.step(5)
    resumed = caffe.SGDSolver(files["solver"])
    start(resumed)
    for name, blobs in resumed.net.params.items():  # make sure restore really loads the weights
        for b in blobs:
            b.data[...] = 0
    resumed.restore("model_iter_5.solverstate")
    assert resumed.iter == G["iter_after_restore"] == 5
    assert resumed.lr == pytest.approx(G["lr_after_restore"], rel=1e-6)
    resumed.step(5)
    assert G["restore_matches_continuous"]
    for key, value in params_of(resumed.net).items():
        numpy.testing.assert_array_equal(value, params_of(run.net)[key])
        numpy.testing.assert_allclose(value, NUM["sgd10/" + key], rtol=1e-5, atol=1e-6)
    # solve(resume_file) restores first, then runs on to max_iter
    again = start(caffe.SGDSolver(files["solver"]))
    again.solve("model_iter_5.solverstate")
    assert again.iter == G["iter_after_solve"]


def test_param_view_and_base_lr_setter(files):
    solver = caffe.SGDSolver(files["solver"])
    assert solver.param.max_iter == G["param"]["max_iter"]
    assert solver.param.display == G["param"]["display"]
    assert solver.param.base_lr == pytest.approx(G["param"]["base_lr"])
    # pycaffe lets base_lr be set (max_iter and display are read-only there:
    # AttributeError; netlib's param is the SolverParameter message itself).
    solver.iter = 10
    solver.param.base_lr = 0.5
    assert solver.param.base_lr == G["base_lr_after_set"]
    assert solver.lr == pytest.approx(G["lr_after_base_lr_set"], rel=1e-6)


def test_apply_update(files):
    # pycaffe's test_apply_update: zero weights, unit diffs, one update at
    # iteration 0 gives -base_lr (momentum history and weight decay are 0).
    solver = caffe.SGDSolver(files["solver"])
    w = solver.net.layers[1].blobs[0]
    data = w.data
    data[...] = 0
    w.diff[...] = 1
    solver.apply_update()
    numpy.testing.assert_allclose(data, NUM["apply_update_w"], rtol=1e-7)
    assert ((data - -0.01 * numpy.ones(data.shape)) < 1e-7).all()
    assert solver.iter == G["apply_update_iter"] == 1


def test_nets_outlive_the_solver(files):
    solver = start(caffe.SGDSolver(files["solver"]))
    solver.step(2)
    nets = [solver.net] + list(solver.test_nets)
    assert len(nets) == 1 + G["num_test_nets"]
    expected = [params_of(n) for n in nets]
    del solver
    gc.collect()
    for net, params in zip(nets, expected):
        total = 0
        for name, blobs in net.params.items():
            for i, p in enumerate(blobs):
                numpy.testing.assert_array_equal(p.data, params["%s/%d" % (name, i)])
                total += p.data.sum() + p.diff.sum()
        for blob in net.blobs.values():
            total += blob.data.sum() + blob.diff.sum()
        assert numpy.isfinite(total)
        assert net.forward()["loss"] >= 0  # still runs


def test_snapshot_file_names(files, tmp_path):
    solver = caffe.SGDSolver(files["solver"])
    before = set(os.listdir(tmp_path))
    solver.snapshot()
    assert sorted(set(os.listdir(tmp_path)) - before) == ["model_iter_0.caffemodel", "model_iter_0.solverstate"]
    h5 = tmp_path / "solver_h5.prototxt"
    h5.write_text("net: '%s'\n%s snapshot_format: HDF5 snapshot_prefix: 'h5model'"
                  % (files["net"], API["solver_suite"].replace("snapshot_prefix: 'model'", "")))
    solver = caffe.SGDSolver(str(h5))
    before = set(os.listdir(tmp_path))
    solver.snapshot()
    assert sorted(set(os.listdir(tmp_path)) - before) == G["snapshot_files_hdf5"]


def test_share_weights_with_another_net(files):
    solver = start(caffe.SGDSolver(files["solver"]))
    other = caffe.Net(files["net"], caffe.TEST)
    solver.share_weights(other)
    solver.step(1)
    for name in solver.net.params:
        for a, b in zip(solver.net.params[name], other.params[name]):
            numpy.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("kind", list(API["solver_types"]))
def test_each_solver_type_matches_real_caffe(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    net = tmp_path / "numeric.prototxt"
    net.write_text(API["nets"]["numeric"])
    path = tmp_path / ("solver_%s.prototxt" % kind)
    path.write_text("net: '%s'\ntype: '%s' %s max_iter: 10 display: 0 snapshot_after_train: false"
                    % (net, kind, API["solver_types"][kind]))
    solver = caffe.get_solver(str(path))
    assert type(solver).__name__ == G["solver_classes"][kind]
    assert isinstance(solver, getattr(caffe, G["solver_classes"][kind]))
    direct = getattr(caffe, G["solver_classes"][kind])(str(path))  # the class itself takes the file too
    assert type(direct) is type(solver)
    start(solver)
    solver.step(3)
    assert solver.iter == 3
    for key, value in params_of(solver.net).items():
        numpy.testing.assert_allclose(value, NUM["type3/%s/%s" % (kind, key)], rtol=1e-5, atol=1e-6,
                                      err_msg="%s %s" % (kind, key))
