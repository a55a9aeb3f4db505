"""Caffe's data tools: convert_imageset, compute_image_mean, extract_features,
the MNIST and CIFAR-10 converters (LMDB/LevelDB layouts of Caffe's own tools).

Records are read back with open_db/parse_datum/datum_to_array and checked
against independent decodes (Pillow directly, cv2 when it is installed), the
IDX/CIFAR bytes and real Caffe's files in ../shared/reference/caffe_made.
"""
import gzip
import logging
import os

import numpy
import pytest

from conftest import shared_path

import netlib
from netlib.data import image
from netlib.data.datum import datum_to_array, parse_datum
from netlib.data.db import DatabaseError, open_db
from netlib.errors import ConfigError, NetlibFileNotFoundError
from netlib.files import read_binary_proto
from netlib.proto import caffe_pb2
from netlib.tools import cifar10, cli, mnist
from netlib.tools.compute_image_mean import compute_image_mean, mean_array
from netlib.tools.convert_imageset import convert_imageset, read_list
from netlib.tools.extract_features import extract_features

BACKENDS = ("lmdb", "leveldb")
IMAGES = (("cat.jpg", 0), ("cat_gray.jpg", 1), ("fish-bike.jpg", 2))


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")


def images_root():
    return shared_path("data", "images") + os.sep


def write_list(tmp_path, entries, name="list.txt"):
    path = tmp_path / name
    path.write_text("".join("%s %d\n" % e for e in entries))
    return str(path)


def read_db(path, backend):
    with open_db(str(path), backend) as db:
        return [(key, parse_datum(value, key)) for key, value in db]


def pil_hwc(path, gray=False):
    """Pillow's decode, independent of netlib: (H, W, C) uint8, BGR or grey.

    Grey from a colour JPEG is libjpeg's own Y output (draft('L')), which is
    what cv::imread(IMREAD_GRAYSCALE) returns for JPEG files."""
    from PIL import Image
    with Image.open(path) as img:
        if gray:
            img.draft("L", img.size)
            return numpy.asarray(img.convert("L"))[:, :, None]
        return numpy.asarray(img.convert("RGB"))[:, :, ::-1]


def pil_native_chw(path):
    from PIL import Image
    with Image.open(path) as img:
        if img.mode == "L":
            return numpy.asarray(img)[None]
        return numpy.asarray(img.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)


def chw(hwc):
    return numpy.ascontiguousarray(hwc.transpose(2, 0, 1))


