"""pycaffe's ``caffe.draw``: draw a NetParameter as a Graphviz graph through pydot.

Usage (as in pycaffe)::

    import netlib as caffe
    import netlib.draw
    from netlib.proto import caffe_pb2
    from google.protobuf import text_format

    net = text_format.Merge(open("lenet_train_test.prototxt").read(), caffe_pb2.NetParameter())
    caffe.draw.draw_net_to_file(net, "lenet.png", "LR", phase=caffe.TRAIN)
    graph = caffe.draw.get_pydot_graph(net, "TB", display_lrm=True)   # a pydot.Dot
    png = caffe.draw.draw_net(net, "LR", ext="png")                    # bytes

The graph is the one real pycaffe builds, node for node and edge for edge
(tests/test_draw.py compares it with real pycaffe's for every reference net):

* one ``record`` node per layer, named by its label ``"NAME\\n(TYPE)"``
  (``"(Pooling MAX)"`` for pooling; ``kernel size``/``stride``/``pad`` lines
  for Convolution, Deconvolution and Pooling; ``lr mult: W, B`` with
  ``display_lrm`` for Convolution, Deconvolution and InnerProduct unless both
  are 0).  Words are separated by ``\\n``, or by spaces for rankdir TB/BT.
  Colours: Convolution/Deconvolution #FF5050, Pooling #FF9900, InnerProduct
  #CC33FF, other layers #6495ED, in-place layers (one bottom, the same top)
  #90EE90;
* one node per blob, named by the blob; a blob keeps the style of the last
  mention: grey octagon when last used as a bottom, Graphviz's default
  ellipse when last produced as a top;
* edges bottom blob -> layer (label ``""``) and layer -> top blob, labelled
  ``Batch N`` for Data layers and the ``num_output`` of
  Convolution/Deconvolution/InnerProduct (``label_edges=True``);
* layers share a node when they share ``NAME_TYPE``: the last one's label
  wins and every edge goes to it.

Quirks kept on purpose, as pycaffe has them:

* phase filtering reads only the ``phase`` field of include/exclude rules
  (stage and level are ignored, and a rule without a phase reads as TRAIN);
  a layer with both include and exclude raises ValueError, but only when a
  phase is given;
* the kernel/stride/pad line uses only ``kernel_size``/``stride``/``pad``
  (first value; ``kernel_h``/``kernel_w`` and global pooling are not looked
  at: a global pooling layer shows ``kernel size: 0``);
* ``get_layer_lr_mult`` raises ValueError for more than two ``param`` specs.

What differs from pycaffe:

* V0/V1 nets (``layers`` fields), which pycaffe draws as an empty graph, are
  upgraded first (as Caffe's ``upgrade_net_proto_text`` does), so every net
  draws; the message passed in is not changed.  V2 nets are drawn as given
  (``input`` fields are not turned into an Input layer, as in pycaffe).
* ``draw_net(..., ext='raw')`` and ``ext='dot'`` return the DOT text itself
  (``graph.to_string()``, UTF-8), with no Graphviz needed; pycaffe hands both
  to Graphviz (``dot -Traw`` fails; ``dot -Tdot`` adds layout attributes).
  Other formats (png, svg, pdf, ...) run Graphviz's ``dot`` as pycaffe does.
* ``LAYER_STYLE_DEFAULT`` is not modified while drawing (pycaffe writes each
  layer's colour into it).
* ``phase`` may also be given as the string ``'TRAIN'`` or ``'TEST'``.
* pydot is imported when first needed (``pip install pydot``); pydotplus is
  used when pydot is absent.  Without either, and without Graphviz for image
  formats, :class:`netlib.errors.ConfigError` says what to install.
"""
import os
import shutil
import subprocess

from .errors import ConfigError
from .proto import caffe_pb2

__all__ = ["LAYER_STYLE_DEFAULT", "NEURON_LAYER_STYLE", "BLOB_STYLE", "get_pooling_types_dict",
           "get_edge_label", "get_layer_lr_mult", "get_layer_label", "choose_color_by_layertype",
           "get_pydot_graph", "draw_net", "draw_net_to_file", "read_net_for_drawing"]

# Node styles (pycaffe's values).
LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

_LEARNING_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
_SPATIAL_TYPES = ("Convolution", "Deconvolution", "Pooling")
_LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                 "InnerProduct": "#CC33FF"}
# Formats written as DOT text without Graphviz.
_TEXT_FORMATS = ("raw", "dot")

_pydot = None


def _import_pydot():
    """The pydot module (pydotplus as a fallback); ConfigError when neither is installed."""
    global _pydot
    if _pydot is None:
        try:
            import pydot as module
        except ImportError:
            try:
                import pydotplus as module
            except ImportError:
                raise ConfigError("drawing nets needs pydot: pip install pydot "
                                  "(or pip install 'netlib[draw]'); PNG/SVG/PDF output also needs "
                                  "Graphviz's dot program") from None
        _pydot = module
    return _pydot


