"""Data layers: Input, DummyData, HDF5Data, MemoryData, and the HDF5Output writer.

These layers have no bottoms and no backward (Caffe's data layers have empty
Backward_cpu).  Their tops carry the net's dtype (float32 by default).  The
readers that keep a position (HDF5Data, MemoryData) expose ``state_dict()`` /
``load_state_dict(d)`` so a solver snapshot can record where reading stopped
and a resumed run continues with exactly the same batches.

The prefetching layers (Data/ImageData/WindowData) live in the data pipeline
package, :mod:`netlib.data`; the layers here read synchronously, as Caffe's do.
"""
import logging
import os

import numpy

from ..errors import ConfigError, LayerError, NetlibFileNotFoundError, ShapeError, WeightsError
from .. import forward_mode
from .. import second_order
from ..fillers import fill
from ..layer import Layer, register_layer
from ..random import get_rng

log = logging.getLogger("netlib")


class _DataLayer(Layer):
    """Common base: no bottoms, nothing to propagate."""

    exact_num_bottom_blobs = 0

    jvp = forward_mode.zero_jvp  # d top = 0 (data layers)
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

    def reshape(self, bottom, top):
        """Data layers shape their tops in setup/forward; nothing to do here."""

    def backward(self, top, propagate_down, bottom):
        """Data layers have no backward (Caffe: empty Backward_cpu)."""

    def allow_force_backward(self, bottom_index):
        return False


# ---------------------------------------------------------------------------
@register_layer("Input")
class InputLayer(_DataLayer):
    """Shapes its tops from ``input_param.shape``; the data is set by the user.

    ``shape`` may be given once per top, once for all tops, or not at all (the
    tops then keep whatever shape they have; the user reshapes them).
    Reshape is a no-op, as in Caffe, so a shape set by the user sticks.
    """

    min_top_blobs = 1

    def setup(self, bottom, top):
        shapes = list(self.layer_param.input_param.shape)
        if len(shapes) not in (0, 1, len(top)):
            self.fail("input_param must give 'shape' once, once per top blob, or not at all: "
                      "%d tops vs. %d shapes" % (len(top), len(shapes)), error=ConfigError)
        if shapes:
            for i, t in enumerate(top):
                t.reshape(list(shapes[0 if len(shapes) == 1 else i].dim))

    def forward(self, bottom, top):
        """Nothing: the tops hold whatever the user wrote into them."""


# ---------------------------------------------------------------------------
@register_layer("DummyData")
class DummyDataLayer(_DataLayer):
    """Tops filled by fillers: ``data_filler`` given 0 times (constant 0), once
    (for every top) or once per top.  Shapes come from ``shape`` (once or once
    per top) or the deprecated ``num``/``channels``/``height``/``width`` (each
    once or once per top; not together with ``shape``).

    Caffe quirk kept: a "constant" filler runs once at setup and never again
    (a user's write into that top persists); any other filler refills its top
    on every forward.  With a single filler the rule applies to all tops.
    """

    min_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.dummy_data_param
        num_top = len(top)
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, num_top):
            self.fail("number of data fillers must be 0, 1 or equal to the number of tops (%d); "
                      "%d given" % (num_top, len(fillers)), error=ConfigError)
        legacy = len(p.num) or len(p.channels) or len(p.height) or len(p.width)
        if legacy:
            if len(p.shape):
                self.fail("both 'shape' and the legacy num/channels/height/width fields were specified",
                          error=ConfigError)
            for field in ("num", "channels", "height", "width"):
                n = len(getattr(p, field))
                if n not in (1, num_top):
                    self.fail("must specify '%s' once, or once per top blob (%d); specified %d"
                              % (field, num_top, n), error=ConfigError)
        elif len(p.shape) not in (1, num_top):
            self.fail("must specify 'shape' once, or once per top blob (%d); specified %d"
                      % (num_top, len(p.shape)), error=ConfigError)
        if not fillers:
            from ..proto import caffe_pb2
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        self._fillers = fillers
        self._refill = [f.type != "constant" for f in fillers]
        for i, t in enumerate(top):
            if legacy:
                dims = [getattr(p, f)[0 if len(getattr(p, f)) == 1 else i]
                        for f in ("num", "channels", "height", "width")]
                t.reshape(dims)
            else:
                t.reshape(list(p.shape[0 if len(p.shape) == 1 else i].dim))
        # Caffe runs one forward at setup with the refill flags inverted: the
        # constant tops are filled now (and never again), the others wait for
        # the first forward.
        for i, t in enumerate(top):
            k = i if len(self._fillers) > 1 else 0
            if not self._refill[k]:
                fill(t, self._fillers[k])

    def forward(self, bottom, top):
        for i, t in enumerate(top):
            k = i if len(self._fillers) > 1 else 0
            if self._refill[k]:
                fill(t, self._fillers[k])


