"""Nets written as Python code: pycaffe's ``caffe.net_spec`` for netlib.

A net is described functionally: ``L.<Type>(*bottoms, **kwargs)`` makes a
layer *Function* and hands back its output *Top* (or a tuple of them), and
``to_proto`` / ``NetSpec.to_proto`` turn the graph of tops into a
``caffe_pb2.NetParameter``.  ``str()`` of that message is the prototxt text.
For the same script it is the same message real pycaffe builds, and the same
text line for line; only the order of the fields inside a message can differ,
and only because of the protobuf release: protobuf 4.21's upb printer (the
one under pycaffe) lists fields in .proto declaration order, the newer
protobuf netlib needs lists them by field number, as C++ Caffe does::

    import netlib as caffe
    from netlib import layers as L, params as P

    n = caffe.NetSpec()
    n.data, n.label = L.Data(source='train_lmdb', backend=P.Data.LMDB,
                             batch_size=64, ntop=2,
                             transform_param=dict(scale=1. / 255))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    text = str(n.to_proto())

Rules (the same as pycaffe's, quirks included on purpose):

* ``L.<anything>`` works; the attribute name becomes ``LayerParameter.type``
  unchecked, so a typo only shows up when the net is built.
* ``ntop`` (default 1): 1 returns one ``Top``, >1 a tuple of ``Top``, 0 the
  ``Function`` itself (a layer without tops, e.g. ``Silence``).
* ``in_place=True``: the layer's tops are its bottoms' names.
* A keyword ending in ``param`` (``param``, ``transform_param``,
  ``loss_param``, ...) is set on the LayerParameter.  Any other keyword is
  first tried in ``<type>_param`` (found through :func:`param_name_dict`); if
  the layer type has no such message or the message no such field, it goes on
  the LayerParameter (``name``, ``loss_weight``, ``include``, ``top``...).
* Values: a dict fills a message, a list fills a repeated field (a list of
  dicts adds one message per dict), a scalar given to a repeated field becomes
  a one-item list, anything else is assigned as is (protobuf accepts an enum
  value as its number, e.g. ``P.Pooling.MAX``, or, with its default upb
  backend, as its name, ``'MAX'``).
  As in pycaffe, tuples are *not* lists (``kernel_size=(3, 3)`` is a
  TypeError from protobuf) and an empty list raises IndexError.
* Names: a NetSpec names each assigned top after its attribute; a layer takes
  the name of its first top (an explicit ``name=`` keyword wins).  Everything
  else is auto-named ``<Type><k>`` with one counter per type, counted in the
  order the graph is walked (depth first, bottoms before the layer).  An
  explicit ``top=`` keyword is appended to the generated tops, as in pycaffe.
  A top assigned under two NetSpec names takes the last one.
* ``to_proto(*tops)`` takes Tops only (an ``ntop=0`` Function there raises
  AttributeError, as in pycaffe); a NetSpec takes Functions as well.

Additions to pycaffe: plain keywords of the layer types that share another
type's message reach it (``L.Deconvolution(x, num_output=21, kernel_size=4)``
fills ``convolution_param``, where pycaffe raises AttributeError; also Im2col,
RNN and LSTM); and looking up an unassigned name on a NetSpec raises an
error that is both a ``KeyError`` (what pycaffe raises) and an
``AttributeError``, so ``hasattr``/``getattr(n, x, default)`` and ``copy``
work instead of crashing.
"""
from collections import Counter, OrderedDict

from .proto import caffe_pb2

__all__ = ["param_name_dict", "to_proto", "assign_proto", "Top", "Function", "NetSpec",
           "Layers", "Parameters", "layers", "params"]


def param_name_dict():
    """Map a layer type to the stem of its ``<stem>_param`` field.

    Built from the LayerParameter fields ending in ``_param``: the key is the
    field's message type name without ``Parameter`` (``Convolution``,
    ``InnerProduct``, ``Transformation``, ...), the value the field name
    without ``_param`` (``convolution``, ``inner_product``, ``transform``).
    Not every entry is a layer type (``Transformation``, ``Loss``), and types
    that reuse another layer's message (``Deconvolution``) have no entry, as
    in pycaffe; netlib's keyword routing adds them (``SHARED_PARAM_MESSAGES``).
    """
    mapping = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if not field.name.endswith("_param"):
            continue
        type_name = field.message_type.name
        if type_name.endswith("Parameter"):
            type_name = type_name[:-len("Parameter")]
        mapping[type_name] = field.name[:-len("_param")]
    return mapping


def to_proto(*tops):
    """A NetParameter with every layer needed to compute ``tops``.

    All names are generated (``<Type><k>``); use :class:`NetSpec` to choose
    them.  Layers appear in dependency order, the first top's graph first.
    """
    layer_protos = OrderedDict()
    counters = Counter()
    for top in tops:
        top.fn._to_proto(layer_protos, {}, counters)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layer_protos.values())
    return net


