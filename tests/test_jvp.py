"""Forward-mode derivatives: every layer's jvp rule against centred
differences (netlib.testing.check_jvp, float64), whole-net Net.jvp against
centred differences of the net's forward, and the error cases."""
import importlib.util
import os
import sys

import numpy
import pytest

import netlib
from netlib import backend
from netlib.errors import LayerError, NetlibError
from netlib.forward_mode import JVPError
from netlib.layer import layer_class, layer_type_list
from netlib.testing import check_jvp

from conftest import ROOT

G = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'

CASES = [
    ('type: "InnerProduct" inner_product_param { num_output: 3 %s }' % G, [(2, 3, 4)]),
    ('type: "InnerProduct" inner_product_param { num_output: 3 bias_term: false axis: 2 %s }' % G, [(2, 3, 4)]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2 %s }' % G,
     [(2, 4, 6, 5)]),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 dilation: 2 pad: 2 %s }' % G,
     [(1, 3, 7, 7)]),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_h: 1 kernel_w: 3 bias_term: false %s }' % G,
     [(2, 2, 4, 5)]),
    ('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 stride: 2 %s }' % G, [(2, 3, 4, 4)]),
    ('type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 2 group: 2 pad: 1 %s }' % G,
     [(1, 4, 3, 3)]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', [(2, 3, 7, 7)]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }', [(2, 2, 5, 5)]),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }', [(2, 3, 7, 7)]),
    ('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [(2, 3, 4, 5)]),
    ('type: "Pooling" pooling_param { pool: MAX global_pooling: true }', [(2, 3, 4, 5)]),
    ('type: "ReLU"', [(2, 3, 4)]),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', [(2, 3, 4)]),
    ('type: "Sigmoid"', [(2, 3, 4)]),
    ('type: "TanH"', [(2, 3, 4)]),
    ('type: "ELU" elu_param { alpha: 0.7 }', [(2, 3, 4)]),
    ('type: "AbsVal"', [(2, 3, 4)]),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1.5 }', [(2, 3, 4)]),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }', [(2, 3, 4)]),
    ('type: "BNLL"', [(2, 3, 4)]),
    ('type: "Swish" swish_param { beta: 1.5 }', [(2, 3, 4)]),
    ('type: "Clip" clip_param { min: -0.5 max: 0.5 }', [(2, 3, 4)]),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [(2, 3, 4)]),
    ('type: "Softmax"', [(2, 3, 4)]),
    ('type: "Softmax" softmax_param { axis: 2 }', [(2, 3, 4)]),
    ('type: "BatchNorm"', [(4, 3, 2, 2)]),
    ('type: "MVN"', [(2, 3, 4, 4)]),
    ('type: "MVN" mvn_param { normalize_variance: false across_channels: true }', [(2, 3, 4, 4)]),
    ('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
     [(2, 3, 4)]),
    ('type: "Scale" scale_param { axis: 0 }', [(2, 3, 4), (2, 3)]),
    ('type: "Bias" bias_param { filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Bias"', [(2, 3, 4), (3, 4)]),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 2 coeff: -1 }', [(2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3), (2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3), (2, 3)]),
    ('type: "Concat"', [(2, 3), (2, 4)]),
    ('type: "Concat" concat_param { axis: 0 }', [(2, 3), (1, 3)]),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 }', [(2, 3, 2)]),
    ('type: "Split" top: "a" top: "b"', [(2, 3)]),
    ('type: "Flatten"', [(2, 3, 2, 2)]),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 2)]),
    ('type: "Crop" crop_param { axis: 2 offset: 1 }', [(2, 3, 5, 5), (2, 3, 3, 3)]),
    ('type: "Tile" tile_param { axis: 1 tiles: 2 }', [(2, 3)]),
    ('type: "Reduction" reduction_param { operation: SUM axis: 1 coeff: 2 }', [(2, 3, 4)]),
    ('type: "Reduction" reduction_param { operation: MEAN }', [(2, 3)]),
    ('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', [(2, 3)]),
    ('type: "Reduction" reduction_param { operation: SUMSQ }', [(2, 3)]),
    ('type: "EuclideanLoss"', [(2, 3), (2, 3)]),
    ('type: "SPP" spp_param { pyramid_height: 3 pool: MAX }', [(2, 3, 7, 6)]),
    ('type: "Normalize" norm_param { scale_filler { type: "gaussian" } }', [(2, 3, 2, 2)]),
    ('type: "Normalize" norm_param { across_spatial: false channel_shared: false scale_filler { type: "gaussian" } }',
     [(2, 3, 2, 2)]),
    ('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [(2, 3, 5, 5)]),
    ('type: "SPP" spp_param { pyramid_height: 1 pool: MAX }', [(1, 2, 4, 4)]),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 1.5 }', [(2, 5, 2, 2)]),
    ('type: "LRN" lrn_param { local_size: 5 alpha: 0.3 beta: 0.6 }', [(2, 4, 3, 1)]),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.75 }', [(2, 2, 4, 5)]),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 5 alpha: 2 beta: 0.6 }', [(1, 3, 3, 2)]),
    ('type: "PReLU" prelu_param { filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "PReLU" prelu_param { channel_shared: true filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Permute" permute_param { order: 0 order: 2 order: 1 }', [(2, 3, 4)]),
    ('type: "PriorBox" prior_box_param { min_size: 4 aspect_ratio: 2 }', [(1, 2, 3, 3), (1, 3, 12, 12)]),
    ('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', []),
    ('type: "Im2col" convolution_param { kernel_size: 2 stride: 1 }', [(1, 2, 3, 3)]),
]


