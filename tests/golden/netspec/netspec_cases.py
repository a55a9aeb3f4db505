"""NetSpec scripts run both by real pycaffe (tools/make_netspec_goldens.py) and by netlib.

Every ``case_<name>(caffe, L, P)`` builds a net with the pycaffe API of the module
given as ``caffe`` (real pycaffe or netlib) and returns a NetParameter; its
``str()`` is stored as ``<name>.prototxt``.  Every ``error_<name>(caffe, L, P)``
must raise; the class name of the exception is stored in errors.json.
Nothing here may depend on which implementation runs it.
"""
import numpy as np


# ---------------------------------------------------------------- 01-learning-lenet
def _lenet(caffe, L, P, lmdb, batch_size):
    # the notebook's own lenet(): NetSpec names, LMDB Data with a scale transform
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type='xavier'))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type='xavier'))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def case_lenet_train(caffe, L, P):
    return _lenet(caffe, L, P, 'mnist/mnist_train_lmdb', 64)


def case_lenet_test(caffe, L, P):
    return _lenet(caffe, L, P, 'mnist/mnist_test_lmdb', 100)


# ---------------------------------------------------------------- examples/pycaffe/caffenet.py
def _caffenet(caffe, L, P, lmdb, batch_size=256, include_acc=False):
    def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                             group=group)
        return conv, L.ReLU(conv, in_place=True)

    def fc_relu(bottom, nout):
        fc = L.InnerProduct(bottom, num_output=nout)
        return fc, L.ReLU(fc, in_place=True)

    def max_pool(bottom, ks, stride=1):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    data, label = L.Data(source=lmdb, backend=P.Data.LMDB, batch_size=batch_size, ntop=2,
                         transform_param=dict(crop_size=227, mean_value=[104, 117, 123],
                                              mirror=True))
    conv1, relu1 = conv_relu(data, 11, 96, stride=4)
    pool1 = max_pool(relu1, 3, stride=2)
    norm1 = L.LRN(pool1, local_size=5, alpha=1e-4, beta=0.75)
    conv2, relu2 = conv_relu(norm1, 5, 256, pad=2, group=2)
    pool2 = max_pool(relu2, 3, stride=2)
    norm2 = L.LRN(pool2, local_size=5, alpha=1e-4, beta=0.75)
    conv3, relu3 = conv_relu(norm2, 3, 384, pad=1)
    conv4, relu4 = conv_relu(relu3, 3, 384, pad=1, group=2)
    conv5, relu5 = conv_relu(relu4, 3, 256, pad=1, group=2)
    pool5 = max_pool(relu5, 3, stride=2)
    fc6, relu6 = fc_relu(pool5, 4096)
    drop6 = L.Dropout(relu6, in_place=True)
    fc7, relu7 = fc_relu(drop6, 4096)
    drop7 = L.Dropout(relu7, in_place=True)
    fc8 = L.InnerProduct(drop7, num_output=1000)
    loss = L.SoftmaxWithLoss(fc8, label)
    if include_acc:
        acc = L.Accuracy(fc8, label)
        return caffe.to_proto(loss, acc)
    return caffe.to_proto(loss)


def case_caffenet_train(caffe, L, P):
    # anonymous net: every name generated (Convolution1..5, ReLU1..7, ...)
    return _caffenet(caffe, L, P, '/path/to/caffe-train-lmdb')


def case_caffenet_test(caffe, L, P):
    return _caffenet(caffe, L, P, '/path/to/caffe-val-lmdb', batch_size=50, include_acc=True)


# ---------------------------------------------------------------- anonymous nets, Top.to_proto
def case_anonymous_small(caffe, L, P):
    data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    label = L.Input(shape=[dict(dim=[2])])
    conv = L.Convolution(data, kernel_size=3, num_output=4, pad=1,
                         weight_filler=dict(type='gaussian', std=0.1),
                         bias_filler=dict(type='constant', value=0.2))
    relu = L.ReLU(conv, in_place=True)
    pool = L.Pooling(relu, pool=P.Pooling.AVE, kernel_size=2, stride=2)
    ip = L.InnerProduct(pool, num_output=5, weight_filler=dict(type='xavier'))
    loss = L.SoftmaxWithLoss(ip, label)
    return loss.to_proto()


def case_anonymous_shared_input(caffe, L, P):
    # one bottom feeding several layers; to_proto of several tops, some reached twice
    x = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    a = L.ReLU(x)
    b = L.Sigmoid(x)
    c = L.Eltwise(a, b, operation=P.Eltwise.PROD)
    d = L.Eltwise(c, a, b, operation=P.Eltwise.SUM, coeff=[1, -1, 0.5])
    return caffe.to_proto(d, c, b)


def case_mixed_names(caffe, L, P):
    # named and unnamed tops together; the auto counter is per type
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 6, 6]))
    conv = L.Convolution(n.data, kernel_size=3, num_output=2)
    n.act = L.ReLU(L.Convolution(L.ReLU(conv), kernel_size=1, num_output=2))
    n['conv/out 3x3'] = L.Convolution(n.act, kernel_size=1, num_output=3)
    n.again = n['conv/out 3x3']          # same top under a second name: the last name wins
    n.tail = L.TanH(L.ReLU(n.again, in_place=True))
    return n.to_proto()


