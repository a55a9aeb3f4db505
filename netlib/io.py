"""pycaffe's ``caffe.io``: image loading and resizing, the input Transformer,
oversampling, and BlobProto / Datum <-> ndarray conversion.

``import netlib as caffe`` then ``caffe.io.load_image(...)``,
``caffe.io.Transformer({...})`` etc. behave as in BVLC pycaffe, with the same
numbers.  pycaffe leans on scikit-image (imread, img_as_float, rgb2gray,
transform.resize) and SciPy (ndimage.zoom); netlib does the same arithmetic
with NumPy and Pillow.  The reference it was checked against
(tests/golden/pycaffe_io, made by tools/make_io_goldens.py) is pycaffe on
scikit-image 0.26.0, SciPy 1.17, NumPy 1.26 and Pillow 13.

(netlib's own prototxt / binaryproto / HDF5 readers are in :mod:`netlib.files`.)
"""
import math

import numpy as np

from .errors import NetlibError
from .proto import caffe_pb2

__all__ = ["blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
           "Transformer", "load_image", "resize_image", "oversample"]


# ---------------------------------------------------------------------------------------
# proto / datum <-> ndarray
# ---------------------------------------------------------------------------------------
def blobproto_to_array(blob, return_diff=False):
    """A BlobProto's ``data`` (or ``diff`` when ``return_diff``) as a float64
    array.  When any of the legacy ``num``/``channels``/``height``/``width``
    fields is set the array is 4-D (num, channels, height, width) (a field
    left unset counts as 0); otherwise it takes ``shape.dim``.  As in
    pycaffe, a blob with neither and a single value gives a 0-d array, and one
    whose values do not fit the shape raises a ValueError (netlib's
    WeightsError, checked before any reshape)."""
    # float64 as pycaffe gave on the protobuf of its time (a list of Python
    # floats); newer protobuf hands NumPy a float32 buffer.
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = (blob.num, blob.channels, blob.height, blob.width) if legacy else tuple(blob.shape.dim)
    values = blob.diff if return_diff else blob.data
    count = 1
    for d in shape:
        count *= int(d)
    if len(values) != count or any(int(d) < 0 for d in shape):
        from .errors import WeightsError        # a ValueError, as pycaffe's reshape error
        raise WeightsError("BlobProto: %d values cannot take the shape %s" % (len(values), shape))
    data = np.array(values, dtype=np.float64)
    return data.reshape(shape)


def array_to_blobproto(arr, diff=None):
    """An N-d array as a BlobProto (``shape.dim`` = arr.shape, ``data`` =
    the values as doubles rounded to float); ``diff``, when given, fills
    ``diff`` (its shape is not checked, as in pycaffe)."""
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(diff.astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    """A list of arrays as a serialized BlobProtoVector (bytes)."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(arr) for arr in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(str):  # noqa: A002 - pycaffe's parameter name
    """A serialized BlobProtoVector (bytes) as a list of float64 arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(str)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label=None):
    """A 3-d (channels, height, width) array as a Datum: uint8 arrays are
    stored as bytes in ``data``, anything else as ``float_data``; ``label``
    is set only when given (so an unlabelled Datum serializes smaller).
    ValueError('Incorrect array shape.') for any other rank."""
    if arr.ndim != 3:
        raise ValueError('Incorrect array shape.')
    from .data.datum import array_to_datum as _array_to_datum
    datum = _array_to_datum(arr)
    if label is not None:
        datum.label = label          # as given (protobuf checks it), as pycaffe does
    return datum


def datum_to_array(datum):
    """A Datum's item as a (channels, height, width) array: uint8 from
    ``data``, float64 from ``float_data`` (as pycaffe; the label is not
    returned, read ``datum.label``).  Encoded (JPEG/PNG) datums are not
    decoded, as in pycaffe; use netlib.data.datum.datum_to_array for those."""
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(
            datum.channels, datum.height, datum.width).copy()
    return np.array(datum.float_data, dtype=np.float64).reshape(
        datum.channels, datum.height, datum.width)


# ---------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------
class TransformerError(NetlibError):
    """pycaffe's Transformer raises a bare Exception; netlib raises this
    subclass of it, with pycaffe's message."""


