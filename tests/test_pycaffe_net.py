"""pycaffe's Net surface, as pycaffe's own suite (python/caffe/test/test_net.py)
exercises it, checked against real pycaffe's answers.

The goldens (tests/golden/pycaffe_api/, written by
tools/make_pycaffe_api_goldens.py with real BVLC pycaffe) hold the net texts,
what pycaffe reports about them (names, orders, loss weights, filtering by
level/stage), the exceptions it raises, and the numbers it computes.
"""
import builtins
import collections
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

NUM_OUTPUT = 11  # the suite net's num_output (see the generator)


def write_net(tmp_path, key, text=None):
    path = tmp_path / (key + ".prototxt")
    path.write_text(API["nets"][key] if text is None else text)
    return str(path)


@pytest.fixture
def suite_net(tmp_path):
    """The pycaffe suite's net in TRAIN, with valid labels filled in."""
    net = caffe.Net(write_net(tmp_path, "suite"), caffe.TRAIN)
    net.blobs["label"].data[...] = numpy.random.default_rng(0).integers(
        NUM_OUTPUT, size=net.blobs["label"].data.shape)
    return net


def load_w0(net):
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            b.data[...] = NUM["w0/%s/%d" % (name, i)]


@pytest.fixture
def numeric_net(tmp_path):
    """The Input-fed net with real Caffe's starting weights."""
    net = caffe.Net(write_net(tmp_path, "numeric"), caffe.TRAIN)
    load_w0(net)
    return net


def golden_exception(key):
    """The built-in class and message pycaffe raised for errors[key]."""
    name, message = API["errors"][key]
    return getattr(builtins, name), message


# -- memory -------------------------------------------------------------------------------
def test_blobs_and_params_outlive_the_net(suite_net):
    # pycaffe's test_memory: blobs/params taken from the net stay usable after
    # `del net` (pycaffe holds them by shared_ptr).
    params = sum(map(list, suite_net.params.values()), [])
    blobs = list(suite_net.blobs.values())
    blob_dict, layer_dict = suite_net.blobs, suite_net.layer_dict
    suite_net.forward()
    suite_net.backward()
    expected = [(b.data.copy(), b.diff.copy()) for b in params + blobs]
    del suite_net
    gc.collect()
    for blob, (data, diff) in zip(params + blobs, expected):
        numpy.testing.assert_array_equal(blob.data, data)
        numpy.testing.assert_array_equal(blob.diff, diff)
        assert numpy.isfinite(blob.data.sum() + blob.diff.sum())
    assert list(blob_dict) == API["suite"]["blob_names"]
    assert blob_dict["data"].data.shape == (5, 2, 3, 4)
    assert layer_dict["ip"].blobs[0].data.shape == (NUM_OUTPUT, 792)


# -- names, orders and other structure ----------------------------------------------------
def test_layer_dict(suite_net):
    layer_dict = suite_net.layer_dict
    assert isinstance(layer_dict, collections.OrderedDict)
    assert list(layer_dict) == list(suite_net._layer_names) == API["suite"]["layer_dict_keys"]
    for i, name in enumerate(suite_net._layer_names):
        assert layer_dict[name] is suite_net.layers[i]
        assert layer_dict[name].type == API["suite"]["layer_types"][i]


def test_names_orders_and_shapes_match_pycaffe(suite_net):
    g = API["suite"]
    assert list(suite_net._layer_names) == g["layer_names"]
    assert list(suite_net._blob_names) == g["blob_names"]
    assert suite_net.inputs == g["inputs"] == []
    assert suite_net.outputs == g["outputs"] == ["loss"]
    assert suite_net.top_names == collections.OrderedDict((k, v) for k, v in g["top_names"])
    assert suite_net.bottom_names == collections.OrderedDict((k, v) for k, v in g["bottom_names"])
    assert list(suite_net.blob_loss_weights.items()) == [tuple(kv) for kv in g["blob_loss_weights"]]
    assert [[k, list(b.shape)] for k, b in suite_net.blobs.items()] == g["blob_shapes"]
    assert [[k, [list(b.shape) for b in v]] for k, v in suite_net.params.items()] == g["param_shapes"]


