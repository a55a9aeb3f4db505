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


def test_refused_models_name_the_fork_field():
    if not MODELS:
        pytest.skip("needs ../shared/reference/golden/model_shapes.json")
    refused = json.load(open(SHAPES))["refused"]
    assert refused
    for model in refused:
        with pytest.raises(netlib.ParseError) as err:
            netlib.Net(os.path.join(SHARED, "reference", "models", model), netlib.TEST)
        text = str(err.value)
        assert model.split("/")[-1] in text and ("ceil_mode" in text or "permute_param" in text)
