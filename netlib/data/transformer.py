"""Caffe's DataTransformer (``transform_param``), on whole batches at once.

For every item of a batch, in Caffe's order:

1. **crop** to ``crop_size`` x ``crop_size``: offsets drawn uniformly from
   ``[0, H - crop]`` x ``[0, W - crop]`` in TRAIN, the floor centre
   ``((H - crop) // 2, (W - crop) // 2)`` in TEST;
2. **mean**: ``mean_file`` (a BlobProto of the *full* item size, read at the
   uncropped coordinates of each pixel) or ``mean_value`` (one value for
   every channel, or one per channel); never both (Caffe's error);
3. **scale**: ``out = (pixel - mean) * scale`` (mean subtracted first);
4. **mirror**: with ``mirror: true`` each item is flipped left-right with
   probability 1/2, in TEST as well as in TRAIN (Caffe's quirk).

The arithmetic is Caffe's: the pixel converted to the net's float type, minus
the float mean, times the float scale.  ``force_color``/``force_gray`` only
choose how encoded images are decoded (:func:`decode_mode`).

The random choices of a batch are drawn by :meth:`draw` from a generator the
caller passes (the data layers derive one per batch from their seed, so the
samples do not depend on how many threads prepare batches).  This is host-side
data preparation on NumPy arrays; the data layers copy the result into their
top blobs, which may live on the GPU.
"""
import os

import numpy
from numpy.lib.stride_tricks import sliding_window_view

from ..blob import blobproto_to_array
from ..errors import ConfigError, NetlibFileNotFoundError, ShapeError, WeightsError
from ..files import read_blobproto
from ..proto import caffe_pb2
from .datum import decode_mode


