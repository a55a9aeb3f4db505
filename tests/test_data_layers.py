"""Data layers: Input, DummyData, HDF5Data, MemoryData.

References are independent: expected batches are built here by walking the
rows with plain Python (cycling over files and rows), HDF5 contents are read
back with h5py, and the DummyData golden case comes from real Caffe.
"""
import json
import os

import h5py
import numpy
import pytest
from google.protobuf import text_format

import netlib
from netlib.blob import Blob
from netlib.errors import ConfigError, LayerError, NetlibFileNotFoundError, ShapeError, WeightsError
from netlib.layer import create_layer
from netlib.proto import caffe_pb2
from netlib.random import set_random_seed

from conftest import shared_path


def make_layer(text, num_tops, phase=caffe_pb2.TRAIN, num_bottoms=0):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    if not lp.name:
        lp.name = "data_under_test"
    if not lp.top:
        lp.top.extend(["t%d" % i for i in range(num_tops)])
    layer = create_layer(lp, phase=phase)
    bottom = [Blob((2,)) for _ in range(num_bottoms)]
    top = [Blob(()) for _ in range(num_tops)]
    layer.SetUp(bottom, top)
    return layer, bottom, top


def forward(layer, bottom, top):
    layer.Forward(bottom, top)
    return [t.data.copy() for t in top]


# -- Input --------------------------------------------------------------------------------
class TestInput:
    def test_one_shape_per_top(self):
        _, _, top = make_layer('type: "Input" input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }', 2)
        assert [t.shape for t in top] == [(2, 3), (4,)]

    def test_one_shape_for_all_tops(self):
        _, _, top = make_layer('type: "Input" input_param { shape { dim: 5 dim: 1 dim: 2 } }', 3)
        assert [t.shape for t in top] == [(5, 1, 2)] * 3

    def test_no_shape_keeps_user_shape_and_data(self):
        layer, bottom, top = make_layer('type: "Input"', 1)
        top[0].reshape(3, 2)
        top[0].data[...] = [[1, 2], [3, 4], [5, 6]]
        layer.Forward(bottom, top)  # reshape and forward are no-ops
        assert top[0].shape == (3, 2)
        numpy.testing.assert_array_equal(top[0].data, [[1, 2], [3, 4], [5, 6]])

    def test_wrong_number_of_shapes(self):
        with pytest.raises(ConfigError, match="data_under_test.*2 tops vs. 3 shapes"):
            make_layer('type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } shape { dim: 3 } }', 2)

    def test_refuses_bottoms(self):
        with pytest.raises(LayerError, match="data_under_test.*bottom"):
            make_layer('type: "Input" input_param { shape { dim: 1 } }', 1, num_bottoms=1)

    def test_net_inputs_and_float32(self):
        net = netlib.Net('name: "n" layer { name: "in" type: "Input" top: "x" top: "y" '
                         'input_param { shape { dim: 2 dim: 3 } } }', netlib.TEST)
        assert net.inputs == ["x", "y"]
        assert net.blobs["x"].data.dtype == numpy.float32


