"""Built-in layers, one module per family; importing registers them."""
import importlib

_FAMILIES = ("data", "vision", "neuron", "common", "loss", "normalization")

for _name in _FAMILIES:
    try:
        importlib.import_module(__name__ + "." + _name)
    except ModuleNotFoundError as _exc:  # a family not written yet
        if _exc.name != __name__ + "." + _name:
            raise
