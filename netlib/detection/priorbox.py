"""PriorBox (SSD fork): the default boxes of one feature map."""
import math

import numpy

from ..errors import ConfigError, ShapeError
from .. import forward_mode
from .. import second_order
from ..layer import Layer, register_layer


def prior_aspect_ratios(aspect_ratio, flip):
    """1 first, then each new ratio r (and 1/r when ``flip``); a ratio within
    1e-6 of one already listed is ignored (the fork's rule)."""
    ratios = [1.0]
    for ar in aspect_ratio:
        ar = float(numpy.float32(ar))
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(ar)
        if flip:
            ratios.append(float(numpy.float32(1.0 / ar)))
    return ratios


@register_layer("PriorBox")
class PriorBoxLayer(Layer):
    """Default boxes for every cell of ``bottom[0]`` (N x C x H x W), for an
    image of ``bottom[1]``'s size (N x C x IH x IW) unless img_size / img_h,
    img_w say otherwise.

    ``prior_box_param``: min_size (required, > 0, repeated), max_size (none
    or one per min_size, each > its min_size), aspect_ratio (1 is always
    first; a repeated ratio is ignored; ``flip`` (default true) adds 1/r after
    each r), clip (false), variance (1 value or 4; default 0.1), step or
    step_h/step_w (default: image size / feature size, per axis), offset (0.5).

    Priors per cell, for each min_size s in order: the s x s box, then (when
    max sizes are given) the sqrt(s * max) square, then for every ratio
    r != 1 the box (s sqrt(r)) x (s / sqrt(r)).  Cells run row by row
    (h, then w).  Centre of cell (h, w): ((w + offset) step_w, (h + offset)
    step_h); a box is (cx - bw/2) / IW, (cy - bh/2) / IH, (cx + bw/2) / IW,
    (cy + bh/2) / IH, clipped to [0, 1] when ``clip``.

    Top: 1 x 2 x (H * W * num_priors * 4); row 0 the boxes, row 1 the
    variances (the 4 values repeated, or the single value everywhere).
    Quirks kept: min_size and max_size are truncated to integers (the fork
    stores them in an ``int``); the centre and the box sizes are rounded to
    float32 and the coordinates divided in float64, as its float / double
    expressions do.  No backward (the bottoms only give sizes).
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    jvp = forward_mode.zero_jvp  # d top = 0 (the priors depend only on shapes).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

    def setup(self, bottom, top):
        p = self.layer_param.prior_box_param
        err = lambda msg: self.fail("prior_box_param: " + msg, bottom=bottom, error=ConfigError)  # noqa: E731
        if not len(p.min_size):
            err("min_size is required (the fork's 'must provide min_size')")
        self.min_sizes = [float(s) for s in p.min_size]
        if any(not s > 0 for s in self.min_sizes):
            err("min_size must be positive, got %s" % self.min_sizes)
        self.max_sizes = [float(s) for s in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                err("give one max_size per min_size (%d min_size, %d max_size)"
                    % (len(self.min_sizes), len(self.max_sizes)))
            for lo, hi in zip(self.min_sizes, self.max_sizes):
                if not hi > lo:
                    err("max_size %g must be greater than min_size %g" % (hi, lo))
        self.aspect_ratios = prior_aspect_ratios(p.aspect_ratio, p.flip)
        self.num_priors = len(self.aspect_ratios) * len(self.min_sizes) + len(self.max_sizes)
        variance = [float(v) for v in p.variance]
        if len(variance) > 1 and len(variance) != 4:
            err("give 1 or 4 variance values, got %d" % len(variance))
        if any(not v > 0 for v in variance):
            err("variance values must be positive, got %s" % variance)
        self.variance = variance or [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                err("give img_size or img_h/img_w, not both")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
            if self.img_h <= 0 or self.img_w <= 0:
                err("img_h and img_w must both be set and positive (got %d, %d)" % (self.img_h, self.img_w))
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                err("img_size must be positive")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                err("give step or step_h/step_w, not both")
            self.step_h, self.step_w = float(p.step_h), float(p.step_w)
            if not (self.step_h > 0 and self.step_w > 0):
                err("step_h and step_w must both be set and positive (got %g, %g)"
                    % (self.step_h, self.step_w))
        elif p.HasField("step"):
            if not p.step > 0:
                err("step must be positive")
            self.step_h = self.step_w = float(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self.offset = float(p.offset)
        self.clip = bool(p.clip)
        self._key = None
        self._cached = None

    def reshape(self, bottom, top):
        if bottom[0].ndim < 2:
            self.fail("bottom[0] must be a feature map (N x C x H x W)", bottom=bottom, error=ShapeError)
        n = bottom[0].height * bottom[0].width * self.num_priors * 4
        if n <= 0:
            self.fail("the feature map has no cells", bottom=bottom, error=ShapeError)
        top[0].reshape((1, 2, n))

    def box_sizes(self):
        """(num_priors, 2) widths and heights in pixels, in the fork's order (float32)."""
        sizes = []
        for s, smin in enumerate(self.min_sizes):
            smin = int(smin)
            sizes.append((smin, smin))
            if self.max_sizes:
                side = math.sqrt(smin * int(self.max_sizes[s]))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                sizes.append((smin * math.sqrt(ar), smin / math.sqrt(ar)))
        return numpy.array(sizes, dtype=numpy.float32)

    def forward(self, bottom, top):
        xp = top[0].xp
        lh, lw = bottom[0].height, bottom[0].width
        if self.img_h == 0 or self.img_w == 0:
            ih, iw = bottom[1].height, bottom[1].width
        else:
            ih, iw = self.img_h, self.img_w
        if self.step_h == 0 or self.step_w == 0:
            step_w = numpy.float32(numpy.float32(iw) / numpy.float32(lw))
            step_h = numpy.float32(numpy.float32(ih) / numpy.float32(lh))
        else:
            step_w, step_h = numpy.float32(self.step_w), numpy.float32(self.step_h)
        key = (lh, lw, ih, iw, float(step_h), float(step_w), top[0].dtype)
        if key == self._key and self._cached is not None:
            top[0].data[...] = self._cached
            return
        off = numpy.float32(self.offset)
        f32 = numpy.float32
        # cell centres (float32 as the fork), shaped (H, W, 1)
        cx = ((xp.arange(lw, dtype=f32) + off) * step_w).astype(numpy.float64)[None, :, None]
        cy = ((xp.arange(lh, dtype=f32) + off) * step_h).astype(numpy.float64)[:, None, None]
        half = xp.asarray(self.box_sizes().astype(numpy.float64) / 2.0)  # (P, 2)
        boxes = xp.empty((lh, lw, self.num_priors, 4), dtype=numpy.float64)
        boxes[..., 0] = (cx - half[:, 0]) / iw
        boxes[..., 1] = (cy - half[:, 1]) / ih
        boxes[..., 2] = (cx + half[:, 0]) / iw
        boxes[..., 3] = (cy + half[:, 1]) / ih
        out = top[0].data.reshape(2, -1)
        out[0] = boxes.astype(top[0].dtype).reshape(-1)
        if self.clip:
            xp.clip(out[0], 0, 1, out=out[0])
        var = xp.asarray(numpy.array(self.variance, dtype=top[0].dtype))
        out[1].reshape(-1, len(self.variance))[...] = var
        self._key = key
        self._cached = out.copy()
