"""Caffe's ``extract_features``: run a trained net and store blobs per item.

Usage (Caffe's positional arguments, in Caffe's order)::

    netlib extract_features PRETRAINED_WEIGHTS MODEL BLOB1[,BLOB2,...] DB1[,DB2,...] \\
        NUM_MINI_BATCHES [lmdb|leveldb|hdf5] [CPU|GPU] [DEVICE_ID]
    tools/extract_features ...                        # from a source checkout

builds ``netlib.Net(MODEL, netlib.TEST, weights=PRETRAINED_WEIGHTS)`` (its
input layers, a Data layer for instance, feed the images), runs
NUM_MINI_BATCHES forward passes and, for every item ``n`` of each named
blob, stores one record in the matching output (blob and output names pair
up in order; the names cannot hold commas):

* ``lmdb`` / ``leveldb``: a new database of Datums, as Caffe writes them:
  key ``%010d`` (the item's running index, ``0000000000``...), ``channels``,
  ``height`` and ``width`` the blob's legacy (Caffe ``channels()``,
  ``height()``, ``width()``) shape, so an (N, C) InnerProduct output gives
  C x 1 x 1, and the item's ``count / num`` values in ``float_data``
  (float32); no label.  A commit every 1000 records.  (A blob of more than 4
  axes, which Caffe's legacy accessors refuse, is stored as
  ``count / num`` x 1 x 1.)
* ``hdf5`` (a netlib extra): DB is the path of a new HDF5 file holding one
  float32 dataset ``data`` of shape (N, *blob.shape[1:]), the items of all
  batches in order.

The database type is a required argument in Caffe's tool; netlib takes
``lmdb`` when it is left out.  ``GPU`` (with ``DEVICE_ID``, default 0) runs
on CuPy.  An existing output is refused (Caffe's ``db::NEW``), and nothing
is left at any output path when extraction fails or is interrupted.

Python API::

    from netlib.tools.extract_features import extract_features
    counts = extract_features("net.caffemodel", "feat.prototxt", ["fc7"], ["fc7_lmdb"], 10, "lmdb")
"""
import logging
import os
import tempfile

import numpy

from ..errors import ConfigError

log = logging.getLogger("netlib")

__all__ = ["extract_features", "main"]

USAGE = """usage: netlib extract_features PRETRAINED_WEIGHTS MODEL BLOB1[,BLOB2,...] DB1[,DB2,...] \
NUM_MINI_BATCHES [lmdb|leveldb|hdf5] [CPU|GPU] [DEVICE_ID]

Run the net MODEL (TEST phase) with the weights PRETRAINED_WEIGHTS for NUM_MINI_BATCHES forward passes
and store every item of each blob BLOBi, one Datum of float_data per item under the key %010d, in a
new database DBi (lmdb, the default, or leveldb), or as the dataset 'data' (N, ...) float32 of a new
HDF5 file DBi (hdf5).  Blob and database names pair up in order and are separated by commas.
"""

DB_TYPES = ("lmdb", "leveldb", "hdf5")


class _HDF5Writer:
    """One HDF5 file with a growing float32 dataset ``data``, written to a
    temporary file beside ``path`` and renamed into place on close()."""

    def __init__(self, path):
        import h5py
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise ConfigError("%s already exists; remove it first (netlib does not overwrite features)"
                              % self.path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".partial",
                                         dir=folder)
        os.close(fd)
        self._file = h5py.File(self._tmp, "w")
        self._data = None
        self.count = 0

    def append(self, items):
        items = numpy.asarray(items, dtype=numpy.float32)
        if self._data is None:
            self._data = self._file.create_dataset("data", shape=(0,) + items.shape[1:],
                                                   maxshape=(None,) + items.shape[1:],
                                                   dtype=numpy.float32, chunks=True)
        elif items.shape[1:] != self._data.shape[1:]:
            raise ConfigError("%s: the blob changed shape from %s to %s between batches; an HDF5 dataset "
                              "needs one item shape" % (self.path, self._data.shape[1:], items.shape[1:]))
        n = self.count
        self._data.resize(n + items.shape[0], axis=0)
        self._data[n:] = items
        self.count += items.shape[0]

    def close(self):
        if self._data is None:
            self._file.create_dataset("data", shape=(0,), dtype=numpy.float32)
        self._file.close()
        if os.path.exists(self.path):
            self.abort()
            raise ConfigError("%s appeared while it was being written; nothing was replaced" % self.path)
        os.replace(self._tmp, self.path)
        self._tmp = None

    def abort(self):
        try:
            self._file.close()
        except Exception:  # pragma: no cover - best effort
            pass
        if self._tmp and os.path.exists(self._tmp):
            os.remove(self._tmp)
        self._tmp = None


