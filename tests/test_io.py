"""netlib.io (pycaffe's caffe.io) against real pycaffe.

The goldens in tests/golden/pycaffe_io/ were written by real BVLC pycaffe
(tools/make_io_goldens.py: scikit-image 0.26, NumPy 1.26); the small PNGs
there are the load_image inputs.  The BlobProto / Datum tests mirror
pycaffe's own python/caffe/test/test_io.py.
"""
import glob
import os

import numpy as np
import pytest

import netlib as caffe
from netlib.proto import caffe_pb2

from conftest import shared_path

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "pycaffe_io")
G = np.load(os.path.join(GOLDEN, "io.npz"))
PNGS = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(GOLDEN, "*.png")))


def assert_same(got, key, atol=0.0):
    exp = G[key]
    assert got.shape == exp.shape, key
    np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=0, atol=atol, err_msg=key)


# -- BlobProto (pycaffe test_io.py: TestBlobProtoToArray) -------------------------------
def test_blobproto_old_format():
    blob = caffe_pb2.BlobProto()
    blob.data.extend(list(np.zeros((10, 10)).flatten()))
    blob.num, blob.channels, blob.height, blob.width = (1, 1, 10, 10)
    assert caffe.io.blobproto_to_array(blob).shape == (1, 1, 10, 10)


def test_blobproto_new_format():
    blob = caffe_pb2.BlobProto()
    blob.data.extend(list(np.zeros((10, 10)).flatten()))
    blob.shape.dim.extend([10, 10])
    assert caffe.io.blobproto_to_array(blob).shape == (10, 10)


def test_blobproto_no_shape():
    blob = caffe_pb2.BlobProto()
    blob.data.extend(list(np.zeros((10, 10)).flatten()))
    with pytest.raises(ValueError):
        caffe.io.blobproto_to_array(blob)


def test_blobproto_scalar():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([123.0])
    arr = caffe.io.blobproto_to_array(blob)
    assert arr.shape == () and arr == 123


def test_blobproto_legacy_data_and_diff():
    blob = caffe_pb2.BlobProto(num=1, channels=2, height=2, width=3)
    blob.data.extend(np.arange(12.0))
    blob.diff.extend(np.arange(12.0) * -1)
    assert_same(caffe.io.blobproto_to_array(blob), "bp_legacy")
    assert_same(caffe.io.blobproto_to_array(blob, return_diff=True), "bp_legacy_diff")
    assert caffe.io.blobproto_to_array(blob).dtype == np.float64


def test_array_to_blobproto_bytes():
    arr, diff = G["bp_arr"], G["bp_diff"]
    assert caffe.io.array_to_blobproto(arr).SerializeToString() == G["bp_bytes"].tobytes()
    assert caffe.io.array_to_blobproto(arr, diff).SerializeToString() == G["bp_diff_bytes"].tobytes()


def test_blobprotovector_round_trip():
    arrays = [G["bp_arr"], G["bp_diff"][0], np.arange(5.0)]
    vec = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert vec == G["bpv_bytes"].tobytes()
    back = caffe.io.blobprotovector_str_to_arraylist(vec)
    assert len(back) == 3
    for i, arr in enumerate(back):
        assert_same(arr, "bpv_back_%d" % i)
        assert arr.dtype == np.float64


# -- Datum (pycaffe test_io.py: TestArrayToDatum) -----------------------------------------
def test_array_to_datum_label_none_size():
    d1 = caffe.io.array_to_datum(np.ones((10, 10, 3)), label=1)
    d2 = caffe.io.array_to_datum(np.ones((10, 10, 3)))
    assert len(d1.SerializeToString()) > len(d2.SerializeToString())
    assert d2.SerializeToString() == G["dt_f_nolabel_bytes"].tobytes()


def test_array_to_datum_bytes_and_back():
    u8 = G["dt_u8"]
    d = caffe.io.array_to_datum(u8, label=7)
    assert d.SerializeToString() == G["dt_u8_bytes"].tobytes()
    back = caffe.io.datum_to_array(d)
    assert back.dtype == np.uint8 and np.array_equal(back, u8)
    back[0, 0, 0] = 1  # writable, as pycaffe's np.fromstring copy
    df = caffe.io.array_to_datum(G["bp_arr"][:1] * 3, label=-2)
    assert df.SerializeToString() == G["dt_f_bytes"].tobytes()
    arr = caffe.io.datum_to_array(df)
    assert arr.dtype == np.float64
    assert_same(arr, "dt_f_back")


def test_array_to_datum_rank():
    with pytest.raises(ValueError, match="Incorrect array shape."):
        caffe.io.array_to_datum(np.zeros((3, 4)))


