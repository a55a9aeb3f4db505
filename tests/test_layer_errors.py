"""Bad layer parameters end in a typed error that names the layer (and its type).

One net per case, built with netlib.Net: the message must name the layer and
say what is wrong, and the error must be one of netlib's typed errors."""
import pytest

import netlib
from netlib.errors import ConfigError, ShapeError

INPUT = 'layer { name: "%s" type: "Input" top: "%s" input_param { shape { %s } } }'


def inputs(**shapes):
    return "\n".join(INPUT % (n, n, " ".join("dim: %d" % d for d in s)) for n, s in shapes.items())


CASES = {
    "lstm_without_cont": (
        inputs(x=(3, 2, 4)) + 'layer { name: "lstm1" type: "LSTM" bottom: "x" top: "h" '
                              'recurrent_param { num_output: 5 } }',
        ConfigError, "lstm1"),
    "lstm_mismatched_T_N": (
        inputs(x=(3, 2, 4), cont=(3, 3)) + 'layer { name: "lstm2" type: "LSTM" bottom: "x" bottom: "cont" '
                                           'top: "h" recurrent_param { num_output: 5 } }',
        ShapeError, "lstm2"),
    "priorbox_without_min_size": (
        inputs(f=(1, 4, 2, 2), img=(1, 3, 30, 30)) + 'layer { name: "pb" type: "PriorBox" bottom: "f" '
                                                      'bottom: "img" top: "p" prior_box_param { flip: true } }',
        ConfigError, "min_size"),
    "permute_repeated_axis": (
        inputs(x=(1, 2, 3, 4)) + 'layer { name: "perm" type: "Permute" bottom: "x" top: "y" '
                                 'permute_param { order: 0 order: 2 order: 2 order: 1 } }',
        ConfigError, "perm"),
    "detection_output_zero_classes": (
        inputs(loc=(1, 8), conf=(1, 4), prior=(1, 2, 8)) +
        'layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "d" '
        'detection_output_param { num_classes: 0 } }',
        ConfigError, "det"),
    "conv_kernel_larger_than_padded_input": (
        inputs(x=(1, 1, 4, 4)) + 'layer { name: "bigconv" type: "Convolution" bottom: "x" top: "y" '
                                 'convolution_param { num_output: 2 kernel_size: 7 pad: 1 } }',
        ShapeError, "bigconv"),
    "pool_kernel_larger_than_padded_input": (
        inputs(x=(1, 1, 4, 4)) + 'layer { name: "bigpool" type: "Pooling" bottom: "x" top: "y" '
                                 'pooling_param { kernel_size: 9 pad: 1 pool: MAX } }',
        ShapeError, "bigpool"),
    "scale_mismatched_shapes": (
        inputs(x=(2, 3, 4), s=(4,)) + 'layer { name: "sc" type: "Scale" bottom: "x" bottom: "s" top: "y" }',
        ShapeError, "sc"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_parameters_are_typed_errors_naming_the_layer(case):
    text, error, fragment = CASES[case]
    with pytest.raises(error) as info:
        netlib.Net('name: "bad"\n' + text, netlib.TEST)
    message = str(info.value)
    layer_name = text.rsplit('layer { name: "', 1)[1].split('"', 1)[0]
    assert "'%s'" % layer_name in message or '"%s"' % layer_name in message, message
    assert fragment in message, message
