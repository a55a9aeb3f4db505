"""netlib.draw (pycaffe's caffe.draw) and ``netlib draw_net`` against real pycaffe.

The goldens (tests/golden/draw/draw_dot.json.gz, made by tools/make_draw_goldens.py
with real pycaffe + pydot) hold, for every net prototxt under
../shared/reference/models and the hand-made nets in tests/golden/draw/, the
graph real ``caffe.draw.get_pydot_graph`` builds (a pydot-version-independent
form; the exact DOT text too for a representative set), or the exception it
raises.  Legacy V0/V1 nets were upgraded by Caffe's upgrade_net_proto_text.
"""
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path

from netlib import draw
from netlib.errors import ConfigError, ParseError
from netlib.proto import caffe_pb2
from netlib.tools import cli

try:
    import pydot
except ImportError:  # only the missing-pydot tests run
    pydot = None
needs_pydot = pytest.mark.skipif(pydot is None, reason="netlib.draw needs pydot (pip install pydot)")

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden", "draw")
with gzip.open(os.path.join(GOLDEN_DIR, "draw_dot.json.gz"), "rb") as _f:
    GOLDEN = json.loads(_f.read().decode("utf-8"))
CASES = GOLDEN["cases"]
SAME_PYDOT = pydot is not None and pydot.__version__ == GOLDEN["pydot_version"]

# canonical() and case_key() come from the golden script, so both sides use one definition.
_spec = importlib.util.spec_from_file_location("make_draw_goldens",
                                               os.path.join(ROOT, "tools", "make_draw_goldens.py"))
_goldens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_goldens)
canonical, case_key = _goldens.canonical, _goldens.case_key

