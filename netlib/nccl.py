"""Data-parallel training on several GPUs of one node over NCCL (CuPy's
``cupy.cuda.nccl``), with the machinery of :mod:`netlib.parallel`.

Two ways in, as in BVLC Caffe:

* ``netlib train --solver S --gpu 0,1`` (no ``mpirun``): the command starts
  one process per listed GPU (``python -m netlib train`` with the same
  arguments), itself rank 0; rank r trains on the r-th id.  What is
  synchronised and when is exactly the MPI run's (:class:`parallel.GradientSync`:
  the net hash check, rank 0's weights and reader state broadcast, sharded
  TRAIN readers, one packed gradient buffer all-reduced and scaled by 1/N
  per iteration, rank 0 alone logging, testing and snapshotting), only the
  transport is NCCL on device buffers instead of MPI on host ones.
* pycaffe's script API (Caffe's ``python/train.py``), one process per GPU::

      uid = caffe.NCCL.new_uid()                  # in the parent, passed to each process
      caffe.set_device(gpu); caffe.set_mode_gpu()
      caffe.set_solver_count(n); caffe.set_solver_rank(rank); caffe.set_multiprocess(True)
      solver = caffe.SGDSolver(path)
      nccl = caffe.NCCL(solver, uid)
      nccl.bcast()                                # rank 0's weights everywhere
      solver.add_callback(nccl)                   # all-reduce before each update
      if solver.param.layer_wise_reduce:
          solver.net.after_backward(nccl)
      solver.step(iterations)

  ``after_backward(nccl)`` is accepted and does nothing: the gradients are
  all-reduced once per iteration, after ``iter_size`` accumulation, as one
  buffer (exact; Caffe's per-layer reduction overlaps it with backward).

``NETLIB_NCCL_MODULE`` names a module to use instead of ``cupy.cuda.nccl``
(the test suite's stand-in, tests/fakenccl.py); nothing else reads it.
"""
import importlib
import logging
import os
import subprocess
import sys
import threading

import numpy

from . import runtime
from .errors import ConfigError

log = logging.getLogger("netlib")

#: The variables through which ``netlib train --gpu a,b`` tells the processes it starts who they are.
RANK_VARIABLE, SIZE_VARIABLE, UID_VARIABLE = "NETLIB_NCCL_RANK", "NETLIB_NCCL_SIZE", "NETLIB_NCCL_UID"

# NCCL's ncclDataType_t / ncclRedOp_t values (nccl.h), the same in every NCCL 2.x.
_TYPES = {numpy.dtype(numpy.uint8): 1, numpy.dtype(numpy.int64): 4, numpy.dtype(numpy.float32): 7,
          numpy.dtype(numpy.float64): 8}
_SUM = 0


def nccl_module():
    """``cupy.cuda.nccl`` when CuPy was built with NCCL (or the module
    ``NETLIB_NCCL_MODULE`` names), else None."""
    name = os.environ.get("NETLIB_NCCL_MODULE")
    if name:
        return importlib.import_module(name)
    try:
        from cupy.cuda import nccl
    except Exception:
        return None
    return nccl if getattr(nccl, "available", True) else None


def has_nccl():
    """Whether NCCL is there to all-reduce over (pycaffe's has_nccl)."""
    return nccl_module() is not None


def _need_module(what):
    mod = nccl_module()
    if mod is None:
        raise ConfigError("%s needs NCCL, through CuPy (pip install cupy-cuda12x; NCCL comes with its "
                          "CUDA wheels): has_nccl() is False here. Without it, train over MPI: mpirun -n N "
                          "netlib train --solver S [--gpu a,b]" % what)
    return mod


def uid_bytes(uid):
    """An NCCL unique id (CuPy's tuple of 128 signed chars, or bytes) as bytes."""
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid)
    return bytes(int(c) & 0xFF for c in uid)


