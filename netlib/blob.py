"""Blob: the N-D ``data``/``diff`` array pair that flows between layers.

A blob owns two flat buffers of ``capacity`` elements.  ``data`` and ``diff``
are views of the first ``count`` elements in the blob's current shape, so
``blob.data[...] = x`` writes in place, as in pycaffe.  Buffers are allocated
on first use (a diff that nothing reads is never allocated: a TEST net that
only runs forward allocates none, even through ``share_diff``, which shares
lazily) and reshaping reallocates only when the new count exceeds the
capacity, as Caffe's ``Blob::Reshape`` does.  The array module (``xp``: numpy or cupy) travels with
the blob so the same layer code runs on either.
"""
import os

import numpy

from . import backend
from .errors import ShapeError, WeightsError

MAX_BLOB_AXES = 32
#: Caffe's Blob::Reshape refuses more elements than INT_MAX ("blob size exceeds INT_MAX").
INT_MAX = 2 ** 31 - 1
#: An optional cap on one blob's bytes (``NETLIB_MAX_BLOB_BYTES`` in the
#: environment, or set this attribute), checked when a shape is set, before
#: any allocation: a downloaded prototxt cannot ask for more memory than this.
MAX_BLOB_BYTES = int(os.environ["NETLIB_MAX_BLOB_BYTES"]) if os.environ.get("NETLIB_MAX_BLOB_BYTES") else None


