"""The real training nets of ../shared/reference/models and small data sources for them.

Shared by tests/test_training_nets.py and tools/make_train_net_goldens.py (which
builds the same nets with real Caffe).  Three parts:

* :func:`discover` scans every ``*.prototxt`` under the models folder for data
  layers (V2 type strings, V1 enums such as ``DATA``/``IMAGE_DATA`` and V0
  strings such as ``"data"``/``"images"``), reads each hit with netlib's
  upgrading reader (a solver with an inline ``net_param`` counts as a net) and
  classifies it: buildable, needs Python layers, or refused (fork-only fields
  that real Caffe cannot parse).  Each buildable net gets the phases/stages it
  is built in: TRAIN, and TEST once per stage combination its TEST data layers
  ask for (``test-on-train``/``test-on-test``), plain TEST otherwise.
* :func:`make_sources` writes, for every data layer of an upgraded
  NetParameter, a small source of the shape the net expects (an LMDB/LevelDB
  of 5 random uint8 Datums, an image list with JPEG/PNG files, an R-CNN
  window file over generated images with foreground and background windows,
  HDF5 files and their list, and a legacy 4-D BlobProto mean file), rewrites
  the layer's source/mean_file to them and returns a manifest of the
  rewritten fields.
* :func:`apply_manifest` applies such a manifest to another NetParameter
  message (pycaffe's own ``caffe_pb2`` in the golden script): it needs no
  netlib, only the message.

Under reference Caffe's Python, which has no netlib, the golden script uses
only :func:`apply_manifest`, :func:`replace_with_dummy_data`,
:func:`deterministic_data_layers`, :func:`data_summary` and :func:`case_id`;
everything that needs netlib imports it inside the function.
"""
import glob
import os
import re

import numpy

PHASES = ("TRAIN", "TEST")

# Layer types that produce data (no bottoms) in the reference nets.
DATA_TYPES = ("Data", "ImageData", "WindowData", "HDF5Data", "MemoryData", "DummyData", "Python",
              "AnnotatedData")
# Types whose data we generate (the rest need nothing or are not buildable).
SOURCED_TYPES = ("Data", "ImageData", "WindowData", "HDF5Data")
# Types that prefetch on threads (netlib.data.base.PrefetchingDataLayer).
PREFETCHING_TYPES = ("Data", "ImageData", "WindowData")

_TYPE_RE = re.compile(
    r"""^\s*type\s*:\s*["']?(Data|ImageData|WindowData|HDF5Data|MemoryData|DummyData|Python|AnnotatedData"""
    r"""|DATA|IMAGE_DATA|WINDOW_DATA|HDF5_DATA|MEMORY_DATA|DUMMY_DATA|PYTHON"""
    r"""|data|images|window_data|hdf5_data)["']?\s*(#.*)?$""", re.M)

# Solver fields holding whole nets.
INLINE_NET_FIELDS = ("net_param", "train_net_param", "test_net_param")

# Number of records in every generated database / list / HDF5 file.
NUM_ITEMS = 5

