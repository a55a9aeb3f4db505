"""Caffe's 00-classification notebook, caffe.Classifier and caffe.Detector,
written the pycaffe way, on the trained cifar10_full net, against the numbers
real pycaffe gives for the same code (tests/golden/pycaffe_io/net.npz, made
by tools/make_io_goldens.py).
"""
import os

import numpy as np
import pytest

import netlib as caffe

from conftest import shared_path

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "pycaffe_io")
G = np.load(os.path.join(GOLDEN, "net.npz"))
WINDOWS = np.array([[0, 0, 200, 250], [50, 100, 300, 400], [10, 20, 42, 52]])
ATOL = 2e-6  # probabilities: float32 forward, summed in another order than Caffe's BLAS


@pytest.fixture(scope="module")
def files():
    model = shared_path("reference", "models", "cifar10_full_trained_binaryproto")
    return {
        "deploy": os.path.join(model, "cifar10_full.prototxt"),
        "weights": os.path.join(model, "cifar10_full_iter_70000.caffemodel"),
        "cat": shared_path("data", "images", "cat.jpg"),
        "fish": shared_path("data", "images", "fish-bike.jpg"),
        "mu": np.load(shared_path("reference", "models", "ilsvrc12", "ilsvrc_2012_mean.npy")).mean(1).mean(1),
    }


def close(got, key, atol=ATOL):
    exp = G[key]
    assert np.shape(got) == exp.shape, key
    np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=0, atol=atol, err_msg=key)


def test_classification_notebook(files):
    # as examples/00-classification.ipynb, with a CIFAR-10 net
    net = caffe.Net(files["deploy"], files["weights"], caffe.TEST)
    mu = files["mu"]
    transformer = caffe.io.Transformer({'data': net.blobs['data'].data.shape})
    transformer.set_transpose('data', (2, 0, 1))
    transformer.set_mean('data', mu)
    transformer.set_raw_scale('data', 255)
    transformer.set_channel_swap('data', (2, 1, 0))
    net.blobs['data'].reshape(3, 3, 32, 32)
    image = caffe.io.load_image(files["cat"])
    transformed_image = transformer.preprocess('data', image)
    net.blobs['data'].data[...] = transformed_image
    output = net.forward()
    output_prob = output['prob'][0]
    top_inds = output_prob.argsort()[::-1][:3]

    close(transformed_image, "nb_data", atol=1e-4)
    close(output_prob, "nb_prob")
    close(output['prob'], "nb_prob_all")
    assert list(top_inds) == list(G["nb_top3"])
    assert output_prob.argmax() == G["nb_top3"][0]
    close(net.blobs['conv1'].data[0, :4], "nb_conv1_sample", atol=5e-4)


def test_classifier_predict(files):
    clf = caffe.Classifier(files["deploy"], files["weights"], image_dims=(40, 40),
                           mean=files["mu"], raw_scale=255, channel_swap=(2, 1, 0))
    assert isinstance(clf, caffe.Net)
    assert list(clf.crop_dims) == [32, 32]
    ims = [caffe.io.load_image(files["cat"]), caffe.io.load_image(files["fish"])]
    over = clf.predict(ims)
    assert over.shape == (2, 10)
    close(over, "clf_over")
    close(clf.predict(ims, oversample=False), "clf_center")
    np.testing.assert_allclose(over.sum(1), 1, atol=1e-5)


def test_classifier_default_dims(files):
    clf = caffe.Classifier(files["deploy"], files["weights"], input_scale=0.9, raw_scale=255)
    assert list(clf.image_dims) == [32, 32]
    im = caffe.io.load_image(files["cat"])
    close(clf.predict([im], oversample=False), "clf_default_dims")
    close(clf.predict([im]), "clf_default_dims_over")


def test_classifier_image_dims_array_quirk(files):
    with pytest.raises(ValueError):  # pycaffe tests `not image_dims`
        caffe.Classifier(files["deploy"], files["weights"], image_dims=np.array([40, 40]))


def test_detector_detect_windows(files):
    det = caffe.Detector(files["deploy"], files["weights"], mean=files["mu"], raw_scale=255,
                         channel_swap=(2, 1, 0))
    assert list(det.crop_dims) == [32, 32, 3]
    dets = det.detect_windows([(files["cat"], WINDOWS), (files["fish"], WINDOWS[:2])])
    assert [os.path.basename(d["filename"]) for d in dets] == list(G["det_files"])
    assert np.array_equal(np.array([d["window"] for d in dets]), G["det_windows"])
    close(np.array([d["prediction"] for d in dets]), "det_pred")


def test_detector_context_pad(files):
    det = caffe.Detector(files["deploy"], files["weights"], mean=files["mu"], raw_scale=255,
                         channel_swap=(2, 1, 0), context_pad=4)
    close(det.crop_mean, "detc_crop_mean", atol=1e-12)
    # the mean in image space: RGB order, / raw_scale
    np.testing.assert_allclose(det.crop_mean[0, 0], files["mu"][::-1] / 255)
    dets = det.detect_windows([(files["cat"], WINDOWS)])
    close(np.array([d["prediction"] for d in dets]), "detc_pred")
    cat = caffe.io.load_image(files["cat"])
    for i, w in enumerate(np.array([[0, 0, 200, 250], [100, 150, 359, 479], [-10, 30, 100, 500]])):
        crop = det.crop(cat, w)
        assert crop.shape == (32, 32, 3)
        close(crop, "detc_crop_%d" % i, atol=1e-6)
    no_mean = caffe.Detector(files["deploy"], files["weights"], raw_scale=255, context_pad=6)
    close(no_mean.crop_mean, "detn_crop_mean", atol=0)
    close(no_mean.crop(cat, np.array([30, 40, 130, 160])), "detn_crop", atol=1e-6)


def test_detector_selective_search_missing(files):
    det = caffe.Detector(files["deploy"], files["weights"])
    with pytest.raises(ImportError, match="selective_search_ijcv_with_python"):
        det.detect_selective_search([files["cat"]])
