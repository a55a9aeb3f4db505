"""netlib's NetSpec (pycaffe's caffe.net_spec) against goldens made by real pycaffe.

The NetSpec scripts live in tests/golden/netspec/netspec_cases.py; real pycaffe ran
the same scripts (tools/make_netspec_goldens.py) and stored str() of each
NetParameter.  Here netlib runs them and must build the same message and print
the same bytes (up to the order of fields within a message, which depends on
the protobuf release: see field_number_order).  The rest
checks the API's contract with hand-derived expectations, that generated nets
build and run in netlib.Net, and the 01-learning-lenet notebook workflow.
"""
import importlib.util
import json
import os
import re
import time

import numpy as np
import pytest
from google.protobuf import text_format

import netlib as caffe
from netlib.proto import caffe_pb2

from netlib import layers as L, params as P
from netlib import net_spec

from conftest import shared_path

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "netspec")


def _load_cases():
    spec = importlib.util.spec_from_file_location("netspec_cases",
                                                  os.path.join(GOLDEN, "netspec_cases.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = _load_cases()


def _golden(name):
    with open(os.path.join(GOLDEN, name)) as f:
        return f.read()


def _json(name):
    return json.loads(_golden(name))


def field_number_order(text, descriptor=caffe_pb2.NetParameter.DESCRIPTOR):
    """``text`` with each message's fields in field-number order, lines moved, never re-printed.

    The goldens come from pycaffe's protobuf 4.21 (upb), whose printer lists
    fields in .proto declaration order; netlib's protobuf (like C++ Caffe's
    TextFormat) lists them by field number.  Occurrences of one repeated field
    stay together and in order (the sort is stable).
    """
    lines = text.splitlines(keepends=True)
    out, pos = _ordered_block(lines, 0, descriptor)
    assert pos == len(lines), "unbalanced braces"
    return "".join(out)


def _ordered_block(lines, pos, descriptor):
    entries = []
    while pos < len(lines):
        stripped = lines[pos].strip()
        if stripped == "}":
            break
        opening = re.match(r"(\w+) \{$", stripped)
        if opening:
            field = descriptor.fields_by_name[opening.group(1)]
            body, end = _ordered_block(lines, pos + 1, field.message_type)
            entries.append((field.number, [lines[pos]] + body + [lines[end]]))
            pos = end + 1
        else:
            field = descriptor.fields_by_name[stripped.split(":", 1)[0]]
            entries.append((field.number, [lines[pos]]))
            pos += 1
    entries.sort(key=lambda entry: entry[0])
    return [line for _, block in entries for line in block], pos


def test_field_number_order_moves_whole_fields():
    text = ('layer {\n  top: "a"\n  name: "x"\n  pooling_param {\n    pad: 1\n'
            '    pool: AVE\n  }\n  type: "Pooling"\n  top: "b"\n}\n')
    assert field_number_order(text) == (
        'layer {\n  name: "x"\n  type: "Pooling"\n  top: "a"\n  top: "b"\n'
        '  pooling_param {\n    pool: AVE\n    pad: 1\n  }\n}\n')


# ------------------------------------------------------------------ goldens from real pycaffe
@pytest.mark.parametrize("name", CASES.CASES)
def test_prototxt_matches_real_pycaffe(name):
    net = getattr(CASES, "case_" + name)(caffe, L, P)
    assert isinstance(net, caffe_pb2.NetParameter)
    golden = _golden(name + ".prototxt")
    # the same message ...
    assert net == text_format.Parse(golden, caffe_pb2.NetParameter())
    # ... and the same bytes, once the golden's fields are in field-number order
    assert str(net) == field_number_order(golden)


NETLIB_ACCEPTS = {"deconvolution_plain_keywords"}   # netlib's addition: see test_shared_param_messages


@pytest.mark.parametrize("name", sorted(set(CASES.ERRORS) - NETLIB_ACCEPTS))
def test_misuse_raises_like_real_pycaffe(name):
    expected = _json("errors.json")[name]
    with pytest.raises(Exception) as info:
        getattr(CASES, "error_" + name)(caffe, L, P)
    # netlib's missing-name error is a KeyError subclass (also an AttributeError)
    assert expected in [c.__name__ for c in type(info.value).__mro__]


def test_param_name_dict_and_constants_match_real_pycaffe():
    golden = _json("constants.json")
    # plus the fork messages of netlib's schema (the SSD fork's), which BVLC's lacks
    fork = {"AnnotatedData": "annotated_data", "MultiBoxLoss": "multibox_loss", "Permute": "permute",
            "PriorBox": "prior_box", "DetectionOutput": "detection_output",
            "DetectionEvaluate": "detection_evaluate", "Normalize": "norm"}
    assert net_spec.param_name_dict() == dict(golden["param_name_dict"], **fork)
    for key, value in golden["params"].items():
        type_name, const = key.split(".")
        assert getattr(getattr(P, type_name), const) == value, key


# ------------------------------------------------------------------ the API contract, by hand
def test_layer_functions_return_tops_tuples_or_function():
    x = L.Input(shape=dict(dim=[1, 2]))
    assert isinstance(x, net_spec.Top) and x.n == 0 and x.fn.type_name == "Input"
    a, b, c = L.Slice(x, ntop=3)
    assert [t.n for t in (a, b, c)] == [0, 1, 2] and a.fn is b.fn is c.fn
    assert a.fn.tops == (a, b, c)
    silence = L.Silence(a, ntop=0)
    assert isinstance(silence, net_spec.Function) and silence.tops == ()
    relu = L.ReLU(x, in_place=True, negative_slope=0.5)
    # ntop / in_place are taken out of params; the rest is kept as given (coord_map reads it)
    assert relu.fn.params == {"negative_slope": 0.5}
    assert relu.fn.in_place is True and relu.fn.ntop == 1
    assert relu.fn.inputs == (x,)
    # any attribute is a layer type, unchecked
    assert L.SomethingNew(x).fn.type_name == "SomethingNew"


def test_non_top_input_message():
    with pytest.raises(TypeError, match=r"Convolution input 1 is not a Top \(type is <class 'str'>\)"):
        L.Convolution(L.Input(), "data")


def test_params_constants_are_caffe_pb2_values():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX == 0
    assert P.Pooling.STOCHASTIC == 2
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB == 1
    assert P.Eltwise.SUM == 1


def test_netspec_items_and_attributes():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    n["scaled x2"] = L.Power(n["data"], scale=2)
    assert n["data"] is n.data and list(n.tops) == ["data", "scaled x2"]
    assert not hasattr(n, "nothing")
    with pytest.raises(KeyError):
        n["nothing"]
    net = n.to_proto()
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("data", [], ["data"]), ("scaled x2", ["data"], ["scaled x2"])]
    assert net.layer[1].power_param.scale == 2


def test_to_proto_autonames_per_type_in_walk_order():
    x = L.Input()
    y = L.ReLU(L.Convolution(L.ReLU(x), kernel_size=1), in_place=True)
    net = caffe.to_proto(y, L.Convolution(x, kernel_size=1))
    got = [(lay.name, lay.type, list(lay.bottom), list(lay.top)) for lay in net.layer]
    assert got == [("Input1", "Input", [], ["Input1"]),
                   ("ReLU1", "ReLU", ["Input1"], ["ReLU1"]),
                   ("Convolution1", "Convolution", ["ReLU1"], ["Convolution1"]),
                   # in place: tops are the bottom's name, the layer takes its own top's name
                   ("ReLU2", "ReLU", ["Convolution1"], ["Convolution1"]),
                   ("Convolution2", "Convolution", ["Input1"], ["Convolution2"])]
    # Top.to_proto is to_proto of that one top
    assert [lay.name for lay in y.to_proto().layer] == ["Input1", "ReLU1", "Convolution1", "ReLU2"]


def test_keyword_routing():
    x = L.Input()
    net = caffe.to_proto(L.InnerProduct(
        x, num_output=3,                                  # -> inner_product_param
        loss_weight=0.25, propagate_down=False,           # -> LayerParameter (repeated)
        param=dict(lr_mult=3),                            # ends in "param" -> LayerParameter
        exclude=dict(phase=caffe.TRAIN),
        weight_filler=dict(type="gaussian", std=0.5)))
    lay = net.layer[1]
    assert lay.inner_product_param.num_output == 3
    assert lay.inner_product_param.weight_filler.std == 0.5
    assert list(lay.loss_weight) == [0.25] and list(lay.propagate_down) == [False]
    assert len(lay.param) == 1 and lay.param[0].lr_mult == 3
    assert lay.exclude[0].phase == caffe.TRAIN


# ------------------------------------------------------------------ generated nets run in netlib.Net
def _net_from_text(tmp_path, text, phase=caffe.TEST):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase)


