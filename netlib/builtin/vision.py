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

    Implementation: im2col over a chunk of the batch into ONE column matrix
    ``(C*prod(k), positions x images)`` per group, so each group is one matmul
    over the whole chunk; chunk size chosen so the column buffer stays near
    ``col_buffer_bytes``.  Two memory layouts of the chunk buffers, chosen per
    shape by a cost model (``batch_last_layout`` forces one; same numbers):
    *batch last* -- the chunk is transposed once into a zero-bordered
    ``(C, *padded, images)`` buffer, and each kernel offset's im2col copy /
    col2im add then has contiguous runs ``out_w * images`` long (small maps,
    many images: LeNet, CIFAR); *batch first* -- Caffe's NCHW im2col straight
    from the image with runs of ``out_w`` (large maps, strided kernels, one
    image per chunk: VGG, ResNet).  The bias is added while the GEMM result is
    copied into the top; the backward shares one copy of the top diff per
    chunk between the weight-gradient GEMM and the bottom-diff GEMM.  A 1x1,
    stride-1, pad-0 convolution is a plain batched matmul with no im2col
    (Caffe's ``is_1x1_``).  col2im adds the kernel offsets in Caffe's order,
    so the bottom diff gets Caffe's additions per pixel.  Backward: bias and
    weight gradients accumulate (``+=``) into the param diffs, bottom diffs are
    overwritten; ``param_propagate_down`` and ``propagate_down`` are honoured.
    A 2-D Convolution with ``group == channels`` (depthwise, channel
    multiplier ``num_output / channels``) runs on the im2col-free engine of
    :mod:`netlib.builtin.depthwise` instead.  An output size below 1 (kernel
    larger than the padded input) is a ShapeError; Caffe's truncation quirk
    (an overhang smaller than the stride still gives one output) is kept.

"""
from ..errors import ConfigError, ShapeError
from .. import forward_mode
from .. import second_order
from ..fillers import fill, filler_param
from ..im2col import (col2im, col2im_batch_last, conv_out_size, deconv_out_size, im2col,
                      im2col_batch_last, padded_extent)
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
    #: Memory layout of the chunk buffers (see ``_img_buffer``): None chooses per
    #: shape, True / False force batch-last / batch-first (same numbers).
    batch_last_layout = None

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
        self._plan_layout()

    # -- buffers --------------------------------------------------------------
    def _flat(self, attr, size, xp, dtype):
        buf = getattr(self, attr, None)
        if buf is None or buf.size < size or buf.dtype != dtype or not isinstance(buf, xp.ndarray):
            buf = xp.empty(max(size, 1), dtype=dtype)
            setattr(self, attr, buf)
        return buf[:size]

    def workspace_elements(self):
        """{attribute: elements} of the scratch buffers a forward allocates,
        from the geometry of the last reshape (used by :mod:`netlib.memory`):
        the column buffer (``_col_flat``, im2col of one chunk of images), the
        column-side matrix (``_mat_flat``, chunks of more than one image) and
        the padded image (``_img_flat``, batch-last layout only, unless read
        in place).  Empty for the 1x1 path (no im2col) and the depthwise and
        shifted-GEMM engines (their own small buffers are not counted, nor
        are backward's)."""
        if (getattr(self, "_dw", None) is not None or getattr(self, "_shift", None) is not None
                or self.is_1x1):
            return {}
        nb = self.chunk
        out = {"_col_flat": self.img_c * _prod(self.kernel) * self.col_p * nb}
        if nb > 1:
            out["_mat_flat"] = self.col_c * self.col_p * nb
        pad_sp = getattr(self, "pad_sp", None)
        if pad_sp is not None and getattr(self, "batch_last", False) and not (self.unpadded and nb == 1):
            out["_img_flat"] = self.img_c * _prod(pad_sp) * nb
        return out

    def _plan_layout(self):
        """Reshape-time geometry of the batch-last engine: the padded image
        extent, where the image sits in it, and the border strips to zero."""
        nsp = len(self.img_sp)
        self.pad_sp = padded_extent(self.img_sp, self.col_sp, self.kernel, self.pad,
                                    self.stride, self.dilation)
        self.interior = (slice(None),) + tuple(slice(q, q + s) for q, s in zip(self.pad, self.img_sp))
        self.borders = []
        for a in range(nsp):
            lo, hi = self.pad[a], self.pad[a] + self.img_sp[a]
            for strip in (slice(0, lo), slice(hi, self.pad_sp[a])):
                if strip.stop > strip.start:
                    self.borders.append((slice(None),) * (a + 1) + (strip,))
        self.unpadded = self.pad_sp == self.img_sp
        self.to_batch_last = tuple(range(1, nsp + 2)) + (0,)          # (nb, C, *sp) -> (C, *sp, nb)
        self.from_batch_last = (nsp + 1,) + tuple(range(nsp + 1))     # (C, *sp, nb) -> (nb, C, *sp)
        nc = 1 + len(self.kernel) + len(self.col_sp)                  # (C, *k, *pos, nb) -> (nb, C, *k, *pos)
        self.nchw_cols = (nc,) + tuple(range(nc))
        layout = self.batch_last_layout
        if layout is None:
            layout = not self.is_1x1 and self._batch_last_pays()
        self.batch_last = bool(layout)

    # Layout of the chunk buffers.  Logically the image buffer is (C, *padded, nb),
    # the columns (C, *k, *pos, nb) and the column-side matrix (col_c, P, nb); in
    # memory the image axis nb is either last ("batch last": each kernel offset's
    # copy has contiguous runs of out_w*nb, good for small maps and many images)
    # or before the spatial axes ("batch first", NCHW-like runs of out_w, good for
    # large maps, strided kernels, few images per chunk).  The GEMMs see the same
    # (G, rows, columns) matrices either way, only the column order differs.
    def _batch_last_pays(self):
        """Cost model of the layout choice (calibrated with numpy on x86): a
        strided copy costs ~10 ns per innermost run (im2col, and col2im, run
        ~3 times per training step), a transposing copy ~1.5 ns per element
        (the image and column sides enter and leave batch last, ~2 times)."""
        nb = self.chunk
        if nb <= 1 or not self.col_sp:
            return False
        rows = self.img_c * _prod(self.kernel) * _prod(self.col_sp[:-1])
        ow = self.col_sp[-1]
        if self.stride[-1] == 1:       # runs: out_w*nb batch last, out_w batch first
            runs_saved = rows * (nb - 1)
        else:                          # runs: nb (one per position) vs out_w
            runs_saved = rows * (nb - ow)
        transposed = nb * (self.img_c * _prod(self.img_sp) + self.col_c * self.col_p)
        return runs_saved * 8 > transposed

    def _img_buffer(self, nb, xp, dtype):
        """The reusable image buffer, as a (C, *padded, nb) view (contents undefined)."""
        nsp = len(self.pad_sp)
        if self.batch_last:
            shape = (self.img_c,) + self.pad_sp + (nb,)
            return self._flat("_img_flat", _prod(shape), xp, dtype).reshape(shape)
        shape = (nb, self.img_c) + self.pad_sp
        return self._flat("_img_flat", _prod(shape), xp, dtype).reshape(shape).transpose(
            self.to_batch_last[:nsp + 2])

    def _col_buffers(self, nb, xp, dtype):
        """(im2col view (C, *k, *pos, nb), matrix view (G, Kg, P*nb)) of one buffer."""
        nk, nsp = len(self.kernel), len(self.col_sp)
        if self.batch_last:
            shape = (self.img_c,) + self.kernel + self.col_sp + (nb,)
            perm = tuple(range(len(shape)))
        else:
            shape = (self.img_c,) + self.kernel + (nb,) + self.col_sp
            perm = tuple(range(nk + 1)) + tuple(range(nk + 2, nk + 2 + nsp)) + (nk + 1,)
        flat = self._flat("_col_flat", _prod(shape), xp, dtype)
        return flat.reshape(shape).transpose(perm), flat.reshape(self.group, self.kg, self.col_p * nb)

    def _mat_buffer(self, nb, xp, dtype):
        """(matrix view (G, Ocg, P*nb), logical view (col_c, P, nb)) of the
        reusable column-side buffer of one chunk."""
        size = self.col_c * nb * self.col_p
        flat = self._flat("_mat_flat", size, xp, dtype)
        if self.batch_last:
            logical = flat.reshape(self.col_c, self.col_p, nb)
        else:
            logical = flat.reshape(self.col_c, nb, self.col_p).transpose(0, 2, 1)
        return flat.reshape(self.group, self.ocg, self.col_p * nb), logical

    def _weights(self):
        return self.blobs[0].data.reshape(self.group, self.ocg, self.kg)

    # -- chunk loads and stores ---------------------------------------------------
    def _load_cols(self, img, b0, nb):
        """Columns (G, Kg, P*nb) of images ``b0:b0+nb`` of ``img`` (n, C, *sp):
        one (transposing) copy into the zero-bordered image buffer unless the
        image can be read in place, then one slice copy per kernel offset (none
        for a 1x1 stride-1 pad-0 kernel read in place or batch last)."""
        xp = self.xp
        chunk = img[b0:b0 + nb]
        if not self.batch_last and not (self.is_1x1 and nb == 1):
            # batch first: Caffe-layout im2col straight from the image (border
            # strips zeroed, no padded copy)
            colv, colm = self._col_buffers(nb, xp, img.dtype)
            im2col(chunk, self.kernel, self.pad, self.stride, self.dilation,
                   out_shape=self.col_sp, out=colv.transpose(self.nchw_cols))
            return colm
        if self.unpadded and (nb == 1 or not self.batch_last):
            xpad = chunk.transpose(self.to_batch_last)             # a view, no copy
        else:
            xpad = self._img_buffer(nb, xp, img.dtype)
            for strip in self.borders:
                xpad[strip] = 0
            xpad[self.interior] = chunk.transpose(self.to_batch_last)
        if self.is_1x1 and (nb == 1 or self.batch_last):
            return xpad.reshape(self.group, self.kg, self.col_p * nb)
        colv, colm = self._col_buffers(nb, xp, img.dtype)
        im2col_batch_last(xpad, self.kernel, self.stride, self.dilation, self.col_sp, colv)
        return colm

    def _load_col_side(self, src, b0, nb):
        """Column-side values ``src[b0:b0+nb]`` (n, col_c, P) as (G, Ocg, P*nb)."""
        G, ocg, P = self.group, self.ocg, self.col_p
        if nb == 1:
            return src[b0].reshape(G, ocg, P)
        m, logical = self._mat_buffer(nb, self.xp, src.dtype)
        logical[...] = src[b0:b0 + nb].transpose(1, 2, 0)
        return m

    def _store_col_side(self, cols, out, b0, nb, bias):
        """``out[b0:b0+nb] = W @ cols (+ bias)``; out (n, col_c, P)."""
        xp = self.xp
        G, ocg, P = self.group, self.ocg, self.col_p
        W = self._weights()
        if nb == 1:
            dst = out[b0]
            xp.matmul(W, cols, out=dst.reshape(G, ocg, P))
            if bias is not None:
                dst += bias.reshape(self.col_c, 1)
            return
        y2, logical = self._mat_buffer(nb, xp, cols.dtype)
        xp.matmul(W, cols, out=y2)
        yv = logical.transpose(2, 0, 1)
        if bias is None:
            out[b0:b0 + nb] = yv
        else:
            xp.add(yv, bias.reshape(1, self.col_c, 1), out=out[b0:b0 + nb])

    def _accumulate_dW(self, cols, s2, dW):
        """``dW += s2 @ cols^T`` (Caffe's weight-gradient GEMM, summed over the
        chunk's images at once).  With fewer weight rows than columns rows
        (Ocg < Kg, the usual case) it is computed as ``(cols @ s2^T)^T``, the
        orientation OpenBLAS runs faster there; otherwise directly."""
        xp = self.xp
        G, ocg, kg = self.group, self.ocg, self.kg
        t = self._flat("_dw_flat", G * kg * ocg, xp, cols.dtype)
        if ocg < kg:
            t = t.reshape(G, kg, ocg)
            xp.matmul(cols, s2.transpose(0, 2, 1), out=t)
            dW += t.transpose(0, 2, 1)
        else:
            t = t.reshape(G, ocg, kg)
            xp.matmul(s2, cols.transpose(0, 2, 1), out=t)
            dW += t

    def _accumulate_dW_1x1(self, src, x, dW):
        """``dW += sum_n src[n] @ x[n]^T`` for a 1x1 stride-1 pad-0 kernel: one
        batched GEMM per image read in place (no transposed copies of the
        bottom and top diff), then a sum over the images; used when the
        per-image products (n, Ocg, Kg) are smaller than those copies."""
        xp = self.xp
        n, G, ocg, kg, P = self.num, self.group, self.ocg, self.kg, self.col_p
        t = self._flat("_dw1x1_flat", n * G * ocg * kg, xp, dW.dtype).reshape(n, G, ocg, kg)
        xp.matmul(src.reshape(n, G, ocg, P), x.reshape(n, G, kg, P).transpose(0, 1, 3, 2), out=t)
        dW += t.sum(axis=0)

    def _store_img(self, s2, img, b0, nb):
        """``img[b0:b0+nb] = col2im(W^T @ s2)`` (img (n, C, *sp), overwritten)."""
        xp = self.xp
        WT = self._weights().transpose(0, 2, 1)
        colv, colm = self._col_buffers(nb, xp, s2.dtype)
        xp.matmul(WT, s2, out=colm)
        if not self.batch_last:
            col2im(colv.transpose(self.nchw_cols), self.img_sp, self.kernel, self.pad, self.stride,
                   self.dilation, out=img[b0:b0 + nb])
            return
        if self.unpadded and nb == 1:
            col2im_batch_last(colv, self.kernel, self.stride, self.dilation,
                              img[b0:b0 + nb].transpose(self.to_batch_last))
            return
        dpad = self._img_buffer(nb, xp, s2.dtype)
        col2im_batch_last(colv, self.kernel, self.stride, self.dilation, dpad)
        img[b0:b0 + nb] = dpad[self.interior].transpose(self.from_batch_last)

    # -- the passes -------------------------------------------------------------
    def _chunks(self):
        for b0 in range(0, self.num, self.chunk):
            yield b0, min(self.chunk, self.num - b0)

    def _im2col_pass(self, img, out=None, src=None, dW=None, bias=None):
        """For each chunk: cols = im2col(img); ``dW += src @ cols^T`` (src column
        side (n, col_c, P)) and/or ``out = W @ cols (+ bias)`` (column side,
        (n, col_c, P), overwritten)."""
        xp = self.xp
        n, G, ocg, P = self.num, self.group, self.ocg, self.col_p
        if dW is None and self.is_1x1:
            W = self._weights()
            xp.matmul(W, img.reshape(n, G, self.kg, P), out=out.reshape(n, G, ocg, P))
            if bias is not None:
                out += bias.reshape(1, self.col_c, 1)
            return
        for b0, nb in self._chunks():
            cols = self._load_cols(img, b0, nb)
            if dW is not None:
                self._accumulate_dW(cols, self._load_col_side(src, b0, nb), dW)
            if out is not None:
                self._store_col_side(cols, out, b0, nb, bias)

    def _col2im_pass(self, src, img, dW=None, x=None):
        """``img = col2im(W^T @ src)``: src column side (n, col_c, P), img
        (n, img_c, *img_sp) overwritten (``img=None``: skipped).  With ``dW``
        also ``dW += src @ im2col(x)^T`` sharing the chunk's copy of src
        (Convolution's backward)."""
        xp = self.xp
        n, G, ocg, P = self.num, self.group, self.ocg, self.col_p
        if img is not None and self.is_1x1:       # Caffe's is_1x1_: a plain batched matmul
            WT = self._weights().transpose(0, 2, 1)
            xp.matmul(WT, src.reshape(n, G, ocg, P), out=img.reshape(n, G, self.kg, P))
            img = None
        if dW is not None and self.is_1x1 and self.num > 1 and ocg * self.kg <= (ocg + self.kg) * P:
            self._accumulate_dW_1x1(src, x, dW)
            dW = None
        if img is None and dW is None:
            return
        for b0, nb in self._chunks():
            s2 = self._load_col_side(src, b0, nb)
            if dW is not None:
                self._accumulate_dW(self._load_cols(x, b0, nb), s2, dW)
            if img is not None:
                self._store_img(s2, img, b0, nb)

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

    The forward of a 2-D, one-group, stride-1 convolution on medium and large
    maps with 16 to 128 input channels runs as a sum of shifted GEMMs
    (:class:`netlib.builtin.shiftconv.ShiftGemmEngine`, no column buffer;
    measured 1.2-1.5x faster there, slower on small maps and many channels);
    ``shift_gemm_forward``: True (that rule), False (never) or ``"always"``
    (whenever the geometry allows; the tests use it).  Its bottom diff
    (the adjoint, the same shifted GEMMs over the zero-bordered top diff) is
    used in backward too; the weight gradient stays on the im2col path,
    where it is faster.  Numbers equal to float32 rounding.
    """

    #: Use the depthwise engine when the layer is depthwise (see the class docstring).
    depthwise_fast_path = True
    #: Shifted-GEMM forward: True (measured rule), False, or "always".
    shift_gemm_forward = True
    _dw = None
    _shift = None

    def _wants_shift(self):
        mode = self.shift_gemm_forward
        if not mode or self.num_spatial_axes != 2 or self.group != 1 or self.is_1x1:
            return False
        if any(s != 1 for s in self.stride) or self.num == 0:
            return False
        if mode == "always":
            return True
        (OH, OW), W = self.out_sp, self.in_sp[1] + 2 * self.pad[1]
        return 16 <= self.channels <= 128 and OH * OW >= 256 and OW >= 0.75 * W

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self._dw = None
        self._shift = None
        if self._wants_shift():
            from .shiftconv import ShiftGemmEngine
            engine = getattr(self, "_shift_engine", None)
            if engine is None:
                engine = self._shift_engine = ShiftGemmEngine()
            engine.configure(self.num, self.channels, self.num_output, self.in_sp[0], self.in_sp[1],
                             self.kernel, self.pad, self.dilation)
            self._shift = engine
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
        bias = self.blobs[1].data if self.bias_term else None
        if self._shift is not None:
            w = self.blobs[0].data
            for b, t in zip(bottom, top):
                self._shift.forward(self._dw_view(b.data, self.channels, self.in_sp), w, bias,
                                    self._dw_view(t.data, self.num_output, self.out_sp))
            return
        for b, t in zip(bottom, top):
            self._im2col_pass(self._img_view(b.data), out=self._col_view(t.data), bias=bias)

    def _backward_depthwise(self, top, propagate_down, bottom):
        w = self.blobs[0].data
        dw = self.blobs[0].diff if self.param_propagate_down[0] else None
        db = (self.blobs[1].diff if self.bias_term and self.param_propagate_down[1] else None)
        for i, (t, b) in enumerate(zip(top, bottom)):
            dx = self._dw_view(b.diff, self.channels, self.in_sp) if propagate_down[i] else None
            self._dw.backward(self._dw_view(b.data, self.channels, self.in_sp), w,
                              self._dw_view(t.diff, self.num_output, self.out_sp),
                              dx=dx, dw=dw, db=db)

    jvp = forward_mode.weighted_jvp  # d(W*x + b) = W*dx + dW*x + db (InnerProduct, Convolution, Deconvolution).
    backward_jvp = second_order.weighted_rop  # d(dL/dx) = dW^T g, d(dL/dW) = g (x) dx.
    def backward(self, top, propagate_down, bottom):
        if self._dw is not None:
            self._backward_depthwise(top, propagate_down, bottom)
            return
        need_w = self.param_propagate_down[0]
        dW = None
        for i, (t, b) in enumerate(zip(top, bottom)):
            gy = t.diff
            self._bias_grad(gy)
            if need_w and dW is None:
                dW = self.blobs[0].diff.reshape(self.group, self.ocg, self.kg)
            shift_dx = self._shift is not None and propagate_down[i]
            self._col2im_pass(self._col_view(gy),
                              self._img_view(b.diff) if propagate_down[i] and not shift_dx else None,
                              dW=dW if need_w else None, x=self._img_view(b.data))
            if shift_dx:          # the bottom diff by shifted GEMMs (faster there than col2im)
                self._shift.backward(None, self.blobs[0].data,
                                     self._dw_view(gy, self.num_output, self.out_sp),
                                     dx=self._dw_view(b.diff, self.channels, self.in_sp))


@register_layer("Deconvolution")
class DeconvolutionLayer(_BaseConvolutionLayer):
    """Caffe's Deconvolution: forward = convolution backward-data (see module docstring)."""

    reverse = True

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            self._col2im_pass(self._col_view(b.data), self._img_view(t.data))
            self._add_bias(t.data)

    jvp = forward_mode.weighted_jvp  # d(W*x + b) = W*dx + dW*x + db (InnerProduct, Convolution, Deconvolution).
    backward_jvp = second_order.weighted_rop  # d(dL/dx) = dW^T g, d(dL/dW) = g (x) dx.
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