# -- convert_imageset --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_imageset_raw(tmp_path, backend):
    root = images_root()
    db = tmp_path / "db"
    assert convert_imageset(root, write_list(tmp_path, IMAGES), str(db), backend=backend) == 3
    records = read_db(db, backend)
    assert [k for k, _ in records] == [b"%08d_%s" % (i, n.encode()) for i, (n, _) in enumerate(IMAGES)]
    for (key, datum), (name, label) in zip(records, IMAGES):
        assert datum.label == label and not datum.encoded and datum.HasField("encoded")
        expected = chw(pil_hwc(root + name))
        assert (datum.channels, datum.height, datum.width) == expected.shape
        numpy.testing.assert_array_equal(datum_to_array(datum, key), expected)
        # Caffe's CVMatToDatum field set, serialized in field order: ... data, label, encoded: false.
        assert datum.SerializeToString().endswith(b"\x28" + bytes([label]) + b"\x38\x00")
    try:
        import cv2
    except ImportError:
        return
    for (key, datum), (name, _) in zip(records, IMAGES):
        numpy.testing.assert_array_equal(datum_to_array(datum, key), chw(cv2.imread(root + name)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_imageset_encoded_keeps_the_files(tmp_path, backend):
    root = images_root()
    db = tmp_path / "db"
    convert_imageset(root, write_list(tmp_path, IMAGES), str(db), backend=backend, encoded=True)
    for (key, datum), (name, label) in zip(read_db(db, backend), IMAGES):
        assert datum.encoded and datum.label == label
        assert not datum.HasField("channels")
        with open(root + name, "rb") as f:
            assert datum.data == f.read()  # the file itself (extension matches, no resize)
        numpy.testing.assert_array_equal(datum_to_array(datum, key, "native"), pil_native_chw(root + name))


def test_convert_imageset_resized(tmp_path):
    cv2 = pytest.importorskip("cv2")
    root = images_root()
    height, width = 37, 53
    raw, png, jpg = tmp_path / "raw", tmp_path / "png", tmp_path / "jpg"
    listfile = write_list(tmp_path, IMAGES)
    convert_imageset(root, listfile, str(raw), resize_height=height, resize_width=width)
    convert_imageset(root, listfile, str(png), resize_height=height, resize_width=width, encode_type="png")
    convert_imageset(root, listfile, str(jpg), resize_height=height, resize_width=width, encoded=True)
    for (key, datum), (_, p), (_, j), (name, label) in zip(read_db(raw, "lmdb"), read_db(png, "lmdb"),
                                                             read_db(jpg, "lmdb"), IMAGES):
        # image.py documents resize as bit for bit equal to cv2.resize INTER_LINEAR: tolerance 0.
        expected = chw(cv2.resize(pil_hwc(root + name), (width, height), interpolation=cv2.INTER_LINEAR))
        assert (datum.channels, datum.height, datum.width) == (3, height, width)
        numpy.testing.assert_array_equal(datum_to_array(datum, key), expected)
        assert p.encoded and p.label == label and p.data[:8] == b"\x89PNG\r\n\x1a\n"
        numpy.testing.assert_array_equal(datum_to_array(p, key, "color"), expected)  # lossless
        assert j.encoded and j.data[:2] == b"\xff\xd8"  # re-encoded JPEG (lossy): shape only
        with open(root + name, "rb") as f:
            assert j.data != f.read()
        assert datum_to_array(j, key, "color").shape == (3, height, width)


def test_convert_imageset_gray(tmp_path):
    root = images_root()
    raw, enc = tmp_path / "raw", tmp_path / "enc"
    listfile = write_list(tmp_path, IMAGES)
    convert_imageset(root, listfile, str(raw), gray=True, backend="leveldb")
    convert_imageset(root, listfile, str(enc), gray=True, encoded=True)
    for (key, datum), (_, e), (name, _) in zip(read_db(raw, "leveldb"), read_db(enc, "lmdb"), IMAGES):
        expected = chw(pil_hwc(root + name, gray=True))
        assert datum.channels == 1
        numpy.testing.assert_array_equal(datum_to_array(datum, key), expected)
        # Caffe stores the file itself even with --gray; decode it grey to get the same pixels.
        with open(root + name, "rb") as f:
            assert e.data == f.read()
        numpy.testing.assert_array_equal(datum_to_array(e, key, "gray"), expected)
    try:
        import cv2
    except ImportError:
        return
    for (key, datum), (name, _) in zip(read_db(raw, "leveldb"), IMAGES):
        numpy.testing.assert_array_equal(datum_to_array(datum, key)[0],
                                         cv2.imread(root + name, cv2.IMREAD_GRAYSCALE))


def test_convert_imageset_shuffle(tmp_path):
    root = images_root()
    entries = IMAGES + (("cat.jpg", 7), ("fish-bike.jpg", 8))
    seed = next(s for s in range(100) if list(numpy.random.Generator(numpy.random.PCG64(s))
                                                   .permutation(len(entries))) != list(range(len(entries))))
    netlib.set_random_seed(seed)
    order = numpy.random.Generator(numpy.random.PCG64(seed)).permutation(len(entries))
    db = tmp_path / "db"
    assert convert_imageset(root, write_list(tmp_path, entries), str(db), shuffle=True,
                            resize_height=8, resize_width=8) == 5
    records = read_db(db, "lmdb")
    shuffled = [entries[i] for i in order]
    assert [k for k, _ in records] == [b"%08d_%s" % (i, n.encode()) for i, (n, _) in enumerate(shuffled)]
    assert [d.label for _, d in records] == [label for _, label in shuffled]
    assert [d.label for _, d in records] != [label for _, label in entries]


def test_convert_imageset_check_size(tmp_path):
    root = images_root()
    listfile = write_list(tmp_path, IMAGES)
    with pytest.raises(ConfigError, match="fish-bike.jpg.*3x323x481.*cat.jpg"):
        convert_imageset(root, listfile, str(tmp_path / "db"), check_size=True)
    assert os.listdir(tmp_path) == ["list.txt"]  # no database, no temporary folder
    assert convert_imageset(root, listfile, str(tmp_path / "ok"), check_size=True,
                            resize_height=20, resize_width=30) == 3


def test_convert_imageset_skips_unreadable_images(tmp_path, caplog):
    root = images_root()
    listfile = write_list(tmp_path, (IMAGES[0], ("no_such.jpg", 5), IMAGES[2]))
    with caplog.at_level(logging.INFO, logger="netlib"):
        assert convert_imageset(root, listfile, str(tmp_path / "db")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("Could not open or find file %sno_such.jpg" % root) for m in errors)
    assert any("1 of 3 images could not be read" in m for m in errors)
    # Caffe's keys keep the line numbers: the skipped line leaves a gap.
    assert [k for k, _ in read_db(tmp_path / "db", "lmdb")] == [b"00000000_cat.jpg", b"00000002_fish-bike.jpg"]


def test_convert_imageset_interrupted_leaves_no_database(tmp_path, monkeypatch):
    calls = []
    real = image.imread

    def imread(path, color=True):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, color)

    monkeypatch.setattr(image, "imread", imread)
    for backend in BACKENDS:
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            convert_imageset(images_root(), write_list(tmp_path, IMAGES), str(tmp_path / "db"), backend=backend)
        assert os.listdir(tmp_path) == ["list.txt"]


def test_convert_imageset_commits_every_1000(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(image, "imread", lambda path, color=True: numpy.full((2, 3, 3), len(path), numpy.uint8))
    listfile = tmp_path / "many.txt"
    listfile.write_text("".join("img%d.png %d\n" % (i, i % 10) for i in range(1001)))
    with caplog.at_level(logging.INFO, logger="netlib"):
        assert convert_imageset("r/", str(listfile), str(tmp_path / "db"), backend="leveldb") == 1001
    assert "Processed 1000 files." in caplog.text and "Processed 1001 files." in caplog.text
    with open_db(str(tmp_path / "db"), "leveldb") as db:
        assert len(db) == 1001 and db.keys[1000] == b"00001000_img1000.png"
        assert parse_datum(db.value(1000)).label == 0


def test_convert_imageset_refuses_an_existing_database(tmp_path):
    (tmp_path / "db").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        convert_imageset(images_root(), write_list(tmp_path, IMAGES), str(tmp_path / "db"))


def test_read_list_splits_at_the_last_space(tmp_path):
    path = tmp_path / "l.txt"
    path.write_bytes(b"a b/c d.jpg 12\nplain.jpg\nx.png -3\r\n")
    assert read_list(str(path)) == [("a b/c d.jpg", 12), ("plain.jpg", 0), ("x.png", -3)]
    with pytest.raises(NetlibFileNotFoundError, match="nope.txt"):
        read_list(str(tmp_path / "nope.txt"))


def test_gflags_booleans():
    from netlib.tools.cli import UsageError
    from netlib.tools.convert_imageset import _split_bool_flags
    values, rest = _split_bool_flags(["--gray", "-shuffle=false", "--check_size=True", "--noencoded", "a/", "-x",
                                      "--backend=lmdb"])
    assert values == {"gray": True, "shuffle": False, "check_size": True, "encoded": False}
    assert rest == ["a/", "-x", "--backend=lmdb"]
    with pytest.raises(UsageError, match="--nogray takes no value"):
        _split_bool_flags(["--nogray=1"])


def test_convert_imageset_command_line(tmp_path, capsys):
    root = images_root()
    listfile = write_list(tmp_path, IMAGES)
    db = str(tmp_path / "db")
    code = cli.main(["convert_imageset", "--backend=leveldb", "-resize_width", "16", "--resize_height=12",
                     "--gray=false", "--noshuffle", "--encoded=true", "--encode_type", "png", root, listfile, db])
    assert code == 0, capsys.readouterr().err
    records = read_db(db, "leveldb")
    assert len(records) == 3 and all(d.encoded for _, d in records)
    assert datum_to_array(records[0][1], "r", "native").shape == (3, 12, 16)
    assert cli.main(["convert_imageset", "--gray", root, listfile, str(tmp_path / "g")]) == 0
    assert read_db(tmp_path / "g", "lmdb")[0][1].channels == 1
    capsys.readouterr()
    for argv, fragment in ((["--bogus", root, listfile, str(tmp_path / "x")], "--bogus"),
                           ([root, str(tmp_path / "missing.txt"), str(tmp_path / "x")], "missing.txt"),
                           (["--gray=maybe", root, listfile, str(tmp_path / "x")], "--gray"),
                           ([root, listfile], "ROOTFOLDER/ LISTFILE DB_NAME"),
                           ([root, listfile, db], "already exists")):
        code = cli.main(["convert_imageset"] + argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("netlib: error:")]
        assert code == 1 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "x").exists()


def test_tool_scripts_run_from_the_checkout(tmp_path):
    import subprocess
    import sys
    folder = shared_path("reference", "caffe_made", "mnist_test_1000_lmdb")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    out = str(tmp_path / "mean.binaryproto")
    run = subprocess.run([sys.executable, os.path.join(script, "compute_image_mean"), "-backend", "lmdb", folder, out],
                         capture_output=True, text=True, env=dict(os.environ, NETLIB_NO_PROGRESS="1"))
    assert run.returncode == 0, run.stderr
    assert "mean_value channel [0]: 31.1775" in run.stderr and os.path.isfile(out)
    for name in ("convert_imageset", "compute_image_mean", "extract_features"):
        assert os.access(os.path.join(script, name), os.X_OK)


# -- compute_image_mean --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_image_mean_equals_caffe(tmp_path, backend, capsys):
    folder = shared_path("reference", "caffe_made")
    reference = read_binary_proto(os.path.join(folder, "mnist_test_1000_mean.binaryproto"),
                                  caffe_pb2.BlobProto())
    ref = numpy.asarray(reference.data, dtype=numpy.float32).reshape(1, 28, 28)
    out = str(tmp_path / "mean.binaryproto")
    code = cli.main(["compute_image_mean", "--backend", backend,
                     os.path.join(folder, "mnist_test_1000_%s" % backend), out])
    err = capsys.readouterr().err
    assert code == 0, err
    blob = read_binary_proto(out, caffe_pb2.BlobProto())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 1, 28, 28)
    assert not blob.HasField("shape")
    numpy.testing.assert_array_equal(mean_array(blob), ref)  # bit for bit
    assert "] mean_value channel [0]: 31.1775\n" in err  # Caffe's log line
    images = mnist.read_idx(shared_path("data", "mnist", "t10k-images-idx3-ubyte.gz"))[:1000]
    numpy.testing.assert_allclose(mean_array(blob)[0], images.astype(numpy.float64).mean(axis=0), atol=1e-4,
                                  rtol=0)


