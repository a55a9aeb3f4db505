"""Python layers (type "Python"): a user's module outside the package,
pycaffe's hooks and attributes, learnable blobs, errors, and the trust switch."""
import os
import sys
import textwrap

import numpy
import pytest

import netlib
from netlib.testing import check_gradient
from netlib.tools import cli

MODULE = '''
import numpy
import netlib


class ScaledSquare(netlib.Layer):
    """y = a * x * x with a learnable scalar a; param_str gives the initial a."""

    def setup(self, bottom, top):
        self.seen = {"param_str": self.param_str, "phase": self.phase}
        if len(self.blobs) == 0:
            self.blobs.add_blob(1)
            self.blobs[0].data[...] = float(self.param_str or 1.0)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data ** 2

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += (top[0].diff * bottom[0].data ** 2).sum()
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * self.blobs[0].data[0] * bottom[0].data * top[0].diff


class EuclideanLoss(netlib.Layer):
    """Caffe's examples/pycaffe/layers/pyloss.py, as users write it."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].data.size != bottom[1].data.size:
            raise Exception("Inputs must have the same dimension.")
        self.diff = numpy.zeros_like(bottom[0].data, dtype=numpy.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = numpy.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num


class Broken(netlib.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        raise ZeroDivisionError("user bug in forward")


class NotALayer(object):
    pass
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "user"
    folder.mkdir()
    name = "netlib_user_layers_%d" % (abs(hash(str(tmp_path))) % 10 ** 8)
    (folder / (name + ".py")).write_text(MODULE)
    monkeypatch.chdir(folder)  # imported from the current directory, as Caffe does
    yield name
    sys.modules.pop(name, None)


def python_layer(module, cls, bottom="x", top="y", param_str="", extra=""):
    return ('layer { name: "py" type: "Python" bottom: "%s" top: "%s" python_param { module: "%s" layer: "%s" '
            'param_str: "%s" } %s }' % (bottom, top, module, cls, param_str, extra))


def input_net(body, shape=(2, 3)):
    dims = " ".join("dim: %d" % d for d in shape)
    return ('name: "p" force_backward: true layer { name: "x" type: "Input" top: "x" input_param { shape { %s } } } %s'
            % (dims, body))


def test_forward_backward_attributes_and_blobs(user_module):
    net = netlib.Net(input_net(python_layer(user_module, "ScaledSquare", param_str="2.5")), netlib.TEST)
    layer = net.layer_dict["py"]
    assert layer.type == "Python" and layer.seen == {"param_str": "2.5", "phase": netlib.TEST}
    x = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
    out = net.forward(x=x)["y"]
    numpy.testing.assert_allclose(out, 2.5 * x ** 2)
    assert list(net.params) == ["py"] and net.params["py"][0].shape == (1,)
    net.blobs["y"].diff[...] = 1
    net.backward()
    assert net.layers[1].blobs[0].diff[0] == pytest.approx((x ** 2).sum())
    net.blobs["x"].reshape(4, 5)  # reshape runs before every forward
    assert net.forward(x=numpy.ones((4, 5), numpy.float32))["y"].shape == (4, 5)


def test_gradient_check_of_a_user_file_layer(user_module):
    spec = 'type: "Python" python_param { module: "%s" layer: "ScaledSquare" param_str: "1.5" }' % user_module
    check_gradient(spec, bottom_shapes=[(2, 3, 4)])


def test_parameters_train_save_and_load(user_module, tmp_path):
    body = (python_layer(user_module, "ScaledSquare", param_str="0.5", extra='param { lr_mult: 1 }') +
            ' layer { name: "t" type: "DummyData" top: "t" dummy_data_param { shape { dim: 2 dim: 3 } '
            'data_filler { type: "constant" value: 2 } } }'
            ' layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }')
    text = ('name: "p" layer { name: "x" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 dim: 3 } '
            'data_filler { type: "constant" value: 1 } } } ' + body)
    (tmp_path / "net.prototxt").write_text(text)
    (tmp_path / "solver.prototxt").write_text('net: "%s" base_lr: 0.1 lr_policy: "fixed" max_iter: 50 display: 0 '
                                              'snapshot_after_train: false solver_mode: CPU' % (tmp_path / "net.prototxt"))
    solver = netlib.get_solver(str(tmp_path / "solver.prototxt"))
    solver.step(50)
    a = float(solver.net.params["py"][0].data[0])
    assert a == pytest.approx(2.0, abs=1e-3)  # y = a * 1 * 1 learns the target 2
    solver.net.save(str(tmp_path / "w.caffemodel"))
    fresh = netlib.Net(str(tmp_path / "net.prototxt"), netlib.TEST, weights=str(tmp_path / "w.caffemodel"))
    assert float(fresh.params["py"][0].data[0]) == pytest.approx(a)


def test_pyloss_trains_linear_regression_through_netlib_train(user_module, tmp_path, capsys):
    rng = numpy.random.default_rng(0)
    import h5py
    x = rng.normal(size=(64, 3)).astype(numpy.float32)
    y = (x @ numpy.array([[1.0], [-2.0], [0.5]], numpy.float32) + 0.25).astype(numpy.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data"], f["label"] = x, y
    (tmp_path / "list.txt").write_text(str(tmp_path / "d.h5") + "\n")
    net = ('name: "linreg" layer { name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { '
           'source: "%s" batch_size: 16 } } layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
           'inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } } '
           'layer { name: "loss" type: "Python" bottom: "ip" bottom: "label" top: "loss" python_param { '
           'module: "%s" layer: "EuclideanLoss" } loss_weight: 1 }' % (tmp_path / "list.txt", user_module))
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        'net: "%s" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: 200 display: 100 '
        'snapshot_prefix: "%s" solver_mode: CPU random_seed: 1' % (tmp_path / "net.prototxt", tmp_path / "lr"))
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt")]) == 0
    err = capsys.readouterr().err
    losses = [float(line.rsplit("=", 1)[1]) for line in err.splitlines() if "Iteration 200, loss =" in line]
    assert losses and losses[-1] < 1e-3, err[-2000:]
    trained = netlib.Net(str(tmp_path / "net.prototxt"), netlib.TEST, weights=str(tmp_path / "lr_iter_200.caffemodel"))
    numpy.testing.assert_allclose(trained.params["ip"][0].data.ravel(), [1.0, -2.0, 0.5], atol=0.02)


def test_user_exceptions_name_layer_module_class_and_keep_the_traceback(user_module):
    net = netlib.Net(input_net(python_layer(user_module, "Broken")), netlib.TEST)
    with pytest.raises(netlib.LayerError, match=r"'py' \(type Python, class %s\.Broken\).*ZeroDivisionError"
                       % user_module) as info:
        net.forward(x=numpy.ones((2, 3), numpy.float32))
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(netlib.LayerError, match="Need two inputs") as info:
        netlib.Net(input_net(python_layer(user_module, "EuclideanLoss")), netlib.TEST)
    assert info.value.__cause__ is not None
    with pytest.raises(netlib.ConfigError, match="must be a class that subclasses netlib.Layer"):
        netlib.Net(input_net(python_layer(user_module, "NotALayer")), netlib.TEST)
    with pytest.raises(netlib.ConfigError, match="has no attribute 'Missing'"):
        netlib.Net(input_net(python_layer(user_module, "Missing")), netlib.TEST)
    with pytest.raises(netlib.ConfigError, match="cannot import module 'no_such_module_xyz'"):
        netlib.Net(input_net(python_layer("no_such_module_xyz", "X")), netlib.TEST)


def test_trust_switch_refuses_before_importing(tmp_path, monkeypatch):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "was_imported.txt"
    (folder / "netlib_evil_layer.py").write_text(textwrap.dedent('''
        open(%r, "w").write("the module ran")
        import netlib
        class L(netlib.Layer):
            pass
        ''' % str(marker)))
    monkeypatch.chdir(folder)
    text = input_net(python_layer("netlib_evil_layer", "L"))
    with pytest.raises(netlib.ConfigError, match="Python layers are not allowed"):
        netlib.Net(text, netlib.TEST, allow_python_layers=False)
    assert not marker.exists()
    netlib.set_python_layers_allowed(False)
    try:
        with pytest.raises(netlib.ConfigError, match="not imported"):
            netlib.Net(text, netlib.TEST)
    finally:
        netlib.set_python_layers_allowed(True)
    assert not marker.exists()
    (folder / "net.prototxt").write_text(text)
    (folder / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 max_iter: 1 lr_policy: "fixed" '
                                            'solver_mode: CPU')
    code = cli.main(["train", "--solver", "solver.prototxt", "--forbid_python_layers"])
    assert code == 1 and not marker.exists()
    assert netlib.python_layer.python_layers_allowed()  # the flag lasts one command
    sys.modules.pop("netlib_evil_layer", None)
    assert os.path.isdir(folder)


# -- pycaffe's own Python-layer suite (test_python_layer.py, ..._with_param_str.py,
#    test_layer_type_list.py), written anew against netlib ---------------------------------
PYCAFFE_MODULE = '''
import netlib as caffe


