"""Deploy nets of Caffe forks: DenseNet-121 (pooling_param.ceil_mode) and
MobileNet v1/v2 (depthwise convolutions).

* Pooling's fork field ``ceil_mode`` (DenseNet's Caffe): false rounds the
  output size down, as ``round_mode: FLOOR``; when given it overrides
  round_mode; Caffe's pad correction still applies.  Unit cases against
  sizes computed here by hand.
* DenseNet-121 builds with the pooling shapes its ``ceil_mode: false``
  implies (computed independently below) and runs a batch-1 224x224 forward.
* MobileNet v1 and v2 give the same outputs on the depthwise fast path as on
  netlib's general grouped path (random weights), and their blob shapes
  match real Caffe's (../shared/reference/golden/model_shapes.json).
"""
import json
import math
import os

import numpy as np
import pytest
from google.protobuf import text_format

import netlib
from netlib.blob import Blob
from netlib.builtin import depthwise, vision  # noqa: F401
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from conftest import SHARED, shared_path

MODELS = os.path.join("reference", "models")


# --------------------------------------------------------------------------
# pooling_param.ceil_mode
# --------------------------------------------------------------------------
def pool_shape(params, hw):
    lp = text_format.Parse('name: "p" type: "Pooling" pooling_param { %s }' % params, caffe_pb2.LayerParameter())
    lay = create_layer(lp, phase=caffe_pb2.TEST, xp=np)
    b, t = Blob((1, 1) + hw), Blob(())
    b.data[...] = np.random.default_rng(0).standard_normal(b.shape)
    lay.SetUp([b], [t])
    lay.Forward([b], [t])
    return tuple(t.shape[2:]), lay, b.data.copy(), t.data.copy()


def by_hand(size, k, p, s, ceil):
    q = (size + 2 * p - k) / s
    out = (math.ceil(q) if ceil else math.floor(q)) + 1
    if p and (out - 1) * s >= size + p:      # Caffe's pad correction, whatever the rounding
        out -= 1
    return out


@pytest.mark.parametrize("size,k,p,s", [(112, 3, 1, 2), (6, 3, 0, 2), (7, 2, 0, 2), (5, 2, 1, 2),
                                        (8, 3, 1, 3), (10, 4, 2, 3), (56, 2, 0, 2)])
def test_ceil_mode_false_floors_and_overrides_round_mode(size, k, p, s):
    base = "pool: MAX kernel_size: %d pad: %d stride: %d" % (k, p, s)
    floor = by_hand(size, k, p, s, False)
    ceil = by_hand(size, k, p, s, True)
    assert pool_shape(base, (size, size))[0] == (ceil, ceil)
    assert pool_shape(base + " ceil_mode: false", (size, size))[0] == (floor, floor)
    assert pool_shape(base + " round_mode: FLOOR", (size, size))[0] == (floor, floor)
    # when given, ceil_mode takes precedence over round_mode (either way)
    assert pool_shape(base + " round_mode: CEIL ceil_mode: false", (size, size))[0] == (floor, floor)
    assert pool_shape(base + " round_mode: FLOOR ceil_mode: true", (size, size))[0] == (ceil, ceil)


