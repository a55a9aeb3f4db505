"""Vision layers: Convolution, Deconvolution and Pooling, with Caffe's numbers.

Convolution / Deconvolution (``convolution_param``)
    bottom[i]: ``(outer..., C, *spatial)`` where ``axis`` (default 1) is the
    channel axis, the axes before it are flattened into the batch and every
    later axis is spatial (1-D, 2-D, 3-D... convolution).  One top per bottom,
    all bottoms the same shape, one set of weights shared by all pairs.

    Convolution: ``out = (in + 2*pad - (dilation*(k-1)+1)) / stride + 1`` per
    spatial axis (C++ integer division, see :func:`netlib.im2col.conv_out_size`),
    top ``(outer..., num_output, *out)``, weights ``(num_output, C/group, *k)``,
    bias ``(num_output,)``.  Cross-correlation:
    ``top[n, o, p] = sum_{c,k} W[o, c, k] * x[n, g*C/group + c, p*stride - pad + k*dilation] + b[o]``
    within each group ``g``.

    Deconvolution: ``out = stride*(in-1) + dilation*(k-1)+1 - 2*pad``, weights
    ``(C, num_output/group, *k)``.  Its forward is the convolution's
    backward-data and its backward-data is the convolution's forward, as in
    Caffe (``reverse_dimensions``).

    Implementation: im2col over a chunk of the batch (columns laid out
    ``(C*prod(k), images, positions)`` so each group is ONE matmul over the
    whole chunk), chunk size chosen so the column buffer stays near
    ``col_buffer_bytes``.  A 1x1, stride-1, pad-0 convolution is a plain
    batched matmul with no im2col (Caffe's ``is_1x1_``).  Backward: bias and
    weight gradients accumulate (``+=``) into the param diffs, bottom diffs are
    overwritten; ``param_propagate_down`` and ``propagate_down`` are honoured.
    A 2-D Convolution with ``group == channels`` (depthwise, channel
    multiplier ``num_output / channels``) runs on the im2col-free engine of
    :mod:`netlib.builtin.depthwise` instead.  An output size below 1 (kernel
    larger than the padded input) is a ShapeError; Caffe's truncation quirk
    (an overhang smaller than the stride still gives one output) is kept.

Pooling (``pooling_param``)
    bottom ``(N, C, H, W)`` (4-D only), top ``(N, C, PH, PW)`` with
    ``PH = ceil((H + 2*pad - k) / stride) + 1`` (``floor`` with
    ``round_mode: FLOOR``, or with the fork field ``ceil_mode: false`` of
    DenseNet's Caffe, which when given takes precedence over round_mode) and
    Caffe's correction: when a pad is non-zero and the last window starts at
    or past ``H + pad``, it is dropped (whatever the rounding).  An output
    size below 1 (kernel larger than the padded input) is a ShapeError.

    * MAX: windows clipped to the image, top starts at ``-FLT_MAX``, strict
      ``>`` so the first maximum in raster order wins (NaNs never win; a
      window with no real pixel stays ``-FLT_MAX`` with index -1).  An optional
      second top holds the argmax as a float flat index ``h*W + w``.
    * AVE: the divisor is ``(hend-hstart)*(wend-wstart)`` with
      ``hend = min(hstart+k, H+pad)`` computed BEFORE clipping to the image
      (padding counts, overhang past H+pad does not); the sum covers only real
      pixels.  Caffe quirk kept: a window starting exactly at H+pad (possible
      with pad 0 and stride > kernel) divides 0 by 0.
    * STOCHASTIC: Caffe's CPU code is NOT_IMPLEMENTED.  TEST phase gives
      Caffe GPU's formula ``sum(a*a) / (FLT_MIN + sum(a))`` over the window;
      TRAIN phase (random sampling) and backward raise a clear error.
    * global_pooling: kernel = (H, W); needs pad 0 and stride 1.

    Forward runs over kernel offsets only (running ``fmax`` / running sums on
    strided views of the whole batch).  When a backward may follow (TRAIN
    phase, or a mask top) MAX tracks the running argmax (kernel offset, strict
    ``>``); otherwise it is recomputed from the bottom if backward is called.
    Backward adds per kernel offset in the order that reproduces Caffe's
    accumulation order exactly.
"""

import numpy

from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..im2col import (axis_ranges, col2im, conv_out_size, deconv_out_size, im2col,
                      pool_clip_last, pool_out_size)
from ..layer import Layer, register_layer

FLT_MAX = float(numpy.finfo(numpy.float32).max)
FLT_MIN = float(numpy.finfo(numpy.float32).tiny)


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