class Transformer:
    """Turns images (H x W x K arrays, as load_image gives) into net input
    (K x H x W) and back, per input blob.

    ``inputs`` maps input names to their blob shapes, e.g.
    ``{'data': net.blobs['data'].data.shape}``.  Configure each input with
    set_transpose / set_channel_swap / set_raw_scale / set_mean /
    set_input_scale; the settings live in the dicts ``transpose``,
    ``channel_swap``, ``raw_scale``, ``mean`` and ``input_scale``.
    """

    def __init__(self, inputs):
        self.inputs = inputs
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def __check_input(self, in_):
        if in_ not in self.inputs:
            raise TransformerError('{} is not one of the net inputs: {}'.format(in_, self.inputs))

    def preprocess(self, in_, data):
        """``data`` (H' x W' x K) as input for blob ``in_`` (K x H x W float32),
        in pycaffe's order: cast to float32; resize_image to the blob's H, W
        when ``data.shape[:2]`` differs from ``inputs[in_][2:]`` (compared as
        tuples, so a list shape always resizes); transpose; channel swap;
        multiply by raw_scale; subtract the mean; multiply by input_scale.

        Quirk kept from pycaffe: a float32 ``data`` that needs no resize and
        no channel swap is scaled and mean-subtracted in place, so the
        caller's array changes when raw_scale, mean or input_scale is set.
        """
        self.__check_input(in_)
        caffe_in = data.astype(np.float32, copy=False)
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        if channel_swap is not None:
            caffe_in = caffe_in[channel_swap, :, :]
        if raw_scale is not None:
            caffe_in *= raw_scale
        if mean is not None:
            caffe_in -= mean
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_, data):
        """Undo preprocess (except the resize) on a copy of ``data``, squeezed
        first (so a (1, K, H, W) blob slice works): divide by input_scale, add
        the mean, divide by raw_scale, undo the channel swap and transpose."""
        self.__check_input(in_)
        decaf_in = data.copy().squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        if mean is not None:
            decaf_in += mean
        if raw_scale is not None:
            decaf_in /= raw_scale
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_, order):
        """Axis order applied to the image, e.g. (2, 0, 1) for HxWxK -> KxHxW;
        ``len(order)`` must be the blob's rank minus one."""
        self.__check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise TransformerError('Transpose order needs to have the same number of '
                                   'dimensions as the input.')
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """Channel order taken after the transpose, e.g. (2, 1, 0) for RGB ->
        BGR; ``len(order)`` must equal the blob's channels."""
        self.__check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise TransformerError('Channel swap needs to have the same number of '
                                   'dimensions as the input channels.')
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Multiplier applied before the mean (255 for [0, 1] images into
        CaffeNet-style [0, 255] models)."""
        self.__check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """Mean subtracted after raw_scale.  A 1-d mean is one value per
        channel (its length must be the blob's channels; ValueError 'Mean
        channels incompatible with input.') and is stored as (C, 1, 1).  A
        2-d or 3-d mean is elementwise; when its shape (a 2-d one counted as
        (1, H, W)) is not the blob's (C, H, W) it is resized to the blob's
        H, W with resize_image after scaling it to [0, 1], then scaled back.
        Other ranks: ValueError 'Mean shape invalid'.

        Kept from pycaffe: a 2-d mean of another size fails (numpy's
        transpose raises ValueError); the resized mean is float32 (pycaffe
        under NumPy 1 computes the rescaling in float32)."""
        self.__check_input(in_)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError('Mean channels incompatible with input.')
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError('Mean shape invalid')
            if ms != tuple(self.inputs[in_][1:]):
                in_shape = self.inputs[in_][1:]
                m_min, m_max = mean.min(), mean.max()
                normal_mean = (mean - m_min) / (m_max - m_min)
                resized = resize_image(normal_mean.transpose((1, 2, 0)),
                                       in_shape[1:]).transpose((2, 0, 1))
                mean = _np1_scalar_op(resized, m_max - m_min, m_min)
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        """Multiplier applied last, after the mean."""
        self.__check_input(in_)
        self.input_scale[in_] = scale


def _np1_scalar_op(arr, scale, shift):
    """``arr * scale + shift`` with NumPy 1 scalar casting (a Python / float64
    scalar does not promote a float32 array), as the reference ran."""
    if arr.dtype == np.float32:
        return arr * np.float32(scale) + np.float32(shift)
    return arr * scale + shift


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def load_image(filename, color=True):
    """An image file as float32 in [0, 1]: (H, W, 3) RGB, or (H, W, 1) when
    the file is grayscale and ``color`` is False; a grayscale file is tiled to
    3 channels when ``color``; an alpha channel is dropped (not composited).

    ``color=False`` converts colour files to luminance as skimage's
    ``rgb2gray`` does (0.2125 R + 0.7154 G + 0.0721 B; RGBA is first blended
    over white).  Pixels are decoded with Pillow as pycaffe's skimage/imageio
    stack does: palette images become their palette's RGB/RGBA, 16-bit gray
    PNGs scale by 1/65535 (16-bit colour PNGs come out of Pillow as 8-bit),
    1-bit images give 0/1, EXIF orientation is not applied.

    Kept from pycaffe: a gray+alpha file gives (H, W, 2) with ``color`` and
    ValueError without; CMYK files keep their first 3 raw channels.
    Differences: stock pycaffe's load_image fails on scikit-image >= 0.16
    (it passes the removed ``as_grey``); netlib gives what it gave when that
    worked (``as_gray``).  GIF/APNG give the first frame only (imageio stacks
    all frames into a 4-d array); TIFFs are read by Pillow (skimage uses
    tifffile).
    """
    img = _img_as_float(_imread(filename, as_gray=not color)).astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError("netlib.io.load_image needs Pillow: pip install Pillow") from None
    return Image


def _imread(filename, as_gray=False):
    """skimage.io.imread (imageio + Pillow plugin) as pycaffe called it."""
    Image = _pil()
    with Image.open(filename) as im:
        im.seek(0)
        if im.mode == "P":
            im = im.convert(im.palette.mode)
        elif im.format == "PNG" and im.mode == "I":
            im = im.convert("I;16")
        arr = np.array(im)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim > 2 and as_gray:
        if arr.shape[2] == 4:
            arr = _rgba2rgb(arr)
        arr = _rgb2gray(arr)
    return arr


def _img_as_float(arr):
    """skimage.img_as_float: unsigned ints scale by 1/max, signed ints by
    1/max clipped at -1, bools to 0/1; floats unchanged."""
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if arr.dtype.kind == "u":
        return np.multiply(arr, 1.0 / np.iinfo(arr.dtype).max, dtype=np.float64)
    if arr.dtype.kind == "i":
        out = np.multiply(arr, 1.0 / np.iinfo(arr.dtype).max, dtype=np.float64)
        return np.maximum(out, -1.0, out=out)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


def _rgba2rgb(arr):
    arr = _img_as_float(arr)
    alpha = arr[..., 3:4]
    return np.clip((1 - alpha) * 1.0 + alpha * arr[..., :3], 0, 1)


def _rgb2gray(arr):
    if arr.shape[-1] != 3:
        raise ValueError("the input array must have size 3 along `channel_axis`, got %s"
                         % (arr.shape,))
    arr = _img_as_float(arr)
    return arr @ np.array([0.2125, 0.7154, 0.0721], dtype=arr.dtype)


def resize_image(im, new_dims, interp_order=1):
    """``im`` (H x W x K) resized to ``new_dims`` (height, width) with spline
    interpolation of order ``interp_order`` (0 nearest, 1 linear, up to 5);
    float32 result.

    As pycaffe: with K of 1 or 3 the image is scaled to [0, 1], resized like
    ``skimage.transform.resize(..., order=interp_order, mode='constant')``
    (scikit-image 0.26: pixel-centre grid, zero padding outside, a Gaussian
    anti-aliasing blur of sigma (factor - 1) / 2 on each downsampled axis,
    output clipped to [0, 1]) and scaled back; a constant image gives that
    constant.  Other K use ``scipy.ndimage.zoom`` semantics (corner-aligned
    grid, no anti-aliasing, no clipping).
    """
    if im.shape[-1] == 1 or im.shape[-1] == 3:
        im_min, im_max = im.min(), im.max()
        if im_max > im_min:
            im_std = (im - im_min) / (im_max - im_min)
            resized_std = _skimage_resize(im_std, new_dims, interp_order)
            resized_im = resized_std * (im_max - im_min) + im_min
        else:
            ret = np.empty((new_dims[0], new_dims[1], im.shape[-1]), dtype=np.float32)
            ret.fill(im_min)
            return ret
    else:
        scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
        resized_im = _ndimage_zoom(im, scale + (1,) * (im.ndim - 2), interp_order)
    return resized_im.astype(np.float32)


def _check_order(order):
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError("Spline interpolation order has to be in the range 0-5.")
    return int(order)


def _float_type(dtype):
    return np.float32 if dtype in (np.float16, np.float32) else np.float64


def _skimage_resize(image, new_dims, order):
    """skimage.transform.resize(image, new_dims, order, mode='constant')
    (scikit-image 0.26 with SciPy >= 1.6: grid-constant zoom, grid_mode)."""
    order = _check_order(order)
    out_shape = tuple(int(d) for d in new_dims) + tuple(image.shape[len(new_dims):])
    if len(out_shape) != image.ndim:
        raise ValueError("len(output_shape) cannot be smaller than the image dimensions")
    image = np.asarray(image)
    if image.dtype == bool or image.dtype.kind in "ui":
        image = _img_as_float(image) if order > 0 else image
    elif image.dtype == np.float16:
        image = image.astype(np.float32)
    work = image.dtype if image.dtype.kind == "f" else np.dtype(np.float64)
    factors = np.divide(image.shape, out_shape)
    anti_alias = (image.dtype != bool and not (image.dtype.kind in "ui" and order == 0)
                  and any(o < i for o, i in zip(out_shape, image.shape)))
    filtered = image
    if anti_alias:
        sigmas = np.maximum(0, (factors - 1) / 2)
        for axis, sigma in enumerate(sigmas):
            if sigma > 1e-15:
                filtered = _gaussian1d(filtered, float(sigma), axis).astype(work, copy=False)
    out = filtered.astype(np.float64)
    if order > 1:  # scipy pads 12 zeros, then spline-prefilters with mirror ends
        npad = 12
        pads = [(npad, npad) if ax < 2 else (0, 0) for ax in range(image.ndim)]
        out = np.pad(out, pads)
        for axis in range(min(2, image.ndim)):
            out = _spline_prefilter(out, order, axis)
    else:
        npad = 0
    for axis in range(min(2, image.ndim)):
        n_in, n_out = image.shape[axis], out_shape[axis]
        if n_in == n_out and order <= 1 and npad == 0:
            continue
        coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5 + npad
        out = _interp_axis(out, coords, order, axis, mode="grid-constant")
    out = out.astype(image.dtype if order == 0 else _float_type(image.dtype), copy=False)
    lo, hi = np.min(image), np.max(image)
    return np.clip(out, lo, hi, out=out) if out.dtype.kind == "f" else np.clip(out, lo, hi)


def _ndimage_zoom(im, zoom, order):
    """scipy.ndimage.zoom(im, zoom, order) with its defaults (mode='constant',
    corner-aligned grid, spline prefilter): output dtype is im's."""
    order = _check_order(order)
    im = np.asarray(im)
    out_shape = tuple(int(round(n * z)) for n, z in zip(im.shape, zoom))
    out = im.astype(np.float64)
    for axis in range(im.ndim):
        n_in, n_out = im.shape[axis], out_shape[axis]
        if n_in == n_out:
            continue  # zoom factor 1: samples land on the input points
        if order > 1:
            out = _spline_prefilter(out, order, axis)
        step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        coords = np.arange(n_out) * step
        out = _interp_axis(out, coords, order, axis, mode="mirror")
    if im.dtype.kind in "ui":
        out = np.round(out)
        info = np.iinfo(im.dtype)
        out = np.clip(out, info.min, info.max)
    return out.astype(im.dtype)


def _gaussian1d(a, sigma, axis, truncate=4.0):
    """scipy.ndimage.gaussian_filter1d with mode='constant', cval=0."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    w = w / w.sum()
    a64 = np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0)
    n = a64.shape[0]
    padded = np.zeros((n + 2 * radius,) + a64.shape[1:])
    padded[radius:radius + n] = a64
    out = np.zeros_like(a64)
    for k in range(2 * radius + 1):
        out += w[k] * padded[k:k + n]
    return np.moveaxis(out, 0, axis)


_POLES = {
    2: [math.sqrt(8.0) - 3.0],
    3: [math.sqrt(3.0) - 2.0],
    4: [math.sqrt(664.0 - math.sqrt(438976.0)) + math.sqrt(304.0) - 19.0,
        math.sqrt(664.0 + math.sqrt(438976.0)) - math.sqrt(304.0) - 19.0],
    5: [math.sqrt(67.5 - math.sqrt(4436.25)) + math.sqrt(26.25) - 6.5,
        math.sqrt(67.5 + math.sqrt(4436.25)) - math.sqrt(26.25) - 6.5],
}


def _spline_prefilter(a, order, axis):
    """B-spline interpolation coefficients along ``axis`` with mirror
    boundaries (scipy.ndimage.spline_filter1d, mode 'mirror')."""
    c = np.moveaxis(np.array(a, dtype=np.float64), axis, 0)
    n = c.shape[0]
    if n == 1:
        return np.moveaxis(c, 0, axis)
    poles = _POLES[order]
    gain = 1.0
    for z in poles:
        gain *= (1.0 - z) * (1.0 - 1.0 / z)
    c *= gain
    for z in poles:
        # causal init, mirror-symmetric extension
        z_n_1 = z ** (n - 1)
        c0 = c[0] + z_n_1 * c[n - 1]
        z_i = z
        for i in range(1, n - 1):
            c0 = c0 + z_i * (c[i] + z_n_1 * c[n - 1 - i])
            z_i *= z
        c[0] = c0 / (1.0 - z_n_1 * z_n_1)
        for i in range(1, n):
            c[i] += z * c[i - 1]
        c[n - 1] = (z * c[n - 2] + c[n - 1]) * z / (z * z - 1.0)
        for i in range(n - 2, -1, -1):
            c[i] = z * (c[i + 1] - c[i])
    return np.moveaxis(c, 0, axis)


def _bspline(order, x):
    """Centred B-spline of degree ``order`` at ``x`` (array)."""
    x = np.abs(x)
    out = np.zeros_like(x)
    half = (order + 1) / 2.0
    for k in range(order + 2):
        t = x + half - k
        out += (-1) ** k * math.comb(order + 1, k) * np.where(t > 0, t, 0.0) ** order
    out /= math.factorial(order)
    return np.where(x < half, out, 0.0)


def _interp_axis(a, coords, order, axis, mode):
    """Sample ``a`` along ``axis`` at ``coords`` with a spline of ``order``
    (``a`` already prefiltered when order > 1).  Taps outside the array are
    0 for 'grid-constant' and mirrored for 'mirror'."""
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    if order == 0:
        start = np.floor(coords + 0.5).astype(np.int64)
        taps, weights = start[:, None], np.ones((len(coords), 1))
    else:
        if order % 2:
            start = np.floor(coords).astype(np.int64) - order // 2
        else:
            start = np.floor(coords + 0.5).astype(np.int64) - order // 2
        taps = start[:, None] + np.arange(order + 1)[None, :]
        if order == 1:
            t = coords - np.floor(coords)
            weights = np.stack([1.0 - t, t], axis=1)
        else:
            weights = _bspline(order, coords[:, None] - taps)
    if mode == "mirror":
        valid = np.ones(taps.shape, dtype=bool)
        if n == 1:
            taps = np.zeros_like(taps)
        else:
            period = 2 * (n - 1)
            taps = np.abs(taps) % period
            taps = np.where(taps >= n, period - taps, taps)
    else:
        valid = (taps >= 0) & (taps < n)
        taps = np.clip(taps, 0, n - 1)
    weights = np.where(valid, weights, 0.0)
    out = np.zeros((len(coords),) + a.shape[1:])
    shape = (len(coords),) + (1,) * (a.ndim - 1)
    for j in range(taps.shape[1]):
        out += weights[:, j].reshape(shape) * a[taps[:, j]]
    return np.moveaxis(out, 0, axis)


def oversample(images, crop_dims):
    """The 10 crops pycaffe classifies per image: the 4 corners and the
    centre, then the same 5 mirrored left-right.  ``images``: a sequence of
    (H x W x K) arrays of one shape; ``crop_dims``: (height, width).
    Returns (10*N, height, width, K) float32, image by image.  The centre
    crop spans ``int(H/2 - height/2)`` to ``int(H/2 + height/2)`` (each end
    truncated, as pycaffe), likewise across."""
    height, width, channels = images[0].shape[0], images[0].shape[1], images[0].shape[-1]
    ch, cw = crop_dims[0], crop_dims[1]
    boxes = [(y, x, y + ch, x + cw) for y in (0, height - ch) for x in (0, width - cw)]
    boxes.append((int(height / 2.0 - ch / 2.0), int(width / 2.0 - cw / 2.0),
                  int(height / 2.0 + ch / 2.0), int(width / 2.0 + cw / 2.0)))
    crops = np.empty((10 * len(images), ch, cw, channels), dtype=np.float32)
    for n, im in enumerate(images):
        for b, (y0, x0, y1, x1) in enumerate(boxes):
            crops[10 * n + b] = im[y0:y1, x0:x1, :]
            crops[10 * n + 5 + b] = im[y0:y1, x0:x1, :][:, ::-1, :]
    return crops
