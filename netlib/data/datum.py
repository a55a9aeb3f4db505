"""Datum records: parse, check, decode to arrays, and build them.

A Datum (caffe.proto) holds one item: ``channels``/``height``/``width``, the
pixels as uint8 bytes in CHW order (BGR for images, as OpenCV gives them) or
as ``float_data``, one int ``label``, and ``encoded`` when ``data`` holds a
JPEG/PNG file instead.  Every function here names the record (database and
key) in its errors, so a bad record in a million is found at once.
"""
import numpy

from google.protobuf import message as _message
from google.protobuf import unknown_fields

from ..errors import NetlibError
from ..files import read_varint
from ..proto import caffe_pb2


class DatumError(NetlibError, ValueError):
    """A record that is not a usable Datum; the message names the record."""


def parse_datum(value, where="<record>"):
    """``value`` (bytes) as a Datum; DatumError if it is not one.  ``where``
    names the record in errors (a string, or a function returning one, so a
    hot loop only builds the name when it is needed).

    Protobuf accepts many byte strings (unknown fields are kept), so a record
    also counts as "not a Datum" when it sets none of the Datum fields or
    carries fields Datum does not have.
    """
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(bytes(value))
    except (_message.DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise DatumError("%s is not a Datum (%s)" % (_name(where), exc)) from None
    if len(unknown_fields.UnknownFieldSet(datum)):
        raise DatumError("%s is not a Datum (it holds fields a Datum does not have)" % _name(where))
    if not any(datum.HasField(f) for f in _SCALAR_FIELDS) and not len(datum.float_data):
        raise DatumError("%s is not a Datum (no Datum field is set)" % _name(where))
    return datum


def _name(where):
    return where() if callable(where) else where


_SCALAR_FIELDS = ("channels", "height", "width", "data", "label", "encoded")


def raw_datum(value):
    """The fast path for the common record, a raw uint8 Datum:
    ``(channels, height, width, label, pixels)`` with ``pixels`` a
    memoryview into ``value`` (no copy), read straight from the protobuf wire
    format.  None for anything else (encoded, float_data, unexpected or
    malformed fields): :func:`parse_datum` then handles the record."""
    view = memoryview(value)
    fields = {}
    pixels = None
    pos, end = 0, len(view)
    try:
        while pos < end:
            key, pos = read_varint(view, pos)
            number, wire = key >> 3, key & 7
            if wire == 0 and number in (1, 2, 3, 5, 7):
                fields[number], pos = read_varint(view, pos)
            elif wire == 2 and number == 4:
                length, pos = read_varint(view, pos)
                if pos + length > end:
                    return None
                pixels = view[pos:pos + length]
                pos += length
            else:
                return None
    except (IndexError, ValueError):
        return None
    if pixels is None or fields.get(7, 0):
        return None
    label = fields.get(5, 0)
    if label >= 1 << 63:  # a negative int32 label, sign-extended to 64 bits
        label -= 1 << 64
    return fields.get(1, 0), fields.get(2, 0), fields.get(3, 0), label, pixels


def decode_mode(force_color=False, force_gray=False):
    """The imdecode mode for an encoded Datum (Caffe's DataTransformer)."""
    if force_color and force_gray:
        from ..errors import ConfigError
        raise ConfigError("cannot set both force_color and force_gray")
    return "color" if force_color else "gray" if force_gray else "native"


def datum_to_array(datum, where="<record>", mode="native"):
    """The Datum's item as a CHW array: uint8 for pixel data (decoded first
    when ``encoded``, with ``mode`` 'native', 'color' or 'gray'), float32
    for ``float_data``.  Checks that the size matches the shape."""
    if datum.encoded:
        from .image import hwc_to_chw, imdecode
        return hwc_to_chw(imdecode(datum.data, mode, what=where))
    c, h, w = datum.channels, datum.height, datum.width
    if c <= 0 or h <= 0 or w <= 0:
        raise DatumError("%s has shape %dx%dx%d (channels x height x width must be positive)"
                         % (where, c, h, w))
    size = c * h * w
    if datum.data:
        if len(datum.data) != size:
            raise DatumError("%s holds %d bytes of data but its shape %dx%dx%d needs %d"
                             % (where, len(datum.data), c, h, w, size))
        return numpy.frombuffer(datum.data, dtype=numpy.uint8).reshape(c, h, w)
    if len(datum.float_data) != size:
        raise DatumError("%s holds %d float_data values but its shape %dx%dx%d needs %d"
                         % (where, len(datum.float_data), c, h, w, size))
    return numpy.asarray(datum.float_data, dtype=numpy.float32).reshape(c, h, w)


def datum_shape(datum, where="<record>", mode="native"):
    """(C, H, W) of the item (an encoded one is decoded to find out)."""
    if datum.encoded:
        return datum_to_array(datum, where, mode).shape
    datum_to_array(datum, where, mode)  # validates
    return (datum.channels, datum.height, datum.width)


def array_to_datum(arr, label=None):
    """pycaffe's ``caffe.io.array_to_datum``: a (C, H, W) array as a Datum;
    uint8 arrays go to ``data`` (bytes), anything else to ``float_data``."""
    arr = numpy.asarray(arr)
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape: a Datum holds a (channels, height, width) array, got %s"
                         % (arr.shape,))
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == numpy.uint8:
        datum.data = numpy.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = int(label)
    return datum


def encoded_datum(buf, label=None):
    """A Datum holding an encoded image file (``encoded: true``)."""
    datum = caffe_pb2.Datum()
    datum.data = bytes(buf)
    datum.encoded = True
    if label is not None:
        datum.label = int(label)
    return datum
