"""Images loaded the way Caffe loads them through OpenCV, on Pillow + NumPy.

Caffe reads files with ``cv::imread`` (``ReadImageToCVMat``), decodes encoded
Datums with ``cv::imdecode`` (IMREAD_COLOR / IMREAD_GRAYSCALE, or -1 =
IMREAD_UNCHANGED in ``DecodeDatumToCVMatNative``), resizes with ``cv::resize``
(bilinear) and encodes with ``cv::imencode``.  This module returns the same
uint8 (H, W, C) BGR arrays without OpenCV; ``set_backend("opencv")`` makes
every function call cv2 instead.

Reference: opencv-python 5.0.0 (libjpeg-turbo 3.1, libpng 1.6); Caffe itself
used OpenCV 2.4/3.x.  Checked against cv2 5.0 (tests/test_data_image.py
repeats the checks whenever cv2 is importable):

Bit for bit equal
  * ``resize``: 14,700 random size pairs (up, down, non-integer factors,
    1-pixel sources and outputs, 1/3/4 channels) and the shared photos.
  * JPEG (4:4:4, 4:2:0, 4:2:2 progressive, grey, CMYK) in all three modes,
    given a Pillow whose libjpeg-turbo decodes like OpenCV's (slow integer
    IDCT, fancy upsampling: true of the wheels); PNG (1/2/4/8/16-bit grey,
    palette, tRNS, grey+alpha, 8-bit RGB(A)), BMP, TIFF, PPM/PGM, WebP, GIF;
    EXIF orientations 1-8 (JPEG, PNG, WebP, TIFF).
  * ``imencode(img, "jpg")``: the very bytes of cv2.imencode (quality 95).
Not bit for bit
  * grey from a 16-bit colour PNG: libpng weighs the 16-bit samples, Pillow
    exposes only their high bytes (we assume a low byte of 128): off by 1 on
    about 17% of pixels (random data), never more.
  * ``imencode(img, "png")``: the same pixels (lossless, zlib level 1 as
    OpenCV), other bytes (Pillow chooses its own PNG row filters).
  * formats OpenCV cannot read (ICO, TGA, PCX...) load anyway, grey with
    cvtColor's weights.

Conversions, as OpenCV's decoders do them:
  * colour from grey: the value in B, G and R; 16-bit samples keep their high
    byte (libpng strip_16, libtiff); alpha is dropped, but TIFF RGBA comes out
    premultiplied, (c * a + 127) // 255, as libtiff's RGBA reader does.
  * grey from colour: JPEG has libjpeg output Y (Pillow ``draft('L')``); PNG
    libpng's truncating (9797 R + 19234 G + 3737 B) >> 15; BMP, TIFF, PPM and
    CMYK JPEG imgcodecs' (4899 R + 9617 G + 1868 B + 8192) >> 14; WebP, GIF
    and the rest cvtColor's (9798 R + 19235 G + 3735 B + 16384) >> 15.
  * CMYK JPEG: k - ((255 - c) * k >> 8) on libjpeg's (Adobe) samples.
  * native: grey stays 1 channel, RGB -> BGR, RGBA -> BGRA; PNG grey+alpha and
    PNG palette/RGB with tRNS -> BGRA; 16-bit and float images raise
    ImageError (Caffe's DataTransformer CHECKs for CV_8U).
  * EXIF orientation: applied in colour and grey mode by imread and imdecode
    alike (OpenCV >= 3.1 imread; 2.4 ignored it), never in native mode.

Resize (INTER_LINEAR, uint8): source x = (dx + 0.5) * scale - 0.5 in float32,
weights rint((1 - fx) * 2048) and rint(fx * 2048); horizontally positions past
the edge put weight 2048 on the edge pixel and the sums are exact int32;
vertically rows are clamped but weights are not, and the rounding is that of
OpenCV's SIMD kernel, ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16) + 2 >> 2,
which OpenCV >= 3 applies to whole rows (the textbook (S0*b0 + S1*b1 + 2**21)
>> 22 differs by 1 on ~12% of pixels).  An exact 2x downscale in both axes is
OpenCV's INTER_AREA, (a + b + c + d + 2) >> 2: the same numbers.  OpenCV 2.4
(as its source reads) rounded the last 1-4 values of each row (of W * C) the
textbook way, so Caffe built on 2.4 can differ there by 1.

Truncated files are errors, never padded: Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` must keep its default (False), and a PNG
must reach its IEND chunk.  cv2.imread pads a truncated JPEG with grey (so
Caffe did); cv2.imdecode refuses it, and the opencv backend uses imdecode.
"""
import io
import os