@pytest.mark.parametrize("text,shapes", CASES, ids=[c[0][:60] for c in CASES])
def test_check_jvp(text, shapes):
    result = check_jvp(text, bottom_shapes=shapes)
    assert result.ok and result.checked > 0


def test_check_jvp_log_and_losses():
    rng = numpy.random.default_rng(3)
    check_jvp('type: "Log" log_param { base: 2 scale: 0.5 shift: 0.2 }', bottoms=[rng.uniform(0.5, 2, (2, 3))])
    check_jvp('type: "BatchNorm" batch_norm_param { use_global_stats: true }', bottoms=[rng.normal(size=(2, 3, 2))],
              params=[rng.normal(size=3), rng.uniform(0.5, 2, 3), numpy.array([1.5])], phase="TEST")
    check_jvp('type: "Dropout"', bottom_shapes=[(2, 3)], phase="TEST")
    labels = numpy.array([0, 2, 1, 1.0])
    check_jvp('type: "SoftmaxWithLoss"', bottoms=[rng.normal(size=(4, 3)), labels])
    check_jvp('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 normalization: BATCH_SIZE }',
              bottoms=[rng.normal(size=(4, 3)), labels])
    two = 'top: "loss" top: "prob" loss_weight: 1 loss_weight: 0'  # the probabilities as a second top
    check_jvp('type: "SoftmaxWithLoss" %s' % two, bottoms=[rng.normal(size=(4, 3)), labels])
    check_jvp('type: "InfogainLoss" %s' % two, bottoms=[rng.normal(size=(4, 3)), labels, rng.uniform(size=(3, 3))],
              check_bottoms=[0])
    check_jvp('type: "SigmoidCrossEntropyLoss"', bottoms=[rng.normal(size=(4, 3)), rng.integers(0, 2, (4, 3))])
    check_jvp('type: "Embed" embed_param { num_output: 3 input_dim: 5 %s }' % G,
              bottoms=[numpy.array([[0, 3], [4, 1.0]])])
    check_jvp('type: "HingeLoss"', bottoms=[rng.normal(size=(4, 3)), labels])
    check_jvp('type: "MultinomialLogisticLoss"', bottoms=[rng.uniform(0.2, 1, (4, 3)), labels])
    check_jvp('type: "ContrastiveLoss"', bottoms=[rng.normal(size=(4, 3)), rng.normal(size=(4, 3)),
                                                   numpy.array([0, 1, 0, 1.0])])
    check_jvp('type: "InfogainLoss"', bottoms=[rng.uniform(0.2, 1, (4, 3)), labels, rng.uniform(size=(3, 3))],
              check_bottoms=[0])
    check_jvp('type: "BatchReindex"', bottoms=[rng.normal(size=(4, 3)), numpy.array([1, 0, 3.0])],
              check_bottoms=[0])
    check_jvp('type: "Filter" top: "a"', bottoms=[rng.normal(size=(4, 3)), numpy.array([1, 0, 1, 1.0])],
              check_bottoms=[0])
    check_jvp('type: "LSTMUnit" top: "c" top: "h"', bottoms=[rng.normal(size=(1, 3, 2)), rng.normal(size=(1, 3, 8)),
                                                          numpy.array([[1, 0, 1.0]])], check_bottoms=[0, 1])
    check_jvp('type: "Silence"', bottom_shapes=[(2, 3)], num_tops=0)
    with pytest.raises(JVPError, match="MAX and AVE"):
        check_jvp('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }', bottom_shapes=[(1, 1, 4, 4)],
                  phase="TEST")
    check_jvp('type: "Accuracy"', bottoms=[rng.normal(size=(4, 3)), labels], check_bottoms=[])


