"""Second-order products: every layer's backward_jvp rule against centred
differences of its backward (netlib.testing.check_hvp, float64); Net.hvp on
LeNet and CIFAR-10 quick against centred differences of the gradient (with
weight decay) and its symmetry; the Gauss-Newton product against J^T H J
built from explicit Jacobians; Net.jacobian against centred differences;
shared parameters, a chosen loss, the batch kept, the CuPy stand-in; the
error cases."""
import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib import backend
from netlib.errors import LayerError
from netlib.layer import Layer, layer_class, layer_type_list, register_layer
from netlib.proto import caffe_pb2
from netlib.second_order import HVPError
from netlib.testing import GradientCheckError, check_hvp

from test_jvp import _net

G = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'

CASES = [
    ('type: "InnerProduct" inner_product_param { num_output: 3 %s }' % G, [(2, 3, 4)]),
    ('type: "InnerProduct" inner_product_param { num_output: 3 bias_term: false axis: 2 transpose: true %s }' % G,
     [(2, 3, 4)]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2 %s }' % G,
     [(2, 4, 6, 5)]),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 dilation: 2 pad: 2 %s }' % G,
     [(1, 3, 7, 7)]),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 5 pad: 2 %s }' % G, [(2, 8, 8, 8)]),
    ('type: "ConvolutionDepthwise" convolution_param { num_output: 3 kernel_size: 3 pad: 1 %s }' % G,
     [(2, 3, 5, 5)]),
    ('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 stride: 2 %s }' % G, [(2, 3, 4, 4)]),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', [(2, 3, 7, 7)]),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }', [(2, 3, 7, 7)]),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', [(2, 3, 4)]),
    ('type: "Sigmoid"', [(2, 3, 4)]),
    ('type: "TanH"', [(2, 3, 4)]),
    ('type: "ELU" elu_param { alpha: 0.7 }', [(2, 3, 4)]),
    ('type: "AbsVal"', [(2, 3, 4)]),
    ('type: "Power" power_param { power: 3 scale: 0.5 shift: 1.5 }', [(2, 3, 4)]),
    ('type: "Power" power_param { power: 2 scale: -0.7 shift: 0.5 }', [(2, 3, 4)]),
    ('type: "Power" power_param { power: 1 scale: 2 }', [(2, 3, 4)]),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }', [(2, 3, 4)]),
    ('type: "BNLL"', [(2, 3, 4)]),
    ('type: "Swish" swish_param { beta: 1.5 }', [(2, 3, 4)]),
    ('type: "Clip" clip_param { min: -0.5 max: 0.5 }', [(2, 3, 4)]),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [(2, 3, 4)]),
    ('type: "Softmax"', [(2, 3, 4)]),
    ('type: "Softmax" softmax_param { axis: 2 }', [(2, 3, 4)]),
    ('type: "BatchNorm"', [(4, 3, 2, 2)]),
    ('type: "BatchNorm" batch_norm_param { eps: 0.1 }', [(5, 3)]),
    ('type: "MVN"', [(2, 3, 4, 4)]),
    ('type: "MVN" mvn_param { across_channels: true eps: 0.3 }', [(2, 3, 2, 2)]),
    ('type: "MVN" mvn_param { eps: 0.5 }', [(3, 4, 2)]),
    ('type: "MVN" mvn_param { normalize_variance: false }', [(2, 3, 4)]),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 1.5 }', [(2, 5, 2, 2)]),
    ('type: "LRN" lrn_param { local_size: 5 alpha: 0.3 beta: 0.6 }', [(2, 4, 3, 1)]),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 alpha: 0.5 beta: 0.75 }', [(2, 2, 4, 5)]),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL local_size: 5 alpha: 2 beta: 0.6 }', [(1, 3, 3, 2)]),
    ('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
     [(2, 3, 4)]),
    ('type: "Scale" scale_param { axis: 0 }', [(2, 3, 4), (2, 3)]),
    ('type: "Scale" scale_param { axis: 0 bias_term: true }', [(2, 3, 4), (2, 3)]),
    ('type: "Bias" bias_param { filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 2 coeff: -1 }', [(2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3), (2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', [(2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3), (2, 3)]),
    ('type: "Concat"', [(2, 3), (2, 4)]),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 }', [(2, 3, 2)]),
    ('type: "Split" top: "a" top: "b"', [(2, 3)]),
    ('type: "Flatten"', [(2, 3, 2, 2)]),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 2)]),
    ('type: "Crop" crop_param { axis: 2 offset: 1 }', [(2, 3, 5, 5), (2, 3, 3, 3)]),
    ('type: "Tile" tile_param { axis: 1 tiles: 2 }', [(2, 3)]),
    ('type: "Reduction" reduction_param { operation: SUM axis: 1 coeff: 2 }', [(2, 3, 4)]),
    ('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', [(2, 3)]),
    ('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 coeff: -0.5 }', [(2, 3, 4)]),
    ('type: "Reduction" reduction_param { operation: MEAN }', [(2, 3)]),
    ('type: "EuclideanLoss"', [(2, 3), (2, 3)]),
    ('type: "SPP" spp_param { pyramid_height: 2 pool: MAX }', [(2, 3, 5, 5)]),
    ('type: "PReLU" prelu_param { filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "PReLU" prelu_param { channel_shared: true filler { type: "gaussian" } }', [(2, 3, 4)]),
    ('type: "Permute" permute_param { order: 0 order: 2 order: 1 }', [(2, 3, 4)]),
    ('type: "Im2col" convolution_param { kernel_size: 2 stride: 1 }', [(1, 2, 3, 3)]),
]


