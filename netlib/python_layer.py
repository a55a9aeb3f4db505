"""Python layers: ``type: "Python"`` with ``python_param { module layer param_str }``.

As in Caffe, the module is imported by name (from the current directory and
``sys.path``/PYTHONPATH) and the class is instantiated with the layer's
LayerParameter.  The class subclasses :class:`netlib.Layer`; before
``setup`` it sees ``self.param_str``, ``self.phase`` (0 TRAIN, 1 TEST),
``self.layer_param`` and ``self.blobs`` (``add_blob(*shape)`` makes a
parameter blob that the solver trains, shares and snapshots like any other).
Its hooks are pycaffe's: ``setup``, ``reshape``, ``forward``, ``backward``.
Modules written for pycaffe (``import caffe``, ``class L(caffe.Layer)``) load
unchanged: before importing one, netlib makes ``caffe`` resolve to netlib in
this process (:mod:`netlib.compat`).
An exception raised by the user's code becomes a netlib error naming the
layer, the module and the class, chained to the user's own traceback.

**Trust.** A model file can name any importable module, and importing runs
its code.  Python layers are allowed by default, as in Caffe; turn them off
with ``netlib.Net(..., allow_python_layers=False)``, with
:func:`set_python_layers_allowed` for the whole process (solvers build their
nets through it), or ``netlib train --forbid_python_layers``.  Then building
a net with a Python layer raises before anything is imported.  Weights,
solver states, mean files and databases never run code in any mode.
"""
import importlib
import os
import sys

from .errors import ConfigError, LayerError

_ALLOWED = [True]


class PythonLayerForbiddenError(ConfigError):
    """A net names a Python layer while Python layers are not allowed."""


def set_python_layers_allowed(allowed):
    """Allow (True, the default) or forbid Python layers in nets built from now on."""
    _ALLOWED[0] = bool(allowed)


def python_layers_allowed():
    return _ALLOWED[0]


def _import(module_name):
    """Import ``module_name`` with the current directory on the path, and
    ``caffe`` resolving to netlib (:mod:`netlib.compat`), so modules written
    for pycaffe (``import caffe``, ``class L(caffe.Layer)``) load unchanged."""
    from . import compat
    try:
        compat.install()
    except ConfigError:
        pass        # the real pycaffe is imported here; the class check below explains
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:  # pragma: no cover - the user's module changed sys.path
                pass


def create_python_layer(layer_param, phase=None, dtype=None, xp=None, allowed=None):
    """The user's layer object for a ``type: "Python"`` LayerParameter."""
    from .layer import Layer
    p = layer_param.python_param
    where = "layer %r (type Python, module %r, class %r)" % (layer_param.name, p.module, p.layer)
    if not (python_layers_allowed() if allowed is None else allowed):
        raise PythonLayerForbiddenError("%s: Python layers are not allowed here (allow_python_layers=False or "
                                        "--forbid_python_layers); module %r was not imported" % (where, p.module))
    if not p.module or not p.layer:
        raise ConfigError("%s: python_param needs both 'module' and 'layer'" % where)
    try:
        module = _import(p.module)
    except ImportError as exc:
        raise ConfigError("%s: cannot import module %r (is its folder the current directory or on "
                          "PYTHONPATH?): %s" % (where, p.module, exc)) from exc
    except Exception as exc:
        raise LayerError("%s: importing module %r failed: %s: %s" % (where, p.module, type(exc).__name__, exc)) \
            from exc
    cls = getattr(module, p.layer, None)
    if cls is None:
        raise ConfigError("%s: module %r (%s) has no attribute %r"
                          % (where, p.module, getattr(module, "__file__", "?"), p.layer))
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        hint = ""
        if isinstance(cls, type) and any(k.__module__.split(".")[0] == "caffe" for k in cls.__mro__):
            hint = ("; it subclasses the real pycaffe's caffe.Layer, imported in this process before netlib "
                    "could stand in for 'caffe'")
        raise ConfigError("%s: %s.%s must be a class that subclasses netlib.Layer (caffe.Layer)%s"
                          % (where, p.module, p.layer, hint))
    try:
        layer = cls(layer_param, phase=phase, **({"dtype": dtype} if dtype is not None else {}), xp=xp)
    except Exception as exc:
        raise LayerError("%s: creating the layer failed: %s: %s" % (where, type(exc).__name__, exc)) from exc
    layer.type = "Python"
    layer.python_origin = "%s.%s" % (p.module, p.layer)
    return layer