def _private(net):
    return {"_inputs": list(net._inputs), "_outputs": list(net._outputs),
            "_blob_loss_weights": list(net._blob_loss_weights),
            "_top_ids": [list(net._top_ids(i)) for i in range(len(net.layers))],
            "_bottom_ids": [list(net._bottom_ids(i)) for i in range(len(net.layers))],
            "_blobs_shapes": [list(b.shape) for b in net._blobs]}


def test_underscore_accessors_match_pycaffe(suite_net, tmp_path):
    # the C++ getters pycaffe.py builds blobs/inputs/outputs/top_names on
    assert _private(suite_net) == API["suite"]["private"]
    assert list(suite_net.blobs.values()) == suite_net._blobs
    deploy = caffe.Net(write_net(tmp_path, "all_in_one"), caffe.TEST, stages=["deploy"])
    assert _private(deploy) == API["all_in_one"]["deploy"]["private"]
    batches = list(deploy._batch({"data": numpy.ones((3, 1, 10, 10), numpy.float32)}))
    assert [b["data"].shape[0] for b in batches] == [1, 1, 1]


@pytest.mark.parametrize("level", ["0", "1"])
def test_level_filters_layers(tmp_path, level):
    net = caffe.Net(write_net(tmp_path, "levels"), caffe.TEST, level=int(level))
    assert [b for b in net.blobs if "data" not in b] == API["levels"][level]


@pytest.mark.parametrize("stages", ["A", "B", "A+B"])
def test_stages_filter_layers(tmp_path, stages):
    net = caffe.Net(write_net(tmp_path, "stages"), caffe.TEST, stages=stages.split("+"))
    assert [b for b in net.blobs if "data" not in b] == API["stages"][stages]


@pytest.mark.parametrize("phase, stage", [("TRAIN", "train"), ("TEST", "val"), ("TEST", "deploy")])
def test_all_in_one_net(tmp_path, phase, stage):
    g = API["all_in_one"][stage]
    net = caffe.Net(write_net(tmp_path, "all_in_one"), getattr(caffe, phase), stages=[stage])
    assert list(net.blobs["data"].shape) == g["data_shape"]
    assert net.outputs == g["outputs"] and net.inputs == g["inputs"]
    assert list(net._layer_names) == g["layer_names"]


# -- forward / backward ---------------------------------------------------------------------
def test_forward_backward_return_dicts(suite_net):
    out = suite_net.forward()
    assert list(out) == ["loss"] and out["loss"] is not None
    # backward returns the input diffs; this net has no inputs.
    assert suite_net.backward() == {}


def test_forward_start_end(suite_net):
    conv, ip = suite_net.blobs["conv"], suite_net.blobs["ip"]
    sample = numpy.random.default_rng(1).uniform(size=conv.data.shape).astype(numpy.float32)
    ip.data[...] = 0
    conv.data[...] = sample
    out = suite_net.forward(start="ip", end="ip")
    assert sorted(out) == API["forward_start_end_keys"]
    w, b = suite_net.params["ip"][0].data, suite_net.params["ip"][1].data
    manual = numpy.array([numpy.dot(w, sample[i].reshape(-1)) + b for i in range(sample.shape[0])])
    numpy.testing.assert_allclose(ip.data, manual, rtol=1e-4, atol=1e-3)


def test_backward_start_end(suite_net):
    conv, ip = suite_net.blobs["conv"], suite_net.blobs["ip"]
    sample = numpy.random.default_rng(2).uniform(size=ip.data.shape).astype(numpy.float32)
    ip.diff[...] = sample
    conv.diff[...] = 0
    out = suite_net.backward(start="ip", end="ip")
    assert sorted(out) == API["backward_start_end_keys"]
    w = suite_net.params["ip"][0].data
    manual = numpy.array([numpy.dot(sample[i], w).reshape(conv.diff[i].shape) for i in range(sample.shape[0])])
    numpy.testing.assert_allclose(conv.diff, manual, rtol=1e-4, atol=1e-4)


