"""Inference memory: no diffs in forward-only nets, the liveness reuse plan
(netlib.memory / Net.reuse_memory) and Net.memory_estimate.

References: the same net with reuse off (Caffe's layout, every blob its own
buffer) for the values, the arrays actually held after a forward for the
byte counts, and hand-computed sizes for a small net."""
import os

import numpy
import pytest

import netlib
from netlib.errors import ConfigError
from netlib.files import read_net_param
from netlib.proto import caffe_pb2
from google.protobuf import text_format

from conftest import ROOT, shared_path

LENET = os.path.join(ROOT, "models", "lenet", "lenet.prototxt")


def _param(path, input_shape=None, until=None, extra=""):
    """A NetParameter read from ``path``: the Input reshaped, the layers cut
    after ``until`` and ``extra`` (prototxt layers) appended."""
    p = read_net_param(path)
    if input_shape is not None:
        dims = p.layer[0].input_param.shape[0].dim
        del dims[:]
        dims.extend(input_shape)
    if until is not None:
        names = [l.name for l in p.layer]
        del p.layer[names.index(until) + 1:]
    if extra:
        text_format.Merge(extra, p)
    return p


def _small_fc(p, n=32):
    for l in p.layer:
        if l.type == "InnerProduct" and l.inner_product_param.num_output > n:
            l.inner_product_param.num_output = n
    return p


HEAD = """
layer { name: "flat" type: "Flatten" bottom: "%s" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "resh" type: "Reshape" bottom: "fc" top: "resh" reshape_param { shape { dim: 0 dim: 7 } } }
layer { name: "prob" type: "Softmax" bottom: "resh" top: "prob" }
"""


def _nets():
    return {
        "lenet": lambda: _param(LENET, [2, 1, 28, 28]),
        "caffenet": lambda: _small_fc(_param(shared_path(
            "reference", "models", "bvlc_reference_caffenet", "deploy.prototxt"), [2, 3, 99, 99])),
        "googlenet_inception": lambda: _param(shared_path(
            "reference", "models", "bvlc_googlenet", "deploy.prototxt"), [1, 3, 64, 64],
            until="inception_3b/output", extra=HEAD % "inception_3b/output"),
        "resnet_block": lambda: _param(shared_path(
            "reference", "models", "resnet_50", "ResNet-50-deploy.prototxt"), [1, 3, 64, 64],
            until="res2b_relu", extra=HEAD % "res2b"),
    }


NET_NAMES = sorted(_nets())


def _build(name, seed=3):
    netlib.set_random_seed(seed)
    net = netlib.Net(_nets()[name](), phase=netlib.TEST)
    rng = numpy.random.RandomState(seed)
    for i in net.inputs:
        net.blobs[i].data[...] = rng.standard_normal(net.blobs[i].shape)
    return net


def _no_diffs(net):
    return ([n for n, b in net.blobs.items() if b._diff_buf is not None or b.has_diff]
            + ["%s[%d]" % (n, k) for n, bs in net.params.items() for k, b in enumerate(bs)
               if b._diff_buf is not None])


# -- no diffs in forward-only nets -------------------------------------------------------
@pytest.mark.parametrize("name", NET_NAMES)
def test_test_net_allocates_no_diff(name):
    net = _build(name)
    assert _no_diffs(net) == []
    net.forward()
    net.forward()
    assert _no_diffs(net) == []
    assert net.memory_usage()["diffs"] == 0


LOSS_NET = """
name: "loss_net"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "flat" type: "Flatten" bottom: "conv" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
"""


def _loss_net(force_backward=False):
    p = text_format.Parse(LOSS_NET, caffe_pb2.NetParameter())
    p.force_backward = force_backward
    netlib.set_random_seed(5)
    net = netlib.Net(p, phase=netlib.TEST)
    rng = numpy.random.RandomState(0)
    net.blobs["data"].data[...] = rng.standard_normal((4, 2, 3, 3))
    net.blobs["label"].data[...] = [0, 4, 2, 1]
    return net


def test_loss_net_forward_allocates_no_diff_and_loss_is_caffes():
    net = _loss_net()
    out = net.forward()
    assert _no_diffs(net) == []
    x = net.blobs["ip"].data.astype(numpy.float64)
    p = numpy.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = -numpy.log(p[numpy.arange(4), [0, 4, 2, 1]]).mean()
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5)
    assert net.forward_prefilled() == pytest.approx(2 * want, rel=1e-5)  # loss_weight 2


