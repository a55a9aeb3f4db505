"""Solver snapshots: Caffe's ``.caffemodel[.h5]`` + ``.solverstate[.h5]`` files.

File names are ``<snapshot_prefix>_iter_<N>`` plus the extension for
``snapshot_format``:

* BINARYPROTO (the default): ``.caffemodel`` is a binary NetParameter
  (``Net.to_proto(write_diff=snapshot_diff)``) and ``.solverstate`` a binary
  ``SolverState {iter(1), learned_net(2), history(3), current_step(4)}``.
* HDF5: ``.caffemodel.h5`` holds ``/data/<layer>/<i>`` (``/diff/...`` with
  snapshot_diff) and ``.solverstate.h5`` holds ``iter`` (int32, shape (1,)),
  ``learned_net`` (a fixed-length, NUL-terminated ASCII string scalar, as
  HDF5-lite writes it), ``current_step`` (int32, (1,)) and the group
  ``history/`` with datasets ``"0".."k-1"`` in learnable-parameter order
  (AdaDelta and Adam: 2N blobs, the first N then the second N).

``learned_net`` is the weights path exactly as written (relative to the
directory the run was started in, like Caffe).

Caffe forgets part of the state a run needs to continue exactly.  netlib
stores it as an EXTRA entry that real Caffe skips: the RNG state
(``netlib.random.get_state()``), the read positions of every layer that has
``state_dict()``/``load_state_dict()`` (data layers) in the train and test
nets, and, for snapshots taken during ``step()``, the smoothed-loss ring
buffer.  In HDF5 it is the dataset ``netlib_state`` (a JSON string); in the
binary SolverState it is a length-delimited field number 1000 (JSON bytes)
appended to the serialized message -- protobuf parsers, Caffe's included,
skip unknown fields.  A state without it (a real Caffe file) restores as
Caffe restores it.

Restore (``Solver.restore`` / ``solve(resume_file)``): a ``.h5`` suffix
means HDF5, anything else binaryproto (Caffe's rule).  It sets ``iter``,
``current_step`` and the history (the count must match, else
:class:`~netlib.errors.WeightsError` naming both counts) and reloads the
weights from ``learned_net`` when present.  netlib extension: a relative
``learned_net`` that does not exist from the current directory is looked up
relative to the state file's folder, then by base name in that folder, so
moved snapshot folders (and Caffe's ``examples/...`` paths) still load.

Every file is written to a temporary file in the target folder and renamed
over the target (``os.replace``), so an interrupted snapshot never leaves a
broken file: the previous checkpoint stays intact and no temp file remains.
"""
import json
import logging
import os

import numpy

from . import random as nrandom
from .backend import to_numpy
from .blob import proto_shape, shape_equals
from .errors import NetlibError, NetlibFileNotFoundError, SnapshotError, WeightsError
from .files import read_varint
from .proto import caffe_pb2

log = logging.getLogger("netlib")

#: Field number of netlib's extra entry in a binary SolverState (unused by Caffe).
EXTRA_FIELD_NUMBER = 1000
#: Dataset name of netlib's extra entry in an HDF5 solver state.
EXTRA_DATASET = "netlib_state"
EXTRA_FORMAT = "netlib-solver-extra"
EXTRA_VERSION = 1


# -- net weights -------------------------------------------------------------------
def save_net_binaryproto(net, path, write_diff=False):
    """A binary ``.caffemodel`` of ``net`` (atomic; ``Net.save``)."""
    net.save(path, write_diff=write_diff)


def save_net_hdf5(net, path, write_diff=False):
    """Caffe's HDF5 weights file of ``net`` (atomic; ``Net.save_hdf5``)."""
    net.save_hdf5(path, write_diff=write_diff)


# -- the extra state ---------------------------------------------------------------
def _layer_states(net):
    if hasattr(net, "layer_states"):
        return net.layer_states()
    return {name: layer.state_dict() for name, layer in zip(net.layer_names, net.layers)
            if hasattr(layer, "state_dict")}


def _load_layer_states(net, states):
    if hasattr(net, "load_layer_states"):
        net.load_layer_states(states)
        return
    for name, layer in zip(net.layer_names, net.layers):
        if name in states and hasattr(layer, "load_state_dict"):
            layer.load_state_dict(states[name])