import numpy

from ..errors import ConfigError, NetlibError, NetlibFileNotFoundError

__all__ = ["ImageError", "imread", "imdecode", "resize", "imencode", "hwc_to_chw",
           "chw_to_hwc", "set_backend", "get_backend"]


class ImageError(NetlibError, ValueError):
    """An image that cannot be read, decoded, resized or encoded.

    The message names the file (or the record, e.g. ``record 00000042``).
    """


_MODES = ("color", "gray", "native")
_backend = "pillow"


def set_backend(name):
    """Use ``"pillow"`` (the default: Pillow + NumPy) or ``"opencv"`` (cv2)."""
    global _backend
    if name not in ("pillow", "opencv"):
        raise ConfigError("unknown image backend %r (use 'pillow' or 'opencv')" % (name,))
    if name == "opencv":
        _cv2()
    _backend = name


def get_backend():
    """The backend in use: ``"pillow"`` or ``"opencv"``."""
    return _backend


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError("the 'opencv' image backend needs cv2 "
                          "(pip install opencv-python-headless)") from None
    return cv2


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading images needs Pillow (pip install Pillow)") from None
    return Image


# ----------------------------------------------------------------------------- reading

def imread(path, color=True):
    """Read an image file like ``cv::imread(path, IMREAD_COLOR / IMREAD_GRAYSCALE)``.

    Returns a C-contiguous uint8 array, (H, W, 3) BGR when ``color`` else
    (H, W, 1).  A missing file raises NetlibFileNotFoundError; an unreadable,
    non-image or truncated one ImageError; both name ``path``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NetlibFileNotFoundError("%s: no such image file" % path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ImageError("%s: cannot read image file (%s)" % (path, exc.strerror or exc)) from None
    return imdecode(data, "color" if color else "gray", what=path)


def imdecode(buf, mode="color", what="<buffer>"):
    """Decode an encoded image (bytes-like) like ``cv::imdecode``.

    ``mode``: "color" (IMREAD_COLOR: (H, W, 3) BGR), "gray" (IMREAD_GRAYSCALE:
    (H, W, 1)) or "native" (IMREAD_UNCHANGED: 1, 3 (BGR) or 4 (BGRA) channels,
    8-bit images only).  ``what`` names the source in error messages.
    """
    if mode not in _MODES:
        raise ConfigError("imdecode mode must be one of %s, not %r" % (", ".join(_MODES), mode))
    data = buf.tobytes() if isinstance(buf, numpy.ndarray) else bytes(buf)
    if not data:
        raise ImageError("%s: empty image data" % what)
    if _backend == "opencv":
        return _cv2_decode(data, mode, what)
    return _pillow_decode(data, mode, what)


def _cv2_decode(data, mode, what):
    cv2 = _cv2()
    flag = {"color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE,
            "native": cv2.IMREAD_UNCHANGED}[mode]
    try:
        img = cv2.imdecode(numpy.frombuffer(data, numpy.uint8), flag)
    except cv2.error as exc:
        raise ImageError("%s: OpenCV could not decode this image (%s)"
                         % (what, str(exc).strip().splitlines()[-1])) from None
    if img is None:
        raise ImageError("%s: OpenCV could not decode this image" % what)
    if img.dtype != numpy.uint8:
        raise ImageError("%s: only 8-bit images are supported (this one is %s)"
                         % (what, img.dtype))
    return _hwc(img)


def _hwc(img):
    return numpy.ascontiguousarray(img[:, :, None] if img.ndim == 2 else img)


# Formats whose OpenCV decoder turns colour into grey with imgcodecs' own
# 14-bit weights (the others use libpng's, libjpeg's or cvtColor's).
_ICVT_GRAY = ("BMP", "DIB", "TIFF", "PPM", "SUN")


def _pillow_decode(data, mode, what):
    Image = _pil()
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        args = img.tile[0][3] if img.tile else ""  # the decoder's raw mode
        raw = args[0] if isinstance(args, tuple) and args else args
        rawmode = raw if isinstance(raw, str) else ""
        if mode == "gray" and fmt == "JPEG" and img.mode in ("L", "RGB"):
            img.draft("L", img.size)  # libjpeg outputs the Y channel itself
        img.load()
        if fmt == "PNG" and data.rfind(b"IEND") < 0:
            raise OSError("image file is truncated (no IEND chunk)")
        orientation = img.getexif().get(0x0112, 1) if mode != "native" else 1
        arr = _to_array(img, fmt, rawmode, mode, what)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError...
        raise ImageError("%s: cannot decode image (%s)" % (what, exc)) from None
    return numpy.ascontiguousarray(_orient(arr, orientation))


def _to_array(img, fmt, rawmode, mode, what):
    """Pillow image -> (H, W, C) uint8 in OpenCV's channel order for ``mode``."""
    m = img.mode
    deep = m.startswith("I;16") or rawmode.endswith((";16B", ";16L", ";16N"))
    if m in ("I", "F") or (deep and mode == "native"):
        raise ImageError("%s: only 8-bit images are supported (this one is %s, %s)"
                         % (what, m, rawmode or "?"))
    if m.startswith("I;16"):
        a = numpy.asarray(img).astype(numpy.uint16)
        return _gray_as(mode, (a >> 8).astype(numpy.uint8))
    if m in ("1", "L"):
        return _gray_as(mode, numpy.asarray(img.convert("L")))
    if m == "LA":
        la = numpy.asarray(img)
        if mode == "native" and fmt == "PNG":  # libpng expands grey+alpha to RGBA
            return la[:, :, [0, 0, 0, 1]]
        return _gray_as(mode, la[:, :, 0])
    if m == "CMYK":
        rgb = _cmyk_to_rgb(numpy.asarray(img), rawmode.endswith(";I"))
        if mode == "gray":
            return _gray(rgb, "BMP")[:, :, None]
        return rgb[:, :, ::-1]
    alpha = m in ("RGBA", "RGBa", "PA", "La") or fmt == "PNG" and "transparency" in img.info
    if mode == "native" and alpha:
        rgba = numpy.asarray(img if m == "RGBA" else img.convert("RGBA"))
        if fmt == "TIFF":
            rgba = numpy.concatenate([_premultiply(rgba), rgba[:, :, 3:]], axis=2)
        return rgba[:, :, [2, 1, 0, 3]]
    if m == "RGBA" and fmt == "TIFF":
        rgb = _premultiply(numpy.asarray(img))
    else:
        rgb = numpy.asarray(img if m == "RGB" else img.convert("RGB"))
    if mode != "gray":
        return rgb[:, :, ::-1]
    if fmt == "PNG" and deep:
        return _png16_gray(rgb)[:, :, None]
    return _gray(rgb, fmt)[:, :, None]