def test_generated_fcn_style_net_runs(tmp_path):
    caffe.set_random_seed(3)
    net = _net_from_text(tmp_path, str(CASES.case_fcn_style(caffe, L, P)))
    data = np.random.RandomState(0).randn(1, 3, 64, 64).astype(np.float32)
    out = net.forward(data=data)
    # conv pad 100: 64 + 200 - 2 = 262; pool /2 = 131; deconv (131 - 1) * 2 + 4 = 264
    assert net.blobs["upscore"].data.shape == (1, 21, 264, 264)
    assert out["crop"].shape == (1, 21, 64, 64)
    np.testing.assert_array_equal(out["crop"], net.blobs["upscore"].data[:, :, 19:83, 19:83])


def test_generated_ntop_net_runs(tmp_path):
    net = _net_from_text(tmp_path, str(CASES.case_ntop(caffe, L, P)))
    x = np.arange(2 * 6 * 3 * 3, dtype=np.float32).reshape(2, 6, 3, 3) / 10
    out = net.forward(data=x)
    cat = np.concatenate([x[:, 4:], x[:, :2]], axis=1)        # Concat(c, a)
    # default Eltwise is SUM of the two halves of the default (even) split of cat
    np.testing.assert_allclose(out["prod"], cat[:, :2] + cat[:, 2:], rtol=1e-6)