def test_compute_image_mean_encoded_equals_raw(tmp_path):
    root = images_root()
    listfile = write_list(tmp_path, IMAGES)
    kw = dict(resize_height=24, resize_width=32)
    convert_imageset(root, listfile, str(tmp_path / "raw"), **kw)
    convert_imageset(root, listfile, str(tmp_path / "png"), backend="leveldb", encode_type="png", **kw)
    raw = compute_image_mean(str(tmp_path / "raw"), "lmdb")
    png = compute_image_mean(str(tmp_path / "png"), "leveldb")
    assert (png.num, png.channels, png.height, png.width) == (1, 3, 24, 32)
    numpy.testing.assert_array_equal(mean_array(raw), mean_array(png))
    pixels = numpy.stack([datum_to_array(d, k) for k, d in read_db(tmp_path / "raw", "lmdb")])
    expected = (pixels[0].astype(numpy.float32) + pixels[1] + pixels[2]) / numpy.float32(3)
    numpy.testing.assert_array_equal(mean_array(raw), expected)
    assert convert_imageset(root, write_list(tmp_path, (), "empty.txt"), str(tmp_path / "none")) == 0
    with pytest.raises(DatabaseError, match="empty"):
        compute_image_mean(str(tmp_path / "none"), "lmdb")


# -- extract_features --------------------------------------------------------------------------------
NET = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "%s" batch_size: 2 backend: LEVELDB }
  transform_param { scale: 0.00390625 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 }
                        bias_filler { type: "gaussian" std: 1 } } }
