"""im2col / col2im for N-D convolution, and Caffe's output-size rules.

Layout: an image batch ``x`` has shape ``(B, C, *spatial)``; its column array
``col`` has the logical shape ``(B, C, *kernel, *out)`` -- for every kernel
offset the input values that offset reads at every output position.  With
``K = C * prod(kernel)`` and ``P = prod(out)``, ``col.reshape(B, K, P)`` is
Caffe's ``col_buffer_`` for each image (rows ordered channel, then kernel
offsets in raster order), so ``W.reshape(O, K) @ col[b]`` is the convolution.

Geometry per spatial axis (Caffe's ``im2col_cpu`` / ``im2col_nd_cpu``): output
position ``o`` with kernel offset ``i`` reads input ``o * stride - pad + i *
dilation``; reads outside ``[0, size)`` are zeros (padding).  No padded copy of
the input is made: for each kernel offset the range of output positions that
read inside the image is computed once (a cached *plan*), the valid part is a
single strided copy covering the whole batch and every channel, and only the
thin border strips that read padding are zeroed.  The Python loop runs over
kernel offsets only.  The same plan drives ``col2im`` (strided ``+=`` per
offset, in Caffe's accumulation order: offsets ascending).

Everything runs on the array module of the arrays passed in (numpy or cupy)
and writes into caller-provided buffers when ``out=`` is given (any strides:
a transposed view of a differently laid out buffer works).
"""
import functools
import itertools
import math

import numpy

from .backend import get_array_module


# ---------------------------------------------------------------------------
# output sizes
# ---------------------------------------------------------------------------
def _trunc_div(a, b):
    """C++ integer division (truncates toward zero), as Caffe computes it."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def conv_out_size(size, kernel, pad=0, stride=1, dilation=1):
    """Caffe's convolution output size along one axis.

    ``(size + 2*pad - (dilation*(kernel-1)+1)) / stride + 1`` with C++ integer
    division.  Caffe quirk kept: the division truncates toward zero, so a
    kernel extent that overhangs the padded input by less than ``stride``
    still yields one output (its window reads zeros past the border).
    """
    extent = dilation * (kernel - 1) + 1
    return _trunc_div(size + 2 * pad - extent, stride) + 1


def deconv_out_size(size, kernel, pad=0, stride=1, dilation=1):
    """Caffe's deconvolution output size: ``stride*(size-1) + extent - 2*pad``."""
    extent = dilation * (kernel - 1) + 1
    return stride * (size - 1) + extent - 2 * pad


def pool_out_size(size, kernel, pad=0, stride=1, ceil_mode=True):
    """Caffe's pooling output size along one axis.

    ``ceil((size + 2*pad - kernel) / stride) + 1`` (``floor`` with
    ``round_mode: FLOOR``), the division done in float32 as Caffe does.  The
    "last window must start inside image+pad" correction depends on both axes'
    pads, so the Pooling layer applies it (see :func:`pool_clip_last`).
    """
    q = numpy.float32(size + 2 * pad - kernel) / numpy.float32(stride)
    return int(math.ceil(q) if ceil_mode else math.floor(q)) + 1


def pool_clip_last(out, size, pad, stride):
    """Caffe's correction: drop the last window if it starts at or past
    ``size + pad`` (applied when any pad of the layer is non-zero)."""
    if (out - 1) * stride >= size + pad:
        out -= 1
    return out


