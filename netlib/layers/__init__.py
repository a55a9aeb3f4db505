"""Built-in layers, one module per family; importing them registers every type."""
from . import data, vision, neuron, common, loss, normalization  # noqa: F401
