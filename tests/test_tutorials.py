"""The two tutorials, end to end: the digits quick start (models/digits) and
LeNet on MNIST (models/lenet, data from ``netlib data mnist``).

Everything runs in a temporary copy of the model folders (the working
directory of each run), so the checkout stays clean.
"""
import gzip
import os
import re
import shutil
import time

import h5py
import numpy
import pytest

import netlib
from netlib.tools import cli

from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RE_TEST_ACC = re.compile(r"Iteration (\d+), Testing net|Test net output #\d+: accuracy = ([\d.eE+-]+)")


def copy_models(dest, name):
    """models/<name> without any snapshot files, under ``dest``."""
    src = os.path.join(ROOT, "models", name)
    shutil.copytree(src, os.path.join(dest, "models", name),
                    ignore=shutil.ignore_patterns("*_iter_*", "*.log"))


def test_accuracies(log_text):
    """[(iteration, accuracy)] from the 'Testing net' / 'Test net output' lines."""
    out, iteration = [], None
    for m in RE_TEST_ACC.finditer(log_text):
        if m.group(1) is not None:
            iteration = int(m.group(1))
        else:
            out.append((iteration, float(m.group(2))))
    return out


test_accuracies.__test__ = False  # a helper, not a test


def accuracy_of(net, data, labels, batch=500):
    """Argmax accuracy of ``net`` (a deploy net with ``prob``) on arrays, computed here."""
    correct = 0
    for start in range(0, len(labels), batch):
        x = data[start:start + batch]
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        prob = net.forward(data=x)["prob"]
        correct += int((prob.argmax(axis=1) == labels[start:start + batch]).sum())
    return correct / float(len(labels))


# -- digits quick start ------------------------------------------------------------------------
def test_shipped_digits_files_match_generator(tmp_path):
    """models/digits/*.h5 are what 'netlib data digits' writes."""
    from netlib import datasets
    datasets.write_digits_hdf5(str(tmp_path))
    for split in ("train", "test"):
        with h5py.File(os.path.join(ROOT, "models", "digits", "digits_%s.h5" % split), "r") as shipped, \
                h5py.File(tmp_path / ("digits_%s.h5" % split), "r") as fresh:
            for key in ("data", "label"):
                numpy.testing.assert_array_equal(shipped[key][()], fresh[key][()])
        assert open(os.path.join(ROOT, "models", "digits", "digits_%s_h5.txt" % split)).read() == \
            "digits_%s.h5\n" % split


