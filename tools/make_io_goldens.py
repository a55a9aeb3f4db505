#!/usr/bin/env python3
"""Write tests/golden/pycaffe_io/ with real BVLC pycaffe (caffe.io, Classifier, Detector).

Run with reference Caffe's Python (not netlib's)::

    source /opt/caffe/env.sh
    GLOG_minloglevel=2 python tools/make_io_goldens.py [--shared ../shared]

It writes, under tests/golden/pycaffe_io/:

* a few small PNG files made here with Pillow (gray, gray+alpha, RGB, RGBA,
  palette, palette with transparency, 16-bit gray, RGB and RGBA, 1-bit), the inputs of the
  load_image goldens;
* ``io.npz``: load_image results (small files in full, the shared JPEGs as
  a strided sample plus sums), resize_image inputs and outputs (1 and 3
  channel skimage path at several sizes and interpolation orders, the
  2/4-channel ndimage.zoom path, constant images, integer and float64
  inputs), oversample, Transformer pre/deprocess (per-channel and full
  resized means), and the serialized BlobProto / BlobProtoVector / Datum
  bytes;
* ``net.npz``: the 00-classification-notebook-style script on the trained
  cifar10_full net with cat.jpg, Classifier.predict (oversample on and off)
  and Detector.detect_windows (without and with context_pad) and
  Detector.crop.

Two adaptations are needed to run stock pycaffe on the installed libraries
(scikit-image 0.26, NumPy 1.26); each mimics what pycaffe did on the
libraries it was written for:

1. ``caffe.io.load_image`` passes ``as_grey=`` to ``skimage.io.imread``;
   scikit-image removed that spelling (it is ``as_gray`` now), so stock
   load_image raises TypeError.  Here ``skimage.io.imread`` is wrapped to map
   ``as_grey`` to ``as_gray``.
2. ``Detector.crop`` with ``context_pad`` slices the image with float
   coordinates, which NumPy >= 1.12 refuses (old NumPy truncated them to
   int).  Here the image handed to crop is a view of an ndarray subclass
   whose ``__getitem__`` truncates float slice bounds, as old NumPy did.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "golden", "pycaffe_io")


def _patch_skimage():
    import skimage.io
    real = skimage.io.imread

    def imread(fname, *args, **kwargs):
        if "as_grey" in kwargs:
            kwargs["as_gray"] = kwargs.pop("as_grey")
        return real(fname, *args, **kwargs)

    skimage.io.imread = imread


class OldIndexArray(np.ndarray):
    """ndarray whose basic slicing truncates float bounds to int (NumPy < 1.12)."""

    def __getitem__(self, key):
        def fix(k):
            if isinstance(k, slice):
                conv = [int(v) if isinstance(v, (float, np.floating)) else v
                        for v in (k.start, k.stop, k.step)]
                return slice(*conv)
            return k
        if isinstance(key, tuple):
            key = tuple(fix(k) for k in key)
        else:
            key = fix(key)
        return np.ndarray.__getitem__(self, key)


def make_pngs():
    """Small PNGs in the modes load_image has to handle; returns {name: path}."""
    from PIL import Image
    rng = np.random.RandomState(7)
    h, w = 11, 13
    rgb = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    gray = rng.randint(0, 256, (h, w)).astype(np.uint8)
    alpha = rng.randint(0, 256, (h, w)).astype(np.uint8)
    files = {}

    def save(name, img, **kw):
        path = os.path.join(OUT, name)
        img.save(path, **kw)
        files[name] = path

    save("gray.png", Image.fromarray(gray, "L"))
    save("gray_alpha.png", Image.fromarray(np.dstack([gray, alpha]), "LA"))
    save("rgb.png", Image.fromarray(rgb, "RGB"))
    save("rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    pal = Image.fromarray(rgb, "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    save("palette.png", pal)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    save("palette_transparent.png", pal_t, transparency=3)
    g16 = (rng.randint(0, 65536, (h, w))).astype(np.uint16)
    save("gray16.png", Image.fromarray(g16))
    save("bilevel.png", Image.fromarray(gray > 127).convert("1"))
    # 16-bit colour PNGs (Pillow cannot write them): written by hand
    rgb16 = rng.randint(0, 65536, (h, w, 3)).astype(np.uint16)
    a16 = rng.randint(0, 65536, (h, w, 1)).astype(np.uint16)
    for name, arr, ctype in (("rgb16.png", rgb16, 2), ("rgba16.png", np.dstack([rgb16, a16]), 6)):
        path = os.path.join(OUT, name)
        write_png16(path, arr, ctype)
        files[name] = path
    return files


def write_png16(path, arr, color_type):
    """A 16-bit PNG of ``arr`` (H, W, C uint16), no filtering."""
    import struct
    import zlib

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def io_goldens(caffe, shared):
    from caffe.proto import caffe_pb2
    g = {}
    files = make_pngs()
    # -- load_image ------------------------------------------------------------------
    for name in sorted(files):
        for color in (True, False):
            key = "load_%s_%s" % (name[:-4], "color" if color else "gray")
            try:
                g[key] = caffe.io.load_image(files[name], color=color)
            except Exception as exc:  # recorded: netlib must fail too
                g[key + "_error"] = np.array(type(exc).__name__)
    for name in ("cat.jpg", "cat_gray.jpg", "fish-bike.jpg"):
        path = os.path.join(shared, "data", "images", name)
        for color in (True, False):
            im = caffe.io.load_image(path, color=color)
            key = "load_%s_%s" % (name[:-4].replace("-", "_"), "color" if color else "gray")
            g[key + "_shape"] = np.array(im.shape)
            g[key + "_sample"] = im[::17, ::13]
            g[key + "_sum"] = np.array(im.astype(np.float64).sum())
    # -- resize_image ----------------------------------------------------------------
    rng = np.random.RandomState(3)
    base3 = rng.rand(31, 23, 3).astype(np.float32) * 4 - 1  # not in [0, 1]
    base1 = rng.rand(23, 31, 1).astype(np.float32)
    base2 = rng.rand(17, 19, 2).astype(np.float32) * 10
    base4 = rng.rand(15, 12, 4).astype(np.float32)
    g["rs_in3"], g["rs_in1"], g["rs_in2"], g["rs_in4"] = base3, base1, base2, base4
    cases = []
    for order in (0, 1, 2, 3, 4, 5):
        for dims in ((16, 12), (40, 33), (20, 30), (31, 23), (5, 3)):
            cases.append(("rs_in3", dims, order))
            cases.append(("rs_in1", dims, order))
        for dims in ((8, 9), (24, 30), (17, 25)):
            cases.append(("rs_in2", dims, order))
            cases.append(("rs_in4", dims, order))
    for src, dims, order in cases:
        key = "rs_%s_%dx%d_o%d" % (src[-1], dims[0], dims[1], order)
        g[key] = caffe.io.resize_image(g[src], dims, interp_order=order)
    g["rs_const"] = caffe.io.resize_image(np.full((9, 7, 3), 0.25, np.float32), (4, 5))
    u8 = rng.randint(0, 256, (21, 18, 3)).astype(np.uint8)
    g["rs_in_u8"] = u8
    g["rs_u8_10x7"] = caffe.io.resize_image(u8, (10, 7))
    f64 = rng.rand(21, 18, 3) * 300
    g["rs_in_f64"] = f64
    g["rs_f64_13x40"] = caffe.io.resize_image(f64, (13, 40))
    cat = caffe.io.load_image(os.path.join(shared, "data", "images", "cat.jpg"))
    g["rs_cat_32"] = caffe.io.resize_image(cat, (32, 32))
    g["rs_cat_227_sample"] = caffe.io.resize_image(cat, (227, 227))[::11, ::7]
    g["rs_cat_500x700_sample"] = caffe.io.resize_image(cat, (500, 700))[::23, ::19]
    # -- oversample ------------------------------------------------------------------
    ims = [rng.rand(9, 11, 3).astype(np.float32), rng.rand(9, 11, 3).astype(np.float32)]
    g["ov_in"] = np.array(ims)
    g["ov_5x6"] = caffe.io.oversample(ims, (5, 6))
    g["ov_4x4"] = caffe.io.oversample(ims, (4, 4))
    # -- Transformer -----------------------------------------------------------------
    mean_full = np.load(os.path.join(shared, "reference", "models", "ilsvrc12", "ilsvrc_2012_mean.npy"))
    mu = mean_full.mean(1).mean(1)
    t = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", mu)
    t.set_input_scale("data", 0.5)
    g["tf_mu"] = mu
    g["tf_pre_cat"] = t.preprocess("data", cat)
    g["tf_de_cat"] = t.deprocess("data", g["tf_pre_cat"])
    t2 = caffe.io.Transformer({"data": (1, 3, 32, 32)})
    t2.set_transpose("data", (2, 0, 1))
    t2.set_raw_scale("data", 255)
    t2.set_mean("data", mean_full)
    g["tf_full_mean"] = t2.mean["data"]
    g["tf_pre_cat_fullmean"] = t2.preprocess("data", cat)
    g["tf_de_cat_fullmean"] = t2.deprocess("data", g["tf_pre_cat_fullmean"])
    t3 = caffe.io.Transformer({"data": (1, 1, 10, 12)})
    try:  # a 2-D mean of another size: pycaffe's transpose of it fails
        t3.set_mean("data", rng.rand(7, 9) * 50 + 10)
    except Exception as exc:
        g["tf_mean2d_error"] = np.array(type(exc).__name__)
    mean2d = rng.rand(10, 12) * 50
    t3.set_transpose("data", (2, 0, 1))
    t3.set_mean("data", mean2d)  # 2-D mean of the input's size: kept, broadcast
    g["tf_mean2d_in"] = mean2d
    g["tf_mean2d_x"] = rng.rand(10, 12, 1).astype(np.float32)
    g["tf_pre_mean2d"] = t3.preprocess("data", g["tf_mean2d_x"].copy())
    # -- proto / datum ---------------------------------------------------------------
    arr = rng.rand(2, 3, 4).astype(np.float32)
    diff = rng.rand(2, 3, 4)
    g["bp_arr"], g["bp_diff"] = arr, diff
    g["bp_bytes"] = np.frombuffer(caffe.io.array_to_blobproto(arr).SerializeToString(), np.uint8)
    g["bp_diff_bytes"] = np.frombuffer(caffe.io.array_to_blobproto(arr, diff).SerializeToString(), np.uint8)
    vec = caffe.io.arraylist_to_blobprotovector_str([arr, diff[0], np.arange(5.0)])
    g["bpv_bytes"] = np.frombuffer(vec, np.uint8)
    back = caffe.io.blobprotovector_str_to_arraylist(vec)
    for i, a in enumerate(back):
        g["bpv_back_%d" % i] = a
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=2, width=3)
    legacy.data.extend(np.arange(12.0))
    legacy.diff.extend(np.arange(12.0) * -1)
    g["bp_legacy"] = caffe.io.blobproto_to_array(legacy)
    g["bp_legacy_diff"] = caffe.io.blobproto_to_array(legacy, return_diff=True)
    u8arr = rng.randint(0, 256, (3, 4, 5)).astype(np.uint8)
    g["dt_u8"] = u8arr
    g["dt_u8_bytes"] = np.frombuffer(caffe.io.array_to_datum(u8arr, label=7).SerializeToString(), np.uint8)
    g["dt_f_bytes"] = np.frombuffer(caffe.io.array_to_datum(arr[:1] * 3, label=-2).SerializeToString(), np.uint8)
    g["dt_f_nolabel_bytes"] = np.frombuffer(caffe.io.array_to_datum(np.ones((10, 10, 3))).SerializeToString(), np.uint8)
    d = caffe_pb2.Datum()
    d.ParseFromString(g["dt_f_bytes"].tobytes())
    g["dt_f_back"] = caffe.io.datum_to_array(d)
    return g


def net_goldens(caffe, shared):
    g = {}
    models = os.path.join(shared, "reference", "models")
    deploy = os.path.join(models, "cifar10_full_trained_binaryproto", "cifar10_full.prototxt")
    weights = os.path.join(models, "cifar10_full_trained_binaryproto", "cifar10_full_iter_70000.caffemodel")
    images = os.path.join(shared, "data", "images")
    cat_path = os.path.join(images, "cat.jpg")
    fish_path = os.path.join(images, "fish-bike.jpg")
    mu = np.load(os.path.join(models, "ilsvrc12", "ilsvrc_2012_mean.npy")).mean(1).mean(1)

    # -- the 00-classification notebook, on a CIFAR-10 net ---------------------------
    caffe.set_mode_cpu()
    net = caffe.Net(deploy, weights, caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(3, 3, 32, 32)
    image = caffe.io.load_image(cat_path)
    transformed = transformer.preprocess("data", image)
    net.blobs["data"].data[...] = transformed
    output = net.forward()
    g["nb_data"] = transformed
    g["nb_prob"] = output["prob"][0].copy()
    g["nb_prob_all"] = output["prob"].copy()
    g["nb_top3"] = output["prob"][0].argsort()[::-1][:3]
    g["nb_conv1_sample"] = net.blobs["conv1"].data[0, :4].copy()

    # -- Classifier --------------------------------------------------------------------
    clf = caffe.Classifier(deploy, weights, image_dims=(40, 40), mean=mu, raw_scale=255,
                           channel_swap=(2, 1, 0))
    ims = [caffe.io.load_image(cat_path), caffe.io.load_image(fish_path)]
    g["clf_over"] = clf.predict(ims)
    g["clf_center"] = clf.predict(ims, oversample=False)
    clf2 = caffe.Classifier(deploy, weights, input_scale=0.9, raw_scale=255)
    g["clf_default_dims"] = clf2.predict(ims[:1], oversample=False)
    g["clf_default_dims_over"] = clf2.predict(ims[:1])

    # -- Detector ----------------------------------------------------------------------
    windows = np.array([[0, 0, 200, 250], [50, 100, 300, 400], [10, 20, 42, 52]])
    det = caffe.Detector(deploy, weights, mean=mu, raw_scale=255, channel_swap=(2, 1, 0))
    dets = det.detect_windows([(cat_path, windows), (fish_path, windows[:2])])
    g["det_pred"] = np.array([d["prediction"] for d in dets])
    g["det_windows"] = np.array([d["window"] for d in dets])
    g["det_files"] = np.array([os.path.basename(d["filename"]) for d in dets])

    det_c = caffe.Detector(deploy, weights, mean=mu, raw_scale=255, channel_swap=(2, 1, 0),
                           context_pad=4)
    g["detc_crop_mean"] = det_c.crop_mean
    real_load = caffe.io.load_image
    caffe.io.load_image = lambda *a, **k: real_load(*a, **k).view(OldIndexArray)
    try:
        dets = det_c.detect_windows([(cat_path, windows)])
    finally:
        caffe.io.load_image = real_load
    g["detc_pred"] = np.array([d["prediction"] for d in dets])
    cat = real_load(cat_path).view(OldIndexArray)
    for i, w in enumerate(np.array([[0, 0, 200, 250], [100, 150, 359, 479], [-10, 30, 100, 500]])):
        g["detc_crop_%d" % i] = np.asarray(det_c.crop(cat, w))
    det_n = caffe.Detector(deploy, weights, raw_scale=255, context_pad=6)
    g["detn_crop_mean"] = det_n.crop_mean
    g["detn_crop"] = np.asarray(det_n.crop(cat, np.array([30, 40, 130, 160])))
    return g


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"))
    args = parser.parse_args()
    import caffe
    import skimage
    _patch_skimage()
    os.makedirs(OUT, exist_ok=True)
    versions = "skimage %s, numpy %s" % (skimage.__version__, np.__version__)
    io = io_goldens(caffe, args.shared)
    io["versions"] = np.array(versions)
    np.savez_compressed(os.path.join(OUT, "io.npz"), **io)
    net = net_goldens(caffe, args.shared)
    net["versions"] = np.array(versions)
    np.savez_compressed(os.path.join(OUT, "net.npz"), **net)
    print("wrote %s (%s)" % (OUT, versions))


if __name__ == "__main__":
    sys.exit(main())