def _human_bytes(n):
    """``n`` bytes as "N bytes (x.y GiB)"."""
    for unit, size in (("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return "%d bytes (%.1f %s)" % (n, n / size, unit)
    return "%d bytes" % n


class Blob:
    """An N-D array pair (data, diff), float32 unless asked otherwise.

    >>> b = Blob((2, 3, 4, 5))
    >>> b.count, b.count_axes(1), b.num, b.channels
    (120, 60, 2, 3)
    """

    def __init__(self, shape=(), dtype=numpy.float32, xp=None):
        self.xp = xp if xp is not None else backend.default_xp()
        self.dtype = numpy.dtype(dtype)
        self._shape = ()
        self._count = 1
        self._data_buf = None
        self._diff_buf = None
        self._diff_src = None   # share_diff's source, until this diff is first used
        self._diff_fill = 0     # the value a first-allocated diff starts with
        self._data_view = None  # data's view, valid while shape and buffer are unchanged
        self._view_of = None
        self.reshape(shape)

    # -- shape --------------------------------------------------------------
    @property
    def shape(self):
        """The shape as a tuple of ints."""
        return self._shape

    def reshape(self, *shape):
        """Change the shape; accepts ``reshape(2, 3)`` or ``reshape((2, 3))``
        or a BlobShape message.  Memory is kept when it is large enough."""
        if len(shape) == 1 and not isinstance(shape[0], (int, numpy.integer)):
            shape = shape[0]
            if hasattr(shape, "dim"):
                shape = list(shape.dim)
        shape = tuple(int(d) for d in shape)
        if len(shape) > MAX_BLOB_AXES:
            raise ShapeError("blob shape %s has more than %d axes" % (shape, MAX_BLOB_AXES))
        for d in shape:
            if d < 0:
                raise ShapeError("blob shape %s has a negative dimension" % (shape,))
        count = 1
        for d in shape:
            count *= d
        if count > INT_MAX:
            raise ShapeError("blob shape %s has %d elements (%s): more than Caffe's limit of INT_MAX = %d "
                             "elements" % (shape, count, _human_bytes(count * self.dtype.itemsize), INT_MAX))
        if MAX_BLOB_BYTES is not None and count * self.dtype.itemsize > MAX_BLOB_BYTES:
            raise ShapeError("blob shape %s needs %s, more than the limit of %s (NETLIB_MAX_BLOB_BYTES)"
                             % (shape, _human_bytes(count * self.dtype.itemsize), _human_bytes(MAX_BLOB_BYTES)))
        self._shape = shape
        self._count = count
        self._data_view = None
        return self

    def reshape_like(self, other):
        return self.reshape(other.shape)

    @property
    def num_axes(self):
        return len(self._shape)

    @property
    def ndim(self):
        return len(self._shape)

    @property
    def count(self):
        """Number of elements (an int, as pycaffe's ``Blob.count``)."""
        return self._count

    def count_axes(self, start=0, end=None):
        """The product of dims ``start:end`` (Caffe's ``Blob::count(start, end)``)."""
        start = 0 if start is None else self.canonical_axis_index(start) if start < 0 else start
        end = self.num_axes if end is None else end
        n = 1
        for d in self._shape[start:end]:
            n *= d
        return n

    @property
    def size(self):
        return self._count

    def canonical_axis_index(self, axis):
        """Map a possibly negative axis to 0..num_axes-1 (Caffe's check)."""
        n = self.num_axes
        if not -n <= axis < max(n, 1):
            raise ShapeError("axis %d out of range for a %d-D blob of shape %s" % (axis, n, self._shape))
        return axis + n if axis < 0 else axis

    def legacy_shape(self, index):
        """Caffe's LegacyShape: 1 for axes outside a blob of up to 4 axes."""
        if self.num_axes > 4:
            raise ShapeError("legacy accessors need a blob of at most 4 axes, got %s" % (self._shape,))
        if index >= self.num_axes or index < -self.num_axes:
            return 1
        return self._shape[index]

    @property
    def num(self):
        """Axis 0 of a blob of up to 4 axes (1 when it has fewer), Caffe's legacy accessor."""
        return self.legacy_shape(0)

    @property
    def channels(self):
        """Axis 1 of a blob of up to 4 axes (1 when it has fewer), Caffe's legacy accessor."""
        return self.legacy_shape(1)

    @property
    def height(self):
        """Axis 2 of a blob of up to 4 axes (1 when it has fewer), Caffe's legacy accessor."""
        return self.legacy_shape(2)

    @property
    def width(self):
        """Axis 3 of a blob of up to 4 axes (1 when it has fewer), Caffe's legacy accessor."""
        return self.legacy_shape(3)

    # -- storage ------------------------------------------------------------
    def _alloc(self):
        return self.xp.zeros(max(self._count, 1), dtype=self.dtype)

    @property
    def data(self):
        """The values, an array of ``shape`` that layers and users write in place.

        The view is cached until the shape or the buffer changes (layers read
        ``data`` several times per forward; building a view costs about 1 us)."""
        view = self._data_view
        if view is not None and self._view_of is self._data_buf and view.shape == self._shape:
            return view
        if self._data_buf is None or self._data_buf.size < self._count:
            self._data_buf = self._alloc()
        view = self._data_buf[: self._count].reshape(self._shape)
        self._data_view, self._view_of = view, self._data_buf
        return view

    @data.setter
    def data(self, value):
        self.data[...] = value

    def set_data(self, array):
        """Adopt ``array`` as the data buffer, without a copy (Caffe's
        set_cpu_data): it must be C-contiguous, of the blob's dtype and array
        module, with ``count`` elements.  Returns the previous buffer (or
        None).  Blobs sharing the old buffer keep it until they share again."""
        if (array.dtype != self.dtype or array.size != self._count or not array.flags.c_contiguous
                or backend.get_array_module(array) is not self.xp):
            raise ShapeError("set_data needs a C-contiguous %s array of %d elements; got %s %s"
                             % (self.dtype, self._count, array.dtype, tuple(array.shape)))
        old, self._data_buf = self._data_buf, array.reshape(-1)
        self._data_view = self._view_of = None
        return old

    def release_data(self):
        """Drop the data buffer (values are lost; the next ``data`` access
        allocates zeros)."""
        self._data_buf = self._data_view = self._view_of = None

    def use_buffer(self, flat):
        """Adopt the flat array ``flat`` (of the blob's dtype and array module,
        at least ``count`` elements) as the data buffer, without a copy; ``data``
        views its first ``count`` elements.  The memory planner
        (:mod:`netlib.memory`) hands out buffers this way."""
        if flat.dtype != self.dtype or flat.ndim != 1 or flat.size < self._count:
            raise ShapeError("use_buffer needs a flat %s array of at least %d elements; got %s %s"
                             % (self.dtype, self._count, flat.dtype, tuple(flat.shape)))
        self._data_buf = flat
        self._data_view = self._view_of = None

    @property
    def diff(self):
        """The gradient with respect to the values, same shape as ``data``.

        Allocated on first access: filled with the loss weight for a loss top
        (see ``Layer.set_loss_weights``), zeros otherwise; a diff shared with
        ``share_diff`` before either side allocated it is allocated on the
        source and adopted here."""
        buf = self._diff_buf
        if buf is None or buf.size < self._count:
            src = self._diff_src
            if buf is None and src is not None:
                self._diff_src = None
                src.diff  # allocate (or resolve) the source's buffer
                buf = src._diff_buf
            if buf is None or buf.size < self._count:
                fresh = buf is None
                buf = self._alloc()
                if fresh and self._diff_fill:
                    buf[...] = self._diff_fill
            self._diff_buf = buf
        return buf[: self._count].reshape(self._shape)

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

    @property
    def has_diff(self):
        """True once the diff buffer exists (a pending lazy share counts when
        its source has one)."""
        if self._diff_buf is not None:
            return True
        return self._diff_src is not None and self._diff_src.has_diff

    def share_data(self, other):
        """Use ``other``'s data buffer (counts must match), as Caffe's ShareData."""
        if self._count != other._count:
            raise ShapeError("share_data needs equal counts: %s vs %s" % (self._shape, other._shape))
        other.data  # make sure it exists
        if self._data_buf is not other._data_buf:
            self._data_buf = other._data_buf
            self._data_view = self._view_of = None

    def share_diff(self, other):
        """Use ``other``'s diff buffer (counts must match), as Caffe's ShareDiff.

        Lazy: when ``other`` has no diff yet, none is allocated now; the first
        access to either diff allocates it on ``other`` and this blob adopts it
        (so a forward-only net never allocates diffs through Flatten/Reshape)."""
        if self._count != other._count:
            raise ShapeError("share_diff needs equal counts: %s vs %s" % (self._shape, other._shape))
        if other is self:
            return
        if other._diff_buf is not None:
            self._diff_buf, self._diff_src = other._diff_buf, None
        else:
            self._diff_buf, self._diff_src = None, other

    def shares_data_with(self, other):
        return self._data_buf is not None and self._data_buf is other._data_buf

    def to(self, xp):
        """Move the buffers to another array module (numpy <-> cupy)."""
        if xp is self.xp:
            return self
        self._data_view = self._view_of = None
        for name in ("_data_buf", "_diff_buf"):
            buf = getattr(self, name)
            if buf is not None:
                setattr(self, name, xp.asarray(backend.to_numpy(buf)) if xp is not numpy else backend.to_numpy(buf))
        self.xp = xp
        return self

    # -- arithmetic used by solvers and checks ------------------------------
    def update(self):
        """``data -= diff`` (the solver puts the whole step into diff)."""
        self.data[...] -= self.diff

    def asum_data(self):
        return float(self.xp.abs(self.data).sum())

    def asum_diff(self):
        return float(self.xp.abs(self.diff).sum())

    def sumsq_data(self):
        d = self.data.ravel()
        return float(d @ d)

    def sumsq_diff(self):
        d = self.diff.ravel()
        return float(d @ d)

    def scale_data(self, factor):
        self.data[...] *= factor

    def scale_diff(self, factor):
        self.diff[...] *= factor

    # -- protobuf -----------------------------------------------------------
    def to_proto(self, proto=None, write_diff=False):
        """Write into a BlobProto (``shape`` form; double fields for float64)."""
        from .proto import caffe_pb2
        proto = proto if proto is not None else caffe_pb2.BlobProto()
        proto.Clear()
        proto.shape.dim.extend(self._shape)
        data = backend.to_numpy(self.data).ravel()
        if self.dtype == numpy.float64:
            proto.double_data.extend(data.tolist())
            if write_diff:
                proto.double_diff.extend(backend.to_numpy(self.diff).ravel().tolist())
        else:
            proto.data.extend(data.astype(numpy.float32).tolist())
            if write_diff:
                proto.diff.extend(backend.to_numpy(self.diff).ravel().astype(numpy.float32).tolist())
        return proto

    def from_proto(self, proto, reshape=True):
        """Read a BlobProto; legacy num/channels/height/width win when set.

        With ``reshape=False`` the proto's shape must equal this blob's shape
        (a legacy 4-D proto is compared with the legacy 4-D view, so a
        (1,1,1,C) bias fits a blob of shape (C,)).
        """
        shape = proto_shape(proto)
        if reshape:
            check_proto_count(proto, "data")         # before allocating what the shape asks
            self.reshape(shape)
        elif not shape_equals(proto, self._shape):
            raise WeightsError("shape mismatch: stored blob has shape %s, target blob has shape %s"
                               % (describe_proto_shape(proto), self._shape))
        values = proto_values(proto, "data")
        if values.size != self._count:
            raise WeightsError("stored blob has %d values for shape %s (%d expected)"
                               % (values.size, describe_proto_shape(proto), self._count))
        self.data[...] = self.xp.asarray(values.reshape(self._shape), dtype=self.dtype)
        diff = proto_values(proto, "diff")
        if diff.size == self._count and diff.size:
            self.diff[...] = self.xp.asarray(diff.reshape(self._shape), dtype=self.dtype)
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data_view"] = state["_view_of"] = None  # a copied view would not view the copied buffer
        return state

    def __repr__(self):
        return "Blob(shape=%s, dtype=%s)" % (self._shape, self.dtype.name)


def _is_legacy(proto):
    return (proto.HasField("num") or proto.HasField("channels")
            or proto.HasField("height") or proto.HasField("width"))


def proto_shape(proto):
    """The shape a BlobProto describes (legacy 4-D fields win if any is set)."""
    if _is_legacy(proto):
        return (proto.num, proto.channels, proto.height, proto.width)
    return tuple(proto.shape.dim)


def describe_proto_shape(proto):
    return str(proto_shape(proto))


def shape_equals(proto, shape):
    """Caffe's Blob::ShapeEquals: legacy protos match the 1-padded 4-D view."""
    shape = tuple(shape)
    if _is_legacy(proto):
        if len(shape) > 4:
            return False
        padded = (1,) * (4 - len(shape)) + shape
        return padded == (proto.num, proto.channels, proto.height, proto.width)
    return tuple(proto.shape.dim) == shape


def proto_values(proto, which="data"):
    """The values of a BlobProto as a NumPy array (double fields win)."""
    double = getattr(proto, "double_" + which)
    if len(double):
        return numpy.asarray(double, dtype=numpy.float64)
    return numpy.asarray(getattr(proto, which), dtype=numpy.float32)


def array_to_blobproto(arr, diff=None):
    """pycaffe's ``io.array_to_blobproto``: a BlobProto with ``shape.dim``."""
    from .proto import caffe_pb2
    arr = backend.to_numpy(arr)
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend(arr.shape)
    proto.data.extend(arr.astype(numpy.float32).ravel().tolist())
    if diff is not None:
        proto.diff.extend(backend.to_numpy(diff).astype(numpy.float32).ravel().tolist())
    return proto


def check_proto_count(proto, which="data"):
    """The value count of a BlobProto, checked against its shape (no
    negative dimension, as many values as the shape holds) before anything
    of that shape is allocated; raises WeightsError (a ValueError, as
    pycaffe's reshape error was)."""
    shape = proto_shape(proto)
    n = len(getattr(proto, "double_" + which)) or len(getattr(proto, which))
    count = 1
    for d in shape:
        count *= int(d)
    if any(int(d) < 0 for d in shape) or n != count:
        raise WeightsError("stored blob has %d values for shape %s (%s expected, in %s)"
                           % (n, describe_proto_shape(proto),
                              "a non-negative shape" if any(int(d) < 0 for d in shape) else count, which))
    return n


def blobproto_to_array(proto, return_diff=False):
    """pycaffe's ``io.blobproto_to_array`` (legacy 4-D shape when set); a
    value count that does not fit the shape is a WeightsError (a ValueError)."""
    check_proto_count(proto, "diff" if return_diff else "data")
    values = proto_values(proto, "diff" if return_diff else "data")
    return values.reshape(proto_shape(proto))
