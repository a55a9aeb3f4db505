"""pycaffe's process-wide helpers: logging, Timer, solver count/rank, NCCL.

``init_log``/``log`` route the ``"netlib"`` logger (Caffe's glog lines) to
stderr.  ``solver_count``/``solver_rank``/``set_multiprocess`` hold the state
pycaffe's multi-GPU ``train.py`` sets.  Under ``mpirun`` netlib sets them
itself from MPI (:mod:`netlib.parallel`) and trains data-parallel; set by
hand, they shard the TRAIN data readers as in Caffe (rank r of N keeps the
read positions p with p % N == r).  pycaffe's ``NCCL`` and ``has_nccl``
live in :mod:`netlib.nccl` (several GPUs of one node).
"""
import logging
import time

from .errors import ConfigError

log_ = logging.getLogger("netlib")

# glog's minloglevel numbers: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.
_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}
_handler = [None]


def init_log(level=0, stderr=True):
    """pycaffe's ``caffe.init_log([level[, stderr]])``.

    Shows netlib's log lines (glog format) at ``level`` and above
    (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) on stderr; ``stderr=False`` stops
    showing them.  Calling it again replaces the previous setting.
    """
    from .tools.cli import GlogFormatter
    if level not in _GLOG_LEVELS:
        raise ConfigError("init_log: level must be 0 (INFO), 1 (WARNING), 2 (ERROR) or 3 (FATAL), got %r"
                          % (level,))
    if _handler[0] is not None:
        log_.removeHandler(_handler[0])
        _handler[0] = None
    log_.setLevel(_GLOG_LEVELS[level])
    if stderr:
        handler = logging.StreamHandler()
        handler.setFormatter(GlogFormatter())
        log_.addHandler(handler)
        log_.propagate = False
        _handler[0] = handler


def log(message):
    """pycaffe's ``caffe.log(message)``: one INFO line in Caffe's log."""
    log_.info("%s", message)


class Timer:
    """pycaffe's ``caffe.Timer``: ``start()``, ``stop()``, ``ms`` (elapsed milliseconds).

    ``ms`` of a running timer counts up to now, as Caffe's ``Timer::MilliSeconds``
    (which stops it first); ``seconds`` is the same in seconds.
    """

    def __init__(self):
        self._start = None
        self._elapsed = 0.0
        self.running = False

    def start(self):
        self._start = time.perf_counter()
        self.running = True

    def stop(self):
        if self.running:
            self._elapsed = time.perf_counter() - self._start
            self.running = False

    @property
    def ms(self):
        self.stop()
        return self._elapsed * 1000.0

    @property
    def seconds(self):
        self.stop()
        return self._elapsed


_state = {"solver_count": 1, "solver_rank": 0, "multiprocess": False}


def solver_count():
    """How many solvers train together (the MPI size under mpirun, else 1)."""
    return _state["solver_count"]


def set_solver_count(count):
    """Set the number of solvers training together (the TRAIN readers shard by it)."""
    if int(count) < 1:
        raise ConfigError("set_solver_count: count must be >= 1, got %r" % (count,))
    _state["solver_count"] = int(count)


def solver_rank():
    """This process's solver rank (0 is the one that logs, tests and snapshots)."""
    return _state["solver_rank"]


def set_solver_rank(rank):
    """Set this process's solver rank."""
    if int(rank) < 0:
        raise ConfigError("set_solver_rank: rank must be >= 0, got %r" % (rank,))
    _state["solver_rank"] = int(rank)


def set_multiprocess(multiprocess):
    """pycaffe's flag for one solver per process (as train.py sets it)."""
    _state["multiprocess"] = bool(multiprocess)


def multiprocess():
    return _state["multiprocess"]
