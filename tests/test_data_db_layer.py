"""The Data layer: real Caffe databases, encoded records, the prefetch
pipeline's determinism and failures, resume, and errors on bad input."""
import gzip
import os
import shutil

import numpy
import pytest

import netlib
from conftest import shared_path
from netlib.data.datum import array_to_datum, encoded_datum
from netlib.data.db import create_db
from netlib.proto import caffe_pb2

pytest.importorskip("lmdb")


def mnist_test_1000():
    folder = shared_path("data", "mnist")
    with gzip.open(os.path.join(folder, "t10k-images-idx3-ubyte.gz")) as f:
        images = numpy.frombuffer(f.read()[16:], numpy.uint8).reshape(-1, 28, 28)[:1000]
    with gzip.open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = numpy.frombuffer(f.read()[8:], numpy.uint8)[:1000]
    return images, labels


def data_net(source, backend="LMDB", batch_size=64, transform="", phase=netlib.TEST, extra="", tops=2):
    top = 'top: "data" top: "label"' if tops == 2 else 'top: "data"'
    text = ('name: "d" layer { name: "data" type: "Data" %s %s data_param { source: "%s" backend: %s '
            'batch_size: %d %s } }' % (top, ("transform_param { %s }" % transform) if transform else "",
                                        source, backend, batch_size, extra))
    return netlib.Net(text, phase)


def read_batches(net, count):
    data, labels = [], []
    for _ in range(count):
        net.forward()
        data.append(net.blobs["data"].data.copy())
        if "label" in net.blobs:
            labels.append(net.blobs["label"].data.copy())
    return numpy.concatenate(data), (numpy.concatenate(labels) if labels else None)


@pytest.mark.parametrize("backend,folder", [("LMDB", "mnist_test_1000_lmdb"), ("LEVELDB", "mnist_test_1000_leveldb")])
def test_real_caffe_database_reads_back_mnist(backend, folder):
    if backend == "LEVELDB":
        pytest.importorskip("plyvel")
    source = shared_path("reference", "caffe_made", folder)
    images, labels = mnist_test_1000()
    net = data_net(source, backend, batch_size=64)
    assert net.blobs["data"].shape == (64, 1, 28, 28) and net.blobs["label"].shape == (64,)
    data, got_labels = read_batches(net, 17)  # 1088 items: wraps around after 1000
    assert got_labels[0] == 7
    numpy.testing.assert_array_equal(data[:1000, 0], images)
    numpy.testing.assert_array_equal(got_labels[:1000], labels)
    numpy.testing.assert_array_equal(data[1000:, 0], images[:88])  # Caffe's cursor wraps to the start
    assert sorted(os.listdir(source)) == sorted(os.listdir(source))  # nothing added below
    assert not os.path.exists(os.path.join(source, "lock.mdb"))
    assert not os.path.exists(os.path.join(source, "LOCK"))


def test_leveldb_folder_is_never_written(tmp_path):
    pytest.importorskip("plyvel")
    src = shared_path("reference", "caffe_made", "mnist_test_1000_leveldb")
    copy = tmp_path / "db"
    shutil.copytree(src, copy)
    before = {n: (copy / n).read_bytes() for n in os.listdir(copy)}
    net = data_net(str(copy), "LEVELDB", batch_size=100)
    read_batches(net, 2)
    net.layers[0].close()
    after = {n: (copy / n).read_bytes() for n in os.listdir(copy)}
    assert before == after


def test_mean_file_equals_the_mean_of_the_images():
    images, _ = mnist_test_1000()
    proto = netlib.files.read_blobproto(shared_path("reference", "caffe_made", "mnist_test_1000_mean.binaryproto"))
    mean = numpy.asarray(proto.data, numpy.float32).reshape(1, 1, 28, 28)
    numpy.testing.assert_allclose(mean[0, 0], images.astype(numpy.float64).mean(0), rtol=0, atol=1e-4)


