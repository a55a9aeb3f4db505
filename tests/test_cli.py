"""The ``netlib`` command: flags, one-line errors, train/test/time output,
log files Caffe's parse_log.py can read, signals, progress bar, data prep.

Most tests call ``netlib.tools.cli.main(argv)`` in-process (fast); a few run
the real script in a subprocess where exit status, signals or a clean
stderr matter.
"""
import gzip
import os
import re
import signal
import struct
import subprocess
import sys
import time

import h5py
import numpy
import pytest

import netlib
from netlib.tools import cli, mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "netlib")

# Caffe's tools/extra/parse_log.py and extract_seconds.py patterns.
RE_ITERATION = re.compile(r"Iteration (\d+)")
RE_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
RE_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
RE_LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
RE_GLOG = re.compile(r"^[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) +\d+ [\w.]+:\d+\] ")

NET = """name: "TinyNet"
layer { name: "d" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
        hdf5_data_param { source: "train.txt" batch_size: 8 } }
layer { name: "d" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
        hdf5_data_param { source: "test.txt" batch_size: 10 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: %(outputs)d weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """net: "%(net)s"
test_iter: 4
test_interval: 5
base_lr: 0.1
momentum: 0.9
lr_policy: "fixed"
display: 2
max_iter: %(max_iter)d
snapshot: 5
snapshot_prefix: "snap/tiny"
snapshot_format: %(fmt)s
random_seed: 1
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a linearly separable 2-class problem, a net and a solver."""
    rng = numpy.random.default_rng(0)
    for name, n in (("train", 40), ("test", 40)):
        x = rng.normal(size=(n, 4)).astype(numpy.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(numpy.float32)
        with h5py.File(tmp_path / (name + ".h5"), "w") as f:
            f["data"] = x
            f["label"] = y
        (tmp_path / (name + ".txt")).write_text(name + ".h5\n")
    (tmp_path / "snap").mkdir()
    write_setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")
    return tmp_path


def write_setup(folder, outputs=2, max_iter=10, fmt="HDF5", net="net.prototxt", solver="solver.prototxt"):
    (folder / net).write_text(NET % {"outputs": outputs})
    (folder / solver).write_text(SOLVER % {"net": net, "max_iter": max_iter, "fmt": fmt})


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines, "no error printed"
    assert lines[-1].startswith("netlib: error: "), err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[-1], (frag, lines[-1])
    return lines[-1]


# -- flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train", "--solver=solver.prototxt"],
    ["train", "--solver", "solver.prototxt"],
    ["train", "-solver", "solver.prototxt"],
    ["-solver=solver.prototxt", "train"],
])
def test_flag_forms(work, capsys, argv):
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    assert os.path.isfile("snap/tiny_iter_10.caffemodel.h5")
    assert "Optimization Done." in err


def test_normalize_argv():
    assert cli.normalize_argv(["-solver=a", "--model", "m", "-h", "--level", "-1", "x"]) == \
        ["--solver=a", "--model", "m", "-h", "--level", "-1", "x"]


def test_parse_args_values():
    args = cli.parse_args(["time", "-model", "m.prototxt", "--iterations=7", "-phase", "test",
                           "--stage", "a,b", "--level=2", "--gpu=", "--sighup_effect=NONE"])
    assert (args.command, args.model, args.iterations, args.phase) == ("time", "m.prototxt", 7, "TEST")
    assert args.stages == ["a", "b"] and args.level == 2 and args.sighup_effect == "none"
    assert args.sigint_effect == "stop"


# -- errors: one line, non-zero, no traceback ------------------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    ([], ["no command"]),
    (["frobnicate"], ["unknown command 'frobnicate'"]),
    (["train"], ["--solver"]),
    (["train", "--solver", "missing.prototxt"], ["missing.prototxt"]),
    (["train", "--bogus_flag", "1"], ["--bogus_flag"]),
    (["time", "--model", "net.prototxt", "--iterations", "many"], ["--iterations"]),
    (["train", "--solver", "solver.prototxt", "--weights", "a", "--snapshot", "b"], ["not both"]),
    (["train", "--solver", "solver.prototxt", "--snapshot", "nope.solverstate"], ["nope.solverstate"]),
    (["train", "--solver", "solver.prototxt", "--sigint_effect", "explode"], ["--sigint_effect"]),
    (["test", "--model", "net.prototxt"], ["--weights"]),
    (["test", "--model", "net.prototxt", "--weights", "none.caffemodel"], ["none.caffemodel"]),
    (["time", "--model", "nothere.prototxt"], ["nothere.prototxt"]),
    (["time", "--model", "net.prototxt", "--phase", "VAL"], ["--phase"]),
    (["data", "cifar"], ["cifar"]),
    (["data", "mnist", "--from", "no_such_dir"], ["no_such_dir"]),
    (["train", "--solver", "solver.prototxt", "--log", "no/such/dir/x.log"], ["no/such/dir"]),
])
def test_errors_are_one_line(work, capsys, argv, fragments):
    code, _, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


def test_solver_with_missing_net(work, capsys):
    (work / "bad_solver.prototxt").write_text(SOLVER % {"net": "gone/missing_net.prototxt", "max_iter": 2, "fmt": "HDF5"})
    code, _, err = run_main(capsys, "train", "--solver", "bad_solver.prototxt")
    assert_one_line_error(code, err, "gone/missing_net.prototxt")


def test_bad_prototxt_names_position(work, capsys):
    (work / "broken.prototxt").write_text('name: "x"\nlayer { name: "a" type: "Input" top: "a" \n')
    code, _, err = run_main(capsys, "time", "--model", "broken.prototxt")
    assert_one_line_error(code, err, "broken.prototxt:")


@pytest.mark.parametrize("suffix", [".caffemodel", ".caffemodel.h5"])
def test_truncated_weights(work, capsys, suffix):
    net = netlib.Net("net.prototxt", netlib.TEST)
    path = "w" + suffix
    (net.save_hdf5 if suffix.endswith(".h5") else net.save)(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    code, _, err = run_main(capsys, "test", "--model", "net.prototxt", "--weights", path, "--iterations", "1")
    assert_one_line_error(code, err, path)


def test_weights_for_other_net_names_layer(work, capsys):
    write_setup(work, outputs=3, net="net3.prototxt", solver="solver3.prototxt")
    netlib.Net("net3.prototxt", netlib.TEST).save("other.caffemodel")
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt", "--weights", "other.caffemodel")
    assert_one_line_error(code, err, "'ip'")


def test_snapshot_for_other_net_names_layer(work, capsys):
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt")
    assert code == 0, err
    write_setup(work, outputs=3, net="net3.prototxt", solver="solver3.prototxt")
    code, _, err = run_main(capsys, "train", "--solver", "solver3.prototxt",
                            "--snapshot", "snap/tiny_iter_5.solverstate.h5")
    assert_one_line_error(code, err, "ip")


def test_script_subprocess_error_and_help(work):
    env = dict(os.environ, NETLIB_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "train", "--solver", "nope.prototxt"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["netlib: error: nope.prototxt: no such solver file"]
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "device_query" in proc.stdout and "--sigint_effect" in proc.stdout


# -- train: resume, finetune, log file ----------------------------------------------------------
def parse_log(lines):
    """A re-implementation of Caffe's parse_log.py row logic (train/test rows)."""
    iteration, lr = -1, float("nan")
    train, test = [], []
    for line in lines:
        m = RE_ITERATION.search(line)
        if m:
            iteration = int(m.group(1))
        if iteration == -1:
            continue
        m = RE_LR.search(line)
        if m:
            lr = float(m.group(1))
        for regex, rows in ((RE_TRAIN_OUTPUT, train), (RE_TEST_OUTPUT, test)):
            m = regex.search(line)
            if m:
                rows.append((iteration, lr, m.group(2), float(m.group(3))))
    return train, test


