"""Spatial coordinate maps between NetSpec tops: pycaffe's ``caffe.coord_map``.

A coordinate map is a triple ``(axis, a, b)``: along every spatial axis from
``axis`` on, a coordinate ``x`` of the map's input corresponds to ``a * x + b``
in its output.  ``axis`` is None for maps that do not depend on the axis (the
identity ``(None, 1, 0)`` of pointwise layers); ``a`` and ``b`` are NumPy
arrays with one entry per spatial axis (or plain numbers for the identity).

Per layer (``coord_map``), from the layer's bottom to its top:

* Convolution / Pooling / Im2col with stride s, effective kernel
  k = (kernel - 1) * dilation + 1 and pad p: ``a = 1/s``,
  ``b = (p - (k - 1)/2) / s``;
* Deconvolution: ``a = s``, ``b = (k - 1)/2 - p``;
* Crop with ``axis`` and ``offset``: axis - 1, ``a = 1``, ``b = -offset``;
* the pointwise layers of :data:`PASS_THROUGH_LAYERS`: identity;
* anything else raises :class:`UndefinedMapException`.

The parameters are read from the Function's keywords as given to ``L.<Type>``
(``convolution_param=dict(...)`` / ``crop_param=dict(...)`` if present, else the
plain keywords), not from a generated LayerParameter; defaults are those of
caffe.proto (stride 1, pad 0, dilation 1, conv axis 1, crop axis 2, offset 0).
Legacy ``kernel_h``/``stride_w``... keywords are refused (AssertionError), and
``global_pooling`` is not understood, as in pycaffe.

:func:`crop` uses the map between two tops to make the ``L.Crop`` that aligns
them (FCN's score/upscore crops).  All arithmetic is true division on NumPy
float64 arrays, so results equal pycaffe's bit for bit.
"""
import numpy as np

from .net_spec import layers as L

__all__ = ["PASS_THROUGH_LAYERS", "conv_params", "crop_params", "UndefinedMapException",
           "AxisMismatchException", "coord_map", "compose", "inverse", "coord_map_from_to",
           "crop"]

#: layer types whose output coordinates equal their input coordinates
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log",
                       "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split",
                       "TanH", "Threshold"]

_LEGACY_KEYS = {"kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"}


def conv_params(fn):
    """``(axis, stride, effective_kernel, pad)`` of a conv-like Function.

    stride, kernel and pad are 1-D arrays (one value, or one per spatial
    axis); the effective kernel includes dilation: ``(k - 1) * d + 1``.
    Keywords come from ``convolution_param`` when given (Convolution,
    Deconvolution, Im2col) or else from the plain keywords (also Pooling's).
    A missing ``kernel_size`` raises KeyError; legacy ``_h``/``_w`` keywords
    on the layer raise AssertionError.
    """
    p = fn.params.get("convolution_param", fn.params)
    axis = p.get("axis", 1)
    kernel = np.array(p["kernel_size"], ndmin=1)
    dilation = np.array(p.get("dilation", 1), ndmin=1)
    assert not (_LEGACY_KEYS & set(fn.params)), "cropping does not support legacy _h/_w params"
    stride = np.array(p.get("stride", 1), ndmin=1)
    pad = np.array(p.get("pad", 0), ndmin=1)
    return axis, stride, (kernel - 1) * dilation + 1, pad


def crop_params(fn):
    """``(axis, offset)`` of a Crop Function (defaults: axis 2, offset 0).

    Read from ``crop_param`` when given, else from the plain keywords;
    offset is a 1-D array.
    """
    p = fn.params.get("crop_param", fn.params)
    return p.get("axis", 2), np.array(p.get("offset", 0), ndmin=1)


class UndefinedMapException(Exception):
    """The layer type has no coordinate map (e.g. InnerProduct)."""


class AxisMismatchException(Exception):
    """Two maps start at different axes and cannot be composed."""


def coord_map(fn):
    """The coordinate map ``(axis, scale, shift)`` of one layer Function.

    Output coordinate ``y`` of the layer relates to input ``x`` as
    ``y = scale * x + shift`` (see the module docstring for each type).
    Raises UndefinedMapException for other types.
    """
    kind = fn.type_name
    if kind in ("Convolution", "Pooling", "Im2col"):
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if kind == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if kind in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if kind == "Crop":
        axis, offset = crop_params(fn)
        # a crop map starts one axis before the first cropped one
        return axis - 1, 1, -offset
    raise UndefinedMapException


def compose(base_map, next_map):
    """Chain two maps: ``(ax, a1 * a2, a1 * b2 + b1)``.

    The axis is whichever is not None; two different axes raise
    AxisMismatchException.
    """
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        axis = ax2
    elif ax2 is None or ax1 == ax2:
        axis = ax1
    else:
        raise AxisMismatchException
    return axis, a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The reverse map: ``(ax, 1 / a, -b / a)``."""
    axis, a, b = coord_map
    return axis, 1 / a, -b / a


def _mappable_bottoms(top):
    # Crop maps only its first (cropped) bottom; the second one just gives the size.
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def coord_map_from_to(top_from, top_to):
    """The map from coordinates of ``top_from`` to coordinates of ``top_to``.

    Walks back from ``top_from`` through every mappable layer, recording the
    composed map to each ancestor (layers without a map end that branch), then
    walks back from ``top_to`` until it reaches one of those ancestors and
    composes the ``top_to`` side with the inverse of the ``top_from`` side.
    Ancestors reached by several paths are assumed to map alike (which path is
    recorded depends on set order, as in pycaffe).  Raises RuntimeError when
    no common ancestor is found, AxisMismatchException on conflicting axes.
    """
    from_maps = {top_from: (None, 1, 0)}
    pending = {top_from}
    while pending:
        top = pending.pop()
        try:
            for bottom in _mappable_bottoms(top):
                from_maps[bottom] = compose(from_maps[top], coord_map(top.fn))
                pending.add(bottom)
        except UndefinedMapException:
            pass

    to_maps = {top_to: (None, 1, 0)}
    pending = {top_to}
    while pending:
        top = pending.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            for bottom in _mappable_bottoms(top):
                to_maps[bottom] = compose(to_maps[top], coord_map(top.fn))
                pending.add(bottom)
        except UndefinedMapException:
            continue

    raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")


def crop(top_from, top_to):
    """An ``L.Crop(top_from, top_to, crop_param=...)`` that aligns ``top_from`` to ``top_to``.

    The map between them must have scale 1 and a non-positive integer shift
    (else AssertionError); the Crop gets ``axis = map axis + 1`` and
    ``offset = -shift`` per spatial axis (a list of NumPy ints, as in pycaffe).
    """
    axis, a, b = coord_map_from_to(top_from, top_to)
    assert (a == 1).all(), "scale mismatch on crop (a = {})".format(a)
    assert (b <= 0).all(), "cannot crop negative offset (b = {})".format(b)
    assert (np.round(b) == b).all(), "cannot crop noninteger offset (b = {})".format(b)
    offset = list(-np.round(b).astype(int))
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis + 1, offset=offset))
