"""netlib.coord_map (pycaffe's caffe.coord_map) against real pycaffe and hand-derived maps.

tests/golden/netspec/coord_map_cases.py holds the scripts (the nets of pycaffe's
own python/caffe/test/test_coord_map.py, with fixed numbers for its random ones,
plus a miniature FCN); tools/make_netspec_goldens.py ran them under real
pycaffe into coord_map.json.  The hand-derived tests restate pycaffe's
test_coord_map.py checks with the numbers worked out from the layer formulas.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
from google.protobuf import text_format

import netlib as caffe
from netlib import coord_map as cm
from netlib.coord_map import (AxisMismatchException, UndefinedMapException, compose, coord_map,
                              coord_map_from_to, crop, inverse)
from netlib.net_spec import Top

from netlib import layers as L, params as P
from netlib.proto import caffe_pb2

from test_net_spec import field_number_order

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "netspec")
_spec = importlib.util.spec_from_file_location("coord_map_cases",
                                               os.path.join(GOLDEN, "coord_map_cases.py"))
CASES = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CASES)
with open(os.path.join(GOLDEN, "coord_map.json")) as _f:
    GOLDEN_MAPS = json.load(_f)


def net(**kwargs):
    return CASES.coord_net_spec(caffe, L, P, **kwargs)


def deconv_to_data(**kwargs):
    n = net(**kwargs)
    return n.deconv, n.data


# ------------------------------------------------------------------ goldens from real pycaffe
def test_every_case_has_a_golden():
    assert sorted(GOLDEN_MAPS) == CASES.CASES


@pytest.mark.parametrize("name", CASES.CASES)
def test_matches_real_pycaffe(name):
    got = {k: CASES.encode(v) for k, v in getattr(CASES, "case_" + name)(caffe, L, P, cm).items()}
    expected = GOLDEN_MAPS[name]
    assert sorted(got) == sorted(expected)
    for label, value in got.items():
        want = expected[label]
        if isinstance(want, dict) and "prototxt" in want:
            assert value["prototxt"] == field_number_order(want["prototxt"]), label
            assert text_format.Parse(value["prototxt"], caffe_pb2.NetParameter()) == \
                text_format.Parse(want["prototxt"], caffe_pb2.NetParameter())
        else:
            assert value == want, label  # exact: same float64 arithmetic as pycaffe


# ------------------------------------------------------------------ hand-derived maps
def test_conv_pool_deconv():
    # conv k3 (a 1, b -1), pool 2 (1/2, -1/4), deconv k4 s2 (2, 3/2): identity overall
    n = net()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a, b) == (1, 1, 0)
    # pool 4 (1/4, -3/8), deconv k8 s4 (4, 7/2): shift by one
    n = net(pool=4, dstride=4)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a, b) == (1, 1, -1)
    assert coord_map_from_to(n.data, n.deconv) == (1, 1, 1)
    ax, a, b = coord_map_from_to(n.pool, n.data)
    assert ax == 1 and a == 4 and b == 2.5        # inverse of (1/4, -3/8 + 1/4 * -1)


def test_single_layer_maps():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 9, 9]))
    conv = L.Convolution(n.data, kernel_size=5, stride=2, pad=1, dilation=2)
    ax, a, b = coord_map(conv.fn)   # effective kernel (5 - 1) * 2 + 1 = 9
    assert ax == 1 and a == 0.5 and b == (1 - 4) / 2
    ax, a, b = coord_map(L.Deconvolution(n.data, kernel_size=4, stride=2, pad=1).fn)
    assert ax == 1 and a == 2 and b == 1.5 - 1
    ax, a, b = coord_map(L.Crop(n.data, n.data, axis=3, offset=[2]).fn)
    assert ax == 2 and a == 1 and list(b) == [-2]
    assert coord_map(L.Crop(n.data, n.data).fn)[0] == 1     # default crop axis 2
    for kind in cm.PASS_THROUGH_LAYERS:
        assert coord_map(getattr(L, kind)(n.data).fn) == (None, 1, 0)
    with pytest.raises(UndefinedMapException):
        coord_map(L.InnerProduct(n.data, num_output=2).fn)


def test_pass_through_layers_keep_the_map():
    n = net()
    expected = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in [n.relu, n.conv1x1]:
        assert coord_map_from_to(top, n.data) == expected


@pytest.mark.parametrize("pad", [1, 4, 10])
def test_padding(pad):
    ax, a, b = coord_map_from_to(*deconv_to_data())
    _, a_pad, b_pad = coord_map_from_to(*deconv_to_data(pad=pad))
    assert a == a_pad and b - pad == b_pad      # conv padding shifts one way
    _, a_pad, b_pad = coord_map_from_to(*deconv_to_data(dpad=pad))
    assert a == a_pad and b + pad == b_pad      # deconv padding the other
    _, a_pad, b_pad = coord_map_from_to(*deconv_to_data(pad=pad, dpad=pad))
    assert a == a_pad and b == b_pad


def test_multi_bottom_conv_maps_each_alike():
    n = net()
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=10,
                                            kernel_size=5, stride=2, pad=0)
    m1 = coord_map_from_to(n.conv_data, n.data)
    m2 = coord_map_from_to(n.conv_aux, n.aux)
    assert m1 == m2 == (1, 2, 2)     # inverse of (1/2, (0 - 2) / 2)


def test_rect_is_its_isotropic_parts():
    n3, n5 = net(ks=3, stride=1, pad=0), net(ks=5, stride=2, pad=10)
    n35 = net(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax3, a3, b3 = coord_map_from_to(n3.deconv, n3.data)
    ax5, a5, b5 = coord_map_from_to(n5.deconv, n5.data)
    ax35, a35, b35 = coord_map_from_to(n35.deconv, n35.data)
    assert ax3 == ax5 == ax35 == 1
    assert (a35[0], b35[0]) == (a3, b3) and (a35[1], b35[1]) == (a5, b5)
    assert list(a35) == [1, 2] and list(b35) == [0, -10]


def test_nd_conv():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1],
                           pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and len(a) == len(b) == 3 and np.all(a == 1)
    assert list(b) == [0, -1, -2]


@pytest.mark.parametrize("offset", [0, 3, 8])
def test_crop_of_crop(offset):
    n = net()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    ax_c, a_c, b_c = coord_map_from_to(n.crop, n.data)
    assert ax_c == ax and a_c == a and b_c == b + offset


def test_crop_helper_makes_a_crop_layer():
    n = net(pool=4, dstride=4)                 # deconv is shifted by -1 from data
    n.crop = crop(n.deconv, n.data)
    assert isinstance(n.crop, Top) and n.crop.fn.type_name == "Crop"
    assert n.crop.fn.inputs == (n.deconv, n.data)
    params = n.crop.fn.params["crop_param"]
    assert params["axis"] == 2 and [int(o) for o in params["offset"]] == [1]


def test_catches():
    n = net()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError):          # no spatial path between them
        coord_map_from_to(n.ip, n.data)
    with pytest.raises(AssertionError):        # pool 3x but deconv 2x: scale 3/2
        crop(*deconv_to_data(pool=3, dstride=2))
    with pytest.raises(AssertionError):        # output smaller than the input: positive shift
        crop(*deconv_to_data(dpad=10))
    with pytest.raises(AssertionError):        # even conv kernel: half-pixel shift
        crop(*deconv_to_data(ks=4))
    with pytest.raises(AxisMismatchException):
        compose((1, 1, 0), (2, 1, 0))


def test_compose_and_inverse():
    a, b = np.array([2.0, 4.0]), np.array([1.0, -2.0])
    ax, sa, sb = compose((1, a, b), (None, 0.5, 3.0))
    assert ax == 1 and list(sa) == [1, 2] and list(sb) == [2 * 3 + 1, 4 * 3 - 2]
    ax, ia, ib = inverse((1, a, b))
    assert list(ia) == [0.5, 0.25] and list(ib) == [-0.5, 0.5]
    # composing with its inverse is the identity
    _, ca, cb = compose((1, a, b), inverse((1, a, b)))
    assert list(ca) == [1, 1] and list(cb) == [0, 0]


# ------------------------------------------------------------------ the FCN net runs
def test_fcn_crops_build_and_run(tmp_path):
    n = CASES._fcn(caffe, L, P, cm)
    path = tmp_path / "fcn.prototxt"
    path.write_text(str(n.to_proto()))
    caffe.set_random_seed(11)
    fcn = caffe.Net(str(path), caffe.TEST)
    rng = np.random.RandomState(0)
    out = fcn.forward(data=rng.randn(1, 3, 64, 48).astype(np.float32),
                      label=rng.randint(0, 5, size=(1, 1, 64, 48)).astype(np.float32))
    assert np.isfinite(out["loss"])
    # offsets from coord_map: score_pool2 (66x62) -> upscore2 (56x52) at 5; upscore4 -> data at 81
    assert fcn.blobs["score_pool2"].data.shape[2:] == (66, 62)
    assert fcn.blobs["upscore2"].data.shape[2:] == (56, 52)
    np.testing.assert_array_equal(fcn.blobs["score_pool2c"].data,
                                  fcn.blobs["score_pool2"].data[:, :, 5:61, 5:57])
    assert fcn.blobs["upscore4"].data.shape[2:] == (228, 212)
    np.testing.assert_array_equal(fcn.blobs["score"].data,
                                  fcn.blobs["upscore4"].data[:, :, 81:145, 81:129])
