"""Training survives being killed at any moment, and a full disk.

``netlib train`` is killed with SIGKILL at 20 seeded random moments (snapshots
every few iterations, both formats).  After each kill: every file under a
snapshot's name loads (weights into the net, solver states), temporary files
never carry a snapshot's name and are removed by the next start, and resuming
from the newest solver state ends with exactly the weights of an uninterrupted
run.  A write that exceeds a file-size limit (as a full disk does), or a
file system that turns read-only, ends training with one clear error line and
the previous snapshot intact.  SIGHUP (snapshot) and SIGINT (stop) at seeded
random moments end the run normally with every snapshot loadable; a second
SIGINT while a stop is pending ends it at once (exit code 130, one line).
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


READ_ONLY_CHILD = r'''
import errno, glob, os, sys
from netlib.tools import cli
snap = os.path.abspath("snap")
real_open = os.open
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def read_only_after_first_snapshot(path, flags, *args, **kwargs):
    # The snapshot folder's file system turns read-only once the first
    # snapshot is complete (as after a disk error); every write open then
    # fails with EROFS, as the kernel's would.
    if (flags & WRITE and os.path.abspath(path).startswith(snap + os.sep)
            and glob.glob(os.path.join(snap, "crash_iter_10.solverstate*"))):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_open(path, flags, *args, **kwargs)


os.open = read_only_after_first_snapshot
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_read_only_disk_during_a_snapshot(tmp_path, fmt):
    folder = str(tmp_path)
    model_suffix, state_suffix = SUFFIX[fmt]
    make_work(folder, fmt, max_iter=30, every=10)
    proc = subprocess.run([sys.executable, "-c", READ_ONLY_CHILD, "train", "--solver", "solver.prototxt"],
                          cwd=folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("netlib: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "crash_iter_20" in lines[-1] and "Read-only file system" in lines[-1], lines[-1]
    assert sorted(os.listdir(os.path.join(folder, "snap"))) == ["crash_iter_10" + model_suffix,
                                                                 "crash_iter_10" + state_suffix]
    weights(os.path.join(folder, "snap", "crash_iter_10" + model_suffix))   # the previous snapshot loads
    read_solver_state(os.path.join(folder, "snap", "crash_iter_10" + state_suffix))


def test_read_only_snapshot_folder_at_start(tmp_path):
    # Caffe's CheckSnapshotWritePermissions: refused before any training.
    folder = str(tmp_path)
    make_work(folder, "HDF5", max_iter=30, every=10)
    child = READ_ONLY_CHILD.replace('glob.glob(os.path.join(snap, "crash_iter_10.solverstate*"))', "True")
    child = child.replace("sys.exit(", "os.access = lambda path, mode: False if os.path.abspath(path) == snap "
                                       "and mode & os.W_OK else os.path.exists(path)\nsys.exit(")
    proc = subprocess.run([sys.executable, "-c", child, "train", "--solver", "solver.prototxt"],
                          cwd=folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("netlib: error: ") and "Cannot write to snapshot prefix" in last, proc.stderr
    assert "Iteration" not in proc.stderr and os.listdir(os.path.join(folder, "snap")) == []


def _check_snapshots(folder, fmt):
    """Every file under a snapshot's name loads; no temporary file is left."""
    model_suffix, state_suffix = SUFFIX[fmt]
    snap = os.path.join(folder, "snap")
    assert not [f for f in os.listdir(snap) if f.endswith(".tmp")], os.listdir(snap)
    models = glob.glob(os.path.join(snap, "*" + model_suffix))
    states = glob.glob(os.path.join(snap, "*" + state_suffix))
    for path in models:
        weights(path)
    for path in states:
        read_solver_state(path)
    return models, states


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("fmt", list(SUFFIX))
@pytest.mark.parametrize("seed", range(3))
def test_signals_at_random_moments(tmp_path, fmt, seed):
    # SIGHUP (snapshot) at seeded random moments, some while a snapshot is
    # being written, then SIGINT (stop): the run ends normally with the stop
    # snapshot, no traceback, and every snapshot loads.
    folder = str(tmp_path)
    make_work(folder, fmt, max_iter=10 ** 7, every=13)
    proc, _ = start_and_wait_first_snapshot(folder)
    rng = random.Random(seed)
    try:
        for _ in range(8):
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGHUP)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    models, states = _check_snapshots(folder, fmt)
    assert len(models) == len(states) >= 2


SLOW_CHILD = r'''
import sys, time
from netlib.tools import cli
from netlib.builtin.data import HDF5DataLayer
fast = HDF5DataLayer.forward


def slow(self, bottom, top):        # 0.3 s per iteration: signals land inside one
    time.sleep(0.3)
    fast(self, bottom, top)


HDF5DataLayer.forward = slow
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_second_sigint_aborts_with_one_line(tmp_path, fmt):
    # A second SIGINT while the stop is still pending (the same iteration)
    # ends at once: exit code 130, one line, snapshots consistent.  (Python
    # merges two SIGINTs that arrive before its handler runs; the iteration is
    # slowed so that they cannot.)
    folder = str(tmp_path)
    make_work(folder, fmt, max_iter=10 ** 7, every=2)
    with open(os.path.join(folder, "err.txt"), "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "train", "--solver", "solver.prototxt"],
                                cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        deadline = time.time() + 120
        while not glob.glob(os.path.join(folder, "snap", "*")) and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = open(os.path.join(folder, "err.txt")).read()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "netlib: interrupted"
    _check_snapshots(folder, fmt)