@pytest.mark.parametrize("text,shapes", CASES, ids=[c[0][:60] for c in CASES])
def test_check_hvp(text, shapes):
    result = check_hvp(text, bottom_shapes=shapes)
    assert result.ok and result.checked > 0


def test_check_hvp_losses_and_labelled_layers():
    rng = numpy.random.default_rng(3)
    labels = numpy.array([0, 2, 1, 1.0])
    check_hvp('type: "Log" log_param { base: 2 scale: 0.5 shift: 0.2 }', bottoms=[rng.uniform(0.5, 2, (2, 3))])
    check_hvp('type: "BatchNorm" batch_norm_param { use_global_stats: true }', bottoms=[rng.normal(size=(2, 3, 2))],
              params=[rng.normal(size=3), rng.uniform(0.5, 2, 3), numpy.array([1.5])], phase="TEST")
    for loss_param in ("", "loss_param { ignore_label: 1 normalization: BATCH_SIZE }",
                       "loss_param { normalization: NONE } softmax_param { axis: 2 }"):
        x = rng.normal(size=(4, 3) if "axis" not in loss_param else (2, 2, 3))
        lab = labels if "axis" not in loss_param else numpy.array([[0, 2], [1, 1.0]])
        result = check_hvp('type: "SoftmaxWithLoss" %s' % loss_param, bottoms=[x, lab])
        assert result.checked > 0
    check_hvp('type: "SigmoidCrossEntropyLoss"', bottoms=[rng.normal(size=(4, 3)), rng.integers(0, 2, (4, 3))])
    check_hvp('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: 0 }',
              bottoms=[rng.normal(size=(4, 3)), rng.integers(0, 2, (4, 3))])
    check_hvp('type: "HingeLoss"', bottoms=[rng.normal(size=(4, 3)), labels])
    check_hvp('type: "HingeLoss" hinge_loss_param { norm: L2 }', bottoms=[rng.normal(size=(4, 3)), labels])
    check_hvp('type: "MultinomialLogisticLoss"', bottoms=[rng.uniform(0.2, 1, (4, 3)), labels])
    sim = numpy.array([0, 1, 0, 1.0])
    for cp in ("", "contrastive_loss_param { legacy_version: true margin: 3 }", "contrastive_loss_param { margin: 2.5 }"):
        check_hvp('type: "ContrastiveLoss" %s' % cp, bottoms=[rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), sim])
    for lp in ("", "loss_param { ignore_label: 2 normalization: BATCH_SIZE }"):
        check_hvp('type: "InfogainLoss" %s' % lp, bottoms=[rng.normal(size=(4, 3)), labels, rng.uniform(size=(3, 3))],
                  check_bottoms=[0])
    check_hvp('type: "Embed" embed_param { num_output: 3 input_dim: 5 %s }' % G,
              bottoms=[numpy.array([[0, 3], [4, 1.0]])])
    check_hvp('type: "BatchReindex"', bottoms=[rng.normal(size=(4, 3)), numpy.array([1, 0, 3.0])], check_bottoms=[0])
    check_hvp('type: "Filter" top: "a"', bottoms=[rng.normal(size=(4, 3)), numpy.array([1, 0, 1, 1.0])],
              check_bottoms=[0])


