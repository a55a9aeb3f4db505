"""PyTorch twins of Caffe nets, built layer for layer from a NetParameter.

``TorchTwin(param, phase)`` walks the layers of a (filtered, upgraded)
``caffe_pb2.NetParameter`` and creates one PyTorch CPU operation per Caffe
layer, with parameters of Caffe's shapes, so that netlib and PyTorch run the
same shapes in the benchmark (benchmarks/bench_nets.py).  It does its own
shape inference with Caffe's rules (``twin.shapes``: blob name -> shape) so
the benchmark can assert that both engines agree; ``forward(check=True)``
also asserts every torch tensor has the inferred shape.

Supported layer types: Input, Convolution (group, dilation), InnerProduct,
Pooling (MAX/AVE, global; Caffe's ceil rounding), ReLU, Sigmoid, TanH, LRN,
Dropout, Concat, Eltwise (SUM with coefficients, PROD, MAX), BatchNorm
(+ a following in-place Scale fused into one ``F.batch_norm``, as a PyTorch
user writes ``nn.BatchNorm2d``), Scale, Softmax, SoftmaxWithLoss, Split,
Flatten, Silence.

Pooling: Caffe's output size is ``ceil((H + 2p - k) / s) + 1``, minus one when
the last window would start inside the right padding.  The twin computes that
size and pads the right/bottom edge explicitly (``-inf`` for MAX, zeros for
AVE) so that ``max_pool2d``/``avg_pool2d`` with floor rounding produce
exactly Caffe's shape.  (AVE's divisor at clipped edges differs from Caffe's;
only shapes and work matter here.)

Numbers are not meant to match Caffe bit for bit; this is a timing twin.
Not a dependency of netlib: torch is imported here only.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

TRAIN, TEST = 0, 1


def _hw(rep, h, w, default):
    """Caffe's (h, w) from a repeated field plus optional _h/_w overrides."""
    if h or w:
        return int(h), int(w)
    vals = list(rep)
    if not vals:
        return default, default
    if len(vals) == 1:
        return int(vals[0]), int(vals[0])
    return int(vals[0]), int(vals[1])


