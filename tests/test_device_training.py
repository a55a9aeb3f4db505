"""Training on a device array module (tests/fakecupy.py, the CPU stand-in for
CuPy): the solvers' update rules run on device data, and checkpoints written
from the device load on the CPU and back.

Every solver type trains 6 iterations on the stand-in and on NumPy from the
same seed: the weights agree (relative 1e-5).  (No Dropout: a device draws
its own random numbers, as Caffe's GPU draws from cuRAND.)  Device snapshots (both
formats) load into a CPU net with exactly the device weights, and a CPU
solver state resumed on the device continues as it does on the CPU.
"""
import os

import h5py
import numpy as np
import pytest

import fakecupy
import netlib
from netlib import backend

NET = """name: "dev"
layer { name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "train.txt" batch_size: 8 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

RULES = {"SGD": "momentum: 0.9\nweight_decay: 0.01\n", "Nesterov": "momentum: 0.9\n", "AdaGrad": "",
         "RMSProp": "rms_decay: 0.9\n", "AdaDelta": "momentum: 0.9\nbase_lr: 1\n",
         "Adam": "momentum: 0.9\nmomentum2: 0.999\n"}


@pytest.fixture
def work(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f["data"] = rng.normal(size=(32, 2, 6, 6)).astype(np.float32)
        f["label"] = rng.integers(0, 3, size=32).astype(np.float32)
    (tmp_path / "train.txt").write_text("train.h5\n")
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "snap").mkdir()
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    backend.set_mode_cpu()


def solver_text(kind, fmt="HDF5"):
    rule = RULES[kind]
    return ('net: "net.prototxt"\ntype: "%s"\n%slr_policy: "fixed"\ndisplay: 0\nmax_iter: 100\n'
            'snapshot_prefix: "snap/%s"\nsnapshot_format: %s\nrandom_seed: 3\nclip_gradients: 5\n'
            % (kind, rule if "base_lr" in rule else "base_lr: 0.01\n" + rule, kind, fmt))


def weights(net):
    return {name: [backend.to_numpy(b.data).copy() for b in blobs] for name, blobs in net.params.items()}


def train(kind, xp, steps, fmt="HDF5", restore=None):
    if xp is np:
        backend.set_mode_cpu()
    else:
        backend.set_mode_device(xp)
    solver = netlib.get_solver(solver_text(kind, fmt))
    if restore:
        solver.restore(restore)
    solver.step(steps)
    return solver


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    # (the convolution has no bias: before BatchNorm its gradient is rounding noise, which AdaGrad,
    # RMSProp and Adam would scale up to full-size steps of either sign)
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", sorted(RULES))
def test_solver_on_the_device_matches_the_cpu(work, kind):
    cpu = train(kind, np, 6)
    dev = train(kind, fakecupy, 6)
    assert isinstance(dev.net.params["ip"][0].data, fakecupy.ndarray)        # it really ran on the device
    assert isinstance(dev.history[0].data, fakecupy.ndarray)
    assert_same(weights(cpu.net), weights(dev.net))


@pytest.mark.parametrize("fmt", ["HDF5", "BINARYPROTO"])
def test_device_snapshots_load_on_the_cpu_and_back(work, fmt):
    dev = train("Adam", fakecupy, 4, fmt)
    model, state = dev.snapshot()
    expected = weights(dev.net)
    backend.set_mode_cpu()
    cpu_net = netlib.Net("net.prototxt", netlib.TEST)
    cpu_net.copy_from(model)
    for name in expected:                                    # exactly the device's weights
        for x, y in zip(expected[name], weights(cpu_net)[name]):
            np.testing.assert_array_equal(x, y)
    # a device snapshot resumed on the CPU, and a CPU one on the device, continue alike
    on_cpu = train("Adam", np, 3, fmt, restore=state)
    cpu_model, cpu_state = on_cpu.snapshot()
    back = train("Adam", fakecupy, 3, fmt, restore=state)
    assert back.iter == on_cpu.iter == 7
    assert_same(weights(on_cpu.net), weights(back.net))
    again = train("Adam", fakecupy, 2, fmt, restore=cpu_state)
    again_cpu = train("Adam", np, 2, fmt, restore=cpu_state)
    assert_same(weights(again_cpu.net), weights(again.net))
    assert os.path.exists(model) and os.path.exists(cpu_model)
