"""MobileNet-SSD (VOC, the SSD fork's deploy net) builds and runs on netlib.

Random (seeded) weights from the prototxt's fillers and a random 300x300
input.  The prior / loc / conf blob shapes are compared with values computed
here from the prototxt alone (conv arithmetic for the feature map sizes, the
fork's prior count per cell), the detections with the plain-loop reference of
test_detection_layers, and the rows are checked for sanity.  The net runs on
the depthwise fast path (when netlib has one) and on the general grouped
convolution path, which must agree.
"""
import math

import numpy
import pytest
from google.protobuf import text_format

import netlib
import netlib.detection  # noqa: F401  (registers the SSD layers until the lead wires them in)
from conftest import shared_path
from netlib.layer import layer_class
from netlib.proto import caffe_pb2
from netlib.random import set_random_seed
from test_detection_layers import reference_detection_output

MODEL = ("reference", "models", "mobilenet_ssd_voc", "MobileNetSSD_deploy.prototxt")


def read_param():
    param = caffe_pb2.NetParameter()
    with open(shared_path(*MODEL)) as f:
        text_format.Parse(f.read(), param)
    return param


def feature_sizes(param):
    """Spatial size of every blob from the input and the convolutions' kernel,
    pad and stride (the net has no pooling; ReLUs are in place)."""
    size = {param.input[0]: int(param.input_shape[0].dim[2])}
    for layer in param.layer:
        if layer.type == "Convolution":
            p = layer.convolution_param
            k, pad = p.kernel_size[0], (p.pad[0] if p.pad else 0)
            stride = p.stride[0] if p.stride else 1
            size[layer.top[0]] = (size[layer.bottom[0]] + 2 * pad - k) // stride + 1
    return size


def priors_per_cell(p):
    ratios = [1.0]
    for r in p.aspect_ratio:
        if all(abs(r - a) >= 1e-6 for a in ratios):
            ratios += [r, 1.0 / r] if p.flip else [r]
    return len(p.min_size) * len(ratios) + len(p.max_size)


def expected_heads(param):
    sizes = feature_sizes(param)
    heads = []
    for layer in param.layer:
        if layer.type == "PriorBox":
            fmap = layer.bottom[0]
            heads.append((fmap, sizes[fmap], priors_per_cell(layer.prior_box_param)))
    return heads


@pytest.fixture(scope="module")
def nets():
    """The net forwarded on the default and on the general convolution path."""
    conv = layer_class("Convolution")
    path = shared_path(*MODEL)
    out = {}
    rng = numpy.random.default_rng(7)
    image = rng.uniform(-1, 1, (1, 3, 300, 300)).astype(numpy.float32)
    saved = conv.__dict__.get("depthwise_fast_path", None)
    try:
        for name, fast in (("default", saved), ("general", False)):
            if fast is not None:
                conv.depthwise_fast_path = fast
            set_random_seed(1234)
            net = netlib.Net(path, netlib.TEST)
            if name == "general":
                _copy_weights(out["default"], net)
            else:
                # sharper class scores than the fillers give, so that whatever the
                # random stream, detections pass confidence_threshold 0.25
                for lname, blobs in net.params.items():
                    if lname.endswith("_mbox_conf"):
                        blobs[0].data[...] *= 8
            net.blobs["data"].data[...] = image
            net.forward()
            out[name] = net
    finally:
        if saved is None:
            if "depthwise_fast_path" in conv.__dict__:
                del conv.depthwise_fast_path
        else:
            conv.depthwise_fast_path = saved
    return out


def _copy_weights(src, dst):
    for name, blobs in src.params.items():
        for a, b in zip(blobs, dst.params[name]):
            b.data[...] = a.data


def test_feature_maps_and_head_shapes_match_the_prototxt(nets):
    param = read_param()
    net = nets["default"]
    heads = expected_heads(param)
    assert [s for _, s, _ in heads] == [19, 10, 5, 3, 2, 1]
    assert [n for _, _, n in heads] == [3, 6, 6, 6, 6, 6]
    total = 0
    for fmap, s, n in heads:
        assert net.blobs[fmap].shape[2:] == (s, s)
        assert net.blobs[fmap + "_mbox_loc"].shape == (1, n * 4, s, s)
        assert net.blobs[fmap + "_mbox_conf"].shape == (1, n * 21, s, s)
        assert net.blobs[fmap + "_mbox_loc_perm"].shape == (1, s, s, n * 4)
        assert net.blobs[fmap + "_mbox_conf_perm"].shape == (1, s, s, n * 21)
        assert net.blobs[fmap + "_mbox_loc_flat"].shape == (1, s * s * n * 4)
        assert net.blobs[fmap + "_mbox_priorbox"].shape == (1, 2, s * s * n * 4)
        total += s * s * n
    assert total == 1917
    assert net.blobs["mbox_loc"].shape == (1, total * 4)
    assert net.blobs["mbox_conf_flatten"].shape == (1, total * 21)
    assert net.blobs["mbox_priorbox"].shape == (1, 2, total * 4)
    out = net.blobs["detection_out"]
    assert out.ndim == 4 and out.shape[:2] == (1, 1) and out.shape[3] == 7