# Item shapes that the files themselves do not state: no readable mean file,
# no ImageNet-size crop (>= 224, from 256x256 images).  Each is the data set the
# example was written for.  Keys are net keys (see discover); a value is a
# (C, H, W) item shape, a {phase: shape} dict when the phases read different
# data, or {top: row shape} for HDF5Data.
_MNIST = (1, 28, 28)      # examples/mnist/convert_mnist_data.cpp: 28x28 gray digits
_SIAMESE = (2, 28, 28)    # examples/siamese/convert_mnist_siamese_data.cpp: two digits as 2 channels
_CIFAR = (3, 32, 32)      # examples/cifar10/convert_cifar_data.cpp: 32x32 colour images
_HDF5_CLS = {"data": (4,), "label": ()}  # examples/hdf5_classification: make_classification(n_features=4)
ITEM_SHAPES = {
    "mnist/lenet_train_test.prototxt": _MNIST,
    "mnist/mnist_autoencoder.prototxt": _MNIST,
    "mnist/lenet_consolidated_solver.prototxt#net_param": _MNIST,
    "legacy_v1_mnist/lenet_train_test.prototxt": _MNIST,
    "legacy_v0_lenet/lenet_train.prototxt": _MNIST,
    "legacy_v0_lenet/lenet_test.prototxt": _MNIST,
    "lenet_trained_with_solverstate/lenet_train_test.prototxt": _MNIST,
    "siamese/mnist_siamese_train_test.prototxt": _SIAMESE,
    "legacy_v1_siamese/mnist_siamese_train_test.prototxt": _SIAMESE,
    "cifar10/cifar10_full_sigmoid_train_test.prototxt": _CIFAR,
    "cifar10/cifar10_full_sigmoid_train_test_bn.prototxt": _CIFAR,
    "cifar10/cifar10_full_train_test.prototxt": _CIFAR,
    "cifar10/cifar10_quick_train_test.prototxt": _CIFAR,
    "cifar10_full_trained_binaryproto/cifar10_full_train_test.prototxt": _CIFAR,
    "cifar10_full_trained_hdf5/cifar10_full_train_test.prototxt": _CIFAR,
    "cifar10_quick_trained_hdf5/cifar10_quick_train_test.prototxt": _CIFAR,
    "legacy_v1_cifar10/cifar10_quick_train_test.prototxt": _CIFAR,
    # ResNet-20 trains on CIFAR-10 padded by 4 pixels on every side
    # (cifar10_pad4_train_lmdb, mean_pad.binaryproto) with random 32x32 crops,
    # and tests on the plain 32x32 images.
    "resnet20_cifar10_trained/res20_cifar_train_test.prototxt": {"TRAIN": (3, 40, 40), "TEST": _CIFAR},
    "hdf5_classification/nonlinear_auto_test.prototxt": _HDF5_CLS,
    "hdf5_classification/nonlinear_auto_train.prototxt": _HDF5_CLS,
    "hdf5_classification/nonlinear_train_val.prototxt": _HDF5_CLS,
    "hdf5_classification/train_val.prototxt": _HDF5_CLS,
    "legacy_v1_hdf5_classification/train_val.prototxt": _HDF5_CLS,
    "legacy_v1_hdf5_classification/train_val2.prototxt": _HDF5_CLS,
}

# Nets netlib cannot read, with the fork-only field its parser stops at (none
# today: the SSD nets' fields are netlib's fork extensions).
REFUSED_FIELDS = {}
# Nets that parse but whose layer types netlib knows and does not run (the
# SSD fork's training layers): building them is a clear error.
UNSUPPORTED_NETS = {
    "mobilenet_ssd_voc/MobileNetSSD_train.prototxt": "AnnotatedData",
    "mobilenet_ssd_voc/MobileNetSSD_test.prototxt": "AnnotatedData",
}
PYTHON_REASON = "has Python layers: tests/test_training_nets.py builds it with tests/pycaffe_modules"


def case_id(key, phase, stages=()):
    """A readable pytest id: ``net key:PHASE`` plus ``:stage,...`` when staged."""
    return "%s:%s%s" % (key, phase, (":" + ",".join(stages)) if stages else "")


class NetEntry:
    """One training net: ``key`` (path relative to the models folder, plus
    ``#field`` for a net inside a solver), ``status`` ('ok', 'python',
    'unsupported' or 'refused'), ``reason``, ``states`` [(phase name, stages)], ``types``
    (its data layer types) and, for 'ok' nets, ``param`` (upgraded)."""

    def __init__(self, key, status, reason="", states=(), types=(), param=None):
        self.key, self.status, self.reason = key, status, reason
        self.states, self.types, self.param = list(states), list(types), param

    @property
    def rel(self):
        return self.key.split("#")[0]

    @property
    def field(self):
        return self.key.split("#")[1] if "#" in self.key else None

    def __repr__(self):
        return "NetEntry(%r, %s)" % (self.key, self.status)


