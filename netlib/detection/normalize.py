"""Normalize (SSD fork): L2 normalization with a learned scale."""
from ..errors import ConfigError, ShapeError
from ..fillers import fill, filler_param
from ..layer import Layer, register_layer


@register_layer("Normalize")
class NormalizeLayer(Layer):
    """``top = scale * x / sqrt(sum x^2 + eps)``.

    Bottom: N x C x ... (at least 2 axes); top: the same shape.  The sum runs
    over the channels at each position (``across_spatial: false``; the norm
    is N x S with S = count(2)) or over all C * S values of an image
    (``across_spatial: true``, the default).  ``eps`` (1e-10) is added to the
    sum of squares *before* the square root, in both modes, as the fork does.
    ``scale``: one learnable blob, a scalar of shape () when
    ``channel_shared`` (default true) or (C,), filled by ``scale_filler``
    (default constant 1).  Across space the fork multiplies by ``1 / norm``
    (rounded to the dtype) rather than dividing; that is kept.

    Backward, with n the norm and s the scale (broadcast over channels),
    ``g = s * dy``: ``dx = (g - x * sum(x * g) / n^2) / n`` over the same
    group as the norm, and ``dscale += sum(dy * x / n)`` (over everything, or
    per channel).  The fork computes the bottom gradient as
    ``s * (dy - x * sum(x * dy) / n^2) / n``, which is the same when the
    scale is shared (or equal across channels) but not the exact gradient for
    per-channel scales; netlib uses the exact one (the float64 gradient check
    requires it).  The fork also gets the scale gradient as ``sum(top * dy) /
    s`` (NaN at s = 0); netlib uses ``x / n`` directly.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.norm_param
        if bottom[0].ndim < 2:
            self.fail("the bottom needs at least 2 axes (N x C x ...)", bottom=bottom, error=ShapeError)
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(p.eps)
        channels = bottom[0].shape[1]
        want = () if self.channel_shared else (channels,)
        if not self.blobs:
            scale = self.new_blob(want)
            fill(scale, filler_param(p, "scale_filler", type="constant", value=1.0))
            self.blobs.append(scale)
        count = 1
        for d in want:
            count *= d
        if self.blobs[0].count != count:
            self.fail("scale blob has %d values, the config needs %d (channel_shared %s, %d channels)"
                      % (self.blobs[0].count, count, self.channel_shared, channels),
                      bottom=bottom, error=ConfigError)

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.ndim < 2:
            self.fail("the bottom needs at least 2 axes (N x C x ...)", bottom=bottom, error=ShapeError)
        if not self.channel_shared and b.shape[1] != self.blobs[0].count:
            self.fail("bottom has %d channels, the scale has %d" % (b.shape[1], self.blobs[0].count),
                      bottom=bottom, error=ShapeError)
        if top[0] is b:
            self.fail("Normalize cannot run in place (backward needs the bottom)", bottom=bottom,
                      error=ConfigError)
        self.view = (b.shape[0], b.shape[1], b.count_axes(2))
        top[0].reshape(b.shape)
        norm_shape = (b.shape[0], 1, 1) if self.across_spatial else (b.shape[0], 1, self.view[2])
        if getattr(self, "norm", None) is None or self.norm.shape != norm_shape:
            self.norm = self.xp.empty(norm_shape, dtype=self.dtype)

    def _scale(self):
        s = self.blobs[0].data
        return s.reshape(()) if self.channel_shared else s.reshape(1, -1, 1)

    def forward(self, bottom, top):
        xp = bottom[0].xp
        x = bottom[0].data.reshape(self.view)
        y = top[0].data.reshape(self.view)
        norm = self.norm
        eps = self.dtype.type(self.eps)
        if self.across_spatial:
            xp.sum(xp.square(x), axis=(1, 2), keepdims=True, out=norm)
            norm += eps
            xp.sqrt(norm, out=norm)
            inv = (1.0 / norm.astype("float64")).astype(self.dtype)
            xp.multiply(x, inv, out=y)
        else:
            xp.sum(xp.square(x), axis=1, keepdims=True, out=norm)
            norm += eps
            xp.sqrt(norm, out=norm)
            xp.divide(x, norm, out=y)
        y *= self._scale()

    def jvp(self, bottom, top, tangents, param_tangents):
        """dy = s (dx - x sum(x dx) / n^2) / n + ds x / n, n = sqrt(sum x^2 + eps) over the norm's group."""
        xp = self.xp
        x, dx = bottom[0].data.reshape(self.view), tangents[0].reshape(self.view)
        axes = (1, 2) if self.across_spatial else (1,)
        n = xp.sqrt((x * x).sum(axis=axes, keepdims=True) + self.dtype.type(self.eps))
        out = self._scale() * (dx - x * (x * dx).sum(axis=axes, keepdims=True) / (n * n)) / n
        if param_tangents and param_tangents[0] is not None:
            ds = param_tangents[0]
            out = out + (ds.reshape(()) if self.channel_shared else ds.reshape(1, -1, 1)) * x / n
        return [out.reshape(bottom[0].shape).astype(self.dtype, copy=False)]

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, t):
        """Second-order rule.  With n = sqrt(sum x^2 + eps) over the norm's
        group, s the scale, g = s dy, dot = sum(x g): the backward
        dx = g / n - x dot / n^3 and dscale = sum(dy x / n).  Along the
        tangents u (bottom) and v (scale), dn = sum(x u) / n, g' = v dy,
        dot' = sum(u g + x g'):
        d(dx) = g' / n - g dn / n^2 - (u dot + x dot') / n^3 + 3 x dot dn / n^4,
        d(dscale) = sum(dy (u - x dn / n) / n) (over everything, or per channel)."""
        u = t.bottom[0]
        v = t.params[0] if t.params else None
        want_p = bool(self.param_propagate_down[0])
        out_b, out_p = [None], [None]
        if u is None and (v is None or not propagate_down[0]):
            return out_b, out_p
        x = bottom[0].data.reshape(self.view)
        dy = top_diffs[0].reshape(self.view)
        axes = (1, 2) if self.across_spatial else (1,)
        n = self.norm
        f = self.dtype.type
        if u is not None:
            u = u.reshape(self.view)
            dn = (x * u).sum(axis=axes, keepdims=True) / n
        if propagate_down[0]:
            g = dy * self._scale()
            dot = (x * g).sum(axis=axes, keepdims=True)
            n3 = n * n * n
            out = 0
            if v is not None:
                g1 = dy * (v.reshape(()) if self.channel_shared else v.reshape(1, -1, 1))
                out = g1 / n - x * (x * g1).sum(axis=axes, keepdims=True) / n3
            if u is not None:
                out = out - g * dn / (n * n) - (u * dot + x * (u * g).sum(axis=axes, keepdims=True)) / n3 \
                    + f(3) * x * dot * dn / (n3 * n)
            out_b = [out.reshape(bottom[0].shape).astype(self.dtype, copy=False)]
        if want_p and u is not None:
            dxhat = dy * (u - x * dn / n) / n
            ds = dxhat.sum() if self.channel_shared else dxhat.sum(axis=(0, 2))
            out_p = [ds.reshape(self.blobs[0].shape).astype(self.dtype, copy=False)]
        return out_b, out_p

    def backward(self, top, propagate_down, bottom):
        xp = top[0].xp
        x = bottom[0].data.reshape(self.view)
        dy = top[0].diff.reshape(self.view)
        norm = self.norm
        axes = (1, 2) if self.across_spatial else 1
        if self.param_propagate_down[0]:
            xhat_dy = x / norm * dy
            sd = self.blobs[0].diff
            if self.channel_shared:
                sd[...] += xhat_dy.sum()
            else:
                sd[...] += xhat_dy.sum(axis=(0, 2))
        if propagate_down[0]:
            g = dy * self._scale()
            dot = xp.sum(x * g, axis=axes, keepdims=True)
            dx = bottom[0].diff.reshape(self.view)
            xp.multiply(x, dot / (norm * norm), out=dx)
            xp.subtract(g, dx, out=dx)
            dx /= norm
