"""coord_map scripts run both by real pycaffe (tools/make_netspec_goldens.py) and by netlib.

Every ``case_<name>(caffe, L, P, cm)`` (``cm`` = the coord_map module of the
implementation) returns a dict {label: value}; a value is a coordinate map
``(axis, a, b)``, a NetParameter (stored as its prototxt text), or an
exception class name (a string, from ``_raises``).  ``encode`` makes that
JSON-able the same way for both implementations.  Fixed numbers stand where
pycaffe's own test_coord_map.py draws random pads/offsets.
"""
import numpy as np


def coord_net_spec(caffe, L, P, ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    # conv -> pool -> deconv on a 100x100 input (the pattern of pycaffe's test_coord_map.py)
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    if isinstance(dstride, list):
        deconv_ks = [s * 2 for s in dstride]
    else:
        deconv_ks = dstride * 2
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=deconv_ks, stride=dstride,
                               pad=dpad)
    return n


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the class is the result
        return type(e).__name__
    return 'no exception'


def case_conv_pool_deconv(caffe, L, P, cm):
    out = {}
    n = coord_net_spec(caffe, L, P)
    out['2x'] = cm.coord_map_from_to(n.deconv, n.data)
    n = coord_net_spec(caffe, L, P, pool=4, dstride=4)
    out['4x'] = cm.coord_map_from_to(n.deconv, n.data)
    out['4x_backward'] = cm.coord_map_from_to(n.data, n.deconv)
    out['conv_to_data'] = cm.coord_map_from_to(n.conv, n.data)
    out['pool_to_data'] = cm.coord_map_from_to(n.pool, n.data)
    out['data_to_pool'] = cm.coord_map_from_to(n.data, n.pool)
    out['self'] = cm.coord_map_from_to(n.pool, n.pool)
    return out


def case_pass_through(caffe, L, P, cm):
    n = coord_net_spec(caffe, L, P)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    n.drop = L.Dropout(n.conv1x1, in_place=True)
    n.bn = L.BatchNorm(n.drop)
    n.elt = L.Eltwise(n.bn, n.relu)
    return {name: cm.coord_map_from_to(getattr(n, name), n.data)
            for name in ['deconv', 'relu', 'conv1x1', 'drop', 'bn', 'elt']}


def case_padding(caffe, L, P, cm):
    out = {}
    for pad in [0, 3, 7]:
        n = coord_net_spec(caffe, L, P, pad=pad)
        out['conv_pad%d' % pad] = cm.coord_map_from_to(n.deconv, n.data)
        n = coord_net_spec(caffe, L, P, dpad=pad)
        out['deconv_pad%d' % pad] = cm.coord_map_from_to(n.deconv, n.data)
        n = coord_net_spec(caffe, L, P, pad=pad, dpad=pad)
        out['both_pad%d' % pad] = cm.coord_map_from_to(n.deconv, n.data)
    return out


def case_multi_conv(caffe, L, P, cm):
    n = coord_net_spec(caffe, L, P)
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=10, kernel_size=5,
                                            stride=2, pad=0)
    return {'conv_data': cm.coord_map_from_to(n.conv_data, n.data),
            'conv_aux': cm.coord_map_from_to(n.conv_aux, n.aux)}


def case_rect(caffe, L, P, cm):
    n3x3 = coord_net_spec(caffe, L, P, ks=3, stride=1, pad=0)
    n5x5 = coord_net_spec(caffe, L, P, ks=5, stride=2, pad=10)
    n3x5 = coord_net_spec(caffe, L, P, ks=[3, 5], stride=[1, 2], pad=[0, 10])
    nrect = coord_net_spec(caffe, L, P, ks=[3, 5], stride=[1, 2], pad=[0, 10], dstride=[2, 4])
    return {'3x3': cm.coord_map_from_to(n3x3.deconv, n3x3.data),
            '5x5': cm.coord_map_from_to(n5x5.deconv, n5x5.data),
            '3x5': cm.coord_map_from_to(n3x5.deconv, n3x5.data),
            '3x5_rect_deconv': cm.coord_map_from_to(nrect.deconv, nrect.data)}


def case_nd_conv(caffe, L, P, cm):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1],
                           pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    return {'nd': cm.coord_map_from_to(n.deconv, n.data)}


