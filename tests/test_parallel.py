"""Data-parallel training over MPI (netlib.parallel).

The equivalence tests run ``mpiexec -n 2 netlib train`` (the mpich wheel's
launcher, two local ranks) with batch B per rank, and one process with batch
2B on the same data, then compare the final weights (relative 1e-5): several
solver types, iter_size, clipping, weight decay, HDF5Data, Data (LMDB) and
ImageData readers.  The sharding of every reader is also checked in-process
(pycaffe's set_solver_count/set_solver_rank, no MPI needed).
"""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import netlib
from netlib import runtime

ENV = dict(os.environ, NETLIB_NO_PROGRESS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.path.isfile(here) else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        path = None
    if not path:
        pytest.skip("needs mpi4py and an mpiexec (pip install mpi4py mpich: the test extra)")
    return path


NET = """name: "par"
layer { name: "d" %(data)s }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 24 weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

READERS = {
    "hdf5": 'type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "train.txt" batch_size: %d }',
    "lmdb": 'type: "Data" top: "data" top: "label" data_param { source: "train_lmdb" backend: LMDB batch_size: %d } '
            'transform_param { scale: 0.00390625 }',
    "images": 'type: "ImageData" top: "data" top: "label" image_data_param { source: "list.txt" root_folder: "img/" '
              'batch_size: %d }',
}

SOLVERS = {
    "SGD": 'type: "SGD"\nmomentum: 0.9\nweight_decay: 0.01\niter_size: 2\nclip_gradients: 0.5\n',
    "Adam": 'type: "Adam"\nmomentum: 0.9\nmomentum2: 0.999\nbase_lr: 0.01\nweight_decay: 0.001\n',
    "Nesterov": 'type: "Nesterov"\nmomentum: 0.9\niter_size: 3\n',
    "RMSProp": 'type: "RMSProp"\nrms_decay: 0.9\nbase_lr: 0.01\nclip_gradients: 1\n',
    "AdaDelta": 'type: "AdaDelta"\nmomentum: 0.95\nbase_lr: 1\ndelta: 1e-6\n',
}


def make_work(folder, reader, rows=60):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(rows, 1, 4, 4)).astype(np.uint8)
    label = (x[:, 0, 0, 0] > 128).astype(np.int64) + (x[:, 0, 1, 1] > 200)
    if reader == "hdf5":
        with h5py.File(os.path.join(folder, "train.h5"), "w") as f:
            f["data"] = x.astype(np.float32) / 256
            f["label"] = label.astype(np.float32)
        with open(os.path.join(folder, "train.txt"), "w") as fh:
            fh.write("train.h5\n")
    elif reader == "lmdb":
        pytest.importorskip("lmdb")
        from netlib.data.datum import array_to_datum
        from netlib.data.db import create_db
        with create_db(os.path.join(folder, "train_lmdb"), "lmdb") as db:
            for i in range(rows):
                db.put(b"%08d" % i, array_to_datum(x[i], int(label[i])).SerializeToString())
    else:
        Image = pytest.importorskip("PIL.Image")
        os.makedirs(os.path.join(folder, "img"), exist_ok=True)
        with open(os.path.join(folder, "list.txt"), "w") as fh:
            for i in range(rows):
                Image.fromarray(np.repeat(x[i, 0][:, :, None], 3, axis=2)).save(
                    os.path.join(folder, "img", "%d.png" % i))
                fh.write("%d.png %d\n" % (i, label[i]))


def write_solver(folder, name, reader, batch, solver, max_iter=8, extra=""):
    with open(os.path.join(folder, name + ".prototxt"), "w") as fh:
        fh.write(NET % {"data": READERS[reader] % batch})
    with open(os.path.join(folder, name + "_solver.prototxt"), "w") as fh:
        rule = SOLVERS[solver]
        fh.write('net: "%s.prototxt"\n%slr_policy: "fixed"\ndisplay: 0\nmax_iter: %d\n'
                 'snapshot_prefix: "%s/w"\nsnapshot_format: HDF5\nrandom_seed: 5\n%s%s'
                 % (name, "" if "base_lr" in rule else "base_lr: 0.1\n", max_iter, name, rule, extra))
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    return name + "_solver.prototxt"


def train(folder, solver_file, ranks=1, extra=(), timeout=300, env=None):
    cmd = [sys.executable, "-m", "netlib", "train", "--solver", solver_file] + list(extra)
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks)] + cmd
    return subprocess.run(cmd, cwd=folder, env=dict(ENV, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def final_weights(path):
    with h5py.File(path, "r") as f:
        return {"%s/%s" % (layer, k): f["data"][layer][k][()] for layer in f["data"] for k in f["data"][layer]}


def assert_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(np.abs(a[k]).max(), 1e-12)
        assert np.abs(a[k] - b[k]).max() / scale <= rtol, (k, np.abs(a[k] - b[k]).max() / scale)


@pytest.mark.parametrize("reader,solver", [("hdf5", "SGD"), ("hdf5", "Adam"), ("hdf5", "Nesterov"),
                                           ("hdf5", "RMSProp"), ("hdf5", "AdaDelta"), ("lmdb", "SGD"),
                                           ("images", "Adam")])
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, reader, solver):
    mpiexec()
    folder = str(tmp_path)
    make_work(folder, reader)
    single = write_solver(folder, "one", reader, 8, solver)
    double = write_solver(folder, "two", reader, 4, solver)
    p1 = train(folder, single)
    assert p1.returncode == 0, p1.stderr
    p2 = train(folder, double, ranks=2)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert_close(final_weights(os.path.join(folder, "one", "w_iter_8.caffemodel.h5")),
                 final_weights(os.path.join(folder, "two", "w_iter_8.caffemodel.h5")))
    # only rank 0 logs at INFO, and it reports the all-reduce
    assert p2.stderr.count("Solving par") == 1 and "Data-parallel: all-reduce of" in p2.stderr


@pytest.mark.parametrize("mode", ["buckets", "plain"])
def test_overlapped_and_plain_all_reduce(tmp_path, mode):
    """layer_wise_reduce (Caffe's default, as in the test above: one bucket here) with 256-byte buckets
    (one non-blocking all-reduce per layer, started from the backward), and off (one after backward):
    the same weights as one process with twice the batch."""
    mpiexec()
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    single = write_solver(folder, "one", "hdf5", 8, "SGD")
    double = write_solver(folder, "two", "hdf5", 4, "SGD",
                          extra="layer_wise_reduce: false\n" if mode == "plain" else "")
    p1 = train(folder, single)
    assert p1.returncode == 0, p1.stderr
    p2 = train(folder, double, ranks=2, env={"NETLIB_BUCKET_BYTES": "256"})
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert_close(final_weights(os.path.join(folder, "one", "w_iter_8.caffemodel.h5")),
                 final_weights(os.path.join(folder, "two", "w_iter_8.caffemodel.h5")))
    assert ("in 2 buckets overlapping backward" if mode == "buckets" else "after backward") in p2.stderr


def test_buckets_follow_the_order_diffs_become_final():
    """Shared parameters are final after their lowest-index user; buckets are contiguous, in backward order."""
    from google.protobuf import text_format
    from netlib import parallel
    from netlib.proto import caffe_pb2
    text = """
    layer { name: "in" type: "Input" top: "x" top: "label" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
    layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } param { name: "b" }
            inner_product_param { num_output: 3 } }
    layer { name: "mid" type: "InnerProduct" bottom: "a" top: "m" inner_product_param { num_output: 64 } }
    layer { name: "c" type: "InnerProduct" bottom: "m" top: "c" inner_product_param { num_output: 3 } }
    layer { name: "again" type: "InnerProduct" bottom: "c" top: "z" param { name: "w" } param { name: "b" }
            inner_product_param { num_output: 3 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "z" bottom: "label" top: "loss" }
    """
    net = netlib.Net(text_format.Parse(text, caffe_pb2.NetParameter()), netlib.TRAIN)
    assert parallel._ready_layers(net) == [1, 1, 2, 2, 3, 3]   # a/again's shared pair is final after layer 1

    class FakeWorld:
        xp, size, rank, is_root = np, 2, 0, True
        started = []

        def iallreduce_sum(self, buf):
            self.started.append(buf.size)
            return None

        def progress(self, requests):
            pass

    class FakeSolver:
        param = caffe_pb2.SolverParameter()   # layer_wise_reduce: true by default, as in Caffe
    FakeSolver.net = net
    sync = parallel.GradientSync(FakeSolver(), FakeWorld(), bucket_bytes=100)
    # backward order: c (64*3 + 3), mid (3*64 + 64), then the shared a/again pair (9 + 3)
    assert [p.count for p in sync.params] == [192, 3, 192, 64, 9, 3]
    assert [(b[0], b[1], b[2]) for b in sync._buckets] == [(0, 195, 3), (195, 451, 2), (451, 463, 1)]
    sync._layer_done(3)
    assert FakeWorld.started == [195]
    sync._layer_done(2)
    sync._layer_done(1)
    assert FakeWorld.started == [195, 256, 12]


def test_resume_under_mpirun_continues_exactly(tmp_path):
    # Dropout draws from each rank's own stream: the snapshot keeps all of them.
    mpiexec()
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    name = write_solver(folder, "two", "hdf5", 4, "SGD", max_iter=12, extra="snapshot: 6\n")
    text = open(os.path.join(folder, "two.prototxt")).read().replace(
        'layer { name: "relu"', 'layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" '
        'dropout_param { dropout_ratio: 0.3 } }\nlayer { name: "relu"')
    open(os.path.join(folder, "two.prototxt"), "w").write(text)
    p = train(folder, name, ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    straight = final_weights(os.path.join(folder, "two", "w_iter_12.caffemodel.h5"))
    os.remove(os.path.join(folder, "two", "w_iter_12.caffemodel.h5"))
    p = train(folder, name, ranks=2, extra=["--snapshot", "two/w_iter_6.solverstate.h5"])
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = final_weights(os.path.join(folder, "two", "w_iter_12.caffemodel.h5"))
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k])


CHILD = r'''
import sys
import netlib
from netlib import parallel
from netlib.files import read_net_param
from netlib.solver import read_solver
text = open("one.prototxt").read()
if parallel.world().rank == 1 and "%(differ)s" == "yes":
    text = text.replace("num_output: 24", "num_output: 25")
param = read_solver(open("one_solver.prototxt").read())[0]
param.ClearField("net")
param.net_param.CopyFrom(read_net_param(text))
lines = ["count %d rank %d" % (netlib.solver_count(), netlib.solver_rank())]
try:
    netlib.get_solver(param).step(2)
except netlib.NetlibError as exc:
    lines.append("error: %s" % exc)
with open("out_%d.txt" % netlib.solver_rank(), "w") as fh:      # one file per rank: no interleaving
    fh.write("\n".join(lines) + "\n")
'''


@pytest.mark.parametrize("differ", ["no", "yes"])
def test_python_solver_under_mpirun_and_ranks_that_disagree(tmp_path, differ):
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    write_solver(folder, "one", "hdf5", 4, "SGD")
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", CHILD.replace("%(differ)s", differ)],
                          cwd=folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [ln for r in (0, 1) for ln in open(os.path.join(folder, "out_%d.txt" % r)).read().splitlines()]
    assert sorted(ln for ln in out if ln.startswith("count")) == \
        ["count 2 rank 0", "count 2 rank 1"]                     # pycaffe's members tell the truth
    errors = [ln for ln in out if ln.startswith("error:")]
    if differ == "no":
        assert not errors
    else:
        assert len(errors) == 2 and all("rank(s) 1 built a different train net" in e for e in errors), errors


def test_fewer_records_than_ranks_is_a_clear_error(tmp_path):
    folder = str(tmp_path)
    make_work(folder, "hdf5", rows=1)
    name = write_solver(folder, "two", "hdf5", 4, "SGD")
    p = train(folder, name, ranks=2)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("netlib: error:")]
    assert lines and all("holds 1 item(s), fewer than the 2 ranks" in ln for ln in lines), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_mpirun_without_mpi4py_is_a_clear_error(tmp_path):
    # What a launcher's environment looks like, with mpi4py made unimportable.
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    name = write_solver(folder, "one", "hdf5", 4, "SGD")
    code = "import sys; sys.modules['mpi4py'] = None\nfrom netlib.tools import cli\nsys.exit(cli.main(sys.argv[1:]))"
    env = dict(ENV, PMI_SIZE="2", PMI_RANK="0")
    p = subprocess.run([sys.executable, "-c", code, "train", "--solver", name], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("netlib: error: ")
    assert "mpi4py is not installed: pip install mpi4py mpich" in p.stderr


def test_several_gpus_without_cupy_or_mpirun(tmp_path, capsys):
    from netlib.tools import cli
    folder = str(tmp_path)
    make_work(folder, "hdf5")
    name = write_solver(folder, "one", "hdf5", 4, "SGD")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = cli.main(["train", "--solver", name, "--gpu", "0,1"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr()[1]
    assert code == 1 and err.startswith("netlib: error: ")
    from netlib import backend
    assert ("CuPy" in err) if backend.cupy is None else ("mpirun -n 2" in err)


# -- the readers' shards, in-process ---------------------------------------------------
@pytest.fixture
def ranks():
    saved = runtime.solver_count(), runtime.solver_rank()

    def use(count, rank):
        runtime.set_solver_count(count)
        runtime.set_solver_rank(rank)
    yield use
    use(*saved)


@pytest.mark.parametrize("reader", ["hdf5", "lmdb", "images"])
def test_rank_shards_interleave_to_the_global_batch(tmp_path, ranks, reader):
    folder = str(tmp_path)
    make_work(folder, reader, rows=10)               # 10 items, batches of 3 x 2 ranks: wraps around
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        def batches(count, rank, batch, n=4):
            ranks(count, rank)
            net = netlib.Net(NET % {"data": READERS[reader] % batch}, netlib.TRAIN)
            out = []
            for _ in range(n):
                net.forward()
                out.append(net.blobs["data"].data.copy())
            net.layers[0].close() if hasattr(net.layers[0], "close") else None
            return out
        single = batches(1, 0, 6)
        r0, r1 = batches(2, 0, 3), batches(2, 1, 3)
        test_net = None
        ranks(2, 1)
        test_net = netlib.Net(NET % {"data": READERS[reader] % 6}, netlib.TEST)   # TEST readers: no shards
        test_net.forward()
        np.testing.assert_array_equal(test_net.blobs["data"].data, single[0])
    finally:
        os.chdir(cwd)
    for whole, a, b in zip(single, r0, r1):
        np.testing.assert_array_equal(whole[0::2], a)   # rank r keeps read positions p % 2 == r
        np.testing.assert_array_equal(whole[1::2], b)
