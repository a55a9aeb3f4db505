#!/usr/bin/env python3
"""Write tests/golden/depthwise/cases.npz with real BVLC Caffe (depthwise convolutions).

Run with reference Caffe's Python (not netlib's)::

    source /opt/caffe/env.sh
    GLOG_minloglevel=2 python tools/make_depthwise_goldens.py

For each case: a one-layer net ``Convolution`` with ``group = channels`` (and
``num_output = m * channels``), gaussian weights and bias from Caffe's fillers
(seeded), a random bottom and top diff; it stores the bottom, weights, bias,
top, and after one Backward the bottom diff and the weight/bias diffs, all
float32, under keys ``<case>/<name>``, plus ``<case>/prototxt`` (the layer's
text).  CPU mode, reference Caffe 9b89154.
"""
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "golden", "depthwise")

# name, bottom shape (N, C, H, W), multiplier, convolution_param text (without num_output/group)
CASES = [
    ("k3_s1_p1", (2, 4, 7, 9), 1, "kernel_size: 3 pad: 1"),
    ("k3_s2_p1", (2, 5, 8, 7), 1, "kernel_size: 3 pad: 1 stride: 2"),
    ("k5_s2_p2_d2", (1, 3, 11, 10), 1, "kernel_size: 5 pad: 2 stride: 2 dilation: 2"),
    ("k3x1_rect_nobias", (3, 2, 6, 5), 1, "kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 stride_h: 1 "
                                         "stride_w: 2 bias_term: false"),
    ("k1_s1", (2, 6, 4, 4), 1, "kernel_size: 1"),
    ("k3_mult2", (2, 3, 6, 6), 2, "kernel_size: 3 pad: 1"),
    ("overhang_quirk", (1, 2, 4, 4), 1, "kernel_size: 5 stride: 2"),
    ("mobilenet_s2", (1, 8, 14, 14), 1, "kernel_size: 3 pad: 1 stride: 2"),
]


def net_text(name, shape, mult, params):
    C = shape[1]
    dims = " ".join("dim: %d" % d for d in shape)
    layer = ('layer { name: "%s" type: "Convolution" bottom: "x" top: "y" convolution_param { '
             'num_output: %d group: %d %s weight_filler { type: "gaussian" std: 0.5 } '
             'bias_filler { type: "gaussian" std: 0.5 } } }' % (name, C * mult, C, params))
    text = ('name: "%s" force_backward: true\n'
            'layer { name: "input_x" type: "Input" top: "x" input_param { shape { %s } } }\n%s\n'
            % (name, dims, layer))
    return text, layer


def main():
    import caffe
    caffe.set_mode_cpu()
    caffe.set_random_seed(1701)
    rng = np.random.default_rng(20261201)
    out = {}
    for name, shape, mult, params in CASES:
        text, layer = net_text(name, shape, mult, params)
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
            f.write(text)
            path = f.name
        try:
            net = caffe.Net(path, caffe.TEST)
        finally:
            os.unlink(path)
        x = rng.standard_normal(shape).astype(np.float32)
        net.blobs["x"].data[...] = x
        net.forward()
        top = net.blobs["y"].data.copy()
        dy = rng.standard_normal(top.shape).astype(np.float32)
        net.blobs["y"].diff[...] = dy
        for p in net.params[name]:
            p.diff[...] = 0
        net.backward()
        params_ = net.params[name]
        out[name + "/prototxt"] = np.array(layer)
        out[name + "/x"] = x
        out[name + "/weight"] = params_[0].data.copy()
        if len(params_) > 1:
            out[name + "/bias"] = params_[1].data.copy()
            out[name + "/bias_diff"] = params_[1].diff.copy()
        out[name + "/y"] = top
        out[name + "/dy"] = dy
        out[name + "/dx"] = net.blobs["x"].diff.copy()
        out[name + "/weight_diff"] = params_[0].diff.copy()
        print(name, shape, "->", top.shape, file=sys.stderr)
    os.makedirs(OUT, exist_ok=True)
    np.savez_compressed(os.path.join(OUT, "cases.npz"), **out)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("Depthwise (group = channels) Convolution cases from reference BVLC Caffe 9b89154, CPU,\n"
                "written by tools/make_depthwise_goldens.py; read by tests/test_depthwise.py.\n"
                "Keys `<case>/{prototxt,x,weight,bias,y,dy,dx,weight_diff,bias_diff}` (float32).\n")


if __name__ == "__main__":
    main()
