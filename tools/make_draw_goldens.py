#!/usr/bin/env python3
"""Write tests/golden/draw/draw_dot.json.gz with real pycaffe's ``caffe.draw``.

Run it with reference Caffe's Python (pydot installed there: ``pip install pydot``)::

    source /opt/caffe/env.sh
    python tools/make_draw_goldens.py [--models ../shared/reference/models] [--out tests/golden/draw]

For every net prototxt under the models folder (files that parse as a
NetParameter; solver files do not and are left out) and for the hand-made
nets in tests/golden/draw/*.prototxt, real ``caffe.draw.get_pydot_graph``
draws the net and the golden keeps, per case:

* ``canon``: a pydot-version-independent form: graph name and attributes,
  then every node (name, attributes) and edge (source, destination,
  attributes) in the graph's order, with one level of surrounding double
  quotes taken off names and values;
* ``dot`` (the EXTRA cases and the WITH_TEXT nets): ``graph.to_string()``,
  the text netlib writes for ``.dot``/``.raw`` (exact text is only comparable
  under the same pydot version, stored in ``pydot_version``);
* ``error``: the exception class name instead, for nets pycaffe refuses.

Legacy V0/V1 nets (``layers`` instead of ``layer``) draw as an empty graph in
pycaffe; they are upgraded first with Caffe's own ``upgrade_net_proto_text``
(``"upgraded": true``), which is what netlib.draw draws for them.

Every net is drawn with rankdir LR and phase None; a representative set also
with the other rankdirs, phases, ``label_edges=False`` and ``display_lrm``.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (file key, rankdir, phase, label_edges, display_lrm) beyond the LR/None/True/False default.
EXTRA = [
    ("mnist/lenet_train_test.prototxt", "LR", "TRAIN", True, False),
    ("mnist/lenet_train_test.prototxt", "LR", "TEST", True, False),
    ("mnist/lenet_train_test.prototxt", "TB", None, True, True),
    ("mnist/lenet_train_test.prototxt", "LR", None, False, False),
    ("mnist/lenet.prototxt", "BT", None, True, False),
    ("bvlc_reference_caffenet/train_val.prototxt", "LR", "TRAIN", True, True),
    ("bvlc_reference_caffenet/train_val.prototxt", "TB", "TEST", True, False),
    ("bvlc_reference_caffenet/deploy.prototxt", "TB", None, True, True),
    ("bvlc_googlenet/train_val.prototxt", "TB", "TEST", True, False),
    ("bvlc_googlenet/deploy.prototxt", "LR", None, True, True),
    ("legacy_v1_mnist/lenet_train_test.prototxt", "LR", "TRAIN", True, True),
    ("legacy_v1_mnist/lenet_train_test.prototxt", "TB", "TEST", True, False),
    ("legacy_v0_lenet/lenet_train.prototxt", "LR", "TRAIN", True, True),
    ("mnist/mnist_autoencoder.prototxt", "LR", "TRAIN", True, False),
    ("mnist/mnist_autoencoder.prototxt", "LR", "TEST", True, False),
    ("fcn8s_voc/train.prototxt", "LR", None, True, True),
    ("finetune_flickr_style/train_val.prototxt", "RL", "TRAIN", True, True),
    ("cifar10/cifar10_full_sigmoid_train_test_bn.prototxt", "LR", "TEST", True, True),
    ("local/quirks.prototxt", "LR", "TRAIN", True, True),
    ("local/quirks.prototxt", "LR", "TEST", True, True),
    ("local/quirks.prototxt", "TB", None, False, True),
    ("local/quirks.prototxt", "BT", "TRAIN", True, False),
    ("local/bad_rules.prototxt", "LR", "TRAIN", True, False),
    ("local/bad_rules.prototxt", "LR", None, True, False),
    ("local/three_params.prototxt", "LR", None, True, True),
    ("local/three_params.prototxt", "LR", None, True, False),
]


# Nets whose default drawing also keeps the exact DOT text (EXTRA cases always do).
WITH_TEXT = ("mnist/lenet_train_test.prototxt", "bvlc_reference_caffenet/train_val.prototxt",
             "bvlc_googlenet/train_val.prototxt", "legacy_v1_bvlc_reference_caffenet/deploy.prototxt",
             "legacy_v0_lenet/lenet.prototxt", "local/quirks.prototxt")


def case_key(name, rankdir, phase, label_edges, display_lrm):
    """The golden's key of one drawing (tests/test_draw.py builds the same)."""
    return "%s|%s|%s|%s|%s" % (name, rankdir, phase or "ALL", int(label_edges), int(display_lrm))


