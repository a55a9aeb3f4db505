"""GPU readiness without a GPU: tests/fakecupy.py (a CPU stand-in for CuPy
that refuses implicit conversion to NumPy) and netlib running on it.

* the stand-in itself: it must refuse what CuPy refuses, or every other
  check here could pass silently on NumPy;
* the backend's device-module hooks (register, mode, to_numpy, Blob.to);
* every real-Caffe golden case of tests/test_golden.py, and a gradient-check
  grid over the layer families, with nets and layers built on the stand-in;
* the ``NETLIB_TEST_XP=fakecupy`` switch of tests/xp_mode.py, on a small slice.

The whole layer suite runs on the stand-in with
``NETLIB_TEST_XP=fakecupy python -m pytest tests/test_layers_*.py ...``
(see tests/xp_mode.py).
"""
import os
import subprocess
import sys

import numpy
import pytest

import fakecupy
import netlib
from netlib import backend
from netlib.blob import Blob
from netlib import testing
from netlib.testing import check_gradient
from test_golden import CASES, _check_case

HERE = os.path.dirname(os.path.abspath(__file__))




# --------------------------------------------------------------------------
# the stand-in refuses what CuPy refuses
# --------------------------------------------------------------------------
def _x():
    return fakecupy.asarray(numpy.arange(6, dtype=numpy.float32).reshape(2, 3))


@pytest.mark.parametrize("how", [
    lambda x: numpy.asarray(x),
    lambda x: numpy.array(x),
    lambda x: numpy.asarray(x, dtype=numpy.float64),
    lambda x: numpy.exp(x),                     # a NumPy ufunc on device data
    lambda x: numpy.add(x, 1.0),
    lambda x: numpy.sum(x),                     # a NumPy function (NEP 18)
    lambda x: numpy.concatenate([x, x]),
    lambda x: numpy.testing.assert_allclose(x, 0),
    lambda x: numpy.zeros((2, 3), numpy.float32).__setitem__(Ellipsis, x),
    lambda x: numpy.float32(x[0, 0]),
    lambda x: numpy.ones(3) + x,
], ids=["asarray", "array", "asarray_dtype", "ufunc", "ufunc_scalar", "function", "concatenate",
        "testing", "host_setitem", "numpy_scalar", "host_operand_left"])
def test_implicit_conversion_to_numpy_is_refused(how):
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        how(_x())


@pytest.mark.parametrize("how", [
    lambda x: x + numpy.ones(3, numpy.float32),
    lambda x: x.__iadd__(numpy.ones(3, numpy.float32)),
    lambda x: fakecupy.exp(numpy.ones(3)),
    lambda x: fakecupy.maximum(x, numpy.zeros(3)),
    lambda x: fakecupy.concatenate([x, numpy.ones((2, 3))]),
    lambda x: fakecupy.matmul(x, numpy.ones((3, 2))),
    lambda x: fakecupy.where(x > 1, x, numpy.zeros((2, 3))),
    lambda x: fakecupy.zeros_like(numpy.ones(3)),
    lambda x: x.dot(numpy.ones(3)),
    lambda x: fakecupy.sum(numpy.ones(3)),
], ids=["operator", "inplace", "ufunc", "ufunc2", "concatenate", "matmul", "where", "like", "dot", "sum"])
def test_numpy_operands_are_refused_as_in_cupy(how):
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        how(_x())


def test_what_cupy_allows_works_and_stays_on_the_device():
    host_array = numpy.arange(6, dtype=numpy.float32).reshape(2, 3)
    x = fakecupy.asarray(host_array)
    host_array[0, 0] = 99                               # asarray copied (host to device)
    assert float(x[0, 0]) == 0.0
    assert isinstance(x[0, 1], fakecupy.ndarray) and x[0, 1].shape == ()   # 0-d, not a NumPy scalar
    s = x.sum()
    assert isinstance(s, fakecupy.ndarray) and float(s) == 15.0 and int(x.argmax()) == 5
    assert bool((x >= 0).all()) and len(x) == 2 and [float(r.sum()) for r in x] == [3.0, 12.0]
    x[...] = numpy.ones((2, 3), numpy.float32)          # explicit host-to-device copy: allowed
    x[numpy.array([0])] = 2.0                           # NumPy index arrays: copied to the device
    y = numpy.float32(2) * x + 1                        # NumPy and Python scalars are fine
    assert isinstance(y, fakecupy.ndarray) and y.dtype == numpy.float32
    got = y.get()
    assert type(got) is numpy.ndarray and got.tolist() == [[5, 5, 5], [3, 3, 3]]
    assert fakecupy.asnumpy(y).tolist() == got.tolist()
    v = x.reshape(-1)[2:]
    assert v.base is x and x.base is None                # CuPy's rule: base is the owner
    assert fakecupy.get_array_module(x) is fakecupy and fakecupy.get_array_module(host_array) is numpy


