"""Permute (SSD fork): transpose a blob's axes."""
from ..errors import ConfigError
from .. import forward_mode
from .. import second_order
from ..layer import Layer, register_layer


def full_order(order, num_axes):
    """``order`` completed with the missing axes in their own order.

    Raises ValueError for an axis ``>= num_axes`` or a repeated one.
    """
    out = []
    for a in order:
        a = int(a)
        if a >= num_axes:
            raise ValueError("order value %d is not an axis of a %d-D bottom (valid: 0..%d)"
                             % (a, num_axes, num_axes - 1))
        if a in out:
            raise ValueError("order repeats axis %d (%s)" % (a, list(order)))
        out.append(a)
    out += [a for a in range(num_axes) if a not in out]
    return tuple(out)


@register_layer("Permute")
class PermuteLayer(Layer):
    """``top = bottom.transpose(order)``.

    ``permute_param.order``: the bottom axis for each top axis; the axes not
    named follow in their original order (``order: 0 order: 2 order: 3
    order: 1`` turns N x C x H x W into N x H x W x C, the SSD heads' use).
    Top shape: ``[bottom.shape[order[i]] for i]``.  Backward: the diff is
    transposed back with the inverse order.  When the order is the identity
    the top shares the bottom's data and diff, as the fork does.
    Errors (ConfigError naming the layer): an axis out of range, a repeated
    axis.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def _order(self, bottom):
        try:
            return full_order(self.layer_param.permute_param.order, bottom[0].ndim)
        except ValueError as exc:
            self.fail("permute_param: %s" % exc, bottom=bottom, error=ConfigError)

    def setup(self, bottom, top):
        self._order(bottom)

    def reshape(self, bottom, top):
        order = self._order(bottom)
        self.order = order
        self.inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
        self.identity = order == tuple(range(len(order)))
        if self.identity:
            if top[0] is not bottom[0]:
                top[0].reshape(bottom[0].shape)
                top[0].share_data(bottom[0])
                top[0].share_diff(bottom[0])
            return
        if top[0] is bottom[0]:
            self.fail("Permute cannot run in place (top is the bottom)", bottom=bottom,
                      error=ConfigError)
        shape = bottom[0].shape
        top[0].reshape(tuple(shape[a] for a in order))

    def forward(self, bottom, top):
        if not self.identity:
            top[0].data[...] = bottom[0].data.transpose(self.order)

    jvp = forward_mode.linear_jvp  # d top = permute(d bottom).
    backward_jvp = second_order.zero_rop  # the backward does not depend on the inputs' values: no second-order term.

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0] and not self.identity:
            bottom[0].diff[...] = top[0].diff.transpose(self.inverse)