# -- load_image -------------------------------------------------------------------------
@pytest.mark.parametrize("color", [True, False], ids=["color", "gray"])
@pytest.mark.parametrize("name", PNGS)
def test_load_image_png(name, color):
    key = "load_%s_%s" % (name, "color" if color else "gray")
    path = os.path.join(GOLDEN, name + ".png")
    if key + "_error" in G.files:  # pycaffe fails on this one (gray+alpha as gray)
        with pytest.raises(ValueError):
            caffe.io.load_image(path, color=color)
        return
    im = caffe.io.load_image(path, color=color)
    assert im.dtype == np.float32
    assert_same(im, key)


def test_load_image_png_shapes():
    # hand-checked facts behind the goldens: alpha dropped, gray tiled or kept
    rgba = caffe.io.load_image(os.path.join(GOLDEN, "rgba.png"))
    rgb = caffe.io.load_image(os.path.join(GOLDEN, "rgb.png"))
    assert rgba.shape == (11, 13, 3) and np.array_equal(rgba, rgb)
    gray = caffe.io.load_image(os.path.join(GOLDEN, "gray.png"), color=False)
    tiled = caffe.io.load_image(os.path.join(GOLDEN, "gray.png"))
    assert gray.shape == (11, 13, 1) and tiled.shape == (11, 13, 3)
    assert np.array_equal(np.repeat(gray, 3, axis=2), tiled)
    from PIL import Image
    raw = np.asarray(Image.open(os.path.join(GOLDEN, "gray16.png")))
    g16 = caffe.io.load_image(os.path.join(GOLDEN, "gray16.png"), color=False)
    np.testing.assert_allclose(g16[:, :, 0], raw / 65535.0, rtol=1e-6)


@pytest.mark.parametrize("color", [True, False], ids=["color", "gray"])
@pytest.mark.parametrize("name", ["cat", "cat_gray", "fish-bike"])
def test_load_image_jpeg(name, color):
    im = caffe.io.load_image(shared_path("data", "images", name + ".jpg"), color=color)
    key = "load_%s_%s" % (name.replace("-", "_"), "color" if color else "gray")
    assert im.dtype == np.float32
    assert im.shape == tuple(G[key + "_shape"])
    assert_same(im[::17, ::13], key + "_sample")
    assert abs(im.astype(np.float64).sum() - float(G[key + "_sum"])) < 1e-6 * im.size


# -- resize_image -----------------------------------------------------------------------
RESIZE_KEYS = sorted(k for k in G.files if k.startswith("rs_") and k[3] in "1234"
                     and k.count("_") == 3)


@pytest.mark.parametrize("key", RESIZE_KEYS)
def test_resize_image(key):
    _, src, dims, order = key.split("_")
    h, w = (int(v) for v in dims.split("x"))
    out = caffe.io.resize_image(G["rs_in" + src], (h, w), interp_order=int(order[1:]))
    assert out.dtype == np.float32
    assert_same(out, key, atol=1e-6)


def test_resize_image_other_inputs():
    const = caffe.io.resize_image(np.full((9, 7, 3), 0.25, np.float32), (4, 5))
    assert_same(const, "rs_const")
    assert np.all(const == np.float32(0.25))
    assert_same(caffe.io.resize_image(G["rs_in_u8"], (10, 7)), "rs_u8_10x7", atol=1e-5)
    assert_same(caffe.io.resize_image(G["rs_in_f64"], (13, 40)), "rs_f64_13x40", atol=1e-4)


def test_resize_image_hand_values():
    # upsampling a 1x2 ramp to 1x4, linear, pixel-centre grid, zeros outside:
    # samples at x = -0.25, 0.25, 0.75, 1.25 of [0, 1] (range kept by the
    # [0, 1] rescale): 0.75*0, 0.75*0+0.25*1, 0.25*0+0.75*1, 0.75*1 + 0.25*0
    im = np.array([[[0.0], [1.0]]], np.float32)
    out = caffe.io.resize_image(im, (1, 4))
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.25, 0.75, 0.75], atol=1e-7)
    # the ndimage.zoom path (2 channels): corner-aligned, no clipping
    im2 = np.stack([np.array([[0.0, 3.0]]), np.array([[6.0, 0.0]])], axis=2).astype(np.float32)
    out2 = caffe.io.resize_image(im2, (1, 4))
    np.testing.assert_allclose(out2[0, :, 0], [0, 1, 2, 3], atol=1e-6)
    np.testing.assert_allclose(out2[0, :, 1], [6, 4, 2, 0], atol=1e-6)


def test_resize_cat():
    cat = caffe.io.load_image(shared_path("data", "images", "cat.jpg"))
    assert_same(caffe.io.resize_image(cat, (32, 32)), "rs_cat_32", atol=1e-6)
    assert_same(caffe.io.resize_image(cat, (227, 227))[::11, ::7], "rs_cat_227_sample", atol=1e-6)
    assert_same(caffe.io.resize_image(cat, (500, 700))[::23, ::19], "rs_cat_500x700_sample",
                atol=1e-6)