def test_check_jvp_reports_a_wrong_rule():
    from netlib.builtin.neuron import SigmoidLayer

    class Wrong(SigmoidLayer):
        def jvp(self, bottom, top, tangents, param_tangents):
            return [2 * t for t in tangents]

    from netlib.layer import register_layer
    register_layer("WrongJvpSigmoid")(Wrong)
    with pytest.raises(netlib.testing.GradientCheckError, match="WrongJvpSigmoid"):
        check_jvp('type: "WrongJvpSigmoid"', bottom_shapes=[(2, 3)])


def test_layer_without_rule_raises_typed_error():
    from netlib.layer import Layer
    from netlib.proto import caffe_pb2
    layer = Layer(caffe_pb2.LayerParameter(name="mine", type="Mine"))
    with pytest.raises(JVPError, match="'mine'") as info:
        layer.jvp([], [], [], None)
    assert isinstance(info.value, LayerError) and isinstance(info.value, NetlibError)


@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize("typ", ["RNN", "LSTM"])
def test_check_jvp_recurrent(typ, fractional):
    """The fused recurrences, through time: plain (cont 0 at t = 0, so the carried state is not read),
    with a static input, with exposed initial states (their tangents too) and parameter tangents;
    binary and fractional cont (the exact derivative of f = cont * sigmoid either way)."""
    rng = numpy.random.default_rng(0)
    T, N = 3, 2
    cont = numpy.array([[0, 0], [1, 0.5], [0.3, 0.0]] if fractional else [[0, 0], [1, 1], [1, 0.0]])
    fill = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'
    text = 'type: "%s" recurrent_param { num_output: 4 %s %%s }' % (typ, fill)
    for bottoms, checks in (([rng.normal(size=(T, N, 3)), cont], [0]),
                            ([rng.normal(size=(T, N, 3)), cont, rng.normal(size=(N, 2))], [0, 2])):
        result = check_jvp(text % "", bottoms=bottoms, check_bottoms=checks)
        assert result.skipped == 0 and result.checked == T * N * 4
    n_states = 1 if typ == "RNN" else 2
    states = [rng.normal(size=(1, N, 4)) for _ in range(n_states)]
    result = check_jvp(text % "expose_hidden: true", bottoms=[rng.normal(size=(T, N, 3)), numpy.ones((T, N))] + states,
                       check_bottoms=[0] + list(range(2, 2 + n_states)), num_tops=1 + n_states)
    assert result.skipped == 0 and result.checked == (T + n_states) * N * 4


#: Registered types with no jvp rule (keep in sync; it must not grow): DetectionOutput has no backward,
#: a Python layer's rule is its author's.
WITHOUT_RULE = sorted("""
    DetectionOutput Python
""".split())


