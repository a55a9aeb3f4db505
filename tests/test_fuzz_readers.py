"""Fuzzing netlib's file readers with mutations of real files (hypothesis).

Property, for every reader (:func:`fuzzing.check`): a mutated file either
loads, or raises a :class:`netlib.errors.NetlibError` whose message names the
file; never another exception type, never a hang (each case runs under a 10 s
alarm) and never more than 1 GiB of memory per case.

Mutations of a real file from ../shared/reference: bit flips, truncation,
byte insertion, deletion and overwriting (length-preserving), a splice with another real file, NUL bytes,
invalid UTF-8, and for text files huge or negative numbers and wrong enum
names.  Seeded (``derandomize``) and bounded so CI runs a few hundred cases
per reader (the data readers are in test_fuzz_data.py); a long run, with the counts per reader (loaded / clean error)
written as JSON to the report file::

    NETLIB_FUZZ_EXAMPLES=10000 NETLIB_FUZZ_REPORT=fuzz.json python -m pytest -q tests/test_fuzz_readers.py tests/test_fuzz_data.py
"""
import os

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the test extra)")
from hypothesis import given, settings  # noqa: E402

import netlib  # noqa: E402
from conftest import SHARED  # noqa: E402
from fuzzing import FUZZ, mutated, write, module_setup  # noqa: E402
import fuzzing  # noqa: E402
from netlib import files  # noqa: E402
from netlib.data.transformer import load_mean  # noqa: E402
from netlib.checkpoint import read_solver_state  # noqa: E402

REF = os.path.join(SHARED, "reference")
MODELS = os.path.join(REF, "models")


@pytest.fixture(scope="module", autouse=True)
def _module():
    with module_setup():
        yield


def _read(rel):
    path = os.path.join(REF, rel)
    if not os.path.isfile(path):
        pytest.skip("needs %s (the ../shared reference folder)" % path)
    with open(path, "rb") as fh:
        return fh.read()


def check(tmp_path, data, reader, suffix):
    path = write(tmp_path / ("fuzzed" + suffix), data)
    fuzzing.check(path, lambda: reader(path), "%s %s" % (getattr(reader, "__name__", reader), suffix))


# -- readers -------------------------------------------------------------------------
def read_net(path):
    files.read_net_param(path)


def read_solver(path):
    files.read_solver_param(path)


def read_mean(path):
    load_mean(path)                     # the Data layers' transform_param.mean_file reader


def _lenet():
    proto = os.path.join(MODELS, "lenet_trained_with_solverstate", "lenet.prototxt")
    if not os.path.isfile(proto):
        pytest.skip("needs %s" % proto)
    return netlib.Net(proto, netlib.TEST)


@pytest.fixture(scope="module")
def lenet():
    return _lenet()


@pytest.fixture(scope="module")
def cifar():
    proto = os.path.join(MODELS, "cifar10_quick_trained_hdf5", "cifar10_quick.prototxt")
    if not os.path.isfile(proto):
        pytest.skip("needs %s" % proto)
    return netlib.Net(proto, netlib.TEST)


NET_TEXTS = ["models/lenet_trained_with_solverstate/lenet_train_test.prototxt",
             "models/bvlc_googlenet/train_val.prototxt",
             "models/legacy_v1_mnist/lenet_train_test.prototxt"]


@pytest.mark.parametrize("rel", NET_TEXTS)
def test_fuzz_net_prototxt(tmp_path, rel):
    base = _read(rel)
    other = _read(NET_TEXTS[0])

    @FUZZ
    @given(mutated(base, other, text=True))
    def run(data):
        check(tmp_path, data, read_net, ".prototxt")
    run()


def test_fuzz_solver_prototxt(tmp_path):
    base = _read("models/lenet_trained_with_solverstate/lenet_solver.prototxt")
    other = _read("caffe_made/lenet_small_run/lenet_solver.prototxt")

    @FUZZ
    @given(mutated(base, other, text=True))
    def run(data):
        check(tmp_path, data, read_solver, ".prototxt")
    run()


def test_fuzz_binary_caffemodel(tmp_path, lenet):
    base = _read("models/lenet_trained_with_solverstate/lenet_iter_10000.caffemodel")
    other = _read("caffe_made/mnist_test_1000_mean.binaryproto")

    @FUZZ
    @given(mutated(base, other))
    def run(data):
        check(tmp_path, data, lenet.copy_from, ".caffemodel")
    run()


def test_fuzz_binaryproto_mean(tmp_path):
    base = _read("caffe_made/mnist_test_1000_mean.binaryproto")

    @FUZZ
    @given(mutated(base))
    def run(data):
        check(tmp_path, data, read_mean, ".binaryproto")
    run()


def test_fuzz_hdf5_weights(tmp_path, cifar):
    base = _read("models/cifar10_quick_trained_hdf5/cifar10_quick_iter_5000.caffemodel.h5")

    @FUZZ
    @given(mutated(base))
    def run(data):
        check(tmp_path, data, cifar.copy_from, ".caffemodel.h5")
    run()


@pytest.mark.parametrize("rel,suffix", [
    ("models/lenet_trained_with_solverstate/lenet_iter_10000.solverstate", ".solverstate"),
    ("caffe_made/lenet_small_run/lenet_small_iter_300.solverstate.h5", ".solverstate.h5")])
def test_fuzz_solverstate(tmp_path, rel, suffix):
    base = _read(rel)

    @FUZZ
    @given(mutated(base))
    def run(data):
        check(tmp_path, data, read_solver_state, suffix)
    run()


def test_mutator_changes_files():
    # the strategy really mutates (a fuzzer that returns its seed finds nothing)
    seen = set()

    @settings(max_examples=30, derandomize=True, database=None)
    @given(mutated(b"layer { name: \"a\" type: \"ReLU\" } # 12 MAX", text=True))
    def run(data):
        seen.add(data)
    run()
    assert len(seen) >= 10
