#!/usr/bin/env python3
"""Write tests/golden/train_net_shapes.json with real BVLC Caffe.

For every training net that tests/test_training_nets.py builds (the nets and
their sources come from tests/training_net_sources.py), reference Caffe builds
the net in each phase/stage from the same generated sources and this records
net.blobs (names and shapes, in order) and net.outputs.

Two steps, because reference pycaffe's Python (/opt/caffe/env.sh: numpy < 2,
no netlib, no lmdb/h5py/Pillow) cannot write the sources:

1. ``prepare``, with netlib's Python: discover the nets, write their sources
   into a work folder and a manifest (work/manifest.json) of the fields each
   data layer gets;
2. ``caffe``, with reference Caffe's Python: for each net, Caffe's own
   ``upgrade_net_proto_text`` upgrades the original file (legacy V0/V1 nets
   are not upgraded by netlib here), the manifest's fields are set on the
   upgraded message, and ``caffe.Net(path, phase, stages=...)`` builds it, in
   a child process per net (a CHECK failure aborts only that child: nets Caffe
   cannot build, e.g. ImageData/WindowData without OpenCV, are recorded as
   unavailable with Caffe's message).

Run without arguments (from netlib's venv) to do both and write the golden::

    python tools/make_train_net_goldens.py [--work DIR] [--caffe-env /opt/caffe/env.sh]

Build reference Caffe first: bash ../shared/tools/build-reference-caffe.sh.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import training_net_sources as tns  # noqa: E402

SHARED = os.environ.get("NETLIB_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
MODELS = os.path.join(SHARED, "reference", "models")
GOLDEN = os.path.join(ROOT, "tests", "golden", "train_net_shapes.json")
CAFFE_COMMIT = "9b891540183ddc834a02b2bd81b31afae71b2153"


# -- step 1: netlib's Python ----------------------------------------------------------------
def prepare(work):
    sys.path.insert(0, ROOT)
    nets = []
    for entry in tns.discover(MODELS):
        item = {"key": entry.key, "status": entry.status, "reason": entry.reason,
                "states": [[phase, list(stages)] for phase, stages in entry.states]}
        if entry.status == "ok":
            folder = os.path.join(work, re.sub(r"[^A-Za-z0-9_.-]+", "_", entry.key))
            os.makedirs(folder)
            item["folder"] = folder
            item["layers"] = tns.make_sources(tns.load_param(MODELS, entry.key), entry.key, MODELS, folder)
        nets.append(item)
    with open(os.path.join(work, "manifest.json"), "w") as handle:
        json.dump({"models": MODELS, "nets": nets}, handle, indent=1)
    print("prepared %d nets in %s" % (sum(n["status"] == "ok" for n in nets), work))


# -- step 2: reference Caffe's Python -----------------------------------------------------------
def _original_text(key):
    """The net's prototxt text: the file, or a net inside a solver."""
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    rel, _, field = key.partition("#")
    with open(os.path.join(MODELS, rel)) as handle:
        text = handle.read()
    if not field:
        return text
    solver = text_format.Merge(text, caffe_pb2.SolverParameter())
    m = re.match(r"(\w+)(?:\[(\d+)\])?$", field)
    value = getattr(solver, m.group(1))
    return text_format.MessageToString(value[int(m.group(2))] if m.group(2) else value)