def _gray_as(mode, gray):
    # Grey pixels: one channel, or the same value in B, G and R for "color".
    if mode == "color":
        return numpy.repeat(gray[:, :, None], 3, axis=2)
    return gray[:, :, None]


def _gray(rgb, fmt):
    """RGB uint8 -> grey with the weights OpenCV's decoder for ``fmt`` uses."""
    r, g, b = (rgb[:, :, i].astype(numpy.int32) for i in range(3))
    if fmt == "PNG":  # libpng png_set_rgb_to_gray(0.299, 0.587): truncates
        y = (9797 * r + 19234 * g + 3737 * b) >> 15
    elif fmt in _ICVT_GRAY:  # imgcodecs icvCvt_BGR2Gray_8u_C3C1R
        y = (4899 * r + 9617 * g + 1868 * b + 8192) >> 14
    else:  # cvtColor(COLOR_BGR2GRAY)
        y = (9798 * r + 19235 * g + 3735 * b + 16384) >> 15
    return y.astype(numpy.uint8)


def _png16_gray(rgb):
    # libpng converts 16-bit samples; Pillow kept the high bytes only, so
    # take the middle of each sample's range (off by at most 1).
    r, g, b = (rgb[:, :, i].astype(numpy.int64) * 256 + 128 for i in range(3))
    return (((9797 * r + 19234 * g + 3737 * b + 16384) >> 15) >> 8).astype(numpy.uint8)


