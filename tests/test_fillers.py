"""Fillers follow Caffe's distributions and fan-in/fan-out rules."""
import math

import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib.blob import Blob
from netlib.fillers import fill, fill_array
from netlib.proto import caffe_pb2


def filler(text):
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def test_default_is_constant_zero():
    assert fill_array((3, 4), caffe_pb2.FillerParameter()).tolist() == numpy.zeros((3, 4)).tolist()


def test_constant_and_dtype():
    out = fill_array((2, 5), filler("type: 'constant' value: 2.5"))
    assert out.dtype == numpy.float32 and (out == 2.5).all()


def test_uniform_range_and_mean():
    netlib.set_random_seed(1)
    out = fill_array((200, 300), filler("type: 'uniform' min: -2 max: 3"))
    assert out.min() >= -2 and out.max() <= 3 and abs(out.mean() - 0.5) < 0.02


def test_gaussian_moments_and_sparse():
    netlib.set_random_seed(2)
    out = fill_array((100, 1000), filler("type: 'gaussian' mean: 1 std: 2"))
    assert abs(out.mean() - 1) < 0.02 and abs(out.std() - 2) < 0.02
    # sparse: each weight kept with probability sparse / num_outputs
    sparse = fill_array((50, 2000), filler("type: 'gaussian' std: 1 sparse: 10"))
    assert abs((sparse != 0).mean() - 10 / 50) < 0.01


def test_sparse_is_rejected_by_other_fillers():
    with pytest.raises(netlib.ConfigError, match="sparse"):
        fill_array((3, 3), filler("type: 'uniform' sparse: 2"))


def test_positive_unitball_rows_sum_to_one():
    out = fill_array((7, 3, 4), filler("type: 'positive_unitball'"))
    assert (out >= 0).all()
    numpy.testing.assert_allclose(out.reshape(7, -1).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 3 * 5 * 5), ("FAN_OUT", 8 * 5 * 5), ("AVERAGE", (75 + 200) / 2)])
def test_xavier_and_msra_scale_with_caffes_fans(norm, n):
    netlib.set_random_seed(3)
    shape = (8, 3, 5, 5)  # fan_in = count/shape[0], fan_out = count/shape[1]
    x = numpy.concatenate([fill_array(shape, filler("type: 'xavier' variance_norm: %s" % norm)).ravel()
                           for _ in range(50)])
    bound = math.sqrt(3.0 / n)
    assert numpy.abs(x).max() <= bound and numpy.abs(x).max() > 0.95 * bound
    m = numpy.concatenate([fill_array(shape, filler("type: 'msra' variance_norm: %s" % norm)).ravel()
                           for _ in range(50)])
    assert abs(m.std() - math.sqrt(2.0 / n)) < 0.03 * math.sqrt(2.0 / n)


def test_bilinear_matches_the_formula():
    out = fill_array((2, 3, 4, 4), filler("type: 'bilinear'"))
    k, f = 4, 2
    c = (k - 1) / (2.0 * f)
    for i in range(k * k):
        x, y = i % k, (i // k) % k
        expected = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
        assert out[1, 2, y, x] == pytest.approx(expected)
    with pytest.raises(netlib.ConfigError):
        fill_array((2, 3, 4, 5), filler("type: 'bilinear'"))


def test_unknown_filler_is_named():
    with pytest.raises(netlib.ConfigError, match="unknown filler type 'gausian'"):
        fill_array((2,), filler("type: 'gausian'"))


def test_seed_makes_fills_reproducible():
    blob_a, blob_b = Blob((4, 5)), Blob((4, 5))
    netlib.set_random_seed(7)
    fill(blob_a, filler("type: 'gaussian'"))
    netlib.set_random_seed(7)
    fill(blob_b, filler("type: 'gaussian'"))
    numpy.testing.assert_array_equal(blob_a.data, blob_b.data)


@pytest.mark.parametrize("kind", ["constant", "uniform", "gaussian", "xavier", "msra", "positive_unitball"])
def test_blob_filled_in_place_in_its_dtype(kind):
    """fill draws straight into the blob's buffer: no new array, no float64
    temporary (the draw has the blob's dtype), and the distribution holds."""
    netlib.set_random_seed(3)
    for dtype in (numpy.float32, numpy.float64):
        blob = Blob((64, 32, 3, 3), dtype=dtype)
        buf = blob.data
        fill(blob, filler("type: '%s' value: 0.5 min: -1 max: 1 std: 0.1" % kind))
        assert blob.data.base is buf.base and blob.data.dtype == dtype
        values = blob.data
        if kind == "constant":
            assert (values == 0.5).all()
        elif kind == "uniform":
            assert values.min() >= -1 and values.max() <= 1 and abs(values.mean()) < 0.02
        elif kind == "gaussian":
            assert abs(values.std() - 0.1) < 0.005
        elif kind == "xavier":
            scale = math.sqrt(3.0 / (32 * 9))
            assert values.min() >= -scale and values.max() <= scale
        elif kind == "msra":
            assert abs(values.std() - math.sqrt(2.0 / (32 * 9))) < 0.005
        else:
            numpy.testing.assert_allclose(values.reshape(64, -1).sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("kind", ["constant", "uniform", "gaussian", "xavier", "msra",
                                  "positive_unitball", "bilinear"])
def test_empty_blob(kind):
    assert fill_array((0, 3, 2, 2), filler("type: '%s'" % kind)).shape == (0, 3, 2, 2)
