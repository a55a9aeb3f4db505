"""The Data and ImageData layers: Caffe's databases of Datums and image lists.

Both prefetch (see :mod:`netlib.data.base`) and transform their items with
``transform_param`` (:mod:`netlib.data.transformer`).  Tops: data
(batch_size, C, H, W) in the net's dtype and, when a second top is named,
label (batch_size,).
"""
import logging
import os
import threading
import weakref

import numpy

from ..errors import ConfigError, NetlibFileNotFoundError, ShapeError
from .. import forward_mode
from .. import second_order
from ..layer import register_layer
from .base import PrefetchingDataLayer
from .datum import datum_shape, datum_to_array, parse_datum, raw_datum
from .db import DatabaseError, backend_name, open_db
from ..parallel import check_enough_items
from . import image as _image

log = logging.getLogger("netlib")


def _crossed_end(start, batch_size, n):
    """Whether reading items start .. start + batch_size - 1 (modulo n)
    passes the end of the n records and restarts at the first."""
    return (start + batch_size - 1) // n - (max(start, 1) - 1) // n > 0


@register_layer("Data")
class DataLayer(PrefetchingDataLayer):
    """Reads Datum records from an LMDB or LevelDB database (``data_param``).

    * ``source``, ``backend`` (LEVELDB, Caffe's default, or LMDB),
      ``batch_size``, ``prefetch`` (batches prepared ahead, default 4);
    * records are read in key order, wrapping around at the end as Caffe's
      cursor does ("Restarting data prefetching from start.");
    * raw records (uint8 ``data`` or ``float_data``) and encoded ones
      (JPEG/PNG, decoded as OpenCV would: natively, or in colour/gray with
      ``transform_param.force_color``/``force_gray``;
      ``data_param.force_encoded_color`` also forces colour);
    * the top shape comes from the first record (and each batch takes the
      shape of its first record, so batch_size 1 allows varying sizes);
    * ``rand_skip``: skip a uniform random number in [0, rand_skip) of
      records at the start (as Caffe's older DataReader; Caffe 1.0 ignores it).

    The databases are opened read-only and never modified
    (:mod:`netlib.data.db`).
    """

    def needs_rand(self):
        return super().needs_rand() or self.layer_param.data_param.rand_skip > 0

    def data_setup(self, top):
        p = self.layer_param.data_param
        self.batch_size = int(p.batch_size)
        backend = backend_name(int(p.backend))
        self.db = None
        self.open_source()
        log.info("Opened %s %s", backend, p.source)
        if len(self.db) == 0:
            self.fail("the %s database %s is empty" % (backend, p.source), error=DatabaseError)
        check_enough_items(len(self.db), "the %s database %s" % (backend, p.source), self.describe())
        self.mode = "color" if p.force_encoded_color else self.transformer.decode_mode
        self.state_loaded()
        first_index = (self.skip + self.shard_rank) % len(self.db)
        first = self._datum(first_index)
        shape = self.transformer.output_shape(datum_shape(first, self._where(first_index), self.mode))
        top[0].reshape((self.batch_size,) + tuple(shape))
        log.info("output data size: %s", ",".join(str(d) for d in top[0].shape))

    def open_source(self):
        if self.db is None:
            p = self.layer_param.data_param
            try:
                self.db = open_db(p.source, backend_name(int(p.backend)))
            except (NetlibFileNotFoundError, DatabaseError, ConfigError) as exc:
                raise type(exc)("%s: %s" % (self.describe(), exc)) from None
            self._db_finalizer = weakref.finalize(self, self.db.close)

    def close_source(self):
        if self.db is not None:
            self._db_finalizer()
            self.db = None

    def state_loaded(self):
        rand_skip = int(self.layer_param.data_param.rand_skip)
        self.skip = int(self.batch_rng(0, stream=7).integers(rand_skip)) if rand_skip else 0
        if self.skip:
            log.info("Skipping first %d data points.", self.skip)

    def _where(self, index):
        return "record %r of %s" % (self.db.keys[index].decode("utf-8", "replace"), self.db.describe())

    def _datum(self, index):
        return parse_datum(self.db.value(index), lambda: self._where(index))

    def load_batch(self, b, rng):
        n, bs = len(self.db), self.batch_size
        rank, count = self.shard_rank, self.shard_count
        start = self.skip + b * bs * count        # read positions of this batch, all ranks together
        if _crossed_end(start, bs * count, n):
            log.info("Restarting data prefetching from start.")
        index = (start + numpy.arange(bs) * count + rank) % n   # this rank's: p % count == rank
        values = [self.db.value_view(i) for i in index]  # views: copied once, below
        raws = [raw_datum(v) for v in values]
        shape = raws[0][:3] if raws[0] and min(raws[0][:3]) > 0 else None
        if shape and all(r and r[:3] == shape and len(r[4]) == shape[0] * shape[1] * shape[2] for r in raws):
            # Raw uint8 records of one shape: one copy, straight from the database values.
            batch = numpy.frombuffer(b"".join(r[4] for r in raws), dtype=numpy.uint8).reshape((bs,) + shape)
            labels = numpy.fromiter((r[3] for r in raws), dtype=self.dtype, count=bs)
        else:
            datums = [parse_datum(v, lambda i=i: self._where(i)) for v, i in zip(values, index)]
            items = [datum_to_array(d, self._where(i), self.mode) for d, i in zip(datums, index)]
            for item, i in zip(items, index):
                if item.shape != items[0].shape:
                    raise ShapeError("%s: %s has shape %s but the first record of its batch has %s; "
                                     "records of one batch must have equal shapes (batch_size 1 "
                                     "allows varying sizes)" % (self.describe(), self._where(i),
                                                                item.shape, items[0].shape))
            batch = numpy.stack(items)
            labels = numpy.fromiter((d.label for d in datums), dtype=self.dtype, count=bs)
        h, w = batch.shape[2], batch.shape[3]
        out = self.buffers.take((bs,) + self.transformer.output_shape(batch.shape[1:]), self.dtype)
        self.transformer.apply(batch, *self.transformer.draw(rng, bs, h, w), out=out)
        return out, labels


