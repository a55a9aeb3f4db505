"""MNIST: read the original IDX files and write the files Caffe's examples read.

``netlib data mnist [--from DIR] [--out DIR] [--backend lmdb|leveldb|hdf5]``
(see :func:`convert`) reads ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` from DIR, gzipped (``.gz``) or plain (the
``train-images.idx3-ubyte`` spelling also works); without ``--from`` it
downloads the gzipped files into the output folder from the usual public
mirrors and checks their SHA-256.  It then writes, by backend:

* ``lmdb`` (the default) or ``leveldb``: Caffe's
  ``examples/mnist/convert_mnist_data`` layout, in the folders
  ``mnist_train_<backend>`` and ``mnist_test_<backend>`` that Caffe's
  ``create_mnist.sh`` makes: one Datum per image under the key ``%08d``
  (``00000000``, ``00000001``...), ``channels: 1``, ``height: 28``,
  ``width: 28``, the 784 pixel bytes as they are in ``data`` and the digit in
  ``label``.  These are the databases Caffe's own
  ``examples/mnist/lenet_train_test.prototxt`` reads (with
  ``transform_param { scale: 0.00390625 }``).  An existing database is
  refused, as Caffe's ``db::NEW`` does.
* ``hdf5``: ``mnist_train.h5`` and ``mnist_test.h5`` with ``data`` float32
  (N, 1, 28, 28) = pixel * 0.00390625 (the scale Caffe's LeNet applies in
  its transform_param) and ``label`` float32 (N,), and the lists
  ``mnist_train_h5.txt`` / ``mnist_test_h5.txt`` for
  ``hdf5_data_param.source`` (what ``models/lenet`` reads).
"""
import gzip
import hashlib
import logging
import math
import os
import shutil
import tempfile
import urllib.request
import zlib

import numpy

from .. import blob as _blob
from ..errors import ConfigError, NetlibError, NetlibFileNotFoundError, ParseError

log = logging.getLogger("netlib")

#: LeNet's input scale (1/256), exact in float32.
SCALE = 0.00390625

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of the original gzipped files.
SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

_IDX_TYPES = {0x08: numpy.uint8, 0x09: numpy.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DownloadError(NetlibError, OSError):
    """No mirror delivered a file with the expected checksum."""


def read_idx(path):
    """An IDX file (gzipped or plain) as a NumPy array of its stored shape.

    The header is read first and the size it declares checked against the
    blob limits (Caffe's INT_MAX elements, ``NETLIB_MAX_BLOB_BYTES``) before
    the data is read, so a corrupt or hostile header cannot make it allocate
    what the file does not hold.  Errors (ParseError) name the file.
    """
    if not os.path.isfile(path):
        raise NetlibFileNotFoundError("%s: no such IDX file" % path)
    try:
        with open(path, "rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise ParseError("not an IDX file (bad magic number %s)" % head.hex(), path)
            ndim = head[3]
            shape = handle.read(4 * ndim)
            if len(shape) < 4 * ndim:
                raise ParseError("truncated IDX header", path)
            dims = tuple(int(d) for d in numpy.frombuffer(shape, dtype=">u4"))
            dtype = numpy.dtype(_IDX_TYPES[head[2]])
            count = math.prod(dims)
            cap = _blob.MAX_BLOB_BYTES
            limit = _blob.INT_MAX if cap is None else min(_blob.INT_MAX, cap // dtype.itemsize)
            if count > limit:
                raise ParseError("IDX header declares shape %s (%d values), more than the limit of %d"
                                 % (dims, count, limit), path)
            need = count * dtype.itemsize
            if not gzipped and os.path.getsize(path) != 4 + 4 * ndim + need:
                raise ParseError("IDX file holds %d bytes, its header %s needs %d (truncated?)"
                                 % (os.path.getsize(path), dims, 4 + 4 * ndim + need), path)
            raw = bytearray()
            while len(raw) <= need:          # in chunks: memory grows with the data really there
                chunk = handle.read(min(1 << 24, need + 1 - len(raw)))
                if not chunk:
                    break
                raw += chunk
    except (OSError, EOFError, zlib.error) as exc:
        raise ParseError("cannot read (truncated or corrupt gzip?): %s" % exc, path) from None
    if len(raw) != count * dtype.itemsize:
        raise ParseError("IDX data holds %s bytes, its header %s needs %d (truncated?)"
                         % (len(raw) if len(raw) <= count * dtype.itemsize else "more than",
                            dims, count * dtype.itemsize), path)
    return numpy.frombuffer(raw, dtype=dtype, count=count).reshape(dims)


def find_file(folder, base):
    """The path of ``base`` in ``folder``: ``base.gz``, ``base``, or the
    ``train-images.idx3-ubyte`` spelling of either."""
    alt = base.replace("-idx", ".idx")
    for name in (base + ".gz", base, alt + ".gz", alt):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise NetlibFileNotFoundError("%s: no %s(.gz) in this folder" % (folder, base))


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest, mirrors=MIRRORS, timeout=60):
    """Download the four gzipped files into ``dest`` (skipping files already
    there with the right checksum); every file is checked against SHA256."""
    os.makedirs(dest, exist_ok=True)
    for name, digest in SHA256.items():
        target = os.path.join(dest, name)
        if os.path.isfile(target) and sha256_of(target) == digest:
            continue
        errors = []
        for mirror in mirrors:
            url = mirror + name
            log.info("Downloading %s", url)
            fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".part", dir=dest)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, out)
                got = sha256_of(tmp)
                if got != digest:
                    errors.append("%s: checksum %s, expected %s" % (url, got, digest))
                    continue
                os.replace(tmp, target)
                break
            except OSError as exc:
                errors.append("%s: %s" % (url, exc))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise DownloadError("could not download %s (%s); fetch the four MNIST files yourself and run "
                                "'netlib data mnist --from DIR'" % (name, "; ".join(errors)))
    return dest