def get_pooling_types_dict():
    """{number: name} of PoolingParameter.PoolMethod (``{0: 'MAX', 1: 'AVE', 2: 'STOCHASTIC'}``)."""
    enum = caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR
    return {value.number: name for name, value in enum.values_by_name.items()}


def get_edge_label(layer):
    """The label of the edges from ``layer`` to its tops: ``'Batch N'`` for a Data layer, the
    ``num_output`` (as a string) of a Convolution, Deconvolution or InnerProduct layer, and
    ``'""'`` (an empty DOT label) for any other layer."""
    kind = layer.type
    if kind == "Data":
        return "Batch %s" % layer.data_param.batch_size
    if kind in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if kind == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer):
    """The (weights, bias) learning-rate multipliers of a Convolution, Deconvolution or
    InnerProduct layer, as floats: 1.0 for a missing ``param`` spec.  Raises ValueError for any
    other layer type and for a layer with more than two ``param`` specs."""
    if layer.type not in _LEARNING_TYPES:
        raise ValueError("%s layers do not have a learning rate multiplier" % layer.type)
    specs = list(getattr(layer, "param", ()))
    if len(specs) > 2:
        raise ValueError("Could not parse the learning rate multiplier")
    mults = [getattr(spec, "lr_mult", 1.0) for spec in specs]
    mults += [1.0] * (2 - len(mults))
    return tuple(mults)


def get_layer_label(layer, rankdir, display_lrm=False):
    """The node label of ``layer``, in double quotes: name, ``(type)``, the kernel/stride/pad of
    spatial layers and, with ``display_lrm``, the learning-rate multipliers of learning layers
    (left out when both are 0).  Parts are joined with spaces for rankdir ``'TB'``/``'BT'`` and
    with a DOT line break (backslash-n) otherwise."""
    sep = " " if rankdir in ("TB", "BT") else "\\n"
    if layer.type == "Pooling":
        kind = "(Pooling %s)" % get_pooling_types_dict()[layer.pooling_param.pool]
    else:
        kind = "(%s)" % layer.type
    parts = [layer.name, kind]
    if layer.type in _SPATIAL_TYPES:
        if layer.type == "Pooling":
            p = layer.pooling_param
            kernel, stride, pad = p.kernel_size, p.stride, p.pad
        else:
            c = layer.convolution_param
            kernel = c.kernel_size[0] if len(c.kernel_size) else 1
            stride = c.stride[0] if len(c.stride) else 1
            pad = c.pad[0] if len(c.pad) else 0
        parts.append(sep.join(["kernel size: %d" % kernel, "stride: %d" % stride, "pad: %d" % pad]))
    if display_lrm and layer.type in _LEARNING_TYPES:
        weights, bias = get_layer_lr_mult(layer)
        if weights or bias:
            parts.append("lr mult: %.1f, %.1f" % (weights, bias))
    # The quotes keep the colons from being read as DOT ports.
    return '"%s"' % sep.join(parts)


def choose_color_by_layertype(layertype):
    """The fill colour of a layer node of type ``layertype`` (see the module docstring)."""
    return _LAYER_COLORS.get(layertype, "#6495ED")


def _phase_number(phase):
    if phase is None or isinstance(phase, int):
        return phase
    if isinstance(phase, str) and phase.upper() in ("TRAIN", "TEST"):
        return caffe_pb2.Phase.Value(phase.upper())
    raise ValueError("phase must be caffe.TRAIN, caffe.TEST or None, got %r" % (phase,))


def _included(layer, phase):
    """pycaffe's phase filter (only the rules' ``phase`` fields count)."""
    if len(layer.include) and len(layer.exclude):
        raise ValueError("layer " + layer.name + " has both include and exclude specified.")
    keep = len(layer.include) == 0
    for rule in layer.include:
        keep = keep or rule.phase == phase
    for rule in layer.exclude:
        keep = keep and rule.phase != phase
    return keep


def _drawable(caffe_net):
    """``caffe_net`` as a NetParameter with ``layer`` fields: paths and text are read, and
    legacy V0/V1 nets are upgraded (on a copy)."""
    if isinstance(caffe_net, (str, bytes, os.PathLike)):
        return read_net_for_drawing(caffe_net)
    if not (hasattr(caffe_net, "layer") and hasattr(caffe_net, "layers")):
        raise TypeError("caffe_net must be a caffe_pb2.NetParameter, got %s" % type(caffe_net).__name__)
    if len(caffe_net.layers) == 0:
        return caffe_net  # any NetParameter class (another caffe_pb2 module too)
    from .upgrade import upgrade_net
    net = caffe_pb2.NetParameter()
    net.ParseFromString(caffe_net.SerializeToString())
    upgrade_net(net)
    return net


