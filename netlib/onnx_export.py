"""Export a deploy :class:`~netlib.net.Net` to ONNX (``Net.to_onnx``, ``netlib export-onnx``).

``export_onnx(net, path, opset=13)`` writes one ONNX model whose graph
computes what ``net.forward()`` computes, with the net's shapes fixed (the
batch size included): graph inputs are the net's inputs (Input layers, or
legacy ``input:`` fields), graph outputs its output blobs, and the weights
float32 initializers.  The ``onnx`` package is needed (``pip install onnx``);
onnxruntime is only needed to run the result.

Caffe semantics made explicit in the graph:

* Pooling's output size uses Caffe's ceil rule (clipped so the last window
  starts inside the padded image); the graph gets the extra end padding
  instead of ``ceil_mode``.  AVE pooling divides, as Caffe does, by the
  window clipped to the image plus its padding (not to the extra end
  padding): an AveragePool (count_include_pad) times a constant per-position
  correction where the clipped windows differ.
* LRN WITHIN_CHANNEL is decomposed as Caffe builds it (k ignored, divisor n*n).
* BatchNorm divides its stored mean and variance by the scale-factor blob.

A layer that cannot be exported (Python layers, data layers other than
Input, losses, accuracy, recurrent layers...) raises :class:`OnnxExportError`
naming the layer and its type.
"""
import math

import numpy

from .errors import ConfigError

__all__ = ["export_onnx", "OnnxExportError", "SUPPORTED_TYPES"]


class OnnxExportError(ConfigError):
    """A net (or one of its layers) that cannot be written as ONNX."""


def _require_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import helper, numpy_helper, TensorProto  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install onnx "
                          "(or pip install netlib[onnx])") from None
    return onnx


def _host(arr):
    if hasattr(arr, "get"):  # a CuPy array
        arr = arr.get()
    return numpy.asarray(arr)


class _Graph:
    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.inits = [], []
        self.used = set()
        self._n = 0

    def fresh(self, hint):
        name = hint
        while name in self.used:
            self._n += 1
            name = "%s/%d" % (hint, self._n)
        self.used.add(name)
        return name

    def const(self, value, hint, dtype=numpy.float32):
        arr = numpy.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def ints(self, value, hint):
        return self.const(value, hint, numpy.int64)

    def node(self, op, inputs, hint, n_out=1, **attrs):
        outs = [self.fresh(hint if n_out == 1 else "%s:%d" % (hint, j)) for j in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), outs, name=self.fresh("node:" + hint),
                                                     **attrs))
        return outs[0] if n_out == 1 else outs


def _spatial(param, name, default, n, allow_hw=True):
    """Caffe's kernel/stride/pad/dilation: ``name_h``/``name_w`` or the repeated field."""
    if allow_hw and n == 2 and (param.HasField(name + "_h") or param.HasField(name + "_w")):
        return [int(getattr(param, name + "_h")), int(getattr(param, name + "_w"))]
    field = name + ("_size" if name == "kernel" else "")
    vals = getattr(param, field)
    if not isinstance(vals, (int, float)):
        vals = list(vals)
    elif param.HasField(field):
        vals = [vals]
    else:
        vals = []
    if not vals:
        return [default] * n
    if len(vals) == 1:
        return [int(vals[0])] * n
    return [int(v) for v in vals]