def _states(param):
    """TRAIN and TEST, each once per stage combination its data layers include."""
    from netlib.proto import caffe_pb2
    out = []
    for name in PHASES:
        phase = caffe_pb2.Phase.Value(name)
        combos = set()
        for layer in param.layer:
            if layer.type not in DATA_TYPES:
                continue
            for rule in layer.include:
                if rule.HasField("phase") and rule.phase == phase and len(rule.stage):
                    combos.add(tuple(rule.stage))
        out.extend((name, c) for c in sorted(combos)) if combos else out.append((name, ()))
    return out


def _classify(key, param):
    from netlib.layer import UNSUPPORTED_TYPES
    types = sorted({l.type for l in param.layer if l.type in DATA_TYPES})
    unsupported = sorted({l.type for l in param.layer if l.type in UNSUPPORTED_TYPES})
    if unsupported:
        return NetEntry(key, "unsupported", UNSUPPORTED_TYPES[unsupported[0]], types=unsupported)
    if any(l.type == "Python" for l in param.layer):
        return NetEntry(key, "python", PYTHON_REASON, types=types)
    return NetEntry(key, "ok", states=_states(param), types=types, param=param)


def discover(models_dir):
    """Every net under ``models_dir`` with data layers, as NetEntry objects sorted by key."""
    from netlib.errors import ParseError
    from netlib.files import read_net_param, read_solver_param, read_text_proto
    from netlib.proto import caffe_pb2
    entries = []
    for path in sorted(glob.glob(os.path.join(models_dir, "**", "*.prototxt"), recursive=True)):
        rel = os.path.relpath(path, models_dir).replace(os.sep, "/")
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        if not _TYPE_RE.search(text):
            continue
        try:
            read_text_proto(path, caffe_pb2.NetParameter())
            entries.append(_classify(rel, read_net_param(path)))
            continue
        except ParseError as net_error:
            try:
                solver = read_solver_param(path)
            except ParseError:
                entries.append(NetEntry(rel, "refused", "real Caffe cannot parse it either (fork-only field "
                                        "%r): %s" % (REFUSED_FIELDS.get(rel, "?"), net_error)))
                continue
        for field in INLINE_NET_FIELDS:
            nets = getattr(solver, field)
            nets = list(nets) if field == "test_net_param" else ([nets] if solver.HasField(field) else [])
            for i, net in enumerate(nets):
                key = "%s#%s%s" % (rel, field, "" if field != "test_net_param" else "[%d]" % i)
                entries.append(_classify(key, read_net_param(net)))
    return entries


def load_param(models_dir, key):
    """A fresh upgraded NetParameter for a net key."""
    from netlib.files import read_net_param, read_solver_param
    rel, _, field = key.partition("#")
    path = os.path.join(models_dir, rel)
    if not field:
        return read_net_param(path)
    solver = read_solver_param(path)
    m = re.match(r"(\w+)(?:\[(\d+)\])?$", field)
    value = getattr(solver, m.group(1))
    return read_net_param(value[int(m.group(2))] if m.group(2) else value)


# -- what the data layers need --------------------------------------------------------------
def _phase_of(layer):
    """'TRAIN'/'TEST' from the layer's include rule, None when it has none."""
    for rule in layer.include:
        if rule.HasField("phase"):
            return PHASES[rule.phase]
    return None


def _num_classes(param, label_top):
    """The num_output of what the label is compared with (the smallest, over
    every layer that consumes the label); 2 when nothing says."""
    producer = {}
    found = []
    for layer in param.layer:
        if label_top in layer.bottom:
            for bottom in layer.bottom:
                src = producer.get(bottom)
                if bottom != label_top and src is not None:
                    n = src.inner_product_param.num_output or src.convolution_param.num_output
                    if n:
                        found.append(int(n))
        for top in layer.top:
            if top not in layer.bottom:  # in-place layers keep the real producer
                producer[top] = layer
    return min(found) if found else 2


