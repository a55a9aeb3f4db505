"""Every real training net of ../shared/reference/models builds in TRAIN and TEST and trains a step.

The nets are found by scanning (tests/training_net_sources.py: train_val /
train_test / solver-inline nets with Data, ImageData, WindowData, HDF5Data ...
layers, legacy V0/V1 files included).  For each net and phase the test writes
small sources of the shape the net expects into tmp_path (LMDB/LevelDB Datums,
image lists, window files, HDF5 files, mean files), points the data layers at
them and

1. builds the net at the file's own batch size and compares the blob names
   and shapes (net.blobs order, split blobs and anonymous tops included) and
   net.outputs with tests/golden/train_net_shapes.json, written by real BVLC
   Caffe from the same sources (tools/make_train_net_goldens.py).  Reference
   Caffe has no OpenCV, so for nets with ImageData/WindowData it built the rest
   of the net behind DummyData layers of the same tops and shapes; their data
   tops are also checked here against the layer parameters.  Where the first
   batch involves no random choice (TEST-phase crops, no mirror, no shuffle)
   its values are compared with Caffe's too (sums and first values);
2. rebuilds it with every data layer's batch_size set to 2, sharing the first
   net's weights, and runs one forward and backward, asserting a finite loss
   and finite gradients.

Nets that need Python layers run with the pycaffe modules they name (written
for pycaffe in tests/pycaffe_modules) against real pycaffe's shapes and
losses (tests/golden/python_net_shapes.json); the SSD fork's training nets
(which BVLC Caffe cannot parse; netlib parses its fields as fork extensions)
are checked to be refused with a clear "not supported: SSD training".
"""
import gc
import json
import os
import threading

import numpy
import pytest

import netlib
from conftest import ROOT, SHARED

import training_net_sources as tns

MODELS = os.path.join(SHARED, "reference", "models")
ENTRIES = tns.discover(MODELS) if os.path.isdir(MODELS) else []
BUILDABLE = [e for e in ENTRIES if e.status == "ok"]
CASES = [(e, phase, stages) for e in BUILDABLE for phase, stages in e.states]
PYTHON = [e for e in ENTRIES if e.status == "python"]
REFUSED = [e for e in ENTRIES if e.status == "refused"]
UNSUPPORTED = [e for e in ENTRIES if e.status == "unsupported"]

GOLDEN_PATH = os.path.join(ROOT, "tests", "golden", "train_net_shapes.json")
GOLDEN = json.load(open(GOLDEN_PATH)) if os.path.exists(GOLDEN_PATH) else {"nets": {}, "unavailable": {}}

SMALL_BATCH = 2


def _need_models():
    if not ENTRIES:
        pytest.skip("needs %s (the ../shared reference folder)" % MODELS)


def _build(param, phase, stages):
    netlib.set_random_seed(1701)
    return netlib.Net(param, phase, stages=list(stages) or None)


def _close(net):
    for layer in net.layers:
        close = getattr(layer, "close", None)
        if close is not None:
            close()


def _prepared(entry, tmp_path):
    param = tns.load_param(MODELS, entry.key)
    manifest = tns.make_sources(param, entry.key, MODELS, str(tmp_path))
    for layer in param.layer:
        if layer.type in tns.PREFETCHING_TYPES:
            layer.data_param.prefetch = 1  # one batch ahead is enough here (default 4)
    return param, manifest


def _check_internal(net, manifest, phase_param):
    """Checks that need no Caffe: every top of the phase's layers is a blob, the
    data tops have the shapes the layer parameters (and the generated items)
    give, outputs are sorted."""
    tops = [t for l in phase_param.layer for t in l.top]
    assert set(tops) <= set(net.blobs)
    assert net.outputs == sorted(net.outputs)
    items = {tuple(sorted(e["set"].items())): e["item"] for e in manifest}
    for lp in phase_param.layer:
        if lp.type not in tns.PARAM_FIELDS:
            continue
        p = getattr(lp, tns.PARAM_FIELDS[lp.type])
        bs, crop = p.batch_size, lp.transform_param.crop_size
        if lp.type == "WindowData":
            expected = (bs, 3, crop, crop)
        elif lp.type in ("Data", "ImageData"):
            c, h, w = next(item for fields, item in items.items() if (PARAM_SOURCE[lp.type], p.source) in fields)
            expected = (bs, c, crop or h, crop or w)
        else:
            continue
        assert net.blobs[lp.top[0]].shape == expected, lp.name
        if len(lp.top) > 1:
            assert net.blobs[lp.top[1]].shape == (bs,)


PARAM_SOURCE = {t: f + ".source" for t, f in tns.PARAM_FIELDS.items()}


