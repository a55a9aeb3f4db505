"""Deploy nets of the real model zoo build with Caffe's exact blob names and shapes.

../shared/reference/golden/model_shapes.json was written by real Caffe
(net.blobs order, split blobs included, inputs, alphabetical outputs, layer
names and types).  Nets whose layer types are all registered must match it
exactly; nets that need types of a later issue are skipped by name.
"""
import json
import os

import pytest

import netlib
from conftest import SHARED

SHAPES = os.path.join(SHARED, "reference", "golden", "model_shapes.json")
MODELS = json.load(open(SHAPES))["models"] if os.path.exists(SHAPES) else {}


@pytest.mark.parametrize("model", sorted(MODELS) or ["<no model_shapes.json>"])
def test_model_blob_shapes(model):
    if not MODELS:
        pytest.skip("needs ../shared/reference/golden/model_shapes.json")
    ref = MODELS[model]
    missing = sorted({t for _, t in ref["layers"]} - set(netlib.layer_type_list()))
    if missing:
        pytest.skip("needs layer types of a later issue: %s" % ", ".join(missing))
    net = netlib.Net(os.path.join(SHARED, "reference", "models", model), netlib.TEST)
    assert [[n, l.type] for n, l in zip(net.layer_names, net.layers)] == ref["layers"]
    assert [[n, list(b.shape)] for n, b in net.blobs.items()] == ref["blobs"]
    assert net.inputs == ref["inputs"]
    assert net.outputs == ref["outputs"]


def test_the_models_real_caffe_refuses_parse_as_fork_extensions():
    """Real Caffe could not read these (DenseNet's ceil_mode, the SSD fork's
    layers); netlib's schema reads them (tests of their layers are in
    test_fork_models.py)."""
    if not MODELS:
        pytest.skip("needs ../shared/reference/golden/model_shapes.json")
    refused = json.load(open(SHAPES))["refused"]
    assert sorted(refused) == ["densenet_121/DenseNet_121.prototxt", "mobilenet_ssd_voc/MobileNetSSD_deploy.prototxt"]
    for model in refused:
        param = netlib.files.read_net_param(os.path.join(SHARED, "reference", "models", model))
        fields = {f.name for layer in param.layer for f, _ in layer.ListFields()}
        fields |= {f.name for layer in param.layer if layer.HasField("pooling_param")
                   for f, _ in layer.pooling_param.ListFields()}
        assert fields & {"ceil_mode", "permute_param", "prior_box_param", "detection_output_param"}
