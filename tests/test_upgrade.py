"""Legacy nets and solvers upgrade on load as Caffe's upgrade_proto.cpp does."""
import pytest
from google.protobuf import text_format

import netlib
from netlib.files import read_net_param, read_solver_param
from netlib.proto import caffe_pb2
from conftest import shared_path

V0 = """
name: "v0"
input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 biasterm: false
                 blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 } bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "pool1" bottom: "label" top: "loss" }
"""


def test_v0_net_upgrades_to_current_layers():
    net = read_net_param(V0)
    assert [(l.name, l.type) for l in net.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("pool1", "Pooling"), ("loss", "SoftmaxWithLoss")]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"]                     # the padding layer is folded in
    assert list(conv.convolution_param.pad) == [2] and list(conv.convolution_param.kernel_size) == [3]
    assert not conv.convolution_param.bias_term
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]
    assert not len(net.input) and not len(net.input_dim)


def test_v1_layers_get_type_strings_param_specs_and_transform_param():
    net = read_net_param("""
    layers { name: "d" type: DATA top: "x" data_param { source: "db" batch_size: 4 scale: 0.5 mirror: true } }
    layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" param: "shared" blobs_lr: 1 blobs_lr: 2
             weight_decay: 1 weight_decay: 0 inner_product_param { num_output: 3 } }
    layers { name: "t" type: TANH bottom: "y" top: "y" }
    """)
    d, ip, t = net.layer
    assert (d.type, ip.type, t.type) == ("Data", "InnerProduct", "TanH")
    assert d.transform_param.scale == 0.5 and d.transform_param.mirror
    assert not d.data_param.HasField("scale") and d.data_param.batch_size == 4
    assert [(p.name, p.lr_mult, p.decay_mult) for p in ip.param] == [("shared", 1, 1), ("", 2, 0)]


def test_layer_and_layers_together_is_an_error():
    with pytest.raises(netlib.ConfigError, match="both 'layer' and legacy 'layers'"):
        read_net_param('layer { name: "a" } layers { name: "b" type: RELU }')


def test_old_batchnorm_params_are_frozen():
    net = read_net_param('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } '
                         'param { lr_mult: 1 } }')
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [(0, 0)] * 3


def test_input_without_shape_is_dropped():
    net = read_net_param('input: "data" layer { name: "r" type: "ReLU" bottom: "x" top: "y" }')
    assert len(net.layer) == 1 and not len(net.input)


def test_solver_type_enum_becomes_type_string():
    assert read_solver_param("solver_type: NESTEROV base_lr: 0.1").type == "Nesterov"
    assert read_solver_param("base_lr: 0.1").type == "SGD"
    with pytest.raises(netlib.ConfigError, match="both"):
        read_solver_param('solver_type: ADAM type: "SGD"')


def test_real_v0_and_v1_files_build_the_same_net_as_v2():
    v0 = netlib.Net(shared_path("reference", "models", "legacy_v0_lenet", "lenet.prototxt"), netlib.TEST)
    v1 = netlib.Net(shared_path("reference", "models", "legacy_v1_mnist", "lenet.prototxt"), netlib.TEST)
    v2 = netlib.Net(shared_path("reference", "models", "mnist", "lenet.prototxt"), netlib.TEST)
    shapes = lambda n: [(k, b.shape) for k, b in n.blobs.items()]
    assert [l.type for l in v1.layers] == [l.type for l in v2.layers]
    assert shapes(v1) == shapes(v2)
    assert [l.type for l in v0.layers][1:] == [l.type for l in v2.layers][1:]


def test_bad_v0_field_names_the_layer():
    with pytest.raises(netlib.ConfigError, match="'relu1'.*kernelsize"):
        read_net_param('layers { layer { name: "relu1" type: "relu" kernelsize: 3 } bottom: "x" top: "x" }')


def test_text_format_is_lenient_like_caffe():
    # colon before '{' optional, single quotes, comments
    param = text_format.Parse("name: 'x' # c\nlayer { name: 'a' type: 'ReLU' }", caffe_pb2.NetParameter())
    assert param.layer[0].type == "ReLU"
