"""The WindowData layer: R-CNN's window files (Caffe's window_data_layer.cpp).

A window file repeats, for every image::

    # image_index
    img_path
    channels
    height
    width
    num_windows
    class_index overlap x1 y1 x2 y2      (num_windows lines, pixel corners inclusive)

Windows with ``overlap >= fg_threshold`` are foreground (their class must be
> 0); those with ``overlap < bg_threshold`` are background (label 0); the rest
are unused.  Each batch holds ``batch_size - int(batch_size * fg_fraction)``
background windows, then the foreground ones, each drawn uniformly.  A window
is expanded by ``context_pad`` (and made square with ``crop_mode: "square"``),
clipped to the image, warped to ``crop_size`` (``transform_param``) with
OpenCV's bilinear resize, mirrored at random with ``transform_param.mirror``,
placed in a zero crop at the padding offset, and gets ``(pixel - mean) *
scale``: the mean from ``transform_param.mean_file`` (read from its centre
``crop_size`` window, shifted by the padding) or ``mean_value``; the scale is
``window_data_param.scale`` (Caffe ignores ``transform_param.scale`` here:
netlib refuses it rather than silently doing so).  Images are read in colour
(BGR); ``cache_images`` keeps the encoded files in memory.

The geometry is Caffe's float32 arithmetic with C's round-half-away-from-zero.
Each window has its own geometry, so the warp runs once per window.
"""
import logging
import math
import os

import numpy

from ..errors import ConfigError, NetlibFileNotFoundError, ParseError, ShapeError
from .. import forward_mode
from .. import second_order
from ..layer import register_layer
from .base import PrefetchingDataLayer
from . import image as _image

log = logging.getLogger("netlib")

_F = numpy.float32