def read_net_for_drawing(path):
    """Read a net prototxt (a path, or prototxt text) as python/draw_net.py does, without
    netlib's upgrades, then upgrade it only when it is a legacy V0/V1 net."""
    from .errors import NetlibFileNotFoundError
    from .files import parse_text_proto, read_text_proto
    source = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    net = caffe_pb2.NetParameter()
    if os.path.isfile(source):
        read_text_proto(source, net)
    elif "{" in source or "\n" in source or ":" in source:
        parse_text_proto(source, net)
    else:
        raise NetlibFileNotFoundError("%s: no such net prototxt file" % source)
    return _drawable(net)


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The ``pydot.Dot`` digraph of ``caffe_net``: a caffe_pb2.NetParameter as in pycaffe (a
    prototxt path or text is also accepted and read as :func:`read_net_for_drawing` does).

    ``rankdir``: Graphviz layout direction (``'LR'``, ``'TB'``, ``'BT'``, ``'RL'``); it is the
    graph's ``rankdir`` attribute.  ``label_edges``: label the layer -> top edges (see
    :func:`get_edge_label`).  ``phase``: ``caffe.TRAIN``/``caffe.TEST`` to draw only that
    phase's layers, None for all.  ``display_lrm``: add learning-rate multipliers to labels.
    The graph is named after the net (``'Net'`` when it has no name).
    """
    pydot = _import_pydot()
    net = _drawable(caffe_net)
    phase = _phase_number(phase)
    graph = pydot.Dot(net.name or "Net", graph_type="digraph", rankdir=rankdir)
    # Keyed so that a later mention replaces a node's style but keeps its place.
    nodes = {}
    edges = []
    for layer in net.layer:
        if phase is not None and not _included(layer, phase):
            continue
        label = get_layer_label(layer, rankdir, display_lrm=display_lrm)
        key = "%s_%s" % (layer.name, layer.type)
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        if in_place:
            style = dict(NEURON_LAYER_STYLE)
        else:
            style = dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        nodes[key] = pydot.Node(label, **style)
        for blob in layer.bottom:
            nodes[blob + "_blob"] = pydot.Node(blob, **BLOB_STYLE)
            edges.append((blob + "_blob", key, '""'))
        top_label = get_edge_label(layer) if label_edges else '""'
        for blob in layer.top:
            nodes[blob + "_blob"] = pydot.Node(blob)
            edges.append((key, blob + "_blob", top_label))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label))
    return graph


def _graphviz(dot_text, ext, prog="dot"):
    """Run Graphviz ``prog -T<ext>`` on ``dot_text``; its output as bytes."""
    exe = shutil.which(prog)
    if exe is None:
        raise ConfigError("drawing to .%s needs Graphviz's %r program, which is not on PATH: install "
                          "Graphviz (apt-get install graphviz, brew install graphviz or conda install "
                          "graphviz), or draw to .dot/.raw text" % (ext, prog))
    result = subprocess.run([exe, "-T" + ext], input=dot_text.encode("utf-8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        message = " ".join(result.stderr.decode("utf-8", "replace").split())
        raise ConfigError("Graphviz %s -T%s failed: %s" % (prog, ext, message or "exit status %d"
                                                              % result.returncode))
    return result.stdout


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The drawing of ``caffe_net`` in format ``ext``, as bytes.

    ``'raw'`` and ``'dot'`` give the DOT text (UTF-8) with no Graphviz needed; any other
    format is Graphviz's ``dot -T<ext>`` output (``png``, ``svg``, ``pdf``, ``ps``...).
    ``rankdir``, ``phase`` and ``display_lrm`` as in :func:`get_pydot_graph` (edges labelled).
    Raises ConfigError without pydot, without Graphviz or for a format Graphviz refuses.
    """
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    text = graph.to_string()
    if ext.lower() in _TEXT_FORMATS:
        return text.encode("utf-8")
    return _graphviz(text, ext)


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Draw ``caffe_net`` into ``filename``, in the format its extension names (the text after
    the last dot: ``.png``, ``.svg``, ``.pdf``...; ``.raw``/``.dot`` write DOT text that Graphviz
    can lay out later).  Arguments as in :func:`draw_net`.  The file is written only once the
    drawing succeeded (through :func:`netlib.files.atomic_write`)."""
    from .files import atomic_write
    filename = os.fspath(filename)
    ext = filename[filename.rfind(".") + 1:]
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with atomic_write(filename, "wb") as handle:
        handle.write(data)