def test_forward_backward_numbers_match_real_caffe(numeric_net):
    out = numeric_net.forward(data=NUM["x"], label=NUM["y"])
    numpy.testing.assert_allclose(out["loss"], NUM["fwd/loss"], rtol=1e-5)
    numpy.testing.assert_allclose(numeric_net.blobs["ip"].data, NUM["fwd/ip"], rtol=1e-5, atol=1e-6)
    back = numeric_net.backward()
    assert sorted(back) == API["numeric_backward_keys"]
    numpy.testing.assert_allclose(back["data"], NUM["bwd/data"], rtol=1e-4, atol=1e-7)
    for name, blobs in numeric_net.params.items():
        for i, b in enumerate(blobs):
            numpy.testing.assert_allclose(b.diff, NUM["grad/%s/%d" % (name, i)], rtol=1e-4, atol=1e-7)
    # extra blobs / diffs join the returned dicts, as in pycaffe
    assert sorted(numeric_net.forward(blobs=["conv"], data=NUM["x"], label=NUM["y"])) == API["forward_blobs_keys"]
    assert sorted(numeric_net.backward(diffs=["conv"])) == API["backward_diffs_keys"]


def test_clear_param_diffs(suite_net):
    suite_net.forward()
    suite_net.backward()
    diff = suite_net.params["conv"][0].diff  # a view: clearing must zero it in place
    assert abs(diff).max() > 0
    suite_net.clear_param_diffs()
    assert (diff == 0).all()
    assert API["clear_param_diffs_zero"]
    assert all(not b.diff.any() for v in suite_net.params.values() for b in v)


@pytest.mark.parametrize("key, call", [
    ("forward_wrong_kwargs", lambda n: n.forward(data=NUM["x"])),
    ("forward_extra_kwargs", lambda n: n.forward(data=NUM["x"], label=NUM["y"], other=NUM["y"])),
    ("forward_batch_size", lambda n: n.forward(data=NUM["x"][:4], label=NUM["y"][:4])),
    ("backward_wrong_kwargs", lambda n: n.backward(ip=numpy.ones((5, 3), numpy.float32))),
    ("forward_unknown_start", lambda n: n.forward(start="nope")),
])
def test_argument_checks_raise_what_pycaffe_raises(numeric_net, key, call):
    # pycaffe: kwargs must be exactly the inputs (outputs for backward), each
    # batch-sized; an unknown layer name is list.index's ValueError.
    cls, _ = golden_exception(key)
    with pytest.raises(cls):
        call(numeric_net)


# -- saving and loading ---------------------------------------------------------------------
def _assert_same_params(a, b):
    for name in a.params:
        for pa, pb in zip(a.params[name], b.params[name]):
            assert abs(pa.data - pb.data).sum() == 0


def test_save_and_read_binaryproto(tmp_path, suite_net):
    path = str(tmp_path / "w.caffemodel")
    suite_net.save(path)
    net_file = write_net(tmp_path, "suite")
    legacy = caffe.Net(net_file, path, caffe.TRAIN)  # the deprecated (file, weights, phase) form
    named = caffe.Net(net_file, caffe.TRAIN, weights=path)
    copied = caffe.Net(net_file, caffe.TRAIN)
    copied.copy_from(path)
    for other in (legacy, named, copied):
        _assert_same_params(suite_net, other)
    assert API["legacy_ctor_loads"]


def test_save_and_read_hdf5(tmp_path, suite_net):
    path = str(tmp_path / "w.h5")
    suite_net.save_hdf5(path)
    other = caffe.Net(write_net(tmp_path, "suite"), caffe.TRAIN)
    other.load_hdf5(path)
    _assert_same_params(suite_net, other)


def test_share_with_shares_data_not_diffs(tmp_path, numeric_net):
    # pycaffe's share_with is Net::ShareTrainedLayersWith (Blob::ShareData).
    other = caffe.Net(write_net(tmp_path, "numeric"), caffe.TEST)
    other.share_with(numeric_net)
    numeric_net.params["ip"][0].data[0, 0] = 42.0
    numeric_net.params["ip"][0].diff[0, 0] = 7.0
    g = API["share_with"]
    assert (other.params["ip"][0].data[0, 0] == 42.0) == g["data_shared"] is True
    assert (other.params["ip"][0].diff[0, 0] == 7.0) == g["diff_shared"] is False


