"""Time netlib's Convolution and Pooling layers (forward, backward) on classic shapes.

    python benchmarks/bench_conv.py [--threads N] [--repeat R] [--budget-mb M]

Shapes (float32 NCHW, from /work/shared/docs/peers.md section 3.4):
LeNet conv2, CaffeNet conv1, VGG 3x3, ResNet 1x1 convolutions; CaffeNet pool1,
LeNet pool1 and a ResNet-style global average pool.  Prints the best-of-R
milliseconds; when PyTorch is importable it also times torch on the CPU
with the same thread count and prints the ratio netlib/torch.
Not run by the tests.
"""
import argparse
import os
import sys
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (sets OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/MKL_NUM_THREADS)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget-mb", type=float, default=None,
                    help="column-buffer budget of the conv layers (default: the layer's)")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    return ap.parse_args()


ARGS = _args()
if ARGS.threads:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

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

CONV = [
    # name, (N, C, H, W), num_output, kernel, stride, pad
    ("LeNet conv2", (64, 20, 12, 12), 50, 5, 1, 0),
    ("CaffeNet conv1", (16, 3, 227, 227), 96, 11, 4, 0),
    ("VGG 3x3", (16, 64, 56, 56), 64, 3, 1, 1),
    ("ResNet 1x1", (16, 256, 56, 56), 64, 1, 1, 0),
]
POOL = [
    # name, (N, C, H, W), method, kernel, stride, pad, global
    ("CaffeNet pool1 MAX", (16, 96, 55, 55), "MAX", 3, 2, 0, False),
    ("LeNet pool1 MAX", (64, 20, 24, 24), "MAX", 2, 2, 0, False),
    ("GoogLeNet pool AVE", (16, 192, 28, 28), "AVE", 3, 1, 1, False),
    ("ResNet global AVE", (16, 2048, 7, 7), "AVE", 7, 1, 0, True),
]


def best_ms(fn, repeat):
    fn()  # warm-up (allocations, plans)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def layer(text, shape, phase):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    lp.name = "bench"
    lay = create_layer(lp, phase=phase, dtype=np.float32, xp=np)
    b = Blob(shape)
    b.data[...] = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    t = Blob(())
    lay.SetUp([b], [t])
    t.diff[...] = np.random.default_rng(1).standard_normal(t.shape, dtype=np.float32)
    return lay, [b], [t]


def row(name, fwd, bwd, tf=None, tb=None):
    line = "%-22s fwd %8.1f ms   bwd %8.1f ms" % (name, fwd, bwd)
    if tf is not None:
        line += "   | torch fwd %7.1f  bwd %7.1f   ratio fwd %.2f  bwd %.2f" % (tf, tb, fwd / tf, bwd / tb)
    print(line, flush=True)


def main():
    if ARGS.budget_mb:
        vision._BaseConvolutionLayer.col_buffer_bytes = int(ARGS.budget_mb * (1 << 20))
    print("numpy %s, threads %s, col buffer %.1f MB, torch %s" % (
        np.__version__, ARGS.threads or os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        vision._BaseConvolutionLayer.col_buffer_bytes / (1 << 20),
        torch.__version__ if torch else "not installed"))
    for name, shape, O, k, s, p in CONV:
        if ARGS.only not in name:
            continue
        text = ('type: "Convolution" convolution_param { num_output: %d kernel_size: %d stride: %d pad: %d '
                'weight_filler { type: "xavier" } }' % (O, k, s, p))
        lay, bottom, top = layer(text, shape, caffe_pb2.TRAIN)
        fwd = best_ms(lambda: lay.Forward(bottom, top), ARGS.repeat)

        def backward():
            for blob in lay.blobs:
                blob.diff[...] = 0
            lay.Backward(top, [True], bottom)
        bwd = best_ms(backward, ARGS.repeat)
        tf = tb = None
        if torch is not None:
            x = torch.from_numpy(bottom[0].data.copy()).requires_grad_(True)
            w = torch.from_numpy(lay.blobs[0].data.copy()).requires_grad_(True)
            bias = torch.from_numpy(lay.blobs[1].data.copy()).requires_grad_(True)
            gy = torch.from_numpy(top[0].diff.copy())
            with torch.no_grad():
                tf = best_ms(lambda: F.conv2d(x, w, bias, stride=s, padding=p), ARGS.repeat)
            y = F.conv2d(x, w, bias, stride=s, padding=p)
            tb = best_ms(lambda: torch.autograd.grad(y, (x, w, bias), gy, retain_graph=True), ARGS.repeat)
        row("%s %s" % (name, "x".join(map(str, shape))), fwd, bwd, tf, tb)
    for name, shape, method, k, s, p, glob in POOL:
        if ARGS.only not in name:
            continue
        params = ("global_pooling: true" if glob else "kernel_size: %d stride: %d pad: %d" % (k, s, p))
        text = 'type: "Pooling" pooling_param { pool: %s %s }' % (method, params)
        for phase, label in ((caffe_pb2.TEST, "TEST"), (caffe_pb2.TRAIN, "TRAIN")):
            lay, bottom, top = layer(text, shape, phase)
            fwd = best_ms(lambda: lay.Forward(bottom, top), ARGS.repeat)

            def backward():
                lay.Backward(top, [True], bottom)
            bwd = best_ms(backward, ARGS.repeat) if phase == caffe_pb2.TRAIN else float("nan")
            tf = tb = None
            if torch is not None and phase == caffe_pb2.TRAIN:
                x = torch.from_numpy(bottom[0].data.copy()).requires_grad_(True)
                gy = torch.from_numpy(top[0].diff.copy())
                kk = shape[2] if glob else k
                fn = ((lambda t: F.max_pool2d(t, kk, s, p, ceil_mode=True)) if method == "MAX" else
                      (lambda t: F.avg_pool2d(t, kk, s, p, ceil_mode=True, count_include_pad=True)))
                with torch.no_grad():
                    tf = best_ms(lambda: fn(x), ARGS.repeat)
                y = fn(x)
                tb = best_ms(lambda: torch.autograd.grad(y, x, gy, retain_graph=True), ARGS.repeat)
            row("%s %s" % (name, label), fwd, bwd, tf, tb)


if __name__ == "__main__":
    main()