# -- oversample -------------------------------------------------------------------------
def test_oversample():
    ims = list(G["ov_in"])
    for dims, key in (((5, 6), "ov_5x6"), ((4, 4), "ov_4x4")):
        crops = caffe.io.oversample(ims, dims)
        assert crops.dtype == np.float32
        assert_same(crops, key)
    # naive: image 1, crop 4x4 of 9x11: corners, centre at int(4.5-2), int(5.5-2)
    im = ims[1]
    crops = caffe.io.oversample(ims, (4, 4))[10:]
    expect = [im[0:4, 0:4], im[0:4, 7:11], im[5:9, 0:4], im[5:9, 7:11], im[2:6, 3:7]]
    for i, e in enumerate(expect):
        assert np.array_equal(crops[i], e)
        assert np.array_equal(crops[i + 5], e[:, ::-1])


# -- Transformer ------------------------------------------------------------------------
def _cifar_transformer():
    t = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", G["tf_mu"])
    t.set_input_scale("data", 0.5)
    return t


def test_transformer_preprocess_deprocess_goldens():
    cat = caffe.io.load_image(shared_path("data", "images", "cat.jpg"))
    t = _cifar_transformer()
    pre = t.preprocess("data", cat)
    assert pre.dtype == np.float32 and pre.shape == (3, 32, 32)
    assert_same(pre, "tf_pre_cat", atol=1e-4)
    assert_same(t.deprocess("data", pre), "tf_de_cat", atol=1e-6)


def test_transformer_full_mean_is_resized():
    mean = np.load(shared_path("reference", "models", "ilsvrc12", "ilsvrc_2012_mean.npy"))
    t = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255)
    t.set_mean("data", mean)
    assert t.mean["data"].shape == (3, 32, 32)
    assert_same(t.mean["data"], "tf_full_mean", atol=1e-4)
    cat = caffe.io.load_image(shared_path("data", "images", "cat.jpg"))
    pre = t.preprocess("data", cat)
    assert_same(pre, "tf_pre_cat_fullmean", atol=1e-4)
    assert_same(t.deprocess("data", pre), "tf_de_cat_fullmean", atol=1e-6)


def test_transformer_2d_mean():
    t = caffe.io.Transformer({"data": (1, 1, 10, 12)})
    with pytest.raises(ValueError):  # pycaffe cannot resize a 2-D mean
        t.set_mean("data", np.arange(63.0).reshape(7, 9))
    assert "tf_mean2d_error" in G.files
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", G["tf_mean2d_in"])
    x = G["tf_mean2d_x"]
    pre = t.preprocess("data", x.copy())
    assert_same(pre, "tf_pre_mean2d", atol=1e-5)
    np.testing.assert_allclose(pre[0], x[:, :, 0] - G["tf_mean2d_in"], atol=1e-5)


def test_transformer_round_trip():
    rng = np.random.RandomState(1)
    x = rng.rand(32, 32, 3).astype(np.float32)
    t = _cifar_transformer()
    pre = t.preprocess("data", x.copy())
    # by hand: BGR, x255, minus mean, x0.5
    hand = (x.transpose(2, 0, 1)[[2, 1, 0]] * 255 - G["tf_mu"][:, None, None]) * 0.5
    np.testing.assert_allclose(pre, hand, atol=1e-4)
    back = t.deprocess("data", pre[np.newaxis])  # a (1, C, H, W) slice is squeezed
    np.testing.assert_allclose(back, x, atol=1e-6)


def test_transformer_preprocess_in_place_quirk():
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 2.0)
    x = np.ones((4, 5, 3), np.float32)
    t.preprocess("data", x)
    assert np.all(x == 2.0)  # pycaffe scales a float32 input in place
    y = np.ones((4, 5, 3), np.float64)
    t.preprocess("data", y)
    assert np.all(y == 1.0)


def test_transformer_errors():
    t = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    with pytest.raises(Exception, match=r"foo is not one of the net inputs: \{'data': \(1, 3, 32, 32\)\}"):
        t.preprocess("foo", np.zeros((32, 32, 3)))
    with pytest.raises(Exception, match="Transpose order needs to have the same number of dimensions"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(Exception, match="Channel swap needs to have the same number of dimensions"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="Mean channels incompatible with input."):
        t.set_mean("data", np.zeros(4))
    with pytest.raises(ValueError, match="Mean shape invalid"):
        t.set_mean("data", np.zeros((1, 3, 32, 32)))
    for bad in ("set_raw_scale", "set_input_scale"):
        with pytest.raises(Exception, match="not one of the net inputs"):
            getattr(t, bad)("label", 1.0)