def _mean_shape(models_dir, key, mean_file):
    """Shape (C, H, W) of a mean file the models folder holds, else None.

    The net's own folder may ship it (same basename); ImageNet means
    (data/ilsvrc12/imagenet_mean.binaryproto) have the shape of
    ilsvrc12/ilsvrc_2012_mean.npy."""
    from netlib.proto import caffe_pb2
    local = os.path.join(models_dir, os.path.dirname(key.split("#")[0]), os.path.basename(mean_file))
    if os.path.isfile(local):
        blob = caffe_pb2.BlobProto()
        with open(local, "rb") as handle:
            blob.ParseFromString(handle.read())
        dims = list(blob.shape.dim) if len(blob.shape.dim) else [blob.num, blob.channels, blob.height, blob.width]
        return tuple(int(d) for d in dims[-3:])
    if "ilsvrc12" in mean_file or "imagenet_mean" in os.path.basename(mean_file):
        npy = os.path.join(models_dir, "ilsvrc12", "ilsvrc_2012_mean.npy")
        if os.path.isfile(npy):
            return tuple(int(d) for d in numpy.load(npy, mmap_mode="r").shape)
    return None


def item_shape(models_dir, key, layer):
    """(C, H, W) of the items a Data/ImageData layer reads, with how it was found."""
    table = ITEM_SHAPES.get(key)
    if table is not None:
        shape = table.get(_phase_of(layer)) if isinstance(table, dict) else table
        return tuple(shape), "table"
    tp = layer.transform_param
    if tp.mean_file:
        shape = _mean_shape(models_dir, key, tp.mean_file)
        if shape is not None:
            return shape, "mean file"
    channels = 3
    if layer.type == "ImageData" and not layer.image_data_param.is_color:
        channels = 1
    if layer.type == "ImageData" and layer.image_data_param.new_height:
        p = layer.image_data_param
        return (channels, int(p.new_height), int(p.new_width)), "new_height/new_width"
    if tp.crop_size >= 224:
        return (channels, 256, 256), "ImageNet crop from 256x256 images"
    raise KeyError("cannot infer the item shape of layer %r of %s: add it to ITEM_SHAPES" % (layer.name, key))


# -- writing sources ------------------------------------------------------------------------
def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_mean(path, shape, rng):
    from netlib.files import write_binary_proto
    from netlib.proto import caffe_pb2
    blob = caffe_pb2.BlobProto()
    blob.num, (blob.channels, blob.height, blob.width) = 1, shape  # legacy 4-D, as compute_image_mean
    blob.data.extend(rng.uniform(90.0, 130.0, size=int(numpy.prod(shape))).astype(numpy.float32).tolist())
    write_binary_proto(path, blob)


def _write_image(path, hwc, rng):
    from PIL import Image
    if hwc[2] == 1:
        Image.fromarray(rng.integers(0, 256, hwc[:2], dtype=numpy.uint8), "L").save(path, "PNG")
    else:
        Image.fromarray(rng.integers(0, 256, hwc, dtype=numpy.uint8), "RGB").save(path, "JPEG", quality=90)


def _write_db(path, backend, shape, num_classes, rng):
    from netlib.data.datum import array_to_datum
    from netlib.data.db import create_db
    writer = create_db(path, backend)
    for i in range(NUM_ITEMS):
        datum = array_to_datum(rng.integers(0, 256, shape, dtype=numpy.uint8), int(rng.integers(num_classes)))
        writer.put("%08d" % i, datum.SerializeToString())
    writer.close()


def _write_image_list(folder, shape, num_classes, rng):
    os.makedirs(folder)
    c, h, w = shape
    lines = []
    for i in range(NUM_ITEMS):
        path = os.path.join(folder, "img%d.%s" % (i, "png" if c == 1 else "jpg"))
        _write_image(path, (h, w, c), rng)
        lines.append("%s %d\n" % (path, rng.integers(num_classes)))
    source = os.path.join(folder, "list.txt")
    with open(source, "w") as handle:
        handle.writelines(lines)
    return source