def test_check_hvp_reports_a_wrong_rule():
    from netlib.builtin.neuron import SigmoidLayer

    class Wrong(SigmoidLayer):
        def second_derivative(self, bottom, top):
            return 2 * super().second_derivative(bottom, top)

    register_layer("WrongHvpSigmoid")(Wrong)
    with pytest.raises(GradientCheckError, match="WrongHvpSigmoid"):
        check_hvp('type: "WrongHvpSigmoid"', bottom_shapes=[(2, 3)])

    class NaNRule(SigmoidLayer):
        def second_derivative(self, bottom, top):
            return top[0].data * float("nan")

    register_layer("NaNHvpSigmoid")(NaNRule)
    with pytest.raises(GradientCheckError, match="NaNHvpSigmoid"):  # a NaN never passes
        check_hvp('type: "NaNHvpSigmoid"', bottom_shapes=[(2, 3)])


#: Registered types with no second-order rule (must not grow): DetectionOutput has no backward, a
#: Python layer's rule is its author's.
WITHOUT_RULE = sorted("""
    DetectionOutput Python
""".split())


def test_layer_types_without_a_rule():
    missing = [t for t in layer_type_list() if t == "Python" or layer_class(t).backward_jvp is Layer.backward_jvp]
    assert sorted(set(missing)) == WITHOUT_RULE


# -- whole nets ------------------------------------------------------------------------------------

def _fill(net, seed=0):
    rng = numpy.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].shape)
    return rng


def _gradient(net, weight_decay):
    """The solver's gradient: the net's diffs plus the L2 term, as Caffe's Regularize."""
    net.clear_param_diffs()
    net.forward_backward()
    return [backend.to_numpy(p.diff).copy() + weight_decay * d * backend.to_numpy(p.data)
            for p, d in zip(net.learnable_params, net.params_weight_decay)]


def _fd_hvp(net, v, weight_decay, h=1e-7):
    """Centred differences of the gradient along v (h small: at 1e-6 ReLU and max-pool switches show)."""
    params = net.learnable_params
    base = [backend.to_numpy(p.data).copy() for p in params]

    def at(eps):
        for p, b, d in zip(params, base, v):
            p.data[...] = b + eps * d
        return _gradient(net, weight_decay)

    plus, minus = at(h), at(-h)
    at(0.0)
    return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