def extra_state(solver):
    """What Caffe's solver state lacks, as a JSON-serialisable dict."""
    extra = {
        "format": EXTRA_FORMAT,
        "version": EXTRA_VERSION,
        "solver_type": solver.type,
        "rng": nrandom.get_state(),
        "train_layers": _layer_states(solver.net),
        "test_layers": [_layer_states(n) for n in solver.test_nets],
    }
    if getattr(solver, "_rank_rng", None):       # a data-parallel run: every rank's stream
        extra["rank_rng"] = list(solver._rank_rng)
    if getattr(solver, "_in_step", False):
        extra["loss_ring"] = {
            "losses": [float(x) for x in solver.losses],
            "smoothed_loss": float(solver.smoothed_loss),
            "start_iter": int(solver._ring_start),
        }
    return extra


def _apply_extra(solver, extra, path):
    if not isinstance(extra, dict) or extra.get("format") != EXTRA_FORMAT:
        log.warning("%s: ignoring an unrecognised netlib_state entry", path)
        return
    from .parallel import restore_rank_state
    rng = restore_rank_state(extra, path) or extra.get("rng")
    if rng:
        nrandom.set_state(rng)
    _load_layer_states(solver.net, extra.get("train_layers", {}))
    for net, states in zip(solver.test_nets, extra.get("test_layers", [])):
        _load_layer_states(net, states)
    solver._resume_ring = extra.get("loss_ring")


def _json_default(value):
    """numpy scalars/arrays in layer states become plain JSON values."""
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    raise TypeError("a layer state_dict() holds %r, which is not JSON-serialisable" % type(value).__name__)


def _dump_extra(extra):
    return json.dumps(extra, sort_keys=True, default=_json_default)


# -- protobuf wire helpers -------------------------------------------------------------
def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def extra_field_bytes(payload, field_number=EXTRA_FIELD_NUMBER):
    """A serialized length-delimited protobuf field carrying ``payload``."""
    return _varint((field_number << 3) | 2) + _varint(len(payload)) + payload


def find_extra_field(data, field_number=EXTRA_FIELD_NUMBER):
    """The payload of the last top-level length-delimited ``field_number``
    in serialized protobuf ``data``, or None."""
    pos, found = 0, None
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = read_varint(data, pos)
            if number == field_number:
                found = bytes(data[pos:pos + length])
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        if pos > len(data):
            raise ValueError("truncated field")
    return found


# -- writing --------------------------------------------------------------------
def _write_all(handle, data, chunk=1 << 20):
    for start in range(0, len(data), chunk):
        handle.write(data[start:start + chunk])


def write_solver_state_binaryproto(path, iteration, learned_net, current_step, history, extra=None):
    """Write a binary SolverState (+ netlib's extra field 1000) atomically.

    ``history`` is a list of Blobs (or arrays)."""
    from .files import atomic_write
    state = caffe_pb2.SolverState()
    state.iter = int(iteration)
    state.learned_net = learned_net
    state.current_step = int(current_step)
    for h in history:
        proto = state.history.add()
        if hasattr(h, "to_proto"):
            h.to_proto(proto)
        else:
            arr = to_numpy(h)
            proto.shape.dim.extend(arr.shape)
            if arr.dtype == numpy.float64:
                proto.double_data.extend(arr.ravel().tolist())
            else:
                proto.data.extend(arr.astype(numpy.float32).ravel().tolist())
    data = state.SerializeToString()
    if extra is not None:
        data += extra_field_bytes(_dump_extra(extra).encode("utf-8"))
    with atomic_write(path) as handle:
        _write_all(handle, data)


def _h5_write_string(group, name, text):
    """A scalar fixed-length NUL-terminated ASCII string (H5LTmake_dataset_string)."""
    import h5py
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw) + 1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dset = h5py.h5d.create(group.id, name.encode("ascii"), tid, space)
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, numpy.array(raw, dtype="S%d" % (len(raw) + 1)), mtype=tid)


def _h5_write_int(group, name, value):
    group.create_dataset(name, data=numpy.array([int(value)], dtype="<i4"))


def write_solver_state_hdf5(path, iteration, learned_net, current_step, history, extra=None):
    """Write Caffe's HDF5 solver state (+ ``netlib_state``) atomically."""
    from .files import atomic_hdf5
    with atomic_hdf5(path) as f:
        _h5_write_int(f, "iter", iteration)
        _h5_write_string(f, "learned_net", learned_net)
        _h5_write_int(f, "current_step", current_step)
        group = f.create_group("history")
        for i, h in enumerate(history):
            arr = to_numpy(h.data if hasattr(h, "data") else h)
            group.create_dataset(str(i), data=arr)
        if extra is not None:
            _h5_write_string(f, EXTRA_DATASET, _dump_extra(extra))


