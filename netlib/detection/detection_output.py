"""DetectionOutput (SSD fork): decode, per-class NMS, keep the best."""
import numpy

from .. import backend
from ..errors import ConfigError, LayerError, ShapeError
from ..layer import Layer, register_layer
from .bbox import CODE_TYPE_NAMES, CORNER, decode_boxes, nms


@register_layer("DetectionOutput")
class DetectionOutputLayer(Layer):
    """Detections of an SSD head, as the fork's CPU forward computes them.

    Bottoms: ``loc`` N x (P * L * 4) with L = 1 when ``share_location`` else
    num_classes (per prior, per location class, 4 offsets); ``conf``
    N x (P * num_classes) (per prior, per class; already softmaxed);
    ``priors`` 1 x 2 x (P * 4) (PriorBox layout: boxes, then variances).
    As in the fork, P is ``priors.height / 4`` and the counts are checked
    against ``loc.channels`` and ``conf.channels`` (so loc and conf are 2-D
    or N x K x 1 x 1).

    ``detection_output_param``: num_classes (required, > 0), share_location
    (true), background_label_id (0; -1 for none), code_type (CORNER,
    CENTER_SIZE, CORNER_SIZE), variance_encoded_in_target (false),
    nms_param {nms_threshold (0.3), top_k (all), eta (1)}, keep_top_k (-1:
    all), confidence_threshold (unset: every score).  The save / visualize
    options are not supported (refused when set).

    Per image and per class c != background: candidates are the priors with
    score > confidence_threshold, best first, cut to top_k, then greedy
    (adaptive) NMS on the decoded boxes of c's location class (see
    :mod:`netlib.detection.bbox`).  If keep_top_k > -1 and the image has more
    detections, the keep_top_k best by score over all classes remain.
    Top: 1 x 1 x D x 7 rows ``[image, label, score, xmin, ymin, xmax,
    ymax]``, by image, then by increasing label, then by decreasing score (the
    order of the fork's per-label map).  Boxes are not clipped.  With no
    detection at all the top is 1 x 1 x N x 7: one row ``[i, -1, -1, -1, -1,
    -1, -1]`` per image, as the fork outputs.

    Ties: the per-class sort is stable (the fork's stable_sort); the fork's
    keep_top_k sort is not stable, so which of equal scores survive at the
    cut is unspecified there; netlib keeps the earlier (lower label, better
    NMS rank) one.  Decoding runs on the blobs' array module; NMS runs on
    the host copy of the decoded boxes (the fork's GPU layer also copies to
    the CPU for NMS).  No backward.
    """

    exact_num_bottom_blobs = 3
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.detection_output_param
        err = lambda msg: self.fail("detection_output_param: " + msg, bottom=bottom, error=ConfigError)  # noqa: E731
        if not p.HasField("num_classes") or p.num_classes <= 0:
            err("num_classes must be set to a positive number (got %s)"
                % (p.num_classes if p.HasField("num_classes") else "none"))
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        self.code_type = int(p.code_type)
        if self.code_type not in CODE_TYPE_NAMES:
            err("unknown code_type %d" % self.code_type)
        self.variance_encoded_in_target = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (float(p.confidence_threshold) if p.HasField("confidence_threshold")
                                     else -float(numpy.finfo(numpy.float32).max))
        nmsp = p.nms_param
        self.nms_threshold = float(nmsp.nms_threshold)
        if self.nms_threshold < 0:
            err("nms_param.nms_threshold must be non-negative, got %g" % self.nms_threshold)
        self.eta = float(nmsp.eta)
        if not 0 < self.eta <= 1:
            err("nms_param.eta must be in (0, 1], got %g" % self.eta)
        self.top_k = int(nmsp.top_k) if nmsp.HasField("top_k") else -1
        if p.save_output_param.output_directory or p.visualize:
            err("save_output_param.output_directory and visualize are not supported "
                "(netlib writes no detection files; read the top blob instead)")

    def reshape(self, bottom, top):
        loc, conf, priors = bottom
        if loc.num != conf.num:
            self.fail("loc and conf must have the same number of images (%d vs %d)" % (loc.num, conf.num),
                      bottom=bottom, error=ShapeError)
        if priors.height % 4 or priors.channels != 2:
            self.fail("priors must be 1 x 2 x (num_priors * 4) (a PriorBox top)",
                      bottom=bottom, error=ShapeError)
        self.num_priors = priors.height // 4
        if self.num_priors * self.num_loc_classes * 4 != loc.channels or loc.count_axes(2) != 1:
            self.fail("number of priors (%d) must match the location predictions: loc needs %d x %d x 4 "
                      "= %d channels" % (self.num_priors, self.num_priors, self.num_loc_classes,
                                          self.num_priors * self.num_loc_classes * 4),
                      bottom=bottom, error=ShapeError)
        if self.num_priors * self.num_classes != conf.channels or conf.count_axes(2) != 1:
            self.fail("number of priors (%d) must match the confidence predictions: conf needs %d x %d = "
                      "%d channels" % (self.num_priors, self.num_priors, self.num_classes,
                                       self.num_priors * self.num_classes),
                      bottom=bottom, error=ShapeError)
        top[0].reshape((1, 1, 1, 7))

    def forward(self, bottom, top):
        xp = bottom[0].xp
        num = bottom[0].num
        P, L, C = self.num_priors, self.num_loc_classes, self.num_classes
        flat = bottom[2].data.reshape(-1)
        prior_boxes = flat[:P * 4].reshape(P, 4)
        variances = flat[P * 4:2 * P * 4].reshape(P, 4)
        if self.code_type != CORNER:
            pw = prior_boxes[:, 2] - prior_boxes[:, 0]
            ph = prior_boxes[:, 3] - prior_boxes[:, 1]
            if bool(((pw <= 0) | (ph <= 0)).any()):
                self.fail("a prior box has no positive width/height (code_type %s needs them)"
                          % CODE_TYPE_NAMES[self.code_type], bottom=bottom, error=LayerError)
        loc = bottom[0].data.reshape(num, P, L, 4).transpose(0, 2, 1, 3)  # N, L, P, 4
        decoded = decode_boxes(xp, loc, prior_boxes, variances, self.code_type,
                               self.variance_encoded_in_target)
        decoded = backend.to_numpy(decoded)
        scores = backend.to_numpy(bottom[1].data).reshape(num, P, C)
        rows = []
        for i in range(num):
            picked = []  # (label, indices best first)
            for c in range(C):
                if c == self.background_label_id:
                    continue
                boxes = decoded[i, 0 if self.share_location else c]
                s = numpy.ascontiguousarray(scores[i, :, c])
                keep = nms(numpy, boxes, s, self.confidence_threshold, self.nms_threshold,
                           self.eta, self.top_k)
                if keep.shape[0]:
                    picked.append((c, keep, s[keep]))
            total = sum(k.shape[0] for _, k, _ in picked)
            if self.keep_top_k > -1 and total > self.keep_top_k:
                labels = numpy.concatenate([numpy.full(k.shape[0], c) for c, k, _ in picked])
                idx = numpy.concatenate([k for _, k, _ in picked])
                sc = numpy.concatenate([v for _, _, v in picked])
                best = numpy.argsort(-sc, kind="stable")[:self.keep_top_k]
                # regroup by label (increasing), each in score order
                best = best[numpy.argsort(labels[best], kind="stable")]
                picked = []
                for c in numpy.unique(labels[best]):
                    sel = best[labels[best] == c]
                    picked.append((int(c), idx[sel], sc[sel]))
            for c, keep, sc in picked:
                b = decoded[i, 0 if self.share_location else c][keep]
                block = numpy.empty((keep.shape[0], 7), dtype=decoded.dtype)
                block[:, 0] = i
                block[:, 1] = c
                block[:, 2] = sc
                block[:, 3:] = b
                rows.append(block)
        if rows:
            out = numpy.concatenate(rows)
        else:
            out = numpy.full((num, 7), -1, dtype=top[0].dtype)
            out[:, 0] = numpy.arange(num)
        top[0].reshape((1, 1, out.shape[0], 7))
        top[0].data[...] = xp.asarray(out.reshape(1, 1, -1, 7).astype(top[0].dtype, copy=False))

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.fail("has no backward (as in the SSD fork); do not backpropagate through detections",
                      bottom=bottom, error=LayerError)
