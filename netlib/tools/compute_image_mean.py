"""Caffe's ``compute_image_mean``: the per-pixel mean of a database of Datums.

Usage::

    netlib compute_image_mean [--backend lmdb|leveldb] INPUT_DB [OUTPUT_FILE]
    tools/compute_image_mean ...                      # from a source checkout

reads every record of INPUT_DB (LMDB by default, as Caffe's tool; records are
taken in key order, encoded ones are decoded "native", i.e. as stored) and,
when OUTPUT_FILE is given, writes the mean as a ``BlobProto`` with the legacy
``num: 1``, ``channels``, ``height``, ``width`` fields and the values in
``data`` (the mean file ``transform_param { mean_file: ... }`` reads).  The
file is written atomically.  It then logs the mean of each channel as Caffe
does (``mean_value channel [0]: 33.3184``).

The arithmetic is Caffe's, so the file equals Caffe's bit for bit: the sum is
a float32 array, each record added in turn (record order, one float32
rounding per addition), and then divided by the record count in float32.
For uint8 data with fewer than 65793 records every partial sum is an exact
integer, so the mean is the correctly rounded float32 of the exact mean.

Python API::

    from netlib.tools.compute_image_mean import compute_image_mean
    blob = compute_image_mean("examples/cifar10/cifar10_train_lmdb", "lmdb")  # a caffe_pb2.BlobProto
    mean = numpy.array(blob.data, numpy.float32).reshape(blob.channels, blob.height, blob.width)
"""
import logging

import numpy

from ..data.datum import DatumError, datum_to_array, parse_datum
from ..data.db import DatabaseError, backend_name, open_db
from ..proto import caffe_pb2

log = logging.getLogger("netlib")

__all__ = ["compute_image_mean", "mean_array", "channel_means", "main"]

USAGE = """usage: netlib compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]

Compute the mean image of a set of images given by a leveldb/lmdb database of Datums and write it
to OUTPUT_FILE as a BlobProto (the mean_file of a transform_param).

  --backend lmdb|leveldb   the backend of INPUT_DB (default lmdb)
"""


def _where(db, key):
    return "%s, key %r" % (db.describe(), key.decode("utf-8", "replace") if isinstance(key, bytes) else key)


def compute_image_mean(db_path, backend="lmdb", output_file=None):
    """The mean of the records of the database ``db_path`` as a BlobProto
    (num 1, channels, height, width, float data), computed as Caffe's tool
    does (see the module docstring); also written to ``output_file`` when
    given.  Logs Caffe's lines, including the per-channel means."""
    backend = backend_name(backend)
    with open_db(db_path, backend) as db:
        if not len(db):
            raise DatabaseError("%s is empty: there is no image to average" % db.describe())
        first_key = db.keys[0]
        first = parse_datum(db.get(first_key), _where(db, first_key))
        if first.encoded:
            log.info("Decoding Datum")
        channels, height, width = datum_to_array(first, _where(db, first_key), "native").shape
        data_size = channels * height * width
        total = numpy.zeros(data_size, dtype=numpy.float32)
        log.info("Starting iteration")
        count = 0
        from .cli import progress_bar
        with progress_bar(len(db), desc="compute_image_mean") as bar:
            for key, value in db:
                where = _where(db, key)
                values = datum_to_array(parse_datum(value, where), where, "native")
                if values.size != data_size:
                    raise DatumError("Incorrect data field size %d: %s holds %d values but the first record "
                                     "is %dx%dx%d = %d" % (values.size, where, values.size, channels, height,
                                                           width, data_size))
                # float32 += uint8 (or float32): one float32 rounding per addition, as Caffe's
                # sum_blob.set_data(i, sum_blob.data(i) + value).
                numpy.add(total, values.reshape(-1), out=total)
                count += 1
                if count % 10000 == 0:
                    log.info("Processed %d files.", count)
                if bar is not None:
                    bar.update(1)
    if count % 10000 != 0:
        log.info("Processed %d files.", count)
    mean = total / numpy.float32(count)  # float32 / float32, as Caffe's float / int
    blob = caffe_pb2.BlobProto()
    blob.num, blob.channels, blob.height, blob.width = 1, channels, height, width
    blob.data.extend(mean.tolist())
    if output_file:
        from ..files import write_binary_proto
        log.info("Write to %s", output_file)
        write_binary_proto(output_file, blob)
    log.info("Number of channels: %d", channels)
    for c, value in enumerate(channel_means(blob)):
        log.info("mean_value channel [%d]: %s", c, "%g" % value)
    return blob


def mean_array(blob):
    """The (channels, height, width) float32 array of a mean BlobProto."""
    return numpy.asarray(blob.data, dtype=numpy.float32).reshape(blob.channels, blob.height, blob.width)


def channel_means(blob):
    """Caffe's logged per-channel means: a float32 running sum over the
    channel's pixels in order, divided by the pixel count in float32."""
    mean = mean_array(blob)
    dim = blob.height * blob.width
    out = []
    for c in range(blob.channels):
        running = numpy.cumsum(mean[c].reshape(-1), dtype=numpy.float32)  # sequential float32 sum
        out.append(float(running[-1] / numpy.float32(dim)) if dim else float("nan"))
    return out


def main(argv):
    """``netlib compute_image_mean [--backend lmdb|leveldb] INPUT_DB [OUTPUT_FILE]``."""
    from .cli import UsageError, backend_flag, parse_tool_args, tool_parser
    parser = tool_parser("compute_image_mean", USAGE)
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("paths", nargs="*")
    args = parse_tool_args(parser, argv)
    if args is None:
        return 0
    if not 1 <= len(args.paths) <= 2:
        raise UsageError("compute_image_mean takes INPUT_DB [OUTPUT_FILE], got %d arguments "
                         "(netlib compute_image_mean --help)" % len(args.paths))
    backend = backend_flag(args.backend)
    compute_image_mean(args.paths[0], backend, args.paths[1] if len(args.paths) > 1 else None)
    return 0
