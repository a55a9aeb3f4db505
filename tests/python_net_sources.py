"""The reference nets that need Python layers, and small data for them.

Shared by tests/test_training_nets.py (netlib) and
tools/make_python_net_goldens.py (real pycaffe), so it needs only NumPy and
Pillow.  The nets name the modules ``voc_layers`` (FCN's segmentation data
layers) and ``pyloss`` (Caffe's EuclideanLossLayer example); both are written
for pycaffe in tests/pycaffe_modules and used unchanged by both.

FCN's param_str points at ``../data/sbdd/dataset`` and
``../data/pascal/VOC2011``, relative to where training runs: :func:`make_tree`
writes both datasets under a root and returns the folder to run from.
"""
import os

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = os.path.join(HERE, "pycaffe_modules")

# net key (relative to the models folder) -> the phase it is built in
NETS = {
    "fcn8s_voc/train.prototxt": "TRAIN",
    "fcn8s_voc/val.prototxt": "TEST",
    "fcn_alexnet_voc/train.prototxt": "TRAIN",
    "fcn_alexnet_voc/val.prototxt": "TEST",
    "pycaffe_linreg/linreg.prototxt": "TRAIN",
}
# image sizes (H, W) of the generated datasets
SIZES = [(30, 44), (38, 36), (26, 50)]
FORWARDS = 2


def _write(folder, stem, size, rng):
    from PIL import Image
    h, w = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=numpy.uint8), "RGB").save(
        os.path.join(folder[0], stem + ".jpg"), "JPEG", quality=90)
    label = rng.integers(0, 21, (h, w)).astype(numpy.uint8)
    label[rng.random((h, w)) < 0.1] = 255          # VOC's "void" pixels, ignored by the loss
    Image.fromarray(label, "L").save(os.path.join(folder[1], stem + ".png"), "PNG")


def make_tree(root, seed=0):
    """Write SBDD- and VOC-like datasets under ``root``; return ``root/run``."""
    rng = numpy.random.default_rng(seed)
    sbdd = os.path.join(root, "data", "sbdd", "dataset")
    voc = os.path.join(root, "data", "pascal", "VOC2011")
    dirs = {"sbdd": (os.path.join(sbdd, "img"), os.path.join(sbdd, "cls")),
            "voc": (os.path.join(voc, "JPEGImages"), os.path.join(voc, "SegmentationClass"))}
    for pair in dirs.values():
        for d in pair:
            os.makedirs(d, exist_ok=True)
    os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"), exist_ok=True)
    stems = ["2008_%06d" % (i + 1) for i in range(len(SIZES))]
    for stem, size in zip(stems, SIZES):
        _write(dirs["sbdd"], stem, size, rng)
        _write(dirs["voc"], stem, size, rng)
    with open(os.path.join(sbdd, "train.txt"), "w") as handle:
        handle.write("\n".join(stems) + "\n")
    with open(os.path.join(voc, "ImageSets", "Segmentation", "seg11valid.txt"), "w") as handle:
        handle.write("\n".join(stems) + "\n")
    run = os.path.join(root, "run")
    os.makedirs(run, exist_ok=True)
    return run


def shapes(net):
    """[[blob name, shape], ...] in net.blobs order."""
    return [[name, [int(d) for d in blob.shape]] for name, blob in net.blobs.items()]


def loss_values(net, output):
    """{name: float} for the scalar outputs of a forward (the losses)."""
    return {k: float(numpy.asarray(v).sum(dtype=numpy.float64)) for k, v in sorted(output.items())
            if numpy.asarray(v).size == 1}
