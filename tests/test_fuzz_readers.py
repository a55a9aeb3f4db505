"""Fuzzing netlib's file readers with mutations of real files (hypothesis).

Property, for every reader: a mutated file either loads, or raises a
:class:`netlib.errors.NetlibError` whose message names the file; never another
exception type, and never a hang (each case runs under a 10 s alarm).

Mutations of a real file from ../shared/reference: bit flips, truncation,
byte insertion, deletion and overwriting (length-preserving), a splice with another real file, NUL bytes,
invalid UTF-8, and for text files huge or negative numbers and wrong enum
names.  Seeded (``derandomize``) and bounded so CI runs a few hundred cases
per reader; a long run, with the counts per reader (loaded / clean error)
written as JSON to the report file::

    NETLIB_FUZZ_EXAMPLES=10000 NETLIB_FUZZ_REPORT=fuzz.json python -m pytest -q tests/test_fuzz_readers.py
"""
import collections
import contextlib
import json
import os
import re
import signal

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import netlib  # noqa: E402
from conftest import SHARED  # noqa: E402
from netlib.errors import NetlibError  # noqa: E402
from netlib import files  # noqa: E402
from netlib.data.transformer import load_mean  # noqa: E402
from netlib.checkpoint import read_solver_state  # noqa: E402

EXAMPLES = int(os.environ.get("NETLIB_FUZZ_EXAMPLES", "150"))
REF = os.path.join(SHARED, "reference")
MODELS = os.path.join(REF, "models")

COUNTS = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("NETLIB_FUZZ_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump({k: dict(v) for k, v in COUNTS.items()}, fh, indent=1, sort_keys=True)


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _read(rel):
    path = os.path.join(REF, rel)
    if not os.path.isfile(path):
        pytest.skip("needs %s (the ../shared reference folder)" % path)
    with open(path, "rb") as fh:
        return fh.read()


@contextlib.contextmanager
def _alarm(seconds=10):
    def boom(signum, frame):
        raise TimeoutError("reader hung for more than %d s" % seconds)
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def mutated(draw, base, other=b"", text=False):
    """``base`` with 1-4 random mutations."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        kind = draw(st.sampled_from(
            ["flip", "truncate", "insert", "delete", "splice", "nul", "utf8", "overwrite"]
            + (["number", "negative", "enum", "nest"] if text else [])))
        pos = draw(st.integers(0, max(0, n - 1)))
        if kind == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "splice" and other:
            cut = draw(st.integers(0, len(other)))
            data[pos:] = other[cut:]
        elif kind == "overwrite":          # length-preserving: keeps the framing, breaks the content
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "nul":
            data[pos:pos] = b"\0"
        elif kind == "utf8":
            data[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"]))
        elif kind in ("number", "negative"):
            numbers = [m.span() for m in re.finditer(rb"\d+", bytes(data))]
            if numbers:
                a, b = numbers[draw(st.integers(0, len(numbers) - 1))]
                data[a:b] = (b"99999999999999999999" if kind == "number"
                             else draw(st.sampled_from([b"-1", b"-2147483649", b"0", b"4294967296"])))
        elif kind == "enum":
            names = [m.span() for m in re.finditer(rb"\b[A-Z][A-Z_]{2,}\b", bytes(data))]
            if names:
                a, b = names[draw(st.integers(0, len(names) - 1))]
                data[a:b] = b"NO_SUCH_VALUE"
        elif kind == "nest":
            depth = draw(st.integers(1, 200))
            data[pos:pos] = b"layer { " * depth + b"}" * draw(st.integers(0, depth))
    return bytes(data)


def check(tmp_path, data, reader, suffix):
    path = str(tmp_path / ("fuzzed" + suffix))
    with open(path, "wb") as fh:
        fh.write(data)
    key = "%s %s" % (getattr(reader, "__name__", reader), suffix)
    try:
        with _alarm():
            reader(path)
    except NetlibError as exc:
        assert path in str(exc) or os.path.basename(path) in str(exc), \
            "error does not name the file: %s: %s" % (type(exc).__name__, exc)
        COUNTS[key]["clean error"] += 1
    else:
        COUNTS[key]["loaded"] += 1


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