def test_permute_heads_are_transposes(nets):
    net = nets["default"]
    for fmap in ("conv11", "conv17_2"):
        numpy.testing.assert_array_equal(net.blobs[fmap + "_mbox_conf_perm"].data,
                                         net.blobs[fmap + "_mbox_conf"].data.transpose(0, 2, 3, 1))


def test_priors_and_variances(nets):
    net = nets["default"]
    pri = net.blobs["mbox_priorbox"].data[0]
    # conv11: 19x19, min 60, ratios 1, 2, 1/2; step 300/19; first cell centre 0.5*300/19
    c = 0.5 * 300 / 19
    numpy.testing.assert_allclose(pri[0, :4], [(c - 30) / 300, (c - 30) / 300, (c + 30) / 300, (c + 30) / 300],
                                  atol=1e-6)
    numpy.testing.assert_allclose(pri[1].reshape(-1, 4), numpy.tile([0.1, 0.1, 0.2, 0.2], (1917, 1)), atol=0)
    # the last map (1x1, min 285 max 300) has its first prior centred on the image
    last = pri[0, -6 * 4:].reshape(6, 4)
    h = 285 / 2 / 300
    numpy.testing.assert_allclose(last[0], [0.5 - h, 0.5 - h, 0.5 + h, 0.5 + h], atol=1e-6)
    side = math.sqrt(285 * 300) / 2 / 300
    numpy.testing.assert_allclose(last[1], [0.5 - side, 0.5 - side, 0.5 + side, 0.5 + side], atol=1e-6)


def test_detections_are_sane_and_match_the_reference(nets):
    net = nets["default"]
    rows = net.blobs["detection_out"].data[0, 0]
    assert 0 < rows.shape[0] <= 100                           # keep_top_k 100
    assert numpy.all(rows[:, 0] == 0)
    labels = rows[:, 1]
    assert numpy.all(labels == numpy.round(labels)) and labels.min() >= 1 and labels.max() <= 20
    assert numpy.all(rows[:, 2] > 0.25) and numpy.all(rows[:, 2] <= 1)    # confidence_threshold 0.25
    key = [(r[1], -r[2]) for r in rows]
    assert key == sorted(key)                                 # by label, then decreasing score
    assert numpy.all(numpy.isfinite(rows[:, 3:]))
    assert numpy.all(rows[:, 3] < rows[:, 5]) and numpy.all(rows[:, 4] < rows[:, 6])   # CENTER_SIZE boxes
    ref = reference_detection_output(net.blobs["mbox_loc"].data, net.blobs["mbox_conf_flatten"].data,
                                     net.blobs["mbox_priorbox"].data, 21, code="CENTER_SIZE", nms_thr=0.45,
                                     top_k=100, keep_top_k=100, conf_thr=0.25)
    assert ref.shape == net.blobs["detection_out"].shape
    numpy.testing.assert_allclose(net.blobs["detection_out"].data, ref, rtol=0, atol=2e-6)
    # the scores are the softmax of the conf head
    soft = net.blobs["mbox_conf_flatten"].data.reshape(1917, 21)
    numpy.testing.assert_allclose(soft.sum(1), 1, rtol=1e-5)


def test_general_convolution_path_agrees(nets):
    a, b = nets["default"], nets["general"]
    assert all(getattr(layer, "_dw", None) is None for layer in b.layers)
    for name in ("conv13", "mbox_loc", "mbox_conf_flatten"):
        numpy.testing.assert_allclose(a.blobs[name].data, b.blobs[name].data, rtol=1e-4, atol=1e-4)
    assert a.blobs["detection_out"].shape == b.blobs["detection_out"].shape
    numpy.testing.assert_allclose(a.blobs["detection_out"].data, b.blobs["detection_out"].data, atol=1e-4)
