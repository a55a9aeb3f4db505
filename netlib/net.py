"""Net: a DAG of layers built from a NetParameter, as Caffe's Net::Init builds it.

Construction, in Caffe's order: read and upgrade the prototxt; filter layers
by the NetState (phase, level, stages) against their include/exclude rules;
insert Split layers for blobs consumed more than once (named
``<blob>_<layer>_<i>_split`` with tops ``..._split_<k>``); create and set up
each layer in file order (a top named like the bottom of the same index is
in place); share parameters by ParamSpec name; work out which layers need
backward (lr_mult, propagate_down, loss contribution, force_backward).

Net outputs are the blobs no layer consumes, **sorted by name** (Caffe keeps
them in a std::set); net inputs are the tops of Input layers.

The Python face is pycaffe's: ``Net(model, phase)``, ``Net(model, weights,
phase)``, ``Net(model, phase, level=0, stages=None, weights=None)``;
``blobs``/``params`` ordered dicts; ``forward(**inputs)`` returning the
outputs; ``backward(**diffs)``; ``copy_from``, ``save``, ``save_hdf5``.
"""
import collections
import logging
import os

import numpy

from . import backend
from .blob import Blob
from .errors import (ConfigError, LayerError, NetlibError, NetlibFileNotFoundError, ShapeError,
                     WeightsError)
from .files import (H5_ERRORS, h5_dataset, is_hdf5, read_net_param, read_weights_param,
                    write_binary_proto)
from .layer import create_layer
from .proto import caffe_pb2

log = logging.getLogger("netlib")