"""


@pytest.fixture
def tiny_net(tmp_path):
    rng = numpy.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 2, 3), dtype=numpy.uint8)
    mnist.write_db(images, numpy.arange(5), str(tmp_path / "src"), "leveldb")
    model = tmp_path / "tiny.prototxt"
    model.write_text(NET % (tmp_path / "src"))
    netlib.set_random_seed(5)
    net = netlib.Net(str(model), netlib.TEST)
    weights = str(tmp_path / "tiny.caffemodel")
    net.save(weights)
    # The reference: the same net forwarded 3 times (batches of 2 over 5 records, wrapping around).
    expected = {"ip": [], "data": []}
    for _ in range(3):
        net.forward()
        for name in expected:
            expected[name].append(net.blobs[name].data.copy())
    x = images.reshape(5, 1, 2, 3).astype(numpy.float32) * numpy.float32(0.00390625)
    order = [0, 1, 2, 3, 4, 0]
    numpy.testing.assert_array_equal(numpy.concatenate(expected["data"]), x[order])
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    numpy.testing.assert_allclose(numpy.concatenate(expected["ip"]), x[order].reshape(6, -1) @ w.T + b,
                                  rtol=1e-5, atol=1e-6)
    return str(model), weights, {k: numpy.concatenate(v) for k, v in expected.items()}


def test_extract_features_lmdb_and_hdf5(tmp_path, tiny_net, capsys):
    h5py = pytest.importorskip("h5py")
    model, weights, expected = tiny_net
    ip_db, data_db = str(tmp_path / "ip_lmdb"), str(tmp_path / "data_lmdb")
    assert cli.main(["extract_features", weights, model, "ip,data", ip_db + "," + data_db, "3", "lmdb",
                     "CPU"]) == 0, capsys.readouterr().err
    for path, name, shape in ((ip_db, "ip", (3, 1, 1)), (data_db, "data", (1, 2, 3))):
        records = read_db(path, "lmdb")
        assert [k for k, _ in records] == [b"%010d" % i for i in range(6)]
        for (key, datum), want in zip(records, expected[name]):
            assert (datum.channels, datum.height, datum.width) == shape and not datum.HasField("label")
            assert not datum.data
            numpy.testing.assert_array_equal(datum_to_array(datum, key), want.reshape(shape))
    # A feature database is a database like any other: its mean is the float32 mean.
    mean = mean_array(compute_image_mean(ip_db, "lmdb"))
    acc = numpy.zeros(3, numpy.float32)
    for row in expected["ip"]:
        acc += row
    numpy.testing.assert_array_equal(mean.reshape(3), acc / numpy.float32(6))

    counts = extract_features(weights, model, ["ip", "data"], [str(tmp_path / "ip.h5"), str(tmp_path / "d.h5")],
                              3, "hdf5")
    assert counts == {"ip": 6, "data": 6}
    with h5py.File(str(tmp_path / "ip.h5"), "r") as f:
        assert f["data"].dtype == numpy.float32 and f["data"].shape == (6, 3)
        numpy.testing.assert_array_equal(f["data"][()], expected["ip"])
    with h5py.File(str(tmp_path / "d.h5"), "r") as f:
        numpy.testing.assert_array_equal(f["data"][()], expected["data"])


def test_extract_features_errors(tmp_path, tiny_net, capsys):
    model, weights, _ = tiny_net
    out = str(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"Unknown feature blob name fc7 .*its blobs are: data, label, ip"):
        extract_features(weights, model, "fc7", out, 1, "leveldb")
    with pytest.raises(ConfigError, match="must be equal"):
        extract_features(weights, model, "ip,data", out, 1)
    assert not os.path.exists(out)
    for argv, fragment in (([weights, model, "ip"], "NUM_MINI_BATCHES"),
                           ([weights, model, "ip", out, "two"], "NUM_MINI_BATCHES"),
                           ([weights, model, "ip", out, "1", "sqlite"], "sqlite")):
        code = cli.main(["extract_features"] + argv)
        err = capsys.readouterr().err
        assert code == 1 and err.count("netlib: error:") == 1 and fragment in err, err
    assert not os.path.exists(out)
    if netlib.backend.cupy is None:  # GPU asked for without CuPy: a clear error, CPU mode kept
        with pytest.raises(ConfigError, match="CuPy"):
            extract_features(weights, model, "ip", out, 1, "lmdb", "GPU", 0)
        assert netlib.backend.default_xp() is numpy and not os.path.exists(out)
    assert cli.main(["extract_features", "--help"]) == 0
    assert "NUM_MINI_BATCHES" in capsys.readouterr().out


# -- MNIST ---------------------------------------------------------------------------------------------
def write_idx(path, array):
    code = {numpy.dtype(numpy.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + numpy.asarray(array.shape, dtype=">u4").tobytes()
    with open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_small_idx_files(tmp_path, backend):
    rng = numpy.random.default_rng(2)
    src = tmp_path / "idx"
    src.mkdir()
    sets = {}
    for prefix, n in (("train", 4), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=numpy.uint8)
        labels = rng.integers(0, 10, size=n, dtype=numpy.uint8)
        write_idx(src / ("%s-images-idx3-ubyte" % prefix), images)
        write_idx(src / ("%s-labels-idx1-ubyte" % prefix), labels)
        sets[prefix] = images, labels
    out = tmp_path / "out"
    train, test = mnist.convert(str(src), str(out), backend=backend)
    assert (train, test) == (str(out / ("mnist_train_%s" % backend)), str(out / ("mnist_test_%s" % backend)))
    for path, prefix in ((train, "train"), (test, "t10k")):
        images, labels = sets[prefix]
        records = read_db(path, backend)
        assert [k for k, _ in records] == [b"%08d" % i for i in range(len(labels))]
        for (key, datum), img, label in zip(records, images, labels):
            assert (datum.channels, datum.height, datum.width, datum.label) == (1, 28, 28, label)
            assert datum.data == img.tobytes() and not datum.HasField("encoded")
    with pytest.raises(ConfigError, match="already exists"):
        mnist.convert(str(src), str(out), backend=backend)
    lists = mnist.convert(str(src), str(tmp_path / "h5"), backend="hdf5")
    assert lists == (str(tmp_path / "h5" / "mnist_train_h5.txt"), str(tmp_path / "h5" / "mnist_test_h5.txt"))
    with pytest.raises(ConfigError, match="sqlite"):
        mnist.convert(str(src), str(tmp_path / "x"), backend="sqlite")


def test_mnist_real_files_match_caffe(tmp_path, capsys):
    src = shared_path("data", "mnist")
    reference = shared_path("reference", "caffe_made", "mnist_test_1000_lmdb")
    out = tmp_path / "mnist"
    assert cli.main(["data", "mnist", "--from", src, "--out", str(out)]) == 0, capsys.readouterr().err
    with gzip.open(os.path.join(src, "train-images-idx3-ubyte.gz"), "rb") as f:
        raw = f.read(16 + 784 * 3)
    with open_db(str(out / "mnist_train_lmdb")) as db:
        assert len(db) == 60000 and db.keys[-1] == b"00059999"
        for i in range(3):
            datum = parse_datum(db.value(i))
            assert datum.data == raw[16 + 784 * i:16 + 784 * (i + 1)]
        assert [parse_datum(db.value(i)).label for i in range(5)] == [5, 0, 4, 1, 9]
    # Real Caffe's convert_mnist_data wrote the first 1000 test images: the same bytes, record for record.
    with open_db(str(out / "mnist_test_lmdb")) as ours, open_db(reference) as caffe:
        assert len(ours) == 10000 and len(caffe) == 1000
        for key, value in caffe:
            assert ours.get(key) == value


# -- CIFAR-10 ------------------------------------------------------------------------------------------
def write_cifar(folder, counts, rng):
    folder.mkdir()
    records = {}
    for name, n in counts.items():
        labels = rng.integers(0, 10, size=n, dtype=numpy.uint8)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=numpy.uint8)
        (folder / name).write_bytes(numpy.concatenate([labels[:, None], pixels], axis=1).tobytes())
        records[name] = labels, pixels
    return records


@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar10_small_batches(tmp_path, backend, caplog):
    counts = {"data_batch_1.bin": 3, "data_batch_2.bin": 2, "data_batch_3.bin": 3, "data_batch_4.bin": 1,
              "data_batch_5.bin": 3, "test_batch.bin": 2}
    records = write_cifar(tmp_path / "bin", counts, numpy.random.default_rng(4))
    with caplog.at_level(logging.INFO, logger="netlib"):
        train, test = cifar10.convert(str(tmp_path / "bin"), str(tmp_path / "out"), backend=backend)
    assert "data_batch_2.bin: 2 images" in caplog.text
    assert train == str(tmp_path / "out" / ("cifar10_train_%s" % backend))
    assert test == str(tmp_path / "out" / ("cifar10_test_%s" % backend))
    train_labels = numpy.concatenate([records["data_batch_%d.bin" % i][0] for i in range(1, 6)])
    train_pixels = numpy.concatenate([records["data_batch_%d.bin" % i][1] for i in range(1, 6)])
    for path, labels, pixels in ((train, train_labels, train_pixels), (test,) + records["test_batch.bin"]):
        got = read_db(path, backend)
        assert [k for k, _ in got] == [b"%05d" % i for i in range(len(labels))]
        for (key, datum), label, row in zip(got, labels, pixels):
            assert (datum.channels, datum.height, datum.width, datum.label) == (3, 32, 32, label)
            assert datum.data == row.tobytes()  # R, G, B planes as stored: Caffe keeps RGB
            numpy.testing.assert_array_equal(datum_to_array(datum, key)[0], row[:1024].reshape(32, 32))


def test_cifar10_errors(tmp_path, capsys):
    counts = {"data_batch_%d.bin" % i: 1 for i in range(1, 6)}
    write_cifar(tmp_path / "bin", counts, numpy.random.default_rng(0))
    out = tmp_path / "out"
    with pytest.raises(NetlibFileNotFoundError, match="test_batch.bin"):
        cifar10.convert(str(tmp_path / "bin"), str(out))
    (tmp_path / "bin" / "test_batch.bin").write_bytes(b"\0" * 3074)
    with pytest.raises(ConfigError, match="test_batch.bin holds 3074 bytes"):
        cifar10.convert(str(tmp_path / "bin"), str(out))
    assert not out.exists()
    (tmp_path / "bin" / "test_batch.bin").write_bytes(b"\0" * 3073)
    code = cli.main(["data", "cifar10", "--from", str(tmp_path / "bin"), "--out", str(out), "--backend", "leveldb"])
    assert code == 0, capsys.readouterr().err
    assert len(read_db(out / "cifar10_train_leveldb", "leveldb")) == 5
    capsys.readouterr()
    code = cli.main(["data", "cifar10", "--from", str(tmp_path / "nowhere"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("netlib: error:") == 1 and "nowhere" in err
