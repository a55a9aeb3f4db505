"""netlib: a Caffe-compatible neural network framework in Python.

``import netlib as caffe`` gives pycaffe's surface: ``Net``, ``TRAIN``/``TEST``,
the solvers and ``get_solver``, ``Layer`` for Python layers, ``io``
(pycaffe's caffe.io), ``NetSpec`` with ``layers``/``params``, ``Classifier``,
``Detector``, ``draw``, ``coord_map``, logging, ``Timer`` and the solver
count/rank helpers.  ``netlib run script.py`` runs a script that says
``import caffe`` unchanged (see :mod:`netlib.compat`).  Heavy parts load on
first use, so a net-only program never imports the solvers or NetSpec.
"""
import importlib

from .proto import caffe_pb2
from .proto.caffe_pb2 import TRAIN, TEST  # noqa: F401
from . import proto  # noqa: F401
from .backend import set_mode_cpu, set_mode_gpu, set_device  # noqa: F401
from .blob import Blob  # noqa: F401
from .errors import (NetlibError, ParseError, ConfigError, UnknownLayerTypeError,  # noqa: F401
                     LayerError, ShapeError, WeightsError, SolverError)
from .layer import Layer, register_layer, layer_type_list  # noqa: F401
from .net import Net  # noqa: F401
from .random import set_random_seed  # noqa: F401
from .python_layer import set_python_layers_allowed  # noqa: F401
from .runtime import (init_log, log, Timer, solver_count, set_solver_count, solver_rank,  # noqa: F401
                      set_solver_rank, set_multiprocess)
from .nccl import has_nccl, NCCL  # noqa: F401

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself), imported on first use.
_LAZY = {
    "get_solver": ("solver", "get_solver"), "Solver": ("solver", "Solver"),
    "SGDSolver": ("solver", "SGDSolver"), "NesterovSolver": ("solver", "NesterovSolver"),
    "AdaGradSolver": ("solver", "AdaGradSolver"), "RMSPropSolver": ("solver", "RMSPropSolver"),
    "AdaDeltaSolver": ("solver", "AdaDeltaSolver"), "AdamSolver": ("solver", "AdamSolver"),
    "io": ("io", None), "draw": ("draw", None), "net_spec": ("net_spec", None),
    "coord_map": ("coord_map", None), "classifier": ("classifier", None), "detector": ("detector", None),
    "NetSpec": ("net_spec", "NetSpec"), "layers": ("net_spec", "layers"), "params": ("net_spec", "params"),
    "to_proto": ("net_spec", "to_proto"),
    "Classifier": ("classifier", "Classifier"), "Detector": ("detector", "Detector"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module("." + module_name, __name__)
        return module if attr is None else getattr(module, attr)
    raise AttributeError("module 'netlib' has no attribute %r" % name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