def test_layer_types_without_a_rule():
    from netlib.layer import Layer
    missing = [t for t in layer_type_list() if t == "Python" or layer_class(t).jvp is Layer.jvp]
    assert sorted(set(missing)) == WITHOUT_RULE


# -- whole nets ------------------------------------------------------------------------------------

def _bench():
    spec = importlib.util.spec_from_file_location("bench_nets", os.path.join(ROOT, "benchmarks", "bench_nets.py"))
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, ["bench_nets.py"]  # it parses its arguments on import
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def _net(name, batch):
    from netlib.proto import caffe_pb2
    param = _bench().bench_param(name, "train", batch)
    net = netlib.Net(param, caffe_pb2.TRAIN, dtype=numpy.float64)
    rng = numpy.random.default_rng(5)  # nonzero weights of unit gain (some prototxts fill with zeros)
    for blobs in net.params.values():
        for b in blobs:
            fan_in = max(int(numpy.prod(b.shape[1:])), 1) if len(b.shape) > 1 else 1
            b.data[...] = rng.normal(size=b.shape) / numpy.sqrt(fan_in)
    return net


@pytest.mark.parametrize("name,batch", [("lenet", 2), ("cifar10_quick", 2)])
def test_net_jvp_matches_centred_differences(name, batch):
    net = _net(name, batch)
    rng = numpy.random.default_rng(0)
    x = rng.normal(size=net.blobs["data"].shape)
    labels = rng.integers(0, 10, net.blobs["label"].shape).astype(float)
    dx = rng.normal(size=x.shape)
    conv = [n for n, l in zip(net.layer_names, net.layers) if l.type == "Convolution"][0]
    ip = [n for n, l in zip(net.layer_names, net.layers) if l.type == "InnerProduct"][-1]
    dw = {(conv, 0): rng.normal(size=net.params[conv][0].shape), (conv, 1): rng.normal(size=net.params[conv][1].shape),
          (ip, 0): rng.normal(size=net.params[ip][0].shape)}
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = labels
    tangents = dict(dw)
    tangents["data"] = dx
    out = {k: backend.to_numpy(v) for k, v in net.jvp(tangents).items()}
    base = {k: backend.to_numpy(net.params[k[0]][k[1]].data).copy() for k in dw}

    def run(eps):
        net.blobs["data"].data[...] = x + eps * dx
        net.blobs["label"].data[...] = labels
        for k, v in dw.items():
            net.params[k[0]][k[1]].data[...] = base[k] + eps * v
        net.forward()
        return {n: backend.to_numpy(b.data).copy() for n, b in net.blobs.items()}

    h = 1e-7  # small: at 1e-5 a few max-pool / ReLU switches in CIFAR-10 quick show as 1e-4 errors
    plus, minus = run(h), run(-h)
    run(0)
    for blob in (ip, "loss"):
        top = net.top_names[blob][0] if blob in net.top_names else blob
        num = (plus[top] - minus[top]) / (2 * h)
        err = numpy.abs(out[top] - num).max() / max(numpy.abs(num).max(), 1e-12)
        assert err < 1e-6, (name, top, err)  # measured: about 1e-8
        assert out[top].dtype == numpy.float64