def test_missing_functions_fail_loudly():
    for name in ("frombuffer", "fromfile", "savez"):
        with pytest.raises(AttributeError):
            getattr(fakecupy, name)
    with pytest.raises(AttributeError):
        _x().data                                          # a device pointer object in CuPy: not here


# --------------------------------------------------------------------------
# the backend's device modules
# --------------------------------------------------------------------------
def test_backend_device_module_hooks(on_fake):
    assert fakecupy in backend.device_modules() and backend.default_xp() is fakecupy
    x = fakecupy.ones((2, 2), numpy.float32)
    assert backend.get_array_module(x) is fakecupy and backend.get_array_module(numpy.ones(2)) is numpy
    assert backend.is_device_array(x) and not backend.is_device_array(numpy.ones(2))
    assert type(backend.to_numpy(x)) is numpy.ndarray
    with pytest.raises(ValueError):
        backend.register_device_module(numpy)
    b = Blob((2, 3))
    assert b.xp is fakecupy and isinstance(b.data, fakecupy.ndarray) and isinstance(b.diff, fakecupy.ndarray)
    b.data[...] = numpy.arange(6).reshape(2, 3)
    proto = b.to_proto(write_diff=True)                 # reads the device data explicitly
    c = Blob((), xp=fakecupy).from_proto(proto)
    assert backend.to_numpy(c.data).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert b.asum_data() == 15.0 and b.sumsq_data() == 55.0
    b.to(numpy)
    assert type(b.data) is numpy.ndarray and b.data.tolist() == [[0, 1, 2], [3, 4, 5]]
    b.to(fakecupy)
    assert isinstance(b.data, fakecupy.ndarray) and backend.to_numpy(b.data).sum() == 15
    with pytest.raises(netlib.ShapeError):
        b.set_data(numpy.zeros(6, numpy.float32))       # host memory is not this blob's module


# --------------------------------------------------------------------------
# every golden case and a gradient-check grid, on the stand-in
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES or ["<no golden cases>"])
def test_golden_case_on_the_device_module(case, tmp_path, monkeypatch, on_fake):
    _check_case(case, tmp_path, monkeypatch)


def test_nets_are_built_on_the_device_module(on_fake):
    net = netlib.Net('name: "n" layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } } '
                     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                     'inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }', netlib.TEST)
    assert net.xp is fakecupy
    assert all(isinstance(b.data, fakecupy.ndarray) for b in net.blobs.values())
    assert isinstance(net.params["ip"][0].data, fakecupy.ndarray)
    net.blobs["x"].data[...] = numpy.ones((2, 3), numpy.float32)
    y = net.forward()["y"]
    assert isinstance(y, fakecupy.ndarray)
    w = backend.to_numpy(net.params["ip"][0].data)
    numpy.testing.assert_allclose(backend.to_numpy(y), numpy.ones((2, 3)) @ w.T, rtol=1e-6)