def _legacy_item_shape(blob):
    """(num, channels, height, width) of Caffe's legacy accessors, with
    count / num x 1 x 1 per item for blobs of more than 4 axes."""
    shape = tuple(blob.shape)
    if len(shape) > 4:
        num = shape[0]
        return num, (int(numpy.prod(shape[1:])) if num else 0), 1, 1
    padded = shape + (1,) * (4 - len(shape))
    return padded


def _names(value, what):
    names = value.split(",") if isinstance(value, str) else [os.fspath(v) for v in value]
    if not names or any(not n for n in names):
        raise ConfigError("empty %s name in %r" % (what, value))
    return names


def extract_features(weights, model, blob_names, db_names, num_mini_batches, db_type="lmdb",
                     mode="CPU", device_id=0):
    """Caffe's extract_features (see the module docstring).  ``blob_names``
    and ``db_names`` are lists (or comma-separated strings).  Returns
    ``{blob name: number of items written}``."""
    from .. import backend
    from ..net import Net
    from ..proto.caffe_pb2 import TEST
    blob_names = _names(blob_names, "blob")
    db_names = _names(db_names, "dataset")
    if len(blob_names) != len(db_names):
        raise ConfigError("the number of blob names (%d: %s) and dataset names (%d: %s) must be equal"
                          % (len(blob_names), ",".join(blob_names), len(db_names), ",".join(db_names)))
    num_mini_batches = int(num_mini_batches)
    if num_mini_batches < 0:
        raise ConfigError("the number of mini-batches must be >= 0, got %d" % num_mini_batches)
    db_type = str(db_type).lower()
    if db_type not in DB_TYPES:
        raise ConfigError("unknown database type %r: use lmdb, leveldb or hdf5" % (db_type,))
    mode = str(mode).upper()
    saved_xp = backend.default_xp()
    try:
        if mode == "GPU":
            if int(device_id) < 0:
                raise ConfigError("DEVICE_ID must be >= 0, got %d" % int(device_id))
            log.info("Using GPU")
            log.info("Using Device_id=%d", int(device_id))
            backend.set_mode_gpu()
            backend.set_device(int(device_id))
        else:
            log.info("Using CPU")
            backend.set_mode_cpu()
        net = Net(model, TEST, weights=weights)
        for name in blob_names:
            if name not in net.blobs:
                raise ConfigError("Unknown feature blob name %s in the network %s; its blobs are: %s"
                                  % (name, model, ", ".join(net.blobs)))
        return _extract(net, blob_names, db_names, num_mini_batches, db_type)
    finally:
        if saved_xp is numpy:
            backend.set_mode_cpu()
        else:
            backend.set_mode_gpu()