def _uid_tuple(uid):
    data = uid_bytes(uid)
    if len(data) != 128:
        raise ConfigError("an NCCL unique id has 128 bytes, this one %d (use caffe.NCCL.new_uid())" % len(data))
    return tuple(c - 256 if c > 127 else c for c in data)


def new_uid():
    """A fresh NCCL unique id, as bytes (pycaffe's ``NCCL.new_uid()``)."""
    return uid_bytes(_need_module("caffe.NCCL.new_uid()").get_unique_id())


class NcclWorld:
    """An NCCL communicator with :class:`netlib.parallel.World`'s interface:
    ``rank``, ``size`` and the collectives the solver uses, on buffers of
    the device module ``xp`` (host data is staged through it)."""

    def __init__(self, size, uid, rank, xp=None):
        from . import backend
        self.module = _need_module("multi-GPU training")
        self.xp = backend.default_xp() if xp is None else xp
        if self.xp is numpy:
            raise ConfigError("NCCL all-reduces device buffers: set_mode_gpu() (and set_device) first")
        if not 0 <= int(rank) < int(size):
            raise ConfigError("NCCL: rank %d is outside 0..%d" % (rank, int(size) - 1))
        self.rank, self.size = int(rank), int(size)
        try:
            self.comm = self.module.NcclCommunicator(self.size, _uid_tuple(uid), self.rank)
        except Exception as exc:
            raise ConfigError("NCCL: rank %d could not join the ring of %d processes: %s: %s"
                              % (self.rank, self.size, type(exc).__name__, exc)) from exc

    @property
    def is_root(self):
        return self.rank == 0

    def _stream(self):
        cuda = getattr(self.xp, "cuda", None)
        return cuda.get_current_stream().ptr if cuda is not None else 0

    @staticmethod
    def _ptr(array):
        return array.__cuda_array_interface__["data"][0]

    def _type(self, array):
        try:
            return _TYPES[numpy.dtype(array.dtype)]
        except KeyError:
            raise ConfigError("NCCL: no collective for dtype %s" % array.dtype) from None

    # -- the collectives parallel.GradientSync uses ----------------------------------------
    def allreduce_sum(self, buf):
        """Sum ``buf`` (a contiguous device array) over the ranks, in place."""
        if buf.size:
            p = self._ptr(buf)
            self.comm.allReduce(p, p, buf.size, self._type(buf), _SUM, self._stream())

    def bcast_array(self, buf, root=0):
        if buf.size:
            self.comm.bcast(self._ptr(buf), buf.size, self._type(buf), root, self._stream())

    def _allgather(self, array):
        out = self.xp.empty((self.size,) + tuple(array.shape), dtype=array.dtype)
        self.comm.allGather(self._ptr(array), self._ptr(out), array.size, self._type(array), self._stream())
        return out

    def bcast_bytes(self, data, root=0):
        xp = self.xp
        n = xp.asarray(numpy.array([len(data) if self.rank == root else 0], dtype=numpy.int64))
        self.bcast_array(n, root)
        count = int(n[0])
        if not count:
            return b""
        buf = (xp.asarray(numpy.frombuffer(data, dtype=numpy.uint8)) if self.rank == root
               else xp.empty(count, dtype=numpy.uint8))
        self.bcast_array(buf, root)
        return buf.get().tobytes()

    def bcast_json(self, value, root=0):
        import json
        return json.loads(self.bcast_bytes(json.dumps(value).encode("utf-8"), root).decode("utf-8"))

    def allgather_text(self, text):
        """Every rank's string, in rank order."""
        data = numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)
        sizes = self._allgather(self.xp.asarray(numpy.array([data.size], dtype=numpy.int64))).get().ravel()
        width = max(int(sizes.max()), 1)
        padded = numpy.zeros(width, dtype=numpy.uint8)
        padded[:data.size] = data
        rows = self._allgather(self.xp.asarray(padded)).get()
        return [rows[r, :int(sizes[r])].tobytes().decode("utf-8") for r in range(self.size)]

    def gather_json(self, value, root=0):
        import json
        parts = [json.loads(t) for t in self.allgather_text(json.dumps(value))]
        return parts if self.rank == root else None

    def abort(self, code=1):
        try:
            self.comm.abort()
        finally:
            os._exit(code)


