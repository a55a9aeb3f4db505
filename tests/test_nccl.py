"""Several GPUs of one node over NCCL (netlib/nccl.py), without GPUs: the
processes run on the CuPy stand-in (tests/fakecupy.py, ``NETLIB_GPU_MODULE``)
and NCCL's stand-in (tests/fakenccl.py, ``NETLIB_NCCL_MODULE``), which has
cupy.cuda.nccl's calls and moves the bytes behind the device pointers.

``netlib train --gpu 0,1`` (no mpirun) and pycaffe's multi-GPU script
(Caffe's python/train.py: NCCL.new_uid, set_solver_count/rank, NCCL(solver,
uid), bcast, add_callback, after_backward) with batch B per process end with
the weights of one process with batch 2B (relative 1e-5), as the MPI runs do
(tests/test_parallel.py)."""
import os
import subprocess
import sys

import pytest

import netlib
from netlib.errors import ConfigError

from test_parallel import ENV, assert_close, final_weights, make_work, train, write_solver

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = dict(ENV, NETLIB_GPU_MODULE="fakecupy", NETLIB_NCCL_MODULE="fakenccl",
            PYTHONPATH=os.pathsep.join([HERE] + [p for p in [ENV.get("PYTHONPATH")] if p]))

SCRIPT = r'''
import sys
import netlib as caffe

rank, uid, solver_file, iterations = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3], int(sys.argv[4])
caffe.set_device(rank)
caffe.set_mode_gpu()
caffe.set_solver_count(2)
caffe.set_solver_rank(rank)
caffe.set_multiprocess(True)
solver = caffe.get_solver(solver_file)
assert solver.net.blobs["data"].data.shape[0] == 4
nccl = caffe.NCCL(solver, uid)
nccl.bcast()
solver.add_callback(nccl)
if solver.param.layer_wise_reduce:
    solver.net.after_backward(nccl)
solver.step(iterations)
solver.snapshot()                  # every rank calls it; rank 0 writes
print("rank %d tests: %d" % (rank, len(solver.test_nets)))
'''


def _single(folder, solver):
    one = write_solver(folder, "one", "hdf5", 8, solver)
    p = train(folder, one)
    assert p.returncode == 0, p.stderr
    return final_weights(os.path.join(folder, "one", "w_iter_8.caffemodel.h5"))


@pytest.mark.parametrize("solver", ["SGD", "Adam", "Nesterov"])
def test_netlib_train_gpu_0_1_equals_one_process_with_twice_the_batch(tmp_path, solver):
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    single = _single(folder, solver)
    two = write_solver(folder, "two", "hdf5", 4, solver)
    p = subprocess.run([sys.executable, "-m", "netlib", "train", "--solver", two, "--gpu", "0,1",
                        "--log", "two.log"], cwd=folder, env=FAKE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_close(single, final_weights(os.path.join(folder, "two", "w_iter_8.caffemodel.h5")))
    log = open(os.path.join(folder, "two.log")).read()
    # rank 0 alone logs (the other rank writes nothing at INFO), over NCCL on device buffers
    assert log.count("Solving par") == 1 and "Data-parallel: all-reduce of" in log
    assert "Using GPUs 0, 1" in log and p.stderr.count("Solving par") == 1   # stderr: both ranks


def test_pycaffe_multi_gpu_script(tmp_path):
    """Caffe's python/train.py recipe, one process per GPU."""
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    single = _single(folder, "SGD")
    two = write_solver(folder, "two", "hdf5", 4, "SGD", extra='test_iter: 1\ntest_interval: 100\n'
                       'test_net: "two.prototxt"\ntest_initialization: false\n')
    script = os.path.join(folder, "train_two.py")
    with open(script, "w") as fh:
        fh.write(SCRIPT)
    import fakenccl
    uid = netlib.nccl.uid_bytes(fakenccl.get_unique_id())
    procs = [subprocess.Popen([sys.executable, script, str(r), uid.hex(), two, "8"], cwd=folder, env=FAKE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert_close(single, final_weights(os.path.join(folder, "two", "w_iter_8.caffemodel.h5")))
    # Caffe's root solver alone has test nets
    assert "rank 0 tests: 1" in outs[0][0] and "rank 1 tests: 0" in outs[1][0]


def test_nccl_errors(monkeypatch):
    from netlib import nccl, runtime
    monkeypatch.delenv("NETLIB_NCCL_MODULE", raising=False)
    if nccl.nccl_module() is None:
        assert netlib.has_nccl() is False
        with pytest.raises(ConfigError, match="needs NCCL.*mpirun"):
            netlib.NCCL.new_uid()
    monkeypatch.setenv("NETLIB_NCCL_MODULE", "fakenccl")
    assert netlib.has_nccl() is True
    uid = netlib.NCCL.new_uid()
    assert isinstance(uid, bytes) and len(uid) == 128
    with pytest.raises(ConfigError, match="set_solver_count"):
        netlib.NCCL(object(), uid)             # solver_count() is 1
    with pytest.raises(ConfigError, match="128 bytes"):
        nccl._uid_tuple(b"short")
    runtime.set_solver_count(2)
    try:
        with pytest.raises(ConfigError, match="device buffers"):
            nccl.NcclWorld(2, uid, 0, xp=__import__("numpy"))    # NCCL needs the GPU mode
    finally:
        runtime.set_solver_count(1)


def test_child_ranks_do_not_share_the_log():
    from netlib.tools.cli import _child_argv
    assert _child_argv(["train", "--solver", "s", "--log", "x.log", "--gpu", "0,1"]) == \
        ["train", "--solver", "s", "--gpu", "0,1"]
    assert _child_argv(["train", "--log=x.log", "--solver", "s"]) == ["train", "--solver", "s"]


def _gpu_run(folder, env, timeout=120):
    make_work(folder, "hdf5")
    two = write_solver(folder, "two", "hdf5", 4, "SGD")
    return subprocess.run([sys.executable, "-m", "netlib", "train", "--solver", two, "--gpu", "0,1"], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_ids_beyond_the_devices_are_a_clear_error(tmp_path):
    p = _gpu_run(str(tmp_path), dict(FAKE, FAKECUPY_DEVICES="1"))
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "netlib: error: --gpu 0,1: there is 1 CUDA device (ids 0..0)"


def test_a_failing_rank_ends_the_run(tmp_path):
    """Rank 1 dies while rank 0 waits for it in NCCL: rank 0 ends too, naming it (no hang)."""
    p = _gpu_run(str(tmp_path), dict(FAKE, FAKENCCL_FAIL_RANK="1"))
    assert p.returncode != 0
    assert "fails on purpose" in p.stderr
    assert "rank 1 of the --gpu run ended with status 1" in p.stderr