def test_backward_on_a_test_net_allocates_diffs_lazily_with_the_loss_weight():
    net = _loss_net(force_backward=True)
    net.forward()
    assert _no_diffs(net) == []
    net.backward()
    assert float(net.blobs["loss"].diff.reshape(-1)[0]) == 2.0  # Caffe keeps the weight in the diff
    x = net.blobs["ip"].data.astype(numpy.float64)
    p = numpy.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[numpy.arange(4), [0, 4, 2, 1]] -= 1
    numpy.testing.assert_allclose(net.blobs["ip"].diff, 2 * p / 4, rtol=1e-5, atol=1e-7)
    # Flatten shares its diff with its bottom (allocated on first use, lazily)
    assert net.blobs["flat"].diff.reshape(-1).__array_interface__["data"][0] == \
        net.blobs["conv"].diff.reshape(-1).__array_interface__["data"][0]
    assert net.blobs["conv"].diff.any()


def test_lazy_share_diff_either_side_first():
    a, b = netlib.Blob((2, 3)), netlib.Blob((6,))
    b.share_diff(a)
    assert not a.has_diff and not b.has_diff
    b.diff[...] = 1.5                 # the sharer first: allocated on the source
    assert a.has_diff and (a.diff == 1.5).all()
    c, d = netlib.Blob((4,)), netlib.Blob((4,))
    d.share_diff(c)
    c.diff[...] = 2.0                 # the source first
    assert (d.diff == 2.0).all()
    d.diff[0] = 7
    assert c.diff[0] == 7


# -- reuse: same numbers ------------------------------------------------------------------
@pytest.mark.parametrize("name", NET_NAMES)
def test_reuse_gives_bit_identical_outputs_and_less_memory(name):
    ref = _build(name)
    ref.forward()
    want = {n: ref.blobs[n].data.copy() for n in ref.outputs}
    plain = ref.memory_usage()["activations"]

    net = _build(name)
    keep = [n for n in net.blobs if n not in net.outputs and n not in net.inputs][2]
    want_keep = ref.blobs[keep].data.copy()
    net.reuse_memory(keep=[keep])
    for _ in range(2):  # the second forward reads the same inputs (kept)
        out = net.forward()
        assert sorted(out) == sorted(want)
        for n in want:
            numpy.testing.assert_array_equal(out[n], want[n])
        numpy.testing.assert_array_equal(net.blobs[keep].data, want_keep)
    used = net.memory_usage()
    assert used["activations"] < plain
    assert used["diffs"] == 0
    est = net.memory_estimate()
    assert est["activations_reused"] == used["activations"]
    assert est["activations_reused"] < est["activations"] == plain
    assert used["workspace"] == est["workspace_reused"]


def test_reuse_really_shares_buffers():
    net = _build("caffenet")
    net.reuse_memory()
    net.forward()
    owners = {}
    for n, b in net.blobs.items():
        base = b._data_buf
        while base.base is not None:
            base = base.base
        owners.setdefault(id(base), []).append(n)
    # pool1 and norm1's inputs die early: some buffer serves blobs of different layers
    assert any(len(v) > 1 and not all(n.startswith(v[0]) for n in v) for v in owners.values())


def test_forward_blobs_and_end_are_kept():
    ref = _build("lenet")
    ref.forward()
    net = _build("lenet")
    net.reuse_memory()
    net.forward()
    out = net.forward(blobs=["conv1", "pool2"])
    numpy.testing.assert_array_equal(out["conv1"], ref.blobs["conv1"].data)
    numpy.testing.assert_array_equal(out["pool2"], ref.blobs["pool2"].data)
    numpy.testing.assert_array_equal(out["prob"], ref.blobs["prob"].data)
    out = net.forward(end="ip1")  # before the in-place relu1
    numpy.testing.assert_array_equal(out["ip1"], ref.forward(end="ip1")["ip1"])
    net.forward()
    numpy.testing.assert_array_equal(net.blobs["conv1"].data, ref.blobs["conv1"].data)  # kept from then on


def test_reuse_refuses_partial_forward_and_backward():
    net = _build("lenet")
    net.reuse_memory()
    net.forward()
    with pytest.raises(ConfigError, match="reuse_memory"):
        net.forward(start="pool1")
    with pytest.raises(ConfigError, match="reuse_memory"):
        net.backward()
    with pytest.raises(ConfigError, match="no blob"):
        net.reuse_memory(keep=["nope"])