def _constant_fillers(message):
    """Every FillerParameter set in ``message`` becomes ``constant``: shapes do
    not depend on the filler, and random fills of 100M weights cost seconds."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        values = [value] if hasattr(value, "ListFields") else value  # a message, or a repeated field
        for v in values:
            if field.message_type.name == "FillerParameter":
                v.Clear()
                v.type = "constant"
            else:
                _constant_fillers(v)


def _sane_batchnorm_stats(net):
    """Mean 0, variance 1 for BatchNorm's global statistics: a fresh net has
    zeros (variance 0), and a deep net using them in TEST (ResNet-20: 19
    BatchNorms, each scaling by 1/sqrt(eps)) overflows float32: reference
    Caffe's loss is nan there too for the same net and sources."""
    for layer in net.layers:
        if layer.type == "BatchNorm":
            mean, var, factor = layer.blobs
            mean.data[...] = 0
            var.data[...] = 1
            factor.data[...] = 1


def _check_first_batch(net, expected):
    """The first batch of the data layers (deterministic ones only: TEST crops,
    no mirror, no shuffle) has Caffe's values."""
    last = max(i for i, tops in enumerate(net.top_names.values()) if set(tops) & set(expected))
    net.forward_from_to(0, last)
    for top, ref in expected.items():
        got = tns.data_summary(net.blobs[top].data)
        numpy.testing.assert_allclose(got["head"], ref["head"], rtol=1e-6, err_msg=top)
        numpy.testing.assert_allclose([got["sum"], got["sumsq"]], [ref["sum"], ref["sumsq"]], rtol=1e-6,
                                      err_msg=top)


def _filtered(param, phase, stages):
    from netlib.net import filter_net
    p = type(param)()
    p.CopyFrom(param)
    p.state.phase = netlib.caffe_pb2.Phase.Value(phase)
    p.state.stage.extend(stages)
    return filter_net(p)


@pytest.mark.parametrize("entry,phase,stages", CASES,
                         ids=[tns.case_id(e.key, ph, st) for e, ph, st in CASES])
def test_training_net(entry, phase, stages, tmp_path):
    cid = tns.case_id(entry.key, phase, stages)
    threads = set(threading.enumerate())
    param, manifest = _prepared(entry, tmp_path)
    phase_param = _filtered(param, phase, stages)
    anonymous = [l.name for l in phase_param.layer if l.type.endswith("Loss") and not len(l.top)]

    # 1. The file's own batch size: shapes (blobs allocate lazily; the data
    # layers prefetch one batch).
    full = _build(param, phase, stages)
    try:
        blobs = [[name, list(blob.shape)] for name, blob in full.blobs.items()]
        assert "(automatic)" not in full.outputs
        if anonymous:
            assert "(automatic)" in full.blobs  # Caffe lists the anonymous top, not as an output
        golden = GOLDEN["nets"].get(cid)
        if golden is not None:
            assert blobs == golden["blobs"]
            assert full.outputs == golden["outputs"]
        else:
            assert cid in GOLDEN["unavailable"] or not GOLDEN["nets"], \
                "no golden for %s: rerun tools/make_train_net_goldens.py" % cid
        if golden is None or golden.get("DummyData_for"):
            # Caffe built these behind DummyData (no OpenCV): check the data tops here.
            _check_internal(full, manifest, phase_param)
        if golden is not None and golden.get("first_batch"):
            _check_first_batch(full, golden["first_batch"])
    finally:
        _close(full)

    # 2. Batch 2: one forward and backward, with the full net's weights (the
    # small net's own fillers are made constant: a second random fill of up to
    # 138M weights would cost seconds).
    small = type(param)()
    small.CopyFrom(param)
    tns.set_batch_size(small, SMALL_BATCH)
    _constant_fillers(small)
    net = _build(small, phase, stages)
    try:
        net.share_trained_layers_with(full)
        del full
        _sane_batchnorm_stats(net)
        net.forward()
        weights = {n: w for n, w in net.blob_loss_weights.items() if w}
        has_loss = any(l.type.endswith("Loss") or any(l.loss_weight) for l in phase_param.layer)
        assert bool(weights) == has_loss, cid  # e.g. V0 test nets and SqueezeNet's TEST net have none
        loss = sum(w * float(numpy.sum(net.blobs[n].data, dtype=numpy.float64)) for n, w in weights.items())
        assert numpy.isfinite(loss), (cid, loss)
        for name in net.outputs:
            assert numpy.isfinite(net.blobs[name].data).all(), name
        net.backward()
        for blob in net.learnable_params:
            assert numpy.isfinite(blob.diff).all()
    finally:
        _close(net)
    left = [t.name for t in threading.enumerate() if t not in threads and t.name.startswith("netlib-")]
    assert not left, "prefetch threads still running after close(): %s" % left
    del net
    gc.collect()  # layer.close() stops the threads; the databases close when the layers are collected