class _Exporter:
    def __init__(self, net, onnx):
        self.net = net
        self.g = _Graph(onnx)
        self.cur = {}      # blob name -> current ONNX tensor name
        self.outputs = set(net.outputs)

    def fail(self, why):
        lp = self.lp
        raise OnnxExportError("layer %r (type %s): cannot export to ONNX: %s" % (lp.name, lp.type, why))

    def top_name(self, j):
        name = self.tops[j]
        hint = name if name not in self.outputs else name + "/out"
        return hint

    def set_top(self, j, tensor):
        self.cur[self.tops[j]] = tensor

    # -- per layer -----------------------------------------------------------------
    def run(self):
        net, g = self.net, self.g
        inputs = []
        for i, layer in enumerate(net.layers):
            self.lp = lp = layer.layer_param
            self.layer = layer
            self.bottoms = list(lp.bottom)
            self.tops = [net._blob_names[t] for t in net.top_ids[i]]
            self.xin = [self.cur[b] for b in self.bottoms]
            self.bshapes = [tuple(b.shape) for b in net.bottom_vecs[i]]
            self.tshapes = [tuple(t.shape) for t in net.top_vecs[i]]
            self.blobs = [_host(b.data).astype(numpy.float32) for b in layer.blobs]
            if lp.type == "Input":
                for j, name in enumerate(self.tops):
                    g.used.add(name)
                    inputs.append(g.onnx.helper.make_tensor_value_info(
                        name, g.onnx.TensorProto.FLOAT, list(self.tshapes[j])))
                    self.cur[name] = name
                continue
            handler = getattr(self, "op_" + lp.type, None)
            if lp.type == "Python":
                self.fail("a Python layer runs arbitrary Python code and has no ONNX form")
            if handler is None:
                self.fail("layer type %s is not supported by the exporter" % lp.type)
            handler()
        outputs = []
        for name in net.outputs:
            tensor = self.cur[name]
            if tensor != name:
                if name in g.used:
                    raise OnnxExportError("output blob %r: its name is taken by an input" % name)
                g.used.add(name)
                g.nodes.append(g.onnx.helper.make_node("Identity", [tensor], [name], name=g.fresh("node:out:" + name)))
            outputs.append(g.onnx.helper.make_tensor_value_info(
                name, g.onnx.TensorProto.FLOAT, list(net.blobs[name].shape)))
        return inputs, outputs

    def unary(self, op, **attrs):
        self.set_top(0, self.g.node(op, [self.xin[0]], self.top_name(0), **attrs))

    def bcast_shape(self, shape, axis, ndim):
        return tuple(shape) + (1,) * (ndim - axis - len(shape))

    def reshape_to(self, x, shape, hint):
        return self.g.node("Reshape", [x, self.g.ints(list(shape), hint + ":shape")], hint)

    # vision
    def _conv_geometry(self, p, nsp):
        k = _spatial(p, "kernel", None, nsp)
        if None in k:
            self.fail("no kernel size")
        s = _spatial(p, "stride", 1, nsp)
        pad = _spatial(p, "pad", 0, nsp)
        d = _spatial(p, "dilation", 1, nsp, allow_hw=False)
        return k, s, pad, d

    def op_Convolution(self, transpose=False):
        p = self.lp.convolution_param
        axis = p.axis if p.axis >= 0 else p.axis + len(self.bshapes[0])
        if axis != 1:
            self.fail("only axis 1 is supported (got %d)" % p.axis)
        if len(self.xin) != 1:
            self.fail("one bottom only (%d given)" % len(self.xin))
        nsp = len(self.bshapes[0]) - 2
        k, s, pad, d = self._conv_geometry(p, nsp)
        w = self.g.const(self.blobs[0], self.lp.name + ":weight")
        ins = [self.xin[0], w]
        if p.bias_term and len(self.blobs) > 1:
            ins.append(self.g.const(self.blobs[1].reshape(-1), self.lp.name + ":bias"))
        op = "ConvTranspose" if transpose else "Conv"
        self.set_top(0, self.g.node(op, ins, self.top_name(0), kernel_shape=k, strides=s, pads=pad + pad,
                                    dilations=d, group=int(p.group)))

    def op_Deconvolution(self):
        self.op_Convolution(transpose=True)

    def op_Pooling(self):
        g, lp = self.g, self.lp
        p = lp.pooling_param
        P = type(p)
        if len(self.tops) != 1:
            self.fail("the max-index top (mask) is not supported")
        shape = self.bshapes[0]
        if len(shape) != 4:
            self.fail("needs a 4-axis bottom")
        if p.pool not in (P.MAX, P.AVE):
            self.fail("only MAX and AVE pooling are supported (STOCHASTIC is not)")
        if p.global_pooling:
            self.unary("GlobalMaxPool" if p.pool == P.MAX else "GlobalAveragePool")
            return
        k = _spatial(p, "kernel", None, 2)
        if None in k:
            self.fail("no kernel size")
        s = _spatial(p, "stride", 1, 2)
        pad = _spatial(p, "pad", 0, 2)
        H = shape[2:]
        out = self.tshapes[0][2:]
        end = [max(pad[a], (out[a] - 1) * s[a] + k[a] - H[a] - pad[a]) for a in range(2)]
        x = self.xin[0]
        begin = list(pad)
        if any(begin[a] >= k[a] or end[a] >= k[a] for a in range(2)):
            # onnxruntime wants pads smaller than the kernel: pad explicitly
            value = -3.4028234663852886e38 if p.pool == P.MAX else 0.0
            x = g.node("Pad", [x, g.ints([0, 0] + begin + [0, 0] + end, lp.name + ":pads"),
                               g.const(value, lp.name + ":padvalue")], lp.name + ":padded")
            begin, end = [0, 0], [0, 0]
        if p.pool == P.MAX:
            self.set_top(0, g.node("MaxPool", [x], self.top_name(0), kernel_shape=k, strides=s,
                                   pads=begin + end))
            return
        y = g.node("AveragePool", [x], self.top_name(0), kernel_shape=k, strides=s,
                   pads=begin + end, count_include_pad=1)
        # Caffe's divisor: the window clipped to the image plus its (symmetric) padding.
        sizes = []
        for a in range(2):
            starts = numpy.arange(out[a]) * s[a] - pad[a]
            sizes.append(numpy.minimum(starts + k[a], H[a] + pad[a]) - starts)
        div = numpy.outer(sizes[0], sizes[1]).astype(numpy.float64)
        if numpy.any(div != k[0] * k[1]):
            corr = (k[0] * k[1] / div).reshape(1, 1, out[0], out[1])
            y = g.node("Mul", [y, g.const(corr, lp.name + ":divisor")], self.top_name(0))
        self.set_top(0, y)

    def op_InnerProduct(self):
        g, lp = self.g, self.lp
        p = lp.inner_product_param
        shape = self.bshapes[0]
        axis = p.axis if p.axis >= 0 else p.axis + len(shape)
        x = self.xin[0]
        if not (axis == 1 and len(shape) == 2):
            x = g.node("Flatten", [x], lp.name + ":flat", axis=axis)
        ins = [x, g.const(self.blobs[0], lp.name + ":weight")]
        if p.bias_term and len(self.blobs) > 1:
            ins.append(g.const(self.blobs[1].reshape(-1), lp.name + ":bias"))
        y = g.node("Gemm", ins, self.top_name(0), transB=0 if p.transpose else 1)
        if len(self.tshapes[0]) != 2:
            y = self.reshape_to(y, self.tshapes[0], self.top_name(0))
        self.set_top(0, y)

    # neurons
    def op_ReLU(self):
        slope = self.lp.relu_param.negative_slope
        if slope:
            self.unary("LeakyRelu", alpha=float(slope))
        else:
            self.unary("Relu")

    def op_PReLU(self):
        nd = len(self.bshapes[0])
        slope = self.blobs[0].reshape(-1)
        slope = slope.reshape((1,) * max(nd - 1, 0)) if slope.size == 1 else slope.reshape(
            (slope.size,) + (1,) * (nd - 2))
        self.set_top(0, self.g.node("PRelu", [self.xin[0], self.g.const(slope, self.lp.name + ":slope")],
                                    self.top_name(0)))

    def op_ELU(self):
        self.unary("Elu", alpha=float(self.lp.elu_param.alpha))

    def op_Sigmoid(self):
        self.unary("Sigmoid")

    def op_TanH(self):
        self.unary("Tanh")

    def op_AbsVal(self):
        self.unary("Abs")

    def op_BNLL(self):
        self.unary("Softplus")

    def op_Dropout(self):
        self.set_top(0, self.xin[0])

    def _affine(self, x, scale, shift, hint):
        g = self.g
        if scale != 1:
            x = g.node("Mul", [x, g.const(scale, hint + ":scale")], hint)
        if shift != 0:
            x = g.node("Add", [x, g.const(shift, hint + ":shift")], hint)
        return x

    def op_Power(self):
        p = self.lp.power_param
        hint = self.top_name(0)
        x = self._affine(self.xin[0], p.scale, p.shift, hint + ":lin")
        if p.power != 1:
            x = self.g.node("Pow", [x, self.g.const(p.power, hint + ":power")], hint)
        elif x == self.xin[0]:
            x = self.g.node("Identity", [x], hint)
        self.set_top(0, x)

    def op_Exp(self):
        p = self.lp.exp_param
        ln = 1.0 if p.base == -1 else math.log(p.base)
        x = self._affine(self.xin[0], p.scale * ln, p.shift * ln, self.top_name(0) + ":lin")
        self.set_top(0, self.g.node("Exp", [x], self.top_name(0)))

    def op_Log(self):
        p = self.lp.log_param
        x = self._affine(self.xin[0], p.scale, p.shift, self.top_name(0) + ":lin")
        y = self.g.node("Log", [x], self.top_name(0))
        if p.base != -1:
            y = self.g.node("Mul", [y, self.g.const(1.0 / math.log(p.base), self.lp.name + ":invln")],
                            self.top_name(0))
        self.set_top(0, y)

    def op_Swish(self):
        g = self.g
        beta = self.lp.swish_param.beta
        x = self.xin[0]
        bx = x if beta == 1 else g.node("Mul", [x, g.const(beta, self.lp.name + ":beta")], self.lp.name + ":bx")
        sg = g.node("Sigmoid", [bx], self.lp.name + ":sig")
        self.set_top(0, g.node("Mul", [x, sg], self.top_name(0)))

    def op_Clip(self):
        p = self.lp.clip_param
        g = self.g
        self.set_top(0, g.node("Clip", [self.xin[0], g.const(p.min, self.lp.name + ":min"),
                                        g.const(p.max, self.lp.name + ":max")], self.top_name(0)))

    def op_Threshold(self):
        g = self.g
        t = g.node("Greater", [self.xin[0], g.const(self.lp.threshold_param.threshold, self.lp.name + ":t")],
                   self.lp.name + ":gt")
        self.set_top(0, g.node("Cast", [t], self.top_name(0), to=self.g.onnx.TensorProto.FLOAT))

    # normalization
    def op_LRN(self):
        p = self.lp.lrn_param
        g = self.g
        n = int(p.local_size)
        if p.norm_region == type(p).ACROSS_CHANNELS:
            self.unary("LRN", size=n, alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))
            return
        x = self.xin[0]
        hint = self.lp.name
        sq = g.node("Mul", [x, x], hint + ":sq")
        pre = (n - 1) // 2
        # count_include_pad: Caffe's AVE pooling counts the padded cells (divisor n*n)
        box = g.node("AveragePool", [sq], hint + ":box", kernel_shape=[n, n], strides=[1, 1],
                     pads=[pre, pre, n - 1 - pre, n - 1 - pre], count_include_pad=1)
        sc = self._affine(box, p.alpha, 1.0, hint + ":scale")
        pw = g.node("Pow", [sc, g.const(-p.beta, hint + ":beta")], hint + ":pow")
        self.set_top(0, g.node("Mul", [x, pw], self.top_name(0)))

    def op_BatchNorm(self):
        p = self.lp.batch_norm_param
        if p.HasField("use_global_stats") and not p.use_global_stats:
            self.fail("use_global_stats false (batch statistics) is not an inference computation")
        mean, var, factor = (b.astype(numpy.float64) for b in self.blobs[:3])
        f = 0.0 if factor.reshape(-1)[0] == 0 else 1.0 / factor.reshape(-1)[0]
        mean, var = mean * f, var * f
        a = 1.0 / numpy.sqrt(var + p.eps)
        b = -mean * a
        nd = len(self.bshapes[0])
        shp = self.bcast_shape((a.size,), 1, nd)
        g, hint = self.g, self.lp.name
        y = g.node("Mul", [self.xin[0], g.const(a.reshape(shp), hint + ":a")], hint + ":mul")
        self.set_top(0, g.node("Add", [y, g.const(b.reshape(shp), hint + ":b")], self.top_name(0)))

    def _axes_of(self, p, other_shape=None):
        shape = self.bshapes[0]
        nd = len(shape)
        axis = p.axis if p.axis >= 0 else p.axis + nd
        if other_shape is not None:
            n = len(other_shape)
        else:
            n = nd - axis if p.num_axes == -1 else p.num_axes
        return axis, tuple(shape[axis:axis + n]), nd

    def op_Scale(self):
        p = self.lp.scale_param
        g, hint = self.g, self.lp.name
        if len(self.xin) > 1:
            axis, sshape, nd = self._axes_of(p, self.bshapes[1])
            s = self.reshape_to(self.xin[1], self.bcast_shape(sshape, axis, nd), hint + ":s")
            bias = self.blobs[0] if p.bias_term and self.blobs else None
        else:
            axis, sshape, nd = self._axes_of(p)
            s = g.const(self.blobs[0].reshape(self.bcast_shape(sshape, axis, nd)), hint + ":scale")
            bias = self.blobs[1] if p.bias_term and len(self.blobs) > 1 else None
        y = g.node("Mul", [self.xin[0], s], self.top_name(0) if bias is None else hint + ":mul")
        if bias is not None:
            y = g.node("Add", [y, g.const(bias.reshape(self.bcast_shape(sshape, axis, nd)), hint + ":bias")],
                       self.top_name(0))
        self.set_top(0, y)

    def op_Bias(self):
        p = self.lp.bias_param
        g, hint = self.g, self.lp.name
        if len(self.xin) > 1:
            axis, sshape, nd = self._axes_of(p, self.bshapes[1])
            b = self.reshape_to(self.xin[1], self.bcast_shape(sshape, axis, nd), hint + ":b")
        else:
            axis, sshape, nd = self._axes_of(p)
            b = g.const(self.blobs[0].reshape(self.bcast_shape(sshape, axis, nd)), hint + ":bias")
        self.set_top(0, g.node("Add", [self.xin[0], b], self.top_name(0)))

    def op_MVN(self):
        p = self.lp.mvn_param
        g, hint = self.g, self.lp.name
        nd = len(self.bshapes[0])
        first = 1 if p.across_channels else 2
        axes = list(range(min(first, nd), nd))
        if not axes:
            self.fail("needs more axes")
        x = self.xin[0]
        mean = g.node("ReduceMean", [x], hint + ":mean", axes=axes, keepdims=1)
        y = g.node("Sub", [x, mean], hint + ":centred" if p.normalize_variance else self.top_name(0))
        if p.normalize_variance:
            var = g.node("ReduceMean", [g.node("Mul", [y, y], hint + ":sq")], hint + ":var", axes=axes, keepdims=1)
            std = g.node("Add", [g.node("Sqrt", [var], hint + ":std"), g.const(p.eps, hint + ":eps")],
                         hint + ":stdeps")
            y = g.node("Div", [y, std], self.top_name(0))
        self.set_top(0, y)

    def op_Normalize(self):
        p = self.lp.norm_param
        g, hint = self.g, self.lp.name
        nd = len(self.bshapes[0])
        axes = list(range(1, nd)) if p.across_spatial else [1]
        x = self.xin[0]
        ss = g.node("ReduceSumSquare", [x], hint + ":ss", axes=axes, keepdims=1)
        norm = g.node("Sqrt", [g.node("Add", [ss, g.const(p.eps, hint + ":eps")], hint + ":sse")], hint + ":norm")
        y = g.node("Div", [x, norm], hint + ":div")
        scale = self.blobs[0].reshape(-1)
        scale = scale.reshape(()) if scale.size == 1 else scale.reshape(self.bcast_shape((scale.size,), 1, nd))
        self.set_top(0, g.node("Mul", [y, g.const(scale, hint + ":scale")], self.top_name(0)))

    # structure
    def op_Softmax(self):
        axis = self.lp.softmax_param.axis
        self.unary("Softmax", axis=int(axis))

    def op_Split(self):
        for j in range(len(self.tops)):
            self.set_top(j, self.xin[0])

    def op_Silence(self):
        pass

    def op_Concat(self):
        p = self.lp.concat_param
        axis = p.axis if not p.HasField("concat_dim") or p.HasField("axis") else p.concat_dim
        self.set_top(0, self.g.node("Concat", self.xin, self.top_name(0), axis=int(axis)))

    def op_Slice(self):
        p = self.lp.slice_param
        axis = p.axis if not p.HasField("slice_dim") or p.HasField("axis") else p.slice_dim
        nd = len(self.bshapes[0])
        axis = axis if axis >= 0 else axis + nd
        sizes = [t[axis] for t in self.tshapes]
        if len(sizes) == 1:
            self.set_top(0, self.xin[0])
            return
        outs = self.g.node("Split", [self.xin[0], self.g.ints(sizes, self.lp.name + ":split")],
                           self.lp.name, n_out=len(sizes), axis=int(axis))
        for j, o in enumerate(outs):
            self.set_top(j, o)

    def op_Flatten(self):
        self.set_top(0, self.reshape_to(self.xin[0], self.tshapes[0], self.top_name(0)))

    op_Reshape = op_Flatten

    def op_Permute(self):
        order = list(self.lp.permute_param.order)
        nd = len(self.bshapes[0])
        perm = []
        for o in order:
            if o not in perm:
                perm.append(int(o))
        perm += [a for a in range(nd) if a not in perm]
        self.unary("Transpose", perm=perm)

    def op_Eltwise(self):
        p = self.lp.eltwise_param
        E = type(p)
        g, hint = self.g, self.lp.name
        if p.operation == E.PROD:
            y = self.xin[0]
            for j, x in enumerate(self.xin[1:]):
                y = g.node("Mul", [y, x], self.top_name(0) if j == len(self.xin) - 2 else hint + ":prod")
        elif p.operation == E.MAX:
            y = g.node("Max", self.xin, self.top_name(0))
        else:
            coeffs = list(p.coeff) or [1.0] * len(self.xin)
            terms = [x if c == 1 else g.node("Mul", [x, g.const(c, hint + ":coeff")], hint + ":term")
                     for x, c in zip(self.xin, coeffs)]
            y = g.node("Sum", terms, self.top_name(0))
        self.set_top(0, y)

    def op_Crop(self):
        p = self.lp.crop_param
        shape, ref = self.bshapes[0], self.bshapes[1]
        nd = len(shape)
        axis = p.axis if p.axis >= 0 else p.axis + nd
        offs = list(p.offset)
        starts, ends, axes = [], [], []
        for a in range(axis, nd):
            o = 0 if not offs else (offs[0] if len(offs) == 1 else offs[a - axis])
            starts.append(o)
            ends.append(o + ref[a])
            axes.append(a)
        g, hint = self.g, self.lp.name
        self.set_top(0, g.node("Slice", [self.xin[0], g.ints(starts, hint + ":starts"), g.ints(ends, hint + ":ends"),
                                         g.ints(axes, hint + ":axes")], self.top_name(0)))

    def op_Tile(self):
        p = self.lp.tile_param
        nd = len(self.bshapes[0])
        axis = p.axis if p.axis >= 0 else p.axis + nd
        reps = [1] * nd
        reps[axis] = int(p.tiles)
        self.set_top(0, self.g.node("Tile", [self.xin[0], self.g.ints(reps, self.lp.name + ":reps")],
                                    self.top_name(0)))

    def op_Reduction(self):
        p = self.lp.reduction_param
        R = type(p)
        g, hint = self.g, self.lp.name
        shape = self.bshapes[0]
        nd = len(shape)
        axis = p.axis if p.axis >= 0 else p.axis + nd
        x = self.reshape_to(self.xin[0], list(shape[:axis]) + [-1], hint + ":flat")
        last = [axis]
        if p.operation == R.SUM:
            y = g.node("ReduceSum", [x, g.ints(last, hint + ":axes")], hint + ":red", keepdims=0)
        else:
            op = {R.ASUM: "ReduceL1", R.SUMSQ: "ReduceSumSquare", R.MEAN: "ReduceMean"}[p.operation]
            y = g.node(op, [x], hint + ":red", axes=last, keepdims=0)
        if p.coeff != 1:
            y = g.node("Mul", [y, g.const(p.coeff, hint + ":coeff")], hint + ":coeffd")
        self.set_top(0, self.reshape_to(y, self.tshapes[0], self.top_name(0)))

    def op_ArgMax(self):
        p = self.lp.argmax_param
        g, hint = self.g, self.lp.name
        k = int(p.top_k)
        x = self.xin[0]
        F = g.onnx.TensorProto.FLOAT
        if p.HasField("axis"):
            nd = len(self.bshapes[0])
            axis = p.axis if p.axis >= 0 else p.axis + nd
            vals, idx = g.node("TopK", [x, g.ints([k], hint + ":k")], hint + ":topk", n_out=2, axis=axis)
            y = vals if p.out_max_val else g.node("Cast", [idx], hint + ":idx", to=F)
        else:
            flat = g.node("Flatten", [x], hint + ":flat", axis=1)
            vals, idx = g.node("TopK", [flat, g.ints([k], hint + ":k")], hint + ":topk", n_out=2, axis=1)
            y = g.node("Cast", [idx], hint + ":idx", to=F)
            if p.out_max_val:
                n = self.bshapes[0][0]
                y = g.node("Concat", [self.reshape_to(y, [n, 1, k], hint + ":i3"),
                                      self.reshape_to(vals, [n, 1, k], hint + ":v3")], hint + ":cat", axis=1)
        self.set_top(0, self.reshape_to(y, self.tshapes[0], self.top_name(0)))


