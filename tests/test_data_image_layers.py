"""ImageData and WindowData: pixels against independent decodes, training,
and their errors."""
import os
import shutil

import numpy
import pytest

import netlib
from conftest import shared_path
from netlib.proto import caffe_pb2

PIL = pytest.importorskip("PIL.Image")

NAMES = ("cat.jpg", "cat_gray.jpg", "fish-bike.jpg")


def images_folder():
    return shared_path("data", "images") + os.sep


def pillow_bgr(path, color=True):
    """Independent decode: Pillow -> RGB (or L) -> BGR, HWC uint8."""
    img = PIL.open(path)
    if color:
        return numpy.asarray(img.convert("RGB"))[..., ::-1]
    img.draft("L", img.size)
    return numpy.asarray(img.convert("L"))[..., None]


def write_list(path, lines):
    path.write_text("".join("%s %d\n" % (name, label) for name, label in lines))
    return str(path)


def image_data_net(source, root, batch_size, image_param="", transform="", phase=netlib.TEST, body=""):
    text = ('name: "i" layer { name: "data" type: "ImageData" top: "data" top: "label" '
            'transform_param { %s } image_data_param { source: "%s" root_folder: "%s" batch_size: %d %s } } %s'
            % (transform, source, root, batch_size, image_param, body))
    return netlib.Net(text, phase)


def test_image_data_pixels_labels_and_wraparound(tmp_path):
    root = images_folder()
    source = write_list(tmp_path / "list.txt", [(n, i) for i, n in enumerate(NAMES[:2])])
    net = image_data_net(source, root, 1)  # batch 1: each batch takes its image's size
    for k in range(3):
        net.forward()
        ref = pillow_bgr(root + NAMES[k % 2]).transpose(2, 0, 1)
        numpy.testing.assert_array_equal(net.blobs["data"].data[0], ref)
        assert net.blobs["label"].data[0] == k % 2


def test_image_data_resize_gray_crop_mean_in_test_phase(tmp_path):
    cv2 = pytest.importorskip("cv2")
    root = images_folder()
    source = write_list(tmp_path / "list.txt", [(n, i) for i, n in enumerate(NAMES)])
    net = image_data_net(source, root, 3, "new_height: 40 new_width: 50 is_color: false",
                         "crop_size: 32 mean_value: 100 scale: 0.5")
    net.forward()
    assert net.blobs["data"].shape == (3, 1, 32, 32)
    for i, name in enumerate(NAMES):
        gray = pillow_bgr(root + name, color=False)[..., 0]
        resized = cv2.resize(gray, (50, 40), interpolation=cv2.INTER_LINEAR)
        ref = (resized[4:36, 9:41].astype(numpy.float32) - numpy.float32(100)) * numpy.float32(0.5)
        numpy.testing.assert_array_equal(net.blobs["data"].data[i, 0], ref)