# ---------------------------------------------------------------------------
# Convolution / Deconvolution
# ---------------------------------------------------------------------------
class _BaseConvolutionLayer(Layer):
    """Shared engine of Convolution and Deconvolution (Caffe's BaseConvolutionLayer).

    Terminology (Caffe's): the *image* side is the array that im2col reads
    (bottom for Convolution, top for Deconvolution); the *column* side is the
    other one, whose spatial positions index the columns.  The weights are
    ``(col_channels, img_channels/group, *kernel)``.
    """

    min_bottom_blobs = 1
    min_top_blobs = 1
    equal_num_bottom_top_blobs = True
    reverse = False
    #: Target size of the reusable column buffer; the batch is processed in
    #: chunks of images whose columns fit (at least one image per chunk).
    col_buffer_bytes = 8 << 20

    # -- setup ----------------------------------------------------------------
    def _spatial_values(self, p, name, hw, default, bottom):
        nsp = self.num_spatial_axes
        rep = [int(v) for v in getattr(p, name)]
        if hw is not None and (p.HasField(hw + "_h") or p.HasField(hw + "_w")):
            if nsp != 2:
                self.fail("%s_h & %s_w can only be used for 2-D convolution (this one has %d "
                          "spatial axes)" % (hw, hw, nsp), bottom=bottom, error=ConfigError)
            if rep:
                self.fail("either %s or %s_h/w should be specified, not both" % (name, hw),
                          bottom=bottom, error=ConfigError)
            return [int(getattr(p, hw + "_h")), int(getattr(p, hw + "_w"))]
        if not rep:
            if default is None and nsp:
                self.fail("kernel size missing: give kernel_size (once, or once per spatial axis)"
                          + (" or kernel_h and kernel_w" if nsp == 2 else ""),
                          bottom=bottom, error=ConfigError)
            return [default] * nsp
        if len(rep) == 1:
            return rep * nsp
        if len(rep) != nsp:
            self.fail("%s must be specified once, or once per spatial dimension (%s specified %d "
                      "times; %d spatial dims)" % (name, name, len(rep), nsp),
                      bottom=bottom, error=ConfigError)
        return rep

    def setup(self, bottom, top):
        p = self.layer_param.convolution_param
        b0 = bottom[0]
        try:
            self.channel_axis = b0.canonical_axis_index(p.axis)
        except ShapeError:
            self.fail("axis %d is out of range for a %d-axis bottom" % (p.axis, b0.num_axes),
                      bottom=bottom)
        first = self.channel_axis + 1
        self.num_spatial_axes = b0.num_axes - first
        self.kernel = tuple(self._spatial_values(p, "kernel_size", "kernel", None, bottom))
        for k in self.kernel:
            if k <= 0:
                self.fail("filter dimensions must be nonzero (kernel %s)" % (self.kernel,),
                          bottom=bottom, error=ConfigError)
        self.stride = tuple(self._spatial_values(p, "stride", "stride", 1, bottom))
        for s in self.stride:
            if s <= 0:
                self.fail("stride dimensions must be nonzero (stride %s)" % (self.stride,),
                          bottom=bottom, error=ConfigError)
        self.pad = tuple(self._spatial_values(p, "pad", "pad", 0, bottom))
        self.dilation = tuple(self._spatial_values(p, "dilation", None, 1, bottom))
        for d in self.dilation:
            if d <= 0:
                self.fail("dilation must be positive (dilation %s)" % (self.dilation,),
                          bottom=bottom, error=ConfigError)
        self.is_1x1 = all(k == 1 and s == 1 and q == 0
                          for k, s, q in zip(self.kernel, self.stride, self.pad))
        self.force_nd_im2col = bool(p.force_nd_im2col)
        self.channels = b0.shape[self.channel_axis]
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        if self.num_output <= 0:
            self.fail("num_output must be given and positive", bottom=bottom, error=ConfigError)
        if self.group <= 0:
            self.fail("group must be positive", bottom=bottom, error=ConfigError)
        if self.channels % self.group:
            self.fail("the number of input channels (%d, axis %d) must be a multiple of group (%d)"
                      % (self.channels, self.channel_axis, self.group), bottom=bottom,
                      error=ShapeError)
        if self.num_output % self.group:
            self.fail("num_output (%d) must be a multiple of group (%d)"
                      % (self.num_output, self.group), bottom=bottom, error=ConfigError)
        if self.reverse:
            col_c, img_c = self.channels, self.num_output
        else:
            col_c, img_c = self.num_output, self.channels
        self.bias_term = bool(p.bias_term)
        wshape = (col_c, img_c // self.group) + self.kernel
        if len(self.blobs):
            if len(self.blobs) != 1 + self.bias_term:
                self.fail("incorrect number of weight blobs: %d given, %d expected"
                          % (len(self.blobs), 1 + self.bias_term), bottom=bottom)
            if tuple(self.blobs[0].shape) != wshape:
                self.fail("incorrect weight shape: expected %s, got %s"
                          % (wshape, tuple(self.blobs[0].shape)), bottom=bottom)
            if self.bias_term and tuple(self.blobs[1].shape) != (self.num_output,):
                self.fail("incorrect bias shape: expected %s, got %s"
                          % ((self.num_output,), tuple(self.blobs[1].shape)), bottom=bottom)
        else:
            w = self.new_blob(wshape)
            fill(w, filler_param(p, "weight_filler"))
            self.blobs.append(w)
            if self.bias_term:
                b = self.new_blob((self.num_output,))
                fill(b, filler_param(p, "bias_filler"))
                self.blobs.append(b)
        self.param_propagate_down = [True] * len(self.blobs)
        self._col_flat = None
        self._mat_flat = None

    # -- shapes ---------------------------------------------------------------
    def reshape(self, bottom, top):
        b0 = bottom[0]
        axis = self.channel_axis
        if b0.num_axes != axis + 1 + self.num_spatial_axes:
            self.fail("bottom num_axes may not change (set up with %d axes)"
                      % (axis + 1 + self.num_spatial_axes), bottom=bottom, error=ShapeError)
        if b0.shape[axis] != self.channels:
            self.fail("input size incompatible with convolution kernel: bottom has %d channels "
                      "on axis %d, the layer was set up for %d" % (b0.shape[axis], axis,
                                                                   self.channels),
                      bottom=bottom, error=ShapeError)
        for b in bottom[1:]:
            if tuple(b.shape) != tuple(b0.shape):
                self.fail("all bottoms must have the same shape", bottom=bottom, error=ShapeError)
        in_sp = tuple(b0.shape[axis + 1:])
        if self.reverse:
            out_sp = tuple(deconv_out_size(i, k, q, s, d) for i, k, q, s, d in
                           zip(in_sp, self.kernel, self.pad, self.stride, self.dilation))
        else:
            out_sp = tuple(conv_out_size(i, k, q, s, d) for i, k, q, s, d in
                           zip(in_sp, self.kernel, self.pad, self.stride, self.dilation))
        if any(o <= 0 for o in out_sp):
            self.fail("kernel %s (dilation %s, pad %s, stride %s) does not fit the input %s "
                      "(kernel larger than the padded input): output size would be %s"
                      % (self.kernel, self.dilation, self.pad,
                                                   self.stride, in_sp, out_sp),
                      bottom=bottom, error=ShapeError)
        shape = tuple(b0.shape[:axis]) + (self.num_output,) + out_sp
        for t in top:
            t.reshape(shape)
        self.num = b0.count_axes(0, axis)
        self.in_sp, self.out_sp = in_sp, out_sp
        if self.reverse:
            self.img_c, self.img_sp, self.col_c, self.col_sp = self.num_output, out_sp, self.channels, in_sp
        else:
            self.img_c, self.img_sp, self.col_c, self.col_sp = self.channels, in_sp, self.num_output, out_sp
        self.col_p = _prod(self.col_sp)
        self.kg = self.img_c // self.group * _prod(self.kernel)   # rows of a group's columns
        self.ocg = self.col_c // self.group                       # weight rows per group
        per_image = self.img_c * _prod(self.kernel) * self.col_p * b0.dtype.itemsize
        self.chunk = max(1, min(max(self.num, 1), self.col_buffer_bytes // max(per_image, 1)))

    # -- buffers --------------------------------------------------------------
    def _flat(self, attr, size, xp, dtype):
        buf = getattr(self, attr)
        if buf is None or buf.size < size or buf.dtype != dtype or not isinstance(buf, xp.ndarray):
            buf = xp.empty(max(size, 1), dtype=dtype)
            setattr(self, attr, buf)
        return buf[:size]

    def _col_buffers(self, nb, xp, dtype):
        """(im2col view (nb, C, *k, *pos), matrix view (G, Kg, nb*P)) of one buffer
        laid out (C, *k, nb, *pos)."""
        nk = len(self.kernel)
        size = self.img_c * _prod(self.kernel) * nb * self.col_p
        flat = self._flat("_col_flat", size, xp, dtype)
        full = flat.reshape((self.img_c,) + self.kernel + (nb,) + self.col_sp)
        perm = (nk + 1, 0) + tuple(range(1, nk + 1)) + tuple(range(nk + 2, nk + 2 + len(self.col_sp)))
        return full.transpose(perm), flat.reshape(self.group, self.kg, nb * self.col_p)

    def _mat_buffer(self, nb, xp, dtype):
        """A (G, Ocg, nb*P) buffer for column-side values of one chunk."""
        size = self.col_c * nb * self.col_p
        return self._flat("_mat_flat", size, xp, dtype).reshape(self.group, self.ocg, nb * self.col_p)

    def _weights(self):
        return self.blobs[0].data.reshape(self.group, self.ocg, self.kg)

    def _im2col(self, img, nb, xp):
        colv, colm = self._col_buffers(nb, xp, img.dtype)
        im2col(img, self.kernel, self.pad, self.stride, self.dilation, out_shape=self.col_sp, out=colv)
        return colm

    # -- the three GEMM passes --------------------------------------------------
    def _im2col_pass(self, img, out=None, src=None, dW=None):
        """For each chunk: cols = im2col(img); ``out = W @ cols`` (column side,
        (n, col_c, P), overwritten) and/or ``dW += src @ cols^T`` (src column
        side (n, col_c, P))."""
        xp = self.xp
        n, G, ocg, P = self.num, self.group, self.ocg, self.col_p
        W = self._weights()
        if dW is None and self.is_1x1:
            xp.matmul(W, img.reshape(n, G, self.kg, P), out=out.reshape(n, G, ocg, P))
            return
        for b0 in range(0, n, self.chunk):
            nb = min(self.chunk, n - b0)
            cols = self._im2col(img[b0:b0 + nb], nb, xp)
            if dW is not None:
                if nb == 1:
                    s2 = src[b0].reshape(G, ocg, P)
                else:
                    s2 = self._mat_buffer(nb, xp, cols.dtype)
                    s2.reshape(G, ocg, nb, P)[...] = src[b0:b0 + nb].reshape(nb, G, ocg, P).transpose(1, 2, 0, 3)
                dW += xp.matmul(s2, cols.transpose(0, 2, 1))
            if out is not None:
                dst = out[b0:b0 + nb].reshape(nb, G, ocg, P)
                if nb == 1:
                    xp.matmul(W, cols, out=dst.reshape(G, ocg, P))
                else:
                    y2 = self._mat_buffer(nb, xp, cols.dtype)
                    xp.matmul(W, cols, out=y2)
                    dst[...] = y2.reshape(G, ocg, nb, P).transpose(2, 0, 1, 3)

    def _col2im_pass(self, src, img):
        """``img = col2im(W^T @ src)``: src column side (n, col_c, P), img
        (n, img_c, *img_sp) overwritten."""
        xp = self.xp
        n, G, ocg, P = self.num, self.group, self.ocg, self.col_p
        WT = self._weights().transpose(0, 2, 1)
        if self.is_1x1:
            xp.matmul(WT, src.reshape(n, G, ocg, P), out=img.reshape(n, G, self.kg, P))
            return
        for b0 in range(0, n, self.chunk):
            nb = min(self.chunk, n - b0)
            colv, colm = self._col_buffers(nb, xp, src.dtype)
            if nb == 1:
                s2 = src[b0].reshape(G, ocg, P)
            else:
                s2 = self._mat_buffer(nb, xp, src.dtype)
                s2.reshape(G, ocg, nb, P)[...] = src[b0:b0 + nb].reshape(nb, G, ocg, P).transpose(1, 2, 0, 3)
            xp.matmul(WT, s2, out=colm)
            col2im(colv, self.img_sp, self.kernel, self.pad, self.stride, self.dilation,
                   out=img[b0:b0 + nb])

    def _img_view(self, arr):
        return arr.reshape((self.num, self.img_c) + self.img_sp)

    def _col_view(self, arr):
        return arr.reshape(self.num, self.col_c, self.col_p)

    def _add_bias(self, top_arr):
        if self.bias_term:
            y = top_arr.reshape(self.num, self.num_output, _prod(self.out_sp))
            y += self.blobs[1].data.reshape(1, self.num_output, 1)

    def _bias_grad(self, top_diff):
        if self.bias_term and self.param_propagate_down[1]:
            g = top_diff.reshape(self.num, self.num_output, _prod(self.out_sp))
            self.blobs[1].diff[...] += g.sum(axis=(0, 2))


@register_layer("Convolution")
class ConvolutionLayer(_BaseConvolutionLayer):
    """Caffe's Convolution (see the module docstring for shapes and formula).

    A 2-D depthwise convolution (``group == channels > 1`` and ``num_output`` a
    multiple of the channels) runs on :class:`netlib.builtin.depthwise.DepthwiseEngine`
    (one phase-buffer copy, contiguous kernel-offset windows, one batched GEMM
    per block; no general im2col/col2im) unless ``depthwise_fast_path`` is
    False (class or instance attribute); the numbers are the same (the
    bottom diff bit for bit).
    """

    #: Use the depthwise engine when the layer is depthwise (see the class docstring).
    depthwise_fast_path = True
    _dw = None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self._dw = None
        # (one input channel, group 1: an ordinary convolution, faster on the GEMM path)
        if (self.depthwise_fast_path and self.num_spatial_axes == 2 and self.channels > 1
                and self.group == self.channels and self.num_output % self.channels == 0):
            from .depthwise import DepthwiseEngine
            engine = getattr(self, "_dw_engine", None)
            if engine is None:
                engine = self._dw_engine = DepthwiseEngine()
            engine.configure(self.num, self.channels, self.num_output // self.channels,
                             self.in_sp[0], self.in_sp[1], self.kernel, self.pad, self.stride,
                             self.dilation)
            self._dw = engine

    def _dw_view(self, arr, channels, sp):
        return arr.reshape((self.num, channels) + tuple(sp))

    def forward(self, bottom, top):
        if self._dw is not None:
            w = self.blobs[0].data
            bias = self.blobs[1].data if self.bias_term else None
            for b, t in zip(bottom, top):
                self._dw.forward(self._dw_view(b.data, self.channels, self.in_sp), w, bias,
                                 self._dw_view(t.data, self.num_output, self.out_sp))
            return
        for b, t in zip(bottom, top):
            self._im2col_pass(self._img_view(b.data), out=self._col_view(t.data))
            self._add_bias(t.data)

    def _backward_depthwise(self, top, propagate_down, bottom):
        w = self.blobs[0].data
        dw = self.blobs[0].diff if self.param_propagate_down[0] else None
        db = (self.blobs[1].diff if self.bias_term and self.param_propagate_down[1] else None)
        for i, (t, b) in enumerate(zip(top, bottom)):
            dx = self._dw_view(b.diff, self.channels, self.in_sp) if propagate_down[i] else None
            self._dw.backward(self._dw_view(b.data, self.channels, self.in_sp), w,
                              self._dw_view(t.diff, self.num_output, self.out_sp),
                              dx=dx, dw=dw, db=db)

    def backward(self, top, propagate_down, bottom):
        if self._dw is not None:
            self._backward_depthwise(top, propagate_down, bottom)
            return
        need_w = self.param_propagate_down[0]
        dW = None
        for i, (t, b) in enumerate(zip(top, bottom)):
            gy = t.diff
            self._bias_grad(gy)
            if need_w:
                if dW is None:
                    dW = self.blobs[0].diff.reshape(self.group, self.ocg, self.kg)
                self._im2col_pass(self._img_view(b.data), src=self._col_view(gy), dW=dW)
            if propagate_down[i]:
                self._col2im_pass(self._col_view(gy), self._img_view(b.diff))


@register_layer("Deconvolution")
class DeconvolutionLayer(_BaseConvolutionLayer):
    """Caffe's Deconvolution: forward = convolution backward-data (see module docstring)."""

    reverse = True

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            self._col2im_pass(self._col_view(b.data), self._img_view(t.data))
            self._add_bias(t.data)

    def backward(self, top, propagate_down, bottom):
        need_w = self.param_propagate_down[0]
        dW = self.blobs[0].diff.reshape(self.group, self.ocg, self.kg) if need_w else None
        for i, (t, b) in enumerate(zip(top, bottom)):
            gy = t.diff
            self._bias_grad(gy)
            if need_w or propagate_down[i]:
                self._im2col_pass(self._img_view(gy),
                                  out=self._col_view(b.diff) if propagate_down[i] else None,
                                  src=self._col_view(b.data) if need_w else None,
                                  dW=dW)


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------
@register_layer("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling (MAX / AVE / STOCHASTIC-TEST); see the module docstring."""

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 2
    #: Bottom bytes per batch chunk of the kernel-offset loops (cache-sized).
    chunk_bytes = 2 << 20

    def setup(self, bottom, top):
        from ..proto import caffe_pb2
        P = caffe_pb2.PoolingParameter
        p = self.layer_param.pooling_param
        self.method = p.pool
        if self.method not in (P.MAX, P.AVE, P.STOCHASTIC):
            self.fail("unknown pooling method %d" % self.method, error=ConfigError)
        if len(top) > 1 and self.method != P.MAX:
            self.fail("only MAX pooling can have a second (mask) top; this layer has %d tops"
                      % len(top), bottom=bottom, error=ConfigError)
        self.global_pooling = bool(p.global_pooling)
        has_k, has_kh, has_kw = p.HasField("kernel_size"), p.HasField("kernel_h"), p.HasField("kernel_w")
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                self.fail("with global_pooling: true the filter size cannot be specified",
                          error=ConfigError)
        else:
            if has_k == (has_kh and has_kw):
                if has_k:
                    self.fail("filter size is kernel_size OR kernel_h and kernel_w; not both",
                              error=ConfigError)
                self.fail("kernel size missing: give kernel_size, or both kernel_h and kernel_w "
                          "(or global_pooling: true)", error=ConfigError)
        if not ((not p.HasField("pad") and p.HasField("pad_h") and p.HasField("pad_w"))
                or (not p.HasField("pad_h") and not p.HasField("pad_w"))):
            self.fail("pad is pad OR pad_h and pad_w are required", error=ConfigError)
        if not ((not p.HasField("stride") and p.HasField("stride_h") and p.HasField("stride_w"))
                or (not p.HasField("stride_h") and not p.HasField("stride_w"))):
            self.fail("stride is stride OR stride_h and stride_w are required", error=ConfigError)
        if self.global_pooling:
            self.kernel_h, self.kernel_w = 0, 0   # set from the bottom in reshape
        elif has_k:
            self.kernel_h = self.kernel_w = int(p.kernel_size)
        else:
            self.kernel_h, self.kernel_w = int(p.kernel_h), int(p.kernel_w)
        if not self.global_pooling and (self.kernel_h <= 0 or self.kernel_w <= 0):
            self.fail("filter dimensions cannot be zero (kernel %dx%d)"
                      % (self.kernel_h, self.kernel_w), error=ConfigError)
        if p.HasField("pad_h"):
            self.pad_h, self.pad_w = int(p.pad_h), int(p.pad_w)
        else:
            self.pad_h = self.pad_w = int(p.pad)
        if p.HasField("stride_h"):
            self.stride_h, self.stride_w = int(p.stride_h), int(p.stride_w)
        else:
            self.stride_h = self.stride_w = int(p.stride)
        if self.stride_h <= 0 or self.stride_w <= 0:
            self.fail("stride must be positive (stride %dx%d)" % (self.stride_h, self.stride_w),
                      error=ConfigError)
        if self.global_pooling and (self.pad_h or self.pad_w or self.stride_h != 1 or self.stride_w != 1):
            self.fail("with global_pooling: true only pad = 0 and stride = 1 are allowed",
                      error=ConfigError)
        if self.pad_h or self.pad_w:
            if self.method not in (P.MAX, P.AVE):
                self.fail("padding is implemented only for average and max pooling",
                          error=ConfigError)
            if not self.global_pooling and (self.pad_h >= self.kernel_h or self.pad_w >= self.kernel_w):
                self.fail("pad (%d, %d) must be smaller than the kernel (%d, %d)"
                          % (self.pad_h, self.pad_w, self.kernel_h, self.kernel_w),
                          error=ConfigError)
        # The fork field ceil_mode (DenseNet's Caffe), when given, overrides round_mode.
        if p.HasField("ceil_mode"):
            self.ceil_mode = bool(p.ceil_mode)
        else:
            self.ceil_mode = p.round_mode == P.CEIL
        self._P = P
        self._geom_key = None
        self._argmax = None
        self._argmax_valid = False

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            self.fail("input must have 4 axes, corresponding to (num, channels, height, width)",
                      bottom=bottom, error=ShapeError)
        N, C, H, W = b.shape
        if self.global_pooling:
            self.kernel_h, self.kernel_w = H, W
        kh, kw, ph, pw, sh, sw = (self.kernel_h, self.kernel_w, self.pad_h, self.pad_w,
                                  self.stride_h, self.stride_w)
        PH = pool_out_size(H, kh, ph, sh, self.ceil_mode)
        PW = pool_out_size(W, kw, pw, sw, self.ceil_mode)
        if ph or pw:
            PH = pool_clip_last(PH, H, ph, sh)
            PW = pool_clip_last(PW, W, pw, sw)
        if PH <= 0 or PW <= 0:
            self.fail("kernel %dx%d (pad %d,%d, stride %d,%d) does not fit the %dx%d input "
                      "(kernel larger than the padded input): output size %dx%d"
                      % (kh, kw, ph, pw, sh, sw, H, W, PH, PW), bottom=bottom, error=ShapeError)
        top[0].reshape(N, C, PH, PW)
        if len(top) > 1:
            top[1].reshape(N, C, PH, PW)
        self.out_hw = (PH, PW)
        key = (H, W, kh, kw, ph, pw, sh, sw, PH, PW)
        if key != self._geom_key:
            self._geom_key = key
            self._build_plan(H, W, PH, PW)
        self._argmax_valid = False

    def _build_plan(self, H, W, PH, PW):
        kh, kw, ph, pw, sh, sw = (self.kernel_h, self.kernel_w, self.pad_h, self.pad_w,
                                  self.stride_h, self.stride_w)
        rh = axis_ranges(H, PH, kh, ph, sh, 1)
        rw = axis_ranges(W, PW, kw, pw, sw, 1)
        plan = []
        for i in range(kh):
            lo_h, hi_h, st_h = rh[i]
            if lo_h >= hi_h:
                continue
            for j in range(kw):
                lo_w, hi_w, st_w = rw[j]
                if lo_w >= hi_w:
                    continue
                ysl = (Ellipsis, slice(lo_h, hi_h), slice(lo_w, hi_w))
                xsl = (Ellipsis, slice(st_h, st_h + (hi_h - lo_h - 1) * sh + 1, sh),
                       slice(st_w, st_w + (hi_w - lo_w - 1) * sw + 1, sw))
                plan.append((i * kw + j, ysl, xsl))
        self._plan = plan
        self._n_offsets = kh * kw
        # A single window covering the whole image: a plain reduction.
        self._whole = (PH == 1 and PW == 1 and ph == 0 and pw == 0 and kh >= H and kw >= W)
        # AVE divisor (Caffe's pool_size, computed before clipping to the image).
        hs = numpy.arange(PH) * sh - ph
        ws = numpy.arange(PW) * sw - pw
        dh = numpy.minimum(hs + kh, H + ph) - hs
        dw = numpy.minimum(ws + kw, W + pw) - ws
        self._divisor_host = (dh[:, None] * dw[None, :]).astype(numpy.float64)
        self._divisor = None
        # Mask top: flat index of the window's top-left corner (may be negative).
        self._corner_host = hs[:, None] * W + ws[None, :]
        self._corner = None

    def _device(self, name, dtype):
        arr = getattr(self, name)
        host = getattr(self, name + "_host")
        if arr is None or arr.dtype != dtype or not isinstance(arr, self.xp.ndarray):
            arr = self.xp.asarray(host.astype(dtype))
            setattr(self, name, arr)
        return arr

    def _index_dtype(self):
        # argmax is stored as kernel offset + 1 (0: no pixel won), in the smallest type
        n = self._n_offsets + 1
        return numpy.uint8 if n <= 255 else numpy.uint16 if n <= 65535 else numpy.int32

    def _chunks(self, shape):
        """Batch chunks whose bottom slice is about ``chunk_bytes`` (cache-sized:
        the offset loops are memory-bound, 3-4x faster on a cached chunk)."""
        n = shape[0]
        per_image = _prod(shape[1:]) * 4
        nb = max(1, min(n, self.chunk_bytes // max(per_image, 1)))
        return [slice(b, min(b + nb, n)) for b in range(0, n, nb)]

    # -- forward ----------------------------------------------------------------
    def _wants_argmax(self, top):
        if len(top) > 1:
            return True
        return self.phase == 0 and getattr(self, "need_backward", True)

    def forward(self, bottom, top):
        P = self._P
        x = bottom[0].data
        y = top[0].data
        if self.method == P.MAX:
            self._forward_max(x, y, top)
        elif self.method == P.AVE:
            self._forward_ave(x, y)
        else:
            self._forward_stochastic(x, y)

    def _forward_max(self, x, y, top):
        xp = self.xp
        if self._wants_argmax(top):
            self._compute_argmax(x, y)
        elif self._whole:
            self._whole_max(x, y, None)
        else:
            for c in self._chunks(x.shape):
                xc, yc = x[c], y[c]
                yc.fill(-FLT_MAX)
                for _, ysl, xsl in self._plan:
                    yv = yc[ysl]
                    xp.fmax(yv, xc[xsl], out=yv)      # fmax: NaN never wins, as with Caffe's >
        if len(top) > 1:
            self._write_mask(top[1].data, x.shape[3])

    def _argmax_buffer(self, shape):
        xp = self.xp
        dtype = self._index_dtype()
        a = self._argmax
        if a is None or tuple(a.shape) != tuple(shape) or a.dtype != dtype or not isinstance(a, xp.ndarray):
            self._argmax = xp.empty(shape, dtype=dtype)
        return self._argmax

    def _whole_max(self, x, y, idx):
        """One window covering the image: reductions.  Windows whose max is not
        above -FLT_MAX (all -inf / NaN) give -FLT_MAX and no argmax, as in Caffe;
        a NaN among real values makes the max NaN -> -FLT_MAX here (Caffe would
        skip the NaN)."""
        N, C, H, W = x.shape
        flat = x.reshape(N, C, H * W)
        y[...] = flat.max(axis=2).reshape(y.shape)
        bad = ~(y > -FLT_MAX)
        if idx is not None:
            idx[...] = (flat.argmax(axis=2) + 1).reshape(y.shape)
            idx[bad] = 0
        y[bad] = -FLT_MAX

    def _compute_argmax(self, x, y):
        """Caffe's loop vectorised over kernel offsets: y starts at -FLT_MAX and
        offset k wins where ``x > y`` strictly (first maximum in raster order).
        The index update is arithmetic (offsets only grow, so
        ``idx = max(idx, (x > y) * (k + 1))``), much cheaper than masked copies."""
        xp = self.xp
        idx = self._argmax_buffer(y.shape)
        if self._whole:
            self._whole_max(x, y, idx)
        else:
            itype = idx.dtype.type
            chunks = self._chunks(x.shape)
            nb = chunks[0].stop - chunks[0].start if chunks else 0
            gt_buf = xp.empty((nb,) + tuple(y.shape[1:]), dtype=bool)
            tmp_buf = xp.empty((nb,) + tuple(y.shape[1:]), dtype=idx.dtype)
            for c in chunks:
                xc, yc, ic = x[c], y[c], idx[c]
                yc.fill(-FLT_MAX)
                ic.fill(0)
                gt, tmp = gt_buf[:c.stop - c.start], tmp_buf[:c.stop - c.start]
                for k, ysl, xsl in self._plan:
                    yv, xv = yc[ysl], xc[xsl]
                    g = xp.greater(xv, yv, out=gt[ysl])
                    xp.fmax(yv, xv, out=yv)
                    t = xp.multiply(g, itype(k + 1), out=tmp[ysl])
                    iv = ic[ysl]
                    xp.maximum(iv, t, out=iv)
        self._argmax_valid = True
        return idx

    def _write_mask(self, mask, W):
        """Flat index ``h*W + w`` of each window's argmax (-1 where none)."""
        idx = self._argmax
        dt = mask.dtype
        if self._whole:
            mask[...] = idx.astype(dt) - 1
            return
        kw = self.kernel_w
        corner = self._device("_corner", dt)
        k = idx.astype(numpy.int32) - 1
        i = k // kw
        j = k - i * kw
        mask[...] = corner + (i.astype(dt) * dt.type(W) + j.astype(dt))
        mask[idx == 0] = -1

    def _forward_ave(self, x, y):
        xp = self.xp
        if self._whole:
            N, C, H, W = x.shape
            y[...] = x.reshape(N, C, H * W).sum(axis=2).reshape(y.shape) / y.dtype.type(H * W)
            return
        divisor = self._device("_divisor", y.dtype)
        for c in self._chunks(x.shape):
            xc, yc = x[c], y[c]
            yc.fill(0)
            for _, ysl, xsl in self._plan:       # raster order: Caffe's summation order
                yv = yc[ysl]
                yv += xc[xsl]
            with numpy.errstate(divide="ignore", invalid="ignore"):
                xp.divide(yc, divisor, out=yc)

    def _forward_stochastic(self, x, y):
        if self.phase == 0:
            self.fail("STOCHASTIC pooling in TRAIN phase is not implemented (Caffe's CPU code is "
                      "NOT_IMPLEMENTED; only its GPU kernel samples); use MAX or AVE, or TEST phase",
                      error=ConfigError)
        xp = self.xp
        total = xp.empty_like(y)
        total.fill(FLT_MIN)
        squares = xp.zeros_like(y)
        for _, ysl, xsl in self._plan:
            xv = x[xsl]
            tv = total[ysl]
            tv += xv
            sv = squares[ysl]
            sv += xv * xv
        with numpy.errstate(divide="ignore", invalid="ignore"):
            xp.divide(squares, total, out=y)

    # -- backward -----------------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        P = self._P
        gy = top[0].diff
        dx = bottom[0].diff
        if self.method == P.MAX:
            self._backward_max(gy, dx, bottom[0].data)
        elif self.method == P.AVE:
            self._backward_ave(gy, dx)
        else:
            self.fail("STOCHASTIC pooling has no backward here (Caffe implements it on the GPU "
                      "only, from TRAIN-phase samples)", error=ConfigError)

    def _backward_max(self, gy, dx, x):
        """Route each top diff to its window's argmax.  The argmax comes from
        forward, or is recomputed from the bottom when forward took the fast
        path (never from the top data, which an in-place layer may change).
        Offsets run in reverse so every bottom pixel sums its windows in
        Caffe's (ph, pw) raster order: the same float sums as Caffe."""
        xp = self.xp
        if not self._argmax_valid:
            self._compute_argmax(x, xp.empty_like(gy))
        idx = self._argmax
        if self._whole:
            N, C, H, W = dx.shape
            hw = xp.arange(1, H * W + 1, dtype=idx.dtype).reshape(1, 1, H * W)
            dx[...] = ((idx.reshape(N, C, 1) == hw) * gy.reshape(N, C, 1)).reshape(dx.shape)
            return
        itype = idx.dtype.type
        for c in self._chunks(dx.shape):
            dc, gc, ic = dx[c], gy[c], idx[c]
            dc.fill(0)
            for k, ysl, xsl in reversed(self._plan):
                dv = dc[xsl]
                dv += gc[ysl] * (ic[ysl] == itype(k + 1))

    def _backward_ave(self, gy, dx):
        if self._whole:
            N, C, H, W = dx.shape
            dx[...] = gy.reshape(N, C, 1, 1) / gy.dtype.type(H * W)
            return
        with numpy.errstate(divide="ignore", invalid="ignore"):
            g = gy / self._device("_divisor", gy.dtype)
        for c in self._chunks(dx.shape):
            dc, gc = dx[c], g[c]
            dc.fill(0)
            for _, ysl, xsl in reversed(self._plan):
                dv = dc[xsl]
                dv += gc[ysl]