def test_reuse_off_again_restores_caffes_layout():
    ref = _build("lenet")
    ref.forward()
    net = _build("lenet")
    net.reuse_memory()
    net.forward()
    net.reuse_memory(False)
    assert not net.reusing_memory
    net.forward()
    for n in ref.blobs:
        numpy.testing.assert_array_equal(net.blobs[n].data, ref.blobs[n].data)
    assert net.memory_usage()["activations"] == ref.memory_usage()["activations"]


def test_reuse_follows_an_input_reshape():
    net = _build("lenet")
    net.reuse_memory()
    net.forward()
    x = numpy.random.RandomState(9).standard_normal((5, 1, 28, 28)).astype(numpy.float32)
    net.blobs["data"].reshape(*x.shape)
    out = net.forward(data=x)["prob"].copy()
    ref = _build("lenet")
    ref.blobs["data"].reshape(*x.shape)
    ref.reshape()
    numpy.testing.assert_array_equal(out, ref.forward(data=x)["prob"])
    assert net.memory_estimate()["activations_reused"] == net.memory_usage()["activations"]


# -- estimate against measured sizes ---------------------------------------------------------
@pytest.mark.parametrize("name", NET_NAMES)
def test_estimate_matches_measured(name):
    net = _build(name)
    est = net.memory_estimate()   # before any forward
    net.forward()
    used = net.memory_usage()
    assert est["weights"] == used["weights"]
    assert est["activations"] == used["activations"]
    assert est["workspace"] == used["workspace"]
    assert est["diffs"] == used["diffs"] == 0
    assert est["total"] == est["weights"] + est["activations"] + est["workspace"]


def test_estimate_by_hand_on_a_small_net():
    net = _loss_net()
    est = net.memory_estimate()
    f = 4
    weights = (3 * 2 * 2 * 2 + 3 + 5 * 12 + 5) * f
    assert est["weights"] == weights
    # data, label, conv (= flat: shared), ip, loss, acc, and the Split of ip and label
    # shares data with its bottoms; the loss layer's internal probabilities are not blobs
    acts = (4 * 2 * 3 * 3 + 4 + 4 * 3 * 2 * 2 + 4 * 5 + 1 + 1) * f
    assert est["activations"] == acts
    # im2col of 2 channels x 2x2 kernel x 4 positions, the 4 images in one chunk,
    # plus the (3 outputs x 4 images x 4 positions) matrix buffer, and a copy of
    # the chunk's images when the engine lays the batch last
    cols = 2 * 4 * 4 * 4 + 3 * 4 * 4
    assert est["workspace"] in (cols * f, (cols + 4 * 2 * 3 * 3) * f)
    assert est["diffs"] == 0
    net.forward()
    assert net.memory_usage()["activations"] == acts
    # a backward (allowed on a TEST net, as in Caffe) allocates at most diffs_backward
    assert est["diffs_backward"] > 0
    net.backward()
    assert 0 < net.memory_usage()["diffs"] <= est["diffs_backward"]


def test_caffenet_batch10_estimate_fits_the_budget():
    net = netlib.Net(_small_fc(_param(shared_path(
        "reference", "models", "bvlc_reference_caffenet", "deploy.prototxt"), [10, 3, 227, 227]), 8),
        phase=netlib.TEST)
    net.reuse_memory()
    est = net.memory_estimate()
    # without reuse: data 6.2 + conv1 11.6 + ... about 40 MB; with reuse about half
    assert est["activations_reused"] < 0.7 * est["activations"]
    assert est["workspace_reused"] < est["workspace"] / 3


def test_time_memory_prints_the_estimate(capsys):
    from netlib.tools import cli
    code = cli.main(["time", "--model", LENET, "--phase", "TEST", "--memory"])
    err = capsys.readouterr().err
    assert code == 0, err
    net = netlib.Net(LENET, phase=netlib.TEST)
    est = net.memory_estimate()
    for key in ("weights", "activations", "activations_reused", "workspace", "total", "total_reused"):
        line = next(l for l in err.splitlines() if l.split("]")[-1].split()[:1] == [key])
        assert float(line.split()[-2]) == pytest.approx(est[key] / 2.0 ** 20, abs=0.006)
    assert "Benchmark begins" not in err