# -- DummyData ---------------------------------------------------------------------------
class TestDummyData:
    def test_golden_constant(self):
        case = shared_path("reference", "golden", "layers", "DummyData_constant.prototxt")
        net = netlib.Net(case, netlib.TEST)
        net.forward()
        with h5py.File(case[:-len(".prototxt")] + ".h5", "r") as f:
            for name in ("a", "b"):
                ref = f["top"][name][()]
                assert net.blobs[name].shape == ref.shape
                numpy.testing.assert_array_equal(net.blobs[name].data, ref)

    def test_default_filler_is_zero_and_legacy_dims(self):
        _, _, top = make_layer('type: "DummyData" dummy_data_param { num: 2 channels: 3 height: 1 width: 4 '
                               'num: 5 channels: 1 height: 2 width: 2 }', 2)
        assert [t.shape for t in top] == [(2, 3, 1, 4), (5, 1, 2, 2)]
        assert not top[0].data.any() and not top[1].data.any()

    def test_legacy_single_values_for_all_tops(self):
        _, _, top = make_layer('type: "DummyData" dummy_data_param { num: 2 channels: 3 height: 4 width: 5 }', 2)
        assert [t.shape for t in top] == [(2, 3, 4, 5)] * 2

    def test_constant_filled_once_quirk(self):
        layer, bottom, top = make_layer(
            'type: "DummyData" dummy_data_param { shape { dim: 3 } data_filler { type: "constant" value: 7 } }', 1)
        numpy.testing.assert_array_equal(top[0].data, [7, 7, 7])
        top[0].data[...] = -1  # Caffe never refills a constant top
        layer.Forward(bottom, top)
        numpy.testing.assert_array_equal(top[0].data, [-1, -1, -1])

    def test_random_filler_refills_every_forward(self):
        set_random_seed(3)
        layer, bottom, top = make_layer(
            'type: "DummyData" dummy_data_param { shape { dim: 1000 } shape { dim: 4 } '
            'data_filler { type: "uniform" min: 2 max: 3 } data_filler { type: "constant" value: 1 } }', 2)
        # Caffe's setup forward only fills the constant tops.
        assert not top[0].data.any()
        numpy.testing.assert_array_equal(top[1].data, 1)
        first = forward(layer, bottom, top)
        second = forward(layer, bottom, top)
        assert first[0].min() >= 2 and first[0].max() <= 3
        assert abs(first[0].mean() - 2.5) < 0.05
        assert not numpy.array_equal(first[0], second[0])
        numpy.testing.assert_array_equal(second[1], 1)

    @pytest.mark.parametrize("text, pattern", [
        ('dummy_data_param { shape { dim: 2 } data_filler { } data_filler { } }', "data fillers"),
        ('dummy_data_param { shape { dim: 2 } num: 1 channels: 1 height: 1 width: 1 }', "both 'shape'"),
        ('dummy_data_param { num: 1 channels: 1 height: 1 }', "'width' once"),
        ('dummy_data_param { shape { dim: 1 } shape { dim: 2 } }', "'shape' once"),
    ])
    def test_bad_params(self, text, pattern):
        with pytest.raises(ConfigError, match=pattern) as err:
            make_layer('type: "DummyData" ' + text, 3)
        assert "data_under_test" in str(err.value)


# -- HDF5Data ----------------------------------------------------------------------------
def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return str(path)


def rows_file(path, start, n, dtype=numpy.float32):
    """Rows whose values encode their global index: data[i] = start+i (shape (n,2,3)), label = start+i."""
    idx = numpy.arange(start, start + n)
    data = (idx[:, None, None] * 10 + numpy.arange(6).reshape(1, 2, 3)).astype(dtype)
    return write_h5(path, data=data, label=idx.astype(numpy.int32))


def hdf5_layer(tmp_path, files, batch_size, shuffle=False, tops=("data", "label"), extra=""):
    lst = tmp_path / "list.txt"
    lst.write_text("".join(str(f) + "\n" for f in files))
    text = ('name: "h5" type: "HDF5Data" %s hdf5_data_param { source: "%s" batch_size: %d shuffle: %s } %s'
            % (" ".join('top: "%s"' % t for t in tops), lst, batch_size, "true" if shuffle else "false", extra))
    return make_layer(text, len(tops))


