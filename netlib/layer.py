"""Layer base class and the registry of layer types.

The contract is Caffe's.  A layer implements four hooks, the same names a
pycaffe Python layer uses:

* ``setup(bottom, top)``: once; read parameters, create ``self.blobs``.
* ``reshape(bottom, top)``: before every forward; shape the tops.
* ``forward(bottom, top)``: compute ``top[i].data`` from ``bottom[j].data``.
* ``backward(top, propagate_down, bottom)``: fill ``bottom[j].diff`` for every
  ``propagate_down[j]`` and accumulate parameter gradients into
  ``self.blobs[k].diff`` (the net zeroes those before each pass).

The framework drives them through ``SetUp``, ``Forward`` and ``Backward``
(Caffe's names), which add the bottom/top count checks, loss weights (stored
in the top's diff, as Caffe does) and the loss sum.

Two netlib departures from Caffe's driver, neither changing a number:

* ``Forward`` skips ``reshape`` when nothing it reads changed since the last
  call (the bottoms' shapes and data buffers, the tops' shapes) for layers
  whose reshape depends on nothing else (``static_reshape``; see there):
  Caffe reshapes before every forward, which costs more than the math for a
  small layer at batch 1.
* The loss weight of a loss top is written into its diff lazily (the first
  time the diff is used, see ``Blob.diff``), so a forward-only net allocates
  no diff; the loss is still ``dot(top.data, weights)``, Caffe's caffe_cpu_dot.

Layers register under their Caffe type string::

    @register_layer("Convolution")
    class ConvolutionLayer(Layer): ...

A user's layer registers the same way from their own module.
"""
import difflib

import numpy

from . import backend
from .blob import Blob
from .errors import LayerError, UnknownLayerTypeError

_REGISTRY = {}

#: Built-in types whose reshape reads more than shapes (Filter: the
#: selector's values decide the top's batch), so Forward always reshapes them.
DYNAMIC_RESHAPE_TYPES = frozenset(("Filter",))

# V1LayerParameter.LayerType enum names -> type strings (Caffe's upgrader).
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax",
    "BNLL": "BNLL", "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution", "DATA": "Data", "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split",
    "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
_V1_ALIASES = {v1: name for v1, name in V1_TYPE_NAMES.items() if name}


def register_layer(type_name, *aliases):
    """Class decorator: make ``type_name`` (and aliases) create this class."""

    def decorate(cls):
        for name in (type_name,) + aliases:
            _REGISTRY[name] = cls
        if not getattr(cls, "type", None) or cls.type == Layer.type:
            cls.type = type_name
        return cls

    return decorate


def layer_type_list():
    """The registered type strings and ``"Python"``, sorted (pycaffe's
    ``caffe.layer_type_list``, of a Caffe built with Python layers)."""
    _load_builtin_layers()
    return sorted(set(_REGISTRY) | {"Python"})


# Types of well-known forks that netlib knows and does not run, with why.
UNSUPPORTED_TYPES = dict.fromkeys(
    ("AnnotatedData", "MultiBoxLoss", "DetectionEvaluate"),
    "not supported: SSD training (the SSD fork's AnnotatedData, MultiBoxLoss and DetectionEvaluate layers); "
    "netlib runs SSD deploy nets: Permute, PriorBox, Normalize and DetectionOutput are supported")


def layer_class(type_name):
    """The class registered for ``type_name`` (a V1 enum name also works)."""
    _load_builtin_layers()
    cls = _REGISTRY.get(type_name)
    if cls is None and type_name in _V1_ALIASES:
        cls = _REGISTRY.get(_V1_ALIASES[type_name])
    if cls is None and type_name in UNSUPPORTED_TYPES:
        raise UnknownLayerTypeError("layer type %r: %s" % (type_name, UNSUPPORTED_TYPES[type_name]))
    if cls is None:
        close = difflib.get_close_matches(type_name, list(_REGISTRY), n=3, cutoff=0.5)
        if not close:
            close = [n for n in _REGISTRY if n.lower() == str(type_name).lower()]
        hint = (" Did you mean %s?" % " or ".join(repr(c) for c in close)) if close else ""
        raise UnknownLayerTypeError("unknown layer type %r.%s (%d types are registered; "
                                    "netlib.layer_type_list() lists them)" % (type_name, hint, len(_REGISTRY)))
    return cls


