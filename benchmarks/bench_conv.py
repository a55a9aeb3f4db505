"""Time netlib's Convolution layer (forward, backward) on classic shapes, against PyTorch.

    python benchmarks/bench_conv.py [--threads N] [--rounds R] [--budget-mb M]
                                    [--only NAME] [--old PATH] [--pool]

Shapes (float32 NCHW): LeNet conv1/conv2 (batch 64), CIFAR-10 quick conv1-3
(batch 100), CaffeNet conv1, a VGG 3x3 layer, ResNet-50 3x3 and 1x1 layers.
Forward and backward (weights, bias and bottom diffs) are timed in interleaved
rounds -- netlib, then PyTorch's ``conv2d`` on the CPU with the same thread
count, then (with ``--old``) a second copy of the vision module, e.g. the
previous commit's ``netlib/builtin/vision.py`` saved to a file -- and the
medians are printed, so that the noise of a shared machine hits every variant
alike.  ``--pool`` also times the Pooling layer shapes.  Not run by the tests.
"""
import argparse
import importlib.util
import os
import sys
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (sets OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/MKL_NUM_THREADS)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-mb", type=float, default=None,
                    help="column-buffer budget of the conv layers (default: the layer's)")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--old", default=None,
                    help="path of another vision.py to time interleaved with the current one")
    ap.add_argument("--pool", action="store_true", help="also time the Pooling shapes")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--pause", type=float, default=0.02,
                    help="seconds to sleep before each timed call, so that threads still spinning "
                         "after the previous variant (OpenMP, OpenBLAS) do not slow the next one")
    ap.add_argument("--layouts", action="store_true",
                    help="also time both forced chunk layouts (batch_last_layout True / False)")
    return ap.parse_args()


ARGS = _args()
if ARGS.threads:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from netlib import layer as layer_mod  # noqa: E402
from netlib.blob import Blob  # noqa: E402
from netlib.layer import create_layer  # noqa: E402
from netlib.builtin import vision  # noqa: E402
from netlib.proto import caffe_pb2  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
except ImportError:  # pragma: no cover
    torch = None
if ARGS.no_torch:
    torch = None

CONV = [
    # name, (N, C, H, W), num_output, kernel, stride, pad
    ("LeNet conv1", (64, 1, 28, 28), 20, 5, 1, 0),
    ("LeNet conv2", (64, 20, 12, 12), 50, 5, 1, 0),
    ("CIFAR conv1", (100, 3, 32, 32), 32, 5, 1, 2),
    ("CIFAR conv2", (100, 32, 16, 16), 32, 5, 1, 2),
    ("CIFAR conv3", (100, 32, 8, 8), 64, 5, 1, 2),
    ("CaffeNet conv1", (8, 3, 227, 227), 96, 11, 4, 0),
    ("VGG 3x3", (4, 128, 56, 56), 128, 3, 1, 1),
    ("ResNet 3x3", (8, 64, 56, 56), 64, 3, 1, 1),
    ("ResNet 3x3 s2", (8, 128, 56, 56), 128, 3, 2, 1),
    ("ResNet 1x1 256-64", (8, 256, 56, 56), 64, 1, 1, 0),
    ("ResNet 1x1 64-256", (8, 64, 56, 56), 256, 1, 1, 0),
    ("ResNet 1x1 7x7", (8, 512, 7, 7), 2048, 1, 1, 0),
]
POOL = [
    # name, (N, C, H, W), method, kernel, stride, pad, global
    ("CaffeNet pool1 MAX", (16, 96, 55, 55), "MAX", 3, 2, 0, False),
    ("LeNet pool1 MAX", (64, 20, 24, 24), "MAX", 2, 2, 0, False),
    ("GoogLeNet pool AVE", (16, 192, 28, 28), "AVE", 3, 1, 1, False),
    ("ResNet global AVE", (16, 2048, 7, 7), "AVE", 7, 1, 0, True),
]