# ---------------------------------------------------------------- ntop
def case_ntop(caffe, L, P):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6, 3, 3]))
    n.a, n.b, n.c = L.Slice(n.data, slice_param=dict(axis=1, slice_point=[2, 4]), ntop=3)
    n.cat = L.Concat(n.c, n.a)
    n.silence = L.Silence(n.b, ntop=0)
    part1, part2 = L.Slice(n.cat, ntop=2, axis=1)
    n.prod = L.Eltwise(part1, part2)
    L.Silence(part2, ntop=0)             # never reached from an assigned top: not in the net
    return n.to_proto()


def case_ntop_anonymous(caffe, L, P):
    x = L.Input(shape=dict(dim=[2, 4]))
    t1, t2 = L.Slice(x, ntop=2, axis=1)
    L.Silence(t1, ntop=0)                # a Function: to_proto takes only Tops
    return caffe.to_proto(L.Sigmoid(t2), L.TanH(t1))


def case_ntop_partially_named(caffe, L, P):
    # a 3-top layer with only its second top named: its layer takes the first top's auto-name
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    t0, t1, t2 = L.Slice(n.data, ntop=3, axis=1)
    n.mid = t1
    n.out = L.Concat(t2, t0)
    return n.to_proto()


# ---------------------------------------------------------------- param specs, phases, LayerParameter fields
def case_params_and_phases(caffe, L, P):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source='train_lmdb', backend=P.Data.LMDB, batch_size=32, ntop=2,
                             include=dict(phase=caffe.TRAIN),
                             transform_param=dict(mirror=True, crop_size=24,
                                                  mean_file='mean.binaryproto'))
    n['data'], n['label'] = L.Data(source='test_lmdb', backend=P.Data.LMDB, batch_size=10,
                                   ntop=2, include=dict(phase=caffe.TEST),
                                   transform_param=dict(crop_size=24,
                                                        mean_file='mean.binaryproto'))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=5,
                           param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                           weight_filler=dict(type='gaussian', std=0.01),
                           bias_filler=dict(type='constant', value=0))
    n.fc = L.InnerProduct(n.conv, num_output=10, param=dict(name='shared_w', lr_mult=0),
                          bias_term=False)
    n.loss = L.SoftmaxWithLoss(n.fc, n.label, loss_weight=0.5,
                               loss_param=dict(ignore_label=255, normalization=P.Loss.VALID))
    n.acc = L.Accuracy(n.fc, n.label, include=[dict(phase=caffe.TEST)],
                       accuracy_param=dict(top_k=1))
    n.acc5 = L.Accuracy(n.fc, n.label, top_k=5,
                        include=[dict(phase=caffe.TEST, stage=['val', 'full'], min_level=1)],
                        exclude=dict(not_stage='quick'))
    return n.to_proto()


def case_layer_fields(caffe, L, P):
    # keywords that fall back to the LayerParameter, and the odd ones
    n = caffe.NetSpec()
    n.data = L.Input(shape=[dict(dim=[1, 3, 4, 4]), dict(dim=[1])], ntop=1)
    n.conv = L.Convolution(n.data, name='explicit_conv', num_output=2, kernel_size=[3, 1],
                           stride=[1, 2], pad=[1, 0], dilation=1, engine=P.Convolution.CAFFE)
    n.loss = L.EuclideanLoss(n.conv, n.conv, propagate_down=[True, False], loss_weight=[2])
    n.extra = L.Power(n.conv, power=2.0, scale=0.5, shift=-1.5, top='also_this')
    n.phased = L.Sigmoid(n.extra, phase=caffe.TEST)
    return n.to_proto()


# ---------------------------------------------------------------- nested messages, repeated fields, enums
def case_nested_and_repeated(caffe, L, P):
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(
        shape=[dict(dim=[4, 3, 10, 10]), dict(dim=[4, 1])],
        data_filler=[dict(type='gaussian', std=0.25), dict(type='uniform', min=0, max=9)],
        ntop=2)
    n.hdf = L.HDF5Data(hdf5_data_param=dict(source='list.txt', batch_size=4, shuffle=True))
    n.py1, n.py2 = L.Python(n.data, module='my_module', layer='MyLayer',
                            param_str=str(dict(split='train', seed=1337)), ntop=2)
    n.resh = L.Reshape(n.data, reshape_param=dict(shape=dict(dim=[0, -1]), axis=0, num_axes=-1))
    n.bn = L.BatchNorm(n.data, use_global_stats=False,
                       param=[dict(lr_mult=0), dict(lr_mult=0), dict(lr_mult=0)])
    n.sc = L.Scale(n.bn, bias_term=True, in_place=True, filler=dict(value=1.5))
    n.prelu = L.PReLU(n.sc, channel_shared=False, filler=dict(type='constant', value=0.25))
    n.lrn = L.LRN(n.prelu, local_size=3, alpha=5e-5, beta=0.75, norm_region=P.LRN.WITHIN_CHANNEL)
    n.pool = L.Pooling(n.lrn, pool=P.Pooling.STOCHASTIC, kernel_size=3, stride=2, pad=1)
    n.gpool = L.Pooling(n.pool, pool=P.Pooling.AVE, global_pooling=True)
    n.drop = L.Dropout(n.gpool, dropout_ratio=0.3, in_place=True)
    n.arg = L.ArgMax(n.drop, top_k=2, out_max_val=True)
    n.thr = L.Threshold(n.arg, threshold=0.1)
    n.elt = L.Eltwise(n.thr, n.thr, operation=P.Eltwise.MAX, stable_prod_grad=False)
    n.leaky = L.ReLU(n.elt, negative_slope=0.1)
    n.mvn = L.MVN(n.leaky, normalize_variance=False, across_channels=True, eps=1e-9)
    return n.to_proto()