def _round(x):
    """C's round(): halves away from zero."""
    x = float(x)
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def read_window_file(path, root_folder=""):
    """Parse a window file: a list of images ``(index, path, (c, h, w),
    windows)`` with windows as (label, overlap, x1, y1, x2, y2) tuples.
    Errors name the file and line."""
    if not path:
        raise ConfigError("window_data_param.source is not set")
    if not os.path.isfile(path):
        raise NetlibFileNotFoundError("window file %s not found (window_data_param.source)" % path)
    tokens = []
    with open(path, "r", encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            tokens.extend((tok, number) for tok in line.split())
    if not tokens:
        raise ParseError("the window file is empty", path, 1, 1)
    pos = [0]

    def take(kind, what):
        if pos[0] >= len(tokens):
            last = tokens[-1][1]
            raise ParseError("unexpected end of file: expected %s" % what, path, last, 0)
        tok, number = tokens[pos[0]]
        pos[0] += 1
        try:
            return kind(tok)
        except ValueError:
            raise ParseError("expected %s, got %r" % (what, tok), path, number, 0) from None

    def hashtag(tok):
        if tok != "#":
            raise ValueError
        return tok

    images = []
    while pos[0] < len(tokens):
        take(hashtag, "'#' starting an image entry")
        index = take(int, "an image index after '#'")
        img_path = take(str, "an image path")
        size = (take(int, "the channel count"), take(int, "the image height"), take(int, "the image width"))
        count = take(int, "the number of windows")
        if count < 0:
            raise ParseError("negative window count %d" % count, path, tokens[pos[0] - 1][1], 0)
        windows = []
        for _ in range(count):
            windows.append((take(int, "a class index"), take(float, "an overlap"),
                            take(int, "x1"), take(int, "y1"), take(int, "x2"), take(int, "y2")))
        images.append((index, root_folder + img_path, size, windows))
    return images


@register_layer("WindowData")
class WindowDataLayer(PrefetchingDataLayer):
    """Tops: data (batch_size, channels, crop_size, crop_size) and label
    (batch_size,).  See the module docstring for the sampling and warping."""

    exact_num_top_blobs = 2

    def needs_rand(self):
        return True  # windows are drawn at random

    def data_setup(self, top):
        p = self.layer_param.window_data_param
        tp = self.layer_param.transform_param
        for field in ("crop_size", "mirror", "mean_file"):
            if p.HasField(field) and not tp.HasField(field):
                self.fail("window_data_param.%s is ignored by Caffe; give it in transform_param" % field,
                          error=ConfigError)
        if tp.HasField("scale") and tp.scale != 1:
            self.fail("Caffe's WindowData ignores transform_param.scale; set window_data_param.scale",
                      error=ConfigError)
        self.batch_size = int(p.batch_size)
        self.crop_size = int(tp.crop_size)
        if self.crop_size <= 0:
            self.fail("transform_param.crop_size must be positive for WindowData", error=ConfigError)
        self.context_pad = int(p.context_pad)
        if 2 * self.context_pad >= self.crop_size:
            self.fail("context_pad %d leaves nothing of a %d crop" % (self.context_pad, self.crop_size),
                      error=ConfigError)
        if p.crop_mode not in ("warp", "square"):
            self.fail("crop_mode must be 'warp' or 'square', got %r" % p.crop_mode, error=ConfigError)
        self.square = p.crop_mode == "square"
        self.scale = _F(p.scale)
        self.mirror = bool(tp.mirror)
        self.fg_fraction = float(p.fg_fraction)
        try:
            images = read_window_file(p.source, p.root_folder)
        except (ParseError, NetlibFileNotFoundError, ConfigError) as exc:
            raise type(exc)("%s: %s" % (self.describe(), exc)) if not isinstance(exc, ParseError) else exc
        self.images = {}
        self.fg, self.bg = [], []
        hist = {0: 0}
        fg_t, bg_t = _F(p.fg_threshold), _F(p.bg_threshold)
        for index, path, size, windows in images:
            if index in self.images:
                self.fail("image index %d appears twice in %s" % (index, p.source), error=ConfigError)
            self.images[index] = path
            for label, overlap, x1, y1, x2, y2 in windows:
                overlap = _F(overlap)
                if overlap >= fg_t:
                    if label <= 0:
                        self.fail("%s: foreground window of image %d has class %d; classes of foreground "
                                  "windows must be > 0" % (p.source, index, label), error=ConfigError)
                    self.fg.append((index, label, x1, y1, x2, y2))
                    hist[label] = hist.get(label, 0) + 1
                elif overlap < bg_t:
                    self.bg.append((index, 0, x1, y1, x2, y2))
                    hist[0] += 1
        self.channels = images[-1][2][0]
        if self.channels != 3:
            self.fail("the window file %s gives %d channels; WindowData reads colour images (3 channels)"
                      % (p.source, self.channels), error=ShapeError)
        log.info("%s: %d images, %d foreground and %d background windows", self.name, len(images),
                 len(self.fg), len(self.bg))
        for label in sorted(hist):
            log.info("class %d has %d samples", label, hist[label])
        if not self.fg or not self.bg:
            self.fail("%s has %d foreground and %d background windows; both kinds are needed"
                      % (p.source, len(self.fg), len(self.bg)), error=ConfigError)
        self.cache = {}
        if p.cache_images:
            for index, path in self.images.items():
                if not os.path.isfile(path):
                    self.fail("image %s of the window file %s is missing" % (path, p.source),
                              error=NetlibFileNotFoundError)
                with open(path, "rb") as handle:
                    self.cache[index] = handle.read()
        t = self.transformer
        self.mean = t.mean
        if self.mean is not None:
            mc, mh, mw = self.mean.shape
            if mc != self.channels or mh < self.crop_size or mw < self.crop_size:
                self.fail("the mean file %s is %s; it needs %d channels and at least the %d crop"
                          % (tp.mean_file, self.mean.shape, self.channels, self.crop_size), error=ShapeError)
        self.mean_values = t.mean_values
        if self.mean_values is not None and len(self.mean_values) not in (1, self.channels):
            self.fail("specify either 1 mean_value or as many as channels (%d)" % self.channels,
                      error=ShapeError)
        top[0].reshape(self.batch_size, self.channels, self.crop_size, self.crop_size)

    def _read(self, index):
        path = self.images[index]
        try:
            if index in self.cache:
                return _image.imdecode(self.cache[index], "color", what=path)
            return _image.imread(path, True)
        except (NetlibFileNotFoundError, _image.ImageError) as exc:
            raise type(exc)("%s: %s (window file %s)" % (self.describe(), exc,
                                                         self.layer_param.window_data_param.source)) from None

    def _geometry(self, img_h, img_w, x1, y1, x2, y2, mirror):
        """Clipped source box, warped size (h, w) and padding (pad_h, pad_w)."""
        crop = self.crop_size
        out_h = out_w = crop
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.square:
            context_scale = _F(crop) / _F(crop - 2 * self.context_pad)
            half_h = _F(y2 - y1 + 1) / _F(2.0)
            half_w = _F(x2 - x1 + 1) / _F(2.0)
            cx, cy = _F(x1) + half_w, _F(y1) + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _round(cx - half_w * context_scale), _round(cx + half_w * context_scale)
            y1, y2 = _round(cy - half_h * context_scale), _round(cy + half_h * context_scale)
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            px1, py1 = max(0, -x1), max(0, -y1)
            px2, py2 = max(0, x2 - img_w + 1), max(0, y2 - img_h + 1)
            x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
            scale_x, scale_y = _F(crop) / _F(unclipped_w), _F(crop) / _F(unclipped_h)
            out_w = _round(_F(x2 - x1 + 1) * scale_x)
            out_h = _round(_F(y2 - y1 + 1) * scale_y)
            px1, px2 = _round(_F(px1) * scale_x), _round(_F(px2) * scale_x)
            py1 = _round(_F(py1) * scale_y)
            pad_h = py1
            pad_w = px2 if mirror else px1
            out_h = min(out_h, crop - pad_h)
            out_w = min(out_w, crop - pad_w)
        if not (0 <= x1 <= x2 < img_w and 0 <= y1 <= y2 < img_h) or out_h <= 0 or out_w <= 0:
            raise ShapeError("%s: window (%d, %d, %d, %d) lies outside its %dx%d image (window file %s)"
                             % (self.describe(), x1, y1, x2, y2, img_w, img_h,
                                self.layer_param.window_data_param.source))
        return (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w)

    def load_batch(self, b, rng):
        bs, crop, c = self.batch_size, self.crop_size, self.channels
        num_fg = int(_F(bs) * _F(self.fg_fraction))
        picks = [(self.bg, bs - num_fg), (self.fg, num_fg)]
        out = self.buffers.take((bs, c, crop, crop), self.dtype)
        out[...] = 0
        labels = numpy.empty(bs, dtype=self.dtype)
        item = 0
        mean_off = (self.mean.shape[2] - crop) // 2 if self.mean is not None else 0
        for windows, count in picks:
            chosen = rng.integers(0, len(windows), size=count)
            flips = rng.integers(0, 2, size=count).astype(bool) if self.mirror else numpy.zeros(count, bool)
            for k, mirror in zip(chosen, flips):
                index, label, x1, y1, x2, y2 = windows[k]
                img = self._read(index)
                (x1, y1, x2, y2), (oh, ow), (ph, pw) = self._geometry(img.shape[0], img.shape[1],
                                                                      x1, y1, x2, y2, mirror)
                patch = _image.resize(numpy.ascontiguousarray(img[y1:y2 + 1, x1:x2 + 1]), oh, ow)
                if mirror:
                    patch = patch[:, ::-1]
                pixels = patch.transpose(2, 0, 1)  # CHW
                dst = out[item, :, ph:ph + oh, pw:pw + ow]
                if self.mean is not None:
                    m = self.mean[:, mean_off + ph:mean_off + ph + oh, mean_off + pw:mean_off + pw + ow]
                    numpy.subtract(pixels, m, out=dst, dtype=self.dtype)
                elif self.mean_values is not None:
                    values = numpy.broadcast_to(self.mean_values, (c,))
                    numpy.subtract(pixels, values[:, None, None], out=dst, dtype=self.dtype)
                else:
                    dst[...] = pixels
                if self.scale != 1:
                    dst *= self.scale
                labels[item] = label
                item += 1
        return out, labels
    jvp = forward_mode.zero_jvp  # d top = 0 (data layers, piecewise constant outputs).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.