def snapshot(solver):
    """Caffe's Solver::Snapshot: weights, then the solver state.

    Returns ``(weights_path, state_path)``.  A write that fails (a full or
    read-only disk) is a SnapshotError (an OSError) naming the file; every earlier snapshot
    stays as it was (each file is written to a temporary name, then renamed)."""
    try:
        return _snapshot(solver)
    except OSError as exc:
        target = getattr(exc, "filename", None) or getattr(solver, "_snapshot_target", "the snapshot")
        raise SnapshotError("could not write snapshot %s: %s; the previous snapshot files are intact"
                          % (target, exc.strerror or exc)) from None


def _snapshot(solver):
    p = solver.param
    if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
        model = solver._snapshot_target = solver.snapshot_filename(".caffemodel.h5")
        log.info("Snapshotting to HDF5 file %s", model)
        save_net_hdf5(solver.net, model, p.snapshot_diff)
        state = solver._snapshot_target = solver.snapshot_filename(".solverstate.h5")
        log.info("Snapshotting solver state to HDF5 file %s", state)
        write_solver_state_hdf5(state, solver.iter, model, solver.current_step, solver.history,
                                extra_state(solver))
    else:
        model = solver._snapshot_target = solver.snapshot_filename(".caffemodel")
        log.info("Snapshotting to binary proto file %s", model)
        save_net_binaryproto(solver.net, model, p.snapshot_diff)
        state = solver._snapshot_target = solver.snapshot_filename(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", state)
        write_solver_state_binaryproto(state, solver.iter, model, solver.current_step, solver.history,
                                       extra_state(solver))
    return model, state


# -- reading --------------------------------------------------------------------
class SolverStateFile:
    """A solver state read from disk: ``iter``, ``learned_net`` (str or
    None), ``current_step``, ``history`` (BlobProtos for binaryproto, NumPy
    arrays for HDF5), ``extra`` (netlib's dict or None), ``format``."""

    def __init__(self, path, fmt, iteration, learned_net, current_step, history, extra):
        self.path, self.format = path, fmt
        self.iter, self.learned_net, self.current_step = iteration, learned_net, current_step
        self.history, self.extra = history, extra

    def history_shape(self, i):
        h = self.history[i]
        return tuple(proto_shape(h)) if self.format == "binaryproto" else tuple(h.shape)


def _h5_string(value):
    if isinstance(value, numpy.ndarray):
        value = value[()]
    if isinstance(value, bytes):
        value = value.split(b"\0", 1)[0].decode("utf-8")
    return str(value)


def _h5_int(ds, path, what):
    """The single integer an HDF5 solver-state scalar holds (Caffe writes a
    1-element int dataset)."""
    values = numpy.asarray(ds[()]).ravel()
    if values.size != 1 or not numpy.issubdtype(values.dtype, numpy.number):
        raise WeightsError("%s: %s should hold one integer, holds %d values of %s"
                           % (path, what, values.size, values.dtype))
    value = values[0]
    if not numpy.isfinite(value) or abs(float(value)) >= 2 ** 63:
        raise WeightsError("%s: %s is %r, not an integer" % (path, what, value))
    return int(value)


def read_solver_state(path):
    """Read a ``.solverstate`` (binaryproto) or ``.solverstate.h5`` (by suffix)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NetlibFileNotFoundError("%s: no such solver state file" % path)
    if path.endswith(".h5"):
        import h5py
        from .files import H5_ERRORS, h5_dataset
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("iter", "history") if k not in f]
                if missing:
                    raise WeightsError("%s: not a Caffe HDF5 solver state (no %s)" % (path, ", ".join(missing)))
                iteration = _h5_int(h5_dataset(f, "iter", path, "iter"), path, "iter")
                learned = _h5_string(h5_dataset(f, "learned_net", path, "learned_net")[()]) \
                    if "learned_net" in f else None
                current_step = (_h5_int(h5_dataset(f, "current_step", path, "current_step"), path, "current_step")
                                if "current_step" in f else 0)
                group = f["history"]
                if not isinstance(group, h5py.Group):
                    raise WeightsError("%s: history is not an HDF5 group" % path)
                history = []
                for i in range(len(group)):
                    if str(i) not in group:
                        raise WeightsError("%s: history/ has %d entries but no dataset %r"
                                           % (path, len(group), str(i)))
                    values = numpy.asarray(h5_dataset(group, str(i), path, "history/%d" % i)[()])
                    if not numpy.issubdtype(values.dtype, numpy.number):
                        raise WeightsError("%s: history/%d holds %s values, not numbers" % (path, i, values.dtype))
                    history.append(values)
                extra = None
                if EXTRA_DATASET in f:
                    try:
                        extra = json.loads(_h5_string(h5_dataset(f, EXTRA_DATASET, path, EXTRA_DATASET)[()]))
                    except ValueError:
                        raise WeightsError("%s: the netlib state entry (%s) is corrupt" % (path, EXTRA_DATASET)) from None
                    if not isinstance(extra, dict):
                        raise WeightsError("%s: the netlib state entry (%s) is corrupt" % (path, EXTRA_DATASET))
        except NetlibError:
            raise
        except H5_ERRORS as exc:
            raise WeightsError("%s: unreadable HDF5 solver state (truncated or corrupt?): %s: %s"
                               % (path, type(exc).__name__, exc)) from None
        return SolverStateFile(path, "hdf5", iteration, learned or None, current_step, history, extra)
    from .files import read_binary_proto
    state = read_binary_proto(path, caffe_pb2.SolverState())
    with open(path, "rb") as handle:
        raw = handle.read()
    extra = None
    try:
        payload = find_extra_field(raw)
    except ValueError:
        payload = None
    if payload is not None:
        try:
            extra = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise WeightsError("%s: the netlib state entry (field %d) is corrupt"
                               % (path, EXTRA_FIELD_NUMBER)) from None
    learned = state.learned_net if state.HasField("learned_net") and state.learned_net else None
    return SolverStateFile(path, "binaryproto", state.iter, learned, state.current_step,
                           list(state.history), extra)


def _resolve_learned_net(learned, state_path):
    if os.path.exists(learned):
        return learned
    folder = os.path.dirname(os.path.abspath(state_path))
    tried = [os.path.abspath(learned)]
    for cand in (os.path.join(folder, learned), os.path.join(folder, os.path.basename(learned))):
        if os.path.exists(cand):
            return cand
        tried.append(cand)
    raise NetlibFileNotFoundError("solver state %s: its weights file (learned_net) %r does not exist "
                                  "(looked for %s)" % (state_path, learned, ", ".join(dict.fromkeys(tried))))


def restore(solver, path):
    """Load a solver state into ``solver`` (see the module docstring)."""
    state = read_solver_state(path)
    history = solver.history
    if len(state.history) != len(history):
        n = len(solver.net.learnable_params)
        per = len(history) // n if n else 0
        raise WeightsError("%s: the solver state has %d history blobs but this %s needs %d (%d per "
                           "learnable parameter, %d parameters); was it written by another solver type "
                           "or net?" % (path, len(state.history), type(solver).__name__, len(history), per, n))
    for i, blob in enumerate(history):
        h = state.history[i]
        ok = shape_equals(h, blob.shape) if state.format == "binaryproto" else tuple(h.shape) == tuple(blob.shape)
        if not ok:
            n = len(solver.net.learnable_params)
            layer, k = solver.net.learnable_param_owner(i % n)
            raise WeightsError("%s: history blob %d (layer %r, param %d) has shape %s but the net's is %s; "
                               "was the state written for another net?"
                               % (path, i, layer, k, state.history_shape(i), tuple(blob.shape)))
    if state.learned_net:  # first, so a failing weights file leaves iter & history as they were
        solver.net.copy_from(_resolve_learned_net(state.learned_net, path))
    solver.iter = int(state.iter)
    solver.current_step = int(state.current_step)
    if state.format == "binaryproto":
        log.info("SGDSolver: restoring history")
    for i, blob in enumerate(history):
        h = state.history[i]
        if state.format == "binaryproto":
            blob.from_proto(h, reshape=False)
        else:
            blob.data[...] = blob.xp.asarray(h, dtype=blob.dtype)
    solver._resume_ring = None
    if state.extra is not None:
        _apply_extra(solver, state.extra, path)
    return state
