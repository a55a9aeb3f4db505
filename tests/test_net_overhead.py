"""Per-layer bookkeeping cuts keep Caffe's results: Layer.Forward skips
reshape only when nothing reshape reads changed (bottom shapes and buffers,
top shapes), layers whose shapes depend on anything else still reshape, and
the net's forward loop still sums losses and calls hooks.

References: LeNet computed with naive loops (kernel offsets) in float64 here,
Filter's selection done by hand, a user layer whose top shape follows an
attribute.  No timings (benchmarks/ measures the latency)."""
import os

import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib.layer import Layer, register_layer
from netlib.proto import caffe_pb2

from conftest import ROOT

LENET = os.path.join(ROOT, "models", "lenet", "lenet.prototxt")


def _naive_lenet(net, x):
    """LeNet's forward from the net's weights, float64, loops over kernel offsets only."""
    p = {n: [b.data.astype(numpy.float64) for b in bs] for n, bs in net.params.items()}

    def conv(x, w, b):
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        oh, ow = h - kh + 1, wd - kw + 1
        y = numpy.zeros((n, o, oh, ow))
        for i in range(kh):
            for j in range(kw):
                y += numpy.einsum("nchw,oc->nohw", x[:, :, i:i + oh, j:j + ow], w[:, :, i, j])
        return y + b.reshape(1, -1, 1, 1)

    def pool(x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    y = pool(conv(x, *p["conv1"]))
    y = pool(conv(y, *p["conv2"]))
    y = y.reshape(len(x), -1) @ p["ip1"][0].T + p["ip1"][1]
    y = numpy.maximum(y, 0) @ p["ip2"][0].T + p["ip2"][1]
    e = numpy.exp(y - y.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _lenet(batch):
    netlib.set_random_seed(11)
    net = netlib.Net(LENET, phase=netlib.TEST)
    net.blobs["data"].reshape(batch, 1, 28, 28)
    net.reshape()
    return net


def test_lenet_batch1_matches_naive_reference_over_repeated_forwards():
    net = _lenet(1)
    rng = numpy.random.RandomState(0)
    for _ in range(3):  # later forwards skip the reshapes; new inputs each time
        x = rng.rand(1, 1, 28, 28)
        out = net.forward(data=x.astype(numpy.float32))["prob"]
        numpy.testing.assert_allclose(out, _naive_lenet(net, x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("call_net_reshape", [True, False])
def test_input_reshape_between_forwards(call_net_reshape):
    net = _lenet(2)
    rng = numpy.random.RandomState(1)
    net.forward(data=rng.rand(2, 1, 28, 28).astype(numpy.float32))
    for batch in (5, 1, 3):
        x = rng.rand(batch, 1, 28, 28)
        net.blobs["data"].reshape(batch, 1, 28, 28)
        if call_net_reshape:
            net.reshape()
        out = net.forward(data=x.astype(numpy.float32))["prob"]
        assert out.shape == (batch, 10)
        assert net.blobs["conv1"].shape == (batch, 20, 24, 24)
        numpy.testing.assert_allclose(out, _naive_lenet(net, x), rtol=1e-4, atol=1e-6)


def test_a_reshaped_intermediate_top_is_reshaped_back():
    net = _lenet(2)
    x = numpy.random.RandomState(2).rand(2, 1, 28, 28)
    net.forward(data=x.astype(numpy.float32))
    net.blobs["pool1"].reshape(7)  # Caffe's Forward reshapes it back
    out = net.forward(data=x.astype(numpy.float32))["prob"]
    assert net.blobs["pool1"].shape == (2, 20, 12, 12)
    numpy.testing.assert_allclose(out, _naive_lenet(net, x), rtol=1e-4, atol=1e-6)


SPLIT_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "Power" bottom: "data" top: "a" power_param { scale: 2 } }
layer { name: "b" type: "Power" bottom: "data" top: "b" power_param { shift: 1 } }
"""


def test_a_new_input_buffer_is_seen_through_split():
    net = netlib.Net(text_format.Parse(SPLIT_NET, caffe_pb2.NetParameter()), phase=netlib.TEST)
    assert "Split" in [l.type for l in net.layers]
    net.blobs["data"].data[...] = 1
    net.forward()
    x = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
    net.blobs["data"].set_data(x.copy())  # a new buffer: the Split's tops must follow it
    out = net.forward()
    numpy.testing.assert_array_equal(out["a"], 2 * x)
    numpy.testing.assert_array_equal(out["b"], x + 1)


FILTER_NET = """
layer { name: "data" type: "Input" top: "x" top: "sel"
        input_param { shape { dim: 4 dim: 2 } shape { dim: 4 } } }
layer { name: "filter" type: "Filter" bottom: "x" bottom: "sel" top: "y" }
"""


def test_filter_reshapes_on_every_forward():
    net = netlib.Net(text_format.Parse(FILTER_NET, caffe_pb2.NetParameter()), phase=netlib.TEST)
    x = numpy.arange(8, dtype=numpy.float32).reshape(4, 2)
    net.blobs["x"].data[...] = x
    for sel in ([1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]):
        net.blobs["sel"].data[...] = sel
        out = net.forward()["y"]
        numpy.testing.assert_array_equal(out, x[numpy.asarray(sel) != 0])
    assert not net.layer_by_name("filter")._static


class _RepeatLayer(Layer):
    """A user layer: top = bottom repeated ``self.times`` times along axis 0
    (``times`` changed by the test between forwards: never a static reshape)."""
    times = 1

    def reshape(self, bottom, top):
        top[0].reshape((bottom[0].shape[0] * self.times,) + tuple(bottom[0].shape[1:]))

    def forward(self, bottom, top):
        top[0].data[...] = numpy.concatenate([bottom[0].data] * self.times)


@pytest.fixture
def repeat_type():
    from netlib import layer as layer_module
    register_layer("TestOverheadRepeat")(_RepeatLayer)
    yield
    layer_module._REGISTRY.pop("TestOverheadRepeat", None)  # keep layer_type_list() clean


def test_user_layers_always_reshape(repeat_type):
    text = SPLIT_NET.split("\n")[1] + """
    layer { name: "rep" type: "TestOverheadRepeat" bottom: "data" top: "rep" }"""
    net = netlib.Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase=netlib.TEST)
    net.blobs["data"].data[...] = 3
    rep = net.layer_by_name("rep")
    assert not rep._static
    assert net.forward()["rep"].shape == (2, 3)
    rep.times = 3
    assert net.forward()["rep"].shape == (6, 3)


def test_static_flags():
    net = _lenet(1)
    flags = {n: l._static for n, l in zip(net.layer_names, net.layers)}
    assert flags == {"data": False, "conv1": True, "pool1": True, "conv2": True, "pool2": True,
                     "ip1": True, "relu1": True, "ip2": True, "prob": True}


def test_hooks_and_losses_still_run():
    net = netlib.Net(text_format.Parse("""
        layer { name: "data" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
        layer { name: "l1" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l1" }
        layer { name: "l2" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l2" loss_weight: 0.5 }
        """, caffe_pb2.NetParameter()), phase=netlib.TEST)
    a = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
    net.blobs["a"].data[...] = a
    net.blobs["b"].data[...] = 0
    seen = []
    net.before_forward(lambda i: seen.append(("b", i)))
    net.after_forward(lambda i: seen.append(("a", i)))
    loss = net.forward_prefilled()
    half_sq = float((a.astype(numpy.float64) ** 2).sum() / 2 / 2)
    assert loss == pytest.approx(1.5 * half_sq, rel=1e-6)
    assert [s for s in seen if s[0] == "b"] == [("b", i) for i in range(len(net.layers))]
    assert len(seen) == 2 * len(net.layers)