# ---------------------------------------------------------------------------
def _read_source_list(layer, source):
    """The .h5 paths listed in ``source`` (one per line; blank lines skipped).

    A relative path is used as given when it exists (Caffe resolves it against
    the working directory), else relative to the folder holding ``source``.
    """
    if not source:
        layer.fail("hdf5_data_param.source is not set", error=ConfigError)
    if not os.path.isfile(source):
        raise NetlibFileNotFoundError("%s: source file %r not found (hdf5_data_param.source)"
                                      % (layer.describe(), source))
    with open(source, "r", encoding="utf-8", errors="replace") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if not names:
        layer.fail("must have at least 1 HDF5 filename listed in %s" % source, error=ConfigError)
    folder = os.path.dirname(os.path.abspath(source))
    paths = []
    for name in names:
        if not os.path.isabs(name) and not os.path.exists(name):
            alt = os.path.join(folder, name)
            if os.path.exists(alt):
                name = alt
        paths.append(name)
    return paths


@register_layer("HDF5Data")
class HDF5DataLayer(_DataLayer):
    """Reads batches from the HDF5 files listed in ``hdf5_data_param.source``.

    Each top name is a dataset name in every file (e.g. ``data``, ``label``);
    datasets may have any rank >= 1, float or integer type (read as the net's
    float dtype), and all tops of one file must have the same first dimension.
    Top ``i`` has shape ``(batch_size,) + dataset.shape[1:]`` (from the first
    file).  Forward copies ``batch_size`` rows, moving on to the next file (and
    back to the first) as needed.

    ``shuffle: true`` permutes the file order at setup and after every pass
    over the files, and the rows of a file each time it is loaded, using
    :func:`netlib.random.get_rng`.  Caffe quirk kept: with a single file the
    file is loaded once, so its rows are shuffled once and every epoch then
    visits them in that same order.

    ``transform_param`` is refused (Caffe: "HDF5Data does not transform data").
    """

    min_top_blobs = 1

    def setup(self, bottom, top):
        if self.layer_param.HasField("transform_param"):
            self.fail("HDF5Data does not transform data; remove transform_param (scale the data "
                      "when you write the HDF5 file)", error=ConfigError)
        p = self.layer_param.hdf5_data_param
        self.batch_size = int(p.batch_size)
        if self.batch_size <= 0:
            self.fail("hdf5_data_param.batch_size must be positive (got %d)" % self.batch_size,
                      error=ConfigError)
        self.shuffle = bool(p.shuffle)
        self.top_names = list(self.layer_param.top)
        if len(self.top_names) != len(top):
            self.top_names = (self.top_names + ["top%d" % i for i in range(len(top))])[:len(top)]
        self.filenames = _read_source_list(self, p.source)
        log.info("%s: Number of HDF5 files: %d", self.name, len(self.filenames))
        self.file_permutation = numpy.arange(len(self.filenames))
        if self.shuffle:
            get_rng().shuffle(self.file_permutation)
        self.current_file = 0
        self._loaded_index = None
        self._load_file(self.file_permutation[0], shuffle_rows=self.shuffle)
        self.current_row = 0
        from ..parallel import check_enough_items, shard
        self.shard_rank, self.shard_count = shard(self.phase)   # data-parallel: this rank's share
        self._shard_bufs = None
        if self.shard_count > 1 and len(self.filenames) == 1:
            check_enough_items(self.num_rows, "the HDF5 file %s" % self.filenames[0], self.describe())
        self._row_shapes = [tuple(a.shape[1:]) for a in self._arrays]
        for t, shape in zip(top, self._row_shapes):
            t.reshape((self.batch_size,) + shape)

    # -- file loading ------------------------------------------------------
    def _load_file(self, index, shuffle_rows):
        import h5py
        path = self.filenames[index]
        if not os.path.isfile(path):
            raise NetlibFileNotFoundError("%s: HDF5 file %r listed in %r not found"
                                          % (self.describe(), path, self.layer_param.hdf5_data_param.source))
        arrays = []
        try:
            with h5py.File(path, "r") as f:
                for name in self.top_names:
                    if name not in f:
                        self.fail("failed to find HDF5 dataset %r in %s (datasets: %s)"
                                  % (name, path, sorted(f.keys())), error=ConfigError)
                    ds = f[name]
                    if not isinstance(ds, h5py.Dataset):
                        self.fail("%r in %s is a group, not a dataset" % (name, path), error=ConfigError)
                    if ds.dtype.kind not in "fiub":
                        self.fail("dataset %r in %s has type %s; expected float or integer data"
                                  % (name, path, ds.dtype), error=ConfigError)
                    if ds.ndim < 1:
                        self.fail("dataset %r in %s is a scalar; it needs at least 1 axis"
                                  % (name, path), error=ShapeError)
                    arrays.append(numpy.asarray(ds[()], dtype=self.dtype))
        except OSError as exc:
            raise LayerError("%s: cannot read HDF5 file %r: %s" % (self.describe(), path, exc)) from None
        num = arrays[0].shape[0]
        for name, a in zip(self.top_names, arrays):
            if a.shape[0] != num:
                self.fail("datasets in %s must have equal first dimensions: %s"
                          % (path, ", ".join("%s %s" % (n, x.shape) for n, x in zip(self.top_names, arrays))),
                          error=ShapeError)
        if num == 0:
            self.fail("HDF5 file %s holds 0 rows" % path, error=ShapeError)
        if hasattr(self, "_row_shapes"):
            for name, a, shape in zip(self.top_names, arrays, self._row_shapes):
                if tuple(a.shape[1:]) != shape:
                    self.fail("dataset %r in %s has rows of shape %s; the first file's rows are %s"
                              % (name, path, a.shape[1:], shape), error=ShapeError)
        self._arrays = [self.xp.asarray(a) for a in arrays]
        self._loaded_index = int(index)
        self.num_rows = num
        self.data_permutation = numpy.arange(num)
        if shuffle_rows:
            get_rng().shuffle(self.data_permutation)
        self._perm_xp = None

    def _next_file(self):
        """Called when the rows of the current file are used up."""
        if len(self.filenames) > 1:
            self.current_file += 1
            if self.current_file == len(self.filenames):
                self.current_file = 0
                if self.shuffle:
                    get_rng().shuffle(self.file_permutation)
            self._load_file(self.file_permutation[self.current_file], shuffle_rows=self.shuffle)
        self.current_row = 0

    def forward(self, bottom, top):
        """Copy the next ``batch_size`` rows; in a data-parallel run, rank r
        of N takes every N-th of the next N x batch_size rows, starting at r
        (Caffe's HDF5DataLayer::Skip)."""
        rank, count = self.shard_rank, self.shard_count
        if count == 1:
            self._fill([t.data for t in top], self.batch_size)
            return
        bufs = self._shard_bufs
        if bufs is None or bufs[0].shape[0] != self.batch_size * count:
            bufs = self._shard_bufs = [self.xp.empty((self.batch_size * count,) + t.shape[1:], dtype=t.dtype)
                                       for t in top]
        self._fill(bufs, self.batch_size * count)
        for t, buf in zip(top, bufs):
            t.data[...] = buf[rank::count]

    def _fill(self, outs, total):
        xp = self.xp
        if self._perm_xp is None:
            self._perm_xp = xp.asarray(self.data_permutation)
        filled = 0
        while filled < total:
            n = min(total - filled, self.num_rows - self.current_row)
            r = self.current_row
            rows = self._perm_xp[r:r + n] if self.shuffle else slice(r, r + n)
            for out, a in zip(outs, self._arrays):
                out[filled:filled + n] = a[rows]
            filled += n
            self.current_row += n
            if self.current_row == self.num_rows:
                self._next_file()
                if self._perm_xp is None:
                    self._perm_xp = xp.asarray(self.data_permutation)

    # -- resumable position --------------------------------------------------
    def state_dict(self):
        """The read position: file index, row, and the current permutations."""
        return {
            "current_file": int(self.current_file),
            "current_row": int(self.current_row),
            "file_permutation": [int(i) for i in self.file_permutation],
            "data_permutation": [int(i) for i in self.data_permutation] if self.shuffle else None,
        }

    def load_state_dict(self, state):
        """Restore a position saved by :meth:`state_dict` (same file list)."""
        try:
            file_perm = numpy.asarray(state["file_permutation"], dtype=numpy.int64)
            current_file = int(state["current_file"])
            current_row = int(state["current_row"])
            data_perm = state.get("data_permutation")
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError("%s: malformed reader state (%s: %s)"
                               % (self.describe(), type(exc).__name__, exc)) from None
        if sorted(file_perm.tolist()) != list(range(len(self.filenames))) or not 0 <= current_file < len(file_perm):
            raise WeightsError("%s: the saved reader state lists %d files; the source lists %d"
                               % (self.describe(), len(file_perm), len(self.filenames)))
        self.file_permutation = file_perm
        self.current_file = current_file
        index = int(file_perm[current_file])
        if self._loaded_index != index:
            self._load_file(index, shuffle_rows=False)
        if data_perm is not None:
            data_perm = numpy.asarray(data_perm, dtype=numpy.int64)
            if sorted(data_perm.tolist()) != list(range(self.num_rows)):
                raise WeightsError("%s: the saved row order has %d rows; %s holds %d"
                                   % (self.describe(), len(data_perm), self.filenames[index], self.num_rows))
            self.data_permutation = data_perm
        else:
            self.data_permutation = numpy.arange(self.num_rows)
        self._perm_xp = None
        if not 0 <= current_row < self.num_rows:
            raise WeightsError("%s: saved row %d is outside the %d rows of %s"
                               % (self.describe(), current_row, self.num_rows, self.filenames[index]))
        self.current_row = current_row


