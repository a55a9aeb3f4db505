"""Real trained Caffe weights give Caffe's results.

LeNet trained by Caffe classifies the 10,000 MNIST test images with accuracy
0.9914 in real Caffe (golden README); the same weights here must give exactly
that.  Legacy V1 binary and HDF5 caffemodels of the model zoo load into their
nets and produce finite probabilities.
"""
import gzip
import os

import numpy
import pytest

import netlib
from conftest import shared_path


def read_idx(path):
    """A minimal independent idx reader (big-endian header, uint8 payload)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return numpy.frombuffer(data, dtype=numpy.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_lenet_trained_weights_reach_caffes_accuracy():
    images = read_idx(shared_path("data", "mnist", "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(shared_path("data", "mnist", "t10k-labels-idx1-ubyte.gz"))
    model = shared_path("reference", "models", "lenet_trained")
    net = netlib.Net(os.path.join(model, "lenet.prototxt"),
                     os.path.join(model, "lenet_iter_10000.caffemodel"), netlib.TEST)
    batch = 1000
    net.blobs["data"].reshape(batch, 1, 28, 28)
    net.reshape()
    correct = 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch].astype(numpy.float32)[:, None] * numpy.float32(0.00390625)
        prob = net.forward(data=x)["prob"]
        correct += int((prob.argmax(axis=1) == labels[start:start + batch]).sum())
    assert correct == 9914


@pytest.mark.parametrize("net_file,weights", [
    # a V1 binary caffemodel with legacy 4-D blob shapes
    ("cifar10_quick_trained_hdf5/cifar10_quick.prototxt",
     "cifar10_quick_trained_binaryproto/cifar10_quick_iter_5000.caffemodel"),
    ("cifar10_quick_trained_hdf5/cifar10_quick.prototxt", "cifar10_quick_trained_hdf5/cifar10_quick_iter_5000.caffemodel.h5"),
    ("cifar10_full_trained_hdf5/cifar10_full.prototxt", "cifar10_full_trained_hdf5/cifar10_full_iter_70000.caffemodel.h5"),
    ("cifar10_full_trained_binaryproto/cifar10_full.prototxt",
     "cifar10_full_trained_binaryproto/cifar10_full_iter_70000.caffemodel"),
    ("legacy_v1_cifar10/cifar10_quick.prototxt",
     "cifar10_quick_trained_binaryproto/cifar10_quick_iter_5000.caffemodel"),
])
def test_zoo_weights_load_and_run(net_file, weights):
    net = netlib.Net(shared_path("reference", "models", net_file), netlib.TEST,
                     weights=shared_path("reference", "models", weights))
    assert net.params["conv1"][0].data.std() > 0
    assert net.params["conv1"][1].data.shape == (32,)     # legacy (1,1,1,32) bias fits
    x = numpy.random.default_rng(0).uniform(-50, 50, net.blobs["data"].shape).astype(numpy.float32)
    out = net.forward(data=x)
    prob = out[net.outputs[0]]
    assert numpy.isfinite(prob).all()
    numpy.testing.assert_allclose(prob.reshape(prob.shape[0], -1).sum(axis=1), 1.0, rtol=1e-5)