def test_log_file_parseable(work, capsys):
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt", "--log", "train.log")
    assert code == 0, err
    lines = open("train.log").read().splitlines()
    assert any("Solving TinyNet" in l for l in lines)  # extract_seconds' start marker
    first = next(i for i, l in enumerate(lines) if RE_ITERATION.search(l))
    for line in lines[first:]:  # parse_log reads a timestamp from every later line
        assert RE_GLOG.match(line), line
    train, test = parse_log(lines)
    assert [r[0] for r in train] == [0, 2, 4, 6, 8]
    assert all(r[2] == "loss" for r in train)
    assert [r[0] for r in test if r[2] == "accuracy"] == [0, 5, 10]
    assert train[1][1] == pytest.approx(0.1)
    assert test[-2][2] == "accuracy" and test[-2][3] > 0.7
    # the same lines went to stderr
    assert sum(1 for l in err.splitlines() if RE_TEST_OUTPUT.search(l)) == len(test)


def test_resume_from_snapshot_continues(work, capsys):
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt", "--log", "full.log")
    assert code == 0, err
    full = parse_log(open("full.log").read().splitlines())
    code, _, err = run_main(capsys, "train", "-solver", "solver.prototxt", "-snapshot",
                            "snap/tiny_iter_5.solverstate.h5", "-log", "resumed.log")
    assert code == 0, err
    resumed_lines = open("resumed.log").read().splitlines()
    assert any("Resuming from snap/tiny_iter_5.solverstate.h5" in l for l in resumed_lines)
    resumed = parse_log(resumed_lines)
    # the test scores after iteration 5 are the same as in the uninterrupted run
    assert [r for r in resumed[1] if r[0] == 10] == [r for r in full[1] if r[0] == 10]


