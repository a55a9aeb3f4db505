"""Small datasets shipped with netlib, and writers for the HDF5 files the
example models read.

* :func:`load_digits` -- the UCI optical handwritten digits (1797 images of
  8x8 pixels valued 0..16, labels 0..9; E. Alpaydin and C. Kaynak, CC BY 4.0;
  see ``netlib/data/README.md``).
* :func:`write_digits_hdf5` -- the train/test split ``models/digits`` uses.
* :func:`write_hdf5_dataset` -- any (data, label) arrays as an HDF5 file for
  the ``HDF5Data`` layer, plus the text file listing it.
"""
import gzip
import os

import numpy

from .errors import ConfigError, NetlibFileNotFoundError
from .files import atomic_write

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DIGITS_CSV = os.path.join(DATA_DIR, "digits.csv.gz")

#: Scale that maps the digits' 0..16 counts to [0, 1] (exact in float32).
DIGITS_SCALE = 0.0625
#: Number of images the default split holds out for testing (3 batches of 120).
DIGITS_TEST_COUNT = 360
#: Seed of the fixed permutation that makes the split.
DIGITS_SPLIT_SEED = 1998


def load_digits():
    """The digits as ``(images, labels)``: uint8 (1797, 8, 8) in 0..16 and
    int64 (1797,) in 0..9, in the file's order."""
    if not os.path.isfile(DIGITS_CSV):
        raise NetlibFileNotFoundError("%s: the bundled digits data is missing (reinstall netlib)" % DIGITS_CSV)
    with gzip.open(DIGITS_CSV, "rt") as handle:
        table = numpy.loadtxt(handle, delimiter=",", dtype=numpy.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ConfigError("%s: expected 65 columns (64 pixels and a label), got shape %s"
                          % (DIGITS_CSV, table.shape))
    images = table[:, :64].reshape(-1, 8, 8).astype(numpy.uint8)
    labels = table[:, 64]
    return images, labels


def write_hdf5_dataset(path, data, label, list_path=None, compression=None):
    """Write ``data`` and ``label`` (float32) to ``path`` and, when
    ``list_path`` is given, a text file naming it for ``hdf5_data_param.source``.

    The list holds the file's path relative to the list's folder, so the pair
    can be moved together (the HDF5Data layer resolves a relative entry
    against the list's folder when it does not exist as given).
    """
    import h5py
    data = numpy.ascontiguousarray(data, dtype=numpy.float32)
    label = numpy.ascontiguousarray(label, dtype=numpy.float32)
    if data.shape[0] != label.shape[0]:
        raise ConfigError("data and label need equal first dimensions, got %s and %s" % (data.shape, label.shape))
    with atomic_write(path, mode=None) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=data, compression=compression)
            f.create_dataset("label", data=label, compression=compression)
    if list_path is not None:
        rel = os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(list_path)))
        with atomic_write(list_path, mode="w") as handle:
            handle.write(rel + "\n")
    return path


def digits_split(test_count=DIGITS_TEST_COUNT, seed=DIGITS_SPLIT_SEED):
    """``(train_images, train_labels, test_images, test_labels)``: a fixed
    random split of the 1797 digits (the same on every machine)."""
    images, labels = load_digits()
    order = numpy.random.Generator(numpy.random.PCG64(seed)).permutation(len(labels))
    test, train = order[:test_count], order[test_count:]
    return images[train], labels[train], images[test], labels[test]


def write_digits_hdf5(out_dir, test_count=DIGITS_TEST_COUNT, seed=DIGITS_SPLIT_SEED):
    """Write ``digits_train.h5`` / ``digits_test.h5`` (``data`` float32
    (N,1,8,8) = pixels * 0.0625, ``label`` float32 (N,)) and the lists
    ``digits_train_h5.txt`` / ``digits_test_h5.txt`` into ``out_dir``.
    Returns the paths of the two lists."""
    tr_x, tr_y, te_x, te_y = digits_split(test_count, seed)
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for name, x, y in (("train", tr_x, tr_y), ("test", te_x, te_y)):
        h5 = os.path.join(out_dir, "digits_%s.h5" % name)
        lst = os.path.join(out_dir, "digits_%s_h5.txt" % name)
        data = x.reshape(-1, 1, 8, 8).astype(numpy.float32) * numpy.float32(DIGITS_SCALE)
        write_hdf5_dataset(h5, data, y, lst, compression="gzip")
        out.append(lst)
    return tuple(out)