def _premultiply(rgba):
    # libtiff's TIFFReadRGBAImage premultiplies unassociated alpha.
    a = rgba[:, :, 3:].astype(numpy.int32)
    return ((rgba[:, :, :3] * a + 127) // 255).astype(numpy.uint8)


def _cmyk_to_rgb(cmyk, inverted):
    # OpenCV's icvCvt_CMYK2BGR on libjpeg's samples; Pillow hands Adobe
    # (inverted) CMYK back already inverted, so undo that first.
    v = cmyk.astype(numpy.int32)
    if inverted:
        v = 255 - v
    k = v[:, :, 3:]
    return (k - ((255 - v[:, :, :3]) * k >> 8)).astype(numpy.uint8)


def _orient(a, orientation):
    """Apply an EXIF orientation (1-8) to an (H, W, C) array."""
    if orientation in (5, 6, 7, 8):
        a = a.transpose(1, 0, 2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    return a


# ----------------------------------------------------------------------------- resizing

def _taps(src, dst, clamp):
    """Source indices and 11-bit weights of OpenCV's bilinear taps."""
    scale = 1.0 / (dst / src)  # OpenCV: scale = 1 / inv_scale, in double
    f = ((numpy.arange(dst) + 0.5) * scale - 0.5).astype(numpy.float32)
    i = numpy.floor(f)
    f = f - i
    i = i.astype(numpy.intp)
    if clamp:  # x only: past the edge, all weight on the edge pixel
        f[(i < 0) | (i >= src - 1)] = 0
        i = numpy.clip(i, 0, src - 1)
    w0 = numpy.rint((numpy.float32(1) - f) * numpy.float32(2048)).astype(numpy.int32)
    w1 = numpy.rint(f * numpy.float32(2048)).astype(numpy.int32)
    return numpy.clip(i, 0, src - 1), numpy.clip(i + 1, 0, src - 1), w0, w1


def resize(img, height, width):
    """``cv::resize(img, Size(width, height))`` (INTER_LINEAR) for uint8 images.

    ``img`` is (H, W, C) (or (H, W)) uint8; returns a new C-contiguous
    (height, width, C) uint8 array with OpenCV's fixed-point numbers.
    """
    img = numpy.asarray(img)
    if img.dtype != numpy.uint8 or img.ndim not in (2, 3) or 0 in img.shape:
        raise ImageError("resize: expected a non-empty (H, W, C) uint8 image, got %s %s"
                         % (img.dtype, img.shape))
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ImageError("resize: output size %sx%s must be positive integers" % (height, width))
    height, width = int(height), int(width)
    flat = img.ndim == 2
    if flat:
        img = img[:, :, None]
    if _backend == "opencv":
        out = _hwc(_cv2().resize(img, (width, height), interpolation=_cv2().INTER_LINEAR))
        out = out.reshape(height, width, img.shape[2])
    else:
        out = _resize_linear(img, height, width)
    return out[:, :, 0] if flat else out


def _resize_linear(img, height, width):
    H, W, _ = img.shape
    if (H, W) == (height, width):
        return img.copy()
    if H == 2 * height and W == 2 * width:  # OpenCV switches to INTER_AREA
        s = img.astype(numpy.uint16)
        s = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
        return ((s + 2) >> 2).astype(numpy.uint8)
    x0, x1, a0, a1 = _taps(W, width, clamp=True)
    y0, y1, b0, b1 = _taps(H, height, clamp=False)
    # Rows as flat (W*C) vectors: tap j of output value (x, c) reads x_j*C + c.
    C = img.shape[2]
    lanes = numpy.arange(C)
    i0, i1 = (x0[:, None] * C + lanes).ravel(), (x1[:, None] * C + lanes).ravel()
    # Horizontal pass, exact in int32, on the source rows used only; the
    # vertical pass needs the sums >> 4 (OpenCV packs them to int16).
    rows, inv = numpy.unique(numpy.concatenate([y0, y1]), return_inverse=True)
    src = img.reshape(H, W * C)[rows]
    horiz = numpy.take(src, i0, axis=1) * numpy.repeat(a0, C)
    horiz += numpy.take(src, i1, axis=1) * numpy.repeat(a1, C)
    horiz >>= 4
    # Vertical pass with OpenCV's VResizeLinearVec_32s8u rounding:
    # ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16) + 2 >> 2.
    out = numpy.take(horiz, inv[:height], axis=0)
    out *= b0[:, None]
    out >>= 16
    low = numpy.take(horiz, inv[height:], axis=0)
    low *= b1[:, None]
    low >>= 16
    out += low
    out += 2
    out >>= 2
    numpy.minimum(out, 255, out=out)
    return out.astype(numpy.uint8).reshape(height, width, C)


# ----------------------------------------------------------------------------- writing

def imencode(img, ext):
    """Encode like ``cv::imencode("." + ext, img)``: JPEG quality 95, PNG zlib level 1.

    ``img`` is (H, W, C) BGR uint8 with C = 1 or 3 (4, BGRA, for PNG);
    ``ext`` "jpg", "jpeg" or "png" (a leading dot is allowed).  Returns bytes.
    """
    img = numpy.asarray(img)
    ext = str(ext).lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png"):
        raise ImageError("imencode: unsupported format %r (use jpg or png)" % ext)
    if img.ndim == 2:
        img = img[:, :, None]
    channels = (1, 3, 4) if ext == "png" else (1, 3)
    if img.dtype != numpy.uint8 or img.ndim != 3 or img.shape[2] not in channels or 0 in img.shape:
        raise ImageError("imencode: cannot encode a %s %s array as %s"
                         % (img.dtype, img.shape, ext))
    if _backend == "opencv":
        ok, buf = _cv2().imencode("." + ext, img)
        if not ok:
            raise ImageError("imencode: OpenCV could not encode a %s image" % ext)
        return buf.tobytes()
    # BGR(A) -> Pillow's L, RGB or RGBA (the mode follows from the shape).
    pixels = img[:, :, {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[img.shape[2]]]
    pil = _pil().fromarray(numpy.ascontiguousarray(pixels[:, :, 0] if img.shape[2] == 1 else pixels))
    out = io.BytesIO()
    if ext == "png":
        pil.save(out, "PNG", compress_level=1)
    else:
        pil.save(out, "JPEG", quality=95)
    return out.getvalue()


# ----------------------------------------------------------------------------- layout

def hwc_to_chw(img):
    """(H, W, C) -> C-contiguous (C, H, W) (an (H, W) image gets C = 1)."""
    img = numpy.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    return numpy.ascontiguousarray(img.transpose(2, 0, 1))


def chw_to_hwc(arr):
    """(C, H, W) -> C-contiguous (H, W, C)."""
    return numpy.ascontiguousarray(numpy.asarray(arr).transpose(1, 2, 0))