def test_generated_anonymous_net_runs(tmp_path):
    caffe.set_random_seed(5)
    net = _net_from_text(tmp_path, str(CASES.case_anonymous_small(caffe, L, P)))
    assert list(net.inputs) == ["Input1", "Input2"]
    rng = np.random.RandomState(1)
    out = net.forward(Input1=rng.randn(2, 3, 8, 8).astype(np.float32),
                      Input2=np.array([1, 3], dtype=np.float32))
    scores = net.blobs["InnerProduct1"].data.astype(np.float64)
    logp = scores - scores.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert out["SoftmaxWithLoss1"].shape == ()
    np.testing.assert_allclose(float(out["SoftmaxWithLoss1"]), -(logp[0, 1] + logp[1, 3]) / 2,
                               rtol=1e-5)


# ------------------------------------------------------------------ 01-learning-lenet workflow
def lenet(lmdb, batch_size):
    """The notebook's lenet(), the same script real pycaffe ran for the goldens."""
    return CASES._lenet(caffe, L, P, lmdb, batch_size)


def test_learning_lenet_workflow(tmp_path):
    lmdb = shared_path("reference", "caffe_made", "mnist_test_1000_lmdb")
    start = time.time()
    train_path, test_path = tmp_path / "lenet_auto_train.prototxt", tmp_path / "lenet_auto_test.prototxt"
    with open(train_path, "w") as f:
        f.write(str(lenet(lmdb, 32)))
    with open(test_path, "w") as f:
        f.write(str(lenet(lmdb, 100)))
    solver_path = tmp_path / "lenet_auto_solver.prototxt"
    solver_path.write_text(
        'train_net: "%s"\ntest_net: "%s"\ntest_iter: 1\ntest_interval: 10000\n'
        'base_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "inv"\n'
        'gamma: 0.0001\npower: 0.75\ndisplay: 0\nmax_iter: 10000\nsnapshot: 0\n'
        'snapshot_prefix: "%s"\nrandom_seed: 1701\n' % (train_path, test_path, tmp_path / "lenet"))

    solver = caffe.SGDSolver(str(solver_path))
    assert [(k, v.data.shape) for k, v in solver.net.blobs.items()][:3] == [
        ("data", (32, 1, 28, 28)), ("label", (32,)), ("conv1", (32, 20, 24, 24))]
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()] == [
        ("conv1", (20, 1, 5, 5)), ("conv2", (50, 20, 5, 5)), ("fc1", (500, 800)),
        ("score", (10, 500))]
    solver.net.forward()
    solver.test_nets[0].forward()
    # the first test batch is the LMDB's first 100 images; scale 1/255 as in transform_param
    first = solver.test_nets[0].blobs["data"].data
    assert first.shape == (100, 1, 28, 28) and 0 <= first.min() and first.max() <= 1
    assert solver.test_nets[0].blobs["label"].data[0] == 7      # the LMDB's first label

    niter = 40
    train_loss = np.zeros(niter)
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
    assert solver.iter == niter
    assert train_loss[-5:].mean() < 0.6 * train_loss[:5].mean()
    # as in the notebook: rerun the test net from conv1 on the batch it already holds
    # (step() tested at iteration 0 - test_initialization - so that is batch 2)
    test_net = solver.test_nets[0]
    held = test_net.blobs["data"].data.copy(), test_net.blobs["label"].data.copy()
    test_net.forward(start="conv1")
    np.testing.assert_array_equal(test_net.blobs["data"].data, held[0])
    np.testing.assert_array_equal(test_net.blobs["label"].data, held[1])
    # the test net shares the trained weights: its scores are the train net's function
    w = {k: [b.data for b in v] for k, v in solver.net.params.items()}
    for k, v in test_net.params.items():
        for a, b in zip(v, w[k]):
            np.testing.assert_array_equal(a.data, b)
    scores = test_net.blobs["score"].data
    fc1 = np.maximum(test_net.blobs["pool2"].data.reshape(100, -1) @ w["fc1"][0].T + w["fc1"][1], 0)
    np.testing.assert_allclose(scores, fc1 @ w["score"][0].T + w["score"][1], rtol=1e-4, atol=1e-4)
    accuracy = (scores.argmax(1) == held[1]).mean()
    assert accuracy > 0.5
    assert time.time() - start < 60


def test_shared_param_messages_take_plain_keywords():
    """pycaffe raises AttributeError for ``L.Deconvolution(x, num_output=...)``
    (errors.json); netlib fills convolution_param, giving the message pycaffe
    builds from ``convolution_param=dict(...)`` (the fcn_style golden)."""
    assert _json("errors.json")["deconvolution_plain_keywords"] == "AttributeError"
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 64, 64]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=8, pad=100,
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.score = L.Convolution(n.pool1, num_output=21, kernel_size=1, pad=0)
    n.upscore = L.Deconvolution(n.score, num_output=21, kernel_size=4, stride=2, bias_term=False,
                                param=[dict(lr_mult=0)])
    n.crop = L.Crop(n.upscore, n.data, crop_param=dict(axis=2, offset=[19, 19]))
    golden = text_format.Parse(open(os.path.join(GOLDEN, "fcn_style.prototxt")).read(), caffe_pb2.NetParameter())
    assert n.to_proto() == golden
    lstm = caffe.to_proto(L.LSTM(L.Input(shape=dict(dim=[3, 2, 4])), L.Input(shape=dict(dim=[3, 2])),
                                 num_output=5, weight_filler=dict(type="uniform")))
    assert lstm.layer[-1].recurrent_param.num_output == 5