def caffe_pool_out(size, k, s, p):
    """Caffe's pooled size along one axis (ceil rounding, last-window clip)."""
    out = int(math.ceil(float(size + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


class TorchTwin(torch.nn.Module):
    """A torch module running a Caffe NetParameter's layers in order.

    ``forward(inputs)`` takes {input blob name: tensor} and returns
    {blob name: tensor} of the net outputs (blobs no layer consumes); the
    summed loss (loss weight 1 per loss layer) is ``outputs['__loss__']``
    when the net has loss layers.  ``init`` optionally maps a layer name to
    the list of its Caffe parameter arrays (to copy netlib's weights).
    """

    def __init__(self, param, phase=TRAIN, init=None, seed=0):
        super().__init__()
        self.phase = phase
        self.train(phase == TRAIN)
        self.shapes = {}
        self.ops = []          # (kind, layer name, bottoms, tops, config dict)
        self.inputs = {}       # input blob name -> shape
        self._params = torch.nn.ParameterDict()
        self._bufs = {}
        gen = torch.Generator().manual_seed(seed)
        consumed = set()
        layers = list(param.layer)
        fused = set()
        for i, lp in enumerate(layers):
            if i in fused:
                continue
            bottoms, tops = list(lp.bottom), list(lp.top)
            consumed.update(bottoms)
            t = lp.type
            shp = [self.shapes[b] for b in bottoms]
            cfg = {}
            blobs = (init or {}).get(lp.name)
            if t == "Input":
                ip = lp.input_param
                for j, top in enumerate(tops):
                    s = ip.shape[j if len(ip.shape) > 1 else 0]
                    self.inputs[top] = tuple(int(d) for d in s.dim)
                    self.shapes[top] = self.inputs[top]
                continue
            elif t == "Convolution":
                cp = lp.convolution_param
                n, c, h, w = shp[0]
                kh, kw = _hw(cp.kernel_size, cp.kernel_h, cp.kernel_w, 1)
                ph, pw = _hw(cp.pad, cp.pad_h, cp.pad_w, 0)
                sh, sw = _hw(cp.stride, cp.stride_h, cp.stride_w, 1)
                dh, dw = _hw(cp.dilation, 0, 0, 1)
                g = int(cp.group)
                cfg = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=g)
                oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
                ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
                self._make_param(lp.name, 0, (cp.num_output, c // g, kh, kw), blobs, gen)
                cfg["bias"] = bool(cp.bias_term)
                if cp.bias_term:
                    self._make_param(lp.name, 1, (cp.num_output,), blobs, gen, bias=True)
                self.shapes[tops[0]] = (n, int(cp.num_output), oh, ow)
            elif t == "InnerProduct":
                ip = lp.inner_product_param
                axis = ip.axis if ip.axis >= 0 else len(shp[0]) + ip.axis
                k = int(np.prod(shp[0][axis:]))
                wshape = (k, ip.num_output) if ip.transpose else (ip.num_output, k)
                self._make_param(lp.name, 0, wshape, blobs, gen)
                cfg = dict(axis=axis, transpose=bool(ip.transpose), bias=bool(ip.bias_term))
                if ip.bias_term:
                    self._make_param(lp.name, 1, (ip.num_output,), blobs, gen, bias=True)
                self.shapes[tops[0]] = tuple(shp[0][:axis]) + (int(ip.num_output),)
            elif t == "Pooling":
                pp = lp.pooling_param
                n, c, h, w = shp[0]
                if pp.global_pooling:
                    kh, kw, ph, pw, sh, sw = h, w, 0, 0, 1, 1
                else:
                    kh, kw = _hw([pp.kernel_size] if pp.HasField("kernel_size") else [],
                                 pp.kernel_h, pp.kernel_w, 1)
                    ph, pw = _hw([pp.pad] if pp.HasField("pad") else [], pp.pad_h, pp.pad_w, 0)
                    sh, sw = _hw([pp.stride] if pp.HasField("stride") else [],
                                 pp.stride_h, pp.stride_w, 1)
                oh = caffe_pool_out(h, kh, sh, ph)
                ow = caffe_pool_out(w, kw, sw, pw)
                if pp.HasField("ceil_mode") and not pp.ceil_mode:
                    oh = (h + 2 * ph - kh) // sh + 1
                    ow = (w + 2 * pw - kw) // sw + 1
                # extra right/bottom padding so that floor rounding gives Caffe's size
                eh = max(0, (oh - 1) * sh + kh - (h + 2 * ph))
                ew = max(0, (ow - 1) * sw + kw - (w + 2 * pw))
                method = "max" if pp.pool == 0 else "ave"
                if pp.pool not in (0, 1):
                    raise NotImplementedError("%s: STOCHASTIC pooling" % lp.name)
                cfg = dict(method=method, kernel=(kh, kw), stride=(sh, sw), pad=(ph, pw),
                           extra=(eh, ew))
                self.shapes[tops[0]] = (n, c, oh, ow)
            elif t in ("ReLU", "Sigmoid", "TanH", "Dropout", "Softmax", "Split", "LRN"):
                if t == "ReLU":
                    cfg = dict(slope=float(lp.relu_param.negative_slope))
                elif t == "Dropout":
                    cfg = dict(p=float(lp.dropout_param.dropout_ratio))
                elif t == "Softmax":
                    ax = lp.softmax_param.axis
                    cfg = dict(axis=ax if ax >= 0 else len(shp[0]) + ax)
                elif t == "LRN":
                    q = lp.lrn_param
                    cfg = dict(size=int(q.local_size), alpha=float(q.alpha), beta=float(q.beta),
                               k=float(q.k), within=q.norm_region == 1)
                for top in tops:
                    self.shapes[top] = shp[0]
            elif t == "Concat":
                cc = lp.concat_param
                ax = cc.axis if not cc.HasField("concat_dim") else cc.concat_dim
                ax = ax if ax >= 0 else len(shp[0]) + ax
                out = list(shp[0])
                out[ax] = sum(s[ax] for s in shp)
                cfg = dict(axis=ax)
                self.shapes[tops[0]] = tuple(out)
            elif t == "Eltwise":
                ep = lp.eltwise_param
                cfg = dict(op=int(ep.operation), coeff=[float(c) for c in ep.coeff])
                self.shapes[tops[0]] = shp[0]
            elif t == "BatchNorm":
                bp = lp.batch_norm_param
                c = shp[0][1]
                use_global = bp.use_global_stats if bp.HasField("use_global_stats") else phase == TEST
                cfg = dict(global_stats=bool(use_global), eps=float(bp.eps),
                           momentum=1.0 - float(bp.moving_average_fraction), affine=False)
                mean = torch.zeros(c)
                var = torch.ones(c)
                if blobs is not None:
                    factor = float(blobs[2].ravel()[0]) if len(blobs) > 2 else 1.0
                    factor = 1.0 / factor if factor else 0.0
                    mean = torch.from_numpy(np.array(blobs[0], dtype=np.float32) * factor)
                    var = torch.from_numpy(np.array(blobs[1], dtype=np.float32) * factor)
                self.register_buffer(self._key(lp.name) + "_mean", mean)
                self.register_buffer(self._key(lp.name) + "_var", var)
                # fuse a following in-place Scale on this blob (nn.BatchNorm2d(affine=True))
                if (i + 1 < len(layers) and layers[i + 1].type == "Scale"
                        and list(layers[i + 1].bottom) == tops and list(layers[i + 1].top) == tops
                        and layers[i + 1].scale_param.axis == 1
                        and layers[i + 1].scale_param.num_axes == 1):
                    sl = layers[i + 1]
                    sblobs = (init or {}).get(sl.name)
                    self._make_param(sl.name, 0, (c,), sblobs, gen, one=True)
                    cfg["affine"] = sl.name
                    cfg["scale_bias"] = bool(sl.scale_param.bias_term)
                    if sl.scale_param.bias_term:
                        self._make_param(sl.name, 1, (c,), sblobs, gen, bias=True)
                    fused.add(i + 1)
                self.shapes[tops[0]] = shp[0]
            elif t == "Scale":
                sp = lp.scale_param
                if len(bottoms) != 1 or sp.axis != 1 or sp.num_axes != 1:
                    raise NotImplementedError("%s: only Scale axis 1 num_axes 1 with a learned scale"
                                              % lp.name)
                c = shp[0][1]
                self._make_param(lp.name, 0, (c,), blobs, gen, one=True)
                cfg = dict(bias=bool(sp.bias_term))
                if sp.bias_term:
                    self._make_param(lp.name, 1, (c,), blobs, gen, bias=True)
                self.shapes[tops[0]] = shp[0]
            elif t == "SoftmaxWithLoss":
                ax = lp.softmax_param.axis
                cfg = dict(axis=ax if ax >= 0 else len(shp[0]) + ax)
                self.shapes[tops[0]] = ()
            elif t == "Flatten":
                fp = lp.flatten_param
                ax = fp.axis if fp.axis >= 0 else len(shp[0]) + fp.axis
                end = fp.end_axis if fp.end_axis >= 0 else len(shp[0]) + fp.end_axis
                out = shp[0][:ax] + (int(np.prod(shp[0][ax:end + 1])),) + shp[0][end + 1:]
                cfg = dict(axis=ax, end=end)
                self.shapes[tops[0]] = tuple(out)
            elif t == "Silence":
                pass
            else:
                raise NotImplementedError("torch twin: layer %s of type %s" % (lp.name, t))
            self.ops.append((t, lp.name, bottoms, tops, cfg))
        produced = [top for op in self.ops for top in op[3]]
        self.outputs = [b for b in dict.fromkeys(produced) if b not in consumed]
        self.has_loss = any(op[0] == "SoftmaxWithLoss" for op in self.ops)

    # -- parameters ------------------------------------------------------------------
    @staticmethod
    def _key(name):
        return name.replace("/", "__").replace(".", "_")

    def _make_param(self, layer, idx, shape, blobs, gen, bias=False, one=False):
        shape = tuple(int(s) for s in shape)
        if blobs is not None:
            arr = np.array(blobs[idx], dtype=np.float32).reshape(shape)
            data = torch.from_numpy(arr)
        elif bias:
            data = torch.zeros(shape)
        elif one:
            data = torch.ones(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            data = torch.empty(shape).normal_(0.0, math.sqrt(2.0 / max(fan_in, 1)), generator=gen)
        self._params["%s_%d" % (self._key(layer), idx)] = torch.nn.Parameter(data)

    def p(self, layer, idx):
        return self._params["%s_%d" % (self._key(layer), idx)]

    def weight_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def zero_grad_like_caffe(self):
        """Zero every parameter's gradient in place (Caffe's ClearParamDiffs)."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def make_inputs(self, num_classes=None, seed=0):
        """Random inputs of the input shapes; a blob named 'label' gets class ids."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, shape in self.inputs.items():
            if name == "label":
                out[name] = torch.randint(0, num_classes or 2, shape, generator=gen).float()
            else:
                out[name] = torch.randn(shape, generator=gen)
        return out

    # -- running ---------------------------------------------------------------------
    def forward(self, inputs, check=False):
        blobs = dict(inputs)
        loss = None
        for t, name, bottoms, tops, cfg in self.ops:
            x = blobs[bottoms[0]] if bottoms else None
            if t == "Convolution":
                y = F.conv2d(x, self.p(name, 0), self.p(name, 1) if cfg["bias"] else None,
                             cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
            elif t == "InnerProduct":
                x2 = x.reshape(x.shape[:cfg["axis"]] + (-1,))
                w = self.p(name, 0)
                b = self.p(name, 1) if cfg["bias"] else None
                y = F.linear(x2, w.t() if cfg["transpose"] else w, b)
            elif t == "Pooling":
                eh, ew = cfg["extra"]
                if cfg["method"] == "max":
                    if eh or ew:
                        x = F.pad(x, (0, ew, 0, eh), value=float("-inf"))
                    y = F.max_pool2d(x, cfg["kernel"], cfg["stride"], cfg["pad"])
                else:
                    if eh or ew:
                        x = F.pad(x, (0, ew, 0, eh))
                    y = F.avg_pool2d(x, cfg["kernel"], cfg["stride"], cfg["pad"])
            elif t == "ReLU":
                y = F.relu(x) if cfg["slope"] == 0 else F.leaky_relu(x, cfg["slope"])
            elif t == "Sigmoid":
                y = torch.sigmoid(x)
            elif t == "TanH":
                y = torch.tanh(x)
            elif t == "Dropout":
                y = F.dropout(x, cfg["p"], self.training)
            elif t == "Softmax":
                y = F.softmax(x, dim=cfg["axis"])
            elif t == "LRN":
                if cfg["within"]:
                    size = cfg["size"]
                    sq = F.avg_pool2d(x * x, size, 1, (size - 1) // 2, count_include_pad=True)
                    y = x / (1.0 + cfg["alpha"] * sq).pow(cfg["beta"])
                else:
                    y = F.local_response_norm(x, cfg["size"], cfg["alpha"], cfg["beta"], cfg["k"])
            elif t == "Split":
                for top in tops:
                    blobs[top] = x
                continue
            elif t == "Concat":
                y = torch.cat([blobs[b] for b in bottoms], dim=cfg["axis"])
            elif t == "Eltwise":
                xs = [blobs[b] for b in bottoms]
                if cfg["op"] == 0:
                    y = xs[0] * xs[1]
                    for z in xs[2:]:
                        y = y * z
                elif cfg["op"] == 1:
                    co = cfg["coeff"] or [1.0] * len(xs)
                    y = xs[0] if co[0] == 1 else xs[0] * co[0]
                    for c, z in zip(co[1:], xs[1:]):
                        y = y + z if c == 1 else y + c * z
                else:
                    y = xs[0]
                    for z in xs[1:]:
                        y = torch.maximum(y, z)
            elif t == "BatchNorm":
                key = self._key(name)
                w = b = None
                if cfg["affine"]:
                    w = self.p(cfg["affine"], 0)
                    b = self.p(cfg["affine"], 1) if cfg["scale_bias"] else None
                y = F.batch_norm(x, getattr(self, key + "_mean"), getattr(self, key + "_var"),
                                 w, b, training=not cfg["global_stats"],
                                 momentum=cfg["momentum"], eps=cfg["eps"])
            elif t == "Scale":
                shape = (1, -1) + (1,) * (x.dim() - 2)
                y = x * self.p(name, 0).view(shape)
                if cfg["bias"]:
                    y = y + self.p(name, 1).view(shape)
            elif t == "SoftmaxWithLoss":
                logits = x
                if cfg["axis"] != 1:
                    logits = logits.movedim(cfg["axis"], 1)
                n, c = logits.shape[0], logits.shape[1]
                y = F.cross_entropy(logits.reshape(n, c, -1),
                                    blobs[bottoms[1]].long().reshape(n, -1))
                loss = y if loss is None else loss + y
            elif t == "Flatten":
                y = x.flatten(cfg["axis"], cfg["end"])
            elif t == "Silence":
                continue
            else:  # pragma: no cover
                raise NotImplementedError(t)
            blobs[tops[0]] = y
            if check and tuple(y.shape) != tuple(self.shapes[tops[0]]):
                raise AssertionError("torch twin %s: top %s has shape %s, Caffe's rules give %s"
                                     % (name, tops[0], tuple(y.shape), self.shapes[tops[0]]))
        out = {name: blobs[name] for name in self.outputs}
        if loss is not None:
            out["__loss__"] = loss
        return out