def test_digits_quick_start(tmp_path, monkeypatch, capsys):
    copy_models(str(tmp_path), "digits")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")
    start = time.perf_counter()
    code = cli.main(["train", "--solver", "models/digits/solver.prototxt", "--log", "digits.log"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    print("digits quick start: %.1f s" % elapsed)
    assert elapsed < 120, "the quick start should take well under a minute on 2 cores; took %.0f s" % elapsed
    accs = test_accuracies(open("digits.log").read())
    max_iter = int(re.search(r"max_iter: (\d+)", open("models/digits/solver.prototxt").read()).group(1))
    assert accs[-1][0] == max_iter and accs[-1][1] >= 0.97, accs
    snaps = sorted(f for f in os.listdir("models/digits") if f.endswith(".caffemodel.h5"))
    assert "digits_iter_%d.caffemodel.h5" % max_iter in snaps
    assert any(f.endswith(".solverstate.h5") for f in os.listdir("models/digits"))
    # The deploy net loads the snapshot and classifies the held-out digits (accuracy computed here).
    net = netlib.Net("models/digits/deploy.prototxt",
                     "models/digits/digits_iter_%d.caffemodel.h5" % max_iter, netlib.TEST)
    with h5py.File("models/digits/digits_test.h5", "r") as f:
        data, labels = f["data"][()], f["label"][()]
    assert accuracy_of(net, data, labels) == pytest.approx(accs[-1][1], abs=1e-6)


# -- MNIST -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """``netlib data mnist --from shared/data/mnist`` into a temporary folder."""
    src = shared_path("data", "mnist")
    out = tmp_path_factory.mktemp("mnist") / "data" / "mnist"
    code = cli.main(["data", "mnist", "--from", src, "--out", str(out), "--backend", "hdf5"])
    assert code == 0
    code = cli.main(["data", "mnist", "--from", src, "--out", str(out)])  # mnist_{train,test}_lmdb too
    assert code == 0
    return out


def _raw_idx_bytes(path, offset, count):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return raw[offset:offset + count]


def test_mnist_conversion(mnist_dir):
    src = shared_path("data", "mnist")
    with h5py.File(mnist_dir / "mnist_train.h5", "r") as f:
        data, label = f["data"], f["label"][()]
        assert data.shape == (60000, 1, 28, 28) and data.dtype == numpy.float32
        assert label.shape == (60000,) and label.dtype == numpy.float32
        # Facts from shared/data/SOURCES.md.
        assert label[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
        assert numpy.bincount(label.astype(int)).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                                               5851, 5949]
        # Pixels: the raw bytes after the 16-byte header, times 1/256.
        for i in (0, 1, 59999):
            raw = numpy.frombuffer(_raw_idx_bytes(os.path.join(src, "train-images-idx3-ubyte.gz"),
                                                  16 + 784 * i, 784), numpy.uint8)
            numpy.testing.assert_array_equal(data[i, 0].ravel(), raw.astype(numpy.float32) * numpy.float32(1 / 256.0))
    with h5py.File(mnist_dir / "mnist_test.h5", "r") as f:
        assert f["data"].shape == (10000, 1, 28, 28)
        assert numpy.bincount(f["label"][()].astype(int)).tolist() == [980, 1135, 1032, 1010, 982, 892, 958,
                                                                        1028, 974, 1009]
    assert (mnist_dir / "mnist_train_h5.txt").read_text() == "mnist_train.h5\n"


def test_lenet_deploy_with_caffe_trained_weights(mnist_dir):
    """Real Caffe's trained LeNet + our deploy prototxt + our MNIST files: 0.9914 (golden README)."""
    weights = shared_path("reference", "models", "lenet_trained", "lenet_iter_10000.caffemodel")
    net = netlib.Net(os.path.join(ROOT, "models", "lenet", "lenet.prototxt"), weights, netlib.TEST)
    with h5py.File(mnist_dir / "mnist_test.h5", "r") as f:
        data, labels = f["data"][()], f["label"][()]
    assert accuracy_of(net, data, labels) == pytest.approx(0.9914, abs=1e-9)


def lenet_run(root, mnist_dir, solver_edits, log_name):
    """Train models/lenet in ``root`` (with data/mnist linked) and return (log text, seconds)."""
    copy_models(str(root), "lenet")
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    link = os.path.join(root, "data", "mnist")
    if not os.path.exists(link):
        os.symlink(str(mnist_dir), link)
    path = os.path.join(root, "models", "lenet", "lenet_solver.prototxt")
    text = open(path).read()
    for old, new in solver_edits:
        assert old in text, old
        text = text.replace(old, new)
    open(path, "w").write(text)
    start = time.perf_counter()
    code = cli.main(["train", "--solver", "models/lenet/lenet_solver.prototxt", "--log", log_name])
    elapsed = time.perf_counter() - start
    assert code == 0
    return open(os.path.join(root, log_name)).read(), elapsed


def test_lenet_short_run(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")
    edits = [("max_iter: 10000", "max_iter: 200\ntest_initialization: false"),
             ("test_interval: 500", "test_interval: 200"),
             ("solver_mode: CPU", "solver_mode: CPU\nrandom_seed: 1701")]
    text, elapsed = lenet_run(tmp_path, mnist_dir, edits, "lenet200.log")
    print("LeNet 200 iterations + test: %.1f s" % elapsed)
    accs = test_accuracies(text)
    assert [a[0] for a in accs] == [200]
    assert accs[0][1] > 0.90, accs
    weights = os.path.join("models", "lenet", "lenet_iter_200.caffemodel")
    assert os.path.isfile(weights)  # snapshot_after_train
    net = netlib.Net(os.path.join("models", "lenet", "lenet.prototxt"), weights, netlib.TEST)
    with h5py.File(mnist_dir / "mnist_test.h5", "r") as f:
        data, labels = f["data"][()], f["label"][()]
    # the deploy net with the snapshot scores the whole test set as the solver's test net did
    assert accuracy_of(net, data, labels) == pytest.approx(accs[0][1], abs=1e-4)


#: Caffe's settings; only the seed is fixed so the run (and the test) is reproducible.
SEEDED = ("solver_mode: CPU", "solver_mode: CPU\nrandom_seed: 1701")


def test_lenet_tutorial_first_2000_iterations(tmp_path, monkeypatch, mnist_dir):
    """Caffe's LeNet tutorial (Data layers over the LMDBs that ``netlib data
    mnist`` writes) for its first 2,000 iterations: the ``inv`` policy does
    not depend on max_iter, so these are exactly the full run's first 2,000
    (its tests at 500..2,000 included); about 98.5% there.

    At 2,000 iterations the seed moves the accuracy by +-0.15%, in real
    Caffe as here (benchmarks/bench_lenet_lmdb.py measures it over seeds: the
    mean is 98.6% in both); with Caffe's seed 1701 netlib gets 98.43%, so the
    check allows that band.  The 10,000 iterations run in
    :func:`test_lenet_full_tutorial` (NETLIB_SLOW_TESTS=1: 7 minutes on 2
    cores, half the suite's budget)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")
    text, elapsed = lenet_run(tmp_path, mnist_dir, [SEEDED, ("max_iter: 10000", "max_iter: 2000"),
                                                    ("snapshot: 5000", "snapshot: 1000")], "lenet2000.log")
    print("LeNet 2000 iterations: %.1f s" % elapsed)
    accs = test_accuracies(text)
    assert [a[0] for a in accs] == [0, 500, 1000, 1500, 2000], accs
    assert accs[0][1] < 0.3 and accs[1][1] >= 0.97 and accs[-1][1] >= 0.984, accs
    for it in (1000, 2000):
        assert os.path.isfile(os.path.join("models", "lenet", "lenet_iter_%d.caffemodel" % it))
        assert os.path.isfile(os.path.join("models", "lenet", "lenet_iter_%d.solverstate" % it))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NETLIB_SLOW_TESTS"),
                    reason="the full 10,000-iteration LeNet tutorial (7 minutes on 2 cores) runs with "
                           "NETLIB_SLOW_TESTS=1; its first 2,000 iterations run always")
def test_lenet_full_tutorial(tmp_path, monkeypatch, mnist_dir):
    """Caffe's LeNet tutorial unchanged: >= 99.0% test accuracy after 10,000
    iterations of batch 64 (netlib: 99.08% with seed 1701), and the
    snapshots at 5,000 and 10,000."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")
    text, elapsed = lenet_run(tmp_path, mnist_dir, [SEEDED], "lenet.log")
    print("LeNet 10000 iterations: %.1f s" % elapsed)
    accs = test_accuracies(text)
    assert dict(accs)[2000] >= 0.984, accs
    assert accs[-1][0] == 10000 and accs[-1][1] >= 0.99, accs[-5:]
    for it in (5000, 10000):
        assert os.path.isfile(os.path.join("models", "lenet", "lenet_iter_%d.caffemodel" % it))
        assert os.path.isfile(os.path.join("models", "lenet", "lenet_iter_%d.solverstate" % it))