def case_dilation_and_params_messages(caffe, L, P, cm):
    # convolution_param / crop_param given as messages, dilation, axis
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 50, 50]))
    n.dil = L.Convolution(n.data, num_output=4, kernel_size=3, dilation=2, pad=1)
    n.msg = L.Convolution(n.dil, convolution_param=dict(num_output=4, kernel_size=5, stride=3,
                                                        pad=2))
    n.up = L.Deconvolution(n.msg, convolution_param=dict(num_output=4, kernel_size=6, stride=3,
                                                         pad=1, bias_term=False))
    n.crop = L.Crop(n.up, n.data, crop_param=dict(axis=2, offset=[3, 4]))
    n.crop_plain = L.Crop(n.up, n.data, axis=3, offset=2)
    n.im2col = L.Im2col(n.data, convolution_param=dict(kernel_size=4, stride=2))
    return {'dil': cm.coord_map_from_to(n.dil, n.data),
            'msg': cm.coord_map_from_to(n.msg, n.data),
            'up': cm.coord_map_from_to(n.up, n.data),
            'crop': cm.coord_map_from_to(n.crop, n.data),
            'crop_plain_axis3': _raises(cm.coord_map_from_to, n.crop_plain, n.data),
            'crop_plain_layer': cm.coord_map(n.crop_plain.fn),
            'im2col': cm.coord_map_from_to(n.im2col, n.data),
            'layer_conv': cm.coord_map(n.msg.fn),
            'layer_deconv': cm.coord_map(n.up.fn),
            'layer_crop': cm.coord_map(n.crop.fn),
            'layer_relu': cm.coord_map(L.ReLU(n.data).fn)}


def case_crop_of_crop(caffe, L, P, cm):
    out = {}
    n = coord_net_spec(caffe, L, P)
    out['deconv'] = cm.coord_map_from_to(n.deconv, n.data)
    for offset in [0, 4, 9]:
        n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
        out['crop%d' % offset] = cm.coord_map_from_to(n.crop, n.data)
    return out


def _crop_summary(n, top):
    fn = top.fn
    cp = fn.params['crop_param']
    return {'type': fn.type_name, 'ntop': fn.ntop, 'keys': sorted(fn.params),
            'bottoms': [[k for k, v in n.tops.items() if v is b] for b in fn.inputs],
            'axis': int(cp['axis']), 'offset': [int(o) for o in cp['offset']],
            'offset_is_list': isinstance(cp['offset'], list)}


def case_crop_helper(caffe, L, P, cm):
    out = {}
    n = coord_net_spec(caffe, L, P)
    n.crop = cm.crop(n.deconv, n.data)
    out['identity'] = _crop_summary(n, n.crop)
    n = coord_net_spec(caffe, L, P, pool=4, dstride=4)
    n.crop = cm.crop(n.deconv, n.data)
    out['shift1'] = _crop_summary(n, n.crop)
    n = coord_net_spec(caffe, L, P, ks=[3, 5], stride=1, pad=[0, 2])
    n.crop = cm.crop(n.deconv, n.data)
    out['rect'] = _crop_summary(n, n.crop)
    return out