def test_finetune_from_weights(work, capsys):
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt")
    assert code == 0, err
    trained = netlib.Net("net.prototxt", netlib.TEST, weights="snap/tiny_iter_10.caffemodel.h5")
    w = trained.params["ip"][0].data.copy()
    write_setup(work, max_iter=1, solver="zero.prototxt")
    text = open("zero.prototxt").read().replace("base_lr: 0.1", "base_lr: 0")
    (work / "zero.prototxt").write_text(text.replace("tiny", "zero"))
    code, _, err = run_main(capsys, "train", "--solver", "zero.prototxt", "--weights",
                            "snap/tiny_iter_10.caffemodel.h5")
    assert code == 0, err
    assert "Finetuning from snap/tiny_iter_10.caffemodel.h5" in err
    after = netlib.Net("net.prototxt", netlib.TEST, weights="snap/zero_iter_1.caffemodel.h5")
    numpy.testing.assert_array_equal(after.params["ip"][0].data, w)


def test_level_and_stage_reach_the_net(work, capsys):
    net = open("net.prototxt").read().replace(
        'layer { name: "accuracy"',
        'layer { name: "staged" type: "Silence" bottom: "ip" include { stage: "extra" min_level: 2 } }\n'
        'layer { name: "accuracy"')
    (work / "staged.prototxt").write_text(net)
    code, _, err = run_main(capsys, "time", "--model", "staged.prototxt", "--iterations", "1",
                            "--level", "2", "--stage", "extra,other")
    assert code == 0, err
    assert re.search(r"\]     staged\tforward: ", err)
    code, _, err = run_main(capsys, "time", "--model", "staged.prototxt", "--iterations", "1", "--level", "1",
                            "--stage", "extra")
    assert code == 0 and "staged\t" not in err
    # train: the flags become the solver's train_state (logged with the solver parameters)
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt", "--level=3", "--stage=a,b")
    assert code == 0, err
    assert re.search(r'train_state \{\s+level: 3\s+stage: "a"\s+stage: "b"\s+\}', err)


# -- test -------------------------------------------------------------------------------------
def test_test_command_output(work, capsys):
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt")
    assert code == 0
    weights = "snap/tiny_iter_10.caffemodel.h5"
    code, _, err = run_main(capsys, "test", "--model=net.prototxt", "--weights=" + weights, "--iterations=4")
    assert code == 0, err
    # Independent reference: the same four test batches through the Python API.
    net = netlib.Net("net.prototxt", netlib.TEST, weights=weights)
    acc, loss = [], []
    for _ in range(4):
        out = net.forward()
        acc.append(float(out["accuracy"]))
        loss.append(float(out["loss"]))
    body = [l.split("] ", 1)[1] for l in err.splitlines() if "] " in l]
    assert "Running for 4 iterations." in body
    for i in range(4):
        got = [l for l in body if l.startswith("Batch %d, accuracy = " % i)]
        assert len(got) == 1 and float(got[0].rsplit("= ", 1)[1]) == pytest.approx(acc[i], abs=1e-6)
    assert float(next(l for l in body if l.startswith("Loss: "))[6:]) == pytest.approx(numpy.mean(loss), rel=1e-5)
    final_acc = next(l for l in body if l.startswith("accuracy = "))
    assert float(final_acc.split("= ")[1]) == pytest.approx(numpy.mean(acc), rel=1e-5)
    final_loss = next(l for l in body if l.startswith("loss = "))
    m = re.match(r"loss = (\S+) \(\* 1 = (\S+) loss\)$", final_loss)
    assert m and float(m.group(1)) == pytest.approx(numpy.mean(loss), rel=1e-5)