# ---------------------------------------------------------------------------
@register_layer("MemoryData")
class MemoryDataLayer(_DataLayer):
    """Serves batches from arrays given by :meth:`reset` (pycaffe's
    ``net.set_input_arrays(data, labels)``).

    Tops: ``data`` (batch_size, channels, height, width) and ``label``
    (batch_size,) after setup, (batch_size, 1, 1, 1) from the first forward
    on, as Caffe reshapes them.  Each forward copies the next ``batch_size`` items and wraps
    around at the end; the item count must be a multiple of batch_size.
    As in Caffe, ``reset`` does not apply transform_param (a warning says so).
    """

    exact_num_top_blobs = 2

    def setup(self, bottom, top):
        p = self.layer_param.memory_data_param
        self.batch_size = int(p.batch_size)
        self.channels, self.height, self.width = int(p.channels), int(p.height), int(p.width)
        if self.batch_size * self.channels * self.height * self.width <= 0:
            self.fail("batch_size, channels, height, and width must be specified and positive in "
                      "memory_data_param", error=ConfigError)
        self._data = None
        self._labels = None
        self.n = 0
        self.pos = 0
        top[0].reshape(self.batch_size, self.channels, self.height, self.width)
        top[1].reshape(self.batch_size)

    def reset(self, data, labels):
        """Use ``data`` (N, C, H, W) and ``labels`` (N,) or (N,1,1,1) from now on.

        N must be a multiple of batch_size; reading restarts at item 0.
        """
        xp = self.xp
        shape = tuple(getattr(data, "shape", ()))
        if len(shape) != 4 or shape[1:] != (self.channels, self.height, self.width):
            self.fail("data array must have shape (N, %d, %d, %d), got %s"
                      % (self.channels, self.height, self.width, shape), error=ShapeError)
        lshape = tuple(getattr(labels, "shape", ()))
        if len(lshape) == 4 and lshape[1:] == (1, 1, 1):
            labels = labels.reshape(lshape[0])
        elif len(lshape) != 1:
            self.fail("labels must have shape (N,) or (N, 1, 1, 1), got %s" % (lshape,), error=ShapeError)
        if lshape[0] != shape[0]:
            self.fail("data and labels must have the same first dimension (%d vs %d)"
                      % (shape[0], lshape[0]), error=ShapeError)
        if shape[0] == 0 or shape[0] % self.batch_size:
            self.fail("the number of items (%d) must be a positive multiple of batch_size (%d)"
                      % (shape[0], self.batch_size), error=ShapeError)
        if self.layer_param.HasField("transform_param"):
            log.warning("%s does not transform array data on reset()", self.describe())
        self._data = xp.asarray(data, dtype=self.dtype)
        self._labels = xp.asarray(labels, dtype=self.dtype)
        self.n = shape[0]
        self.pos = 0

    def set_batch_size(self, batch_size):
        """Change the batch size (the item count must stay a multiple of it)."""
        batch_size = int(batch_size)
        if batch_size <= 0 or (self.n and self.n % batch_size):
            self.fail("batch_size %d must be positive and divide the %d items" % (batch_size, self.n),
                      error=ConfigError)
        self.batch_size = batch_size
        self.pos = 0

    def forward(self, bottom, top):
        if self._data is None:
            self.fail("MemoryData needs data: call net.set_input_arrays(data, labels) or "
                      "layer.reset(data, labels) first", error=ConfigError)
        b = self.batch_size
        top[0].reshape(b, self.channels, self.height, self.width)
        top[1].reshape(b, 1, 1, 1)      # Caffe: (batch_size,) after setup, 4-D from the first forward
        top[0].data[...] = self._data[self.pos:self.pos + b]
        top[1].data[...] = self._labels[self.pos:self.pos + b].reshape(b, 1, 1, 1)
        self.pos = (self.pos + b) % self.n

    def state_dict(self):
        """The read position (the arrays themselves are the user's)."""
        return {"pos": int(self.pos), "n": int(self.n)}

    def load_state_dict(self, state):
        try:
            pos, n = int(state["pos"]), int(state.get("n", self.n))
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError("%s: malformed reader state (%s: %s)"
                               % (self.describe(), type(exc).__name__, exc)) from None
        if self.n and n != self.n:
            raise WeightsError("%s: the saved position is for %d items; the layer holds %d"
                               % (self.describe(), n, self.n))
        self.pos = pos % self.n if self.n else pos