def _fcn(caffe, L, P, cm):
    # a miniature FCN-8s: pad-100 input conv, three poolings, score + skip fusions + crops
    def conv_relu(bottom, nout, ks=3, stride=1, pad=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                             param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
        return conv, L.ReLU(conv, in_place=True)

    def max_pool(bottom, ks=2, stride=2):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 64, 48]))
    n.conv1, n.relu1 = conv_relu(n.data, 4, pad=100)
    n.pool1 = max_pool(n.relu1)
    n.conv2, n.relu2 = conv_relu(n.pool1, 4)
    n.pool2 = max_pool(n.relu2)
    n.conv3, n.relu3 = conv_relu(n.pool2, 4)
    n.pool3 = max_pool(n.relu3)
    n.fc, n.relu_fc = conv_relu(n.pool3, 8, ks=7, pad=0)
    n.drop = L.Dropout(n.relu_fc, dropout_ratio=0.5, in_place=True)
    n.score_fr = L.Convolution(n.drop, num_output=5, kernel_size=1, pad=0,
                               param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.upscore2 = L.Deconvolution(n.score_fr, convolution_param=dict(num_output=5, kernel_size=4,
                                                                    stride=2, bias_term=False),
                                 param=[dict(lr_mult=0)])
    n.score_pool2 = L.Convolution(n.pool2, num_output=5, kernel_size=1, pad=0)
    n.score_pool2c = cm.crop(n.score_pool2, n.upscore2)
    n.fuse_pool2 = L.Eltwise(n.upscore2, n.score_pool2c, operation=P.Eltwise.SUM)
    n.upscore4 = L.Deconvolution(n.fuse_pool2, convolution_param=dict(num_output=5, kernel_size=8,
                                                                      stride=4, bias_term=False),
                                 param=[dict(lr_mult=0)])
    n.score = cm.crop(n.upscore4, n.data)
    n.label = L.Input(shape=dict(dim=[1, 1, 64, 48]))
    n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return n


def case_fcn(caffe, L, P, cm):
    n = _fcn(caffe, L, P, cm)
    return {'net': n.to_proto(),
            'score_pool2_to_upscore2': cm.coord_map_from_to(n.score_pool2, n.upscore2),
            'upscore4_to_data': cm.coord_map_from_to(n.upscore4, n.data),
            'score_to_data': cm.coord_map_from_to(n.score, n.data),
            'data_to_score_fr': cm.coord_map_from_to(n.data, n.score_fr)}


def case_catches(caffe, L, P, cm):
    out = {}
    n = coord_net_spec(caffe, L, P)
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    out['unconnected'] = _raises(cm.coord_map_from_to, n.ip, n.data)
    out['undefined_layer'] = _raises(cm.coord_map, n.ip.fn)
    n = coord_net_spec(caffe, L, P, pool=3, dstride=2)
    out['scale_mismatch'] = _raises(cm.crop, n.deconv, n.data)
    out['scale_mismatch_map'] = cm.coord_map_from_to(n.deconv, n.data)
    n = coord_net_spec(caffe, L, P, dpad=10)
    out['negative_crop'] = _raises(cm.crop, n.deconv, n.data)
    n = coord_net_spec(caffe, L, P, ks=4)
    out['noninteger_crop'] = _raises(cm.crop, n.deconv, n.data)
    out['noninteger_map'] = cm.coord_map_from_to(n.deconv, n.data)
    m = caffe.NetSpec()
    m.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    m.legacy = L.Convolution(m.data, num_output=1, kernel_size=3, kernel_h=3)
    out['legacy_hw'] = _raises(cm.coord_map, m.legacy.fn)
    m.nokernel = L.Pooling(m.data, global_pooling=True)
    out['no_kernel_size'] = _raises(cm.coord_map, m.nokernel.fn)
    m.c1 = L.Convolution(m.data, num_output=1, kernel_size=3, axis=1)
    m.c2 = L.Convolution(m.c1, num_output=1, kernel_size=3, axis=2)
    out['axis_mismatch'] = _raises(cm.coord_map_from_to, m.c2, m.data)
    out['compose_mismatch'] = _raises(cm.compose, (1, 1, 0), (2, 1, 0))
    return out


def case_pure_functions(caffe, L, P, cm):
    a = np.array([0.5, 2.0])
    b = np.array([1.5, -3.0])
    return {'compose_none_first': cm.compose((None, 1, 0), (2, a, b)),
            'compose_none_second': cm.compose((1, a, b), (None, 1, 0)),
            'compose_same': cm.compose((1, a, b), (1, b, a)),
            'inverse': cm.inverse((1, a, b)),
            'inverse_identity': cm.inverse((None, 1, 0)),
            'pass_list': sorted(cm.PASS_THROUGH_LAYERS)}


def encode(value):
    """JSON-able form of one result value (shared by the tool and the tests)."""
    if isinstance(value, tuple) and len(value) == 3:
        ax, a, b = value
        return {'axis': None if ax is None else int(ax),
                'a': np.asarray(a, dtype=float).tolist(),
                'b': np.asarray(b, dtype=float).tolist()}
    if hasattr(value, 'layer'):  # a NetParameter
        return {'prototxt': str(value)}
    return value


CASES = sorted(k[len('case_'):] for k in list(globals()) if k.startswith('case_'))
