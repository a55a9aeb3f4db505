"""Data pipeline throughput (issue 6), on this machine, in one run.

1. Images per second through a TRAIN-phase Data layer with ImageNet's
   transform (crop 227, mirror, mean file) over raw 3x256x256 Datums and over
   JPEG-encoded ones (batch 64, LMDB, prefetch 4, default workers).
2. LeNet training (Caffe's lenet_train_test.prototxt layers and solver) on the
   MNIST LMDB against the same net on in-memory data (MemoryData): time per
   iteration and their ratio; the prefetch should hide the loading.

    python benchmarks/bench_data.py [--mnist DIR] [--iters 300] [--caffe PATH]

DIR holds the MNIST IDX files (default ../shared/data/mnist).  Needs lmdb and
Pillow.  With ``--caffe`` (real Caffe's binary, e.g. /opt/caffe/bin/caffe from
shared/tools/build-reference-caffe.sh) it also times Caffe's Data layer on the
raw database with ``caffe time`` (that build has no OpenCV, so no JPEG).
Prints one line per measurement.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import netlib  # noqa: E402
from netlib.data import image  # noqa: E402
from netlib.data.datum import array_to_datum, encoded_datum  # noqa: E402
from netlib.data.db import create_db  # noqa: E402
from netlib.proto import caffe_pb2  # noqa: E402


def smooth_images(n, seed=0):
    """Photo-like 256x256 BGR images (random images do not compress as JPEG)."""
    rng = numpy.random.default_rng(seed)
    y, x = numpy.mgrid[0:256, 0:256].astype(numpy.float32) / 256.0
    out = []
    for _ in range(n):
        a, b, c = rng.random(3) * 6
        img = numpy.stack([numpy.sin(a * x + b * y + c), numpy.cos(b * x - a * y), numpy.sin(c * x * y + a)], -1)
        img = (img * 100 + 128 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(numpy.uint8)
        out.append(img)
    return out


def images_per_second(db_path, mean_path, batches=40):
    net = netlib.Net('name: "b" layer { name: "data" type: "Data" top: "data" top: "label" '
                     'transform_param { crop_size: 227 mirror: true mean_file: "%s" } '
                     'data_param { source: "%s" backend: LMDB batch_size: 64 } }' % (mean_path, db_path),
                     netlib.TRAIN)
    net.forward()  # the prefetch threads fill their queue
    time.sleep(1.0)
    start = time.perf_counter()
    for _ in range(batches):
        net.forward()
    elapsed = time.perf_counter() - start
    net.layers[0].close()
    return batches * 64 / elapsed


def caffe_images_per_second(caffe, db_path, mean_path, tmp, iterations=40):
    """Caffe's Data layer on the same database: 64 / its average forward time."""
    import re
    import subprocess
    model = os.path.join(tmp, "caffe_data.prototxt")
    with open(model, "w") as f:
        f.write('name: "b" layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN } '
                'transform_param { crop_size: 227 mirror: true mean_file: "%s" } '
                'data_param { source: "%s" backend: LMDB batch_size: 64 } }\n' % (mean_path, db_path))
    run = subprocess.run([caffe, "time", "--model=" + model, "--iterations=%d" % iterations],
                         capture_output=True, text=True)
    found = re.search(r"Average Forward pass: ([0-9.]+) ms", run.stderr + run.stdout)
    return 64 / (float(found.group(1)) / 1000.0) if found else float("nan")


def lenet_text(data_layer):
    text = open(os.path.join(HERE, "..", "models", "lenet", "lenet_train_test.prototxt")).read()
    body = text[text.index('layer {\n  name: "conv1"'):]
    return 'name: "LeNet"\n' + data_layer + body