def _extract(net, blob_names, db_names, num_mini_batches, db_type):
    from .. import backend
    from ..data.db import create_db
    from ..proto import caffe_pb2
    from .cli import progress_bar
    writers = []
    try:
        for name in db_names:
            log.info("Opening dataset %s", name)
            writers.append(_HDF5Writer(name) if db_type == "hdf5" else create_db(name, db_type))
        log.info("Extracting Features")
        counts = [0] * len(blob_names)
        datum = caffe_pb2.Datum()
        with progress_bar(num_mini_batches, desc="extract_features") as bar:
            for _ in range(num_mini_batches):
                net.forward()
                for i, name in enumerate(blob_names):
                    blob = net.blobs[name]
                    values = numpy.asarray(backend.to_numpy(blob.data), dtype=numpy.float32)
                    if db_type == "hdf5":
                        items = values.reshape((1,) if values.ndim == 0 else values.shape)
                        writers[i].append(items)
                        before, counts[i] = counts[i], counts[i] + items.shape[0]
                        if before // 1000 != counts[i] // 1000:
                            log.info("Extracted features of %d query images for feature blob %s",
                                     counts[i], name)
                        continue
                    num, channels, height, width = _legacy_item_shape(blob)
                    rows = values.reshape(num, -1) if num else values.reshape(0, 0)
                    datum.channels, datum.height, datum.width = channels, height, width
                    for n in range(num):
                        del datum.float_data[:]
                        datum.float_data.extend(rows[n].tolist())
                        writers[i].put("%010d" % counts[i], datum.SerializeToString())
                        counts[i] += 1
                        if counts[i] % 1000 == 0:
                            writers[i].commit()
                            log.info("Extracted features of %d query images for feature blob %s",
                                     counts[i], name)
                if bar is not None:
                    bar.update(1)
        for i, name in enumerate(blob_names):
            log.info("Extracted features of %d query images for feature blob %s", counts[i], name)
        while writers:
            writers[0].close()
            writers.pop(0)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    log.info("Successfully extracted the features!")
    return dict(zip(blob_names, counts))


def main(argv):
    """``netlib extract_features WEIGHTS MODEL BLOBS DBS NUM_MINI_BATCHES [DB_TYPE] [CPU|GPU] [ID]``."""
    from .cli import UsageError
    argv = list(argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        import sys
        sys.stdout.write(USAGE)
        return 0
    flags = [a for a in argv if a.startswith("-") and not _is_number(a)]
    if flags:
        raise UsageError("extract_features takes no flags, got %s (netlib extract_features --help)"
                         % " ".join(flags))
    if len(argv) < 5:
        raise UsageError("extract_features needs PRETRAINED_WEIGHTS MODEL BLOB1[,BLOB2] DB1[,DB2] "
                         "NUM_MINI_BATCHES [lmdb|leveldb|hdf5] [CPU|GPU] [DEVICE_ID], got %d arguments "
                         "(netlib extract_features --help)" % len(argv))
    weights, model, blobs, dbs, batches = argv[:5]
    rest = argv[5:]
    db_type = "lmdb"
    if rest and rest[0].lower() in DB_TYPES:
        db_type = rest.pop(0).lower()
    elif rest and rest[0].upper() not in ("CPU", "GPU"):
        raise UsageError("unknown database type %r: use lmdb, leveldb or hdf5" % rest[0])
    mode, device_id = "CPU", 0
    if rest:
        mode = rest.pop(0).upper()
        if mode not in ("CPU", "GPU"):
            raise UsageError("expected CPU or GPU after the database type, got %r" % mode)
    if rest:
        if mode != "GPU":
            raise UsageError("a DEVICE_ID only goes with GPU, got %r after CPU" % rest[0])
        try:
            device_id = int(rest.pop(0))
        except ValueError:
            raise UsageError("DEVICE_ID must be an integer") from None
    if rest:
        raise UsageError("unexpected arguments: %s" % " ".join(rest))
    try:
        batches = int(batches)
    except ValueError:
        raise UsageError("NUM_MINI_BATCHES must be an integer, got %r" % batches) from None
    if batches < 0:
        raise UsageError("NUM_MINI_BATCHES must be >= 0, got %d" % batches)
    if device_id < 0:
        raise UsageError("DEVICE_ID must be >= 0, got %d" % device_id)
    extract_features(weights, model, blobs, dbs, batches, db_type, mode, device_id)
    return 0


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False
