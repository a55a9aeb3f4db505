"""Vision layers: Convolution and Deconvolution, with Caffe's numbers (Pooling is
in :mod:`netlib.builtin.pooling`).

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

"""
from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..im2col import col2im, conv_out_size, deconv_out_size, im2col
from ..layer import Layer, register_layer


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
