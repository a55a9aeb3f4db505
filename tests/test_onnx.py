"""ONNX export (netlib.onnx_export, Net.to_onnx, ``netlib export-onnx``):
every exported layer and zoo net runs in onnxruntime and matches netlib's
forward to a relative 1e-4; onnx.checker accepts every model."""
import os

import numpy
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from netlib.errors import ConfigError, NetlibError  # noqa: E402
from netlib.files import read_net_param  # noqa: E402
from netlib.net import Net  # noqa: E402
from netlib.onnx_export import OnnxExportError, export_onnx  # noqa: E402
from netlib.tools import cli  # noqa: E402

SHARED = os.environ.get("NETLIB_SHARED", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared"))
MODELS = os.path.join(SHARED, "reference", "models")
RTOL = 1e-4


def randomize(net, seed=0):
    """Random weights that keep activations O(1): N(0, 1/fan_in); BatchNorm
    gets a random mean, a positive variance and a scale factor != 1."""
    rng = numpy.random.RandomState(seed)
    for layer in net.layers:
        t = layer.layer_param.type
        for k, blob in enumerate(layer.blobs):
            shape = blob.data.shape
            if t == "BatchNorm":
                val = {0: rng.randn(*shape) * 0.5, 1: rng.uniform(0.5, 2.0, shape), 2: numpy.full(shape, 2.0)}[k]
            elif t in ("Scale", "PReLU", "Normalize") and k == 0:
                val = rng.uniform(0.5, 1.5, shape)
            else:
                fan_in = max(1, int(numpy.prod(shape[1:]))) if len(shape) > 1 else 1
                val = rng.randn(*shape) * (1.0 / numpy.sqrt(fan_in))
            blob.data[...] = val


def compare(net, seed=1, low=-1.0, high=1.0, opset=13):
    """Export ``net``, run it in onnxruntime on random inputs; returns the
    largest relative error over the outputs (asserted <= RTOL)."""
    rng = numpy.random.RandomState(seed)
    feeds = {}
    for name in net.inputs:
        arr = rng.uniform(low, high, net.blobs[name].data.shape).astype(numpy.float32)
        net.blobs[name].data[...] = arr
        feeds[name] = arr
    ref = {k: numpy.array(v) for k, v in net.forward().items()}
    model = export_onnx(net, opset=opset)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert sorted(names) == sorted(net.outputs)
    worst = 0.0
    for name, got in zip(names, sess.run(None, feeds)):
        want = ref[name]
        assert got.shape == want.shape, name
        err = float(numpy.abs(got - want).max() / max(float(numpy.abs(want).max()), 1e-6))
        assert err <= RTOL, "%s: relative error %g" % (name, err)
        worst = max(worst, err)
    return worst


def net_of(body, shape=(2, 3, 7, 7), extra_inputs=()):
    dims = "".join(" dim: %d" % d for d in shape)
    text = 'name: "t"\nlayer { name: "data" type: "Input" top: "data" input_param { shape {%s } } }\n' % dims
    for name, shp in extra_inputs:
        text += 'layer { name: "%s" type: "Input" top: "%s" input_param { shape {%s } } }\n' % (
            name, name, "".join(" dim: %d" % d for d in shp))
    net = Net(text + body, "TEST")
    randomize(net)
    return net


def L(type_, params="", bottom="data", top="out", name="l"):
    bottoms = "".join(' bottom: "%s"' % b for b in bottom.split(","))
    tops = "".join(' top: "%s"' % t for t in top.split(","))
    return 'layer { name: "%s" type: "%s"%s%s %s }\n' % (name, type_, bottoms, tops, params)


CONV = 'convolution_param { num_output: 4 kernel_size: 3 %s }'
LAYERS = {
    "conv": L("Convolution", CONV % ""),
    "conv_pad_stride": L("Convolution", CONV % "pad: 1 stride: 2"),
    "conv_hw": L("Convolution", 'convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 '
                                'stride_h: 2 stride_w: 1 }'),
    "conv_group_dilation_nobias": L("Convolution", 'convolution_param { num_output: 6 kernel_size: 3 group: 3 '
                                                   'dilation: 2 pad: 2 bias_term: false }'),
    "deconv": L("Deconvolution", CONV % "stride: 2 pad: 1"),
    "deconv_group": L("Deconvolution", 'convolution_param { num_output: 6 kernel_size: 4 stride: 2 group: 3 }'),
    "ip": L("InnerProduct", "inner_product_param { num_output: 5 }"),
    "ip_transpose": L("InnerProduct", "inner_product_param { num_output: 5 transpose: true }"),
    "ip_axis2": L("InnerProduct", "inner_product_param { num_output: 5 axis: 2 }"),
    "relu": L("ReLU", ""),
    "relu_leaky": L("ReLU", "relu_param { negative_slope: 0.1 }"),
    "prelu": L("PReLU", ""),
    "prelu_shared": L("PReLU", "prelu_param { channel_shared: true }"),
    "elu": L("ELU", "elu_param { alpha: 0.7 }"),
    "sigmoid": L("Sigmoid"),
    "tanh": L("TanH"),
    "absval": L("AbsVal"),
    "bnll": L("BNLL"),
    "swish": L("Swish", "swish_param { beta: 1.5 }"),
    "clip": L("Clip", "clip_param { min: -0.3 max: 0.4 }"),
    "threshold": L("Threshold", "threshold_param { threshold: 0.2 }"),
    "dropout": L("Dropout", "dropout_param { dropout_ratio: 0.3 }"),
    "lrn": L("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }"),
    "lrn_within": L("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
    "batchnorm_scale": L("BatchNorm", "", top="bn", name="bn") + L("Scale", "scale_param { bias_term: true }",
                                                                      bottom="bn", name="sc"),
    "batchnorm_inplace": L("BatchNorm", "batch_norm_param { eps: 0.001 }", top="data", name="bn")
                         + L("Scale", "", name="sc"),
    "scale_axes": L("Scale", "scale_param { axis: 1 num_axes: 2 }"),
    "bias": L("Bias", ""),
    "eltwise_sum_coeff": L("ReLU", "", top="a", name="r") + L("Eltwise", "eltwise_param { coeff: 0.5 coeff: -2 }",
                                                               bottom="data,a"),
    "eltwise_prod": L("Sigmoid", "", top="a", name="s") + L("Eltwise", "eltwise_param { operation: PROD }",
                                                             bottom="data,a"),
    "eltwise_max": L("TanH", "", top="a", name="s") + L("Eltwise", "eltwise_param { operation: MAX }",
                                                         bottom="data,a"),
    "concat": L("ReLU", "", top="a", name="r") + L("Concat", "", bottom="data,a"),
    "concat_axis3": L("ReLU", "", top="a", name="r") + L("Concat", "concat_param { axis: 3 }", bottom="data,a"),
    "slice": L("Slice", "slice_param { slice_point: 1 }", top="a,b"),
    "slice_points": L("Slice", "slice_param { axis: 3 slice_point: 2 slice_point: 5 }", top="a,b,c"),
    "slice_even": L("Slice", "slice_param { axis: 0 }", top="a,b"),
    "split": L("Split", "", top="a,b") + L("Eltwise", "", bottom="a,b", name="e"),
    "silence": L("Split", "", top="a,out") + 'layer { name: "si" type: "Silence" bottom: "a" }\n',
    "flatten": L("Flatten", ""),
    "flatten_axes": L("Flatten", "flatten_param { axis: 2 end_axis: 3 }"),
    "reshape": L("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 7 } }"),
    "softmax": L("Softmax", ""),
    "softmax_axis2": L("Softmax", "softmax_param { axis: 2 }"),
    "crop": L("Convolution", CONV % "", top="small", name="c") + L("Crop", "crop_param { offset: 1 }",
                                                                      bottom="data,small"),
    "argmax": L("ArgMax", "argmax_param { top_k: 1 }"),
    "argmax_axis": L("ArgMax", "argmax_param { axis: 1 }"),
    "argmax_maxval": L("ArgMax", "argmax_param { top_k: 2 out_max_val: true }"),
    "reduction_sum": L("Reduction", "reduction_param { axis: 1 coeff: 2 }"),
    "reduction_asum": L("Reduction", "reduction_param { operation: ASUM axis: 2 }"),
    "reduction_sumsq": L("Reduction", "reduction_param { operation: SUMSQ axis: 1 }"),
    "reduction_mean_all": L("Reduction", "reduction_param { operation: MEAN }"),
    "tile": L("Tile", "tile_param { axis: 1 tiles: 3 }"),
    "mvn": L("MVN", ""),
    "mvn_across": L("MVN", "mvn_param { across_channels: true }"),
    "mvn_mean_only": L("MVN", "mvn_param { normalize_variance: false }"),
    "normalize": L("Normalize", "norm_param { across_spatial: false channel_shared: false }"),
    "normalize_spatial": L("Normalize", ""),
    "permute": L("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }"),
}
POSITIVE = {
    "power": L("Power", "power_param { power: 1.5 scale: 2 shift: 0.5 }"),
    "power_square": L("Power", "power_param { power: 2 }"),
    "exp": L("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }"),
    "exp_e": L("Exp", ""),
    "log": L("Log", "log_param { base: 10 scale: 2 shift: 0.5 }"),
    "log_e": L("Log", ""),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_layer(case):
    compare(net_of(LAYERS[case]))


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_positive_input_layer(case):
    compare(net_of(POSITIVE[case]), low=0.5, high=2.0)


def test_scale_and_bias_from_a_second_bottom():
    body = (L("Scale", "scale_param { axis: 0 }", bottom="data,s", top="a", name="sc")
            + L("Bias", "bias_param { axis: 0 }", bottom="a,b", name="bi"))
    compare(net_of(body, extra_inputs=[("s", (2, 3)), ("b", (2, 3))]))


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("size,pad", [(6, 0), (8, 0), (13, 0), (27, 0), (6, 1), (8, 1), (7, 1), (13, 1)])
def test_pooling_caffe_ceil(pool, size, pad):
    """CaffeNet's 3x3/2 pooling where Caffe's ceil output differs from floor
    (even sizes), with and without pad (the window clipped at the end)."""
    net = net_of(L("Pooling", "pooling_param { pool: %s kernel_size: 3 stride: 2 pad: %d }" % (pool, pad)),
                 shape=(1, 2, size, size))
    H = size + 2 * pad - 3
    assert net.blobs["out"].shape[2] == -(-H // 2) + 1 - (1 if pad and (-(-H // 2)) * 2 >= size + pad else 0)
    compare(net)


@pytest.mark.parametrize("params", ["pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0",
                                    "pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0",
                                    "pool: AVE kernel_size: 2 stride: 2 pad: 1",
                                    "pool: MAX global_pooling: true", "pool: AVE global_pooling: true"])
def test_pooling_variants(params):
    compare(net_of(L("Pooling", "pooling_param { %s }" % params), shape=(2, 3, 7, 8)))


def test_unsupported_layers_are_named():
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "lbl" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
            'layer { name: "myloss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }\n')
    net = Net(text, "TEST")
    with pytest.raises(OnnxExportError, match=r"layer 'myloss' \(type SoftmaxWithLoss\)") as info:
        export_onnx(net)
    assert isinstance(info.value, (ConfigError, NetlibError))


def test_missing_onnx_is_a_config_error(monkeypatch):
    import sys
    net = net_of(L("ReLU"))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ConfigError, match="pip install onnx"):
        export_onnx(net)


def test_to_onnx_writes_a_file(tmp_path):
    net = net_of(L("Convolution", CONV % "") + L("ReLU", "", bottom="out", top="out", name="r"))
    path = tmp_path / "n.onnx"
    net.to_onnx(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["data"]
    assert [o.name for o in model.graph.output] == ["out"]


# -- zoo nets -----------------------------------------------------------------------
ZOO = {
    # name: (prototxt, trained weights or None, batch)
    "lenet": ("lenet_trained/lenet.prototxt", "lenet_trained/lenet_iter_10000.caffemodel", 4),
    "cifar10_quick": ("cifar10/cifar10_quick.prototxt",
                      "cifar10_quick_trained_binaryproto/cifar10_quick_iter_5000.caffemodel", 2),
    "caffenet": ("bvlc_reference_caffenet/deploy.prototxt", None, 1),
    "googlenet": ("bvlc_googlenet/deploy.prototxt", None, 1),
    "resnet50": ("resnet_50/ResNet-50-deploy.prototxt", None, 1),
    "squeezenet_v1.1": ("squeezenet_v1.1/deploy.prototxt", None, 1),
    "mobilenet_v1": ("mobilenet_v1/mobilenet_deploy.prototxt", None, 1),
    "vgg16": ("vgg16_19/VGG_ILSVRC_16_layers_deploy.prototxt", None, 1),
}


def _zoo_net(name):
    rel, weights, batch = ZOO[name]
    path = os.path.join(MODELS, rel)
    if not os.path.isfile(path):
        pytest.skip("%s not found" % path)
    param = read_net_param(path)
    if not weights and param.layer[-1].type == "Softmax":
        del param.layer[-1]  # random weights: compare the logits (probabilities may saturate)
    net = Net(param, "TEST")
    for inp in net.inputs:
        shape = list(net.blobs[inp].data.shape)
        net.blobs[inp].reshape(*([batch] + shape[1:]))
    net.reshape()
    if weights and os.path.isfile(os.path.join(MODELS, weights)):
        net.copy_from(os.path.join(MODELS, weights))
    else:
        randomize(net)
    return net


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_net(name):
    net = _zoo_net(name)
    worst = compare(net, low=0.0, high=1.0)
    assert worst <= RTOL


def test_cli_export_onnx(tmp_path, capsys):
    rel, weights, _ = ZOO["lenet"]
    model, w = os.path.join(MODELS, rel), os.path.join(MODELS, weights)
    if not os.path.isfile(w):
        pytest.skip("LeNet weights not found")
    out = tmp_path / "lenet.onnx"
    assert cli.main(["export-onnx", model, w, str(out)]) == 0
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    net = Net(model, "TEST", weights=w)
    x = numpy.random.RandomState(0).rand(*net.blobs["data"].data.shape).astype(numpy.float32)
    net.blobs["data"].data[...] = x
    want = net.forward()["prob"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["prob"], {"data": x})[0]
    numpy.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_cli_export_onnx_python_layer_is_one_error_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "onnx_identity_layer.py").write_text(
        "import caffe\n\n\nclass Identity(caffe.Layer):\n"
        "    def setup(self, bottom, top):\n        pass\n\n"
        "    def reshape(self, bottom, top):\n        top[0].reshape(*bottom[0].data.shape)\n\n"
        "    def forward(self, bottom, top):\n        top[0].data[...] = bottom[0].data\n")
    model = tmp_path / "py.prototxt"
    model.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
                     'layer { name: "mine" type: "Python" bottom: "data" top: "out" '
                     'python_param { module: "onnx_identity_layer" layer: "Identity" } }\n')
    monkeypatch.chdir(tmp_path)
    code = cli.main(["export-onnx", str(model), "-", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["netlib: error: layer 'mine' (type Python): cannot export to ONNX: "
                   "a Python layer runs arbitrary Python code and has no ONNX form"]
    assert not (tmp_path / "o.onnx").exists()


def test_ave_pooling_divisor_correction_is_in_the_graph():
    """6x6, 3x3/2: the last window runs past the image (ceil rule), Caffe
    divides it by 6, not 9; the graph carries that correction."""
    net = net_of(L("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }"), shape=(1, 1, 6, 6))
    ops = [n.op_type for n in export_onnx(net).graph.node]
    assert ops[:2] == ["AveragePool", "Mul"]
    compare(net)


def test_legacy_input_fields():
    net = Net('name: "legacy"\ninput: "data"\ninput_dim: 2\ninput_dim: 3\ninput_dim: 5\ninput_dim: 5\n'
              + L("Convolution", CONV % "pad: 1") + L("ReLU", "", bottom="out", top="out", name="r"), "TEST")
    randomize(net)
    compare(net)


@pytest.mark.parametrize("opset", [13, 17])
def test_opsets(opset):
    net = net_of(L("Reduction", "reduction_param { operation: SUMSQ axis: 1 }", top="a", name="r")
                 + L("MVN", "", top="b", name="m") + L("Normalize", "", bottom="b", name="n"))
    compare(net, opset=opset)


def test_opset_out_of_range():
    with pytest.raises(ConfigError, match="opsets 13 to 17"):
        export_onnx(net_of(L("ReLU")), opset=11)


@pytest.mark.parametrize("body,fragment", [
    (L("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }", name="sp"),
     r"layer 'sp' \(type Pooling\).*STOCHASTIC"),
    (L("BatchNorm", "batch_norm_param { use_global_stats: false }", name="bn"),
     r"layer 'bn' \(type BatchNorm\).*use_global_stats"),
    (L("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }", top="out,mask", name="pm"),
     r"layer 'pm' \(type Pooling\).*mask"),
])
def test_layer_options_without_an_onnx_form(body, fragment):
    with pytest.raises(OnnxExportError, match=fragment):
        export_onnx(net_of(body))
