"""LeNet on the MNIST LMDB: test accuracy after 2,000 iterations, over seeds.

Trains Caffe's models/lenet (Data layers over the LMDBs ``netlib data mnist``
writes, Caffe's solver) for 2,000 iterations once per seed with ``netlib
train`` and, when real Caffe is installed (``caffe`` on PATH, e.g. after
``source /opt/caffe/env.sh`` from shared/tools/build-reference-caffe.sh), with
``caffe train`` on the same databases and solver.  Prints the accuracy at
iteration 2,000 per seed and the means.

    python benchmarks/bench_lenet_lmdb.py [--mnist DIR] [--seeds 1,2,3,4,5] [--caffe PATH]

About 40 s per seed and framework on two cores.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ACC = re.compile(r"Test net output #\d+: accuracy = ([0-9.eE+-]+)")


def last_accuracy(log_text):
    found = ACC.findall(log_text)
    return float(found[-1]) if found else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--caffe", default=shutil.which("caffe"), help="real Caffe's binary (optional)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="netlib-bench-lenet-")
    env = dict(os.environ, NETLIB_NO_PROGRESS="1", PYTHONPATH=ROOT)
    try:
        subprocess.run([sys.executable, "-m", "netlib", "data", "mnist", "--from", args.mnist,
                        "--out", os.path.join(work, "data", "mnist")], check=True, env=env,
                       stderr=subprocess.DEVNULL)
        os.makedirs(os.path.join(work, "models", "lenet"))
        shutil.copy(os.path.join(ROOT, "models", "lenet", "lenet_train_test.prototxt"),
                    os.path.join(work, "models", "lenet"))
        solver = open(os.path.join(ROOT, "models", "lenet", "lenet_solver.prototxt")).read()
        solver = solver.replace("max_iter: 10000", "max_iter: 2000").replace("snapshot: 5000", "snapshot: 0")
        results = {"netlib": [], "caffe": []}
        for seed in [int(s) for s in args.seeds.split(",")]:
            path = os.path.join(work, "models", "lenet", "solver_%d.prototxt" % seed)
            with open(path, "w") as f:
                f.write(solver + "\nrandom_seed: %d\nsnapshot_after_train: false\n" % seed)
            runs = [("netlib", [sys.executable, "-m", "netlib", "train", "--solver", path])]
            if args.caffe:
                runs.append(("caffe", [args.caffe, "train", "--solver=" + path]))
            line = "seed %d:" % seed
            for name, cmd in runs:
                out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
                acc = last_accuracy(out.stderr + out.stdout)
                results[name].append(acc)
                line += " %s %.4f" % (name, acc)
            print(line, flush=True)
        for name, accs in results.items():
            if accs:
                print("%s: mean accuracy after 2000 iterations %.4f over %d seeds (min %.4f, max %.4f)"
                      % (name, sum(accs) / len(accs), len(accs), min(accs), max(accs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
