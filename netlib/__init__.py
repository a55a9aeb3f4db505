"""netlib: a Caffe-compatible neural network framework in Python.

``import netlib as caffe`` gives the pycaffe surface: ``Net``, ``TRAIN``/``TEST``,
the solvers, ``Layer`` for Python layers, ``set_random_seed`` ...
"""
from .proto import caffe_pb2
from .proto.caffe_pb2 import TRAIN, TEST  # noqa: F401
from .backend import set_mode_cpu, set_mode_gpu, set_device  # noqa: F401
from .blob import Blob  # noqa: F401
from .errors import (NetlibError, ParseError, ConfigError, UnknownLayerTypeError,  # noqa: F401
                     LayerError, ShapeError, WeightsError, SolverError)
from .layer import Layer, register_layer, layer_type_list  # noqa: F401
from .net import Net  # noqa: F401
from .random import set_random_seed  # noqa: F401
from .python_layer import set_python_layers_allowed  # noqa: F401

__version__ = "0.1.0"

_SOLVER_NAMES = ("get_solver", "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
                 "RMSPropSolver", "AdaDeltaSolver", "AdamSolver")


def __getattr__(name):
    # The solvers load on first use: a net-only program never imports them.
    if name in _SOLVER_NAMES:
        from . import solver
        return getattr(solver, name)
    raise AttributeError("module 'netlib' has no attribute %r" % name)