# -- time -------------------------------------------------------------------------------------
def test_time_output(work, capsys):
    code, _, err = run_main(capsys, "time", "--model", "net.prototxt", "--iterations", "3")
    assert code == 0, err
    body = [l.split("] ", 1)[1] for l in err.splitlines() if RE_GLOG.match(l)]
    assert "*** Benchmark begins ***" in body and body[-1] == "*** Benchmark ends ***"
    assert any(l.startswith("Initial loss: ") for l in body)
    iters = [l for l in body if l.startswith("Iteration: ")]
    assert len(iters) == 3
    for j, line in enumerate(iters):
        assert re.fullmatch(r"Iteration: %d forward-backward time: [\d.e+-]+ ms\." % (j + 1), line)
    assert "Average time per layer: " in body
    names = netlib.Net("net.prototxt", netlib.TRAIN).layer_names
    for name in names:
        for kind in ("forward", "backward"):
            pattern = re.escape("%10s" % name) + r"\t%s: [\d.e+-]+ ms\." % kind
            assert sum(1 for l in body if re.fullmatch(pattern, l)) == 1, (name, kind)
    for label in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward", "Total Time"):
        assert sum(1 for l in body if re.fullmatch(re.escape(label) + r": [\d.e+-]+ ms\.", l)) == 1


def test_time_test_phase_has_accuracy_layer(work, capsys):
    code, _, err = run_main(capsys, "time", "--model", "net.prototxt", "--iterations", "1", "-phase", "TEST")
    assert code == 0, err
    assert "  accuracy\tforward: " in err
    code, _, err = run_main(capsys, "time", "--model", "net.prototxt", "--iterations", "1")
    assert "  accuracy\tforward: " not in err


