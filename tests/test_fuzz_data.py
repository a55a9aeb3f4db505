"""Fuzzing the data readers with mutations of real files (hypothesis).

The same property as tests/test_fuzz_readers.py (:func:`fuzzing.check`): each
mutated input loads, or raises a :class:`netlib.errors.NetlibError` whose
message names the file (or the database, or the list that named the image);
never another exception type, never a hang (10 s per case), never more than
1 GiB per case.  Readers, each through the layer a user runs:

* Datum records in LMDB and LevelDB databases (Data layer): a raw MNIST record
  from the real Caffe-made database, encoded PNG and JPEG records and a
  float_data record, each mutated and stored next to an intact record;
* LevelDB's own files (the real database's log, MANIFEST and CURRENT);
* image files (JPEG, PNG, gray JPEG; Pillow and OpenCV backends; colour and
  gray), image lists (ImageData) and window files (WindowData);
* MNIST's IDX files, gzipped and plain (``netlib data mnist``).

A long run (counts per reader written as JSON)::

    NETLIB_FUZZ_EXAMPLES=10000 NETLIB_FUZZ_REPORT=fuzz.json python -m pytest -q tests/test_fuzz_data.py
"""
import gzip
import os
import shutil

import numpy
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the test extra)")
from hypothesis import given, strategies as st  # noqa: E402

import netlib  # noqa: E402
from conftest import SHARED  # noqa: E402
from fuzzing import FUZZ, check, mutated, need, write, module_setup  # noqa: E402
from netlib.data import image as _image  # noqa: E402
from netlib.data.datum import array_to_datum, encoded_datum  # noqa: E402
from netlib.data.db import create_db, open_db  # noqa: E402
from netlib.tools import mnist  # noqa: E402

IMAGES = os.path.join(SHARED, "data", "images") + os.sep
CIFAR_PNG = os.path.join(SHARED, "reference", "models", "cifar10_quick_trained_binaryproto", "cat10.png")
CAFFE_MADE = os.path.join(SHARED, "reference", "caffe_made")
MNIST = os.path.join(SHARED, "data", "mnist")


@pytest.fixture(scope="module", autouse=True)
def _module():
    with module_setup():
        yield


def _bytes(path):
    with open(need(path), "rb") as fh:
        return fh.read()


def _forward(text, phase, count):
    """Build the net, run ``count`` forwards, and stop its data threads
    (whatever happens: no thread of one case may run into the next)."""
    net = None
    try:
        net = netlib.Net(text, phase)
        for _ in range(count):
            net.forward()
    finally:
        if net is not None:
            net.layers[0].close()


# -- Datum records ---------------------------------------------------------------------
def _record(kind):
    if kind == "raw":
        pytest.importorskip("lmdb")
        db = open_db(need(os.path.join(CAFFE_MADE, "mnist_test_1000_lmdb")), "lmdb")
        try:
            return bytes(db.value(0))
        finally:
            db.close()
    if kind == "png":
        return encoded_datum(_bytes(CIFAR_PNG), label=3).SerializeToString()
    if kind == "jpeg":
        pytest.importorskip("PIL")
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.open(need(IMAGES + "fish-bike.jpg")).resize((40, 30)).save(buf, "JPEG")
        return encoded_datum(buf.getvalue(), label=1).SerializeToString()
    rng = numpy.random.default_rng(0)
    return array_to_datum(rng.standard_normal((2, 5, 4)).astype(numpy.float32), label=2).SerializeToString()


@pytest.mark.parametrize("backend", ["LMDB", "LEVELDB"])
@pytest.mark.parametrize("kind", ["raw", "png", "jpeg", "float"])
def test_fuzz_datum_records(tmp_path, kind, backend):
    pytest.importorskip("lmdb" if backend == "LMDB" else "plyvel")
    good = _record(kind)
    counter = iter(range(10 ** 9))

    @FUZZ
    @given(mutated(good), st.booleans(), st.integers(1, 2))
    def run(record, first, batch_size):
        source = str(tmp_path / ("db%d" % next(counter)))
        with create_db(source, backend.lower()) as db:
            db.put(b"00000000", record if first else good)
            db.put(b"00000001", good if first else record)
        text = ('layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "%s" '
                'backend: %s batch_size: %d } }' % (source, backend, batch_size))

        check(source, lambda: _forward(text, netlib.TEST, 2), "Datum record %s %s" % (kind, backend))
        shutil.rmtree(source, ignore_errors=True)
    run()