LABELS = numpy.array([0.0, 2.0, 1.0])
GRADIENT_GRID = [
    ('type: "InnerProduct" inner_product_param { num_output: 3 weight_filler { type: "gaussian" } '
     'bias_filler { type: "gaussian" } }', dict(bottom_shapes=[(2, 2, 2)])),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 pad: 1 stride: 2 group: 2 '
     'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', dict(bottom_shapes=[(2, 2, 4, 4)])),
    ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 pad: 1 group: 2 '
     'weight_filler { type: "gaussian" } }', dict(bottom_shapes=[(1, 2, 4, 4)])),        # depthwise
    ('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 stride: 2 '
     'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }', dict(bottom_shapes=[(1, 2, 3, 3)])),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', dict(bottom_shapes=[(1, 2, 5, 5)])),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
     dict(bottom_shapes=[(1, 2, 5, 5)])),
    ('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', dict(bottom_shapes=[(2, 2, 3, 3)])),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', dict(bottom_shapes=[(2, 3, 4)], kink=0.0, kink_range=0.01)),
    ('type: "PReLU"', dict(bottom_shapes=[(2, 3, 4)], kink=0.0, kink_range=0.01)),
    ('type: "Sigmoid"', dict(bottom_shapes=[(2, 3, 4)])),
    ('type: "TanH"', dict(bottom_shapes=[(2, 3, 4)])),
    ('type: "ELU" elu_param { alpha: 0.5 }', dict(bottom_shapes=[(2, 3, 4)])),
    ('type: "Swish"', dict(bottom_shapes=[(2, 3, 4)])),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', dict(bottom_shapes=[(2, 3, 4)])),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', dict(bottom_shapes=[(2, 3, 4)])),
    ('type: "Softmax"', dict(bottom_shapes=[(2, 4, 3)])),
    ('type: "SoftmaxWithLoss"', dict(bottoms=[numpy.linspace(-1, 1, 9).reshape(3, 3), LABELS], check_bottoms=[0])),
    ('type: "SigmoidCrossEntropyLoss"',
     dict(bottoms=[numpy.linspace(-1, 1, 6).reshape(2, 3), numpy.array([[0, 1, 1], [1, 0, 0]], float)],
          check_bottoms=[0])),
    ('type: "EuclideanLoss"', dict(bottom_shapes=[(3, 4), (3, 4)])),
    ('type: "BatchNorm"', dict(bottom_shapes=[(3, 2, 2, 2)], phase="TRAIN", check_params=False)),
    ('type: "Scale" scale_param { bias_term: true bias_filler { type: "gaussian" } }',
     dict(bottom_shapes=[(2, 3, 2)])),
    ('type: "Bias"', dict(bottom_shapes=[(2, 3, 2), (3, 2)])),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }', dict(bottom_shapes=[(1, 4, 2, 2)])),
    ('type: "LRN" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }', dict(bottom_shapes=[(1, 2, 3, 3)])),
    ('type: "MVN"', dict(bottom_shapes=[(2, 2, 2, 3)])),
    ('type: "Concat" concat_param { axis: 1 }', dict(bottom_shapes=[(2, 1, 2), (2, 3, 2)])),
    ('type: "Slice" slice_param { axis: 1 slice_point: 1 }', dict(bottom_shapes=[(2, 3, 2)], num_tops=2)),
    ('type: "Eltwise" eltwise_param { operation: PROD }', dict(bottom_shapes=[(2, 3, 2)] * 2)),
    ('type: "Eltwise" eltwise_param { operation: MAX }', dict(bottom_shapes=[(2, 3, 2)] * 2)),
    ('type: "Tile" tile_param { axis: 1 tiles: 2 }', dict(bottom_shapes=[(2, 2, 2)])),
    ('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 }', dict(bottom_shapes=[(2, 3, 2)])),
    ('type: "Embed" embed_param { num_output: 2 input_dim: 3 weight_filler { type: "gaussian" } '
     'bias_filler { type: "gaussian" } }', dict(bottoms=[numpy.array([2.0, 0.0, 2.0])], check_bottoms=[])),
    ('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', dict(bottom_shapes=[(1, 2, 2, 3)])),
    ('type: "Normalize" norm_param { across_spatial: false scale_filler { type: "uniform" min: 0.5 max: 2 } }',
     dict(bottom_shapes=[(1, 3, 2, 2)])),
    ('type: "LSTMUnit" top: "c" top: "h"',
     dict(bottoms=[numpy.linspace(-1, 1, 4).reshape(1, 2, 2), numpy.linspace(-2, 2, 16).reshape(1, 2, 8),
                   numpy.array([[1.0, 0.0]])], check_bottoms=[0, 1])),
    ('type: "RNN" bottom: "x" bottom: "cont" top: "y" recurrent_param { num_output: 2 '
     'weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 } }',
     dict(bottoms=[numpy.linspace(-1, 1, 12).reshape(3, 2, 2), numpy.array([[0.0, 0.0], [1, 1], [1, 0]])],
          check_bottoms=[0], step=1e-4, threshold=1e-6)),
]


@pytest.mark.parametrize("text,kwargs", GRADIENT_GRID, ids=[t.split('"')[1] + "_%d" % i
                                                            for i, (t, _) in enumerate(GRADIENT_GRID)])
def test_gradient_check_on_the_device_module(text, kwargs, on_fake, monkeypatch):
    made = []
    real_blob = testing.Blob
    monkeypatch.setattr(testing, "Blob", lambda *a, **k: made.append(real_blob(*a, **k)) or made[-1])
    result = check_gradient(text, **kwargs)
    assert made and all(b.xp is fakecupy for b in made)
    assert result.ok and result.checked > 0


# --------------------------------------------------------------------------
# the NETLIB_TEST_XP switch
# --------------------------------------------------------------------------
def test_the_suite_switch_runs_layer_tests_on_the_stand_in():
    env = dict(os.environ, NETLIB_TEST_XP="fakecupy")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
                           os.path.join(HERE, "test_golden.py"), "-k", "ReLU or BatchNorm"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "netlib test array module: fakecupy" in proc.stdout
    assert " passed" in proc.stdout and " failed" not in proc.stdout
