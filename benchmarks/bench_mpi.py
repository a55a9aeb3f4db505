"""Data-parallel scaling: images per second of N ranks vs 1 rank (netlib.parallel).

    python benchmarks/bench_mpi.py [--nets lenet cifar10_quick] [--ranks 1 2] [--iters 40]
                                   [--reduce overlap plain] [--bucket-bytes B]

For each net (bench_nets.py's training nets, with a DummyData source of the
same shapes in place of the Input layer) and each rank count, the script runs
``mpiexec -n N python bench_mpi.py --worker NET`` with one BLAS/OpenMP/numba
thread per rank, and reports rank 0's figures: images per second over all
ranks (batch per rank x ranks x iterations / seconds), seconds per
iteration, and the share of each iteration spent in the gradient all-reduce
(which includes waiting for the slowest rank; with the overlapped
all-reduce, the time the solver still waits for it after backward).
``--reduce``: ``overlap`` (layer_wise_reduce, Caffe's default: buckets
all-reduced during backward) and/or ``plain`` (one all-reduce after it).
Needs mpi4py and mpiexec (``pip install ".[mpi]"``).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1", "NETLIB_NO_PROGRESS": "1"}


def worker(name, iters, reduce="overlap", warmup=3):
    import netlib
    from netlib.proto import caffe_pb2
    saved, sys.argv = sys.argv, [sys.argv[0]]
    import bench_nets
    sys.argv = saved
    _, chw, batch, _ = bench_nets.NETS[name]
    param = bench_nets.bench_param(name, "train", batch)
    data = param.layer[0]
    data.type = "DummyData"
    data.ClearField("input_param")
    p = data.dummy_data_param
    p.shape.add().dim.extend([batch] + list(chw))
    p.shape.add().dim.extend([batch])
    p.data_filler.add(type="gaussian", std=1.0)
    p.data_filler.add(type="constant", value=1.0)
    sp = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, lr_policy="fixed", max_iter=10 ** 6,
                                   display=0, random_seed=1, layer_wise_reduce=reduce == "overlap")
    sp.net_param.CopyFrom(param)
    solver = netlib.get_solver(sp)
    solver.step(warmup)
    sync = solver._sync
    comm0 = sync.comm_seconds if sync else 0.0
    t0 = time.perf_counter()
    solver.step(iters)
    seconds = time.perf_counter() - t0
    comm = (sync.comm_seconds - comm0) if sync else 0.0
    ranks = netlib.solver_count()
    if netlib.solver_rank() == 0:
        print(json.dumps({"net": name, "ranks": ranks, "batch": batch, "iters": iters, "seconds": seconds,
                          "reduce": reduce, "buckets": len(sync._buckets) if sync and sync.overlap else 1,
                          "comm_seconds": comm, "megabytes": (sync.nbytes / 1e6) if sync else 0.0}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["lenet", "cifar10_quick"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--reduce", nargs="+", default=["overlap"], choices=["overlap", "plain"])
    ap.add_argument("--bucket-bytes", type=int)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.iters, args.reduce[0])
        return
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, **ONE_THREAD)
    if args.bucket_bytes:
        env["NETLIB_BUCKET_BYTES"] = str(args.bucket_bytes)
    rows = []
    for name in args.nets:
        for n in args.ranks:
            for reduce in (args.reduce if n > 1 else args.reduce[:1]):
                cmd = [mpiexec, "-n", str(n), sys.executable, os.path.abspath(__file__), "--worker", name,
                       "--iters", str(args.iters), "--reduce", reduce]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print("%-14s %5s %8s %7s %12s %10s %12s %8s" % ("net", "ranks", "reduce", "batch", "images/s", "ms/iter",
                                                       "all-reduce", "MB"))
    base = {}
    for r in rows:
        ips = r["batch"] * r["ranks"] * r["iters"] / r["seconds"]
        base.setdefault(r["net"], ips)
        label = "-" if r["ranks"] == 1 else "%s/%d" % (r["reduce"], r["buckets"]) if r["reduce"] == "overlap" \
            else "plain"
        print("%-14s %5d %8s %7d %12.1f %10.1f %11.1f%% %8.2f   (x%.2f vs 1 rank)"
              % (r["net"], r["ranks"], label, r["batch"], ips, 1e3 * r["seconds"] / r["iters"],
                 100 * r["comm_seconds"] / r["seconds"], r["megabytes"], ips / base[r["net"]]))


if __name__ == "__main__":
    main()