def load(folder):
    """``{split: (images uint8 (N,28,28), labels uint8 (N,))}`` for 'train' and 'test'."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        images = read_idx(find_file(folder, FILES[prefix + "_images"]))
        labels = read_idx(find_file(folder, FILES[prefix + "_labels"]))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ConfigError("%s: MNIST %s images %s and labels %s do not match"
                              % (folder, split, images.shape, labels.shape))
        out[split] = (images, labels)
    return out


BACKENDS = ("lmdb", "leveldb", "hdf5")


def convert(src=None, out="data/mnist", backend="lmdb"):
    """Convert the MNIST IDX files in ``src`` (None: download them into
    ``out``) for ``backend`` (see the module docstring).

    Returns ``(train, test)``: the two database folders
    ``out/mnist_{train,test}_<backend>`` for ``lmdb``/``leveldb``, the two
    HDF5 list files ``out/mnist_{train,test}_h5.txt`` for ``hdf5``.
    """
    backend = str(backend).lower()
    if backend not in BACKENDS:
        raise ConfigError("unknown MNIST output backend %r: use lmdb, leveldb or hdf5" % (backend,))
    if backend != "hdf5":
        targets = [os.path.join(out, "mnist_%s_%s" % (split, backend)) for split in ("train", "test")]
        for target in targets:  # refuse before any work, as Caffe's db::NEW would
            if os.path.exists(target):
                raise ConfigError("%s already exists; remove it first (Caffe refuses to overwrite a "
                                  "database)" % target)
    if src is None:
        src = download(out)
    elif not os.path.isdir(src):
        raise NetlibFileNotFoundError("%s: no such folder (--from)" % src)
    splits = load(src)
    os.makedirs(out, exist_ok=True)
    if backend == "hdf5":
        return _write_hdf5(splits, out)
    return tuple(write_db(splits[split][0], splits[split][1], target, backend)
                 for split, target in zip(("train", "test"), targets))


def write_db(images, labels, db_path, backend="lmdb"):
    """Caffe's convert_mnist_data: ``images`` uint8 (N, rows, cols) and
    ``labels`` (N,) into a new LMDB/LevelDB at ``db_path`` (keys ``%08d``,
    raw 1 x rows x cols Datums, a commit every 1000 records).  Returns
    ``db_path``; an interrupted conversion leaves no database there."""
    from ..data.db import create_db
    from ..proto import caffe_pb2
    images = numpy.ascontiguousarray(images, dtype=numpy.uint8)
    labels = numpy.asarray(labels)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ConfigError("MNIST images %s and labels %s do not match" % (images.shape, labels.shape))
    num, rows, cols = images.shape
    log.info("A total of %d items.", num)
    log.info("Rows: %d Cols: %d", rows, cols)
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = 1, rows, cols
    with create_db(db_path, backend) as writer:
        for item_id in range(num):
            datum.data = images[item_id].tobytes()
            datum.label = int(labels[item_id])
            writer.put("%08d" % item_id, datum.SerializeToString())
            if (item_id + 1) % 1000 == 0:
                writer.commit()
    log.info("Processed %d files.", num)
    log.info("Wrote %d images to %s", num, db_path)
    return db_path


def _write_hdf5(splits, out):
    from ..datasets import write_hdf5_dataset
    lists = []
    for split in ("train", "test"):
        images, labels = splits[split]
        data = images.reshape(images.shape[0], 1, images.shape[1], images.shape[2]).astype(numpy.float32)
        data *= numpy.float32(SCALE)
        h5 = os.path.join(out, "mnist_%s.h5" % split)
        lst = os.path.join(out, "mnist_%s_h5.txt" % split)
        write_hdf5_dataset(h5, data, labels, lst)
        log.info("Wrote %d %s images to %s", images.shape[0], split, h5)
        lists.append(lst)
    return tuple(lists)
