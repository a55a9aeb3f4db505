"""Net construction and running: Caffe's Net::Init rules, one by one."""
import os

import numpy
import pytest

import netlib
from netlib.net import filter_net, insert_splits
from netlib.proto import caffe_pb2
from google.protobuf import text_format
from xp_mode import XP, host

IP = 'inner_product_param { num_output: %d weight_filler { type: "gaussian" std: 0.1 } }'


def net_text(body, inputs=("data: 4 6",), force_backward=False):
    """A prototxt with Input layers `name: dims` followed by `body`."""
    out = ["name: 'test'"]
    if force_backward:
        out.append("force_backward: true")
    for spec in inputs:
        name, dims = spec.split(":")
        shape = " ".join("dim: %s" % d for d in dims.split())
        out.append('layer { name: "in_%s" type: "Input" top: "%s" input_param { shape { %s } } }'
                   % (name, name, shape))
    out.append(body)
    return "\n".join(out)


def test_split_layers_get_caffes_names():
    text = net_text("""
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" %s }
    layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }
    layer { name: "a" type: "InnerProduct" bottom: "fc" top: "a" %s }
    layer { name: "b" type: "InnerProduct" bottom: "fc" top: "b" %s }
    layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
    """ % (IP % 5, IP % 3, IP % 3))
    net = netlib.Net(text, netlib.TEST)
    assert net.layer_names == ["in_data", "fc", "relu", "fc_relu_0_split", "a", "b", "sum"]
    assert list(net.blobs) == ["data", "fc", "fc_relu_0_split_0", "fc_relu_0_split_1", "a", "b", "sum"]
    assert net.bottom_names["a"] == ["fc_relu_0_split_0"]
    assert net.bottom_names["b"] == ["fc_relu_0_split_1"]
    assert net.layer_dict["fc_relu_0_split"].type == "Split"


def test_loss_top_consumed_elsewhere_gets_split_with_loss_weight():
    param = text_format.Parse("""
    layer { name: "in" type: "Input" top: "x" }
    layer { name: "l" type: "EuclideanLoss" bottom: "x" bottom: "x" top: "loss" loss_weight: 2 }
    layer { name: "u" type: "ReLU" bottom: "loss" top: "u" }
    """, caffe_pb2.NetParameter())
    out = insert_splits(param)
    assert [l.name for l in out.layer] == ["in", "x_in_0_split", "l", "loss_l_0_split", "u"]
    split = out.layer[3]
    assert list(split.top) == ["loss_l_0_split_0", "loss_l_0_split_1"]
    assert list(split.loss_weight) == [2.0, 0.0]
    assert len(out.layer[2].loss_weight) == 0
    assert out.layer[4].bottom[0] == "loss_l_0_split_1"   # split 0 carries the loss
    # x feeds one layer twice: two consumers -> split
    assert list(out.layer[2].bottom) == ["x_in_0_split_0", "x_in_0_split_1"]


def test_outputs_are_sorted_by_name_and_inputs_are_input_tops():
    text = net_text("""
    layer { name: "z" type: "InnerProduct" bottom: "data" top: "zeta" %s }
    layer { name: "a" type: "InnerProduct" bottom: "data" top: "alpha" %s }
    """ % (IP % 2, IP % 2))
    net = netlib.Net(text, netlib.TEST)
    assert net.outputs == ["alpha", "zeta"]
    assert net.inputs == ["data"]
    out = net.forward(data=numpy.ones((4, 6), numpy.float32))
    assert set(out) == {"alpha", "zeta"} and out["alpha"].shape == (4, 2)