class NCCL:
    """pycaffe's ``caffe.NCCL(solver, uid)``: this process's place in an
    NCCL ring of ``solver_count()`` processes (rank ``solver_rank()``),
    set before the solver was built.  See the module docstring for the
    script; ``bcast()``, then ``solver.add_callback(nccl)``."""

    def __init__(self, solver, uid):
        from . import parallel
        count, rank = runtime.solver_count(), runtime.solver_rank()
        if count < 2:
            raise ConfigError("caffe.NCCL: call set_solver_count(N) (N >= 2 processes) and set_solver_rank(r) "
                              "in each process before building the solver (solver_count() is %d)" % count)
        if solver is None or not hasattr(solver, "net"):
            raise ConfigError("caffe.NCCL(solver, uid): the first argument must be a solver")
        self.world = NcclWorld(count, uid, rank)
        parallel.set_world(self.world)
        self.solver = solver
        self.sync = parallel.GradientSync(solver, self.world)
        solver.world, solver._sync = self.world, self.sync

    new_uid = staticmethod(new_uid)

    def bcast(self):
        """Rank 0's weights (and data-reader state) on every rank, after
        checking that every rank built the same net."""
        self.sync.initial_sync()

    def on_start(self):
        self.sync.on_start()

    def on_gradients_ready(self):
        self.sync.on_gradients_ready()

    def __call__(self, layer_index=None):
        """The ``net.after_backward(nccl)`` hook: nothing to do per layer
        (the whole gradient is all-reduced in ``on_gradients_ready``)."""


# -- netlib train --gpu a,b -----------------------------------------------------------------
def environment_rank():
    """(rank, size, uid) when ``netlib train --gpu`` started this process, else None."""
    if RANK_VARIABLE not in os.environ:
        return None
    return (int(os.environ[RANK_VARIABLE]), int(os.environ[SIZE_VARIABLE]),
            bytes.fromhex(os.environ[UID_VARIABLE]))


def start_ranks(argv, gpus):
    """Start ranks 1..N-1 of a ``--gpu`` run (``python -m netlib`` with
    ``argv``, each told its rank through the environment) and return
    (their processes, this process's (rank 0, N, uid))."""
    _need_module("--gpu %s (several GPUs without mpirun)" % ",".join(str(g) for g in gpus))
    uid = new_uid()
    children = []
    for rank in range(1, len(gpus)):
        env = dict(os.environ, **{RANK_VARIABLE: str(rank), SIZE_VARIABLE: str(len(gpus)),
                                  UID_VARIABLE: uid.hex()})
        children.append(subprocess.Popen([sys.executable, "-m", "netlib"] + list(argv), env=env))
    for rank, p in enumerate(children, 1):
        threading.Thread(target=_watch, args=(rank, p), daemon=True).start()
    return children, (0, len(gpus), uid)


_joining = threading.Event()


def _watch(rank, process):
    """End this rank (0) when another one fails: NCCL would wait for it forever."""
    code = process.wait()
    if code and not _joining.is_set():
        sys.stderr.write("netlib: error: rank %d of the --gpu run ended with status %d (its error is above); "
                         "ending the run\n" % (rank, code))
        sys.stderr.flush()
        os._exit(code)


def join_ranks(children, failed):
    """Wait for the started ranks (ended at once when this rank ``failed``);
    the first non-zero exit status, else 0."""
    _joining.set()
    code = 0
    for p in children:
        if failed:
            p.terminate()
        rc = p.wait()
        if rc and not code:
            code = rc
    return code