def load_old(path):
    """The Convolution class of another copy of vision.py (the registry is left as it was)."""
    saved = dict(layer_mod._REGISTRY)
    spec = importlib.util.spec_from_file_location("netlib.builtin._bench_old_vision", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    layer_mod._REGISTRY.clear()
    layer_mod._REGISTRY.update(saved)
    return mod.ConvolutionLayer


def once(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(variants, rounds):
    """{name: median ms} for {name: fn}, after one warm-up call each."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            if ARGS.pause:
                time.sleep(ARGS.pause)
            times[name].append(once(fn))
    return {name: float(np.median(ts)) for name, ts in times.items()}


def make(text, shape, phase, cls=None, **attrs):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    lp.name = "bench"
    lay = (create_layer(lp, phase=phase, dtype=np.float32, xp=np) if cls is None
           else cls(lp, phase=phase, dtype=np.float32, xp=np))
    for key, value in attrs.items():
        setattr(lay, key, value)
    b = Blob(shape)
    b.data[...] = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    t = Blob(())
    lay.SetUp([b], [t])
    t.diff[...] = np.random.default_rng(1).standard_normal(t.shape, dtype=np.float32)
    return lay, [b], [t]


def conv_fns(lay, bottom, top):
    def backward():
        for blob in lay.blobs:
            blob.diff[...] = 0
        lay.Backward(top, [True], bottom)
    return (lambda: lay.Forward(bottom, top)), backward


def main():
    if ARGS.budget_mb:
        vision._BaseConvolutionLayer.col_buffer_bytes = int(ARGS.budget_mb * (1 << 20))
    old_cls = load_old(ARGS.old) if ARGS.old else None
    print("numpy %s, threads %s, col buffer %.1f MB, torch %s, medians of %d interleaved rounds (ms)" % (
        np.__version__, ARGS.threads or os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        vision._BaseConvolutionLayer.col_buffer_bytes / (1 << 20),
        torch.__version__ if torch else "not installed", ARGS.rounds))
    for name, shape, O, k, s, p in CONV:
        if ARGS.only not in name:
            continue
        text = ('type: "Convolution" convolution_param { num_output: %d kernel_size: %d stride: %d pad: %d '
                'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } }'
                % (O, k, s, p))
        lay, bottom, top = make(text, shape, caffe_pb2.TRAIN)
        fwd, bwd = conv_fns(lay, bottom, top)
        variants = {"fwd": fwd}
        if old_cls is not None:
            lay_o, bottom_o, top_o = make(text, shape, caffe_pb2.TRAIN, old_cls)
            old_fwd, old_bwd = conv_fns(lay_o, bottom_o, top_o)
            variants["old fwd"] = old_fwd
        variants["bwd"] = bwd
        if old_cls is not None:
            variants["old bwd"] = old_bwd
        if ARGS.layouts:
            for label, value in (("batch-last", True), ("batch-first", False)):
                lay_l, bottom_l, top_l = make(text, shape, caffe_pb2.TRAIN, batch_last_layout=value)
                variants[label + " fwd"], variants[label + " bwd"] = conv_fns(lay_l, bottom_l, top_l)
        if torch is not None:
            x = torch.from_numpy(bottom[0].data.copy()).requires_grad_(True)
            w = torch.from_numpy(lay.blobs[0].data.copy()).requires_grad_(True)
            bias = torch.from_numpy(lay.blobs[1].data.copy()).requires_grad_(True)
            gy = torch.from_numpy(top[0].diff.copy())

            def tfwd():
                with torch.no_grad():
                    F.conv2d(x, w, bias, stride=s, padding=p)

            y = F.conv2d(x, w, bias, stride=s, padding=p)
            variants["torch fwd"] = tfwd
            variants["torch bwd"] = lambda: torch.autograd.grad(y, (x, w, bias), gy, retain_graph=True)
        t = interleaved(variants, ARGS.rounds)
        line = "%-18s %-16s fwd %7.2f  bwd %7.2f" % (name, "x".join(map(str, shape)), t["fwd"], t["bwd"])
        if old_cls is not None:
            line += " | old fwd %7.2f bwd %7.2f (speedup %.2fx %.2fx)" % (
                t["old fwd"], t["old bwd"], t["old fwd"] / t["fwd"], t["old bwd"] / t["bwd"])
        if ARGS.layouts:
            line += " | %s" % lay.batch_last + "".join(
                " %s %.2f/%.2f" % (label, t[label + " fwd"], t[label + " bwd"])
                for label in ("batch-last", "batch-first"))
        if torch is not None:
            line += " | torch fwd %7.2f bwd %7.2f (netlib/torch %.2f %.2f)" % (
                t["torch fwd"], t["torch bwd"], t["fwd"] / t["torch fwd"], t["bwd"] / t["torch bwd"])
        print(line, flush=True)
    if not ARGS.pool:
        return
    for name, shape, method, k, s, p, glob in POOL:
        if ARGS.only not in name:
            continue
        params = ("global_pooling: true" if glob else "kernel_size: %d stride: %d pad: %d" % (k, s, p))
        text = 'type: "Pooling" pooling_param { pool: %s %s }' % (method, params)
        lay, bottom, top = make(text, shape, caffe_pb2.TRAIN)
        variants = {"fwd": lambda: lay.Forward(bottom, top),
                    "bwd": lambda: lay.Backward(top, [True], bottom)}
        t = interleaved(variants, ARGS.rounds)
        print("%-18s fwd %7.2f  bwd %7.2f" % (name, t["fwd"], t["bwd"]), flush=True)


if __name__ == "__main__":
    main()
