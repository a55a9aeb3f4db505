"""Built-in layers, one module per family; importing them registers every type.

The prefetching data layers (Data, ImageData, WindowData) live in the data
pipeline package, :mod:`netlib.data`; the SSD fork's layers in
:mod:`netlib.detection`.
"""
from . import data, vision, pooling, neuron, common, scale  # noqa: F401
from . import structural, loss, normalization, recurrent, depthwise  # noqa: F401
from ..data import layers as _data_layers, window as _window_layer  # noqa: F401
from .. import detection as _detection  # noqa: F401  (SSD fork: Permute, PriorBox, Normalize, DetectionOutput)