def _write_window_file(folder, num_classes, rng, size=(96, 128)):
    """Two images, each with 3 foreground (overlap >= 0.5, class > 0) and 3
    background (overlap < 0.5, class 0) windows inside the image."""
    os.makedirs(folder)
    h, w = size
    out = []
    for i in range(2):
        path = os.path.join(folder, "win%d.jpg" % i)
        _write_image(path, (h, w, 3), rng)
        windows = []
        for fg in (True, True, True, False, False, False):
            x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x2, y2 = int(rng.integers(x1 + 8, w)), int(rng.integers(y1 + 8, h))
            label = int(rng.integers(1, num_classes)) if fg else 0
            overlap = rng.uniform(0.5, 1.0) if fg else rng.uniform(0.0, 0.45)
            windows.append("%d %.3f %d %d %d %d\n" % (label, overlap, x1, y1, x2, y2))
        out.append("# %d\n%s\n3\n%d\n%d\n%d\n" % (i, path, h, w, len(windows)) + "".join(windows))
    source = os.path.join(folder, "windows.txt")
    with open(source, "w") as handle:
        handle.writelines(out)
    return source


def _write_hdf5(folder, tops, rows, num_classes, rng):
    import h5py
    os.makedirs(folder)
    files = []
    for k in range(2):
        path = os.path.join(folder, "part%d.h5" % k)
        with h5py.File(path, "w") as f:
            for top in tops:
                row = tuple(rows[top])
                if top == "label" or not row:
                    values = rng.integers(0, num_classes, (NUM_ITEMS,) + row).astype(numpy.float32)
                else:
                    values = rng.standard_normal((NUM_ITEMS,) + row).astype(numpy.float32)
                f.create_dataset(top, data=values)
        files.append(path)
    source = os.path.join(folder, "list.txt")
    with open(source, "w") as handle:
        handle.write("".join(p + "\n" for p in files))
    return source


def make_sources(param, key, models_dir, out_dir, seed=0):
    """Write a source for every data layer of ``param`` (upgraded, unfiltered)
    under ``out_dir``, point the layers at them, and return the manifest: one
    ``{"index", "name", "type", "set": {dotted field: value}, "item": shape}``
    per rewritten layer (``index`` counts all layers of the net)."""
    rng = numpy.random.default_rng(seed)
    manifest = []
    for index, layer in enumerate(param.layer):
        if layer.type not in SOURCED_TYPES:
            continue
        where = os.path.join(out_dir, "%02d_%s" % (index, _safe(layer.name)))
        label_top = layer.top[1] if len(layer.top) > 1 else None
        num_classes = _num_classes(param, label_top) if label_top else 2
        fields = {}
        item = None
        if layer.type == "Data":
            item, _ = item_shape(models_dir, key, layer)
            backend = "lmdb" if layer.data_param.backend == 1 else "leveldb"
            _write_db(where + "_" + backend, backend, item, num_classes, rng)
            fields["data_param.source"] = where + "_" + backend
        elif layer.type == "ImageData":
            item, how = item_shape(models_dir, key, layer)
            size = item
            if how == "new_height/new_width":  # any size will do: the layer resizes
                size = (item[0], 24, 20)
            fields["image_data_param.source"] = _write_image_list(where, size, num_classes, rng)
            fields["image_data_param.root_folder"] = ""
        elif layer.type == "WindowData":
            fields["window_data_param.source"] = _write_window_file(where, num_classes, rng)
            fields["window_data_param.root_folder"] = ""
        elif layer.type == "HDF5Data":
            rows = ITEM_SHAPES.get(key)
            if not isinstance(rows, dict) or not set(layer.top) <= set(rows):
                raise KeyError("no HDF5 row shapes for %s in ITEM_SHAPES" % key)
            fields["hdf5_data_param.source"] = _write_hdf5(where, list(layer.top), rows, num_classes, rng)
        tp = layer.transform_param
        if tp.mean_file:
            shape = item
            if layer.type == "WindowData":
                shape = _mean_shape(models_dir, key, tp.mean_file)
                if shape is None:
                    raise KeyError("cannot infer the mean shape of layer %r of %s" % (layer.name, key))
            _write_mean(where + "_mean.binaryproto", shape, rng)
            fields["transform_param.mean_file"] = where + "_mean.binaryproto"
        apply_fields(layer, fields)
        entry = {"index": index, "name": layer.name, "type": layer.type, "set": fields,
                 "item": list(item) if item else None}
        if layer.type in ("ImageData", "WindowData"):
            entry["top_shapes"] = image_top_shapes(layer, item)
        manifest.append(entry)
    return manifest