def _dot(a, b):
    return sum(float((backend.to_numpy(x) * backend.to_numpy(y)).sum()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["lenet", "cifar10_quick"])
def test_net_hvp_matches_centred_differences_and_is_symmetric(name):
    net = _net(name, 2)
    rng = _fill(net)
    for blobs in net.params.values():  # decay_mult as the zoo files set them (1, and 0 for some biases)
        assert blobs
    v = [rng.normal(size=p.shape) for p in net.learnable_params]
    u = [rng.normal(size=p.shape) for p in net.learnable_params]
    wd = 5e-3
    net.forward()
    hv = net.hvp(v, weight_decay=wd)
    assert [h.dtype for h in hv] == [numpy.float64] * len(hv)
    num = _fd_hvp(net, v, wd)
    scale = max(numpy.abs(n).max() for n in num)
    err = max(numpy.abs(backend.to_numpy(a) - n).max() for a, n in zip(hv, num)) / scale
    assert err < 1e-6, err  # measured: LeNet 6e-10, CIFAR-10 quick 2e-8
    hu = net.hvp(u, weight_decay=wd)
    uhv, vhu = _dot(u, hv), _dot(v, hu)
    assert abs(uhv - vhu) <= 1e-6 * max(abs(uhv), abs(vhu))  # measured: about 1e-16
    # the L2 term is wd * decay_mult * v exactly
    hv0 = net.hvp(v)
    for a, b, d, m in zip(hv, hv0, v, net.params_weight_decay):
        numpy.testing.assert_allclose(backend.to_numpy(a) - backend.to_numpy(b), wd * m * d, rtol=1e-9, atol=1e-12)
    # afterwards the diffs hold the gradient at the batch
    grad = [backend.to_numpy(p.diff).copy() for p in net.learnable_params]
    for g, ref in zip(grad, _gradient(net, 0.0)):
        numpy.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-14)


SEQUENCE_NET = """
layer { name: "in" type: "Input" top: "data" top: "cont" top: "label"
        input_param { shape { dim: 4 dim: 2 dim: 3 } shape { dim: 4 dim: 2 } shape { dim: 4 dim: 2 } } }
layer { name: "lstm" type: "LSTM" bottom: "data" bottom: "cont" top: "h1"
        recurrent_param { num_output: 5 %(fill)s } }
layer { name: "rnn" type: "RNN" bottom: "h1" bottom: "cont" top: "h2" recurrent_param { num_output: 4 %(fill)s } }
layer { name: "ip" type: "InnerProduct" bottom: "h2" top: "z"
        inner_product_param { num_output: 3 axis: 2 %(fill)s } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "z" bottom: "label" top: "loss" softmax_param { axis: 2 } }
""" % {"fill": G}