#: Layer types the exporter writes (besides Input).
SUPPORTED_TYPES = tuple(sorted(n[3:] for n in dir(_Exporter) if n.startswith("op_")))


def export_onnx(net, path=None, opset=13):
    """Write ``net`` (a built :class:`~netlib.net.Net`, weights loaded) as an
    ONNX model to ``path``; returns the ``onnx.ModelProto``.  Shapes are the
    net's current ones.  Raises :class:`OnnxExportError` for a layer with no
    ONNX form, :class:`~netlib.errors.ConfigError` when onnx is missing."""
    onnx = _require_onnx()
    if not 13 <= int(opset) <= 17:
        raise ConfigError("ONNX export writes opsets 13 to 17 (got %d)" % opset)
    ex = _Exporter(net, onnx)
    inputs, outputs = ex.run()
    if not inputs:
        raise OnnxExportError("net %r has no inputs (Input layer or input: fields) to export" % net.name)
    graph = onnx.helper.make_graph(ex.g.nodes, net.name or "netlib", inputs, outputs, initializer=ex.g.inits)
    model = onnx.helper.make_model(graph, producer_name="netlib",
                                   opset_imports=[onnx.helper.make_opsetid("", int(opset))])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    if path is not None:
        from .files import atomic_write
        with atomic_write(str(path)) as f:
            f.write(model.SerializeToString())
    return model