def image_top_shapes(layer, item):
    """The top shapes an ImageData/WindowData layer gives, from its parameters
    (and the item shape of ImageData): data (N, C, h, w), then label (N,)."""
    bs = int(getattr(layer, PARAM_FIELDS[layer.type]).batch_size)
    crop = int(layer.transform_param.crop_size)
    if layer.type == "WindowData":
        data = [bs, 3, crop, crop]
    else:
        c, h, w = item
        data = [bs, c, crop or h, crop or w]
    return [data, [bs]][:len(layer.top)]


def replace_with_dummy_data(param, manifest):
    """Put DummyData layers with the same tops and shapes in place of the
    ImageData/WindowData layers (for a Caffe built without OpenCV); returns
    their names."""
    replaced = []
    for entry in manifest:
        if "top_shapes" not in entry:
            continue
        layer = param.layer[entry["index"]]
        if (layer.name, layer.type) != (entry["name"], entry["type"]):
            raise ValueError("layer %d is %s (%s), the manifest says %s (%s)"
                             % (entry["index"], layer.name, layer.type, entry["name"], entry["type"]))
        layer.type = "DummyData"
        for field in ("image_data_param", "window_data_param", "transform_param"):
            layer.ClearField(field)
        for shape in entry["top_shapes"]:
            layer.dummy_data_param.shape.add().dim.extend(shape)
        replaced.append(layer.name)
    return replaced


def apply_fields(layer, fields):
    """Set dotted ``{"data_param.source": value}`` fields on a LayerParameter."""
    for dotted, value in fields.items():
        msg = layer
        *parents, last = dotted.split(".")
        for name in parents:
            msg = getattr(msg, name)
        setattr(msg, last, value)


def apply_manifest(param, manifest):
    """Apply a :func:`make_sources` manifest to another copy of the same net
    (e.g. the one reference Caffe upgraded itself); checks names and types."""
    for entry in manifest:
        layer = param.layer[entry["index"]]
        if (layer.name, layer.type) != (entry["name"], entry["type"]):
            raise ValueError("layer %d is %s (%s), the manifest says %s (%s)"
                             % (entry["index"], layer.name, layer.type, entry["name"], entry["type"]))
        apply_fields(layer, entry["set"])


PARAM_FIELDS = {"Data": "data_param", "ImageData": "image_data_param", "WindowData": "window_data_param",
                "HDF5Data": "hdf5_data_param"}


def set_batch_size(param, batch_size):
    """Set every data layer's batch_size (Data, ImageData, WindowData, HDF5Data)."""
    for layer in param.layer:
        if layer.type in PARAM_FIELDS:
            getattr(layer, PARAM_FIELDS[layer.type]).batch_size = batch_size


def deterministic_data_layers(param, phase):
    """Names of the Data/HDF5Data layers of ``param`` (a NetParameter of any
    proto module) whose first batch in ``phase`` involves no random choice:
    Data without mirror and without a random (TRAIN) crop, HDF5Data without
    shuffle.  A name shared by several layers counts only if all of them are."""
    verdict = {}
    for layer in param.layer:
        phases = {PHASES[r.phase] for r in layer.include if r.HasField("phase")}
        if phases and phase not in phases:
            continue
        if layer.type == "Data":
            tp = layer.transform_param
            ok = not tp.mirror and (phase == "TEST" or not tp.crop_size)
        elif layer.type == "HDF5Data":
            ok = not layer.hdf5_data_param.shuffle
        else:
            continue
        verdict[layer.name] = verdict.get(layer.name, True) and ok
    return sorted(n for n, ok in verdict.items() if ok)


def data_summary(blob_data):
    """Sum, sum of squares (float64) and the first 8 values of a data top."""
    flat = numpy.asarray(blob_data, dtype=numpy.float64).ravel()
    return {"sum": float(flat.sum()), "sumsq": float((flat * flat).sum()), "head": flat[:8].tolist()}