def case_enum_names(caffe, L, P):
    # enum values given by name: protobuf's upb backend (pycaffe's and netlib's default)
    # takes them; protobuf's pure-Python backend would raise TypeError
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source='db', backend='LMDB', batch_size=2, ntop=2,
                             include=dict(phase='TEST'))
    n.pool = L.Pooling(n.data, pool='AVE', kernel_size=2, engine='CAFFE', round_mode='FLOOR')
    n.lrn = L.LRN(n.pool, norm_region='WITHIN_CHANNEL')
    n.elt = L.Eltwise(n.lrn, n.pool, operation='MAX')
    n.conv = L.Convolution(n.elt, num_output=1, kernel_size=1,
                           weight_filler=dict(type='msra', variance_norm='AVERAGE'))
    return n.to_proto()


def case_fcn_style(caffe, L, P):
    # FCN-style: learned upsampling through convolution_param, then Crop by hand
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 64, 64]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=8, pad=100,
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.score = L.Convolution(n.pool1, num_output=21, kernel_size=1, pad=0)
    n.upscore = L.Deconvolution(n.score, convolution_param=dict(num_output=21, kernel_size=4,
                                                                stride=2, bias_term=False),
                                param=[dict(lr_mult=0)])
    n.crop = L.Crop(n.upscore, n.data, crop_param=dict(axis=2, offset=[19, 19]))
    return n.to_proto()


def case_numpy_values(caffe, L, P):
    # NumPy scalars as values (what coord_map.crop passes)
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[int(d) for d in np.array([1, 2, 5, 5])]))
    n.crop = L.Crop(n.data, n.data, crop_param=dict(axis=np.int64(2),
                                                   offset=list(np.array([1, 0]).astype(int))))
    n.pw = L.Power(n.crop, scale=np.float32(0.1), shift=np.float64(1.0 / 3))
    return n.to_proto()


# ---------------------------------------------------------------- misuse: the exception classes
def error_input_not_a_top(caffe, L, P):
    L.ReLU('data')


def error_deconvolution_plain_keywords(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.Deconvolution(x, num_output=2, kernel_size=2, stride=2))


def error_unknown_field(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.Convolution(x, num_output=2, kernel_size=2, no_such_field=3))


def error_empty_list(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.Convolution(x, num_output=2, kernel_size=[]))


def error_tuple_for_repeated(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.Convolution(x, num_output=2, kernel_size=(3, 3)))


def error_list_for_scalar(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.Convolution(x, num_output=[2], kernel_size=3))


def error_bad_enum_name(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.Pooling(x, pool='MEDIAN', kernel_size=2))


def error_unknown_param_constant(caffe, L, P):
    return P.Pooling.MEDIAN


def error_unknown_param_type(caffe, L, P):
    return P.NoSuchLayer.MAX


def error_missing_netspec_name(caffe, L, P):
    n = caffe.NetSpec()
    return n['missing']


def error_function_in_to_proto(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 2]))
    caffe.to_proto(L.Silence(x, ntop=0))


def error_float_for_int(caffe, L, P):
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    caffe.to_proto(L.InnerProduct(x, num_output=2.0))


CASES = sorted(k[len('case_'):] for k in list(globals()) if k.startswith('case_'))
ERRORS = sorted(k[len('error_'):] for k in list(globals()) if k.startswith('error_'))

# P constants recorded in the goldens: (type, name)
PARAM_CONSTANTS = [('Pooling', 'MAX'), ('Pooling', 'AVE'), ('Pooling', 'STOCHASTIC'),
                   ('Data', 'LEVELDB'), ('Data', 'LMDB'), ('Eltwise', 'PROD'), ('Eltwise', 'SUM'),
                   ('Eltwise', 'MAX'), ('LRN', 'ACROSS_CHANNELS'), ('LRN', 'WITHIN_CHANNEL'),
                   ('Convolution', 'CAFFE'), ('Convolution', 'CUDNN'), ('Loss', 'VALID'),
                   ('Loss', 'BATCH_SIZE'), ('Reduction', 'MEAN'), ('Filler', 'AVERAGE'), ('Pooling', 'FLOOR'),
                   ('Pooling', 'DEFAULT'), ('HingeLoss', 'L2')]
