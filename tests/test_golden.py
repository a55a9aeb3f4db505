"""Every real-Caffe golden layer case in ../shared/reference/golden/layers.

The procedure is the one the golden README gives: build the case's net with
netlib.Net, write bottoms/presets/params, forward and compare the tops, then
write top diffs, backward and compare bottom and parameter diffs.  The
tolerance is the README's: |got - ref| <= rtol*|ref| + atol*max(max|ref|, 1e-3).

Cases of layer types that later issues add are skipped until their type is
registered; the types this issue covers (REQUIRED) must never skip.
"""
import glob
import json
import os
import shutil

import numpy
import pytest

import netlib
from conftest import SHARED
from xp_mode import host

GOLDEN = os.path.join(SHARED, "reference", "golden", "layers")
CASES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(GOLDEN, "*.h5")))
REQUIRED = {"Input", "DummyData", "Convolution", "Pooling", "InnerProduct", "ReLU", "Sigmoid", "TanH",
            "Softmax", "SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "Dropout", "Split", "Flatten",
            "Reshape", "Concat", "Slice", "Eltwise", "Silence"}
RTOL, ATOL = 1e-4, 1e-5


def assert_close(got, ref, what):
    got = numpy.asarray(host(got), dtype=numpy.float64)
    ref = numpy.asarray(ref, dtype=numpy.float64)
    assert got.shape == ref.shape, "%s: shape %s, Caffe %s" % (what, got.shape, ref.shape)
    if ref.size == 0:
        return
    tol = RTOL * numpy.abs(ref) + ATOL * max(numpy.abs(ref).max(), 1e-3)
    bad = numpy.abs(got - ref) > tol
    assert not bad.any(), "%s: %d of %d values differ; worst |diff| %.3g (first at %s: %r vs Caffe %r)" % (
        what, bad.sum(), bad.size, numpy.abs(got - ref).max(), numpy.argwhere(bad)[0],
        got[tuple(numpy.argwhere(bad)[0])], ref[tuple(numpy.argwhere(bad)[0])])


def test_required_cases_exist():
    if not CASES:
        pytest.skip("needs ../shared/reference/golden")
    import h5py
    types = {h5py.File(os.path.join(GOLDEN, c + ".h5"), "r").attrs["type"] for c in CASES}
    assert REQUIRED <= types, "golden cases missing for %s" % sorted(REQUIRED - types)


def _uses_accel(case):
    """Cases whose net has a layer with optional compiled kernels (netlib.accel)."""
    with open(os.path.join(GOLDEN, case + ".prototxt")) as fh:
        return '"Pooling"' in fh.read()


ACCEL_CASES = [c for c in CASES if _uses_accel(c)]


@pytest.mark.parametrize("case", CASES or ["<no golden cases>"])
def test_golden_case(case, tmp_path, monkeypatch):
    # the default engine: netlib.accel's kernels where numba is installed
    _check_case(case, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", ACCEL_CASES or ["<no golden cases>"])
def test_golden_case_numpy_paths(case, tmp_path, monkeypatch):
    # the same cases with netlib.accel off: the NumPy paths must match Caffe too
    from netlib import accel
    old = accel.set_enabled(False)
    try:
        _check_case(case, tmp_path, monkeypatch)
    finally:
        accel.set_enabled(old)


def _check_case(case, tmp_path, monkeypatch):
    import h5py
    if not CASES:
        pytest.skip("needs ../shared/reference/golden")
    f = h5py.File(os.path.join(GOLDEN, case + ".h5"), "r")
    attrs = f.attrs
    kind = attrs["type"]
    if kind not in netlib.layer_type_list():
        assert kind not in REQUIRED, "layer type %s is required by this issue" % kind
        pytest.skip("layer type %s not implemented yet" % kind)
    for aux in json.loads(attrs["aux_files"]):
        shutil.copy(os.path.join(GOLDEN, aux), tmp_path / os.path.basename(aux))
    shutil.copy(os.path.join(GOLDEN, case + ".prototxt"), tmp_path / (case + ".prototxt"))
    monkeypatch.chdir(tmp_path)
    phase = netlib.TRAIN if attrs["phase"] == "TRAIN" else netlib.TEST
    net = netlib.Net(case + ".prototxt", phase)
    layer = attrs["layer"]
    param_sources = json.loads(attrs["param_sources"])
    for name, data in f.get("bottom", {}).items():
        if name in param_sources:
            net.params[param_sources[name]][0].data[...] = data[()]
        else:
            net.blobs[name].data[...] = data[()]
    for name, data in f.get("preset", {}).items():
        net.blobs[name].data[...] = data[()]
    for i, data in f.get("param", {}).items():
        net.params[layer][int(i)].data[...] = data[()]
    net.forward()
    for name, ref in f["top"].items():
        assert_close(net.blobs[name].data, ref[()], "%s top %s" % (case, name))
    for i, ref in f.get("param_after_forward", {}).items():
        assert_close(net.params[layer][int(i)].data, ref[()], "%s param %s after forward" % (case, i))
    if attrs["backward"]:
        for blobs in net.params.values():
            for blob in blobs:
                blob.diff[...] = 0
        for name, data in f["top_diff"].items():
            net.blobs[name].diff[...] = data[()]
        net.backward()
        for name, ref in f.get("bottom_diff", {}).items():
            got = (net.params[param_sources[name]][0].diff if name in param_sources
                   else net.blobs[name].diff)
            assert_close(got, ref[()], "%s bottom diff %s" % (case, name))
        for i, ref in f.get("param_diff", {}).items():
            assert_close(net.params[layer][int(i)].diff, ref[()], "%s param %s diff" % (case, i))
    if "output_files" in f and len(f["output_files"]):
        del net
        for fname, group in f["output_files"].items():
            with h5py.File(tmp_path / fname, "r") as out:
                for dset, ref in group.items():
                    assert_close(out[dset][()], ref[()], "%s output %s/%s" % (case, fname, dset))