def create_layer(layer_param, phase=None, dtype=numpy.float32, xp=None, allow_python_layers=None):
    """Instantiate the registered class for ``layer_param.type``; a
    ``Python`` layer is the user's class (see :mod:`netlib.python_layer`)."""
    if layer_param.type == "Python":
        from .python_layer import create_python_layer
        return create_python_layer(layer_param, phase=phase, dtype=dtype, xp=xp, allowed=allow_python_layers)
    return layer_class(layer_param.type)(layer_param, phase=phase, dtype=dtype, xp=xp)


_loaded = [False]


def _load_builtin_layers():
    if not _loaded[0]:
        _loaded[0] = True
        from . import builtin  # noqa: F401  (registers the built-in families)


class BlobVec(list):
    """A layer's parameter blobs; ``add_blob(*shape)`` as in pycaffe."""

    def __init__(self, owner=None, items=()):
        super().__init__(items)
        self._owner = owner

    def add_blob(self, *shape):
        owner = self._owner
        blob = Blob(shape, dtype=owner.dtype if owner else numpy.float32, xp=owner.xp if owner else None)
        self.append(blob)
        return blob


class Layer:
    """Base class of every layer.

    Attributes set for subclasses: ``layer_param`` (the LayerParameter, with
    its ``*_param`` defaults), ``phase`` (0 TRAIN, 1 TEST), ``dtype``, ``xp``
    (the array module), ``blobs`` (learnable/state parameter blobs) and
    ``param_propagate_down`` (per blob: compute its gradient or not).

    Blob-count contract, checked by ``SetUp``: set any of the class attributes
    ``exact_num_bottom_blobs``, ``min_bottom_blobs``, ``max_bottom_blobs`` and
    the same for tops (``None`` means unchecked).
    """

    type = "Layer"
    exact_num_bottom_blobs = None
    min_bottom_blobs = None
    max_bottom_blobs = None
    exact_num_top_blobs = None
    min_top_blobs = None
    max_top_blobs = None
    equal_num_bottom_top_blobs = False
    auto_top_blobs = False
    #: Set by the Net: False when backward never runs for this layer.
    need_backward = True
    #: True: ``reshape`` depends only on the bottoms' shapes and data buffers
    #: and the tops' shapes (and on fixed parameters), so ``Forward`` may skip
    #: it when those did not change.  None (the default): True for netlib's
    #: own layers in :mod:`netlib.builtin` except those in
    #: ``DYNAMIC_RESHAPE_TYPES``, False for any other class (Python layers,
    #: users' layers) and for layers without bottoms (data layers).
    static_reshape = None

    def __init__(self, layer_param=None, phase=None, dtype=numpy.float32, xp=None):
        from .proto import caffe_pb2
        if layer_param is None:
            layer_param = caffe_pb2.LayerParameter(type=self.type)
        self.layer_param = layer_param
        self.name = layer_param.name
        if phase is None:
            phase = layer_param.phase if layer_param.HasField("phase") else caffe_pb2.TEST
        self.phase = int(phase)
        self.dtype = numpy.dtype(dtype)
        self.xp = xp if xp is not None else backend.default_xp()
        self.blobs = BlobVec(self)
        self.param_propagate_down = []
        self._loss_weights = []
        self._loss_tops = ()      # (top index, weight) of each weighted top
        self._loss_vecs = {}
        self._static = False
        self._key_shapes = None   # what reshape last saw (see Forward)
        self._key_bufs = ()
        # Python layers read these (pycaffe sets them before setup).
        self.param_str = layer_param.python_param.param_str if layer_param.HasField("python_param") else ""

    # -- hooks a layer implements --------------------------------------------
    def setup(self, bottom, top):
        """Read parameters and create parameter blobs (Caffe's LayerSetUp)."""

    def reshape(self, bottom, top):
        """Shape the tops from the bottoms. Called before every forward."""
        self.fail("class %s does not define reshape(bottom, top)" % type(self).__name__, bottom=bottom)

    def forward(self, bottom, top):
        """Compute the tops' data from the bottoms' data."""
        self.fail("class %s does not define forward(bottom, top)" % type(self).__name__, bottom=bottom)

    def backward(self, top, propagate_down, bottom):
        """Default: a layer with nothing to propagate (data layers, Silence...)."""

    def jvp(self, bottom, top, tangents, param_tangents):
        """Forward-mode rule: the tops' tangents (arrays) from the bottoms'
        ``tangents`` (one array per bottom) and ``param_tangents`` (None, or
        one array or None per ``self.blobs``), called after ``forward`` on the
        same blobs; never writes the blobs.  Built-in rules use the helpers
        of :mod:`netlib.forward_mode`; check a new one with
        :func:`netlib.testing.check_jvp`.  Default: no rule (JVPError)."""
        from .forward_mode import JVPError
        self.fail("has no forward-mode (jvp) rule", error=JVPError)

    def backward_jvp(self, top, propagate_down, bottom, top_diffs, tangents):
        """Second-order rule (for ``Net.hvp``): the directional derivative of
        this layer's backward along the inputs' tangents, the top diffs held
        at ``top_diffs``.  ``tangents`` is a
        :class:`netlib.second_order.Tangents` (bottom, top and parameter
        tangents, None for zero); called after ``forward`` and ``backward``
        on the same blobs.  Returns (per bottom, per parameter blob) lists of
        arrays or None (zero).  Built-in rules use the helpers of
        :mod:`netlib.second_order`; check one with
        :func:`netlib.testing.check_hvp`.  Default: no rule (HVPError)."""
        from .second_order import HVPError
        self.fail("has no second-order (hvp) rule", error=HVPError)

    def allow_force_backward(self, bottom_index):
        """Whether force_backward may turn on backward to this bottom."""
        return True

    # -- framework drivers (Caffe's SetUp / Forward / Backward) ---------------
    def SetUp(self, bottom, top):
        self.check_blob_counts(bottom, top)
        self.setup(bottom, top)
        self.reshape(bottom, top)
        self.set_loss_weights(top)
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)
        static = self.static_reshape
        if static is None:
            static = (type(self).__module__.startswith("netlib.builtin.")
                      and self.type not in DYNAMIC_RESHAPE_TYPES)
        self._static = bool(static) and len(bottom) > 0
        self._key_shapes = None

    def invalidate_reshape(self):
        """Make the next ``Forward`` call ``reshape`` (the Net calls this
        after it changes blobs behind the layer's back)."""
        self._key_shapes = None
        self._key_bufs = ()

    def Forward(self, bottom, top):
        """Reshape (when needed), forward, and return the weighted loss of this layer."""
        if self._static:
            shapes = [b._shape for b in bottom]
            shapes += [t._shape for t in top]
            bufs = self._key_bufs
            if shapes != self._key_shapes or any(b._data_buf is not k for b, k in zip(bottom, bufs)):
                self.reshape(bottom, top)
                shapes = [b._shape for b in bottom]
                shapes += [t._shape for t in top]
                self._key_shapes = shapes
                self._key_bufs = [b._data_buf for b in bottom]
        else:
            self.reshape(bottom, top)
        self.forward(bottom, top)
        if not self._loss_tops:
            return 0.0
        loss = 0.0
        for i, _ in self._loss_tops:
            t = top[i]
            if t.has_diff:
                loss += float(self.xp.dot(t.data.ravel(), t.diff.ravel()))  # caffe_cpu_dot
            else:
                loss += float(self.xp.dot(t.data.ravel(), self._loss_vector(i, t)))
        return loss

    def _loss_vector(self, i, t):
        """The loss weight broadcast to top ``i``'s count: what its diff would
        hold (kept by the layer, not the blob, so no diff is allocated)."""
        vec = self._loss_vecs.get(i)
        if vec is None or vec.size != t.count or vec.dtype != t.dtype:
            vec = self._loss_vecs[i] = self.xp.full(t.count, self._loss_weights[i], dtype=t.dtype)
        return vec

    def Backward(self, top, propagate_down, bottom):
        self.backward(top, propagate_down, bottom)

    # -- helpers ------------------------------------------------------------
    def default_loss_weight(self, top_index):
        """Loss weight of a top when the prototxt gives none (loss layers: 1 on top 0)."""
        return 0.0

    def loss(self, top_index):
        return self._loss_weights[top_index] if top_index < len(self._loss_weights) else 0.0

    def set_loss_weights(self, top):
        weights = list(self.layer_param.loss_weight)
        if weights and len(weights) != len(top):
            self.fail("loss_weight must be unspecified or specified once per top blob "
                      "(%d given for %d tops)" % (len(weights), len(top)), top=top)
        if not weights:
            weights = [self.default_loss_weight(i) for i in range(len(top))]
        self._loss_weights = [float(w) for w in weights]
        self._loss_tops = [(i, w) for i, w in enumerate(self._loss_weights) if w != 0]
        self._loss_vecs = {}
        for t, w in zip(top, self._loss_weights):
            if w != 0:
                if t.has_diff or t._diff_src is not None:
                    t.diff[...] = w
                else:
                    t._diff_fill = w  # written when the diff is first used

    def check_blob_counts(self, bottom, top):
        nb, nt = len(bottom), len(top)

        def bad(what, n, rule):
            self.fail("takes %s %s blob(s), got %d" % (rule, what, n), bottom=bottom)

        if self.exact_num_bottom_blobs is not None and nb != self.exact_num_bottom_blobs:
            bad("bottom", nb, "exactly %d" % self.exact_num_bottom_blobs)
        if self.min_bottom_blobs is not None and nb < self.min_bottom_blobs:
            bad("bottom", nb, "at least %d" % self.min_bottom_blobs)
        if self.max_bottom_blobs is not None and nb > self.max_bottom_blobs:
            bad("bottom", nb, "at most %d" % self.max_bottom_blobs)
        if self.exact_num_top_blobs is not None and nt != self.exact_num_top_blobs:
            bad("top", nt, "exactly %d" % self.exact_num_top_blobs)
        if self.min_top_blobs is not None and nt < self.min_top_blobs:
            bad("top", nt, "at least %d" % self.min_top_blobs)
        if self.max_top_blobs is not None and nt > self.max_top_blobs:
            bad("top", nt, "at most %d" % self.max_top_blobs)
        if self.equal_num_bottom_top_blobs and nb != nt:
            self.fail("needs as many tops as bottoms (%d bottoms, %d tops)" % (nb, nt), bottom=bottom)

    def describe(self):
        origin = getattr(self, "python_origin", None)
        if origin:
            return "layer %r (type %s, class %s)" % (self.name, self.type, origin)
        return "layer %r (type %s)" % (self.name, self.type)

    def fail(self, message, bottom=None, top=None, error=LayerError):
        """Raise ``error`` with the layer's name, type and blob shapes."""
        parts = [self.describe() + ": " + message]
        if bottom is not None:
            parts.append("bottom shapes %s" % [tuple(b.shape) for b in bottom])
        if top is not None:
            parts.append("top shapes %s" % [tuple(t.shape) for t in top])
        raise error("; ".join(parts))

    def new_blob(self, shape=()):
        """A blob with this layer's dtype and array module."""
        return Blob(shape, dtype=self.dtype, xp=self.xp)

    def __repr__(self):
        return "<%s %r>" % (type(self).__name__, self.name)