PHASES = {"ALL": None, "TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


def _path(name):
    if name.startswith("local/"):
        return os.path.join(GOLDEN_DIR, name[len("local/"):])
    return shared_path("reference", "models", name)


def _text_net(path):
    """The prototxt as pycaffe's draw_net.py reads it: text_format.Merge, no upgrade."""
    from google.protobuf import text_format
    net = caffe_pb2.NetParameter()
    with open(path) as f:
        text_format.Merge(f.read(), net)
    return net


def assert_dot_matches(text, key):
    """DOT text written by netlib is real pycaffe's drawing for golden case ``key``: the exact
    golden text under the golden's pydot version; otherwise the text of a graph whose
    version-independent form equals the golden's (pydot's own DOT parser differs between
    versions, so the text is not parsed back)."""
    name, rankdir, phase, label_edges, display_lrm = key.split("|")
    entry = CASES[key]
    if SAME_PYDOT and "dot" in entry:
        assert text == entry["dot"]
    graph = draw.get_pydot_graph(_text_net(_path(name)), rankdir, label_edges=label_edges == "1",
                                 phase=PHASES[phase], display_lrm=display_lrm == "1")
    assert canonical(graph) == entry["canon"]
    assert text == graph.to_string()


# -- every drawing against real pycaffe ---------------------------------------------------
@needs_pydot
@pytest.mark.parametrize("key", sorted(CASES))
def test_graph_matches_pycaffe(key):
    name, rankdir, phase, label_edges, display_lrm = key.split("|")
    entry = CASES[key]
    net = _text_net(_path(name))
    assert (len(net.layers) > 0) == entry["upgraded"]
    kwargs = dict(label_edges=label_edges == "1", phase=PHASES[phase], display_lrm=display_lrm == "1")
    if "error" in entry:
        with pytest.raises(Exception) as info:
            draw.get_pydot_graph(net, rankdir, **kwargs)
        assert type(info.value).__name__ == entry["error"]
        return
    graph = draw.get_pydot_graph(net, rankdir, **kwargs)
    assert canonical(graph) == entry["canon"]
    if "dot" in entry and SAME_PYDOT:
        assert graph.to_string() == entry["dot"]


@needs_pydot
def test_every_reference_net_is_in_the_goldens():
    """Walk the reference models: every file is a net (drawn, golden-checked above) or a solver."""
    from google.protobuf import text_format
    models = shared_path("reference", "models")
    nets, solvers, others = [], [], []
    for folder, _, files in os.walk(models):
        for fname in files:
            if not fname.endswith(".prototxt"):
                continue
            path = os.path.join(folder, fname)
            rel = os.path.relpath(path, models).replace(os.sep, "/")
            try:
                net = _text_net(path)
            except text_format.ParseError:
                try:
                    with open(path) as f:
                        text_format.Merge(f.read(), caffe_pb2.SolverParameter())
                    solvers.append(rel)
                except text_format.ParseError:
                    # Neither (a fork's fields, e.g. DenseNet's ceil_mode): refused as pycaffe does.
                    with pytest.raises(ParseError):
                        draw.read_net_for_drawing(path)
                    others.append(rel)
                continue
            nets.append(rel)
            dot = draw.draw_net(net, "LR", ext="dot").decode("utf-8")
            assert dot.startswith("digraph ")
            kept = len(net.layer) or len(net.layers)
            assert kept and dot.count("->") >= kept
    assert len(nets) >= 80 and len(solvers) >= 40
    # The fork models (DenseNet's ceil_mode, SSD's layers) parse as netlib's fork
    # extensions and draw above; pycaffe cannot read them, so they have no golden.
    # Only the SSD fork's solver (fields at numbers BVLC uses) reads as neither.
    fork = {"densenet_121", "mobilenet_ssd_voc"}
    assert {rel.split("/")[0] for rel in others} <= fork
    assert {"densenet_121/DenseNet_121.prototxt", "mobilenet_ssd_voc/MobileNetSSD_deploy.prototxt"} <= set(nets)
    nets = [rel for rel in nets if rel.split("/")[0] not in fork]
    golden_nets = [n for n in GOLDEN["files"] if not n.startswith("local/")]
    assert sorted(nets) == golden_nets
    for rel in nets:
        assert case_key(rel, "LR", None, True, False) in CASES


def test_representative_set_has_exact_text():
    for key in ("mnist/lenet_train_test.prototxt|LR|ALL|1|0", "bvlc_reference_caffenet/train_val.prototxt|LR|ALL|1|0",
                "bvlc_googlenet/train_val.prototxt|LR|ALL|1|0", "legacy_v1_mnist/lenet_train_test.prototxt|LR|TRAIN|1|1",
                "mnist/lenet_train_test.prototxt|LR|TRAIN|1|0", "mnist/lenet_train_test.prototxt|LR|TEST|1|0",
                "mnist/lenet_train_test.prototxt|TB|ALL|1|1"):
        assert "dot" in CASES[key], key


@needs_pydot
def test_lenet_by_hand():
    """Facts about the LeNet drawing checked by hand against pycaffe's rules."""
    net = _text_net(shared_path("reference", "models", "mnist", "lenet_train_test.prototxt"))
    canon = canonical(draw.get_pydot_graph(net, "LR"))
    assert canon["name"] == "LeNet" and canon["type"] == "digraph"
    assert canon["attrs"] == [["rankdir", "LR"]]
    nodes = dict((n, dict(a)) for n, a in canon["nodes"])
    conv1 = "conv1\\n(Convolution)\\nkernel size: 5\\nstride: 1\\npad: 0"
    assert nodes[conv1] == {"shape": "record", "fillcolor": "#FF5050", "style": "filled"}
    assert nodes["pool1\\n(Pooling MAX)\\nkernel size: 2\\nstride: 2\\npad: 0"]["fillcolor"] == "#FF9900"
    assert nodes["relu1\\n(ReLU)"]["fillcolor"] == "#90EE90"          # in place
    assert nodes["ip1\\n(InnerProduct)"]["fillcolor"] == "#CC33FF"
    assert nodes["data"]["shape"] == "octagon"                        # last used as a bottom
    assert nodes["loss"] == {}                                        # only ever a top
    # The TRAIN and TEST data layers share one node; both layers' edges stay.
    assert sum(1 for n in nodes if n.startswith("mnist")) == 1
    labels = [dict(a)["label"] for s, d, a in canon["edges"] if s == "mnist\\n(Data)" and d == "data"]
    assert labels == ["Batch 64", "Batch 100"]
    assert [dict(a)["label"] for s, d, a in canon["edges"] if s == conv1] == ["20"]
    train = canonical(draw.get_pydot_graph(net, "LR", phase="TRAIN"))
    assert "accuracy\\n(Accuracy)" not in dict(train["nodes"])
    assert canonical(draw.get_pydot_graph(net, "LR", phase=caffe_pb2.TRAIN)) == train


@needs_pydot
def test_legacy_net_is_upgraded_on_a_copy():
    net = _text_net(shared_path("reference", "models", "legacy_v1_mnist", "lenet_train_test.prototxt"))
    before = net.SerializeToString()
    graph = draw.get_pydot_graph(net, "LR")
    assert net.SerializeToString() == before and len(net.layer) == 0
    names = [n for n, _ in canonical(graph)["nodes"]]
    assert "conv1\\n(Convolution)\\nkernel size: 5\\nstride: 1\\npad: 0" in names


def test_helpers_by_hand():
    assert draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}
    layer = caffe_pb2.LayerParameter(name="c", type="Convolution")
    layer.convolution_param.num_output = 7
    layer.convolution_param.kernel_size.extend([3, 5])
    layer.convolution_param.pad.append(2)
    assert draw.get_edge_label(layer) == "7"
    assert draw.get_layer_lr_mult(layer) == (1.0, 1.0)
    layer.param.add(lr_mult=0.25)
    assert draw.get_layer_lr_mult(layer) == (0.25, 1.0)
    assert draw.get_layer_label(layer, "TB", display_lrm=True) == \
        '"c (Convolution) kernel size: 3 stride: 1 pad: 2 lr mult: 0.2, 1.0"'
    assert draw.get_layer_label(layer, "LR") == '"c\\n(Convolution)\\nkernel size: 3\\nstride: 1\\npad: 2"'
    layer.param[0].lr_mult = 0
    layer.param.add(lr_mult=0)
    assert draw.get_layer_label(layer, "BT", display_lrm=True) == '"c (Convolution) kernel size: 3 stride: 1 pad: 2"'
    data = caffe_pb2.LayerParameter(name="d", type="Data")
    data.data_param.batch_size = 32
    assert draw.get_edge_label(data) == "Batch 32"
    assert draw.get_edge_label(caffe_pb2.LayerParameter(type="ReLU")) == '""'
    with pytest.raises(ValueError):
        draw.get_layer_lr_mult(data)
    assert [draw.choose_color_by_layertype(t) for t in
            ("Convolution", "Deconvolution", "Pooling", "InnerProduct", "ReLU")] == \
        ["#FF5050", "#FF5050", "#FF9900", "#CC33FF", "#6495ED"]
    assert draw.LAYER_STYLE_DEFAULT == {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
    assert draw.NEURON_LAYER_STYLE["fillcolor"] == "#90EE90" and draw.BLOB_STYLE["shape"] == "octagon"


@needs_pydot
def test_draw_net_text_formats_and_file():
    key = "mnist/lenet_train_test.prototxt|LR|TRAIN|1|0"
    path = shared_path("reference", "models", "mnist", "lenet_train_test.prototxt")
    net = _text_net(path)
    raw = draw.draw_net(net, "LR", ext="raw", phase=caffe_pb2.TRAIN)
    assert isinstance(raw, bytes) and raw == draw.draw_net(path, "LR", ext="dot", phase="TRAIN")
    assert_dot_matches(raw.decode(), key)
    with pytest.raises(ValueError):
        draw.draw_net(net, "LR", ext="dot", phase="VALIDATE")
    with pytest.raises(TypeError):
        draw.get_pydot_graph(42, "LR")


def test_no_pydot_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(draw, "_pydot", None)
    monkeypatch.setitem(sys.modules, "pydot", None)
    monkeypatch.setitem(sys.modules, "pydotplus", None)
    with pytest.raises(ConfigError, match="pip install pydot"):
        draw.get_pydot_graph(caffe_pb2.NetParameter(), "LR")


# -- the draw_net command -----------------------------------------------------------------
@needs_pydot
def test_cli_writes_dot(tmp_path, capsys):
    key = "mnist/lenet_train_test.prototxt|TB|ALL|1|1"
    src = shared_path("reference", "models", "mnist", "lenet_train_test.prototxt")
    out = tmp_path / "lenet.dot"
    assert cli.main(["draw_net", src, str(out), "-rankdir", "TB", "--display_lrm"]) == 0
    assert capsys.readouterr().out == "Drawing net to %s\n" % out
    assert_dot_matches(out.read_text(), key)
    legacy = shared_path("reference", "models", "legacy_v1_mnist", "lenet_train_test.prototxt")
    out2 = tmp_path / "v1.raw"
    assert cli.main(["draw_net", legacy, str(out2), "--phase=TEST", "--rankdir=TB"]) == 0
    assert_dot_matches(out2.read_text(), "legacy_v1_mnist/lenet_train_test.prototxt|TB|TEST|1|0")


@pytest.mark.parametrize("args, message", [
    (["/no/such/net.prototxt", "x.dot"], "no such net prototxt file"),
    (["{solver}", "x.dot"], "has no field named"),
    (["{net}", "x.dot", "--phase", "VAL"], "Unknown phase: VAL"),
    (["{net}"], "needs INPUT_NET_PROTO_FILE and OUTPUT_IMAGE_FILE"),
    (["{net}", "x.dot", "--colour"], "unrecognized arguments"),
    (["{net}", "x.nosuchformat"], "nosuchformat"),
])
@needs_pydot
def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    models = shared_path("reference", "models")
    monkeypatch.chdir(tmp_path)
    if "nosuchformat" in args[-1] and shutil.which("dot") is None:
        message = "Graphviz"
    args = [a.format(solver=os.path.join(models, "mnist", "lenet_solver.prototxt"),
                     net=os.path.join(models, "mnist", "lenet.prototxt")) for a in args]
    assert cli.main(["draw_net"] + args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("netlib: error: ") and message in err
    assert not os.listdir(tmp_path)  # nothing half-written


@needs_pydot
def test_cli_without_graphviz_or_pydot(tmp_path, capsys, monkeypatch):
    src = shared_path("reference", "models", "mnist", "lenet.prototxt")
    monkeypatch.setattr(draw.shutil, "which", lambda prog: None)
    assert cli.main(["draw_net", src, str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Graphviz" in err and "apt-get install graphviz" in err
    assert cli.main(["draw_net", src, str(tmp_path / "x.dot")]) == 0  # text needs no Graphviz
    monkeypatch.setattr(draw, "_pydot", None)
    monkeypatch.setitem(sys.modules, "pydot", None)
    monkeypatch.setitem(sys.modules, "pydotplus", None)
    capsys.readouterr()
    assert cli.main(["draw_net", src, str(tmp_path / "y.dot")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install pydot" in err


@needs_pydot
def test_script_from_checkout(tmp_path):
    src = shared_path("reference", "models", "mnist", "lenet.prototxt")
    script = os.path.join(ROOT, "tools", "draw_net")
    ok = subprocess.run([sys.executable, script, src, str(tmp_path / "l.dot"), "--phase", "TEST"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert_dot_matches((tmp_path / "l.dot").read_text(), "mnist/lenet.prototxt|LR|ALL|1|0")
    bad = subprocess.run([sys.executable, script, str(tmp_path / "missing.prototxt"), "x.dot"],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("draw_net: error: ")


@needs_pydot
@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_png_and_svg_through_graphviz(tmp_path):
    key = "mnist/lenet_train_test.prototxt|LR|TRAIN|1|0"
    src = shared_path("reference", "models", "mnist", "lenet_train_test.prototxt")
    out = tmp_path / "lenet.png"
    assert cli.main(["draw_net", src, str(out), "--phase", "TRAIN"]) == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The same picture Graphviz draws from real pycaffe's DOT text.
    reference = CASES[key]["dot"] if SAME_PYDOT else draw.draw_net(src, "LR", "dot", "TRAIN").decode()
    expected = subprocess.run(["dot", "-Tpng"], input=reference.encode(), capture_output=True, check=True)
    assert png == expected.stdout
    svg = draw.draw_net(_text_net(src), "LR", ext="svg", phase=caffe_pb2.TRAIN).decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "conv1" in svg