# ---------------------------------------------------------------------------
def read_image_list(source, where):
    """Caffe's list file: one ``path label`` per line, split at the *last*
    space (paths may contain spaces); blank lines are skipped."""
    if not source:
        raise ConfigError("%s: image_data_param.source is not set" % where)
    if not os.path.isfile(source):
        raise NetlibFileNotFoundError("%s: image list %s not found (image_data_param.source)" % (where, source))
    lines = []
    with open(source, "r", encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            path, sep, label = line.rpartition(" ")
            try:
                if not sep or not path:
                    raise ValueError
                lines.append((path, int(label)))
            except ValueError:
                raise ConfigError("%s:%d: expected 'path label' (an integer label after the last space), "
                                  "got %r" % (source, number, line)) from None
    if not lines:
        raise ConfigError("%s: the image list %s is empty" % (where, source))
    return lines


@register_layer("ImageData")
class ImageDataLayer(PrefetchingDataLayer):
    """Reads the images named in a list file (``image_data_param``).

    * ``source``: lines ``path label``; ``root_folder`` is prepended by plain
      string concatenation (Caffe's rule: end it with '/');
    * images are loaded as Caffe's OpenCV path: BGR, uint8, ``is_color``
      false gives one gray channel; ``new_height``/``new_width`` (both or
      neither) resize with OpenCV's bilinear arithmetic (:mod:`netlib.data.image`);
    * ``shuffle``: a new random order at the start and at every epoch;
      ``rand_skip``: skip a uniform random number in [0, rand_skip) of lines
      at the start; reading wraps around at the end.
    The top shape comes from the first image; each batch takes the shape of
    its first image (batch_size 1 allows varying sizes).
    """

    def needs_rand(self):
        p = self.layer_param.image_data_param
        return super().needs_rand() or p.shuffle or p.rand_skip > 0

    def data_setup(self, top):
        p = self.layer_param.image_data_param
        self.batch_size = int(p.batch_size)
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        if (self.new_height > 0) != (self.new_width > 0):
            self.fail("new_height and new_width must be set together (got %d and %d)"
                      % (self.new_height, self.new_width), error=ConfigError)
        self.is_color = bool(p.is_color)
        self.root_folder = p.root_folder
        self.source = p.source
        self.lines = read_image_list(p.source, self.describe())
        log.info("A total of %d images.", len(self.lines))
        check_enough_items(len(self.lines), "the image list %s" % p.source, self.describe())
        self._perm_lock = threading.Lock()
        self._perms = {}
        self.state_loaded()
        first = self._load(self._line(0))
        shape = self.transformer.output_shape((first.shape[2], first.shape[0], first.shape[1]))
        top[0].reshape((self.batch_size,) + tuple(shape))
        log.info("output data size: %s", ",".join(str(d) for d in top[0].shape))

    def state_loaded(self):
        rand_skip = int(self.layer_param.image_data_param.rand_skip)
        self.skip = int(self.batch_rng(0, stream=7).integers(rand_skip)) if rand_skip else 0
        if self.skip >= len(self.lines):
            self.fail("not enough images (%d) to skip %d" % (len(self.lines), self.skip), error=ConfigError)
        with self._perm_lock:
            self._perms = {}

    def _permutation(self, epoch):
        with self._perm_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = self.batch_rng(epoch, stream=1)
                perm = rng.permutation(len(self.lines))
                if len(self._perms) >= 3:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def _line(self, sample):
        """Index into ``lines`` of the ``sample``-th image read since the start."""
        g = self.skip + sample * self.shard_count + self.shard_rank   # p % count == rank
        epoch, pos = divmod(g, len(self.lines))
        if self.layer_param.image_data_param.shuffle:
            return int(self._permutation(epoch)[pos])
        return pos

    def _load(self, line):
        path, _ = self.lines[line]
        try:
            img = _image.imread(self.root_folder + path, self.is_color)
            if self.new_height > 0:
                img = _image.resize(img, self.new_height, self.new_width)
        except (NetlibFileNotFoundError, _image.ImageError) as exc:
            raise type(exc)("%s: %s (listed in %s)" % (self.describe(), exc, self.source)) from None
        return img

    def load_batch(self, b, rng):
        bs = self.batch_size
        start = b * bs
        count = self.shard_count
        if _crossed_end(self.skip + start * count, bs * count, len(self.lines)):
            log.info("Restarting data prefetching from start.")
        lines = [self._line(start + k) for k in range(bs)]
        images = [self._load(i) for i in lines]
        for img, i in zip(images, lines):
            if img.shape != images[0].shape:
                raise ShapeError("%s: image %s is %s (height, width, channels) but the first image of "
                                 "its batch is %s; set new_height/new_width or use batch_size 1"
                                 % (self.describe(), self.lines[i][0], img.shape, images[0].shape))
        batch = numpy.stack(images).transpose(0, 3, 1, 2)  # NHWC -> NCHW view
        h, w = batch.shape[2], batch.shape[3]
        out = self.buffers.take((bs,) + self.transformer.output_shape(batch.shape[1:]), self.dtype)
        self.transformer.apply(batch, *self.transformer.draw(rng, bs, h, w), out=out)
        labels = numpy.asarray([self.lines[i][1] for i in lines], dtype=self.dtype)
        return out, labels
    jvp = forward_mode.zero_jvp  # d top = 0 (data layers, piecewise constant outputs).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

