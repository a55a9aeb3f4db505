"""Sizes are checked before anything is allocated: Caffe's INT_MAX blob
limit, an optional byte cap, BlobProto value counts against their shapes,
HDF5 datasets against the file that holds them and the blob they fill."""
import h5py
import numpy as np
import pytest

import netlib
from netlib import blob as blob_module
from netlib import io as nio
from netlib.blob import Blob
from netlib.checkpoint import read_solver_state
from netlib.errors import NetlibError, ShapeError, WeightsError
from netlib.proto import caffe_pb2

FC = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 10 dim: 1000 } } }\n'
      'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: %d } }\n')


def test_blob_over_int_max_is_refused_as_caffe_does():
    with pytest.raises(ShapeError, match="INT_MAX"):
        Blob((2 ** 16, 2 ** 16))                       # 2^32 elements
    assert Blob((2 ** 15, 2 ** 16 - 1)).count < 2 ** 31   # under the limit: fine (nothing allocated yet)


def test_oversized_layer_names_layer_type_and_bytes():
    with pytest.raises(ShapeError) as info:
        netlib.Net(FC % 10000000, netlib.TEST)
    msg = str(info.value)
    assert "layer 'fc' (type InnerProduct)" in msg and "40000000000 bytes" in msg and "INT_MAX" in msg


def test_dummy_data_of_petabytes_is_one_clear_error():
    text = 'layer { name: "big" type: "DummyData" top: "x" dummy_data_param { shape { dim: 1048576 dim: 1048576 dim: 2048 } } }'
    with pytest.raises(ShapeError, match=r"'big' \(type DummyData\).*PiB"):
        netlib.Net(text, netlib.TEST)


def test_configurable_byte_limit(monkeypatch):
    monkeypatch.setattr(blob_module, "MAX_BLOB_BYTES", 1 << 20)
    with pytest.raises(ShapeError, match=r"'fc' \(type InnerProduct\).*NETLIB_MAX_BLOB_BYTES"):
        netlib.Net(FC % 1000, netlib.TEST)              # 1000 x 1000 float32 weights = 4 MB
    net = netlib.Net(FC % 100, netlib.TEST)             # 400 kB: under the limit
    assert net.params["fc"][0].shape == (100, 1000)


def test_blobproto_count_must_fit_shape_before_reshape():
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([10 ** 6, 10 ** 6])           # 10^12 values declared
    proto.data.append(1.0)                               # one given
    for fn in (nio.blobproto_to_array, blob_module.blobproto_to_array):
        with pytest.raises(WeightsError) as info:
            fn(proto)
        assert isinstance(info.value, ValueError)       # what pycaffe's reshape raised
    with pytest.raises(WeightsError, match=r"1 values for shape \(1000000, 1000000\)"):
        Blob(()).from_proto(proto)
    proto = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=1)
    proto.data.extend([1.0, 2.0])
    assert nio.blobproto_to_array(proto).shape == (1, 2, 1, 1)


def test_hdf5_weights_shape_checked_before_the_read(tmp_path):
    net = netlib.Net(FC % 3, netlib.TEST)
    path = str(tmp_path / "w.caffemodel.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data/fc/0", shape=(4, 1000), dtype="f4")
        f["data/fc/1"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=r"shape mismatch.*\(4, 1000\).*\(3, 1000\)"):
        net.copy_from(path)


def test_hdf5_dataset_larger_than_its_file_is_refused(tmp_path):
    # a few-KB file whose header declares a 16 GiB dataset (storage never written)
    path = str(tmp_path / "huge.solverstate.h5")
    with h5py.File(path, "w") as f:
        f["iter"] = np.array([5], np.int32)
        f.create_dataset("history/0", shape=(2 ** 32,), dtype="f4")
    with pytest.raises(WeightsError, match="more than the file can hold") as info:
        read_solver_state(path)
    assert path in str(info.value)


@pytest.mark.parametrize("iter_value", [np.zeros(0, np.int32), np.array([1.5e300]), np.array(["x"], "S1")])
def test_hdf5_solverstate_bad_scalars(tmp_path, iter_value):
    path = str(tmp_path / "bad.solverstate.h5")
    with h5py.File(path, "w") as f:
        f["iter"] = iter_value
        f.create_group("history")
    with pytest.raises(NetlibError) as info:
        read_solver_state(path)
    assert isinstance(info.value, WeightsError) and path in str(info.value)