def test_transform_with_the_real_mean_file_and_scale():
    source = shared_path("reference", "caffe_made", "mnist_test_1000_lmdb")
    mean_file = shared_path("reference", "caffe_made", "mnist_test_1000_mean.binaryproto")
    images, _ = mnist_test_1000()
    net = data_net(source, batch_size=10, transform='crop_size: 24 scale: 0.5 mean_file: "%s"' % mean_file)
    net.forward()
    mean = numpy.asarray(netlib.files.read_blobproto(mean_file).data, numpy.float32).reshape(28, 28)
    ref = (images[:10, 2:26, 2:26].astype(numpy.float32) - mean[2:26, 2:26]) * numpy.float32(0.5)
    numpy.testing.assert_array_equal(net.blobs["data"].data[:, 0], ref)


def test_lenet_small_run_builds_and_trains(tmp_path, monkeypatch):
    run = shared_path("reference", "caffe_made", "lenet_small_run")
    work = tmp_path / "lenet_small_run"
    work.mkdir()
    for name in ("lenet_train_test.prototxt", "lenet_solver.prototxt"):
        shutil.copy(os.path.join(run, name), work / name)
    os.symlink(shared_path("reference", "caffe_made", "mnist_test_1000_lmdb"), tmp_path / "mnist_test_1000_lmdb")
    monkeypatch.chdir(work)
    text = (work / "lenet_solver.prototxt").read_text().replace("max_iter: 300", "max_iter: 120")
    text = text.replace("snapshot: 300", "snapshot: 0")
    (work / "lenet_solver.prototxt").write_text(text)
    solver = netlib.get_solver("lenet_solver.prototxt")
    assert solver.net.blobs["data"].shape == (64, 1, 28, 28)
    assert solver.test_nets[0].blobs["data"].shape == (100, 1, 28, 28)
    first = solver.net.forward()["loss"].item()
    solver.step(120)
    solver.test_nets[0].share_with(solver.net)
    acc = numpy.mean([solver.test_nets[0].forward()["accuracy"].item() for _ in range(10)])
    assert first > 2.0 and acc > 0.9


# -- small databases the tests write ------------------------------------------------
def write_db(path, items, backend="lmdb", keys=None):
    with create_db(str(path), backend) as db:
        for i, (value, label) in enumerate(items):
            datum = value if isinstance(value, caffe_pb2.Datum) else array_to_datum(value, label)
            db.put(keys[i] if keys else "%08d" % i, datum.SerializeToString())
    return str(path)


def random_items(n, shape=(3, 10, 12), seed=0):
    rng = numpy.random.default_rng(seed)
    return [(rng.integers(0, 256, size=shape).astype(numpy.uint8), int(rng.integers(0, 10))) for _ in range(n)]


def test_float_data_and_single_top(tmp_path):
    rng = numpy.random.default_rng(1)
    arrays = [rng.normal(size=(2, 3, 4)).astype(numpy.float32) for _ in range(5)]
    source = write_db(tmp_path / "f", [(a, i) for i, a in enumerate(arrays)])
    net = data_net(source, batch_size=5, tops=1, transform="scale: 2")
    net.forward()
    numpy.testing.assert_array_equal(net.blobs["data"].data, numpy.stack(arrays) * numpy.float32(2))
    assert net.outputs == ["data"]


def test_encoded_records_native_color_gray(tmp_path):
    from netlib.data import image
    items = random_items(4, shape=(3, 9, 11), seed=4)
    bgr = [numpy.ascontiguousarray(a.transpose(1, 2, 0)) for a, _ in items]
    encoded = [(encoded_datum(image.imencode(img, "png"), label), label) for img, (_, label) in zip(bgr, items)]
    source = write_db(tmp_path / "enc", encoded)
    net = data_net(source, batch_size=4)
    net.forward()
    numpy.testing.assert_array_equal(net.blobs["data"].data, numpy.stack([a for a, _ in items]))
    numpy.testing.assert_array_equal(net.blobs["label"].data, [label for _, label in items])
    gray = data_net(source, batch_size=4, transform="force_gray: true")
    gray.forward()
    assert gray.blobs["data"].shape == (4, 1, 9, 11)
    numpy.testing.assert_array_equal(gray.blobs["data"].data[:, 0],
                                     numpy.stack([image.imdecode(image.imencode(b, "png"), "gray")[..., 0]
                                                  for b in bgr]))
    # A gray PNG decodes natively to one channel and to three with force_color.
    gray_png = image.imencode(bgr[0][..., :1], "png")
    source2 = write_db(tmp_path / "enc_gray", [(encoded_datum(gray_png, 1), 1)])
    native = data_net(source2, batch_size=1)
    assert native.blobs["data"].shape == (1, 1, 9, 11)
    color = data_net(source2, batch_size=1, transform="force_color: true")
    color.forward()
    assert color.blobs["data"].shape == (1, 3, 9, 11)
    for c in range(3):
        numpy.testing.assert_array_equal(color.blobs["data"].data[0, c], bgr[0][..., 0])