def test_state_rules_filter_layers():
    param = text_format.Parse("""
    state { phase: TRAIN level: 2 stage: "deploy" }
    layer { name: "train" include { phase: TRAIN } }
    layer { name: "test" include { phase: TEST } }
    layer { name: "lvl_ok" include { min_level: 1 max_level: 2 } }
    layer { name: "lvl_no" include { min_level: 3 } }
    layer { name: "stage_ok" include { stage: "deploy" } }
    layer { name: "stage_no" include { stage: "deploy" stage: "other" } }
    layer { name: "not_stage" include { not_stage: "deploy" } }
    layer { name: "excluded" exclude { phase: TRAIN } }
    layer { name: "any_rule" include { phase: TEST } include { stage: "deploy" } }
    layer { name: "plain" }
    """, caffe_pb2.NetParameter())
    kept = [l.name for l in filter_net(param).layer]
    assert kept == ["train", "lvl_ok", "stage_ok", "any_rule", "plain"]


def test_include_and_exclude_together_is_an_error():
    param = text_format.Parse('layer { name: "x" include { phase: TRAIN } exclude { phase: TEST } }',
                              caffe_pb2.NetParameter())
    with pytest.raises(netlib.ConfigError, match="both include and exclude"):
        filter_net(param)


def test_in_place_layers_share_the_blob():
    text = net_text("""
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" %s }
    layer { name: "relu" type: "ReLU" bottom: "fc" top: "fc" }
    """ % (IP % 3))
    net = netlib.Net(text, netlib.TEST)
    assert list(net.blobs) == ["data", "fc"]
    net.blobs["data"].data[...] = numpy.random.default_rng(0).standard_normal((4, 6))
    net.forward()
    assert (net.blobs["fc"].data >= 0).all()


def test_param_sharing_by_name_and_learnable_params():
    text = net_text("""
    layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" lr_mult: 2 }
            param { name: "b" } %s }
    layer { name: "b" type: "InnerProduct" bottom: "data" top: "b" param { name: "w" }
            param { name: "b" decay_mult: 0 } %s }
    """ % (IP % 3, IP % 3))
    net = netlib.Net(text, netlib.TRAIN)
    assert len(net.learnable_params) == 2
    assert net.params_lr == [2.0, 1.0] and net.params_weight_decay == [1.0, 0.0]
    wa, wb = net.params["a"][0], net.params["b"][0]
    wa.data[...] = 3.0
    assert (wb.data == 3.0).all()
    net.blobs["data"].data[...] = 1.0
    out = net.forward()
    numpy.testing.assert_array_equal(host(out["a"]), host(out["b"]))


def test_param_sharing_shape_mismatch_names_layers():
    text = net_text("""
    layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } %s }
    layer { name: "b" type: "InnerProduct" bottom: "data" top: "b" param { name: "w" } %s }
    """ % (IP % 3, IP % 4))
    with pytest.raises(netlib.ShapeError, match="layer 'b'.*shares param 'w'.*layer 'a'.*shapes differ"):
        netlib.Net(text, netlib.TRAIN)


def test_lr_mult_mismatch_in_shared_param_is_an_error():
    text = net_text("""
    layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" lr_mult: 1 } %s }
    layer { name: "b" type: "InnerProduct" bottom: "data" top: "b" param { name: "w" lr_mult: 2 } %s }
    """ % (IP % 3, IP % 3))
    with pytest.raises(netlib.ConfigError, match="different lr_mult"):
        netlib.Net(text, netlib.TRAIN)


