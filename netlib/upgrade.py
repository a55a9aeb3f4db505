"""Caffe's on-load upgrades of legacy nets and solvers (upgrade_proto.cpp).

Applied in Caffe's order to every net read from text or binary:

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` becomes a V1 layer with
   an enum type; "padding" layers fold into the next conv/pool's ``pad``.
2. Data transformation: V1 Data/ImageData/WindowData ``scale``, ``mean_file``,
   ``crop_size`` and ``mirror`` move into ``transform_param``.
3. V1 -> V2: ``layers`` (enum types, ``blobs_lr``, ``weight_decay``) become
   ``layer`` (type strings, ``param { lr_mult decay_mult }``).
4. Net ``input`` + ``input_dim``/``input_shape`` become an ``Input`` layer named
   "input" at position 0 (inputs without shapes are dropped).
5. A BatchNorm with three ``param`` entries gets lr_mult = decay_mult = 0.

Solvers: the ``solver_type`` enum becomes the ``type`` string.
"""
from .errors import ConfigError
from .layer import V1_TYPE_NAMES
from .proto import caffe_pb2

_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN", "multinomial_logistic_loss":
    "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU", "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT", "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def _where(path):
    return (path + ": ") if path else ""


# -- 1. V0 -> V1 --------------------------------------------------------------
def _net_needs_v0_upgrade(net):
    return any(layer.HasField("layer") for layer in net.layers)


def _fold_padding_layers(net):
    """Remove V0 "padding" layers, moving their pad into the consumer."""
    out = []
    top_producer = {}  # blob name -> V1 layer that produced it
    for layer in net.layers:
        v0 = layer.layer
        if v0.type == "padding":
            top_producer[layer.top[0]] = layer
            continue
        new = caffe_pb2.V1LayerParameter()
        new.CopyFrom(layer)
        for j, bottom in enumerate(layer.bottom):
            pad_layer = top_producer.get(bottom)
            if pad_layer is None:
                continue
            if v0.type not in ("conv", "pool"):
                raise ConfigError("padding layer %r feeds %r, which is not a conv or pool layer"
                                  % (pad_layer.layer.name, v0.name))
            new.bottom[j] = pad_layer.bottom[0]
            new.layer.pad = pad_layer.layer.pad
        for top in layer.top:
            top_producer.pop(top, None)
        out.append(new)
    del net.layers[:]
    net.layers.extend(out)


