"""Time netlib's Pooling (MAX / AVE) against torch on the CPU.

    python benchmarks/bench_pooling.py [--threads N] [--rounds R] [--only S] [--old FILE]

Shapes: the pooling layers of CIFAR-10 quick (batch 100), CaffeNet,
GoogLeNet, ResNet-50, VGG and DenseNet (batch ``--batch``, default 8), float32
NCHW.  Contenders, timed in the same process in alternating rounds (the order
rotates every round, so a noisy neighbour hurts every contender alike):

* ``new``: netlib's Pooling layer (netlib.builtin.pooling);
* ``old``: with ``--old FILE``, another version of pooling.py (e.g. a copy
  of the file before a change), loaded as a separate module: the old vs new
  comparison runs interleaved in one process;
* ``torch``: ``max_pool2d(ceil_mode=True)`` / ``avg_pool2d(ceil_mode=True)``
  with ``--threads`` threads, and ``torch1`` with one thread.

Columns (medians over the rounds, ms): ``test`` a TEST-phase forward (MAX
without argmax bookkeeping; torch under no_grad), ``train`` a TRAIN-phase
forward (MAX tracks the argmax; torch with requires_grad, which keeps the
indices), ``f+b`` a TRAIN forward then backward.  The old and new outputs are
compared before timing (a note is printed where they are not identical).  netlib runs on one thread (numpy
element-wise).  Not run by the tests.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="batch of the ImageNet-sized shapes")
    ap.add_argument("--only", default="", help="run only shapes whose name contains this")
    ap.add_argument("--old", default="", help="path of another pooling.py to time against")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic over the rounds (min is steadier on a busy machine)")
    return ap.parse_args()


ARGS = _args()
THREADS = ARGS.threads or os.cpu_count() or 1

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from netlib import layer as layer_mod  # noqa: E402
from netlib.blob import Blob  # noqa: E402
from netlib.builtin import pooling  # noqa: E402
from netlib.proto import caffe_pb2  # noqa: E402

torch = F = None
if not ARGS.no_torch:
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402
    except ImportError:  # pragma: no cover
        torch = None

# name, (N or None for --batch, C, H, W), pooling_param, torch call (kind, k, s, pad) or None
SHAPES = [
    ("cifar pool1 MAX3/2", (100, 32, 32, 32), "pool: MAX kernel_size: 3 stride: 2", ("max", 3, 2, 0)),
    ("cifar pool2 AVE3/2", (100, 32, 16, 16), "pool: AVE kernel_size: 3 stride: 2", ("ave", 3, 2, 0)),
    ("cifar pool3 AVE3/2", (100, 64, 8, 8), "pool: AVE kernel_size: 3 stride: 2", ("ave", 3, 2, 0)),
    ("caffenet pool1 MAX3/2", (None, 96, 55, 55), "pool: MAX kernel_size: 3 stride: 2", ("max", 3, 2, 0)),
    ("caffenet pool2 MAX3/2", (None, 256, 27, 27), "pool: MAX kernel_size: 3 stride: 2", ("max", 3, 2, 0)),
    ("caffenet pool5 MAX3/2", (None, 256, 13, 13), "pool: MAX kernel_size: 3 stride: 2", ("max", 3, 2, 0)),
    ("googlenet pool1 MAX3/2", (None, 64, 112, 112), "pool: MAX kernel_size: 3 stride: 2", ("max", 3, 2, 0)),
    ("googlenet pool2 MAX3/2", (None, 192, 56, 56), "pool: MAX kernel_size: 3 stride: 2", ("max", 3, 2, 0)),
    ("googlenet incep MAX3/1p1", (None, 256, 28, 28), "pool: MAX kernel_size: 3 stride: 1 pad: 1",
     ("max", 3, 1, 1)),
    ("googlenet pool5 AVE7/1", (None, 1024, 7, 7), "pool: AVE kernel_size: 7 stride: 1", ("ave", 7, 1, 0)),
    ("resnet pool5 global AVE", (None, 2048, 7, 7), "pool: AVE global_pooling: true", ("ave", 7, 1, 0)),
    ("vgg pool1 MAX2/2", (None, 64, 112, 112), "pool: MAX kernel_size: 2 stride: 2", ("max", 2, 2, 0)),
    ("densenet trans AVE2/2", (None, 128, 56, 56), "pool: AVE kernel_size: 2 stride: 2", ("ave", 2, 2, 0)),
]


def load_old(path):
    """Load another pooling.py as netlib.builtin._pooling_old (its relative
    imports resolve in netlib); the layer registry keeps the current class."""
    spec = importlib.util.spec_from_file_location("netlib.builtin._pooling_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    layer_mod._REGISTRY["Pooling"] = pooling.PoolingLayer
    return mod.PoolingLayer


def netlib_case(cls, shape, params, phase, x, gy):
    lp = text_format.Parse('name: "p" type: "Pooling" pooling_param { %s }' % params, caffe_pb2.LayerParameter())
    lay = cls(lp, phase=phase, dtype=np.float32, xp=np)
    b = Blob(shape)
    b.data[...] = x
    t = Blob(())
    lay.SetUp([b], [t])
    if gy is not None:
        t.diff[...] = gy
    return lay, [b], [t]


def netlib_fns(cls, shape, params, x, gy):
    test = netlib_case(cls, shape, params, caffe_pb2.TEST, x, None)
    train = netlib_case(cls, shape, params, caffe_pb2.TRAIN, x, gy)

    def fwd_test():
        test[0].Forward(test[1], test[2])

    def fwd_train():
        train[0].Forward(train[1], train[2])

    def fb():
        train[0].Forward(train[1], train[2])
        train[0].Backward(train[2], [True], train[1])
    return (fwd_test, fwd_train, fb), test, train


def torch_fns(spec, x, gy, threads):
    kind, k, s, pad = spec
    xt = torch.from_numpy(x.copy())
    xg = xt.clone().requires_grad_(True)
    gt = torch.from_numpy(gy.copy())

    def call(inp):
        if kind == "max":
            return F.max_pool2d(inp, k, s, pad, ceil_mode=True)
        return F.avg_pool2d(inp, k, s, pad, ceil_mode=True)

    def fwd_test():
        torch.set_num_threads(threads)
        with torch.no_grad():
            call(xt)

    def fwd_train():
        torch.set_num_threads(threads)
        call(xg)

    def fb():
        torch.set_num_threads(threads)
        y = call(xg)
        torch.autograd.grad(y, (xg,), gt)
    return fwd_test, fwd_train, fb


def once_ms(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    rng = np.random.default_rng(0)
    old_cls = load_old(ARGS.old) if ARGS.old else None
    names = ["new"] + (["old"] if old_cls else [])
    if torch is not None:
        names += ["torch%d" % THREADS] + (["torch1"] if THREADS != 1 else [])
    print("numpy %s, torch %s, torch threads %d (netlib: 1 thread), %d rounds, %s in ms"
          % (np.__version__, torch.__version__ if torch else "absent", THREADS, ARGS.rounds, ARGS.stat))
    print("%-26s %-18s " % ("shape", "N,C,H,W") + " ".join("%8s %8s %8s" % (n + " test", "train", "f+b")
                                                          for n in names))
    totals = {n: [0.0, 0.0, 0.0] for n in names}
    notes = []
    for name, shape, params, spec in SHAPES:
        if ARGS.only not in name:
            continue
        shape = (shape[0] or ARGS.batch,) + tuple(shape[1:])
        x = rng.standard_normal(shape, dtype=np.float32)
        fns = {}
        new_fns, new_test, new_train = netlib_fns(pooling.PoolingLayer, shape, params, x, None)
        gy = rng.standard_normal(new_train[2][0].shape, dtype=np.float32)
        new_fns, new_test, new_train = netlib_fns(pooling.PoolingLayer, shape, params, x, gy)
        fns["new"] = new_fns
        if old_cls:
            old_fns, old_test, old_train = netlib_fns(old_cls, shape, params, x, gy)
            fns["old"] = old_fns
            for f in new_fns + old_fns:
                f()
            for what, a, b in (("test top", new_test[2][0].data, old_test[2][0].data),
                               ("train top", new_train[2][0].data, old_train[2][0].data),
                               ("bottom diff", new_train[1][0].diff, old_train[1][0].diff)):
                if not np.array_equal(a, b):
                    notes.append("%s: old and new %s differ (max |diff| %.3g)"
                                 % (name, what, float(np.abs(a.astype(np.float64) - b).max())))
        if torch is not None:
            fns["torch%d" % THREADS] = torch_fns(spec, x, gy, THREADS)
            if THREADS != 1:
                fns["torch1"] = torch_fns(spec, x, gy, 1)
        times = {n: ([], [], []) for n in names}
        for n in names:                        # warm-up: buffers, plans
            for f in fns[n]:
                f()
        for r in range(ARGS.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for col in range(3):
                for n in (order if col % 2 == 0 else reversed(order)):
                    times[n][col].append(once_ms(fns[n][col]))
        cells = []
        for n in names:
            stat = min if ARGS.stat == "min" else statistics.median
            med = [stat(t) for t in times[n]]
            for col in range(3):
                totals[n][col] += med[col]
            cells.append("%8.2f %8.2f %8.2f" % tuple(med))
        print("%-26s %-18s " % (name, ",".join(map(str, shape))) + " ".join(cells), flush=True)
    print("%-26s %-18s " % ("TOTAL", "") + " ".join("%8.2f %8.2f %8.2f" % tuple(totals[n]) for n in names))
    for note in notes:
        print("  note:", note)
    base = totals["new"]
    for n in names[1:]:
        print("  %s / new: test %.2fx  train %.2fx  f+b %.2fx"
              % (n, totals[n][0] / base[0], totals[n][1] / base[1], totals[n][2] / base[2]))


if __name__ == "__main__":
    main()