def test_backward_need_follows_lr_mult_loss_and_propagate_down():
    text = net_text("""
    layer { name: "frozen" type: "InnerProduct" bottom: "data" top: "f" param { lr_mult: 0 }
            param { lr_mult: 0 } %s }
    layer { name: "fc" type: "InnerProduct" bottom: "f" top: "g" %s }
    layer { name: "side" type: "InnerProduct" bottom: "f" top: "side" %s }
    layer { name: "loss" type: "EuclideanLoss" bottom: "g" bottom: "label" top: "loss"
            propagate_down: true propagate_down: false }
    """ % (IP % 3, IP % 2, IP % 2), inputs=("data: 4 6", "label: 4 2"))
    net = netlib.Net(text, netlib.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["frozen"] is False          # lr_mult 0 and its input needs nothing
    assert need["fc"] is True
    assert need["side"] is False            # does not reach a loss
    assert net.bottom_need_backward[net.layer_names.index("loss")] == [True, False]
    net.blobs["data"].data[...] = 1
    loss = net.forward_backward()
    assert numpy.isfinite(loss) and net.params["fc"][0].diff.any()
    assert not net.blobs["label"].has_diff or not net.blobs["label"].diff.any()


def test_force_backward_reaches_inputs_but_not_labels():
    text = net_text("""
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" %s }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
    """ % (IP % 3), inputs=("data: 4 6", "label: 4"), force_backward=True)
    net = netlib.Net(text, netlib.TRAIN)
    i = net.layer_names.index("loss")
    assert net.bottom_need_backward[i] == [True, False]
    net.blobs["data"].data[...] = numpy.random.default_rng(1).standard_normal((4, 6))
    net.blobs["label"].data[...] = [0, 1, 2, 1]
    net.forward()
    diffs = net.backward()
    assert diffs["data"].shape == (4, 6) and numpy.abs(host(diffs["data"])).sum() > 0


def test_loss_weight_on_a_plain_layer_and_loss_sum():
    text = net_text("""
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" loss_weight: 0.5 %s }
    """ % (IP % 2))
    net = netlib.Net(text, netlib.TRAIN)
    net.blobs["data"].data[...] = 1
    loss = net.forward_prefilled()
    assert loss == pytest.approx(0.5 * float(net.blobs["fc"].data.sum()), rel=1e-5)
    assert net.blob_loss_weights["fc"] == 0.5


def test_legacy_input_dim_becomes_input_layer():
    net = netlib.Net("""
    input: "data" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
    layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }
    """, netlib.TEST)
    assert net.layer_names[0] == "input" and net.layers[0].type == "Input"
    assert net.blobs["data"].shape == (2, 3, 4, 5) and net.inputs == ["data"]


def test_forward_backward_from_to_and_pycaffe_kwargs():
    text = net_text("""
    layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" %s }
    layer { name: "relu" type: "ReLU" bottom: "fc1" top: "r1" }
    layer { name: "fc2" type: "InnerProduct" bottom: "r1" top: "fc2" %s }
    """ % (IP % 5, IP % 2), force_backward=True)
    net = netlib.Net(text, netlib.TEST)
    x = numpy.random.default_rng(2).standard_normal((4, 6)).astype(numpy.float32)
    out = net.forward(data=x, end="fc1")
    assert set(out) == {"fc1"}
    w, b = host(net.params["fc1"][0].data), host(net.params["fc1"][1].data)
    numpy.testing.assert_allclose(host(out["fc1"]), x @ w.T + b, rtol=1e-5)
    full = net.forward(data=x)
    assert set(full) == {"fc2"}
    grads = net.backward(fc2=numpy.ones((4, 2), numpy.float32))
    assert grads["data"].shape == (4, 6)
    with pytest.raises(netlib.ConfigError, match="do not match the net inputs"):
        net.forward(wrong=x)
    with pytest.raises(netlib.ShapeError, match="batch size"):
        net.forward(data=numpy.ones((3, 6), numpy.float32))


def test_save_and_copy_from_roundtrip_binary_and_hdf5(tmp_path):
    text = net_text("""
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" %s }
    """ % (IP % 3))
    a = netlib.Net(text, netlib.TEST)
    a.save(str(tmp_path / "w.caffemodel"))
    a.save_hdf5(str(tmp_path / "w.caffemodel.h5"))
    for path in ("w.caffemodel", "w.caffemodel.h5"):
        b = netlib.Net(text, netlib.TEST)
        b.copy_from(str(tmp_path / path))
        for pa, pb in zip(a.params["fc"], b.params["fc"]):
            numpy.testing.assert_array_equal(host(pa.data), host(pb.data))
    c = netlib.Net(text, str(tmp_path / "w.caffemodel"), netlib.TEST)
    numpy.testing.assert_array_equal(host(c.params["fc"][0].data), host(a.params["fc"][0].data))
    import h5py
    with h5py.File(tmp_path / "w.caffemodel.h5", "r") as f:
        assert sorted(f["data"]) == ["fc", "in_data"] and sorted(f["data/fc"]) == ["0", "1"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_share_trained_layers_with():
    text = net_text("layer { name: 'fc' type: 'InnerProduct' bottom: 'data' top: 'fc' %s }" % (IP % 3))
    a, b = netlib.Net(text, netlib.TRAIN), netlib.Net(text, netlib.TEST)
    b.share_trained_layers_with(a)
    a.params["fc"][0].data[...] = 7
    assert (b.params["fc"][0].data == 7).all()


# -- bad input: every error is typed and names what is wrong --------------------
def test_malformed_prototxt_names_file_line_column(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  typo_field: 3\n}\n')
    with pytest.raises(netlib.ParseError) as err:
        netlib.Net(str(path), netlib.TEST)
    assert str(err.value).startswith("%s:4:" % path) and "typo_field" in str(err.value)
    assert err.value.line == 4


def test_unknown_layer_type_suggests_close_names():
    with pytest.raises(netlib.UnknownLayerTypeError) as err:
        netlib.Net(net_text('layer { name: "c" type: "Convolutoin" bottom: "data" top: "c" }'), netlib.TEST)
    assert "'Convolutoin'" in str(err.value) and "'Convolution'" in str(err.value)
    assert "layer 'c'" in str(err.value)


def test_unknown_bottom_is_named():
    with pytest.raises(netlib.ConfigError, match="layer 'r'.*unknown bottom blob 'nothere'"):
        netlib.Net(net_text('layer { name: "r" type: "ReLU" bottom: "nothere" top: "r" }'), netlib.TEST)


def test_top_produced_twice_is_an_error():
    text = net_text("""
    layer { name: "r1" type: "ReLU" bottom: "data" top: "y" }
    layer { name: "r2" type: "ReLU" bottom: "data" top: "y" }
    """)
    with pytest.raises(netlib.ConfigError, match="top blob 'y' is produced by more than one layer"):
        netlib.Net(text, netlib.TEST)


def test_wrong_number_of_bottoms_names_the_layer():
    text = net_text('layer { name: "r" type: "ReLU" bottom: "data" bottom: "data" top: "r" }')
    with pytest.raises(netlib.LayerError, match=r"layer 'r' \(type ReLU\).*exactly 1 bottom"):
        netlib.Net(text, netlib.TEST)


@pytest.mark.parametrize("body,pattern", [
    ('layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "c" }', "cat"),
    ('layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "c" }', "sum"),
    ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "a" bottom: "b" top: "c" }', "loss"),
    ('layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "c" }', "loss"),
])
def test_mismatched_shapes_name_layer_and_shapes(body, pattern):
    text = net_text(body, inputs=("a: 2 3 4", "b: 2 5 3"))
    with pytest.raises(netlib.ShapeError) as err:
        netlib.Net(text, netlib.TRAIN)
    message = str(err.value)
    assert "'%s'" % pattern in message and "(2, 3, 4)" in message and "(2, 5, 3)" in message


@pytest.mark.parametrize("body,field", [
    ('layer { name: "conv" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 2 } }',
     "kernel"),
    ('layer { name: "clip" type: "Clip" bottom: "x" top: "y" clip_param { min: 0 } }', "max"),
    ('layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" }', "num_output"),
])
def test_missing_required_field_is_named(body, field):
    with pytest.raises(netlib.NetlibError) as err:
        netlib.Net(net_text(body, inputs=("x: 1 2 5 5",)), netlib.TEST)
    assert field in str(err.value)


def test_missing_net_file_is_a_typed_error():
    with pytest.raises(netlib.NetlibError, match="no such"):
        netlib.Net("/nonexistent/net.prototxt", netlib.TEST)
    with pytest.raises(FileNotFoundError):
        netlib.Net("/nonexistent/net.prototxt", netlib.TEST)


def test_weights_for_a_different_net_name_the_layer(tmp_path):
    a = netlib.Net(net_text("layer { name: 'fc' type: 'InnerProduct' bottom: 'data' top: 'fc' %s }" % (IP % 3)),
                   netlib.TEST)
    a.save(str(tmp_path / "a.caffemodel"))
    a.save_hdf5(str(tmp_path / "a.caffemodel.h5"))
    b = netlib.Net(net_text("layer { name: 'fc' type: 'InnerProduct' bottom: 'data' top: 'fc' %s }" % (IP % 4)),
                   netlib.TEST)
    for name in ("a.caffemodel", "a.caffemodel.h5"):
        with pytest.raises(netlib.WeightsError, match="layer 'fc'.*shape"):
            b.copy_from(str(tmp_path / name))


def test_truncated_weights_are_a_clear_error(tmp_path):
    a = netlib.Net(net_text("layer { name: 'fc' type: 'InnerProduct' bottom: 'data' top: 'fc' %s }" % (IP % 3)),
                   netlib.TEST)
    a.save(str(tmp_path / "a.caffemodel"))
    data = (tmp_path / "a.caffemodel").read_bytes()
    (tmp_path / "t.caffemodel").write_bytes(data[: len(data) // 2])
    with pytest.raises(netlib.WeightsError, match="truncated or corrupt"):
        a.copy_from(str(tmp_path / "t.caffemodel"))


def test_forward_all_and_forward_backward_all_pad_and_strip():
    """pycaffe's forward_all / forward_backward_all: batches of the net's
    batch size, a zero-padded last batch, outputs for every item."""
    net = netlib.Net('name: "fa" force_backward: true layer { name: "x" type: "Input" top: "x" input_param { '
                     'shape { dim: 4 dim: 3 } } } layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                     'inner_product_param { num_output: 2 weight_filler { type: "gaussian" } '
                     'bias_filler { type: "constant" value: 0.5 } } }', netlib.TEST)
    w, b = host(net.params["ip"][0].data).copy(), host(net.params["ip"][1].data).copy()
    x = numpy.random.default_rng(0).normal(size=(10, 3)).astype(numpy.float32)
    out = net.forward_all(x=x)
    assert set(out) == {"y"} and out["y"].shape == (10, 2)
    numpy.testing.assert_allclose(out["y"], x @ w.T + b, rtol=1e-5, atol=1e-6)
    dy = numpy.ones((10, 2), numpy.float32)
    fwd, bwd = net.forward_backward_all(x=x, y=dy)
    numpy.testing.assert_allclose(fwd["y"], out["y"])
    assert bwd["x"].shape == (10, 3)
    numpy.testing.assert_allclose(bwd["x"], dy @ w, rtol=1e-5, atol=1e-6)
    with pytest.raises(netlib.ConfigError):
        net.forward_all()


def test_forward_and_backward_hooks_see_every_layer_in_order():
    net = netlib.Net('name: "h" force_backward: true layer { name: "x" type: "Input" top: "x" input_param { '
                     'shape { dim: 2 dim: 3 } } } layer { name: "r" type: "ReLU" bottom: "x" top: "r" } '
                     'layer { name: "s" type: "Sigmoid" bottom: "r" top: "s" }', netlib.TEST)
    seen = []
    net.before_forward(lambda i: seen.append(("bf", i)))
    net.after_forward(lambda i: seen.append(("af", i)))
    net.before_backward(lambda i: seen.append(("bb", i)))
    net.after_backward(lambda i: seen.append(("ab", i)))
    net.forward(x=numpy.ones((2, 3), numpy.float32))
    net.backward()
    assert seen == [("bf", 0), ("af", 0), ("bf", 1), ("af", 1), ("bf", 2), ("af", 2),
                    ("bb", 2), ("ab", 2), ("bb", 1), ("ab", 1), ("bb", 0), ("ab", 0)]
    with pytest.raises(TypeError):
        net.before_forward(3)