def train_net_batches(source, workers, monkeypatch, count=6):
    monkeypatch.setenv("NETLIB_DATA_WORKERS", str(workers))
    netlib.set_random_seed(77)
    net = data_net(source, batch_size=3, phase=netlib.TRAIN, transform="crop_size: 6 mirror: true")
    data, labels = read_batches(net, count)
    net.layers[0].close()
    return data, labels


def test_samples_do_not_depend_on_the_number_of_workers(tmp_path, monkeypatch):
    source = write_db(tmp_path / "db", random_items(7))
    one = train_net_batches(source, 1, monkeypatch)
    four = train_net_batches(source, 4, monkeypatch)
    numpy.testing.assert_array_equal(one[0], four[0])
    numpy.testing.assert_array_equal(one[1], four[1])
    other_seed = data_net(source, batch_size=3, phase=netlib.TRAIN, transform="crop_size: 6 mirror: true")
    assert not numpy.array_equal(read_batches(other_seed, 6)[0], one[0])


def test_state_dict_resumes_the_same_batches(tmp_path):
    source = write_db(tmp_path / "db", random_items(7))
    netlib.set_random_seed(5)
    net = data_net(source, batch_size=3, phase=netlib.TRAIN, transform="crop_size: 6 mirror: true")
    read_batches(net, 2)
    state = net.layers[0].state_dict()
    expected = read_batches(net, 4)
    other = data_net(source, batch_size=3, phase=netlib.TRAIN, transform="crop_size: 6 mirror: true")
    other.layers[0].load_state_dict(state)
    got = read_batches(other, 4)
    numpy.testing.assert_array_equal(got[0], expected[0])
    numpy.testing.assert_array_equal(got[1], expected[1])


def test_rand_skip_skips_fewer_than_rand_skip(tmp_path):
    items = random_items(20, shape=(1, 2, 2))
    source = write_db(tmp_path / "db", items)
    starts = set()
    for seed in range(12):
        netlib.set_random_seed(seed)
        net = data_net(source, batch_size=1, extra="rand_skip: 5")
        net.forward()
        first = net.blobs["data"].data[0]
        starts.add([i for i, (a, _) in enumerate(items) if numpy.array_equal(a, first)][0])
    assert starts <= set(range(5)) and len(starts) > 1


def test_worker_failure_surfaces_in_forward(tmp_path):
    items = random_items(3, shape=(1, 4, 4))
    bad = caffe_pb2.Datum(channels=1, height=4, width=4, data=b"\x00" * 15, label=1)
    source = write_db(tmp_path / "db", items + [(bad, 1)])
    net = data_net(source, batch_size=2)
    net.forward()
    with pytest.raises(netlib.NetlibError, match=r"record '00000003' .* 15 bytes .* needs 16"):
        net.forward()
    with pytest.raises(netlib.NetlibError):
        net.forward()  # stays failed, never hangs


# -- bad input ------------------------------------------------------------------------
def test_close_after_a_worker_failure_waits_for_the_running_batches():
    # Found by fuzzing: a failed batch stopped the pool without waiting, so the
    # layer's close() then released the database under a worker still reading
    # it (a segfault inside plyvel).  stop(wait=True) must wait for it.
    import threading
    import time
    from netlib.data.prefetch import Prefetcher
    started, finished = threading.Event(), threading.Event()

    def make(b):
        if b == 0:
            started.wait(5)
            raise ValueError("bad batch")
        started.set()
        time.sleep(0.3)
        finished.set()
        return b

    p = Prefetcher(make, depth=2, workers=2)
    with pytest.raises(ValueError, match="bad batch"):
        p.next()
    assert not finished.is_set()
    p.stop(wait=True)
    assert finished.is_set()