def test_ceil_mode_false_values_are_floor_windows():
    # 8x8, kernel 3, stride 2, pad 1: floor((8+2-3)/2)+1 = 4 windows (ceil: 5)
    hw, lay, x, y = pool_shape("pool: MAX kernel_size: 3 pad: 1 stride: 2 ceil_mode: false", (8, 8))
    assert hw == (4, 4)
    xp = np.pad(x[0, 0], 1, constant_values=-np.inf)
    ref = np.array([[xp[2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(4)] for i in range(4)])
    np.testing.assert_array_equal(y[0, 0], ref)
    hw, _, x, y = pool_shape("pool: AVE kernel_size: 2 stride: 2 ceil_mode: false", (7, 7))
    assert hw == (3, 3)
    ref = x[0, 0, :6, :6].reshape(3, 2, 3, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(y[0, 0], ref, rtol=1e-6)


# --------------------------------------------------------------------------
# DenseNet-121
# --------------------------------------------------------------------------
def _set_inference_params(net, rng, conv_std=None):
    """Seeded weights that keep activations finite: BatchNorm stats (mean ~0,
    var ~1, factor 1), Scale ~1 / ~0, convolutions He-scaled (or zero)."""
    for name, layer in zip(net.layer_names, net.layers):
        blobs = net.params.get(name, [])
        if layer.type == "BatchNorm":
            blobs[0].data[...] = rng.standard_normal(blobs[0].shape) * 0.1
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape)
            blobs[2].data[...] = 1
        elif layer.type == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 1.5, blobs[0].shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.standard_normal(blobs[1].shape) * 0.1
        elif layer.type in ("Convolution", "InnerProduct", "ConvolutionDepthwise"):
            w = blobs[0]
            fan_in = int(np.prod(w.shape[1:]))
            w.data[...] = rng.standard_normal(w.shape) * (math.sqrt(2.0 / fan_in) if conv_std is None else conv_std)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.standard_normal(blobs[1].shape) * 0.1


def test_densenet121_shapes_follow_ceil_mode_false_and_forward_runs():
    path = shared_path(MODELS, "densenet_121", "DenseNet_121.prototxt")
    net = netlib.Net(path, netlib.TEST)
    # pooling tops computed by hand: conv1 7x7/2 pad 3 on 224 -> 112;
    # pool1 MAX 3/2 pad 1 with ceil_mode false: floor((112+2-3)/2)+1 = 56
    # (ceil would be 57); then AVE 2/2 (no pad): 56 -> 28 -> 14 -> 7; global AVE -> 1
    conv1 = (224 + 2 * 3 - 7) // 2 + 1
    assert conv1 == 112
    pool1 = int(math.floor((conv1 + 2 - 3) / 2)) + 1
    assert pool1 == 56 and int(math.ceil((conv1 + 2 - 3) / 2)) + 1 == 57
    expected = {"conv1": (1, 64, 112, 112), "pool1": (1, 64, pool1, pool1),
                "pool2": (1, 128, 28, 28), "pool3": (1, 256, 14, 14), "pool4": (1, 512, 7, 7),
                "pool5": (1, 1024, 1, 1), "fc6": (1, 1000, 1, 1)}
    for blob, shape in expected.items():
        assert tuple(net.blobs[blob].shape) == shape, blob
    # transition 1 halves the 64 + 6*32 = 256 channels of dense block 1
    assert tuple(net.blobs["conv2_blk"].shape) == (1, 128, 56, 56)
    assert net.outputs == ["fc6"]
    rng = np.random.default_rng(121)
    _set_inference_params(net, rng)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    out = net.forward()["fc6"]
    assert out.shape == (1, 1000, 1, 1)
    assert np.isfinite(out).all() and float(np.abs(out).max()) > 0


def test_densenet121_with_ceil_mode_true_changes_pool1():
    path = shared_path(MODELS, "densenet_121", "DenseNet_121.prototxt")
    param = netlib.files.read_net_param(path)
    for layer in param.layer:
        if layer.name == "pool1":
            assert layer.pooling_param.HasField("ceil_mode") and not layer.pooling_param.ceil_mode
            layer.pooling_param.ceil_mode = True
    net = netlib.Net(param, netlib.TEST)
    assert tuple(net.blobs["pool1"].shape) == (1, 64, 57, 57)
    assert tuple(net.blobs["pool2"].shape) == (1, 128, 29, 29)     # Caffe's default ceil: 57 -> 29


# --------------------------------------------------------------------------
# MobileNet v1 / v2: depthwise fast path == general path; shapes == real Caffe
# --------------------------------------------------------------------------
MOBILENETS = [("mobilenet_v1/mobilenet_deploy.prototxt", "fc7"),
              ("mobilenet_v2/mobilenet_v2_deploy.prototxt", "fc7")]


def _shapes_reference(model):
    path = os.path.join(SHARED, "reference", "golden", "model_shapes.json")
    if not os.path.exists(path):
        return None
    return json.load(open(path))["models"].get(model)


@pytest.mark.parametrize("model,logits", MOBILENETS, ids=["v1", "v2"])
def test_mobilenet_fast_path_equals_general_path(model, logits, monkeypatch):
    path = shared_path(MODELS, *model.split("/"))
    net = netlib.Net(path, netlib.TEST)
    dw_layers = [l for l in net.layers if l.type == "Convolution" and l.group > 1]
    assert dw_layers and all(l._dw is not None for l in dw_layers)      # the fast path is used
    ref = _shapes_reference(model)
    if ref is not None:
        assert [[n, list(b.shape)] for n, b in net.blobs.items()] == ref["blobs"]
    rng = np.random.default_rng(7)
    _set_inference_params(net, rng)
    x = rng.standard_normal(net.blobs["data"].shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    fast = {n: net.blobs[n].data.copy() for n in (logits, "prob")}
    params = {n: [b.data.copy() for b in bl] for n, bl in net.params.items()}
    # the same net on the general grouped path
    monkeypatch.setattr(vision.ConvolutionLayer, "depthwise_fast_path", False)
    gnet = netlib.Net(path, netlib.TEST)
    assert all(l._dw is None for l in gnet.layers if l.type == "Convolution")
    for n, bl in gnet.params.items():
        for b, v in zip(bl, params[n]):
            b.data[...] = v
    gnet.blobs["data"].data[...] = x
    gnet.forward()
    for n in (logits, "prob"):
        g = gnet.blobs[n].data
        assert np.isfinite(g).all()
        np.testing.assert_allclose(fast[n], g, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(g).max())))
    assert float(np.abs(fast[logits]).std()) > 0        # a non-trivial output


def test_mobilenet_v1_as_convolution_depthwise_port():
    """The ports' type name: the same net with its depthwise layers typed
    ConvolutionDepthwise (group and num_output dropped, as those prototxts
    do) gives the same blobs and outputs."""
    path = shared_path(MODELS, "mobilenet_v1", "mobilenet_deploy.prototxt")
    param = netlib.files.read_net_param(path)
    ported = caffe_pb2.NetParameter()
    ported.CopyFrom(param)
    n = 0
    for layer in ported.layer:
        if layer.type == "Convolution" and layer.convolution_param.group > 1:
            layer.type = "ConvolutionDepthwise"
            layer.convolution_param.ClearField("group")
            layer.convolution_param.ClearField("num_output")
            n += 1
    assert n == 13
    net, pnet = netlib.Net(param, netlib.TEST), netlib.Net(ported, netlib.TEST)
    assert [(k, b.shape) for k, b in net.blobs.items()] == [(k, b.shape) for k, b in pnet.blobs.items()]
    rng = np.random.default_rng(11)
    _set_inference_params(net, rng)
    for name, blobs in net.params.items():
        for b, pb in zip(blobs, pnet.params[name]):
            pb.data[...] = b.data
    x = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["data"].data[...] = x
    pnet.blobs["data"].data[...] = x
    np.testing.assert_array_equal(net.forward()["prob"], pnet.forward()["prob"])
