"""Blob: shapes, lazy buffers, sharing, arithmetic and BlobProto I/O."""
import numpy
import pytest

from netlib.blob import Blob, array_to_blobproto, blobproto_to_array, shape_equals
from netlib.errors import ShapeError, WeightsError
from netlib.proto import caffe_pb2


def test_shape_count_and_legacy_accessors():
    b = Blob((2, 3, 4, 5))
    assert b.count == 120 and b.count_axes(1) == 60 and b.count_axes(1, 3) == 12 and b.num_axes == 4
    assert (b.num, b.channels, b.height, b.width) == (2, 3, 4, 5)
    one_d = Blob((32,))
    assert (one_d.num, one_d.channels, one_d.height, one_d.width) == (32, 1, 1, 1)
    assert b.canonical_axis_index(-1) == 3
    with pytest.raises(ShapeError, match="axis 4 out of range"):
        b.canonical_axis_index(4)
    with pytest.raises(ShapeError, match="legacy"):
        Blob((1, 2, 3, 4, 5)).num


def test_buffers_are_lazy_and_reused():
    b = Blob((10, 10))
    assert not b.has_diff
    b.data[...] = 1
    buf = b._data_buf
    b.reshape(5, 4)
    assert b.data.shape == (5, 4) and b._data_buf is buf   # smaller: same memory
    b.reshape(20, 20)
    assert b.data.shape == (20, 20) and b._data_buf is not buf
    assert not b.has_diff


def test_update_and_norms():
    b = Blob((2, 3))
    b.data[...] = [[1, -2, 3], [-4, 5, -6]]
    b.diff[...] = 0.5
    assert b.asum_data() == 21 and b.sumsq_data() == 91 and b.sumsq_diff() == 1.5
    b.update()
    numpy.testing.assert_array_equal(b.data, [[0.5, -2.5, 2.5], [-4.5, 4.5, -6.5]])
    b.scale_diff(2)
    assert b.asum_diff() == 6


def test_share_data_and_diff():
    a, b = Blob((6,)), Blob((2, 3))
    b.share_data(a)
    b.share_diff(a)
    a.data[...] = numpy.arange(6)
    b.diff[...] = 1
    numpy.testing.assert_array_equal(b.data.ravel(), numpy.arange(6))
    assert (a.diff == 1).all()
    with pytest.raises(ShapeError, match="equal counts"):
        Blob((5,)).share_data(a)


def test_proto_roundtrip_float_and_double():
    b = Blob((2, 3))
    b.data[...] = numpy.arange(6).reshape(2, 3)
    b.diff[...] = 2
    p = b.to_proto(write_diff=True)
    assert list(p.shape.dim) == [2, 3] and len(p.diff) == 6 and not len(p.double_data)
    c = Blob().from_proto(p)
    numpy.testing.assert_array_equal(c.data, b.data)
    d = Blob((2, 3), dtype=numpy.float64)
    d.data[...] = 1 / 3
    q = d.to_proto()
    assert len(q.double_data) == 6 and not len(q.data)
    assert Blob((2, 3), dtype=numpy.float64).from_proto(q).data[0, 0] == 1 / 3


def test_legacy_4d_proto_fits_nd_blob_as_caffe_allows():
    p = caffe_pb2.BlobProto(num=1, channels=1, height=1, width=3)
    p.data.extend([1, 2, 3])
    assert shape_equals(p, (3,)) and shape_equals(p, (1, 3)) and not shape_equals(p, (3, 1))
    b = Blob((3,)).from_proto(p, reshape=False)
    assert b.data.tolist() == [1, 2, 3]
    with pytest.raises(WeightsError, match="shape mismatch"):
        Blob((4,)).from_proto(p, reshape=False)
    bad = caffe_pb2.BlobProto()
    bad.shape.dim.extend([2, 2])
    bad.data.extend([1, 2, 3])
    with pytest.raises(WeightsError, match="3 values for shape"):
        Blob().from_proto(bad)


def test_pycaffe_array_conversions():
    arr = numpy.random.default_rng(0).standard_normal((2, 3, 4)).astype(numpy.float32)
    p = array_to_blobproto(arr)
    numpy.testing.assert_array_equal(blobproto_to_array(p), arr)
