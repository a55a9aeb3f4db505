"""CIFAR-10: the binary batches into LMDB/LevelDB, as Caffe's convert_cifar_data.

``netlib data cifar10 --from DIR [--out DIR] [--backend lmdb|leveldb]`` (see
:func:`convert`) reads the *binary version* of CIFAR-10
(``cifar-10-binary.tar.gz``, folder ``cifar-10-batches-bin``):
``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``.  Each
file is a sequence of 3073-byte records: one label byte (0-9), then the 32x32
image as three planes of 1024 bytes, red, then green, then blue, each plane
row by row.

It writes ``OUT/cifar10_train_<backend>`` (the five training batches in
order) and ``OUT/cifar10_test_<backend>``, the names Caffe's
``examples/cifar10/create_cifar10.sh`` uses, with Caffe's record layout: one
Datum per image under the key ``%05d`` (the running index, ``00000`` to
``49999`` for the training set), ``channels: 3``, ``height: 32``,
``width: 32``, ``label``, and the 3072 pixel bytes exactly as they are in the
file.  Note that Caffe keeps CIFAR's plane order, so channel 0 is **red**
(not blue, as in databases made from images by ``convert_imageset``); the
CIFAR-10 models and mean files made from these databases expect that.

The record count of each batch is derived from its size (10000 records,
30730000 bytes, in the real files), so small batch files work too; a file
whose size is not a multiple of 3073 bytes is refused before anything is
written.  An existing database is refused, as Caffe's ``db::NEW`` does, and
an interrupted conversion leaves no database behind.
"""
import logging
import os

from ..errors import ConfigError, NetlibFileNotFoundError

log = logging.getLogger("netlib")

SIZE = 32
IMAGE_BYTES = 3 * SIZE * SIZE  # 3072
RECORD_BYTES = 1 + IMAGE_BYTES  # 3073
TRAIN_BATCHES = tuple("data_batch_%d.bin" % i for i in range(1, 6))
TEST_BATCH = "test_batch.bin"


def batch_records(path):
    """The number of records in the batch file ``path`` (from its size)."""
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.splitext(path)[0]):
            hint = (" (%s without .bin is the Python version of CIFAR-10; use the binary version, "
                    "cifar-10-binary.tar.gz)" % os.path.splitext(path)[0])
        raise NetlibFileNotFoundError("%s: no such CIFAR-10 batch file%s" % (path, hint))
    size = os.path.getsize(path)
    if size == 0 or size % RECORD_BYTES:
        raise ConfigError("%s holds %d bytes, not a whole number of CIFAR-10 records (1 label byte + %d "
                          "pixel bytes = %d bytes each; the real batches are 10000 records, 30730000 bytes)"
                          % (path, size, IMAGE_BYTES, RECORD_BYTES))
    return size // RECORD_BYTES


def _write(batches, db_path, backend):
    from ..data.db import create_db
    from ..proto import caffe_pb2
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = 3, SIZE, SIZE
    index = 0
    with create_db(db_path, backend) as writer:
        for name, path, count in batches:
            log.info("%s: %d images", name, count)
            with open(path, "rb") as handle:
                for _ in range(count):
                    record = handle.read(RECORD_BYTES)
                    if len(record) != RECORD_BYTES:  # the file shrank while it was read
                        raise ConfigError("%s: truncated record %d" % (path, index))
                    datum.label = record[0]
                    datum.data = record[1:]
                    writer.put("%05d" % index, datum.SerializeToString())
                    index += 1
            writer.commit()
    return index


def convert(src, out="data/cifar10", backend="lmdb"):
    """Convert the CIFAR-10 binary batches in ``src`` into
    ``out/cifar10_{train,test}_<backend>`` (see the module docstring);
    returns the two database paths ``(train, test)``."""
    from ..data.db import backend_name
    if str(backend).lower() not in ("lmdb", "leveldb"):
        raise ConfigError("unknown CIFAR-10 output backend %r: use lmdb or leveldb" % (backend,))
    backend = backend_name(backend)
    if not src or not os.path.isdir(src):
        raise NetlibFileNotFoundError("%s: no such folder (--from: the folder of the CIFAR-10 binary "
                                      "batches, cifar-10-batches-bin)" % src)
    train_files = [(name, os.path.join(src, name)) for name in TRAIN_BATCHES]
    test_files = [(TEST_BATCH, os.path.join(src, TEST_BATCH))]
    # Check every input and output before writing anything.
    train = [(name, path, batch_records(path)) for name, path in train_files]
    test = [(name, path, batch_records(path)) for name, path in test_files]
    train_db = os.path.join(out, "cifar10_train_%s" % backend)
    test_db = os.path.join(out, "cifar10_test_%s" % backend)
    for target in (train_db, test_db):
        if os.path.exists(target):
            raise ConfigError("%s already exists; remove it first (Caffe refuses to overwrite a database)"
                              % target)
    os.makedirs(out, exist_ok=True)
    log.info("Writing Training data")
    n_train = _write(train, train_db, backend)
    log.info("Wrote %d training images to %s", n_train, train_db)
    log.info("Writing Testing data")
    n_test = _write(test, test_db, backend)
    log.info("Wrote %d test images to %s", n_test, test_db)
    return train_db, test_db
