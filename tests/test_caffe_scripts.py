"""BVLC Caffe's own Python scripts, unchanged, taken from the Caffe source archive
in ../shared/reference: they say ``import caffe`` and run under ``netlib run``
(and, for the Python-layer module, under ``netlib train``).

* python/classify.py: Classifier on a trained CIFAR-10 net, oversampled and
  centre-only, equal to real pycaffe's Classifier.predict for the same
  settings (tests/golden/pycaffe_io/net.npz);
* python/draw_net.py: DOT text of a net;
* examples/pycaffe/caffenet.py: NetSpec writes CaffeNet's train/test nets,
  which build in netlib with real Caffe's blob shapes;
* examples/pycaffe/layers/pyloss.py with examples/pycaffe/linreg.prototxt:
  Caffe's EuclideanLossLayer trains the linear-regression example.
"""
import os
import re
import tarfile

import numpy
import pytest

import netlib
from conftest import ROOT, shared_path
from netlib.tools import cli

MEMBERS = ["python/classify.py", "python/draw_net.py", "examples/pycaffe/caffenet.py",
           "examples/pycaffe/layers/pyloss.py", "examples/pycaffe/linreg.prototxt"]


@pytest.fixture(scope="module")
def caffe_src(tmp_path_factory):
    """The scripts, extracted from the Caffe source archive (nothing else)."""
    archive = shared_path("reference", "bvlc-caffe-9b89154.tar.gz")
    out = tmp_path_factory.mktemp("caffe_src")
    with tarfile.open(archive) as tar:
        for name in MEMBERS:
            member = tar.getmember("caffe/" + name)
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return out


def test_classify_py(caffe_src, tmp_path, capsys):
    models = shared_path("reference", "models")
    golden = numpy.load(os.path.join(ROOT, "tests", "golden", "pycaffe_io", "net.npz"))
    mean = numpy.load(os.path.join(models, "ilsvrc12", "ilsvrc_2012_mean.npy")).mean(1).mean(1)
    numpy.save(tmp_path / "mu.npy", mean)
    net_dir = os.path.join(models, "cifar10_full_trained_binaryproto")
    common = [str(caffe_src / "python" / "classify.py"), shared_path("data", "images", "cat.jpg"),
              "--model_def", os.path.join(net_dir, "cifar10_full.prototxt"),
              "--pretrained_model", os.path.join(net_dir, "cifar10_full_iter_70000.caffemodel"),
              "--images_dim", "40,40", "--mean_file", str(tmp_path / "mu.npy")]
    assert cli.main(["run"] + common[:2] + [str(tmp_path / "over.npy")] + common[2:]) == 0
    assert cli.main(["run"] + common[:2] + [str(tmp_path / "center.npy")] + common[2:] + ["--center_only"]) == 0
    out = capsys.readouterr().out
    assert "CPU mode" in out and "Classifying 1 inputs." in out
    numpy.testing.assert_allclose(numpy.load(tmp_path / "over.npy"), golden["clf_over"][:1], atol=2e-6)
    numpy.testing.assert_allclose(numpy.load(tmp_path / "center.npy"), golden["clf_center"][:1], atol=2e-6)


def test_draw_net_py(caffe_src, tmp_path, capsys):
    lenet = shared_path("reference", "models", "mnist", "lenet_train_test.prototxt")
    out = tmp_path / "lenet.dot"
    assert cli.main(["run", str(caffe_src / "python" / "draw_net.py"), lenet, str(out),
                     "--rankdir", "TB", "--phase", "TEST"]) == 0
    dot = out.read_text()
    assert dot.startswith("digraph") and "rankdir=TB" in dot
    for layer in ("conv1", "pool1", "ip2", "accuracy", "loss"):
        assert re.search(r'\b%s\b' % layer, dot), layer
    assert "Drawing net to %s" % out in capsys.readouterr().out


def test_caffenet_py_netspec(caffe_src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(caffe_src / "examples" / "pycaffe" / "caffenet.py")]) == 0
    train = netlib.files.read_net_param(str(tmp_path / "train.prototxt"))
    test = netlib.files.read_net_param(str(tmp_path / "test.prototxt"))
    assert [l.type for l in train.layer][:3] == ["Data", "Convolution", "ReLU"]
    assert train.layer[0].data_param.source == "/path/to/caffe-train-lmdb"
    assert "Accuracy" in [l.type for l in test.layer] and "Accuracy" not in [l.type for l in train.layer]
    # Its nets build: feed the data tops from DummyData of the Data layer's shapes.
    deploy = netlib.caffe_pb2.NetParameter()
    deploy.CopyFrom(train)
    data = deploy.layer[0]
    data.ClearField("data_param")
    data.ClearField("transform_param")
    data.type = "DummyData"
    data.dummy_data_param.shape.add(dim=[2, 3, 227, 227])
    data.dummy_data_param.shape.add(dim=[2])
    net = netlib.Net(deploy, netlib.TEST)
    # to_proto() without a NetSpec auto-names everything, as pycaffe does
    assert net.blobs["InnerProduct3"].data.shape == (2, 1000)      # fc8
    assert net.blobs["Pooling3"].data.shape == (2, 256, 6, 6)      # pool5: CaffeNet's shapes
    assert net.blobs["Convolution1"].data.shape == (2, 96, 55, 55)
    assert numpy.isfinite(net.forward()["SoftmaxWithLoss1"]).all()


def test_pyloss_py_trains_linreg(caffe_src, tmp_path, capsys, monkeypatch):
    """Caffe's examples/pycaffe: linreg.prototxt names module 'pyloss'
    (on PYTHONPATH, as its comment says) and trains through netlib train."""
    monkeypatch.syspath_prepend(str(caffe_src / "examples" / "pycaffe" / "layers"))
    monkeypatch.delitem(__import__("sys").modules, "pyloss", raising=False)
    (tmp_path / "solver.prototxt").write_text(
        'net: "%s" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" max_iter: 100 display: 10 '
        'snapshot_prefix: "%s" random_seed: 5'
        % (caffe_src / "examples" / "pycaffe" / "linreg.prototxt", tmp_path / "linreg"))
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt")]) == 0
    err = capsys.readouterr().err
    losses = [float(l.rsplit("=", 1)[1]) for l in err.splitlines() if ", loss = " in l]
    assert len(losses) == 11 and losses[-1] < 0.1 * losses[0], losses
    layer = netlib.Net(str(caffe_src / "examples" / "pycaffe" / "linreg.prototxt"), netlib.TRAIN).layers[-1]
    assert type(layer).__name__ == "EuclideanLossLayer" and type(layer).__module__ == "pyloss"