@register_layer("HDF5Output")
class HDF5OutputLayer(Layer):
    """Write the bottoms to an HDF5 file: ``hdf5_output_param.file_name``.

    Bottoms: data (N, ...) and label (N, ...) with equal first dimensions;
    no tops, no backward (Caffe's Backward_cpu is empty).  The file is created
    (truncated) at setup; each forward writes datasets ``data`` and ``label``
    in Caffe's legacy 4-D shapes (num, channels, height, width), float32.
    Caffe keeps the file open and fails on a second forward (the datasets
    already exist); here each forward replaces them and closes the file, so
    it can be read while the net is alive.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 0

    jvp = forward_mode.zero_jvp  # no tops.
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

    def setup(self, bottom, top):
        import h5py
        self.file_name = self.layer_param.hdf5_output_param.file_name
        if not self.file_name:
            self.fail("hdf5_output_param.file_name is required", error=ConfigError)
        try:
            h5py.File(self.file_name, "w").close()
        except OSError as exc:
            self.fail("cannot create %r: %s" % (self.file_name, exc), error=ConfigError)

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            self.fail("data and label need the same first dimension", bottom=bottom, error=ShapeError)

    def forward(self, bottom, top):
        import h5py
        from ..backend import to_numpy
        with h5py.File(self.file_name, "a") as f:
            for name, blob in (("data", bottom[0]), ("label", bottom[1])):
                legacy = tuple(blob.legacy_shape(i) for i in range(4))
                if name in f:
                    del f[name]
                f.create_dataset(name, data=to_numpy(blob.data).reshape(legacy).astype(numpy.float32))
