#!/usr/bin/env python3
"""Write tests/golden/python_net_shapes.json with real pycaffe.

The reference nets that need Python layers (tests/python_net_sources.py:
FCN-8s and FCN-AlexNet train/val with FCN-style ``voc_layers``, and the
pycaffe linear-regression example with ``pyloss``) are built by real BVLC
Caffe's pycaffe from generated SBDD/VOC-like data, with the pycaffe modules of
tests/pycaffe_modules on the path.  Recorded per net: net.blobs names and
shapes after construction and after each of two forwards (the data layers
reshape the tops to each image), net.outputs, and the scalar outputs of each
forward (FCN's convolutions have no fillers, so its scores are zeros and the
loss depends only on the labels: it is deterministic).

    source /opt/caffe/env.sh && python tools/make_python_net_goldens.py

Build reference Caffe first: bash ../shared/tools/build-reference-caffe.sh.
"""
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import python_net_sources as pns  # noqa: E402

SHARED = os.environ.get("NETLIB_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
MODELS = os.path.join(SHARED, "reference", "models")
GOLDEN = os.path.join(ROOT, "tests", "golden", "python_net_shapes.json")


def main():
    sys.path.insert(0, pns.MODULES)
    import caffe
    caffe.set_mode_cpu()
    out = {}
    for key, phase in sorted(pns.NETS.items()):
        run = pns.make_tree(tempfile.mkdtemp(prefix="python_nets."))
        os.chdir(run)
        net = caffe.Net(os.path.join(MODELS, key), getattr(caffe, phase))
        entry = {"phase": phase, "outputs": list(net.outputs), "blobs": [pns.shapes(net)], "losses": []}
        for _ in range(pns.FORWARDS):
            entry["losses"].append(pns.loss_values(net, net.forward()))
            entry["blobs"].append(pns.shapes(net))
        out[key] = entry
        print("ok %s" % key)
        del net
    golden = {"meta": {"generator": "tools/make_python_net_goldens.py",
                       "caffe": "reference BVLC Caffe 1.0 (9b891540), CPU, pycaffe",
                       "description": __doc__.strip().split("\n\n")[0]},
              "nets": out}
    with open(GOLDEN, "w") as handle:
        handle.write(json.dumps(golden, separators=(",", ":")) + "\n")
    print("wrote %s" % GOLDEN)


if __name__ == "__main__":
    main()