@pytest.mark.parametrize("key", ["missing_net_file", "missing_weights_file"])
def test_missing_file_raises_runtime_error(tmp_path, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    cls, message = golden_exception(key)  # RuntimeError('Could not open file <name>')
    assert cls is RuntimeError
    missing = message.rsplit(" ", 1)[1]
    net_file = write_net(tmp_path, "numeric")
    calls = {"missing_net_file": [lambda: caffe.Net(missing, caffe.TEST)],
             "missing_weights_file": [lambda: caffe.Net(net_file, caffe.TEST, weights=missing),
                                      lambda: caffe.Net(net_file, missing, caffe.TEST)]}[key]
    for call in calls:
        with pytest.raises(RuntimeError, match=missing) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)  # netlib's own class too


# -- set_input_arrays on a MemoryData net -----------------------------------------------------
GOOD = numpy.arange(24, dtype=numpy.float32).reshape(4, 2, 3, 1)
LABELS = numpy.arange(4, dtype=numpy.float32)

BAD_INPUTS = {
    "set_input_float64_data": lambda: (GOOD.astype(numpy.float64), LABELS),
    "set_input_float64_labels": lambda: (GOOD, LABELS.astype(numpy.float64)),
    "set_input_not_contiguous": lambda: (GOOD[:, :, ::-1, :], LABELS),
    "set_input_3d": lambda: (GOOD.reshape(4, 2, 3), LABELS),
    "set_input_wrong_channels": lambda: (numpy.zeros((4, 3, 3, 1), numpy.float32), LABELS),
    "set_input_wrong_height": lambda: (numpy.zeros((4, 2, 2, 1), numpy.float32), LABELS),
    "set_input_wrong_width": lambda: (numpy.zeros((4, 2, 3, 2), numpy.float32), LABELS),
    "set_input_label_count": lambda: (GOOD, LABELS[:2]),
    "set_input_not_batch_multiple": lambda: (GOOD[:3], LABELS[:3]),
    "set_input_labels_2d": lambda: (GOOD, LABELS.reshape(4, 1)),
}


@pytest.mark.parametrize("key", sorted(BAD_INPUTS))
def test_set_input_arrays_checks(tmp_path, key):
    net = caffe.Net(write_net(tmp_path, "memory"), caffe.TEST)
    cls, message = golden_exception(key)
    with pytest.raises(cls) as info:
        net.set_input_arrays(*BAD_INPUTS[key]())
    assert str(info.value) == message
    assert isinstance(info.value, caffe.NetlibError)


def test_set_input_arrays_needs_memory_data_first(numeric_net):
    cls, message = golden_exception("set_input_first_layer_not_memory")
    with pytest.raises(cls, match=message):
        numeric_net.set_input_arrays(GOOD, LABELS)


def test_set_input_arrays_serves_batches_from_the_callers_array(tmp_path):
    net = caffe.Net(write_net(tmp_path, "memory"), caffe.TEST)
    assert list(net.blobs["label"].shape) == API["memory_label_shape_setup"]
    data = GOOD.copy()
    net.set_input_arrays(data, LABELS)
    for want_data, want_label in API["memory_served"]:  # batches of 2, wrapping around
        net.forward()
        numpy.testing.assert_array_equal(net.blobs["data"].data, want_data)
        # pycaffe's label top is (N,) after setup and (N, 1, 1, 1) after a forward
        assert list(net.blobs["label"].shape) == API["memory_label_shape_forward"]
        numpy.testing.assert_array_equal(net.blobs["label"].data, want_label)
    data += 100  # pycaffe keeps a pointer to the caller's array, not a copy
    net.forward()
    assert (net.blobs["data"].data[0, 0, 0, 0] >= 100) == API["memory_reads_caller_array"] is True
    # the (N, 1, 1, 1) label form is accepted too
    net.set_input_arrays(data, numpy.ascontiguousarray(LABELS.reshape(4, 1, 1, 1)))
    net.forward()
    numpy.testing.assert_array_equal(net.blobs["label"].data.ravel(), [0, 1])
