"""Forward mode and Hessian-vector products on blocks of real zoo nets: the
first residual block of ResNet-50 (res2a: the projection branch and the
1x1-3x3-1x1 bottleneck, each convolution followed by in-place BatchNorm and
Scale, the Eltwise sum and ReLU) and GoogLeNet's inception_3a module (four
branches, Concat), taken layer by layer from the zoo prototxts with an Input
in place of what feeds them.  Net.jvp against centred differences of the
forward, Net.hvp (with a Euclidean loss on the block's output) against
centred differences of the gradient, float64."""
import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib import backend
from netlib.proto import caffe_pb2

from conftest import shared_path


def _block(path, keep, source, shape, phase, batch_stats=False, loss=None):
    """The zoo layers whose names ``keep`` accepts, on an Input ``source`` of
    ``shape``; with ``loss`` (the output's shape) a Euclidean loss against a
    random target."""
    full = caffe_pb2.NetParameter()
    with open(path) as f:
        text_format.Parse(f.read(), full)
    param = caffe_pb2.NetParameter(name="block")
    inp = param.layer.add(name="input", type="Input", top=[source])
    inp.input_param.shape.add(dim=list(shape))
    layers = [l for l in full.layer if keep(l.name)]
    assert layers, path
    for layer in layers:
        new = param.layer.add()
        new.CopyFrom(layer)
        if batch_stats and new.type == "BatchNorm":
            new.batch_norm_param.ClearField("use_global_stats")
    out = layers[-1].top[0]
    if loss:
        t = param.layer.add(name="target", type="Input", top=["target"])
        t.input_param.shape.add(dim=list(loss))
        param.layer.add(name="loss", type="EuclideanLoss", bottom=[out, "target"], top=["loss"])
    net = netlib.Net(param, phase, dtype=numpy.float64)
    rng = numpy.random.default_rng(7)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            c = blobs[0].shape[0]
            blobs[0].data[...] = rng.normal(scale=0.3, size=c)
            blobs[1].data[...] = rng.uniform(0.5, 2.0, size=c)
            blobs[2].data[...] = 1
            continue
        for b in blobs:
            fan_in = max(int(numpy.prod(b.shape[1:])), 1) if len(b.shape) > 1 else 1
            b.data[...] = rng.normal(size=b.shape) / numpy.sqrt(fan_in) + (1.0 if layer.type == "Scale" and
                                                                            b is blobs[0] else 0.0)
    net.blobs[source].data[...] = rng.normal(size=shape)
    if loss:
        net.blobs["target"].data[...] = rng.normal(size=net.blobs["target"].shape)
    return net, out, rng


def _resnet(phase, batch_stats=False, loss=None):
    path = shared_path("reference", "models", "resnet_50", "ResNet-50-deploy.prototxt")
    return _block(path, lambda n: n.startswith(("res2a", "bn2a", "scale2a")), "pool1", (2, 64, 6, 6), phase,
                  batch_stats, loss)


def _inception(phase):
    path = shared_path("reference", "models", "bvlc_googlenet", "deploy.prototxt")
    return _block(path, lambda n: n.startswith("inception_3a/"), "pool2/3x3_s2", (2, 192, 5, 5), phase)


def _check_jvp(net, out, rng, source, param_keys, h=1e-7):
    x = backend.to_numpy(net.blobs[source].data).copy()
    dx = rng.normal(size=x.shape)
    tangents = {source: dx}
    base = {}
    for key in param_keys:
        p = net.params[key[0]][key[1]]
        tangents[key] = rng.normal(size=p.shape)
        base[key] = backend.to_numpy(p.data).copy()
    got = backend.to_numpy(net.jvp(tangents)[out])

    def run(eps):
        net.blobs[source].data[...] = x + eps * dx
        for key, b in base.items():
            net.params[key[0]][key[1]].data[...] = b + eps * tangents[key]
        net.forward()
        return backend.to_numpy(net.blobs[out].data).copy()

    plus, minus = run(h), run(-h)
    run(0.0)
    num = (plus - minus) / (2 * h)
    return numpy.abs(got - num).max() / numpy.abs(num).max()


@pytest.mark.parametrize("batch_stats", [False, True], ids=["global-stats", "batch-stats"])
def test_resnet50_block_jvp(batch_stats):
    net, out, rng = _resnet(caffe_pb2.TRAIN if batch_stats else caffe_pb2.TEST, batch_stats)
    assert out == "res2a" and [l.type for l in net.layers].count("BatchNorm") == 4
    keys = [("res2a_branch2b", 0), ("scale2a_branch2a", 0), ("scale2a_branch1", 1), ("res2a_branch1", 0)]
    err = _check_jvp(net, out, rng, "pool1", keys)
    assert err < 1e-6, err  # measured: about 3e-10


def test_googlenet_inception_module_jvp():
    net, out, rng = _inception(caffe_pb2.TEST)
    assert out == "inception_3a/output" and net.blobs[out].shape[1] == 256
    keys = [("inception_3a/3x3", 0), ("inception_3a/5x5_reduce", 1), ("inception_3a/pool_proj", 0),
            ("inception_3a/1x1", 0)]
    err = _check_jvp(net, out, rng, "pool2/3x3_s2", keys)
    assert err < 1e-6, err  # measured: about 3e-10


def test_resnet50_block_hvp_with_batch_statistics():
    """In-place BatchNorm (batch statistics) + Scale + ReLU chains, a projection shortcut, Eltwise SUM."""
    net, out, rng = _resnet(caffe_pb2.TRAIN, batch_stats=True, loss=(2, 256, 6, 6))
    params = net.learnable_params
    v = [rng.normal(size=p.shape) for p in params]
    net.forward()
    hv = [backend.to_numpy(a) for a in net.hvp(v)]
    base = [backend.to_numpy(p.data).copy() for p in params]

    def grad(eps):
        for p, b, d in zip(params, base, v):
            p.data[...] = b + eps * d
        net.clear_param_diffs()
        net.forward_backward()
        return [backend.to_numpy(p.diff).copy() for p in params]

    h = 1e-7
    plus, minus = grad(h), grad(-h)
    num = [(a - b) / (2 * h) for a, b in zip(plus, minus)]
    err = max(numpy.abs(a - n).max() for a, n in zip(hv, num)) / max(numpy.abs(n).max() for n in num)
    assert err < 1e-5, err
