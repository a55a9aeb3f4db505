"""Cost of the second-order products, in forward+backward passes.

    python benchmarks/bench_hvp.py [--nets lenet cifar10_quick] [--batch 64] [--reps 7]

For each training net of bench_nets.py (float32, Input data of the net's
shapes, random N(0, 1) images and labels), the best-of-``reps`` seconds of:
``forward_backward`` (the unit), ``jvp`` over every parameter, ``hvp`` (the
Hessian-vector product) and ``gnvp`` (Gauss-Newton), each reported as a
multiple of the unit.  The issue's bound: hvp at most about 3 passes.
"""
import argparse
import os
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def best(f, reps):
    f()
    f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=["lenet", "cifar10_quick"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import netlib
    from netlib.proto import caffe_pb2
    from netlib.second_order import _owner_keys
    saved, sys.argv = sys.argv, [sys.argv[0]]
    import bench_nets
    sys.argv = saved
    print("%-14s %6s %10s %12s %12s %12s" % ("net", "batch", "fwd+bwd", "jvp", "hvp", "gnvp"))
    for name in args.nets:
        net = netlib.Net(bench_nets.bench_param(name, "train", args.batch), caffe_pb2.TRAIN, dtype=numpy.float32)
        rng = numpy.random.default_rng(0)
        net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].shape)
        net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].shape)
        v = [rng.normal(size=p.shape).astype(numpy.float32) for p in net.learnable_params]
        tangents = dict(zip(_owner_keys(net), v))  # (layer name, blob index) of each learnable parameter
        net.forward()
        unit = best(net.forward_backward, args.reps)
        row = [best(lambda: net.jvp(tangents), args.reps), best(lambda: net.hvp(v), args.reps),
               best(lambda: net.gnvp(v), args.reps)]
        print("%-14s %6d %9.1fms %s" % (name, args.batch, unit * 1e3,
                                        " ".join("%6.1fms %4.2fx" % (t * 1e3, t / unit) for t in row)))


if __name__ == "__main__":
    main()