def _unquote(text):
    text = str(text)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def canonical(graph):
    """A pydot graph as plain lists (see the module docstring)."""
    def attrs(obj):
        return sorted([k, _unquote(v)] for k, v in obj.get_attributes().items())
    return {
        "name": _unquote(graph.get_name()),
        "type": graph.get_type(),
        "attrs": attrs(graph),
        "nodes": [[_unquote(n.get_name()), attrs(n)] for n in graph.get_nodes()],
        "edges": [[_unquote(e.get_source()), _unquote(e.get_destination()), attrs(e)]
                  for e in graph.get_edges()],
    }


def net_files(models):
    """{key: path} of the files under ``models`` that parse as a NetParameter with layers."""
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    found = {}
    for folder, dirs, files in os.walk(models):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".prototxt"):
                continue
            path = os.path.join(folder, name)
            net = caffe_pb2.NetParameter()
            try:
                text_format.Merge(open(path).read(), net)
            except text_format.ParseError:
                continue  # a solver (or other non-net) file
            if len(net.layer) or len(net.layers):
                found[os.path.relpath(path, models).replace(os.sep, "/")] = path
    return found


def load(path, work):
    """(NetParameter, upgraded) for ``path``; legacy nets go through upgrade_net_proto_text."""
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    net = caffe_pb2.NetParameter()
    text_format.Merge(open(path).read(), net)
    if len(net.layers) == 0:
        return net, False
    out = os.path.join(work, "upgraded.prototxt")
    tool = shutil.which("upgrade_net_proto_text") or "/opt/caffe/bin/upgrade_net_proto_text"
    env = dict(os.environ, GLOG_minloglevel="2")
    subprocess.run([tool, path, out], check=True, env=env, stdout=subprocess.DEVNULL)
    net = caffe_pb2.NetParameter()
    text_format.Merge(open(out).read(), net)
    return net, True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=os.path.join(os.path.dirname(ROOT), "shared", "reference", "models"))
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "draw"))
    args = p.parse_args()

    import caffe
    import caffe.draw
    import pydot

    files = net_files(args.models)
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".prototxt"):
            files["local/" + name] = os.path.join(args.out, name)
    cases = [(name, "LR", None, True, False) for name in sorted(files)] + EXTRA
    phases = {None: None, "TRAIN": caffe.TRAIN, "TEST": caffe.TEST}
    golden = {"pydot_version": pydot.__version__, "files": sorted(files), "cases": {}}
    work = tempfile.mkdtemp(prefix="draw_goldens_")
    try:
        for name, rankdir, phase, label_edges, display_lrm in cases:
            net, upgraded = load(files[name], work)
            entry = {"upgraded": upgraded}
            try:
                graph = caffe.draw.get_pydot_graph(net, rankdir, label_edges=label_edges,
                                                   phase=phases[phase], display_lrm=display_lrm)
            except Exception as exc:  # recorded: netlib must refuse the same way
                entry["error"] = type(exc).__name__
            else:
                entry["canon"] = canonical(graph)
                if (name, rankdir, phase, label_edges, display_lrm) in EXTRA or name in WITH_TEXT:
                    entry["dot"] = graph.to_string()
            golden["cases"][case_key(name, rankdir, phase, label_edges, display_lrm)] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    target = os.path.join(args.out, "draw_dot.json.gz")
    data = json.dumps(golden, sort_keys=True, indent=0).encode("utf-8")
    with gzip.GzipFile(target, "wb", mtime=0) as f:
        f.write(data)
    print("wrote %s: %d cases from %d nets (%d bytes)" % (target, len(golden["cases"]), len(files),
                                                       os.path.getsize(target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