def _v0_to_v1_layer(old, path):
    v0 = old.layer
    new = caffe_pb2.V1LayerParameter()
    new.bottom.extend(old.bottom)
    new.top.extend(old.top)
    if v0.HasField("name"):
        new.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in _V0_TYPES:
            raise ConfigError("%sunknown V0 layer type %r (layer %r)" % (_where(path), kind, v0.name))
        new.type = caffe_pb2.V1LayerParameter.LayerType.Value(_V0_TYPES[kind])
    new.blobs.extend(v0.blobs)
    new.blobs_lr.extend(v0.blobs_lr)
    new.weight_decay.extend(v0.weight_decay)

    def bad(field):
        raise ConfigError("%sV0 layer %r of type %r has field %r that this type does not take"
                          % (_where(path), v0.name, kind, field))

    conv, ip, pool = new.convolution_param, new.inner_product_param, new.pooling_param
    if v0.HasField("num_output"):
        if kind == "conv":
            conv.num_output = v0.num_output
        elif kind == "innerproduct":
            ip.num_output = v0.num_output
        else:
            bad("num_output")
    if v0.HasField("biasterm"):
        if kind == "conv":
            conv.bias_term = v0.biasterm
        elif kind == "innerproduct":
            ip.bias_term = v0.biasterm
        else:
            bad("biasterm")
    for field in ("weight_filler", "bias_filler"):
        if v0.HasField(field):
            if kind == "conv":
                getattr(conv, field).CopyFrom(getattr(v0, field))
            elif kind == "innerproduct":
                getattr(ip, field).CopyFrom(getattr(v0, field))
            else:
                bad(field)
    if v0.HasField("pad"):
        if kind == "conv":
            conv.pad.append(v0.pad)
        elif kind == "pool":
            pool.pad = v0.pad
        else:
            bad("pad")
    if v0.HasField("kernelsize"):
        if kind == "conv":
            conv.kernel_size.append(v0.kernelsize)
        elif kind == "pool":
            pool.kernel_size = v0.kernelsize
        else:
            bad("kernelsize")
    if v0.HasField("group"):
        if kind == "conv":
            conv.group = v0.group
        else:
            bad("group")
    if v0.HasField("stride"):
        if kind == "conv":
            conv.stride.append(v0.stride)
        elif kind == "pool":
            pool.stride = v0.stride
        else:
            bad("stride")
    if v0.HasField("pool"):
        if kind == "pool":
            pool.pool = v0.pool
        else:
            bad("pool")
    if v0.HasField("dropout_ratio"):
        if kind == "dropout":
            new.dropout_param.dropout_ratio = v0.dropout_ratio
        else:
            bad("dropout_ratio")
    for field in ("local_size", "alpha", "beta", "k"):
        if v0.HasField(field):
            if kind == "lrn":
                setattr(new.lrn_param, field, getattr(v0, field))
            else:
                bad(field)
    data_targets = {"data": new.data_param, "hdf5_data": new.hdf5_data_param,
                    "images": new.image_data_param, "window_data": new.window_data_param,
                    "infogain_loss": new.infogain_loss_param}
    if v0.HasField("source"):
        if kind not in data_targets:
            bad("source")
        data_targets[kind].source = v0.source
    transformable = {"data": new.data_param, "images": new.image_data_param,
                     "window_data": new.window_data_param}
    for v0_field, field in (("scale", "scale"), ("meanfile", "mean_file"),
                            ("cropsize", "crop_size"), ("mirror", "mirror")):
        if v0.HasField(v0_field):
            if kind not in transformable:
                bad(v0_field)
            setattr(transformable[kind], field, getattr(v0, v0_field))
    if v0.HasField("batchsize"):
        targets = dict(transformable, hdf5_data=new.hdf5_data_param)
        if kind not in targets:
            bad("batchsize")
        targets[kind].batch_size = v0.batchsize
    if v0.HasField("rand_skip"):
        if kind == "data":
            new.data_param.rand_skip = v0.rand_skip
        elif kind == "images":
            new.image_data_param.rand_skip = v0.rand_skip
        else:
            bad("rand_skip")
    if v0.HasField("shuffle_images"):
        if kind == "images":
            new.image_data_param.shuffle = v0.shuffle_images
        else:
            bad("shuffle_images")
    for v0_field, field in (("new_height", "new_height"), ("new_width", "new_width")):
        if v0.HasField(v0_field):
            if kind == "images":
                setattr(new.image_data_param, field, getattr(v0, v0_field))
            else:
                bad(v0_field)
    for v0_field, field in (("det_fg_threshold", "fg_threshold"), ("det_bg_threshold", "bg_threshold"),
                            ("det_fg_fraction", "fg_fraction"), ("det_context_pad", "context_pad"),
                            ("det_crop_mode", "crop_mode")):
        if v0.HasField(v0_field):
            if kind == "window_data":
                setattr(new.window_data_param, field, getattr(v0, v0_field))
            else:
                bad(v0_field)
    if v0.HasField("concat_dim"):
        if kind == "concat":
            new.concat_param.concat_dim = v0.concat_dim
        else:
            bad("concat_dim")
    if v0.HasField("hdf5_output_param"):
        if kind == "hdf5_output":
            new.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            bad("hdf5_output_param")
    return new


def _upgrade_v0(net, path):
    _fold_padding_layers(net)
    upgraded = [_v0_to_v1_layer(layer, path) for layer in net.layers]
    del net.layers[:]
    net.layers.extend(upgraded)