def test_net_jvp_in_place_layers_and_float32():
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
            inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
    layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }
    layer { name: "sig" type: "Sigmoid" bottom: "y" top: "y" }
    """
    from netlib.proto import caffe_pb2
    from google.protobuf import text_format
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    for dtype in (numpy.float64, numpy.float32):
        net = netlib.Net(param, caffe_pb2.TEST, dtype=dtype)
        rng = numpy.random.default_rng(1)
        x, dx = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
        net.blobs["x"].data[...] = x
        out = {k: backend.to_numpy(v) for k, v in net.jvp({"x": dx}).items()}
        assert out["y"].dtype == dtype
        w = backend.to_numpy(net.params["ip"][0].data).astype(numpy.float64)
        pre = x @ w.T + backend.to_numpy(net.params["ip"][1].data)
        s = 1 / (1 + numpy.exp(-numpy.maximum(pre, 0)))
        expected = s * (1 - s) * (pre > 0) * (dx @ w.T)
        numpy.testing.assert_allclose(out["y"], expected, rtol=1e-5 if dtype == numpy.float32 else 1e-12, atol=1e-6)
        numpy.testing.assert_allclose(out["x"], dx)


def test_net_jvp_errors():
    net = _net("lenet", 1)
    with pytest.raises(JVPError, match="'nosuch'"):
        net.jvp({"nosuch": numpy.zeros(3)})
    with pytest.raises(JVPError, match="'data' has shape"):
        net.jvp({"data": numpy.zeros(3)})
    with pytest.raises(JVPError, match="'nolayer'"):
        net.jvp({("nolayer", 0): numpy.zeros(3)})
    with pytest.raises(JVPError, match="parameter 5"):
        net.jvp({("conv1", 5): numpy.zeros(3)})
    with pytest.raises(JVPError, match=r"\('conv1', 0\) has shape"):
        net.jvp({("conv1", 0): numpy.zeros(3)})


DAG = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "c1" type: "Convolution" bottom: "x" top: "c1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" } } }
layer { name: "bn" type: "BatchNorm" bottom: "c1" top: "c1" }
layer { name: "sc" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true filler { type: "gaussian" } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" relu_param { negative_slope: 0.2 } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "c1" top: "dw"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "c1" bottom: "dw" top: "sum" }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "c1" top: "cat" }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 alpha: 0.1 } }
layer { name: "pool" type: "Pooling" bottom: "lrn" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "tanh" type: "TanH" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "sm" type: "Softmax" bottom: "ip" top: "prob" }
"""


def test_net_jvp_dag_split_in_place_batchnorm():
    """A blob read twice (a Split), in-place BatchNorm/Scale/ReLU/TanH chains, depthwise, Concat, LRN, MAX pooling,
    with input and parameter tangents (TRAIN: BatchNorm's batch statistics)."""
    from google.protobuf import text_format
    from netlib.proto import caffe_pb2
    param = text_format.Parse(DAG, caffe_pb2.NetParameter())
    netlib.set_random_seed(2)
    net = netlib.Net(param, caffe_pb2.TRAIN, dtype=numpy.float64)
    rng = numpy.random.default_rng(4)
    x, dx = rng.normal(size=(2, 3, 6, 6)), rng.normal(size=(2, 3, 6, 6))
    dp = {("c1", 0): rng.normal(size=net.params["c1"][0].shape), ("sc", 1): rng.normal(size=(4,)),
          ("dw", 0): rng.normal(size=net.params["dw"][0].shape), ("ip", 1): rng.normal(size=(5,))}
    base = {k: backend.to_numpy(net.params[k[0]][k[1]].data).copy() for k in dp}
    net.blobs["x"].data[...] = x
    tangents = dict(dp)
    tangents["x"] = dx
    out = {k: backend.to_numpy(v) for k, v in net.jvp(tangents).items()}

    def run(eps):
        net.blobs["x"].data[...] = x + eps * dx
        for k, v in dp.items():
            net.params[k[0]][k[1]].data[...] = base[k] + eps * v
        net.forward()
        return backend.to_numpy(net.blobs["prob"].data).copy(), backend.to_numpy(net.blobs["ip"].data).copy()

    h = 1e-7
    (pp, ip_p), (pm, ip_m) = run(h), run(-h)
    for got, num in ((out["prob"], (pp - pm) / (2 * h)), (out["ip"], (ip_p - ip_m) / (2 * h))):
        assert numpy.abs(got - num).max() / numpy.abs(num).max() < 1e-5




def test_jvp_rules_use_the_blob_array_module(on_fake):
    """Every rule goes through xp: the grid and a whole net on a CuPy stand-in that refuses NumPy."""
    for text, shapes in CASES:
        check_jvp(text, bottom_shapes=shapes)
    for typ in ("RNN", "LSTM"):
        test_check_jvp_recurrent(typ, True)
    test_net_jvp_dag_split_in_place_batchnorm()