# -- NetState filtering --------------------------------------------------------
def state_meets_rule(state, rule):
    """Caffe's Net::StateMeetsRule: every condition the rule sets must hold."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param):
    """A copy of ``param`` keeping the layers its ``state`` includes."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for layer in param.layer:
        if len(layer.include) and len(layer.exclude):
            raise ConfigError("layer %r (type %s) specifies both include and exclude rules; use one"
                              % (layer.name, layer.type))
        if len(layer.include):
            keep = any(state_meets_rule(param.state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(param.state, r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


# -- Split insertion -------------------------------------------------------------
def split_layer_name(layer_name, blob_name, blob_idx):
    return "%s_%s_%d_split" % (blob_name, layer_name, blob_idx)


def split_blob_name(layer_name, blob_name, blob_idx, split_idx):
    return "%s_%s_%d_split_%d" % (blob_name, layer_name, blob_idx, split_idx)


def insert_splits(param):
    """Caffe's InsertSplits: a Split layer after every top consumed twice or more
    (a top with a non-zero loss_weight counts as one consumer)."""
    last_top = {}
    source_of_bottom = {}
    consumers = collections.Counter()
    loss_weight_of = {}
    for i, layer in enumerate(param.layer):
        for j, blob in enumerate(layer.bottom):
            if blob not in last_top:
                raise ConfigError("layer %r (type %s): unknown bottom blob %r (bottom %d); no earlier "
                                  "layer produces it" % (layer.name, layer.type, blob, j))
            source_of_bottom[(i, j)] = last_top[blob]
            consumers[last_top[blob]] += 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            idx = last_top[layer.top[j]]
            loss_weight_of[idx] = layer.loss_weight[j]
            if layer.loss_weight[j]:
                consumers[idx] += 1
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split = collections.Counter()
    for i, layer in enumerate(param.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j in range(len(new.bottom)):
            src = source_of_bottom[(i, j)]
            if consumers[src] > 1:
                src_name = param.layer[src[0]].name
                new.bottom[j] = split_blob_name(src_name, new.bottom[j], src[1], next_split[src])
                next_split[src] += 1
        for j, blob in enumerate(new.top):
            idx = (i, j)
            count = consumers[idx]
            if count > 1:
                split = caffe_pb2.LayerParameter(name=split_layer_name(layer.name, blob, j), type="Split")
                split.bottom.append(blob)
                weight = loss_weight_of.get(idx, 0.0)
                for k in range(count):
                    split.top.append(split_blob_name(layer.name, blob, j, k))
                    if weight:
                        split.loss_weight.append(weight if k == 0 else 0.0)
                out.layer.add().CopyFrom(split)
                if weight:
                    new.ClearField("loss_weight")
                    next_split[idx] += 1
    return out


_ALSO = {}


def _name_the_layer(exc, layer):
    """Prefix a netlib error raised below a layer (a blob's size check, say)
    with the layer's name and type, unless it already names them."""
    desc = layer.describe()
    if exc.args and isinstance(exc.args[0], str) and desc not in exc.args[0]:
        exc.args = ("%s: %s" % (desc, exc.args[0]),) + exc.args[1:]


def _also(error_cls, builtin_cls):
    """A subclass of netlib's ``error_cls`` that is also ``builtin_cls``.

    pycaffe lets some exceptions through with their own class: an exception
    raised inside a Python layer's setup/forward/backward reaches the caller
    as that very class (a ``RuntimeError`` stays a ``RuntimeError``), and a
    missing net or weights file is a ``RuntimeError``.  netlib keeps its own
    message and class (naming the layer) and adds the class pycaffe callers
    catch.  Falls back to ``error_cls`` when the two cannot be combined.
    (Instances of these combined classes do not pickle.)
    """
    if issubclass(error_cls, builtin_cls):
        return error_cls
    key = (error_cls, builtin_cls)
    if key not in _ALSO:
        combined = error_cls
        try:
            cls = type(error_cls.__name__, (error_cls, builtin_cls),
                       {"__module__": error_cls.__module__, "__doc__": error_cls.__doc__,
                        "__str__": BaseException.__str__})
            if str(cls("probe")) == "probe":  # e.g. UnicodeDecodeError needs 5 arguments
                combined = cls
        except Exception:  # a layout conflict, a final class, a picky metaclass or __init__
            pass
        _ALSO[key] = combined
    return _ALSO[key]


class InputArrayError(ShapeError, RuntimeError):
    """``set_input_arrays`` refused its arrays (pycaffe raises RuntimeError)."""


def _check_input_array(array, name, channels, height, width):
    """pycaffe's CheckContiguousArray: C-contiguous, 4-D, float32, then
    channels, height and width, in that order, with pycaffe's messages."""
    if not isinstance(array, numpy.ndarray):
        raise InputArrayError("%s must be a numpy array, got %s" % (name, type(array).__name__))
    if not array.flags.c_contiguous:
        raise InputArrayError(name + " must be C contiguous")
    if array.ndim != 4:
        raise InputArrayError(name + " must be 4-d")
    if array.dtype != numpy.float32:
        raise InputArrayError(name + " must be float32")
    for axis, want, what in ((1, channels, "number of channels"), (2, height, "height"), (3, width, "width")):
        if array.shape[axis] != want:
            raise InputArrayError("%s has wrong %s" % (name, what))


def _parse_phase(phase):
    if phase is None:
        return None
    if isinstance(phase, str):
        name = phase.upper()
        if name not in ("TRAIN", "TEST"):
            raise ConfigError("phase must be TRAIN or TEST, got %r" % phase)
        return caffe_pb2.Phase.Value(name)
    if int(phase) not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        raise ConfigError("phase must be netlib.TRAIN (0) or netlib.TEST (1), got %r" % (phase,))
    return int(phase)


class Net:
    """A network built from a prototxt path, prototxt text or NetParameter.

    pycaffe forms: ``Net(model, phase)``, ``Net(model, weights, phase)`` and
    ``Net(model, phase, level=0, stages=None, weights=None)``.  ``dtype``
    (float32 by default; float64 for checks) and ``xp`` (array module) are
    netlib extras.
    """

    _memory = None  # the netlib.memory.MemoryReuse of reuse_memory(), when on

    def __init__(self, model, *args, phase=None, level=0, stages=None, weights=None,
                 dtype=numpy.float32, xp=None, allow_python_layers=None):
        if len(args) == 1:
            phase = args[0]
        elif len(args) == 2:
            weights, phase = args
        elif len(args) > 2:
            raise TypeError("Net(model, phase) or Net(model, weights, phase)")
        try:
            param = read_net_param(model)
        except NetlibFileNotFoundError as exc:
            raise _also(type(exc), RuntimeError)(str(exc)) from None  # pycaffe: RuntimeError
        self.source = model if isinstance(model, (str, os.PathLike)) and os.path.isfile(model) else None
        phase = _parse_phase(phase)
        if phase is not None:
            param.state.phase = phase
        if level:
            param.state.level = int(level)
        if stages:
            param.state.stage.extend(list(stages))
        self.dtype = numpy.dtype(dtype)
        self.xp = xp if xp is not None else backend.default_xp()
        self._allow_python_layers = allow_python_layers
        self._init(param)
        if weights:
            for w in (weights.split(",") if isinstance(weights, str) else weights):
                try:
                    self.copy_from(w)
                except NetlibFileNotFoundError as exc:
                    raise _also(type(exc), RuntimeError)(str(exc)) from None

    # -- construction ----------------------------------------------------------------
    def _init(self, in_param):
        filtered = filter_net(in_param)
        param = insert_splits(filtered)
        self.param = param
        self.name = param.name
        self.phase = param.state.phase
        self.debug_info = param.debug_info

        self.layers, self.layer_names = [], []
        self._blob_list, self._blob_names = [], []
        self.blobs = collections.OrderedDict()
        self.bottom_vecs, self.top_vecs = [], []
        self.bottom_ids, self.top_ids = [], []
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self._input_ids = []
        blob_need_backward = []
        name_to_id = {}
        available = {}  # blob name -> id, in insertion order

        # Parameters.
        self._param_blobs = []       # every param blob, net order
        self._param_owner = []       # -1 for owners, else index of the owner
        self._param_layer_indices = []
        self._param_display_names = []
        self._param_names_index = {}
        self.learnable_params = []
        self._learnable_param_ids = []
        self.params_lr, self.params_weight_decay = [], []
        self._has_params_lr, self._has_params_decay = [], []
        self.param_id_vecs = []

        for layer_id, lp in enumerate(param.layer):
            if not lp.HasField("phase"):
                lp.phase = self.phase
            if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
                raise ConfigError("layer %r (type %s): propagate_down must be unset or given once per "
                                  "bottom (%d values for %d bottoms)"
                                  % (lp.name, lp.type, len(lp.propagate_down), len(lp.bottom)))
            try:
                layer = create_layer(lp, phase=lp.phase, dtype=self.dtype, xp=self.xp,
                                     allow_python_layers=getattr(self, "_allow_python_layers", None))
            except NetlibError as exc:
                if str(exc).startswith("layer %r" % lp.name):
                    raise  # already names the layer (Python layers: keeps the user's traceback)
                raise type(exc)("layer %r: %s" % (lp.name, exc)) from None
            layer.net = self
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            bottoms, bottom_ids, bneed = [], [], []
            need_backward = False
            for j, bname in enumerate(lp.bottom):
                if bname not in available:
                    raise ConfigError("layer %r (type %s): unknown bottom blob %r (bottom %d)"
                                      % (lp.name, lp.type, bname, j))
                bid = available.pop(bname)
                nb = blob_need_backward[bid]
                if len(lp.propagate_down):
                    nb = bool(lp.propagate_down[j])
                bottoms.append(self._blob_list[bid])
                bottom_ids.append(bid)
                bneed.append(nb)
                need_backward |= blob_need_backward[bid]
            tops, top_ids = [], []
            n_auto = 0
            if layer.auto_top_blobs:
                need = max(layer.min_top_blobs or 0, layer.exact_num_top_blobs or 0)
                n_auto = max(0, need - len(lp.top))
            for j, tname in enumerate(list(lp.top) + ["(automatic)"] * n_auto):
                if j < len(lp.bottom) and tname == lp.bottom[j]:
                    tid = bottom_ids[j]  # in place
                elif tname in name_to_id and tname != "(automatic)":
                    raise ConfigError("layer %r (type %s): top blob %r is produced by more than one layer"
                                      % (lp.name, lp.type, tname))
                else:
                    tid = len(self._blob_list)
                    self._blob_list.append(Blob((), dtype=self.dtype, xp=self.xp))
                    self._blob_names.append(tname)
                    blob_need_backward.append(False)
                    # Caffe's anonymous tops (a loss layer with no top) are
                    # net blobs, listed as "(automatic)" as pycaffe does, but
                    # never available to later layers nor net outputs.
                    self.blobs[tname] = self._blob_list[tid]
                    if tname != "(automatic)":
                        name_to_id[tname] = tid
                    if lp.type == "Input":
                        self._input_ids.append(tid)
                if tname != "(automatic)":
                    available[tname] = tid
                tops.append(self._blob_list[tid])
                top_ids.append(tid)
            self.bottom_vecs.append(bottoms)
            self.top_vecs.append(tops)
            self.bottom_ids.append(bottom_ids)
            self.top_ids.append(top_ids)
            self.bottom_need_backward.append(bneed)

            self._setup_layer(layer, bottoms, tops)

            default_spec = caffe_pb2.ParamSpec()
            param_ids = []
            for k, blob in enumerate(layer.blobs):
                spec = lp.param[k] if k < len(lp.param) else default_spec
                pneed = spec.lr_mult != 0
                need_backward |= pneed
                layer.param_propagate_down[k] = pneed
                param_ids.append(self._append_param(layer_id, k, spec))
            self.param_id_vecs.append(param_ids)
            self.layer_need_backward.append(need_backward)
            if need_backward:
                for tid in top_ids:
                    blob_need_backward[tid] = True

        self._analyse_backward(param, blob_need_backward)
        for layer, need in zip(self.layers, self.layer_need_backward):
            layer.need_backward = need  # lets a layer skip forward work only backward uses
        self._blob_need_backward = blob_need_backward
        self._output_ids = [available[n] for n in sorted(available)]
        self.layer_dict = collections.OrderedDict(zip(self.layer_names, self.layers))
        self._layer_index = {n: i for i, n in enumerate(self.layer_names)}
        self._share_weights()

    def _setup_layer(self, layer, bottoms, tops):
        try:
            layer.SetUp(bottoms, tops)
        except NetlibError as exc:
            _name_the_layer(exc, layer)
            raise
        except Exception as exc:  # numpy/protobuf errors from inside a layer
            raise _also(LayerError, type(exc))("%s: setup failed: %s: %s; bottom shapes %s"
                             % (layer.describe(), type(exc).__name__, exc,
                                [tuple(b.shape) for b in bottoms])) from exc

    def _append_param(self, layer_id, k, spec):
        layer = self.layers[layer_id]
        lp = self.param.layer[layer_id]
        blob = layer.blobs[k]
        net_id = len(self._param_blobs)
        self._param_blobs.append(blob)
        self._param_layer_indices.append((layer_id, k))
        display = spec.name if spec.name else str(k)
        self._param_display_names.append(display)
        if not spec.name or spec.name not in self._param_names_index:
            if spec.name:
                self._param_names_index[spec.name] = net_id
            self._param_owner.append(-1)
            self._learnable_param_ids.append(net_id)
            self.learnable_params.append(blob)
            self._has_params_lr.append(spec.HasField("lr_mult"))
            self._has_params_decay.append(spec.HasField("decay_mult"))
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            return net_id
        owner_id = self._param_names_index[spec.name]
        self._param_owner.append(owner_id)
        owner_layer_id, owner_k = self._param_layer_indices[owner_id]
        owner_blob = self._param_blobs[owner_id]
        where = ("layer %r (type %s) shares param %r (blob %d) with layer %r"
                 % (lp.name, lp.type, spec.name, k, self.layer_names[owner_layer_id]))
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if owner_blob.count != blob.count:
                raise ShapeError("%s but the counts differ: %s vs %s" % (where, owner_blob.shape, blob.shape))
        elif tuple(owner_blob.shape) != tuple(blob.shape):
            raise ShapeError("%s but the shapes differ: %s vs %s (use share_mode: PERMISSIVE to share "
                             "equal counts)" % (where, owner_blob.shape, blob.shape))
        learnable = self._learnable_param_ids.index(owner_id)
        if spec.HasField("lr_mult"):
            if self._has_params_lr[learnable]:
                if self.params_lr[learnable] != spec.lr_mult:
                    raise ConfigError("%s with a different lr_mult (%g vs %g)"
                                      % (where, spec.lr_mult, self.params_lr[learnable]))
            else:
                self._has_params_lr[learnable] = True
                self.params_lr[learnable] = spec.lr_mult
        if spec.HasField("decay_mult"):
            if self._has_params_decay[learnable]:
                if self.params_weight_decay[learnable] != spec.decay_mult:
                    raise ConfigError("%s with a different decay_mult (%g vs %g)"
                                      % (where, spec.decay_mult, self.params_weight_decay[learnable]))
            else:
                self._has_params_decay[learnable] = True
                self.params_weight_decay[learnable] = spec.decay_mult
        return net_id

    def _share_weights(self):
        for net_id, owner in enumerate(self._param_owner):
            if owner >= 0:
                self._param_blobs[net_id].share_data(self._param_blobs[owner])
                self._param_blobs[net_id].share_diff(self._param_blobs[owner])

    def _analyse_backward(self, param, blob_need_backward):
        """Caffe's second, reverse pass plus force_backward."""
        under_loss, skip_backp = set(), set()
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            contributes, skip = False, True
            for j, tid in enumerate(self.top_ids[i]):
                name = self._blob_names[tid]
                if layer.loss(j) or name in under_loss:
                    contributes = True
                if name not in skip_backp:
                    skip = False
                if contributes and not skip:
                    break
            if self.layer_need_backward[i] and skip:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_ids[i])
            if not contributes:
                self.layer_need_backward[i] = False
            for j, bid in enumerate(self.bottom_ids[i]):
                name = self._blob_names[bid]
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip_backp.add(name)
        if param.force_backward:
            for i, layer in enumerate(self.layers):
                self.layer_need_backward[i] = True
                for j, bid in enumerate(self.bottom_ids[i]):
                    nb = self.bottom_need_backward[i][j] or layer.allow_force_backward(j)
                    self.bottom_need_backward[i][j] = nb
                    blob_need_backward[bid] = blob_need_backward[bid] or nb
                layer.param_propagate_down = [True] * len(layer.blobs)

    # -- pycaffe-style properties ----------------------------------------------------
    @property
    def _layer_names(self):
        """The layer names, in order."""
        return self.layer_names

    # pycaffe's underscore accessors (its C++ Net getters), by blob index.
    @property
    def _blobs(self):
        """Every blob, in blob-index order (``blobs`` is zip(_blob_names, _blobs))."""
        return list(self._blob_list)

    @property
    def _inputs(self):
        """Blob indices of the net inputs."""
        return list(self._input_ids)

    @property
    def _outputs(self):
        """Blob indices of the net outputs (in ``outputs`` order)."""
        return list(self._output_ids)

    @property
    def _blob_loss_weights(self):
        """Loss weight of every blob, in blob-index order."""
        weights = [0.0] * len(self._blob_list)
        for layer, ids in zip(self.layers, self.top_ids):
            for j, tid in enumerate(ids):
                if layer.loss(j):
                    weights[tid] = float(layer.loss(j))
        return weights

    def _top_ids(self, i):
        """Blob indices of layer ``i``'s tops."""
        return list(self.top_ids[i])

    def _bottom_ids(self, i):
        """Blob indices of layer ``i``'s bottoms."""
        return list(self.bottom_ids[i])

    @property
    def params(self):
        """Layer name -> list of parameter blobs, for layers that have any."""
        return collections.OrderedDict((n, l.blobs) for n, l in zip(self.layer_names, self.layers)
                                       if len(l.blobs))

    @property
    def inputs(self):
        """Names of the net inputs (the tops of Input layers and legacy ``input:`` fields)."""
        return [self._blob_names[i] for i in self._input_ids]

    @property
    def outputs(self):
        """Blobs no layer consumes, sorted by name (Caffe's order)."""
        return [self._blob_names[i] for i in self._output_ids]

    @property
    def output_blobs(self):
        return [self._blob_list[i] for i in self._output_ids]

    @property
    def top_names(self):
        """OrderedDict layer name -> the names of its tops."""
        return collections.OrderedDict((n, [self._blob_names[t] for t in ids])
                                       for n, ids in zip(self.layer_names, self.top_ids))

    @property
    def bottom_names(self):
        """OrderedDict layer name -> the names of its bottoms."""
        return collections.OrderedDict((n, [self._blob_names[b] for b in ids])
                                       for n, ids in zip(self.layer_names, self.bottom_ids))

    @property
    def blob_loss_weights(self):
        """OrderedDict blob name -> its loss weight (0 for blobs that are not losses)."""
        weights = collections.OrderedDict((n, 0.0) for n in self.blobs)
        for layer, ids in zip(self.layers, self.top_ids):
            for j, tid in enumerate(ids):
                if layer.loss(j):
                    weights[self._blob_names[tid]] = layer.loss(j)
        return weights

    def learnable_param_owner(self, index):
        """(layer name, blob index) of learnable parameter ``index``."""
        layer_id, k = self._param_layer_indices[self._learnable_param_ids[index]]
        return self.layer_names[layer_id], k

    def layer_by_name(self, name):
        if name not in self._layer_index:
            raise ConfigError("net %r has no layer named %r" % (self.name, name))
        return self.layers[self._layer_index[name]]

    def _index_of(self, layer_name):
        if layer_name not in self._layer_index:
            raise ConfigError("net %r has no layer named %r" % (self.name, layer_name))
        return self._layer_index[layer_name]

    # -- running ---------------------------------------------------------------------
    def forward_from_to(self, start=0, end=None):
        """Run layers ``start..end`` (inclusive) forward; return their summed loss."""
        return self._forward_range(start, end, ())

    def _forward_range(self, start, end, extra):
        end = len(self.layers) - 1 if end is None else end
        if not (0 <= start <= len(self.layers)) or end >= len(self.layers):
            raise ConfigError("forward range %d..%d outside 0..%d" % (start, end, len(self.layers) - 1))
        if self._memory is not None and start <= end:
            self._memory.prepare(start, end, extra)
        dtype = self.dtype.type
        loss = dtype(0)  # summed in the net's dtype, as Caffe's Dtype loss
        layers, bottoms, tops = self.layers, self.bottom_vecs, self.top_vecs
        hooks = getattr(self, "_hooks", None)
        i = start
        try:
            if not hooks and not self.debug_info:
                for i in range(start, end + 1):
                    value = layers[i].Forward(bottoms[i], tops[i])
                    if value:  # adding a zero changes no bit of the sum
                        loss += dtype(value)
            else:
                for i in range(start, end + 1):
                    if hooks:
                        for callback in hooks["before_forward"]:
                            callback(i)
                    loss += dtype(layers[i].Forward(bottoms[i], tops[i]))
                    if self.debug_info:
                        self._log_forward(i)
                    if hooks:
                        for callback in hooks["after_forward"]:
                            callback(i)
        except NetlibError:
            raise
        except Exception as exc:
            layer = self.layers[i]
            raise _also(LayerError, type(exc))("%s: forward failed: %s: %s; bottom shapes %s"
                             % (layer.describe(), type(exc).__name__, exc,
                                [tuple(b.shape) for b in self.bottom_vecs[i]])) from exc
        return float(loss)

    def backward_from_to(self, start=None, end=0):
        """Run layers ``start`` down to ``end`` (inclusive) backward."""
        start = len(self.layers) - 1 if start is None else start
        if self._memory is not None:
            raise ConfigError("backward on net %r with reuse_memory() on: the activations a backward "
                              "reads were reused during the forward; call net.reuse_memory(False) and "
                              "run the forward again" % self.name)
        i = start
        try:
            hooks = getattr(self, "_hooks", None)
            for i in range(start, end - 1, -1):
                if hooks:
                    for callback in hooks["before_backward"]:
                        callback(i)
                if self.layer_need_backward[i]:
                    self.layers[i].Backward(self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i])
                if hooks:
                    for callback in hooks["after_backward"]:
                        callback(i)
        except NetlibError:
            raise
        except Exception as exc:
            layer = self.layers[i]
            raise _also(LayerError, type(exc))("%s: backward failed: %s: %s; top shapes %s"
                             % (layer.describe(), type(exc).__name__, exc,
                                [tuple(t.shape) for t in self.top_vecs[i]])) from exc

    def _log_forward(self, i):
        for tid in self.top_ids[i]:
            blob = self._blob_list[tid]
            log.info("    [Forward] Layer %s, top blob %s data: %g", self.layer_names[i],
                     self._blob_names[tid], blob.asum_data() / max(blob.count, 1))

    def forward_prefilled(self):
        """Forward the whole net with the inputs already in place; return the loss."""
        return self.forward_from_to(0, len(self.layers) - 1)

    def forward_backward(self):
        """Forward then backward over the whole net; return the loss (Caffe's ForwardBackward)."""
        loss = self.forward_from_to(0, len(self.layers) - 1)
        self.backward_from_to(len(self.layers) - 1, 0)
        return loss

    def _forward(self, start, end):
        """Forward layers ``start`` to ``end`` (indices, inclusive); returns the loss."""
        return self.forward_from_to(start, end)

    def _backward(self, start, end):
        """Backward from layer ``start`` down to ``end`` (indices, inclusive)."""
        return self.backward_from_to(start, end)

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's forward: copy ``kwargs`` into the input blobs, run, and
        return ``{output name: data}`` (views, not copies).  ``start``/``end``
        are layer names; ``blobs`` lists extra blobs to return."""
        blobs = list(blobs or [])
        start_ind = self._index_of(start) if start is not None else 0
        if end is not None:
            end_ind = self._index_of(end)
            outputs = set(self.top_names[end] + blobs)
        else:
            end_ind = len(self.layers) - 1
            outputs = set(self.outputs + blobs)
        if kwargs:
            if set(kwargs) != set(self.inputs):
                raise ConfigError("forward() arguments %s do not match the net inputs %s"
                                  % (sorted(kwargs), sorted(self.inputs)))
            for name, value in kwargs.items():
                target = self.blobs[name]
                if value.shape[0] != target.shape[0]:
                    raise ShapeError("input %r has batch size %d but the blob holds %d (shape %s); "
                                     "reshape the blob first" % (name, value.shape[0], target.shape[0],
                                                                 target.shape))
                target.data[...] = self.xp.asarray(value)
        self._forward_range(start_ind, end_ind, blobs)
        return {name: self.blobs[name].data for name in outputs}

    def jvp(self, tangents=None):
        """Forward-mode derivatives: ``tangents`` maps blob names or
        ``(layer name, param index)`` to tangent arrays (the rest are zero);
        runs one forward pass and returns ``{blob name: tangent}`` for every
        blob (see :mod:`netlib.forward_mode`).  Wrong shapes or unknown
        names raise ``netlib.forward_mode.JVPError``."""
        from .forward_mode import run_jvp
        return run_jvp(self, tangents)

    def hvp(self, v, loss=None, weight_decay=0.0, regularization="L2", keep_batch=True):
        """Hessian-vector product of the loss with respect to the learnable
        parameters, exact up to rounding (Pearlmutter's R-operator, see
        :mod:`netlib.second_order`): one forward pass with tangents and one
        backward pass with the diffs' tangents, about 3 forward+backward.

        ``v``: {(layer name, blob index): array} (parameters left out are 0;
        a shared parameter is named by any of its layers) or a list aligned
        with ``net.learnable_params``; the result has the same form, with
        every learnable parameter.  Parameters no layer computes a gradient
        for (``lr_mult: 0``, BatchNorm's statistics) are held fixed: their
        directions are ignored and their rows are zero.  ``loss``: None for the net's objective
        (every top with a loss weight, weighted, as training sees it), or a
        loss blob name (or list) for those alone.  ``weight_decay`` and
        ``regularization`` add the solver's L2 term ``weight_decay *
        decay_mult * v`` (L1 adds nothing: its gradient is piecewise
        constant).  With ``keep_batch`` the data layers are not re-run: the
        product is at the batch now in the net (run ``net.forward()``
        first); every other layer is.  Afterwards the net holds that pass's
        values, and its diffs the gradient, as after ``clear_param_diffs``
        and ``forward_backward``.  A layer without a second-order rule, a
        net without a loss or a direction of the wrong shape raises
        ``netlib.second_order.HVPError``."""
        from .second_order import run_hvp
        return run_hvp(self, v, loss, weight_decay, regularization, keep_batch)

    def gnvp(self, v, loss=None, weight_decay=0.0, regularization="L2", keep_batch=True):
        """Gauss-Newton-vector product ``J^T H_loss J v`` (J: the Jacobian of
        the loss layers' inputs with respect to the parameters, H_loss the
        loss layers' own Hessian): as :meth:`hvp` with the second-order
        terms of every non-loss layer left out.  Positive semi-definite for
        the softmax and Euclidean losses (plus the L2 term)."""
        from .second_order import run_hvp
        return run_hvp(self, v, loss, weight_decay, regularization, keep_batch, gauss_newton=True)

    def jacobian(self, of, wrt, max_columns=1 << 14):
        """The Jacobian of blob ``of`` with respect to blob ``wrt`` (a name) or
        a parameter ``(layer name, blob index)``, shaped ``of.shape +
        wrt.shape``: one forward-mode pass per element of ``wrt`` (at most
        ``max_columns``), at the batch now in the net: every layer but the
        data sources re-runs per column (in TRAIN, BatchNorm's running
        averages advance as with any forward)."""
        from .second_order import run_jacobian
        return run_jacobian(self, of, wrt, max_columns)

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's backward: ``kwargs`` are output diffs; returns input diffs."""
        diffs = list(diffs or [])
        start_ind = self._index_of(start) if start is not None else len(self.layers) - 1
        if end is not None:
            end_ind = self._index_of(end)
            outputs = set(self.bottom_names[end] + diffs)
        else:
            end_ind = 0
            outputs = set(self.inputs + diffs)
        if kwargs:
            if set(kwargs) != set(self.outputs):
                raise ConfigError("backward() arguments %s do not match the net outputs %s"
                                  % (sorted(kwargs), sorted(self.outputs)))
            for name, value in kwargs.items():
                target = self.blobs[name]
                if value.shape[0] != target.shape[0]:
                    raise ShapeError("diff for %r has batch size %d, blob shape is %s"
                                     % (name, value.shape[0], target.shape))
                target.diff[...] = self.xp.asarray(value)
        self.backward_from_to(start_ind, end_ind)
        return {name: self.blobs[name].diff for name in outputs}

    def _add_hook(self, kind, callback):
        if not callable(callback):
            raise TypeError("%s() needs a callable taking the layer index" % kind)
        if getattr(self, "_hooks", None) is None:
            self._hooks = {k: [] for k in ("before_forward", "after_forward", "before_backward",
                                            "after_backward")}
        self._hooks[kind].append(callback)

    def before_forward(self, callback):
        """pycaffe's hook: ``callback(layer_index)`` before each layer's forward."""
        self._add_hook("before_forward", callback)

    def after_forward(self, callback):
        """``callback(layer_index)`` after each layer's forward."""
        self._add_hook("after_forward", callback)

    def before_backward(self, callback):
        """``callback(layer_index)`` before each layer's backward (Caffe calls
        it for every layer, also those that skip backward)."""
        self._add_hook("before_backward", callback)

    def after_backward(self, callback):
        """``callback(layer_index)`` after each layer's backward."""
        self._add_hook("after_backward", callback)

    def _batches(self, arrays):
        """pycaffe's _Net_batch: ``{name: array}`` cut into batches of the
        net's batch size (the first blob's first axis); the last batch is
        padded with zeros."""
        num = len(next(iter(arrays.values())))
        batch_size = next(iter(self.blobs.values())).shape[0]
        for i in range(0, num - num % batch_size, batch_size):
            yield {name: a[i:i + batch_size] for name, a in arrays.items()}
        remainder = num % batch_size
        if remainder:
            yield {name: numpy.concatenate([numpy.asarray(a[num - remainder:]),
                                            numpy.zeros((batch_size - remainder,) + tuple(a.shape[1:]),
                                                        dtype=numpy.asarray(a[:1]).dtype)])
                   for name, a in arrays.items()}

    _batch = _batches  # pycaffe's name

    @staticmethod
    def _collect(parts, num):
        from .backend import to_numpy
        out = {name: numpy.concatenate([to_numpy(p) for p in chunks]) for name, chunks in parts.items()}
        return {name: a[:num] for name, a in out.items()}  # drop the padding

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe's forward_all: run ``kwargs`` (input name -> array of any
        length) through the net in batches; returns copies of the outputs
        (and of ``blobs``) for every item, padding removed."""
        if not kwargs:
            raise ConfigError("forward_all() needs the input arrays as keyword arguments, e.g. data=array")
        num = len(next(iter(kwargs.values())))
        parts = {name: [] for name in set(self.outputs + list(blobs or []))}
        for batch in self._batches(kwargs):
            for name, value in self.forward(blobs=blobs, **batch).items():
                parts[name].append(value.copy())
        return self._collect(parts, num)

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """pycaffe's forward_backward_all: ``kwargs`` holds input arrays and
        output diffs (by name); returns ``(outputs, input diffs)`` for every
        item, padding removed."""
        inputs = {k: v for k, v in kwargs.items() if k in self.inputs}
        out_diffs = {k: v for k, v in kwargs.items() if k in self.outputs}
        unknown = set(kwargs) - set(inputs) - set(out_diffs)
        if unknown:
            raise ConfigError("forward_backward_all(): %s are neither net inputs %s nor outputs %s"
                              % (sorted(unknown), self.inputs, self.outputs))
        if not inputs:
            raise ConfigError("forward_backward_all() needs the input arrays as keyword arguments")
        num = len(next(iter(inputs.values())))
        fwd = {name: [] for name in set(self.outputs + list(blobs or []))}
        bwd = {name: [] for name in set(self.inputs + list(diffs or []))}
        batches = self._batches(inputs)
        diff_batches = self._batches(out_diffs) if out_diffs else iter(lambda: {}, None)
        for batch, diff_batch in zip(batches, diff_batches):
            for name, value in self.forward(blobs=blobs, **batch).items():
                fwd[name].append(value.copy())
            for name, value in self.backward(diffs=diffs, **diff_batch).items():
                bwd[name].append(value.copy())
        return self._collect(fwd, num), self._collect(bwd, num)

    def reshape(self):
        """Propagate input shape changes through every layer."""
        for layer, bottoms, tops in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottoms, tops)
            layer.invalidate_reshape()

    # -- memory ------------------------------------------------------------------------
    def reuse_memory(self, enable=True, keep=()):
        """Opt in to inference memory reuse (:mod:`netlib.memory` has the
        contract): dead activations lend their buffers to later blobs.  After
        ``forward()`` the outputs, ``keep`` names, blobs asked for by
        ``forward(blobs=...)``, inputs and loss tops hold their values; other
        blobs may not.  ``forward(start=...)`` and ``backward()`` raise
        ConfigError while it is on; ``reuse_memory(False)`` turns it off."""
        from .memory import MemoryReuse
        if self._memory is not None:
            self._memory.release()
            self._memory = None
            self.reshape()
        if enable:
            self._memory = MemoryReuse(self, keep)
        return self

    reusing_memory = property(lambda self: self._memory is not None, doc="True while reuse_memory() is on.")

    def memory_estimate(self):
        """Bytes needed for weights, activations (with and without reuse), diffs
        and conv workspace, from the shapes (no forward): :func:`netlib.memory.estimate`."""
        from .memory import estimate
        return estimate(self)

    def memory_usage(self):
        """Bytes the buffers hold now, by kind: :func:`netlib.memory.measure`."""
        from .memory import measure
        return measure(self)

    def set_input_arrays(self, data, labels):
        """Feed the MemoryData first layer (pycaffe's set_input_arrays).

        ``data``: float32, C-contiguous (N, channels, height, width);
        ``labels``: float32 (N,) (made (N, 1, 1, 1) as pycaffe does) or
        (N, 1, 1, 1); N a multiple of the layer's batch_size.  Anything else
        raises :class:`InputArrayError` (a RuntimeError, as in pycaffe) with
        pycaffe's message; nothing is converted.  As in pycaffe, the layer
        reads the caller's data array in place: changing it later changes
        what the next forward serves.
        """
        if getattr(labels, "ndim", None) == 1:
            labels = numpy.ascontiguousarray(labels[:, numpy.newaxis, numpy.newaxis, numpy.newaxis])
        return self._set_input_arrays(data, labels)

    def _set_input_arrays(self, data, labels):
        """pycaffe's C++ half of set_input_arrays: labels must already be 4-D."""
        layer = self.layers[0] if self.layers else None
        if layer is None or layer.type != "MemoryData":
            raise InputArrayError("set_input_arrays may only be called if the first layer is a "
                                  "MemoryDataLayer (it is %s)" % (layer.type if layer else "absent"))
        _check_input_array(data, "data array", layer.channels, layer.height, layer.width)
        _check_input_array(labels, "labels array", 1, 1, 1)
        if data.shape[0] != labels.shape[0]:
            raise InputArrayError("data and labels must have the same first dimension")
        if data.shape[0] % layer.batch_size != 0:
            raise InputArrayError("first dimensions of input arrays must be a multiple of batch size")
        layer.reset(data, labels)

    # -- parameters --------------------------------------------------------------------
    def clear_param_diffs(self):
        """Zero the diff of every learnable parameter (in place)."""
        for blob in self.learnable_params:
            blob.diff[...] = 0

    def update(self):
        """``data -= diff`` for every learnable parameter."""
        for blob in self.learnable_params:
            blob.update()

    def share_trained_layers_with(self, other):
        """Share parameter data with ``other``'s layers of the same name."""
        for name, source in zip(other.layer_names, other.layers):
            if name not in self._layer_index:
                continue
            target = self.layers[self._layer_index[name]]
            if len(target.blobs) != len(source.blobs):
                raise WeightsError("incompatible number of blobs for layer %r: %d vs %d"
                                   % (name, len(target.blobs), len(source.blobs)))
            for j, (t, s) in enumerate(zip(target.blobs, source.blobs)):
                if tuple(t.shape) != tuple(s.shape):
                    raise WeightsError("cannot share param %d of layer %r: shape %s vs %s"
                                       % (j, name, t.shape, s.shape))
                t.share_data(s)

    share_with = share_trained_layers_with

    def copy_trained_layers_from(self, source, path=None):
        """Copy weights from a NetParameter (matched by layer name; unknown
        layers are ignored; legacy 4-D blob shapes match as Caffe allows).
        ``path`` (the file it came from) is named in errors."""
        where = (path + ": ") if path else ""
        for layer_param in source.layer:
            name = layer_param.name
            if name not in self._layer_index:
                log.debug("Ignoring source layer %s", name)
                continue
            target = self.layers[self._layer_index[name]].blobs
            if len(target) != len(layer_param.blobs):
                raise WeightsError("%sincompatible number of blobs for layer %r: the weights have %d, "
                                   "the net needs %d" % (where, name, len(layer_param.blobs), len(target)))
            for j, (blob, proto) in enumerate(zip(target, layer_param.blobs)):
                try:
                    blob.from_proto(proto, reshape=False)
                except WeightsError as exc:
                    raise WeightsError("%scannot copy param %d weights from layer %r: %s. To learn this "
                                       "layer's parameters from scratch, rename the layer."
                                       % (where, j, name, exc)) from None

    def copy_trained_layers_from_hdf5(self, path):
        import h5py
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise WeightsError("%s: HDF5 weights file without a 'data' group" % path)
            data = f["data"]
            for name in data:
                if name not in self._layer_index:
                    log.debug("Ignoring source layer %s", name)
                    continue
                layer_id = self._layer_index[name]
                target = self.layers[layer_id].blobs
                group = data[name]
                if len(group) > len(target):
                    raise WeightsError("%s: incompatible number of blobs for layer %r: %d stored, %d needed"
                                       % (path, name, len(group), len(target)))
                for j, blob in enumerate(target):
                    key = str(j)
                    if key not in group:
                        if self._param_owner[self.param_id_vecs[layer_id][j]] != -1:
                            continue  # shared: the owner carries it
                        raise WeightsError("%s: incompatible number of blobs for layer %r: param %d missing"
                                           % (path, name, j))
                    ds = h5_dataset(group, key, path, "data/%s/%s" % (name, key))
                    if tuple(ds.shape) != tuple(blob.shape):      # checked before the read
                        raise WeightsError("%s: cannot copy param %d weights from layer %r; shape mismatch. "
                                           "Source param shape is %s; target param shape is %s"
                                           % (path, j, name, tuple(ds.shape), tuple(blob.shape)))
                    values = ds[()]
                    if not numpy.issubdtype(values.dtype, numpy.number):
                        raise WeightsError("%s: data/%s/%s holds %s values, not numbers"
                                           % (path, name, key, values.dtype))
                    blob.data[...] = self.xp.asarray(values, dtype=blob.dtype)

    def copy_from(self, path):
        """Load weights from a .caffemodel (binary) or HDF5 file (by content)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            from .errors import NetlibFileNotFoundError
            raise NetlibFileNotFoundError("%s: no such weights file" % path)
        if is_hdf5(path):
            self.load_hdf5(path)
        else:
            self.copy_trained_layers_from(read_weights_param(path), path)

    def load_hdf5(self, path):
        """Load weights from Caffe's HDF5 format (``/data/<layer>/<i>``), by layer name."""
        try:
            self.copy_trained_layers_from_hdf5(path)
        except NetlibError:
            raise
        except H5_ERRORS as exc:
            raise WeightsError("%s: unreadable HDF5 weights (truncated or corrupt?): %s: %s"
                               % (path, type(exc).__name__, exc)) from None

    def to_proto(self, write_diff=False):
        """A NetParameter with every layer's definition and its blobs."""
        out = caffe_pb2.NetParameter()
        out.name = self.name
        for lp, layer in zip(self.param.layer, self.layers):
            new = out.layer.add()
            new.CopyFrom(lp)
            del new.blobs[:]
            for blob in layer.blobs:
                blob.to_proto(new.blobs.add(), write_diff=write_diff)
        return out

    def save(self, path, write_diff=False):
        """Write a binary .caffemodel (atomically)."""
        write_binary_proto(path, self.to_proto(write_diff))

    def to_onnx(self, path, opset=13):
        """Write the net (its current shapes and weights) as an ONNX model;
        returns the ``onnx.ModelProto``.  Needs ``pip install onnx``; see
        :func:`netlib.onnx_export.export_onnx`."""
        from .onnx_export import export_onnx
        return export_onnx(self, path, opset=opset)

    def save_hdf5(self, path, write_diff=False):
        """Write Caffe's HDF5 weights: /data/<layer>/<i> (and /diff/...) for
        every layer; parameters shared from another layer are not written."""
        from .files import atomic_hdf5
        with atomic_hdf5(path) as f:
            groups = [f.create_group("data")]
            if write_diff:
                groups.append(f.create_group("diff"))
            for layer_id, (name, layer) in enumerate(zip(self.layer_names, self.layers)):
                g_data = groups[0].create_group(name)
                g_diff = groups[1].create_group(name) if write_diff else None
                for j, blob in enumerate(layer.blobs):
                    if self._param_owner[self.param_id_vecs[layer_id][j]] != -1:
                        continue
                    g_data.create_dataset(str(j), data=backend.to_numpy(blob.data))
                    if g_diff is not None:
                        g_diff.create_dataset(str(j), data=backend.to_numpy(blob.diff))

    def close(self):
        """Stop the data layers' prefetch threads and close their databases
        now (otherwise that happens when the net is garbage-collected)."""
        for layer in self.layers:
            if hasattr(layer, "close"):
                layer.close()

    def layer_states(self):
        """Positions of stateful layers (data readers), for exact resumes."""
        return {name: layer.state_dict() for name, layer in zip(self.layer_names, self.layers)
                if hasattr(layer, "state_dict")}

    def load_layer_states(self, states):
        for name, state in states.items():
            if name in self._layer_index and hasattr(self.layers[self._layer_index[name]], "load_state_dict"):
                self.layers[self._layer_index[name]].load_state_dict(state)

    def __repr__(self):
        return "<netlib.Net %r: %d layers, %d blobs>" % (self.name, len(self.layers), len(self.blobs))