class TestHDF5Data:
    def test_batches_cross_files_and_wrap(self, tmp_path):
        files = [rows_file(tmp_path / "a.h5", 0, 5), rows_file(tmp_path / "b.h5", 5, 3)]
        layer, bottom, top = hdf5_layer(tmp_path, files, batch_size=3)
        assert top[0].shape == (3, 2, 3) and top[1].shape == (3,)
        assert top[0].data.dtype == numpy.float32 and top[1].data.dtype == numpy.float32
        # Independent reference: the global row index cycles 0..7.
        order = [i % 8 for i in range(3 * 7)]
        for step in range(7):
            data, label = forward(layer, bottom, top)
            expect = order[3 * step:3 * step + 3]
            numpy.testing.assert_array_equal(label, expect)
            numpy.testing.assert_array_equal(data[:, 0, 0], [10 * i for i in expect])
            numpy.testing.assert_array_equal(data[:, 1, 2], [10 * i + 5 for i in expect])

    def test_caffe_sample_data(self, tmp_path):
        folder = shared_path("reference", "models", "caffe_test_data")
        files = [os.path.join(folder, "sample_data.h5"), os.path.join(folder, "sample_data_2_gzip.h5")]
        layer, bottom, top = hdf5_layer(tmp_path, files, batch_size=4, tops=("data", "label", "label2"))
        ref = {k: [] for k in ("data", "label", "label2")}
        for path in files:
            with h5py.File(path, "r") as f:
                for k in ref:
                    ref[k].extend(numpy.asarray(f[k][()], dtype=numpy.float32))
        n = len(ref["label"])
        assert top[0].shape == (4, 8, 6, 5) and top[1].shape == (4, 1) and top[2].shape == (4, 1)
        for step in range(8):
            got = forward(layer, bottom, top)
            rows = [(4 * step + i) % n for i in range(4)]
            for k, g in zip(("data", "label", "label2"), got):
                numpy.testing.assert_array_equal(g, numpy.stack([ref[k][r] for r in rows]))

    def test_rank1_tops_and_integer_data(self, tmp_path):
        f = write_h5(tmp_path / "x.h5", a=numpy.arange(4, dtype=numpy.uint8), b=numpy.arange(4.0) / 2)
        layer, bottom, top = hdf5_layer(tmp_path, [f], batch_size=3, tops=("a", "b"))
        a, b = forward(layer, bottom, top)
        assert a.dtype == numpy.float32
        numpy.testing.assert_array_equal(a, [0, 1, 2])
        numpy.testing.assert_array_equal(b, [0, 0.5, 1])
        a, b = forward(layer, bottom, top)
        numpy.testing.assert_array_equal(a, [3, 0, 1])

    def test_relative_paths(self, tmp_path, monkeypatch):
        sub = tmp_path / "lists"
        sub.mkdir()
        rows_file(sub / "near_list.h5", 0, 2)
        (tmp_path / "cwd").mkdir()
        rows_file(tmp_path / "cwd" / "in_cwd.h5", 100, 2)
        (sub / "l.txt").write_text("near_list.h5\n\nin_cwd.h5\n")
        monkeypatch.chdir(tmp_path / "cwd")
        layer, bottom, top = make_layer('type: "HDF5Data" top: "data" top: "label" hdf5_data_param '
                                        '{ source: "%s" batch_size: 4 }' % (sub / "l.txt"), 2)
        _, label = forward(layer, bottom, top)
        numpy.testing.assert_array_equal(label, [0, 1, 100, 101])

    def test_missing_source_names_layer_and_path(self, tmp_path):
        path = tmp_path / "nope.txt"
        with pytest.raises(NetlibFileNotFoundError) as err:
            make_layer('name: "reader" type: "HDF5Data" top: "data" hdf5_data_param { source: "%s" batch_size: 2 }'
                       % path, 1)
        assert "reader" in str(err.value) and str(path) in str(err.value)
        assert isinstance(err.value, FileNotFoundError)

    def test_missing_listed_file(self, tmp_path):
        with pytest.raises(NetlibFileNotFoundError, match="h5.*missing.h5"):
            hdf5_layer(tmp_path, [tmp_path / "missing.h5"], batch_size=2)

    def test_missing_dataset(self, tmp_path):
        f = write_h5(tmp_path / "x.h5", data=numpy.zeros((3, 2)))
        with pytest.raises(ConfigError, match="'h5'.*'label'"):
            hdf5_layer(tmp_path, [f], batch_size=2)

    def test_unequal_first_dims(self, tmp_path):
        f = write_h5(tmp_path / "x.h5", data=numpy.zeros((3, 2)), label=numpy.zeros(4))
        with pytest.raises(ShapeError, match="equal first dimensions"):
            hdf5_layer(tmp_path, [f], batch_size=2)

    def test_scalar_dataset_refused(self, tmp_path):
        f = write_h5(tmp_path / "x.h5", data=numpy.float32(3), label=numpy.float32(1))
        with pytest.raises(ShapeError, match="at least 1 axis"):
            hdf5_layer(tmp_path, [f], batch_size=2)

    def test_row_shape_change_between_files(self, tmp_path):
        a = write_h5(tmp_path / "a.h5", data=numpy.zeros((2, 3)), label=numpy.zeros(2))
        b = write_h5(tmp_path / "b.h5", data=numpy.zeros((2, 4)), label=numpy.zeros(2))
        layer, bottom, top = hdf5_layer(tmp_path, [a, b], batch_size=2)
        with pytest.raises(ShapeError, match="rows of shape"):  # b.h5 loads when a.h5 runs out
            forward(layer, bottom, top)

    def test_refuses_transform_param(self, tmp_path):
        f = rows_file(tmp_path / "a.h5", 0, 2)
        with pytest.raises(ConfigError, match="does not transform"):
            hdf5_layer(tmp_path, [f], batch_size=2, extra="transform_param { scale: 2 }")

    def test_empty_list_and_bad_batch(self, tmp_path):
        (tmp_path / "empty.txt").write_text("\n")
        with pytest.raises(ConfigError, match="at least 1 HDF5"):
            make_layer('type: "HDF5Data" top: "d" hdf5_data_param { source: "%s" batch_size: 2 }'
                       % (tmp_path / "empty.txt"), 1)
        f = rows_file(tmp_path / "a.h5", 0, 2)
        with pytest.raises(ConfigError, match="batch_size"):
            hdf5_layer(tmp_path, [f], batch_size=0)

    def test_shuffle_visits_every_row_once_per_pass(self, tmp_path):
        set_random_seed(5)
        files = [rows_file(tmp_path / ("f%d.h5" % k), 4 * k, 4) for k in range(3)]
        layer, bottom, top = hdf5_layer(tmp_path, files, batch_size=4, shuffle=True)
        passes = []
        for _ in range(4):
            batches = [forward(layer, bottom, top)[1] for _ in range(3)]
            for b in batches:  # one file per batch: its rows are from one file
                assert len(set(int(v) // 4 for v in b)) == 1
            passes.append(numpy.concatenate(batches))
        for p in passes:
            assert sorted(p.tolist()) == list(range(12))
        assert len({tuple(p) for p in passes}) > 1  # orders change between passes

    def test_single_file_shuffle_keeps_order_quirk(self, tmp_path):
        set_random_seed(11)
        f = rows_file(tmp_path / "a.h5", 0, 10)
        layer, bottom, top = hdf5_layer(tmp_path, [f], batch_size=5, shuffle=True)
        epochs = [numpy.concatenate([forward(layer, bottom, top)[1] for _ in range(2)]) for _ in range(3)]
        assert sorted(epochs[0].tolist()) == list(range(10))
        assert epochs[0].tolist() != list(range(10))
        numpy.testing.assert_array_equal(epochs[0], epochs[1])
        numpy.testing.assert_array_equal(epochs[0], epochs[2])

    @pytest.mark.parametrize("shuffle", [False, True])
    def test_state_dict_resumes_exactly(self, tmp_path, shuffle):
        files = [rows_file(tmp_path / ("f%d.h5" % k), 10 * k, 5 + k) for k in range(3)]
        set_random_seed(21)
        layer, bottom, top = hdf5_layer(tmp_path, files, batch_size=4, shuffle=shuffle)
        for _ in range(5):
            forward(layer, bottom, top)
        state = json.loads(json.dumps(layer.state_dict()))  # survives JSON
        rng_state = netlib.random.get_state()
        expected = [forward(layer, bottom, top) for _ in range(9)]
        set_random_seed(999)  # a fresh reader with a different stream...
        other, ob, ot = hdf5_layer(tmp_path, files, batch_size=4, shuffle=shuffle)
        other.load_state_dict(state)
        netlib.random.set_state(rng_state)  # ...continues once the solver restores the RNG
        for exp in expected:
            got = forward(other, ob, ot)
            numpy.testing.assert_array_equal(got[0], exp[0])
            numpy.testing.assert_array_equal(got[1], exp[1])

    def test_state_for_other_file_list(self, tmp_path):
        files = [rows_file(tmp_path / "a.h5", 0, 4), rows_file(tmp_path / "b.h5", 4, 4)]
        layer, _, _ = hdf5_layer(tmp_path, files, batch_size=2)
        state = layer.state_dict()
        single, _, _ = hdf5_layer(tmp_path, files[:1], batch_size=2)
        with pytest.raises(WeightsError, match="'h5'.*2 files.*1"):
            single.load_state_dict(state)
        with pytest.raises(WeightsError, match="malformed"):
            single.load_state_dict({"current_row": 1})

    def test_in_net_no_backward(self, tmp_path):
        f = rows_file(tmp_path / "a.h5", 0, 6)
        (tmp_path / "l.txt").write_text(f + "\n")
        net = netlib.Net('name: "n" force_backward: true '
                         'layer { name: "d" type: "HDF5Data" top: "data" top: "label" '
                         'hdf5_data_param { source: "%s" batch_size: 2 } } '
                         'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                         'inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } } '
                         'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'
                         % (tmp_path / "l.txt"), netlib.TRAIN)
        net.forward_backward()
        numpy.testing.assert_array_equal(net.blobs["label"].data, [0, 1])
        assert net.blobs["data"].data.dtype == numpy.float32
        states = json.loads(json.dumps(net.layer_states()))
        assert states["d"]["current_row"] == 2