def test_hvp_through_recurrent_layers():
    """A stacked LSTM -> RNN -> classifier over time, with a sequence restart: hvp against centred
    differences of the gradient (with weight decay) and symmetric."""
    netlib.set_random_seed(3)
    net = netlib.Net(text_format.Parse(SEQUENCE_NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN,
                     dtype=numpy.float64)
    rng = numpy.random.default_rng(4)
    net.blobs["data"].data[...] = rng.normal(size=(4, 2, 3))
    net.blobs["cont"].data[...] = [[0, 0], [1, 1], [1, 0], [1, 1]]  # t = 0 starts: the carried state is not read
    net.blobs["label"].data[...] = rng.integers(0, 3, (4, 2))
    v = [rng.normal(size=p.shape) for p in net.learnable_params]
    u = [rng.normal(size=p.shape) for p in net.learnable_params]
    net.forward()
    hv = net.hvp(v, weight_decay=1e-3)
    num = _fd_hvp(net, v, 1e-3, h=1e-6)
    scale = max(numpy.abs(n).max() for n in num)
    err = max(numpy.abs(backend.to_numpy(a) - n).max() for a, n in zip(hv, num)) / scale
    assert err < 1e-6, err  # measured: 3e-11
    hu = net.hvp(u, weight_decay=1e-3)
    uhv, vhu = _dot(u, hv), _dot(v, hu)
    assert abs(uhv - vhu) <= 1e-9 * max(abs(uhv), abs(vhu))


def test_hvp_dict_directions_shared_parameters_and_a_chosen_loss():
    text = """
    layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 4 } } }
    layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h1" param { name: "w" } param { name: "b" }
            inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 }
                                  bias_filler { type: "gaussian" } } }
    layer { name: "act" type: "TanH" bottom: "h1" top: "h1" }
    layer { name: "ip2" type: "InnerProduct" bottom: "h1" top: "h2" param { name: "w" } param { name: "b" }
            inner_product_param { num_output: 4 } }
    layer { name: "sig" type: "Sigmoid" bottom: "h2" top: "s" }
    layer { name: "l2" type: "EuclideanLoss" bottom: "s" bottom: "t" top: "a" loss_weight: 0.7 }
    layer { name: "ce" type: "SigmoidCrossEntropyLoss" bottom: "h2" bottom: "t" top: "b" }
    """
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    netlib.set_random_seed(3)
    net = netlib.Net(param, caffe_pb2.TRAIN, dtype=numpy.float64)
    rng = numpy.random.default_rng(1)
    net.blobs["x"].data[...] = rng.normal(size=(3, 4))
    net.blobs["t"].data[...] = rng.integers(0, 2, (3, 4))
    assert len(net.learnable_params) == 2  # ip2 shares ip1's weights and biases
    dw = rng.normal(size=(4, 4))
    out = net.hvp({("ip2", 0): dw})  # named through the sharer: the same parameter
    assert set(out) == {("ip1", 0), ("ip1", 1)}
    num = _fd_hvp(net, [dw, numpy.zeros(4)], 0.0)
    for key, n in zip([("ip1", 0), ("ip1", 1)], num):
        numpy.testing.assert_allclose(out[key], n, rtol=1e-6, atol=1e-7 * numpy.abs(n).max())
    # only the Euclidean loss: the other's top diff is muted for the pass, restored after
    only = net.hvp([dw, numpy.zeros(4)], loss="a")
    b_diff = net.blobs["b"].diff.copy()
    assert float(b_diff.reshape(-1)[0]) == 1.0
    param.layer[-1].loss_weight.append(0.0)  # the same net with the cross-entropy switched off
    net3 = netlib.Net(param, caffe_pb2.TRAIN, dtype=numpy.float64)
    for src, dst in zip(net.learnable_params, net3.learnable_params):
        dst.data[...] = src.data
    net3.blobs["x"].data[...] = net.blobs["x"].data
    net3.blobs["t"].data[...] = net.blobs["t"].data
    num = _fd_hvp(net3, [dw, numpy.zeros(4)], 0.0)
    for a, n in zip(only, num):
        numpy.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-7 * numpy.abs(n).max())
    with pytest.raises(HVPError, match="'nope' is not a loss"):
        net.hvp([dw, numpy.zeros(4)], loss="nope")
    with pytest.raises(HVPError, match="two directions"):
        net.hvp({("ip1", 0): dw, ("ip2", 0): dw})


def _small_classifier(loss):
    text = """
    layer { name: "in" type: "Input" top: "x" top: "label" input_param { shape { dim: 4 dim: 3 } shape { %s } } }
    layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 5
            weight_filler { type: "gaussian" std: 0.7 } bias_filler { type: "gaussian" } } }
    layer { name: "act" type: "TanH" bottom: "h" top: "h" }
    layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "z" inner_product_param { num_output: 3
            weight_filler { type: "gaussian" std: 0.7 } } }
    layer { name: "loss" type: "%s" bottom: "z" bottom: "label" top: "loss" }
    """ % ("dim: 4" if loss == "SoftmaxWithLoss" else "dim: 4 dim: 3", loss)
    netlib.set_random_seed(5)
    net = netlib.Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, dtype=numpy.float64)
    rng = numpy.random.default_rng(2)
    net.blobs["x"].data[...] = rng.normal(size=(4, 3))
    net.blobs["label"].data[...] = (rng.integers(0, 3, 4) if loss == "SoftmaxWithLoss"
                                    else rng.normal(size=(4, 3)))
    return net, rng