def test_discovery_finds_every_kind_of_training_net():
    _need_models()
    keys = {e.key for e in BUILDABLE}
    types = {t for e in BUILDABLE for t in e.types}
    assert {"Data", "ImageData", "WindowData", "HDF5Data"} <= types
    for key in ("bvlc_alexnet/train_val.prototxt",                        # V2, LMDB + mean file
                "legacy_v0_imagenet/imagenet_train.prototxt",              # V0 "data", LevelDB
                "legacy_v1_mnist/lenet_train_test.prototxt",               # V1 DATA
                "legacy_v1_vgg16/vgg16_train_val.prototxt",                # V1 IMAGE_DATA
                "finetune_pascal_detection/pascal_finetune_trainval_test.prototxt",  # WindowData
                "mnist/lenet_consolidated_solver.prototxt#net_param",     # a net inside a solver
                "mnist/mnist_autoencoder.prototxt"):                       # TEST stages
        assert key in keys, key
    assert len(BUILDABLE) >= 39
    assert {e.key for e in PYTHON} >= {"fcn8s_voc/train.prototxt", "fcn8s_voc/val.prototxt",
                                       "fcn_alexnet_voc/train.prototxt", "fcn_alexnet_voc/val.prototxt",
                                       "pycaffe_linreg/linreg.prototxt"}
    assert {e.key for e in REFUSED} == set(tns.REFUSED_FIELDS)
    assert {e.key for e in UNSUPPORTED} == set(tns.UNSUPPORTED_NETS)


def test_goldens_cover_the_nets_reference_caffe_builds():
    _need_models()
    if not GOLDEN["nets"]:
        pytest.skip("no tests/golden/train_net_shapes.json")
    ids = {tns.case_id(e.key, ph, st) for e, ph, st in CASES}
    assert set(GOLDEN["nets"]) | set(GOLDEN["unavailable"]) == ids
    assert not GOLDEN["unavailable"], GOLDEN["unavailable"]
    for cid, golden in GOLDEN["nets"].items():
        if "DummyData_for" in golden:
            entry = next(e for e, ph, st in CASES if tns.case_id(e.key, ph, st) == cid)
            assert {"ImageData", "WindowData"} & set(entry.types), cid


PYTHON_GOLDEN_PATH = os.path.join(ROOT, "tests", "golden", "python_net_shapes.json")


@pytest.mark.parametrize("entry", PYTHON, ids=[e.key for e in PYTHON])
def test_python_layer_nets(entry, tmp_path, monkeypatch):
    """The nets with Python layers, with the pycaffe modules they name
    (``import caffe``, ``caffe.Layer``; tests/pycaffe_modules) loaded
    unchanged: blob shapes after construction and after each forward (the
    data layers reshape to each image), outputs and losses equal real
    pycaffe's (tests/golden/python_net_shapes.json), and backward is finite."""
    import python_net_sources as pns
    golden = json.load(open(PYTHON_GOLDEN_PATH))["nets"][entry.key]
    monkeypatch.chdir(pns.make_tree(str(tmp_path)))
    monkeypatch.syspath_prepend(pns.MODULES)
    net = netlib.Net(os.path.join(MODELS, entry.rel), getattr(netlib, golden["phase"]))
    assert [l.type for l in net.layers].count("Python") >= 1
    assert net.outputs == golden["outputs"]
    assert pns.shapes(net) == golden["blobs"][0]
    for i in range(pns.FORWARDS):
        losses = pns.loss_values(net, net.forward())
        assert pns.shapes(net) == golden["blobs"][i + 1]
        assert losses.keys() == golden["losses"][i].keys()
        if not entry.key.startswith("pycaffe_linreg"):      # linreg's DummyData is random
            # Caffe sums the per-pixel losses one by one in float32 (about 1e-5
            # relative drift over ~1,500 pixels); netlib's sum is more exact.
            for name, value in losses.items():
                assert value == pytest.approx(golden["losses"][i][name], rel=1e-4), name
    net.backward()
    for blob in net.learnable_params:
        assert numpy.isfinite(blob.diff).all()


@pytest.mark.parametrize("entry", UNSUPPORTED, ids=[e.key for e in UNSUPPORTED])
def test_ssd_training_nets_are_refused_clearly(entry):
    """The SSD fork's training nets parse (fork extensions) and building one
    says what is not supported and what is, naming the layer."""
    phase = netlib.TEST if entry.rel.endswith("_test.prototxt") else netlib.TRAIN   # its data layer's phase
    with pytest.raises(netlib.UnknownLayerTypeError) as err:
        netlib.Net(os.path.join(MODELS, entry.rel), phase)
    text = str(err.value)
    assert "not supported: SSD training" in text and tns.UNSUPPORTED_NETS[entry.key] in text
    assert "DetectionOutput are supported" in text and "layer 'data'" in text