def assign_proto(proto, name, val):
    """Set field ``name`` of message ``proto`` from a Python value.

    dict -> the sub-message's fields (recursively); list -> repeated field
    (a list whose first item is a dict adds one sub-message per item);
    a non-list given to a repeated field is wrapped in a one-item list; any
    other value is assigned directly.  Unknown fields raise AttributeError
    (from protobuf), bad values TypeError/ValueError (from protobuf).
    """
    field = getattr(proto, name)
    if hasattr(field, "extend") and not isinstance(val, list):
        val = [val]
    if isinstance(val, list):
        # pycaffe looks only at the first item to decide (empty -> IndexError)
        if isinstance(val[0], dict):
            for item in val:
                sub = field.add()
                for key, value in item.items():
                    assign_proto(sub, key, value)
        else:
            field.extend(val)
    elif isinstance(val, dict):
        for key, value in val.items():
            assign_proto(field, key, value)
    else:
        setattr(proto, name, val)


class Top(object):
    """One output blob of a layer: output number ``n`` of Function ``fn``."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter with every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function(object):
    """A layer: its type name, its input Tops and its keyword parameters.

    ``params`` keeps the keywords as given (minus ``ntop`` and ``in_place``,
    which become the attributes of those names); coord_map reads them.
    ``tops`` is the tuple of this layer's ``ntop`` output Tops.
    """

    def __init__(self, type_name, inputs, params):
        self.type_name = type_name
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise TypeError("%s input %d is not a Top (type is %s)"
                                % (type_name, index, type(bottom)))
        self.inputs = inputs
        self.params = params
        # taken out so they never reach the LayerParameter
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        self.tops = tuple(Top(self, i) for i in range(self.ntop))

    def _get_name(self, names, autonames):
        """The layer's name: its first top's name, or ``<Type><k>`` without tops."""
        if self not in names:
            if self.ntop > 0:
                names[self] = self._get_top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = "%s%d" % (self.type_name, autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top, names, autonames):
        """A top's name: assigned by a NetSpec, else ``<Type><k>`` of its layer type."""
        if top not in names:
            type_name = top.fn.type_name
            autonames[type_name] += 1
            names[top] = "%s%d" % (type_name, autonames[type_name])
        return names[top]

    def _to_proto(self, layers, names, autonames):
        """Add this layer (after its inputs' layers) to ``layers`` {Function: LayerParameter}."""
        if self in layers:
            return
        bottoms = []
        for bottom in self.inputs:
            bottom._to_proto(layers, names, autonames)
            bottoms.append(layers[bottom.fn].top[bottom.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend([self._get_top_name(t, names, autonames) for t in self.tops])
        layer.name = self._get_name(names, autonames)

        for key, value in self.params.items():
            if key.endswith("param"):
                assign_proto(layer, key, value)
                continue
            try:
                sub = getattr(layer, _param_names[self.type_name] + "_param")
                assign_proto(sub, key, value)
            except (AttributeError, KeyError):
                # no <type>_param for this type, or no such field in it
                assign_proto(layer, key, value)
        layers[self] = layer


class _NoSuchTop(KeyError, AttributeError):
    """Raised for a name never assigned on a NetSpec (a KeyError, as in pycaffe)."""


class NetSpec(object):
    """Named tops: assign ``n.<name> = top`` (or ``n['name'] = top``).

    ``to_proto()`` returns a NetParameter with every layer needed for the
    assigned tops, in assignment order; each assigned top and the layer that
    makes it (when it is the layer's first top) take the attribute's name.
    ``n.tops`` is the OrderedDict {name: Top} of assignments.
    """

    def __init__(self):
        object.__setattr__(self, "tops", OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        if name == "tops":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        try:
            return self.tops[name]
        except KeyError:
            raise _NoSuchTop(name) from None

    def __setitem__(self, key, value):
        self.__setattr__(key, value)

    def __getitem__(self, item):
        return self.__getattr__(item)

    def to_proto(self):
        names = {top: name for name, top in self.tops.items()}
        counters = Counter()
        layer_protos = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layer_protos, names, counters)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layer_protos.values())
        return net


class Layers(object):
    """Pseudo-module ``L``: ``L.<Type>(*bottoms, **kwargs)`` specifies a layer.

    Returns a Top (ntop=1), a tuple of Tops (ntop>1) or the Function (ntop=0).
    """

    def __getattr__(self, name):
        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        layer_fn.__name__ = name
        return layer_fn


class Parameters(object):
    """Pseudo-module ``P``: ``P.<Type>.<NAME>`` is ``caffe_pb2.<Type>Parameter.<NAME>``.

    E.g. ``P.Pooling.MAX`` (0), ``P.Data.LMDB`` (1), ``P.Eltwise.SUM`` (1).
    An unknown type or name raises AttributeError.
    """

    def __getattr__(self, name):
        class Param:
            def __getattr__(self, param_name):
                return getattr(getattr(caffe_pb2, name + "Parameter"), param_name)
        return Param()


# Layer types whose parameters live in another type's message.  pycaffe has no
# entry for them, so there ``L.Deconvolution(x, num_output=...)`` fails and
# only ``convolution_param=dict(...)`` works; netlib routes the plain keywords
# there too (a strict addition: no script that runs under pycaffe changes).
SHARED_PARAM_MESSAGES = {"Deconvolution": "convolution", "Im2col": "convolution",
                         "RNN": "recurrent", "LSTM": "recurrent"}

_param_names = dict(param_name_dict(), **SHARED_PARAM_MESSAGES)
layers = Layers()
params = Parameters()