@pytest.mark.parametrize("name", ["000003.log", "MANIFEST-000002", "CURRENT"])
def test_fuzz_leveldb_files(tmp_path, name):
    pytest.importorskip("plyvel")
    real = need(os.path.join(CAFFE_MADE, "mnist_test_1000_leveldb"))
    base = _bytes(os.path.join(real, name))
    counter = iter(range(10 ** 9))

    @FUZZ
    @given(mutated(base))
    def run(data):
        source = str(tmp_path / ("db%d" % next(counter)))
        shutil.copytree(real, source)
        os.chmod(source, 0o755)
        for f in os.listdir(source):
            os.chmod(os.path.join(source, f), 0o644)
        write(os.path.join(source, name), data)
        text = ('layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "%s" '
                'backend: LEVELDB batch_size: 500 } }' % source)

        check(source, lambda: _forward(text, netlib.TEST, 3), "LevelDB file %s" % name)
        shutil.rmtree(source, ignore_errors=True)
    run()


# -- images, image lists, window files -------------------------------------------------
@pytest.fixture(params=["pillow", "opencv"])
def backend(request):
    if request.param == "opencv":
        pytest.importorskip("cv2")
    pytest.importorskip("PIL")
    old = _image.get_backend()
    _image.set_backend(request.param)
    yield request.param
    _image.set_backend(old)


@pytest.mark.parametrize("path", [IMAGES + "cat.jpg", IMAGES + "cat_gray.jpg", CIFAR_PNG],
                         ids=["jpeg", "gray-jpeg", "png"])
def test_fuzz_image_files(tmp_path, path, backend):
    base = _bytes(path)
    other = _bytes(CIFAR_PNG)
    suffix = os.path.splitext(path)[1]

    @FUZZ
    @given(mutated(base, other), st.booleans())
    def run(data, color):
        fuzzed = write(tmp_path / ("fuzzed" + suffix), data)
        check(fuzzed, lambda: _image.imread(fuzzed, color), "image %s %s" % (suffix, backend))
    run()


def test_fuzz_image_lists(tmp_path):
    pytest.importorskip("PIL")
    need(IMAGES + "cat.jpg")
    base = b"cat.jpg 0\nfish-bike.jpg 1\ncat_gray.jpg 2\n"
    other = b"fish-bike.jpg 7\r\n\ncat.jpg -3\n"

    @FUZZ
    @given(mutated(base, other, text=True))
    def run(data):
        source = write(tmp_path / "list.txt", data)
        text = ('layer { name: "data" type: "ImageData" top: "data" top: "label" image_data_param { '
                'source: "%s" root_folder: "%s" batch_size: 2 new_height: 16 new_width: 20 } }'
                % (source, IMAGES))

        check(source, lambda: _forward(text, netlib.TEST, 2), "image list")
    run()


def _window_file():
    from PIL import Image
    entries = []
    for index, name in enumerate(["cat.jpg", "fish-bike.jpg"]):
        w, h = Image.open(need(IMAGES + name)).size
        windows = ["%d 0.9 10 20 200 150" % (index + 1), "0 0.1 0 0 %d %d" % (w // 3, h // 3),
                   "2 0.4 5 5 50 50"]
        entries.append("# %d\n%s\n3\n%d\n%d\n%d\n%s\n" % (index, IMAGES + name, h, w, len(windows),
                                                         "\n".join(windows)))
    return "".join(entries).encode()


@pytest.mark.parametrize("cache", [False, True])
def test_fuzz_window_files(tmp_path, cache):
    pytest.importorskip("PIL")
    base = _window_file()

    @FUZZ
    @given(mutated(base, text=True))
    def run(data):
        source = write(tmp_path / "windows.txt", data)
        text = ('layer { name: "data" type: "WindowData" top: "data" top: "label" transform_param { '
                'crop_size: 12 mirror: true } window_data_param { source: "%s" batch_size: 4 '
                'fg_threshold: 0.5 bg_threshold: 0.3 context_pad: 2 cache_images: %s } }'
                % (source, "true" if cache else "false"))

        check(source, lambda: _forward(text, netlib.TRAIN, 2), "window file")
    run()


# -- MNIST IDX files -------------------------------------------------------------------
@pytest.mark.parametrize("name,gz", [("t10k-labels-idx1-ubyte.gz", True), ("t10k-labels-idx1-ubyte.gz", False),
                                     ("t10k-images-idx3-ubyte.gz", True)],
                         ids=["labels-gz", "labels-plain", "images-gz"])
def test_fuzz_idx_files(tmp_path, name, gz):
    base = _bytes(os.path.join(MNIST, name))
    if not gz:
        base = gzip.decompress(base)

    @FUZZ
    @given(mutated(base))
    def run(data):
        fuzzed = write(tmp_path / name, data)
        check(fuzzed, lambda: mnist.read_idx(fuzzed), "IDX %s" % ("gz" if gz else "plain"))
    run()