@pytest.mark.parametrize("loss", ["SoftmaxWithLoss", "EuclideanLoss"])
def test_gauss_newton_product_is_jt_h_j(loss):
    """G v = J^T H J v with J from Net.jacobian (the logits z against each parameter) and H the loss's
    Hessian in z written out here: softmax (diag(p) - p p^T) / N per item, Euclidean I / N."""
    net, rng = _small_classifier(loss)
    net.forward()
    keys = [("ip1", 0), ("ip1", 1), ("ip2", 0), ("ip2", 1)]
    jac = numpy.concatenate([net.jacobian("z", k).reshape(12, -1) for k in keys], axis=1)
    z = net.blobs["z"].data.copy()
    if loss == "SoftmaxWithLoss":
        p = numpy.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        hz = numpy.zeros((12, 12))
        for n in range(4):
            hz[3 * n:3 * n + 3, 3 * n:3 * n + 3] = (numpy.diag(p[n]) - numpy.outer(p[n], p[n])) / 4
    else:
        hz = numpy.eye(12) / 4
    gn = jac.T @ hz @ jac
    v = [rng.normal(size=net.params[k[0]][k[1]].shape) for k in keys]
    got = net.gnvp(v)
    flat = numpy.concatenate([g.reshape(-1) for g in got])
    ref = gn @ numpy.concatenate([a.reshape(-1) for a in v])
    numpy.testing.assert_allclose(flat, ref, rtol=1e-9, atol=1e-12 * numpy.abs(ref).max())
    assert _dot(v, got) >= 0  # positive semi-definite
    # and the full Hessian differs from it by the curvature of the hidden TanH
    full = numpy.concatenate([h.reshape(-1) for h in net.hvp(v)])
    assert numpy.abs(full - flat).max() > 1e-6 * numpy.abs(flat).max()


def test_jacobian_matches_centred_differences():
    net, _ = _small_classifier("SoftmaxWithLoss")
    net.forward()
    x = net.blobs["x"].data.copy()
    jac = net.jacobian("z", "x")
    assert jac.shape == (4, 3, 4, 3)
    num = numpy.zeros_like(jac)
    h = 1e-6
    for idx in numpy.ndindex(x.shape):
        for sign in (1, -1):
            net.blobs["x"].data[...] = x
            net.blobs["x"].data[idx] += sign * h
            net.forward()
            num[(Ellipsis,) + idx] += sign * net.blobs["z"].data / (2 * h)
    numpy.testing.assert_allclose(jac, num, rtol=1e-6, atol=1e-8)
    wjac = net.jacobian("loss", ("ip2", 0))
    assert wjac.shape == (3, 5)
    with pytest.raises(HVPError, match="max_columns"):
        net.jacobian("z", "x", max_columns=5)
    with pytest.raises(HVPError, match="no blob 'nope'"):
        net.jacobian("nope", "x")
    with pytest.raises(HVPError, match="no parameter"):
        net.jacobian("z", ("ip2", 7))


def test_hvp_keeps_the_batch_of_data_layers():
    """A DummyData source refills every forward; hvp uses the batch now in the net."""
    text = """
    layer { name: "d" type: "DummyData" top: "x" top: "t"
            dummy_data_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 }
                               data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 2
            weight_filler { type: "gaussian" } } }
    layer { name: "act" type: "Sigmoid" bottom: "h" top: "s" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "t" top: "loss" }
    """
    netlib.set_random_seed(1)
    net = netlib.Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, dtype=numpy.float64)
    net.forward()
    x = net.blobs["x"].data.copy()
    v = [numpy.random.default_rng(0).normal(size=p.shape) for p in net.learnable_params]
    a = net.hvp(v)
    b = net.hvp(v)
    numpy.testing.assert_array_equal(net.blobs["x"].data, x)
    for p, q in zip(a, b):
        numpy.testing.assert_array_equal(p, q)
    c = net.hvp(v, keep_batch=False)  # a fresh batch: another Hessian
    assert not numpy.array_equal(net.blobs["x"].data, x)
    assert any(not numpy.allclose(p, q) for p, q in zip(a, c))


