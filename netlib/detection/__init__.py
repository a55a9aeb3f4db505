"""The SSD fork's deploy layers (weiliu89/caffe, branch ssd).

Importing this package registers Permute, PriorBox, Normalize and
DetectionOutput; :mod:`netlib.detection.bbox` holds the box utilities
(decoding, overlaps, NMS).  The fork's training layers (AnnotatedData,
MultiBoxLoss, DetectionEvaluate) are not implemented.
"""
from . import bbox, permute, priorbox, normalize, detection_output  # noqa: F401