def build_one(work, key, dummy=False):
    """Child process: build one net in each of its states; print JSON.  With
    ``dummy``, ImageData/WindowData layers become DummyData of their shapes."""
    import caffe
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    caffe.set_mode_cpu()
    manifest = json.load(open(os.path.join(work, "manifest.json")))
    net = next(n for n in manifest["nets"] if n["key"] == key)
    folder = net["folder"]
    original = os.path.join(folder, "original.prototxt")
    upgraded = os.path.join(folder, "caffe_upgraded.prototxt")
    with open(original, "w") as handle:
        handle.write(_original_text(key))
    subprocess.run(["upgrade_net_proto_text", original, upgraded], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    param = text_format.Merge(open(upgraded).read(), caffe_pb2.NetParameter())
    tns.apply_manifest(param, net["layers"])
    replaced = tns.replace_with_dummy_data(param, net["layers"]) if dummy else []
    final = os.path.join(folder, "caffe_net.prototxt")
    with open(final, "w") as handle:
        handle.write(text_format.MessageToString(param))
    out = {}
    for phase, stages in net["states"]:
        built = caffe.Net(final, getattr(caffe, phase), stages=stages)
        result = out[tns.case_id(key, phase, stages)] = {
            "blobs": [[name, [int(d) for d in blob.shape]] for name, blob in built.blobs.items()],
            "outputs": list(built.outputs)}
        # The first batch of the data layers that make no random choice.
        names = list(built._layer_names)
        checked = [n for n in tns.deterministic_data_layers(param, phase) if n in names]
        if checked:
            built._forward(0, max(names.index(n) for n in checked))
            result["first_batch"] = {top: tns.data_summary(built.blobs[top].data)
                                     for n in checked for top in built.top_names[n]}
        if replaced:
            out[tns.case_id(key, phase, stages)]["DummyData_for"] = replaced
        del built
    print("RESULT " + json.dumps(out))


def _failure(stderr):
    lines = [l for l in stderr.splitlines() if l.strip()]
    for line in lines:
        if re.match(r"^[FE]\d{4,8} ", line) or "Check failed" in line:
            line = re.sub(r"^[FE]\d{4,8} [\d:.]+\s+\d+ ", "", line)
            return re.sub(r"\s*\(known types:.*", "", line).strip()
    return lines[-1] if lines else "no output"


def _child(work, key, *flags):
    return subprocess.run([sys.executable, os.path.abspath(__file__), "one", work, key] + list(flags),
                          capture_output=True, text=True)


def run_caffe(work):
    manifest = json.load(open(os.path.join(work, "manifest.json")))
    nets, unavailable = {}, {}
    for net in manifest["nets"]:
        if net["status"] != "ok":
            continue
        ids = [tns.case_id(net["key"], phase, stages) for phase, stages in net["states"]]
        proc = _child(work, net["key"])
        note = ""
        if proc.returncode != 0 and re.search(r"Unknown layer type: (ImageData|WindowData)", proc.stderr):
            # Caffe without OpenCV: the rest of the net, behind DummyData of the same shapes.
            note = " (%s; built with DummyData in its place)" % _failure(proc.stderr).split("] ")[-1]
            proc = _child(work, net["key"], "--dummy")
        results = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode == 0 and results:
            nets.update(json.loads(results[-1][len("RESULT "):]))
            print("ok          %s%s" % (net["key"], note))
        else:
            reason = "reference Caffe (no OpenCV) cannot build it: %s" % _failure(proc.stderr)
            for cid in ids:
                unavailable[cid] = reason
            print("unavailable %s: %s" % (net["key"], reason))
    with open(os.path.join(work, "caffe_results.json"), "w") as handle:
        json.dump({"nets": nets, "unavailable": unavailable}, handle)


def write_golden(work):
    results = json.load(open(os.path.join(work, "caffe_results.json")))
    golden = {
        "meta": {
            "generator": "tools/make_train_net_goldens.py",
            "caffe": "reference BVLC Caffe 1.0, CPU, no OpenCV (../shared/tools/build-reference-caffe.sh), pycaffe",
            "caffe_commit": CAFFE_COMMIT,
            "description": "Blob names and shapes (net.blobs order, split blobs and '(automatic)' anonymous tops "
                           "included) and net.outputs after Net construction, per training net of "
                           "shared/reference/models and phase (key 'net:PHASE[:stages]'), built at the file's own "
                           "batch sizes from the sources tests/training_net_sources.py generates; legacy nets "
                           "upgraded by Caffe's upgrade_net_proto_text. Reference Caffe has no OpenCV: for nets "
                           "with ImageData/WindowData layers those layers were replaced by DummyData layers with "
                           "the same tops and the shapes the layer parameters give (crop_size, new_height/"
                           "new_width, batch_size), named in 'DummyData_for'. 'unavailable': nets reference Caffe "
                           "could not build at all, with its message. 'first_batch': for the data layers whose "
                           "first batch involves no random choice (Data without mirror or TRAIN crop, HDF5Data "
                           "without shuffle), the sum, sum of squares and first 8 values of each top after "
                           "forwarding the data layers once.",
        },
        "nets": dict(sorted(results["nets"].items())),
        "unavailable": dict(sorted(results["unavailable"].items())),
    }
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as handle:
        # One line per net keeps the file small and the diffs readable.
        handle.write('{\n"meta": %s,\n"nets": {\n' % json.dumps(golden["meta"], indent=1))
        handle.write(",\n".join("%s: %s" % (json.dumps(k), json.dumps(v, separators=(",", ":")))
                                for k, v in golden["nets"].items()))
        handle.write('\n},\n"unavailable": %s\n}\n' % json.dumps(golden["unavailable"], indent=1))
    json.load(open(GOLDEN))
    print("wrote %s: %d goldens, %d unavailable" % (GOLDEN, len(golden["nets"]), len(golden["unavailable"])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", choices=("all", "prepare", "caffe", "one", "write"), default="all")
    parser.add_argument("work", nargs="?")
    parser.add_argument("key", nargs="?")
    parser.add_argument("--work", dest="work_opt")
    parser.add_argument("--dummy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--caffe-env", default="/opt/caffe/env.sh")
    args = parser.parse_args()
    work = args.work or args.work_opt
    if args.step == "one":
        return build_one(work, args.key, args.dummy)
    if args.step == "caffe":
        return run_caffe(work)
    if args.step == "write":
        return write_golden(work)
    cleanup = work is None
    work = work or tempfile.mkdtemp(prefix="train_net_goldens.")
    if args.step == "prepare":
        return prepare(work)
    try:
        prepare(work)
        env = dict(os.environ, GLOG_minloglevel="1")
        subprocess.run(["bash", "-c", 'source "$1" && python "$2" caffe "$3"', "bash", args.caffe_env,
                        os.path.abspath(__file__), work], check=True, env=env)
        write_golden(work)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