# -- signals and progress -------------------------------------------------------------------------
def _start_training(work, extra=(), env_extra=None):
    write_setup(work, max_iter=10 ** 7, solver="long.prototxt")
    text = open(work / "long.prototxt").read().replace("snapshot: 5\n", "snapshot: 0\n")
    (work / "long.prototxt").write_text(text)
    env = dict(os.environ, NETLIB_NO_PROGRESS="1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, SCRIPT, "train", "--solver", "long.prototxt", *extra],
                            cwd=str(work), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def _wait_for(proc, pattern, timeout=60):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    proc.kill()
    raise AssertionError("did not see %r in:\n%s" % (pattern, "".join(seen[-20:])))


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sighup_snapshots_and_sigint_stops(work):
    proc = _start_training(work)
    try:
        _wait_for(proc, r"Iteration \d+, lr = ")
        proc.send_signal(signal.SIGHUP)
        _wait_for(proc, r"Snapshotting solver state")
        # Stop only once training has moved past the snapshot's iteration, or
        # the stop snapshot overwrites it (same file name) on a slow machine.
        _wait_for(proc, r"Iteration \d+, lr = ")
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "Optimization stopped early." in rest
    snaps = sorted(f for f in os.listdir(work / "snap") if f.endswith(".solverstate.h5"))
    assert len(snaps) == 2  # the SIGHUP snapshot and the one written when stopping


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sigint_effect_none_keeps_training(work):
    proc = _start_training(work, extra=["--sigint_effect", "none", "--sighup_effect=stop"])
    try:
        _wait_for(proc, r"Iteration \d+, lr = ")
        proc.send_signal(signal.SIGINT)
        seen = _wait_for(proc, r"Iteration \d+, lr = ")  # still training
        proc.send_signal(signal.SIGHUP)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "Optimization stopped early." in rest and seen


def test_progress_bar_keeps_log_lines_intact(work):
    env = dict(os.environ, NETLIB_PROGRESS="1")
    env.pop("NETLIB_NO_PROGRESS", None)
    proc = subprocess.run([sys.executable, SCRIPT, "train", "--solver", "solver.prototxt"], cwd=str(work),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stderr and ("it/s" in proc.stderr or "s/it" in proc.stderr)
    segments = [s for chunk in proc.stderr.split("\n") for s in chunk.split("\r")]
    lr_lines = [s for s in segments if "lr = " in s]
    assert len(lr_lines) == 5
    for s in lr_lines:
        assert RE_GLOG.match(s) and re.search(r"\] Iteration \d+, lr = 0\.1$", s), repr(s)


def test_no_progress_bar_without_tty(work):
    env = dict(os.environ)
    env.pop("NETLIB_PROGRESS", None)
    env.pop("NETLIB_NO_PROGRESS", None)
    proc = subprocess.run([sys.executable, SCRIPT, "train", "--solver", "solver.prototxt"], cwd=str(work),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "%|" not in proc.stderr
    assert "Optimization Done." in proc.stderr


# -- device_query and data -----------------------------------------------------------------------
def test_device_query(capsys):
    code, _, err = run_main(capsys, "device_query")
    assert code == 0
    assert "NumPy %s" % numpy.__version__ in err
    assert re.search(r"\d+ logical cores", err)


@pytest.mark.skipif(netlib.backend.cupy is not None, reason="CuPy installed")
def test_gpu_flag_without_cupy(work, capsys):
    code, _, err = run_main(capsys, "train", "--solver", "solver.prototxt", "--gpu", "0")
    assert_one_line_error(code, err, "CuPy")


def test_solver_mode_gpu_falls_back_to_cpu(work, capsys):
    if netlib.backend.cupy is not None:
        pytest.skip("CuPy installed")
    text = open("solver.prototxt").read() + "solver_mode: GPU\n"
    (work / "gpu_solver.prototxt").write_text(text.replace("max_iter: 10", "max_iter: 1"))
    code, _, err = run_main(capsys, "train", "--solver", "gpu_solver.prototxt")
    assert code == 0, err
    assert re.search(r"^W\d{4} .*CuPy is not installed; using the CPU", err, re.M)


def _write_idx(path, array, gz):
    codes = {numpy.dtype(numpy.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(">%dI" % array.ndim,
                                                                                      *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def test_data_mnist_from_small_idx_files(tmp_path, capsys):
    rng = numpy.random.default_rng(1)
    src = tmp_path / "raw"
    src.mkdir()
    sets = {"train": 7, "t10k": 3}
    ref = {}
    for prefix, n in sets.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=numpy.uint8)
        labels = rng.integers(0, 10, size=n, dtype=numpy.uint8)
        # gzipped for train, plain (dotted spelling) for test
        if prefix == "train":
            _write_idx(src / "train-images-idx3-ubyte.gz", images, True)
            _write_idx(src / "train-labels-idx1-ubyte.gz", labels, True)
        else:
            _write_idx(src / "t10k-images.idx3-ubyte", images, False)
            _write_idx(src / "t10k-labels.idx1-ubyte", labels, False)
        ref[prefix] = (images, labels)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "data", "mnist", "--from", str(src), "--out", str(out), "--backend", "hdf5")
    assert code == 0, err
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = ref[prefix]
        with h5py.File(out / ("mnist_%s.h5" % split), "r") as f:
            data, label = f["data"][()], f["label"][()]
        assert data.shape == (len(labels), 1, 28, 28) and data.dtype == numpy.float32
        assert label.dtype == numpy.float32
        numpy.testing.assert_array_equal(label, labels)
        for i in range(len(labels)):  # pixel * 1/256, element by element
            for r in (0, 13, 27):
                for c in (0, 5, 27):
                    assert data[i, 0, r, c] == numpy.float32(int(images[i, r, c]) / 256.0)
        assert (out / ("mnist_%s_h5.txt" % split)).read_text() == "mnist_%s.h5\n" % split


def test_read_idx_rejects_bad_files(tmp_path):
    good = tmp_path / "x-idx1-ubyte"
    _write_idx(good, numpy.arange(10, dtype=numpy.uint8), False)
    numpy.testing.assert_array_equal(mnist.read_idx(str(good)), numpy.arange(10))
    data = good.read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(netlib.NetlibError, match="truncated"):
        mnist.read_idx(str(tmp_path / "short"))
    (tmp_path / "magic").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(netlib.NetlibError, match="magic"):
        mnist.read_idx(str(tmp_path / "magic"))
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(data)
    raw = (tmp_path / "cut.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(netlib.NetlibError):
        mnist.read_idx(str(tmp_path / "cut.gz"))


def test_read_idx_corrupt_gzip_and_huge_header(tmp_path, capsys):
    raw = bytearray(gzip.compress(b"\0\0\x08\x01\0\0\0\xc8" + bytes(range(200)), mtime=0))
    raw[10] ^= 0xFF                       # the deflate block type: zlib.error, not an OSError
    (tmp_path / "bad.gz").write_bytes(bytes(raw))
    with pytest.raises(netlib.NetlibError, match="bad.gz"):
        mnist.read_idx(str(tmp_path / "bad.gz"))
    # a 12-byte file whose header declares 2^32 - 1 values: refused before anything is read
    (tmp_path / "huge").write_bytes(b"\0\0\x08\x01\xff\xff\xff\xff" + b"\0" * 4)
    with pytest.raises(netlib.NetlibError, match="more than the limit"):
        mnist.read_idx(str(tmp_path / "huge"))
    # a header that declares 2^30 values (under the limit) in a 20-byte file, plain and gzipped:
    # refused without allocating them (found by the 10,000-case fuzz run: it allocated 1 GiB first)
    import tracemalloc
    small = b"\0\0\x08\x01\x40\0\0\0" + bytes(12)
    (tmp_path / "claims").write_bytes(small)
    (tmp_path / "claims.gz").write_bytes(gzip.compress(small))
    for name in ("claims", "claims.gz"):
        tracemalloc.start()
        try:
            with pytest.raises(netlib.NetlibError, match="truncated"):
                mnist.read_idx(str(tmp_path / name))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 50 << 20, (name, peak)
    # through the CLI: one line, exit code 1
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in mnist.FILES.values():
        (folder / (name + ".gz")).write_bytes(bytes(raw))
    code, _, err = run_main(capsys, "data", "mnist", "--from", str(folder), "--out", str(tmp_path / "out"))
    assert code == 1 and "corrupt gzip" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_data_digits_command(tmp_path, capsys):
    code, _, err = run_main(capsys, "data", "digits", "--out", str(tmp_path))
    assert code == 0, err
    with h5py.File(tmp_path / "digits_train.h5", "r") as f:
        tr_x, tr_y = f["data"][()], f["label"][()]
    with h5py.File(tmp_path / "digits_test.h5", "r") as f:
        te_x, te_y = f["data"][()], f["label"][()]
    assert tr_x.shape == (1437, 1, 8, 8) and te_x.shape == (360, 1, 8, 8)
    # Independent reader of the shipped CSV: every image appears exactly once.
    with gzip.open(os.path.join(ROOT, "netlib", "data", "digits.csv.gz"), "rt") as f:
        rows = [tuple(int(v) for v in line.split(",")) for line in f if line.strip()]
    assert len(rows) == 1797
    got = sorted(tuple(int(round(v * 16)) for v in x.ravel()) + (int(y),)
                 for x, y in zip(numpy.concatenate([tr_x, te_x]), numpy.concatenate([tr_y, te_y])))
    assert got == sorted(rows)


def test_nan_loss_stops_with_the_first_bad_layer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nan_net.prototxt").write_text("""
    layer { name: "x" type: "DummyData" top: "x" top: "y"
            dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 3 }
                               data_filler { type: "gaussian" } data_filler { type: "constant" } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
            inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
    layer { name: "root" type: "Power" bottom: "ip" top: "root" power_param { power: 0.5 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "root" bottom: "y" top: "loss" }
    """)
    (tmp_path / "nan_solver.prototxt").write_text(
        'net: "nan_net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 10 display: 1 '
        'snapshot_after_train: false random_seed: 3 solver_mode: CPU')
    code, _, err = run_main(capsys, "train", "--solver", "nan_solver.prototxt")
    line = assert_one_line_error(code, err, "root", "Power")
    assert "iteration 0" in line.lower() or "Iteration 0" in line