def test_image_data_shuffle_visits_every_line_each_epoch(tmp_path):
    root = images_folder()
    lines = [(NAMES[i % 3], i) for i in range(7)]
    source = write_list(tmp_path / "list.txt", lines)
    netlib.set_random_seed(3)
    net = image_data_net(source, root, 7, "shuffle: true new_height: 8 new_width: 8")
    orders = []
    for _ in range(3):
        net.forward()
        orders.append(net.blobs["label"].data.astype(int).tolist())
    assert all(sorted(o) == list(range(7)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and orders[0] != list(range(7))


def tiny_classifier(num_output=3):
    return ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { '
            'num_output: %d weight_filler { type: "gaussian" std: 0.001 } } } '
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'
            % num_output)


def train(net_text, tmp_path, iters=30):
    (tmp_path / "net.prototxt").write_text(net_text)
    solver_text = ('net: "%s" base_lr: 0.0005 momentum: 0.9 lr_policy: "fixed" max_iter: %d display: 0 '
                   'snapshot_after_train: false solver_mode: CPU random_seed: 1' % (tmp_path / "net.prototxt", iters))
    (tmp_path / "solver.prototxt").write_text(solver_text)
    solver = netlib.get_solver(str(tmp_path / "solver.prototxt"))
    first = float(solver.net.forward()["loss"])
    solver.step(iters)
    last = numpy.mean([float(solver.net.forward()["loss"]) for _ in range(3)])
    return solver, first, last


def test_image_list_trains_with_crop_mirror_and_mean(tmp_path):
    root = images_folder()
    source = write_list(tmp_path / "list.txt", [(n, i) for i, n in enumerate(NAMES)])
    mean = caffe_pb2.BlobProto(num=1, channels=3, height=36, width=36)
    mean.data.extend([110.0] * (3 * 36 * 36))
    netlib.files.write_binary_proto(str(tmp_path / "mean.binaryproto"), mean)
    text = ('name: "i" layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TRAIN } '
            'transform_param { crop_size: 32 mirror: true mean_file: "%s" scale: 0.0078125 } '
            'image_data_param { source: "%s" root_folder: "%s" batch_size: 3 shuffle: true '
            'new_height: 36 new_width: 36 } } ' % (tmp_path / "mean.binaryproto", source, root)) + tiny_classifier()
    solver, first, last = train(text, tmp_path)
    assert solver.net.blobs["data"].shape == (3, 3, 32, 32)
    assert numpy.isfinite(last) and last < first * 0.5


def test_image_data_errors(tmp_path):
    root = images_folder()
    missing = write_list(tmp_path / "missing.txt", [("cat.jpg", 0), ("no_such.jpg", 1)])
    net = image_data_net(missing, root, 1)
    net.forward()
    with pytest.raises(FileNotFoundError, match=r"no_such\.jpg.*missing\.txt"):
        net.forward()
    trunc = tmp_path / "imgs"
    trunc.mkdir()
    data = open(root + "cat.jpg", "rb").read()
    (trunc / "cut.jpg").write_bytes(data[:len(data) // 2])
    (trunc / "text.jpg").write_text("not an image")
    for name in ("cut.jpg", "text.jpg"):
        lst = write_list(tmp_path / ("%s.txt" % name), [(name, 0)])
        with pytest.raises(netlib.NetlibError, match=name):
            image_data_net(lst, str(trunc) + os.sep, 1)
    bad = tmp_path / "bad.txt"
    bad.write_text("cat.jpg 0\ncat.jpg zero\n")
    with pytest.raises(netlib.ConfigError, match=r"bad\.txt:2: expected 'path label'"):
        image_data_net(str(bad), root, 1)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(netlib.ConfigError, match="empty"):
        image_data_net(str(tmp_path / "empty.txt"), root, 1)
    with pytest.raises(netlib.ConfigError, match="new_height and new_width"):
        image_data_net(missing, root, 1, "new_height: 10")
    with pytest.raises(FileNotFoundError, match="nolist"):
        image_data_net(str(tmp_path / "nolist.txt"), root, 1)


# -- WindowData -------------------------------------------------------------------------
def write_window_file(path, root):
    sizes = {n: PIL.open(root + n).size for n in NAMES}  # (width, height)
    entries = []
    for index, name in enumerate(NAMES):
        w, h = sizes[name]
        windows = ["%d 0.9 10 20 200 150" % (index + 1), "%d 0.75 %d %d %d %d" % (index + 1, w // 2, h // 3, w - 1, h - 1),
                   "0 0.1 0 0 %d %d" % (w // 3, h // 3), "0 0.2 %d %d %d %d" % (w - 60, h - 40, w - 1, h - 1),
                   "2 0.4 5 5 50 50"]  # unused: between the thresholds
        entries.append("# %d\n%s\n3\n%d\n%d\n%d\n%s\n" % (index, name, h, w, len(windows), "\n".join(windows)))
    path.write_text("".join(entries))
    return str(path)


def window_net(source, root, transform, extra="", body="", phase=netlib.TRAIN, batch_size=8):
    text = ('name: "w" layer { name: "data" type: "WindowData" top: "data" top: "label" transform_param { %s } '
            'window_data_param { source: "%s" root_folder: "%s" batch_size: %d fg_threshold: 0.5 '
            'bg_threshold: 0.3 fg_fraction: 0.25 %s } } %s' % (transform, source, root, batch_size, extra, body))
    return netlib.Net(text, phase)


def test_window_data_samples_and_warps(tmp_path):
    cv2 = pytest.importorskip("cv2")
    root = images_folder()
    source = write_window_file(tmp_path / "windows.txt", root)
    netlib.set_random_seed(0)
    net = window_net(source, root, "crop_size: 24 mean_value: 50", "scale: 0.5")
    net.forward()
    labels = net.blobs["label"].data
    assert net.blobs["data"].shape == (8, 3, 24, 24)
    assert (labels[:6] == 0).all() and (labels[6:] > 0).all()  # 8 - int(8 * 0.25) background first
    # Without context padding every window is warped to the whole crop: check
    # each against cv2 on Pillow's pixels for the windows it may have drawn.
    candidates = {}
    for index, name in enumerate(NAMES):
        img = pillow_bgr(root + name)
        w, h = img.shape[1], img.shape[0]
        for x1, y1, x2, y2 in [(10, 20, 200, 150), (w // 2, h // 3, w - 1, h - 1), (0, 0, w // 3, h // 3),
                               (w - 60, h - 40, w - 1, h - 1)]:
            patch = cv2.resize(img[y1:y2 + 1, x1:x2 + 1], (24, 24), interpolation=cv2.INTER_LINEAR)
            candidates[(index, x1, y1)] = (patch.transpose(2, 0, 1).astype(numpy.float32) - 50) * numpy.float32(0.5)
    for item in net.blobs["data"].data:
        assert any(numpy.array_equal(item, ref) for ref in candidates.values())


def test_window_data_context_pad_square_mirror_trains(tmp_path):
    root = images_folder()
    source = write_window_file(tmp_path / "windows.txt", root)
    mean = caffe_pb2.BlobProto(num=1, channels=3, height=40, width=40)
    mean.data.extend([120.0] * 4800)
    netlib.files.write_binary_proto(str(tmp_path / "mean.binaryproto"), mean)
    text = ('name: "w" layer { name: "data" type: "WindowData" top: "data" top: "label" '
            'transform_param { crop_size: 32 mirror: true mean_file: "%s" } window_data_param { source: "%s" '
            'root_folder: "%s" batch_size: 8 fg_threshold: 0.5 bg_threshold: 0.3 context_pad: 4 '
            'crop_mode: "square" scale: 0.0078125 cache_images: true } } '
            % (tmp_path / "mean.binaryproto", source, root)) + tiny_classifier(4)
    solver, first, last = train(text, tmp_path, iters=40)
    data = solver.net.blobs["data"].data
    assert data.shape == (8, 3, 32, 32) and numpy.isfinite(last) and last < first


def test_window_file_syntax_errors(tmp_path):
    root = images_folder()
    bad = tmp_path / "bad.txt"
    bad.write_text("# 0\ncat.jpg\n3\n360\n480\n2\n1 0.9 1 1 10 10\n1 0.9 1 x 10 10\n")
    with pytest.raises(netlib.ParseError, match=r"bad\.txt:8:.*expected y1, got 'x'"):
        window_net(str(bad), root, "crop_size: 8")
    bad.write_text("0\ncat.jpg\n")
    with pytest.raises(netlib.ParseError, match=r"bad\.txt:1:.*'#'"):
        window_net(str(bad), root, "crop_size: 8")
    bad.write_text("# 0\ncat.jpg\n3\n360\n480\n2\n1 0.9 1 1 10 10\n")
    with pytest.raises(netlib.ParseError, match="unexpected end of file"):
        window_net(str(bad), root, "crop_size: 8")
    good = write_window_file(tmp_path / "w.txt", root)
    with pytest.raises(netlib.ConfigError, match="crop_size must be positive"):
        window_net(good, root, "mirror: true")
    with pytest.raises(netlib.ConfigError, match="ignores transform_param.scale"):
        window_net(good, root, "crop_size: 8 scale: 0.5")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in NAMES[:2]:
        shutil.copy(root + name, folder / name)
    lines = open(good).read().replace("fish-bike.jpg", "gone.jpg")
    (tmp_path / "gone.txt").write_text(lines)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        window_net(str(tmp_path / "gone.txt"), str(folder) + os.sep, "crop_size: 8", "cache_images: true")