# -- 2. data transformation -----------------------------------------------------
def _upgrade_data_transformation(net):
    kinds = {caffe_pb2.V1LayerParameter.DATA: "data_param",
             caffe_pb2.V1LayerParameter.IMAGE_DATA: "image_data_param",
             caffe_pb2.V1LayerParameter.WINDOW_DATA: "window_data_param"}
    for layer in net.layers:
        field = kinds.get(layer.type)
        if field is None or not layer.HasField(field):
            continue
        source = getattr(layer, field)
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if source.HasField(name):
                setattr(layer.transform_param, name, getattr(source, name))
                source.ClearField(name)


# -- 3. V1 -> V2 --------------------------------------------------------------
_V1_PARAM_FIELDS = [f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields
                    if f.name.endswith("_param") and f.name not in ("transform_param", "loss_param")]


def _v1_to_v2_layer(v1, path):
    layer = caffe_pb2.LayerParameter()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
        layer.type = V1_TYPE_NAMES[enum_name]
    layer.blobs.extend(v1.blobs)
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    layer.loss_weight.extend(v1.loss_weight)
    for field in _V1_PARAM_FIELDS + ["transform_param", "loss_param"]:
        if v1.HasField(field):
            getattr(layer, field).CopyFrom(getattr(v1, field))
    if v1.HasField("layer"):
        raise ConfigError("%sV1 layer %r still holds a V0 layer after the V0 upgrade" % (_where(path), v1.name))
    return layer


def _upgrade_v1(net, path):
    if len(net.layer):
        raise ConfigError("%sthe net has both 'layer' and legacy 'layers' fields; use one of them"
                          % _where(path))
    net.layer.extend(_v1_to_v2_layer(v1, path) for v1 in net.layers)
    net.ClearField("layers")


# -- 4. net inputs -> Input layer ----------------------------------------------
def _upgrade_inputs(net, path):
    has_shape = len(net.input_dim) > 0 or len(net.input_shape) > 0
    if has_shape:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        inputs = list(net.input)
        if len(net.input_shape):
            if len(net.input_shape) != len(inputs):
                raise ConfigError("%s%d input_shape entries for %d net inputs"
                                  % (_where(path), len(net.input_shape), len(inputs)))
            shapes = [list(s.dim) for s in net.input_shape]
        else:
            dims = list(net.input_dim)
            if len(dims) != 4 * len(inputs):
                raise ConfigError("%sinput_dim needs 4 values per input: %d values for %d inputs"
                                  % (_where(path), len(dims), len(inputs)))
            shapes = [dims[4 * i:4 * i + 4] for i in range(len(inputs))]
        layer.top.extend(inputs)
        for shape in shapes:
            layer.input_param.shape.add().dim.extend(shape)
        existing = list(net.layer)
        del net.layer[:]
        net.layer.append(layer)
        net.layer.extend(existing)
    net.ClearField("input")
    net.ClearField("input_dim")
    net.ClearField("input_shape")


# -- 5. BatchNorm params -------------------------------------------------------
def _upgrade_batchnorm(net):
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


def upgrade_net(net, path=None):
    """Upgrade ``net`` (a NetParameter) in place; returns True if anything changed."""
    before = net.SerializePartialToString()
    if _net_needs_v0_upgrade(net):
        _upgrade_v0(net, path)
    if len(net.layers):
        _upgrade_data_transformation(net)
        _upgrade_v1(net, path)
    if len(net.input) or len(net.input_dim) or len(net.input_shape):
        _upgrade_inputs(net, path)
    _upgrade_batchnorm(net)
    return net.SerializePartialToString() != before


def upgrade_solver(solver, path=None):
    """Turn the legacy ``solver_type`` enum into the ``type`` string."""
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise ConfigError("%sthe solver sets both the legacy 'solver_type' and 'type'; keep only 'type'"
                              % _where(path))
        solver.type = _SOLVER_TYPES[solver.solver_type]
        solver.ClearField("solver_type")
    return solver