# ---------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def axis_ranges(size, out, kernel, pad, stride, dilation):
    """For each kernel offset along one axis: ``(lo, hi, start)``.

    Output positions ``lo <= o < hi`` read inside the input, starting at input
    index ``start`` (= ``lo*stride - pad + i*dilation``) with step ``stride``.
    ``lo == hi`` when the offset never reads inside the input.
    """
    ranges = []
    for i in range(kernel):
        shift = i * dilation - pad              # input index of output 0
        # smallest o >= 0 with o*stride + shift >= 0
        lo = 0 if shift >= 0 else -((shift) // stride)
        # largest o with o*stride + shift <= size - 1, plus one
        top = size - 1 - shift
        hi = -1 if top < 0 else top // stride
        hi = min(hi + 1, out)
        lo = min(lo, out)
        if hi < lo:
            hi = lo
        ranges.append((lo, hi, lo * stride + shift))
    return tuple(ranges)


@functools.lru_cache(maxsize=1024)
def _plan(in_shape, out_shape, kernel, pad, stride, dilation):
    """Per kernel offset (raster order): (col index, image index or None,
    list of col indices to zero).  All indices exclude the leading (B, C)."""
    nd = len(in_shape)
    per_axis = [axis_ranges(in_shape[a], out_shape[a], kernel[a], pad[a], stride[a], dilation[a])
                for a in range(nd)]
    full = slice(None)
    plan = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        rng = [per_axis[a][offs[a]] for a in range(nd)]
        if any(lo >= hi for lo, hi, _ in rng):
            plan.append((offs, None, None, [offs]))
            continue
        dst = offs + tuple(slice(lo, hi) for lo, hi, _ in rng)
        src = tuple(slice(st, st + (hi - lo - 1) * stride[a] + 1, stride[a])
                    for a, (lo, hi, st) in enumerate(rng))
        zeros = []
        for a, (lo, hi, _) in enumerate(rng):
            before = [full] * nd
            if lo > 0:
                before[a] = slice(0, lo)
                zeros.append(offs + tuple(before))
            if hi < out_shape[a]:
                after = [full] * nd
                after[a] = slice(hi, None)
                zeros.append(offs + tuple(after))
        plan.append((offs, dst, src, zeros))
    return tuple(plan)


def _norm(value, nd, name):
    if isinstance(value, (int, numpy.integer)):
        return (int(value),) * nd
    value = tuple(int(v) for v in value)
    if len(value) != nd:
        raise ValueError("%s has %d values for %d spatial axes" % (name, len(value), nd))
    return value


def geometry(in_shape, kernel, pad=0, stride=1, dilation=1):
    """Normalise the per-axis parameters and compute the conv output shape."""
    in_shape = tuple(int(s) for s in in_shape)
    nd = len(in_shape)
    kernel = _norm(kernel, nd, "kernel")
    pad = _norm(pad, nd, "pad")
    stride = _norm(stride, nd, "stride")
    dilation = _norm(dilation, nd, "dilation")
    out = tuple(conv_out_size(in_shape[a], kernel[a], pad[a], stride[a], dilation[a])
                for a in range(nd))
    return kernel, pad, stride, dilation, out


# ---------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------
_ALL2 = (slice(None), slice(None))


def im2col(x, kernel, pad=0, stride=1, dilation=1, out_shape=None, out=None):
    """Columns of ``x`` (B, C, *spatial): an array (B, C, *kernel, *out).

    ``kernel/pad/stride/dilation`` are ints (all axes) or one value per axis.
    ``out_shape`` defaults to Caffe's conv output size.  With ``out`` given
    (any strides, logical shape (B, C, *kernel, *out), x's dtype) it is filled
    and returned; every element is written.
    """
    xp = get_array_module(x)
    spatial = tuple(x.shape[2:])
    kernel, pad, stride, dilation, conv_out = geometry(spatial, kernel, pad, stride, dilation)
    out_sp = conv_out if out_shape is None else tuple(int(s) for s in out_shape)
    shape = tuple(x.shape[:2]) + kernel + out_sp
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    elif tuple(out.shape) != shape:
        raise ValueError("im2col: out has shape %s, %s needed" % (tuple(out.shape), shape))
    for _, dst, src, zeros in _plan(spatial, out_sp, kernel, pad, stride, dilation):
        for z in zeros:
            out[_ALL2 + z] = 0
        if dst is not None:
            out[_ALL2 + dst] = x[_ALL2 + src]
    return out


def col2im(col, spatial, kernel, pad=0, stride=1, dilation=1, out=None, accumulate=False):
    """Sum columns back into an image (the adjoint of :func:`im2col`).

    ``col`` has logical shape (B, C, *kernel, *out); the result has shape
    (B, C, *spatial).  ``out`` is overwritten unless ``accumulate``.  Offsets
    are added in raster order, the order of Caffe's ``col2im_cpu``.
    """
    xp = get_array_module(col)
    spatial = tuple(int(s) for s in spatial)
    nd = len(spatial)
    kernel, pad, stride, dilation, _ = geometry(spatial, kernel, pad, stride, dilation)
    out_sp = tuple(col.shape[2 + nd:])
    shape = tuple(col.shape[:2]) + spatial
    if out is None:
        out = xp.zeros(shape, dtype=col.dtype)
    else:
        if tuple(out.shape) != shape:
            raise ValueError("col2im: out has shape %s, %s needed" % (tuple(out.shape), shape))
        if not accumulate:
            out[...] = 0
    for _, dst, src, _ in _plan(spatial, out_sp, kernel, pad, stride, dilation):
        if dst is not None:
            view = out[_ALL2 + src]
            view += col[_ALL2 + dst]
    return out


# ---------------------------------------------------------------------------
# batch-last ("CHWN") columns, used by the Convolution layers
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def padded_extent(in_shape, out_shape, kernel, pad, stride, dilation):
    """Per axis, the length of a zero-bordered copy of the input that every
    read of the convolution lands in: ``max(pad + size, (out-1)*stride +
    (kernel-1)*dilation + 1)``.  The input sits at ``[pad, pad+size)``.  The
    second term exceeds the first under Caffe's truncation quirk (a window
    overhanging the padded input reads zeros)."""
    return tuple(max(q + s, (o - 1) * st + (k - 1) * d + 1)
                 for s, o, k, q, st, d in zip(in_shape, out_shape, kernel, pad, stride, dilation))


@functools.lru_cache(maxsize=1024)
def _bl_plan(out_shape, kernel, stride, dilation):
    """Per kernel offset (raster order): (col index, padded-image slices)."""
    plan = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        src = tuple(slice(i * d, i * d + (o - 1) * s + 1, s)
                    for i, o, s, d in zip(offs, out_shape, stride, dilation))
        plan.append((offs, src))
    return tuple(plan)


def im2col_batch_last(xpad, kernel, stride, dilation, out_shape, out):
    """Columns of a zero-bordered, batch-last image.

    ``xpad``: ``(C, *padded, B)`` (the input at ``[pad, pad+size)`` on each
    spatial axis, zeros around it, see :func:`padded_extent`).  ``out``:
    ``(C, *kernel, *out_shape, B)``, every element written.  ``out.reshape(C *
    prod(kernel), prod(out_shape) * B)`` is Caffe's column buffer for all B
    images at once (rows channel-major then kernel offsets in raster order;
    columns position-major, image fastest).  With the batch innermost each
    kernel offset is one copy whose contiguous runs are ``out_w * B`` long
    (stride 1) or ``B`` long, instead of the ``out_w`` of an NCHW im2col.
    """
    lead = (slice(None),)
    for offs, src in _bl_plan(tuple(out_shape), tuple(kernel), tuple(stride), tuple(dilation)):
        out[lead + offs] = xpad[lead + src]
    return out


def col2im_batch_last(col, kernel, stride, dilation, out):
    """Adjoint of :func:`im2col_batch_last`: ``out`` ``(C, *padded, B)`` is
    overwritten with the sum of the columns ``col`` ``(C, *kernel, *out, B)``,
    kernel offsets added in raster order (Caffe's ``col2im_cpu`` order, so
    each pixel gets the same float additions in the same order).  The border
    of ``out`` (the padding) receives the gradient of the zeros; callers crop
    it."""
    nk = len(kernel)
    out_shape = tuple(col.shape[1 + nk:1 + 2 * nk])
    out[...] = 0
    lead = (slice(None),)
    for offs, src in _bl_plan(out_shape, tuple(kernel), tuple(stride), tuple(dilation)):
        view = out[lead + src]
        view += col[lead + offs]
    return out