class DataTransformer:
    """Apply a TransformationParameter to batches of (N, C, H, W) items.

    ``where`` names the owner in errors (e.g. ``"layer 'data' (type Data)"``).
    """

    def __init__(self, param=None, phase=caffe_pb2.TRAIN, dtype=numpy.float32, where="transform_param"):
        self.param = param if param is not None else caffe_pb2.TransformationParameter()
        self.phase = int(phase)
        self.dtype = numpy.dtype(dtype)
        self.where = where
        p = self.param
        self.crop_size = int(p.crop_size)
        self.scale = self.dtype.type(p.scale)
        self.mirror = bool(p.mirror)
        if p.force_color and p.force_gray:
            raise ConfigError("%s: cannot set both force_color and force_gray" % where)
        self.decode_mode = decode_mode(p.force_color, p.force_gray)
        if p.HasField("mean_file") and len(p.mean_value):
            raise ConfigError("%s: cannot specify mean_file and mean_value at the same time" % where)
        self.mean = None
        self.mean_values = None
        if p.HasField("mean_file"):
            self.mean = load_mean(p.mean_file, self.dtype)
        elif len(p.mean_value):
            self.mean_values = numpy.asarray(list(p.mean_value), dtype=numpy.float32).astype(self.dtype)

    # -- shapes ----------------------------------------------------------------------
    def output_shape(self, item_shape):
        """(C, h, w) of a transformed item of shape (C, H, W); checks the crop
        and the mean against the item (Caffe's InferBlobShape + CHECKs)."""
        c, h, w = (int(d) for d in item_shape)
        if c <= 0:
            raise ShapeError("%s: items have %d channels" % (self.where, c))
        if self.crop_size > h or self.crop_size > w:
            raise ShapeError("%s: crop_size %d is larger than the %dx%d (height x width) image"
                             % (self.where, self.crop_size, h, w))
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise ShapeError("%s: the mean file %s has shape %s (channels, height, width) but the data "
                             "items are %s; the mean must have the full, uncropped item size"
                             % (self.where, self.param.mean_file, self.mean.shape, (c, h, w)))
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise ShapeError("%s: specify either 1 mean_value or as many as channels (%d); %d given"
                             % (self.where, c, len(self.mean_values)))
        if self.crop_size:
            return (c, self.crop_size, self.crop_size)
        return (c, h, w)

    # -- randomness --------------------------------------------------------------------
    def draw(self, rng, num, height, width):
        """Crop offsets and mirror flags for ``num`` items of ``height`` x
        ``width``: ``(h_off, w_off, mirror)`` int/bool arrays of length num."""
        crop = self.crop_size
        mirror = (rng.integers(0, 2, size=num).astype(bool) if self.mirror
                  else numpy.zeros(num, dtype=bool))
        if crop and self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, height - crop + 1, size=num)
            w_off = rng.integers(0, width - crop + 1, size=num)
        elif crop:
            h_off = numpy.full(num, (height - crop) // 2)
            w_off = numpy.full(num, (width - crop) // 2)
        else:
            h_off = w_off = numpy.zeros(num, dtype=numpy.int64)
        return h_off, w_off, mirror

    # -- the transform -------------------------------------------------------------------
    def apply(self, batch, h_off, w_off, mirror, out=None):
        """Transform ``batch`` (N, C, H, W; uint8 or float; any strides, e.g. a
        transposed NHWC array) with the given offsets and flags into ``out``
        (N, C, h, w) of the transformer's dtype (allocated when None).

        Whole-batch NumPy: the crops are one gather from a sliding-window
        view, mirroring flips the gathered pixels (before they become float)
        and reads the mean from its mirrored copy, so the float output is
        written once by the subtraction (and once more by ``scale``)."""
        n, c, h, w = batch.shape
        oc, oh, ow = self.output_shape((c, h, w))
        if out is None:
            out = numpy.empty((n, oc, oh, ow), dtype=self.dtype)
        mirror = numpy.asarray(mirror, dtype=bool)
        flip = mirror.any()
        crop = self.crop_size or None
        h_off = numpy.asarray(h_off if crop else numpy.zeros(n, numpy.int64))
        w_off = numpy.asarray(w_off if crop else numpy.zeros(n, numpy.int64))
        same = n == 0 or ((h_off == h_off[0]).all() and (w_off == w_off[0]).all())
        if same:
            y, x = (int(h_off[0]), int(w_off[0])) if n else (0, 0)
            pixels = batch[:, :, y:y + oh, x:x + ow]
        else:
            pixels = sliding_window_view(batch, (oh, ow), axis=(2, 3))[numpy.arange(n), :, h_off, w_off]
        if flip:
            if pixels.base is not None and same:
                pixels = pixels.copy()  # a view of the caller's batch: flip a copy
            pixels[mirror] = pixels[mirror][..., ::-1]
        if self.mean is not None:
            numpy.subtract(pixels, self._mean_windows(h_off, w_off, mirror, same, w, oh, ow),
                           out=out, dtype=self.dtype)
        elif self.mean_values is not None:
            values = self.mean_values
            if len(values) == 1 and c > 1:
                values = numpy.repeat(values, c)
            numpy.subtract(pixels, values[None, :, None, None], out=out, dtype=self.dtype)
        else:
            out[...] = pixels
        if self.scale != 1:
            out *= self.scale
        return out

    def _mean_windows(self, h_off, w_off, mirror, same, width, oh, ow):
        """The mean at each item's (uncropped) pixel positions, mirrored
        like the item: (N, C, oh, ow) or a broadcastable view."""
        mean = self.mean
        if same and not mirror.any():
            y, x = (int(h_off[0]), int(w_off[0])) if len(h_off) else (0, 0)
            return mean[None, :, y:y + oh, x:x + ow]
        if getattr(self, "_mean2", None) is None:
            # The mean and its left-right mirror, side by side: a mirrored
            # item at column offset x reads the mirror at width - ow - x.
            self._mean2 = numpy.ascontiguousarray(numpy.stack([mean, mean[..., ::-1]]))
        windows = sliding_window_view(self._mean2, (oh, ow), axis=(2, 3))
        x = numpy.where(mirror, width - ow - w_off, w_off)
        return windows[mirror.astype(numpy.intp), :, h_off, x]

    def __call__(self, batch, rng):
        """Draw the random choices from ``rng`` and transform ``batch``."""
        n, _, h, w = batch.shape
        return self.apply(batch, *self.draw(rng, n, h, w))


def load_mean(path, dtype=numpy.float32):
    """A mean ``.binaryproto`` as a (C, H, W) array (legacy 4-D num = 1)."""
    if not os.path.isfile(path):
        raise NetlibFileNotFoundError("mean file %s not found (transform_param.mean_file)" % path)
    try:
        arr = numpy.asarray(blobproto_to_array(read_blobproto(path)))
    except WeightsError as exc:
        if path in str(exc):
            raise
        raise WeightsError("mean file %s: %s" % (path, exc)) from None
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ShapeError("mean file %s holds a blob of shape %s; a mean is (1, channels, height, width)"
                         % (path, arr.shape))
    return numpy.ascontiguousarray(arr, dtype=numpy.float32).astype(dtype)