class TimesTen(caffe.Layer):
    """y = 10 x."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff


class RefusesSetup(caffe.Layer):
    def setup(self, bottom, top):
        raise RuntimeError("setup refused")


class RefusesForward(TimesTen):
    def forward(self, bottom, top):
        raise ZeroDivisionError("forward refused")


class OneParameter(caffe.Layer):
    """Owns one learnable scalar; backward sets its diff to 1."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = 1


class ShowsPhase(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class TimesParam(caffe.Layer):
    """y = v x with v = float(param_str)."""

    def setup(self, bottom, top):
        try:
            self.value = float(self.param_str)
        except ValueError:
            raise ValueError("param_str must be a number, got %r" % self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.value * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.value * top[0].diff
'''

INPUT_10_9_8 = "name: 'pythonnet' force_backward: true input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }\n"


def _py(name, bottom, top, cls, module, param_str=None):
    extra = " param_str: '%s'" % param_str if param_str is not None else ""
    bottoms = " bottom: '%s'" % bottom if bottom else ""
    return ("layer { type: 'Python' name: '%s'%s top: '%s' python_param { module: '%s' layer: '%s'%s } }\n"
            % (name, bottoms, top, module, cls, extra))


@pytest.fixture
def pycaffe_layers(tmp_path, monkeypatch):
    """A user module of pycaffe-suite-like layers, importable from the CWD."""
    folder = tmp_path / "pyc"
    folder.mkdir()
    name = "netlib_pycaffe_layers_%d" % (abs(hash(str(tmp_path))) % 10 ** 8)
    (folder / (name + ".py")).write_text(PYCAFFE_MODULE)
    monkeypatch.chdir(folder)

    def net_file(text, file_name="net.prototxt"):
        (folder / file_name).write_text(text.replace("MODULE", name))
        return str(folder / file_name)

    yield net_file
    sys.modules.pop(name, None)


@pytest.fixture
def three_times_ten(pycaffe_layers):
    text = INPUT_10_9_8 + "".join(_py(n, b, n, "TimesTen", "MODULE")
                                  for b, n in (("data", "one"), ("one", "two"), ("two", "three")))
    return netlib.Net(pycaffe_layers(text), netlib.TRAIN)


def test_pycaffe_suite_forward(three_times_ten):
    three_times_ten.blobs["data"].data[...] = 8
    three_times_ten.forward()
    assert (three_times_ten.blobs["three"].data == 10 ** 3 * 8).all()


def test_pycaffe_suite_backward(three_times_ten):
    three_times_ten.blobs["three"].diff[...] = 7
    three_times_ten.backward()
    assert (three_times_ten.blobs["data"].diff == 10 ** 3 * 7).all()


def test_pycaffe_suite_reshape_propagates(three_times_ten):
    three_times_ten.blobs["data"].reshape(4, 4, 4, 4)
    three_times_ten.forward()
    for blob in three_times_ten.blobs.values():
        assert blob.data.shape == (4, 4, 4, 4)


def _golden(key):
    import json
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "pycaffe_api", "api.json")
    with open(path) as f:
        return json.load(f)[key]


def test_exceptions_keep_the_users_class(pycaffe_layers):
    # Real pycaffe lets a Python layer's exception through as its own class
    # (golden: RuntimeError from setup, ZeroDivisionError from forward); netlib
    # raises a LayerError naming the layer that is also that class.
    errors = _golden("errors")
    assert errors["python_setup_raises"][0] == "RuntimeError"
    assert errors["python_forward_raises"][0] == "ZeroDivisionError"
    path = pycaffe_layers(INPUT_10_9_8 + _py("layer", "data", "top", "RefusesSetup", "MODULE"))
    with pytest.raises(RuntimeError, match="setup refused") as info:
        netlib.Net(path, netlib.TEST)
    assert isinstance(info.value, netlib.LayerError) and "'layer'" in str(info.value)
    net = netlib.Net(pycaffe_layers(INPUT_10_9_8 + _py("layer", "data", "top", "RefusesForward", "MODULE")),
                     netlib.TEST)
    with pytest.raises(ZeroDivisionError, match="forward refused") as info:
        net.forward()
    assert isinstance(info.value, netlib.LayerError) and isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(ValueError, match="must be a number"):
        netlib.Net(pycaffe_layers(INPUT_10_9_8 + _py("m", "data", "m", "TimesParam", "MODULE", "ten")),
                   netlib.TEST)


def test_pycaffe_suite_parameter_layer(pycaffe_layers, tmp_path):
    path = pycaffe_layers(INPUT_10_9_8 + _py("layer", "data", "top", "OneParameter", "MODULE"))
    net = netlib.Net(path, netlib.TRAIN)
    net.forward()
    net.backward()
    layer = net.layers[list(net._layer_names).index("layer")]
    assert layer.blobs[0].data[0] == 0 and layer.blobs[0].diff[0] == 1
    layer.blobs[0].data[0] += layer.blobs[0].diff[0]
    assert layer.blobs[0].data[0] == 1
    # saving and loading
    weights = str(tmp_path / "py.caffemodel")
    net.save(weights)
    layer.blobs[0].data[0] = -1
    net.copy_from(weights)
    assert layer.blobs[0].data[0] == 1
    # weight sharing
    net2 = netlib.Net(path, netlib.TRAIN)
    net2.share_with(net)
    layer2 = net2.layers[list(net2._layer_names).index("layer")]
    assert layer2.blobs[0].data[0] == 1
    layer.blobs[0].data[0] = 5
    assert layer2.blobs[0].data[0] == 5


def test_pycaffe_suite_phase(pycaffe_layers):
    path = pycaffe_layers("name: 'pythonnet' force_backward: true\n" + _py("layer", None, "phase", "ShowsPhase",
                                                                            "MODULE"))
    for phase in (netlib.TRAIN, netlib.TEST):
        net = netlib.Net(path, phase)
        assert net.forward()["phase"] == phase
        assert net.layers[0].phase == phase


def test_pycaffe_suite_param_str(pycaffe_layers):
    text = (INPUT_10_9_8 + _py("mul10", "data", "mul10", "TimesParam", "MODULE", "10") +
            _py("mul2", "mul10", "mul2", "TimesParam", "MODULE", "2"))
    net = netlib.Net(pycaffe_layers(text), netlib.TRAIN)
    assert [net.layer_dict[n].param_str for n in ("mul10", "mul2")] == ["10", "2"]
    net.blobs["data"].data[...] = 8
    net.forward()
    assert (net.blobs["mul2"].data == 2 * 10 * 8).all()
    net.blobs["mul2"].diff[...] = 7
    net.backward()
    assert (net.blobs["data"].diff == 2 * 10 * 7).all()


def test_layer_type_list_has_the_standard_types():
    types = netlib.layer_type_list()
    for name in ("Data", "Convolution", "InnerProduct"):  # pycaffe's test_layer_type_list
        assert name in types, name
    # Every other type real pycaffe lists (its build here has no OpenCV layers).
    assert set(_golden("layer_type_list")) <= set(types)
    assert types == sorted(types)


def test_layer_type_list_has_python():
    assert "Python" in _golden("layer_type_list")
    assert "Python" in netlib.layer_type_list()


def test_no_file_netlib_reads_runs_code_with_python_layers_off(tmp_path, monkeypatch):
    # every reader, fed files that name an importable module whose import leaves a
    # marker: with the switch off the module is never imported, whatever the file
    from netlib.checkpoint import read_solver_state
    from netlib.proto import caffe_pb2
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "was_imported.txt"
    (folder / "netlib_evil_reader.py").write_text('open(%r, "w").write("ran")\nimport netlib\n'
                                                   'class L(netlib.Layer):\n    pass\n' % str(marker))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    text = input_net(python_layer("netlib_evil_reader", "L"))
    (folder / "net.prototxt").write_text(text)
    (folder / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 max_iter: 1 lr_policy: "fixed"')
    # a caffemodel and a solver state whose layer definitions name the module
    param = caffe_pb2.NetParameter()
    from google.protobuf import text_format
    text_format.Parse(text, param)
    param.layer[-1].blobs.add().data.append(1.0)
    (folder / "evil.caffemodel").write_bytes(param.SerializeToString())
    state = caffe_pb2.SolverState(iter=1, learned_net="evil.caffemodel")
    (folder / "evil.solverstate").write_bytes(state.SerializeToString())
    plain = netlib.Net(input_net(""), netlib.TEST)
    old = netlib.python_layer.python_layers_allowed()
    netlib.set_python_layers_allowed(False)
    try:
        with pytest.raises(netlib.ConfigError):
            netlib.Net("net.prototxt", netlib.TEST)
        with pytest.raises(netlib.ConfigError):
            netlib.get_solver("solver.prototxt")
        netlib.files.read_net_param("net.prototxt")          # parsing alone never imports
        plain.copy_from("evil.caffemodel")                   # weights: blobs by layer name only
        read_solver_state("evil.solverstate")
        for args in (["train", "--solver", "solver.prototxt"],
                     ["test", "--model", "net.prototxt", "--weights", "evil.caffemodel"],
                     ["time", "--model", "net.prototxt"]):
            assert cli.main(args) == 1
    finally:
        netlib.set_python_layers_allowed(old)
    assert not marker.exists() and "netlib_evil_reader" not in sys.modules