@pytest.mark.parametrize("cut", ["half", "last page", "one byte", "meta only"])
def test_truncated_lmdb_is_a_clean_error(tmp_path, cut):
    # liblmdb maps the file and would die of SIGBUS reading past its end: the
    # meta page is checked first.  In a child process, so a regression cannot
    # take the test run down with it.
    import subprocess
    import sys
    real = shared_path("reference", "caffe_made", "mnist_test_1000_lmdb", "data.mdb")
    with open(real, "rb") as fh:
        data = fh.read()
    keep = {"half": len(data) // 2, "last page": len(data) - 4096, "one byte": len(data) - 1,
            "meta only": 8192}[cut]
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(data[:keep])
    code = ("import netlib\n"
            "try:\n"
            "    netlib.Net('layer { name: \"d\" type: \"Data\" top: \"data\" data_param { source: \"%s\" "
            "backend: LMDB batch_size: 10 } }', netlib.TEST).forward()\n"
            "except netlib.NetlibError as exc:\n"
            "    print(exc)\n" % (tmp_path / "db"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "truncated" in proc.stdout and str(tmp_path / "db") in proc.stdout
    assert "needs %d" % len(data) in proc.stdout


def test_missing_and_empty_databases(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data_net(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    with create_db(str(empty), "lmdb"):
        pass
    with pytest.raises(netlib.NetlibError, match="empty"):
        data_net(str(empty))


def test_record_that_is_not_a_datum(tmp_path):
    path = str(tmp_path / "junk")
    with create_db(path, "lmdb") as db:
        db.put("k0", b"\xff\xff\xff\xff")
    with pytest.raises(netlib.NetlibError, match=r"record 'k0' .* is not a Datum"):
        data_net(path)
    path2 = str(tmp_path / "junk2")
    with create_db(path2, "lmdb") as db:
        db.put("k1", caffe_pb2.NetParameter(name="not a datum").SerializeToString())
    with pytest.raises(netlib.NetlibError, match=r"record 'k1' .* is not a Datum"):
        data_net(path2)


def test_datum_size_mismatch_names_the_record(tmp_path):
    bad = caffe_pb2.Datum(channels=3, height=4, width=4, data=b"\x00" * 40, label=1)
    source = write_db(tmp_path / "db", [(bad, 1)], keys=["img_0007"])
    with pytest.raises(netlib.NetlibError, match=r"record 'img_0007' .* 40 bytes .* 3x4x4 needs 48"):
        data_net(source)


def test_crop_larger_than_image_and_mean_mismatch(tmp_path):
    source = write_db(tmp_path / "db", random_items(2, shape=(3, 8, 8)))
    with pytest.raises(netlib.ShapeError, match="crop_size 9 is larger than the 8x8"):
        data_net(source, transform="crop_size: 9")
    mean = caffe_pb2.BlobProto(num=1, channels=3, height=7, width=7)
    mean.data.extend([0.0] * 147)
    netlib.files.write_binary_proto(str(tmp_path / "m.binaryproto"), mean)
    with pytest.raises(netlib.ShapeError, match=r"mean file .*m.binaryproto has shape \(3, 7, 7\)"):
        data_net(source, transform='mean_file: "%s"' % (tmp_path / "m.binaryproto"))


def test_missing_backend_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "plyvel":
            raise ImportError("no plyvel")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "ldb").mkdir()
    with pytest.raises(netlib.ConfigError, match="pip install plyvel"):
        data_net(str(tmp_path / "ldb"), backend="LEVELDB")


def test_snapshot_of_lmdb_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Train 12 iterations straight, and 6 + resume-from-snapshot + 6: the
    weights are identical (random crops and mirrors, 4 workers, prefetch)."""
    source = write_db(tmp_path / "db", random_items(11, shape=(3, 10, 12), seed=9))
    net = ('name: "r" layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN } '
           'transform_param { crop_size: 8 mirror: true scale: 0.01 } '
           'data_param { source: "%s" backend: LMDB batch_size: 4 } } '
           'layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST } '
           'transform_param { crop_size: 8 mirror: true scale: 0.01 } '
           'data_param { source: "%s" backend: LMDB batch_size: 3 } } '
           'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { '
           'num_output: 10 weight_filler { type: "gaussian" std: 0.01 } } } '
           'layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" } '
           'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'
           % (source, source))
    (tmp_path / "net.prototxt").write_text(net)
    monkeypatch.chdir(tmp_path)

    def solver(prefix):
        text = ('net: "net.prototxt" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: 12 display: 0 '
                'test_iter: 2 test_interval: 4 snapshot: 6 snapshot_format: HDF5 snapshot_prefix: "%s" '
                'solver_mode: CPU random_seed: 3' % prefix)
        (tmp_path / (prefix + ".prototxt")).write_text(text)
        return netlib.get_solver(prefix + ".prototxt")

    straight = solver("a")
    straight.solve()
    first = solver("b")
    first.step(6)  # writes b_iter_6.*
    first.step(3)  # reads on past the snapshot before the resume
    resumed = solver("c")
    resumed.restore("b_iter_6.solverstate.h5")
    resumed.step(6)
    for name in straight.net.params:
        for a, c in zip(straight.net.params[name], resumed.net.params[name]):
            numpy.testing.assert_array_equal(a.data, c.data)
    assert resumed.net.layers[0].batch == straight.net.layers[0].batch == 12


def test_prefetch_threads_stop_with_the_net(tmp_path):
    import gc
    import threading
    import time
    source = write_db(tmp_path / "db", random_items(5, shape=(1, 4, 4)))

    def workers():
        return [t for t in threading.enumerate() if t.name.startswith("netlib-stopme")]

    text = ('name: "d" layer { name: "stopme" type: "Data" top: "data" data_param { source: "%s" '
            'backend: LMDB batch_size: 2 } }' % source)
    net = netlib.Net(text, netlib.TEST)
    net.forward()
    assert workers()
    del net  # a worker busy on a batch holds the layer: collect until none does
    deadline = time.time() + 10
    while workers() and time.time() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not workers()
    closed = netlib.Net(text, netlib.TEST)
    closed.layers[0].close()
    assert not workers()
    assert closed.layers[0].db is None  # the database is released too
    closed.forward()  # a closed layer starts again where it stopped
    assert closed.layers[0].batch == 1
    closed.close()
    assert not workers()


def test_raw_datum_fast_path_agrees_with_protobuf():
    from netlib.data.datum import raw_datum
    rng = numpy.random.default_rng(0)
    for label in (0, 7, -1, -123456, 2 ** 31 - 1):
        d = array_to_datum(rng.integers(0, 256, size=(2, 3, 4)).astype(numpy.uint8), label)
        c, h, w, got_label, pixels = raw_datum(d.SerializeToString())
        assert (c, h, w, got_label) == (2, 3, 4, label) and bytes(pixels) == d.data
    assert raw_datum(array_to_datum(numpy.zeros((1, 2, 2), numpy.float32), 1).SerializeToString()) is None
    assert raw_datum(encoded_datum(b"\x89PNG....", 1).SerializeToString()) is None
    assert raw_datum(caffe_pb2.NetParameter(name="x").SerializeToString()) is None
    assert raw_datum(b"\x22\xff\xff") is None  # truncated length


def test_data_top_takes_the_batch_buffer_and_later_layers_follow(tmp_path):
    """The batch buffer becomes the top's (no copy, as Caffe's set_cpu_data);
    a Flatten after it shares the new buffer on every forward."""
    items = random_items(6, shape=(1, 2, 3))
    source = write_db(tmp_path / "db", items)
    net = netlib.Net('name: "d" layer { name: "data" type: "Data" top: "data" top: "label" data_param { '
                     'source: "%s" backend: LMDB batch_size: 2 } } layer { name: "flat" type: "Flatten" '
                     'bottom: "data" top: "flat" }' % source, netlib.TEST)
    for k in range(5):
        net.forward()
        expected = numpy.stack([items[(2 * k + j) % 6][0] for j in range(2)]).astype(numpy.float32)
        numpy.testing.assert_array_equal(net.blobs["data"].data, expected)
        numpy.testing.assert_array_equal(net.blobs["flat"].data, expected.reshape(2, 6))
    blob = netlib.Blob((2, 3))
    blob.set_data(numpy.arange(6, dtype=numpy.float32))
    numpy.testing.assert_array_equal(blob.data, [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(netlib.ShapeError):
        blob.set_data(numpy.zeros(5, numpy.float32))
