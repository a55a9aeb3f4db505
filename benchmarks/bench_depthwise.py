"""Time depthwise convolution: netlib's fast path vs its general grouped path vs torch.

    python benchmarks/bench_depthwise.py [--threads N] [--rounds R] [--batches 1,8] [--only S]

Shapes: MobileNet v1's depthwise 3x3 pad-1 layers (float32 NCHW, group = C =
num_output, bias on), at each batch size.  Four contenders per shape, timed
in the same run in alternating rounds (the order rotates every round, so a
noisy neighbour hurts every contender alike):

* ``fast``: Convolution on the depthwise engine (netlib.builtin.depthwise);
* ``general``: the same layer with ``depthwise_fast_path = False`` (im2col +
  one batched GEMM per chunk: netlib's grouped path before the engine);
* ``torch``: ``torch.nn.functional.conv2d(groups=C)`` on the CPU with
  ``torch.set_num_threads(--threads)``, and ``torch1`` with one thread.

``fwd`` is a forward pass, ``f+b`` forward then backward (data, weights,
bias).  Each figure is the median over the rounds, in milliseconds; the
TOTAL row sums one MobileNet v1 forward's worth of depthwise layers (the
512x14x14 s1 layer counts five times).  netlib's element-wise work runs on
one thread; ``--threads`` sets the BLAS threads the general path's GEMMs use
(and torch's).  Not run by the tests.
"""
import argparse
import os
import statistics
import sys
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (OPENBLAS/OMP/MKL_NUM_THREADS) and torch threads (default: cores)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--only", default="", help="run only shapes whose name contains this")
    ap.add_argument("--no-general", action="store_true", help="skip the (slow) general path")
    return ap.parse_args()


ARGS = _args()
THREADS = ARGS.threads or os.cpu_count() or 1
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from netlib.blob import Blob  # noqa: E402
from netlib.builtin import depthwise  # noqa: E402,F401
from netlib.layer import create_layer  # noqa: E402
from netlib.proto import caffe_pb2  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
except ImportError:  # pragma: no cover
    torch = None

# name, C, H (= W), stride, count in MobileNet v1
SHAPES = [
    ("conv2_1/dw 32x112 s1", 32, 112, 1, 1),
    ("conv2_2/dw 64x112 s2", 64, 112, 2, 1),
    ("conv3_1/dw 128x56 s1", 128, 56, 1, 1),
    ("conv3_2/dw 128x56 s2", 128, 56, 2, 1),
    ("conv4_1/dw 256x28 s1", 256, 28, 1, 1),
    ("conv4_2/dw 256x28 s2", 256, 28, 2, 1),
    ("conv5_x/dw 512x14 s1", 512, 14, 1, 5),
    ("conv5_6/dw 512x14 s2", 512, 14, 2, 1),
    ("conv6/dw 1024x7 s1", 1024, 7, 1, 1),
]


def netlib_case(N, C, H, s, fast):
    text = ('name: "dw" type: "Convolution" convolution_param { num_output: %d group: %d kernel_size: 3 '
            'pad: 1 stride: %d weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.1 } }'
            % (C, C, s))
    lay = create_layer(text_format.Parse(text, caffe_pb2.LayerParameter()), phase=caffe_pb2.TRAIN,
                       dtype=np.float32, xp=np)
    lay.depthwise_fast_path = fast
    b = Blob((N, C, H, H))
    b.data[...] = np.random.default_rng(0).standard_normal(b.shape, dtype=np.float32)
    t = Blob(())
    lay.SetUp([b], [t])
    t.diff[...] = np.random.default_rng(1).standard_normal(t.shape, dtype=np.float32)
    return lay, [b], [t]


def netlib_fns(lay, bottom, top):
    def fwd():
        lay.Forward(bottom, top)

    def fb():
        lay.Forward(bottom, top)
        for blob in lay.blobs:
            blob.diff[...] = 0
        lay.Backward(top, [True], bottom)
    return fwd, fb


def torch_fns(lay, bottom, top, threads, s, C):
    x = torch.from_numpy(bottom[0].data.copy()).requires_grad_(True)
    w = torch.from_numpy(lay.blobs[0].data.copy()).requires_grad_(True)
    bias = torch.from_numpy(lay.blobs[1].data.copy()).requires_grad_(True)
    gy = torch.from_numpy(top[0].diff.copy())

    def fwd():
        torch.set_num_threads(threads)
        with torch.no_grad():
            F.conv2d(x, w, bias, stride=s, padding=1, groups=C)

    def fb():
        torch.set_num_threads(threads)
        y = F.conv2d(x, w, bias, stride=s, padding=1, groups=C)
        torch.autograd.grad(y, (x, w, bias), gy)
    return fwd, fb


def once_ms(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    batches = [int(b) for b in ARGS.batches.split(",") if b]
    print("numpy %s, torch %s, BLAS/torch threads %d (netlib element-wise: 1 thread), %d rounds, "
          "medians in ms" % (np.__version__, torch.__version__ if torch else "absent", THREADS, ARGS.rounds))
    names = ["fast"] + ([] if ARGS.no_general else ["general"])
    if torch is not None:
        names += ["torch%d" % THREADS] + (["torch1"] if THREADS != 1 else [])
    header = "%-24s %3s " % ("shape", "N") + " ".join("%9s %9s" % (n + " fwd", "f+b") for n in names)
    for N in batches:
        print(header)
        totals = {n: [0.0, 0.0] for n in names}
        for name, C, H, s, count in SHAPES:
            if ARGS.only not in name:
                continue
            lay_fast = netlib_case(N, C, H, s, True)
            fns = {"fast": netlib_fns(*lay_fast)}
            if not ARGS.no_general:
                lay_gen = netlib_case(N, C, H, s, False)
                for dst, src in zip(lay_gen[0].blobs, lay_fast[0].blobs):
                    dst.data[...] = src.data
                fns["general"] = netlib_fns(*lay_gen)
                lay_gen[0].Forward(lay_gen[1], lay_gen[2])
                lay_fast[0].Forward(lay_fast[1], lay_fast[2])
                np.testing.assert_allclose(lay_fast[2][0].data, lay_gen[2][0].data, rtol=1e-4, atol=1e-4)
            if torch is not None:
                fns["torch%d" % THREADS] = torch_fns(*lay_fast, THREADS, s, C)
                if THREADS != 1:
                    fns["torch1"] = torch_fns(*lay_fast, 1, s, C)
            times = {n: ([], []) for n in names}
            for n in names:                       # warm-up: buffers, plans
                fns[n][0]()
                fns[n][1]()
            for r in range(ARGS.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for n in order:
                    times[n][0].append(once_ms(fns[n][0]))
                for n in reversed(order):
                    times[n][1].append(once_ms(fns[n][1]))
            cells = []
            for n in names:
                f, fb = statistics.median(times[n][0]), statistics.median(times[n][1])
                totals[n][0] += count * f
                totals[n][1] += count * fb
                cells.append("%9.2f %9.2f" % (f, fb))
            print("%-24s %3d " % (name, N) + " ".join(cells), flush=True)
        print("%-24s %3d " % ("TOTAL (MobileNet v1)", N)
              + " ".join("%9.2f %9.2f" % tuple(totals[n]) for n in names))
        base = totals["fast"]
        for n in names[1:]:
            print("  %s / fast: fwd %.2fx  f+b %.2fx" % (n, totals[n][0] / base[0], totals[n][1] / base[1]))
        print(flush=True)


if __name__ == "__main__":
    main()
