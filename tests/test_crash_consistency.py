"""Training survives being killed at any moment, and a full disk.

``netlib train`` is killed with SIGKILL at 20 seeded random moments (snapshots
every few iterations, both formats).  After each kill: every file under a
snapshot's name loads (weights into the net, solver states), temporary files
never carry a snapshot's name and are removed by the next start, and resuming
from the newest solver state ends with exactly the weights of an uninterrupted
run.  A write that exceeds a file-size limit (as a full disk does) ends
training with one clear error line and the previous snapshot intact.
"""
import glob
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import netlib
from netlib.checkpoint import read_solver_state

NET = """name: "crash"
layer { name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "train.txt" batch_size: 16 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 256 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """net: "net.prototxt"
base_lr: 0.05
momentum: 0.9
lr_policy: "fixed"
display: 0
max_iter: %(max_iter)d
snapshot: %(every)d
snapshot_prefix: "snap/crash"
snapshot_format: %(fmt)s
random_seed: 7
"""

SUFFIX = {"HDF5": (".caffemodel.h5", ".solverstate.h5"), "BINARYPROTO": (".caffemodel", ".solverstate")}
ENV = dict(os.environ, NETLIB_NO_PROGRESS="1")


MAX_ITER = 1200


def make_work(folder, fmt, max_iter=MAX_ITER, every=13):
    os.makedirs(os.path.join(folder, "snap"), exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 64)).astype(np.float32)
    with h5py.File(os.path.join(folder, "train.h5"), "w") as f:
        f["data"] = x
        f["label"] = (x[:, 0] > 0).astype(np.float32)
    with open(os.path.join(folder, "train.txt"), "w") as fh:
        fh.write("train.h5\n")
    with open(os.path.join(folder, "net.prototxt"), "w") as fh:
        fh.write(NET)
    with open(os.path.join(folder, "solver.prototxt"), "w") as fh:
        fh.write(SOLVER % {"max_iter": max_iter, "every": every, "fmt": fmt})


def train(folder, *extra, limit=None, timeout=300):
    def preexec():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-m", "netlib", "train", "--solver", "solver.prototxt"] + list(extra),
                          cwd=folder, env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def weights(path):
    """The weights a snapshot holds, loaded into the net (data source paths
    are relative to the work folder)."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        net = netlib.Net("net.prototxt", netlib.TEST)
        net.copy_from(os.path.abspath(path) if os.path.isabs(path) else os.path.join(cwd, path))
        out = {k: [b.data.copy() for b in v] for k, v in net.params.items()}
        net.close()
        return out
    finally:
        os.chdir(cwd)


def start_and_wait_first_snapshot(folder):
    """Start ``netlib train``; return (process, seconds until its first snapshot file appeared)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "netlib", "train", "--solver", "solver.prototxt"],
                            cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = os.path.join(folder, "snap", "*crash_iter_*")
    while not glob.glob(pattern) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    return proc, time.time() - t0


def iteration_of(path):
    return int(re.search(r"_iter_(\d+)\.", os.path.basename(path)).group(1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, per format: (final weights, seconds to the first
    snapshot, seconds of training after it)."""
    out = {}
    for fmt in SUFFIX:
        folder = str(tmp_path_factory.mktemp("ref_" + fmt.lower()))
        make_work(folder, fmt)
        t0 = time.time()
        proc, start = start_and_wait_first_snapshot(folder)
        assert proc.wait(timeout=300) == 0
        final = os.path.join(folder, "snap", "crash_iter_%d%s" % (MAX_ITER, SUFFIX[fmt][0]))
        out[fmt] = (weights(final), start, time.time() - t0 - start)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_kill_at_a_random_moment_then_resume_exactly(tmp_path, reference, seed):
    fmt = "HDF5" if seed % 2 else "BINARYPROTO"
    model_suffix, state_suffix = SUFFIX[fmt]
    ref_weights, start, training = reference[fmt]
    folder = str(tmp_path)
    make_work(folder, fmt)
    rng = random.Random(seed)
    if seed < 2:        # during start-up, before any snapshot
        proc = subprocess.Popen([sys.executable, "-m", "netlib", "train", "--solver", "solver.prototxt"],
                                cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.05, 0.9) * start
    else:               # during training (snapshots every 13 iterations: often mid-write)
        proc, _ = start_and_wait_first_snapshot(folder)
        delay = rng.uniform(0.0, 0.75) * training
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)        # (on a slow moment the run may have ended first: then the checks still hold)
    snap = os.path.join(folder, "snap")
    # 1. only complete snapshots under snapshot names; each one loads
    named = [p for p in glob.glob(os.path.join(snap, "crash_iter_*")) if not os.path.basename(p).startswith(".")]
    assert all(p.endswith((model_suffix, state_suffix)) for p in named), named
    for path in named:
        if path.endswith(model_suffix):
            weights(path)
        else:
            read_solver_state(path)
    # 2. resume from the newest state (or start again when the kill came first)
    states = sorted((p for p in named if p.endswith(state_suffix)), key=iteration_of)
    extra = ["--snapshot", os.path.relpath(states[-1], folder)] if states else []
    done = train(folder, *extra)
    assert done.returncode == 0, done.stderr
    assert not glob.glob(os.path.join(snap, ".*.tmp")), "temporary files left after a restart"
    # 3. the same weights as the uninterrupted run, bit for bit
    got = weights(os.path.join(snap, "crash_iter_%d%s" % (MAX_ITER, model_suffix)))
    for name, blobs in ref_weights.items():
        for a, b in zip(blobs, got[name]):
            np.testing.assert_array_equal(a, b, err_msg="%s after a kill at %.2f s (%s)" % (name, delay, fmt))


def test_stale_temp_files_are_removed_on_start(tmp_path):
    make_work(str(tmp_path), "HDF5", max_iter=1, every=1)
    stale = tmp_path / "snap" / ".crash_iter_5.caffemodel.h5.abc123.tmp"
    stale.write_bytes(b"half a snapshot")
    other = tmp_path / "snap" / ".notes.tmp"               # not a snapshot's temporary file: kept
    other.write_text("mine")
    proc = train(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and other.exists()


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_full_disk_during_a_snapshot(tmp_path, fmt):
    folder = str(tmp_path)
    model_suffix, state_suffix = SUFFIX[fmt]
    make_work(folder, fmt, max_iter=10, every=10)
    assert train(folder).returncode == 0
    text = open(os.path.join(folder, "solver.prototxt")).read().replace("max_iter: 10", "max_iter: 20")
    open(os.path.join(folder, "solver.prototxt"), "w").write(text)
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(folder, "snap", "crash_iter_10*"))}
    assert len(before) == 2
    # every file may grow to 20 kB only: the 70 kB weights of iteration 20 cannot be written
    proc = train(folder, "--snapshot", "snap/crash_iter_10" + state_suffix, limit=20000)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("netlib: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "crash_iter_20" in lines[-1] and "internal error" not in lines[-1], lines[-1]
    for path, data in before.items():                       # the previous snapshot is intact
        assert open(path, "rb").read() == data
    assert not glob.glob(os.path.join(folder, "snap", "crash_iter_20*"))
    assert not glob.glob(os.path.join(folder, "snap", ".*.tmp"))
    weights(os.path.join(folder, "snap", "crash_iter_10" + model_suffix))