# -- MemoryData --------------------------------------------------------------------------
MEM = 'name: "mem" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 }'


class TestMemoryData:
    def test_batches_wrap(self):
        layer, bottom, top = make_layer(MEM, 2)
        assert top[0].shape == (2, 1, 2, 3) and top[1].shape == (2,)
        data = numpy.arange(6 * 6, dtype=numpy.float64).reshape(6, 1, 2, 3)
        labels = numpy.arange(6) + 100
        layer.reset(data, labels)
        for step in range(5):
            d, l = forward(layer, bottom, top)
            idx = [(2 * step) % 6, (2 * step + 1) % 6]
            numpy.testing.assert_array_equal(d, data[idx])
            numpy.testing.assert_array_equal(l, labels[idx].reshape(2, 1, 1, 1))  # Caffe: 4-D after a forward
            assert d.dtype == numpy.float32

    def test_state_dict(self):
        layer, bottom, top = make_layer(MEM, 2)
        data = numpy.random.default_rng(0).random((4, 1, 2, 3))
        layer.reset(data, numpy.arange(4).reshape(4, 1, 1, 1))
        forward(layer, bottom, top)
        state = json.loads(json.dumps(layer.state_dict()))
        expected = forward(layer, bottom, top)
        layer.load_state_dict(state)
        got = forward(layer, bottom, top)
        numpy.testing.assert_array_equal(got[1], expected[1])
        numpy.testing.assert_array_equal(got[1].ravel(), [2, 3])

    @pytest.mark.parametrize("data_shape, label_shape, pattern", [
        ((3, 1, 2, 3), (3,), "multiple of batch_size"),
        ((4, 2, 2, 3), (4,), r"shape \(N, 1, 2, 3\)"),
        ((4, 1, 2, 3), (5,), "same first dimension"),
        ((4, 1, 2, 3), (4, 2), "labels must have shape"),
    ])
    def test_reset_errors(self, data_shape, label_shape, pattern):
        layer, _, _ = make_layer(MEM, 2)
        with pytest.raises(ShapeError, match=pattern) as err:
            layer.reset(numpy.zeros(data_shape), numpy.zeros(label_shape))
        assert "'mem'" in str(err.value)

    def test_forward_before_reset(self):
        layer, bottom, top = make_layer(MEM, 2)
        with pytest.raises(ConfigError, match="set_input_arrays"):
            layer.Forward(bottom, top)

    def test_params_and_top_count(self):
        with pytest.raises(ConfigError, match="positive"):
            make_layer('type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 height: 0 width: 3 }', 2)
        with pytest.raises(LayerError, match="exactly 2 top"):
            make_layer(MEM.replace('top: "label"', ""), 1)

    def test_net_set_input_arrays(self):
        net = netlib.Net('name: "n" layer { %s } layer { name: "s" type: "Silence" bottom: "data" bottom: "label" }'
                         % MEM, netlib.TEST)
        data = numpy.arange(24, dtype=numpy.float32).reshape(4, 1, 2, 3)
        net.set_input_arrays(data, numpy.array([1, 2, 3, 4], dtype=numpy.float32))
        net.forward()
        net.forward()
        numpy.testing.assert_array_equal(net.blobs["data"].data, data[2:4])
        numpy.testing.assert_array_equal(net.blobs["label"].data, [[[[3]]], [[[4]]]])

    def test_set_batch_size(self):
        layer, bottom, top = make_layer(MEM, 2)
        layer.reset(numpy.zeros((6, 1, 2, 3)), numpy.arange(6))
        layer.set_batch_size(3)
        _, l = forward(layer, bottom, top)
        numpy.testing.assert_array_equal(l.ravel(), [0, 1, 2])
        with pytest.raises(ConfigError):
            layer.set_batch_size(4)



def test_hdf5_output_writes_legacy_4d_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = netlib.Net("""
    layer { name: "in" type: "Input" top: "x" top: "y"
            input_param { shape { dim: 3 dim: 4 } shape { dim: 3 } } }
    layer { name: "out" type: "HDF5Output" bottom: "x" bottom: "y" hdf5_output_param { file_name: "o.h5" } }
    """, netlib.TEST)
    x = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    for scale in (1, 2):  # a second forward replaces the datasets
        net.forward(x=x * scale, y=numpy.array([1, 2, 3], numpy.float32))
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert f["data"].shape == (3, 4, 1, 1) and f["label"].shape == (3, 1, 1, 1)
        numpy.testing.assert_array_equal(f["data"][()].reshape(3, 4), x * 2)
    with pytest.raises(netlib.ConfigError, match="file_name"):
        netlib.Net('layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 1 } } }'
                   'layer { name: "o" type: "HDF5Output" bottom: "x" bottom: "y" }', netlib.TEST)