def test_hvp_errors():
    no_loss = netlib.Net(text_format.Parse("""
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }
        """, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    with pytest.raises(HVPError, match="no loss") as info:
        no_loss.hvp([numpy.zeros((2, 3)), numpy.zeros(2)])
    assert isinstance(info.value, LayerError)
    net = _net("lenet", 1)
    with pytest.raises(HVPError, match=r"\('conv1', 0\) has shape"):
        net.hvp({("conv1", 0): numpy.zeros(3)})
    with pytest.raises(HVPError, match="'nolayer'"):
        net.hvp({("nolayer", 0): numpy.zeros(3)})
    with pytest.raises(HVPError, match="parameter 4 of layer 'conv1'"):
        net.hvp({("conv1", 4): numpy.zeros(3)})
    with pytest.raises(HVPError, match="3 directions"):
        net.hvp([numpy.zeros(3)] * 3)
    with pytest.raises(HVPError, match="dict"):
        net.hvp(numpy.zeros(3))
    with pytest.raises(HVPError, match="regularization"):
        net.hvp({("conv1", 1): numpy.zeros(20)}, weight_decay=1e-3, regularization="L3")


def test_layer_without_a_rule_names_itself():
    from netlib.builtin.neuron import SigmoidLayer

    class NoRule(SigmoidLayer):
        backward_jvp = Layer.backward_jvp

    register_layer("NoHvpRuleSigmoid")(NoRule)
    net = netlib.Net(text_format.Parse("""
        layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 } }
        layer { name: "mine" type: "NoHvpRuleSigmoid" bottom: "y" top: "s" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "t" top: "loss" }
        """, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    with pytest.raises(HVPError, match="layer 'mine'.*no second-order"):
        net.hvp([numpy.ones((3, 3)), numpy.zeros(3)])




def test_rules_and_hvp_use_the_blob_array_module(on_fake):
    """The rule grid and a whole-net hvp on a CuPy stand-in that refuses NumPy on blob data."""
    for text, shapes in CASES:
        check_hvp(text, bottom_shapes=shapes)
    net = _net("lenet", 2)
    rng = numpy.random.default_rng(0)
    net.blobs["data"].data[...] = on_fake.asarray(rng.normal(size=net.blobs["data"].shape))
    net.blobs["label"].data[...] = on_fake.asarray(rng.integers(0, 10, net.blobs["label"].shape).astype(float))
    v = [rng.normal(size=p.shape) for p in net.learnable_params]
    hv = [backend.to_numpy(h) for h in net.hvp(v, weight_decay=1e-3)]
    num = _fd_hvp(net, v, 1e-3)
    err = max(numpy.abs(a - n).max() for a, n in zip(hv, num)) / max(numpy.abs(n).max() for n in num)
    assert err < 1e-6


def test_solver_hvp_adds_its_regularization(tmp_path):
    """Solver.hvp is the net's hvp plus weight_decay * decay_mult * v (L2); L1 adds nothing."""
    net_text = """
    layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" param { decay_mult: 1 } param { decay_mult: 0 }
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "act" type: "TanH" bottom: "y" top: "y" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """
    (tmp_path / "net.prototxt").write_text(net_text)
    for reg, expect in (("L2", 0.01), ("L1", 0.0)):
        (tmp_path / "solver.prototxt").write_text(
            'net: "%s" base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.01 regularization_type: "%s" max_iter: 1'
            % (tmp_path / "net.prototxt", reg))
        solver = netlib.get_solver(str(tmp_path / "solver.prototxt"))
        rng = numpy.random.default_rng(0)
        solver.net.blobs["x"].data[...] = rng.normal(size=(3, 4))
        solver.net.blobs["t"].data[...] = rng.normal(size=(3, 2))
        v = [rng.normal(size=p.shape).astype(numpy.float32) for p in solver.net.learnable_params]
        with_reg, plain = solver.hvp(v), solver.net.hvp(v)
        numpy.testing.assert_allclose(with_reg[0] - plain[0], expect * v[0], rtol=1e-4, atol=1e-6)
        numpy.testing.assert_allclose(with_reg[1], plain[1], rtol=0, atol=0)  # decay_mult 0
        assert len(solver.gnvp(v)) == 2