def lenet_solver(net_text, memory_data=None):
    param = caffe_pb2.SolverParameter()
    from google.protobuf import text_format
    text_format.Merge('base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 '
                      'power: 0.75 display: 0 max_iter: 1000000 solver_mode: CPU random_seed: 1', param)
    text_format.Merge(net_text, param.net_param)
    solver = netlib.get_solver(param)
    if memory_data is not None:
        solver.net.set_input_arrays(*memory_data)
    solver.step(20)  # warm-up
    return solver


def timed_steps(solver, iters):
    start = time.perf_counter()
    solver.step(iters)
    return (time.perf_counter() - start) * 1000.0 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--lenet-only", action="store_true", help="skip the images/s measurements")
    ap.add_argument("--caffe", default=None, help="real Caffe's binary, to time its Data layer too")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="netlib-bench-data-")
    try:
        imgs = smooth_images(128)
        mean = caffe_pb2.BlobProto(num=1, channels=3, height=256, width=256)
        mean.data.extend(numpy.stack(imgs).mean(0).transpose(2, 0, 1).ravel().astype(float).tolist())
        mean_path = os.path.join(tmp, "mean.binaryproto")
        netlib.files.write_binary_proto(mean_path, mean)
        for kind in () if args.lenet_only else ("raw", "jpeg"):
            path = os.path.join(tmp, kind)
            with create_db(path, "lmdb") as db:
                for i, img in enumerate(imgs):
                    datum = (array_to_datum(img.transpose(2, 0, 1), i % 10) if kind == "raw"
                             else encoded_datum(image.imencode(img, "jpg"), i % 10))
                    db.put("%08d" % i, datum.SerializeToString())
            rate = images_per_second(path, mean_path)
            print("Data layer, %s 3x256x256 Datums, crop 227 + mirror + mean file, batch 64: %.0f images/s"
                  % (kind, rate))
            if kind == "raw" and args.caffe:
                print("  real Caffe's Data layer on the same database (caffe time): %.0f images/s"
                      % caffe_images_per_second(args.caffe, path, mean_path, tmp))

        from netlib.tools import mnist
        mnist_dir = os.path.join(tmp, "mnist")
        mnist.convert(args.mnist, mnist_dir, backend="lmdb")
        train_db = os.path.join(mnist_dir, "mnist_train_lmdb")
        data_layer = ('layer { name: "mnist" type: "Data" top: "data" top: "label" transform_param { '
                      'scale: 0.00390625 } data_param { source: "%s" batch_size: 64 backend: LMDB } }\n' % train_db)
        images, labels = mnist.load(args.mnist)["train"]
        n = (len(images) // 64) * 64
        arrays = (numpy.ascontiguousarray(images[:n, None] * numpy.float32(0.00390625), dtype=numpy.float32),
                  numpy.asarray(labels[:n], dtype=numpy.float32))
        mem_layer = ('layer { name: "mnist" type: "MemoryData" top: "data" top: "label" memory_data_param { '
                     'batch_size: 64 channels: 1 height: 28 width: 28 } }\n')
        # Both solvers live side by side and take turns, a short round each:
        # the machine's drifting load (a shared VM here) then hits both alike,
        # and the median of the per-round ratios is the figure.
        lmdb_solver = lenet_solver(lenet_text(data_layer))
        mem_solver = lenet_solver(lenet_text(mem_layer), arrays)
        lmdb_ms, mem_ms = [], []
        for _ in range(args.rounds):
            lmdb_ms.append(timed_steps(lmdb_solver, args.iters))
            mem_ms.append(timed_steps(mem_solver, args.iters))
        ratios = [a / b for a, b in zip(lmdb_ms, mem_ms)]
        print("LeNet training, batch 64, %d alternating rounds of %d iterations: LMDB Data layer %.2f ms/iter, "
              "in-memory MemoryData %.2f ms/iter (medians); median ratio %.3f (quartiles %.3f-%.3f)"
              % (args.rounds, args.iters, numpy.median(lmdb_ms), numpy.median(mem_ms), numpy.median(ratios),
                 numpy.percentile(ratios, 25), numpy.percentile(ratios, 75)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
