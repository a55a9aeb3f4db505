"""Solvers: Caffe's training loop, learning-rate policies and update rules.

``netlib.get_solver(path_or_SolverParameter)`` builds the solver named by the
file's ``type`` (``SGD``, ``Nesterov``, ``AdaGrad``, ``RMSProp``, ``AdaDelta``,
``Adam``; the legacy ``solver_type`` enum is upgraded).  The classes
:class:`SGDSolver` ... :class:`AdamSolver` take a path or a SolverParameter
(or prototxt text) and expose pycaffe's members: ``net``, ``test_nets``,
``iter``, ``param``, ``lr``, ``step(n)``, ``solve(resume_file=None)``,
``snapshot()``, ``restore(path)``, ``test_all()``, ``apply_update()``,
``add_callback(on_start, on_gradients_ready)`` and ``share_weights(net)``.

One iteration (Caffe's ``Solver::Step``)::

    net.clear_param_diffs()
    test_all() if test_interval and iter % test_interval == 0 and (iter > 0 or test_initialization)
    callbacks: on_start()
    loss = sum(net.forward_backward() for _ in range(iter_size)) / iter_size   # diffs accumulate
    smoothed loss (ring buffer of the last ``average_loss`` losses); display
    callbacks: on_gradients_ready()
    apply_update():
        rate = learning rate for ``iter`` (the count BEFORE this update)
        clip_gradients()             # global L2 over all learnable diffs, on the raw accumulated sum
        for each learnable param i:
            normalize(i)             # diff *= float(1 / iter_size)  (when iter_size > 1)
            regularize(i)            # L2: diff += wd*decay_mult*w ; L1: diff += wd*decay_mult*sign(w)
            compute_update_value(i, rate * lr_mult_i)   # the rule below; writes the step into diff
        net.update()                 # w -= diff
        iter += 1
    snapshot if snapshot and iter % snapshot == 0 (or when action_request says 'snapshot')
    stop if action_request says 'stop'

Update rules (g = diff after regularisation, r = rate*lr_mult; history as Caffe):

* SGD:      h = momentum*h + r*g;  w -= h   (momentum holds lr-scaled steps)
* Nesterov: h' = momentum*h + r*g;  w -= (1+momentum)*h' - momentum*h
* AdaGrad:  h += g^2;  w -= r*g/(sqrt(h)+delta)                    (momentum must be 0)
* RMSProp:  h = d*h + (1-d)*g^2;  w -= r*g/(sqrt(h)+delta)         (d = rms_decay)
* AdaDelta: h1 = m*h1+(1-m)g^2; u = g*sqrt((h2+delta)/(h1+delta));
            h2 = m*h2+(1-m)u^2; w -= r*u                            (history = [h1..., h2...])
* Adam:     t = iter+1; m = b1*m+(1-b1)g; v = b2*v+(1-b2)g^2;
            w -= r*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+delta)       (history = [m..., v...])

Float arithmetic follows Caffe's float32 code path: scalars are rounded to
float32 where Caffe holds them in a ``Dtype`` (``rate``, ``local_rate``,
``1 - rms_decay`` ...), ``pow(float, int)`` is evaluated in double as C++11
does, and iter_size normalisation multiplies by ``float(1/iter_size)``.

Learning-rate policies (``iter`` = completed updates): fixed, step
(``current_step = iter // stepsize``), exp, inv, multistep (``current_step``
advances **at most one step per call**: Caffe's quirk, kept; the step is
saved in the solver state), poly, sigmoid.

Net files named in a solver file (``net``, ``train_net``, ``test_net``) are
used as given, i.e. relative to the current directory like Caffe.  netlib
extension: when such a path does not exist there, the same relative path
under the solver file's folder is tried, then the file's base name in the
solver file's folder (so a zoo solver that says
``net: "examples/mnist/lenet_train_test.prototxt"`` works next to its net).
The ``weights`` field is resolved the same way.

Logging goes to ``logging.getLogger("netlib")`` at INFO with Caffe's texts
(``Iteration N, Testing net (#0)``, ``    Test net output #k: name = v``,
``Iteration N (x iter/s, ys/D iters), loss = L``, ``Iteration N, lr = r``,
``Snapshotting ...``, ``Optimization Done.``).

Caffe quirks kept on purpose: net outputs print in alphabetical order; the
test score index counts elements (a blob with 3 values gives #0..#2); the
final extra forward in ``solve()`` only runs when ``iter % display == 0``;
a train net whose own ``state`` sets ``phase: TEST`` is built in TEST phase
(Caffe merges NetStates that way).  netlib extras: a non-finite loss raises
:class:`~netlib.errors.SolverError` naming the first layer whose output is not
finite; snapshots also carry the RNG state, the data layers' read positions
and the smoothed-loss ring buffer, so a resumed run continues bit for bit.
"""
import abc
import logging
import math
import os
import time

import numpy
from google.protobuf import text_format

from . import random as nrandom
from .errors import ConfigError, NetlibFileNotFoundError, SolverError
from .proto import caffe_pb2

log = logging.getLogger("netlib")

_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
_SOLVERS = {}

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def register_solver(type_name):
    """Class decorator: make ``type: "<type_name>"`` build this solver class."""

    def decorate(cls):
        _SOLVERS[type_name] = cls
        cls.type = type_name
        return cls

    return decorate


def solver_type_list():
    """The registered solver type strings."""
    return sorted(_SOLVERS)


# -- reading the solver file -----------------------------------------------------
def _is_path_like(source):
    return isinstance(source, (str, bytes, os.PathLike))


def read_solver(source, solver_path=None):
    """(SolverParameter, solver file path or None) from a path, text or message.

    ``solver_path`` names the file a SolverParameter message came from (used
    for the snapshot_prefix default and for resolving net paths).

    Applies Caffe's upgrades: ``solver_type`` -> ``type`` (both set and
    different is an error; both set to the same solver is accepted), and the
    ``snapshot_prefix`` default (the solver file path minus its extension;
    a prefix naming an existing directory becomes ``dir/<solver file stem>``).
    """
    from .files import parse_text_proto, read_text_proto
    path = None
    param = caffe_pb2.SolverParameter()
    if isinstance(source, caffe_pb2.SolverParameter):
        param.CopyFrom(source)
        path = os.fsdecode(solver_path) if solver_path is not None else None
    elif _is_path_like(source):
        source = os.fsdecode(source)
        if os.path.isfile(source):
            path = source
            read_text_proto(source, param)
        elif "\n" in source or "{" in source or ":" in source:
            parse_text_proto(source, param)
        else:
            raise NetlibFileNotFoundError("%s: no such solver file" % source)
    else:
        raise TypeError("a solver needs a solver prototxt path or a SolverParameter, got %r"
                        % type(source).__name__)
    where = (path + ": ") if path else ""
    if param.HasField("solver_type"):
        old = _SOLVER_TYPES.get(param.solver_type)
        if old is None:
            raise ConfigError("%sunknown solver_type %d" % (where, param.solver_type))
        if param.HasField("type") and param.type != old:
            raise ConfigError("%sthe solver sets both the legacy 'solver_type: %s' and 'type: \"%s\"', "
                              "which disagree; keep only 'type'"
                              % (where, caffe_pb2.SolverParameter.SolverType.Name(param.solver_type),
                                 param.type))
        param.type = old
        param.ClearField("solver_type")
    if path is not None:
        stem_path = os.path.splitext(path)[0]
        if not param.HasField("snapshot_prefix"):
            param.snapshot_prefix = stem_path
            log.info("snapshot_prefix was not specified and is set to %s", param.snapshot_prefix)
        elif os.path.isdir(param.snapshot_prefix):
            param.snapshot_prefix = os.path.join(param.snapshot_prefix, os.path.basename(stem_path))
            log.info("snapshot_prefix was a directory and is replaced to %s", param.snapshot_prefix)
    return param, path


def get_solver(source, solver_path=None, **kwargs):
    """Build the solver named by ``type`` in a solver file or SolverParameter
    (pycaffe's ``caffe.get_solver``).  ``solver_path`` names the file a
    SolverParameter message was read from (snapshot prefix, relative paths)."""
    param, path = read_solver(source, solver_path)
    type_name = param.type or "SGD"
    cls = _SOLVERS.get(type_name)
    if cls is None:
        raise ConfigError("%sunknown solver type %r; known types: %s"
                          % ((path + ": ") if path else "", type_name, ", ".join(solver_type_list())))
    return cls(param, solver_path=path, **kwargs)


def _net_state_merge(phase, net_param_state, extra):
    """Caffe's NetState precedence: solver default phase < the net's own
    ``state`` < the solver's train_state/test_state[i]."""
    state = caffe_pb2.NetState()
    state.phase = phase
    state.MergeFrom(net_param_state)
    if extra is not None:
        state.MergeFrom(extra)
    return state


_ACTIONS = {"none": "none", "stop": "stop", "snapshot": "snapshot"}


class Solver(abc.ABC):
    """Caffe's Solver (the training loop, testing, snapshots) plus the SGD
    family's learning-rate policies; subclasses give ``compute_update_value``.

    ``Solver(path_or_SolverParameter, dtype=None, xp=None)``: ``dtype``
    (float32 by default) and ``xp`` are passed to the nets (netlib extras).
    """

    type = None

    def __init__(self, source, solver_path=None, dtype=None, xp=None):
        from . import parallel
        self.world = parallel.world()      # under mpirun: sets solver_count/rank before the nets exist
        self._sync = None
        param, path = read_solver(source, solver_path)
        self.param = param
        self.solver_path = path
        self._dtype = numpy.dtype(dtype) if dtype is not None else numpy.dtype(numpy.float32)
        self._xp = xp
        self._where = (path + ": ") if path else ""
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(param))
        if param.average_loss < 1:
            raise ConfigError("%saverage_loss should be >= 1, got %d" % (self._where, param.average_loss))
        if param.iter_size < 1:
            raise ConfigError("%siter_size should be >= 1, got %d" % (self._where, param.iter_size))
        if param.lr_policy not in LR_POLICIES:
            raise ConfigError("%sunknown learning rate policy %r; one of %s"
                              % (self._where, param.lr_policy, ", ".join(LR_POLICIES)))
        if param.regularization_type not in ("L1", "L2"):
            raise ConfigError("%sunknown regularization type %r (L1 or L2)"
                              % (self._where, param.regularization_type))
        self.iter = 0
        self.current_step = 0
        self.check_param()
        if self.is_root:                   # Caffe: only the root solver checks and writes snapshots
            self._check_snapshot_write_permissions()
        if param.random_seed >= 0:
            nrandom.set_random_seed(param.random_seed)
        self.callbacks = []
        self.iteration_callbacks = []
        self.action_request = None
        self.requested_early_exit = False
        self.losses = []
        self.smoothed_loss = 0.0
        self._ring_start = 0
        self._resume_ring = None
        self._in_step = False
        self.net = None
        self.test_nets = []
        self._init_train_net()
        if self.is_root:                   # Caffe: only the root solver tests
            self._init_test_nets()
        log.info("Solver scaffolding done.")
        self.history = []
        self._pre_solve()
        if self.world is not None:
            self._sync = parallel.GradientSync(self, self.world)
            self.add_callback(self._sync)
            self._sync.initial_sync()

    @property
    def is_root(self):
        """Whether this solver tests and snapshots: rank 0 of its data-parallel
        world; without one, pycaffe's ``solver_rank() == 0`` (Caffe's root solver)."""
        if self.world is not None:
            return self.world.is_root
        from . import runtime
        return runtime.solver_rank() == 0

    # -- construction --------------------------------------------------------------
    def _check_snapshot_write_permissions(self):
        p = self.param
        if not p.snapshot:
            return
        if not p.HasField("snapshot_prefix"):
            raise ConfigError("%sIn solver params, snapshot is specified but snapshot_prefix is not"
                              % self._where)
        folder = os.path.dirname(self.snapshot_filename(".tempfile")) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ConfigError("%sCannot write to snapshot prefix '%s'. Make sure that the directory "
                              "exists and is writable." % (self._where, p.snapshot_prefix))
        from .files import remove_stale_temp_files
        for stale in remove_stale_temp_files(p.snapshot_prefix):   # a run killed mid-snapshot
            log.info("Removed %s, the temporary file of an interrupted snapshot", stale)

    def _resolve(self, path, field):
        """A path from the solver file: as given (CWD), else under the solver
        file's folder, else its base name in that folder."""
        if os.path.exists(path):
            return path
        tried = [os.path.abspath(path)]
        if self.solver_path:
            folder = os.path.dirname(os.path.abspath(self.solver_path))
            for cand in (os.path.join(folder, path), os.path.join(folder, os.path.basename(path))):
                if os.path.exists(cand):
                    return cand
                tried.append(cand)
        raise NetlibFileNotFoundError(
            "solver %s: the %s file %r does not exist (looked for %s)"
            % (self.solver_path or "<SolverParameter>", field, path,
               ", ".join(dict.fromkeys(tried))))

    def _read_net_file(self, path, field):
        from .files import read_net_param
        return read_net_param(self._resolve(path, field))

    def _new_net(self, net_param):
        from .net import Net
        kwargs = {"dtype": self._dtype}
        if self._xp is not None:
            kwargs["xp"] = self._xp
        return Net(net_param, **kwargs)

    def _init_train_net(self):
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if not given:
            raise ConfigError("%sSolverParameter must specify a train net using one of these fields: "
                              "net, net_param, train_net, train_net_param" % self._where)
        if len(given) > 1:
            raise ConfigError("%sSolverParameter must not contain more than one of these fields "
                              "specifying a train_net: net, net_param, train_net, train_net_param (got %s)"
                              % (self._where, ", ".join(given)))
        from .files import read_net_param
        if p.HasField("train_net_param"):
            log.info("Creating training net specified in train_net_param.")
            net_param = read_net_param(p.train_net_param)
        elif p.HasField("train_net"):
            log.info("Creating training net from train_net file: %s", p.train_net)
            net_param = self._read_net_file(p.train_net, "train_net")
        elif p.HasField("net_param"):
            log.info("Creating training net specified in net_param.")
            net_param = read_net_param(p.net_param)
        else:
            log.info("Creating training net from net file: %s", p.net)
            net_param = self._read_net_file(p.net, "net")
        state = _net_state_merge(caffe_pb2.TRAIN, net_param.state,
                                 p.train_state if p.HasField("train_state") else None)
        net_param.state.CopyFrom(state)
        self.net = self._new_net(net_param)
        self._load_weights(self.net)

    def _load_weights(self, net):
        """The solver's ``weights`` field (comma lists allowed; Caffe's LoadNetWeights)."""
        for spec in self.param.weights:
            for name in spec.split(","):
                name = name.strip()
                if name:
                    log.info("Finetuning from %s", name)
                    net.copy_from(self._resolve(name, "weights"))

    def _init_test_nets(self):
        from .files import read_net_param
        p = self.param
        has_net_param, has_net = p.HasField("net_param"), p.HasField("net")
        if has_net_param and has_net:
            raise ConfigError("%sBoth net_param and net may not be specified." % self._where)
        num_test_nets = len(p.test_net_param) + len(p.test_net)
        if has_net_param or has_net:
            if len(p.test_iter) < num_test_nets:
                raise ConfigError("%stest_iter must be specified for each test network (%d test nets, "
                                  "%d test_iter)" % (self._where, num_test_nets, len(p.test_iter)))
        elif len(p.test_iter) != num_test_nets:
            raise ConfigError("%stest_iter must be specified for each test network (%d test nets, "
                              "%d test_iter)" % (self._where, num_test_nets, len(p.test_iter)))
        num_instances = len(p.test_iter) if (has_net_param or has_net) else num_test_nets
        if len(p.test_state) and len(p.test_state) != num_instances:
            raise ConfigError("%stest_state must be unspecified or specified once per test net "
                              "(%d test_state for %d test nets)" % (self._where, len(p.test_state), num_instances))
        if num_instances and p.test_interval <= 0:
            raise ConfigError("%stest_interval must be > 0 when there are test nets (%d test nets)"
                              % (self._where, num_instances))
        sources, params = [], []
        for tp in p.test_net_param:
            sources.append("test_net_param")
            params.append(read_net_param(tp))
        for f in p.test_net:
            sources.append("test_net file: " + f)
            params.append(self._read_net_file(f, "test_net"))
        remaining = len(p.test_iter) - len(params)
        if has_net_param:
            for _ in range(remaining):
                sources.append("net_param")
                params.append(read_net_param(p.net_param))
        if has_net:
            for _ in range(remaining):
                sources.append("net file: " + p.net)
                params.append(self._read_net_file(p.net, "net"))
        self.test_nets = []
        for i, net_param in enumerate(params):
            state = _net_state_merge(caffe_pb2.TEST, net_param.state,
                                     p.test_state[i] if len(p.test_state) else None)
            net_param.state.CopyFrom(state)
            log.info("Creating test net (#%d) specified by %s", i, sources[i])
            self.test_nets.append(self._new_net(net_param))
            self._load_weights(self.test_nets[-1])

    def _pre_solve(self):
        """History blobs: one per learnable param (SGD family)."""
        self.history = []
        self._add_history_set()

    def _add_history_set(self):
        """Append one zeroed history blob per learnable param."""
        from .blob import Blob
        for b in self.net.learnable_params:
            h = Blob(b.shape, dtype=b.dtype, xp=b.xp)
            h.data[...] = 0
            self.history.append(h)

    def check_param(self):
        """Solver-specific checks of the SolverParameter."""

    # -- properties ----------------------------------------------------------------
    @property
    def lr(self):
        """The rate the next update will use (no side effect on multistep)."""
        return float(self.get_learning_rate(advance=False))

    @property
    def f(self):
        """The scalar type of Caffe's ``Dtype`` for this solver's nets."""
        return self._dtype.type

    # -- learning rate -------------------------------------------------------------
    def get_learning_rate(self, advance=True):
        """Caffe's SGDSolver::GetLearningRate for the current ``iter``.

        ``multistep`` advances ``current_step`` by at most one per call (only
        when ``advance``); ``step`` sets ``current_step = iter // stepsize``.
        """
        p, f, it = self.param, self.f, self.iter
        policy = p.lr_policy
        base_lr = f(p.base_lr)
        if policy == "fixed":
            rate = base_lr
        elif policy == "step":
            if p.stepsize <= 0:
                raise ConfigError("%slr_policy 'step' needs stepsize > 0" % self._where)
            step = it // p.stepsize
            if advance:
                self.current_step = step
            rate = f(float(base_lr) * _pow(float(f(p.gamma)), step))
        elif policy == "exp":
            rate = f(float(base_lr) * _pow(float(f(p.gamma)), it))
        elif policy == "inv":
            base = f(f(1) + f(f(p.gamma) * f(it)))
            rate = f(base_lr * f(_pow(float(base), float(-f(p.power)))))
        elif policy == "multistep":
            step = self.current_step
            if step < len(p.stepvalue) and it >= p.stepvalue[step]:
                step += 1
                if advance:
                    self.current_step = step
                    log.info("MultiStep Status: Iteration %d, step = %d", it, step)
            rate = f(float(base_lr) * _pow(float(f(p.gamma)), step))
        elif policy == "poly":
            frac = f(f(1) - f(f(it) / f(p.max_iter))) if p.max_iter else f(-numpy.inf)
            rate = f(base_lr * f(_pow(float(frac), float(f(p.power)))))
        elif policy == "sigmoid":
            x = f(f(-f(p.gamma)) * f(f(it) - f(p.stepsize)))
            e = f(_exp(float(x)))
            rate = f(base_lr * f(f(1) / f(f(1) + e)))
        else:
            raise ConfigError("%sUnknown learning rate policy: %s" % (self._where, policy))
        return rate

    # -- the update ----------------------------------------------------------------
    def apply_update(self):
        """rate -> clip -> (normalize, regularize, compute_update_value) per
        param -> net.update() -> iter += 1 (Caffe's SGDSolver::ApplyUpdate)."""
        rate = self.get_learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, _g(rate))
        self.clip_gradients()
        for i in range(len(self.net.learnable_params)):
            self.normalize(i)
            self.regularize(i)
            self.compute_update_value(i, rate)
        self.net.update()
        self.iter += 1

    def clip_gradients(self):
        clip = self.f(self.param.clip_gradients)
        if clip < 0:
            return
        params = self.net.learnable_params
        sumsq = self.f(0)
        for b in params:
            d = b.diff.ravel()
            sumsq = self.f(sumsq + self.f(float(d @ d)))
        norm = self.f(math.sqrt(float(sumsq)))
        if norm > clip:
            scale = self.f(clip / norm)
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     _g(norm), _g(clip), _g(scale))
            for b in params:
                b.diff[...] *= scale

    def normalize(self, i):
        n = self.param.iter_size
        if n == 1:
            return
        # Caffe multiplies by Dtype(1)/iter_size (not a division).
        self.net.learnable_params[i].diff[...] *= self.f(self.f(1) / self.f(n))

    def regularize(self, i):
        f = self.f
        blob = self.net.learnable_params[i]
        local_decay = f(f(self.param.weight_decay) * f(self.net.params_weight_decay[i]))
        if not local_decay:
            return
        if self.param.regularization_type == "L2":
            blob.diff[...] += local_decay * blob.data
        else:
            blob.diff[...] += local_decay * blob.xp.sign(blob.data)

    @abc.abstractmethod
    def compute_update_value(self, i, rate):
        """Turn learnable param ``i``'s gradient into the step (in its diff)."""

    def _local_rate(self, i, rate):
        return self.f(self.f(rate) * self.f(self.net.params_lr[i]))

    # -- the loop ------------------------------------------------------------------
    def add_callback(self, on_start, on_gradients_ready=None):
        """pycaffe's add_callback: two callables, or one object with
        ``on_start()`` and ``on_gradients_ready()`` methods."""
        if on_gradients_ready is None and hasattr(on_start, "on_gradients_ready"):
            obj = on_start
            on_start, on_gradients_ready = getattr(obj, "on_start", None), obj.on_gradients_ready
        self.callbacks.append((on_start, on_gradients_ready))

    def _requested_action(self):
        if self.action_request is None:
            return "none"
        action = self.action_request()
        try:
            return _ACTIONS[action.lower() if isinstance(action, str) else "none" if action is None else action]
        except (KeyError, TypeError):
            raise ConfigError("action_request returned %r; expected 'none', 'stop' or 'snapshot'"
                              % (action,)) from None

    def _update_smoothed_loss(self, loss, start_iter, average_loss):
        f = self.f
        loss = f(loss)
        if len(self.losses) < average_loss:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = f(f(f(self.smoothed_loss) * f(size - 1) + loss) / f(size))
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss = f(f(self.smoothed_loss) + f(f(loss - self.losses[idx]) / f(average_loss)))
            self.losses[idx] = loss

    def hvp(self, v, loss=None, keep_batch=True):
        """``H v`` of the objective this solver minimises on its train net: the
        net's losses plus the solver's regularization (``weight_decay``,
        ``regularization_type``); see :meth:`netlib.Net.hvp`."""
        return self.net.hvp(v, loss=loss, weight_decay=self.param.weight_decay,
                            regularization=self.param.regularization_type, keep_batch=keep_batch)

    def gnvp(self, v, loss=None, keep_batch=True):
        """The Gauss-Newton product of the same objective (:meth:`netlib.Net.gnvp`)."""
        return self.net.gnvp(v, loss=loss, weight_decay=self.param.weight_decay,
                             regularization=self.param.regularization_type, keep_batch=keep_batch)

    def step(self, iters):
        """Run ``iters`` iterations (Caffe's Solver::Step)."""
        f = self.f
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        if self._resume_ring is not None:
            ring = self._resume_ring
            self._resume_ring = None
            self.losses = [f(x) for x in ring["losses"]]
            self.smoothed_loss = f(ring["smoothed_loss"])
            start_iter = int(ring["start_iter"])
        else:
            self.losses = []
            self.smoothed_loss = f(0)
        self._ring_start = start_iter
        self._in_step = True
        try:
            self._step_loop(start_iter, stop_iter)
        finally:
            self._in_step = False

    def _step_loop(self, start_iter, stop_iter):
        p = self.param
        f = self.f
        average_loss = p.average_loss
        timer = time.perf_counter()
        iterations_last = self.iter
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                if self.is_root:
                    self.test_all()
                if self._sync is not None:     # a stop requested while rank 0 tested ends every rank
                    self.requested_early_exit = bool(self._sync.agree(self.requested_early_exit))
                if self.requested_early_exit:
                    break
            for on_start, _ in self.callbacks:
                if on_start is not None:
                    on_start()
            display = bool(p.display) and self.iter % p.display == 0
            self.net.debug_info = bool(display and p.debug_info)
            loss = f(0)
            bad = None
            for k in range(p.iter_size):
                if self._sync is not None:     # the overlapped all-reduce starts in the last pass's backward
                    self._sync.last_pass = k == p.iter_size - 1
                one = self.net.forward_backward()
                if not math.isfinite(one):
                    if self._sync is None:
                        self._raise_non_finite(one)
                    bad = one if bad is None else bad
                loss = f(loss + f(one))
            if self._sync is not None:
                self._sync.local_bad = bad is not None
            loss = f(loss / f(p.iter_size))
            self._update_smoothed_loss(loss, start_iter, average_loss)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse if lapse else 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, _g(per_s),
                         _g(round(lapse, 3)), p.display, _g(self.smoothed_loss))
                timer = time.perf_counter()
                iterations_last = self.iter
                self._log_outputs(self.net, "Train")
            for _, on_gradients_ready in self.callbacks:
                if on_gradients_ready is not None:
                    on_gradients_ready()
            if self._sync is not None and self._sync.bad_ranks:
                if bad is not None:
                    self._raise_non_finite(bad)
                raise SolverError("iteration %d: the training loss of %d other rank(s) is not finite; see "
                                  "their error. Lower base_lr, check the data, or set clip_gradients."
                                  % (self.iter, self._sync.bad_ranks))
            self.apply_update()
            request = self._requested_action()
            if self._sync is not None:         # rank 0's SIGINT/SIGHUP decides for every rank
                request = self._sync.agree(request)
            if (p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot":
                self.snapshot()
            for cb in list(self.iteration_callbacks):
                cb(self)
            if request == "stop":
                self.requested_early_exit = True
                break

    def _log_outputs(self, net, kind):
        weights = net.blob_loss_weights
        k = 0
        for name, blob in zip(net.outputs, net.output_blobs):
            w = self.f(weights.get(name, 0.0))
            values = _host(blob.data).ravel()
            for v in values:
                msg = ""
                if w:
                    msg = " (* %s = %s loss)" % (_g(w), _g(self.f(w * self.f(v))))
                log.info("    %s net output #%d: %s = %s%s", kind, k, name, _g(v), msg)
                k += 1

    def _raise_non_finite(self, loss):
        net = self.net
        culprit = "no layer output is non-finite (a layer's loss itself overflowed)"
        for name, layer, tops, top_names in zip(net.layer_names, net.layers, net.top_vecs,
                                                net.top_names.values()):
            for top, tname in zip(tops, top_names):
                if top.count and not bool(top.xp.isfinite(top.data).all()):
                    culprit = "first non-finite output: layer %r (type %s), top %r" % (name, layer.type, tname)
                    break
            else:
                continue
            break
        raise SolverError("iteration %d: the training loss is %s; %s. Lower base_lr, check the data, "
                          "or set clip_gradients." % (self.iter, loss, culprit))

    def solve(self, resume_file=None):
        """Caffe's Solver::Solve: step to max_iter, snapshot, final display/test."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self.step(p.max_iter - self.iter)
        start_iter = self._ring_start
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_prefilled()
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            log.info("Iteration %d, loss = %s", self.iter, _g(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- testing -------------------------------------------------------------------
    def test_all(self):
        """Run every test net; returns a list (one per test net) of
        ``[(output name, mean value), ...]`` in Caffe's score order."""
        results = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    def test(self, test_net_id=0):
        """Caffe's Solver::Test: share the train weights, forward test_iter
        times, log the mean of every output element."""
        f = self.f
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        n_iter = self.param.test_iter[test_net_id]
        scores = None
        loss = f(0)
        for i in range(n_iter):
            request = self._requested_action()
            while request != "none":
                if request == "snapshot":
                    self.snapshot()
                elif request == "stop":
                    self.requested_early_exit = True
                request = self._requested_action()
            if self.requested_early_exit:
                break
            iter_loss = net.forward_prefilled()
            if self.param.test_compute_loss:
                loss = f(loss + f(iter_loss))
            values = [_host(b.data).ravel().astype(self._dtype) for b in net.output_blobs]
            flat = numpy.concatenate(values) if values else numpy.zeros(0, self._dtype)
            if scores is None:
                scores = flat.copy()
            else:
                scores += flat
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return []
        if self.param.test_compute_loss:
            loss = f(loss / f(n_iter))
            log.info("Test loss: %s", _g(loss))
        names = []
        for name, blob in zip(net.outputs, net.output_blobs):
            names.extend([name] * blob.count)
        weights = net.blob_loss_weights
        results = []
        if scores is None:
            scores = numpy.zeros(len(names), self._dtype)
        for k, (name, total) in enumerate(zip(names, scores)):
            mean = f(total / f(n_iter))
            w = f(weights.get(name, 0.0))
            msg = " (* %s = %s loss)" % (_g(w), _g(f(w * mean))) if w else ""
            log.info("    Test net output #%d: %s = %s%s", k, name, _g(mean), msg)
            results.append((name, float(mean)))
        return results

    # -- snapshots -----------------------------------------------------------------
    def snapshot_filename(self, extension):
        """``snapshot_prefix + "_iter_" + iter + extension`` (Caffe's SnapshotFilename)."""
        return "%s_iter_%d%s" % (self.param.snapshot_prefix, self.iter, extension)

    def snapshot(self):
        """Write the weights and the solver state; returns their paths.
        In a data-parallel run every rank calls it and rank 0 writes."""
        from . import checkpoint
        if self._sync is not None:
            return self._sync.snapshot(checkpoint.snapshot)
        return checkpoint.snapshot(self)

    def restore(self, path):
        """Load a ``.solverstate`` / ``.solverstate.h5`` (chosen by the ``.h5`` suffix)."""
        from . import checkpoint
        checkpoint.restore(self, path)

    def share_weights(self, net):
        """pycaffe's share_weights: ``net`` uses this solver's train weights."""
        net.share_trained_layers_with(self.net)

    def __repr__(self):
        return "<netlib.%s iter=%d net=%r>" % (type(self).__name__, self.iter, self.net.name if self.net else None)


def _host(array):
    from .backend import to_numpy
    return to_numpy(array)


def _g(value):
    """C++ ostream's default float format (%g, 6 significant digits)."""
    return "%g" % float(value)


def _pow(x, y):
    try:
        return math.pow(x, y)
    except (OverflowError, ValueError):
        return float(numpy.power(numpy.float64(x), numpy.float64(y)))


def _exp(x):
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# -- the update rules --------------------------------------------------------------
@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum: ``h = m*h + r*g; w -= h``."""

    def compute_update_value(self, i, rate):
        blob = self.net.learnable_params[i]
        h = self.history[i].data
        local_rate = self._local_rate(i, rate)
        momentum = self.f(self.param.momentum)
        # caffe_cpu_axpby: y = b*y, then y += a*x
        h *= momentum
        h += local_rate * blob.diff
        blob.diff[...] = h


@register_solver("Nesterov")
class NesterovSolver(Solver):
    """Nesterov momentum: ``h' = m*h + r*g; w -= (1+m)*h' - m*h``."""

    def compute_update_value(self, i, rate):
        f = self.f
        blob = self.net.learnable_params[i]
        h = self.history[i].data
        local_rate = self._local_rate(i, rate)
        momentum = f(self.param.momentum)
        old = h.copy()
        h *= momentum
        h += local_rate * blob.diff
        # update = (1+m)*h_new + (-m)*h_old, as axpby(1+m, h, -m, update)
        old *= f(-momentum)
        old += f(f(1) + momentum) * h
        blob.diff[...] = old


@register_solver("AdaGrad")
class AdaGradSolver(Solver):
    """AdaGrad: ``h += g^2; w -= r*g/(sqrt(h)+delta)``; momentum must be 0."""

    def check_param(self):
        if self.param.momentum != 0:
            raise ConfigError("%sMomentum cannot be used with AdaGrad (momentum: %g)"
                              % (self._where, self.param.momentum))

    def compute_update_value(self, i, rate):
        f = self.f
        blob = self.net.learnable_params[i]
        xp = blob.xp
        h = self.history[i].data
        g = blob.diff
        h += g * g
        upd = xp.sqrt(h)
        upd += f(self.param.delta)
        xp.divide(g, upd, out=upd)
        g[...] = self._local_rate(i, rate) * upd


@register_solver("RMSProp")
class RMSPropSolver(Solver):
    """RMSProp: ``h = d*h + (1-d)*g^2; w -= r*g/(sqrt(h)+delta)``."""

    def check_param(self):
        if self.param.momentum != 0:
            raise ConfigError("%sMomentum cannot be used with RMSProp (momentum: %g)"
                              % (self._where, self.param.momentum))
        if not 0 <= self.param.rms_decay < 1:
            raise ConfigError("%srms_decay should lie between 0 and 1 (got %g)"
                              % (self._where, self.param.rms_decay))

    def compute_update_value(self, i, rate):
        f = self.f
        blob = self.net.learnable_params[i]
        xp = blob.xp
        h = self.history[i].data
        g = blob.diff
        decay = f(self.param.rms_decay)
        h *= decay
        h += f(f(1) - decay) * (g * g)
        upd = xp.sqrt(h)
        upd += f(self.param.delta)
        xp.divide(g, upd, out=upd)
        g[...] = self._local_rate(i, rate) * upd


@register_solver("AdaDelta")
class AdaDeltaSolver(Solver):
    """AdaDelta (``momentum`` is the decay): ``h1 = m*h1+(1-m)g^2;
    u = g*sqrt((h2+delta)/(h1+delta)); h2 = m*h2+(1-m)u^2; w -= r*u``.
    History: [h1 for each param..., h2 for each param...]."""

    def _pre_solve(self):
        super()._pre_solve()
        self._add_history_set()  # the second set: [first..., second...]

    def compute_update_value(self, i, rate):
        f = self.f
        blob = self.net.learnable_params[i]
        xp = blob.xp
        n = len(self.net.learnable_params)
        h1 = self.history[i].data
        h2 = self.history[n + i].data
        g = blob.diff
        m = f(self.param.momentum)
        one_m = f(f(1) - m)
        delta = f(self.param.delta)
        h1 *= m
        h1 += one_m * (g * g)
        upd = h2 + delta
        upd /= (h1 + delta)
        xp.sqrt(upd, out=upd)
        g *= upd
        h2 *= m
        h2 += one_m * (g * g)
        g *= self._local_rate(i, rate)


@register_solver("Adam")
class AdamSolver(Solver):
    """Adam (beta1 = momentum, beta2 = momentum2, eps = delta), t = iter+1:
    ``m = b1*m+(1-b1)g; v = b2*v+(1-b2)g^2;
    w -= r*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)`` (eps on the uncorrected
    sqrt(v), as Caffe).  History: [m for each param..., v for each param...]."""

    def _pre_solve(self):
        super()._pre_solve()
        self._add_history_set()  # the second set: [first..., second...]

    def compute_update_value(self, i, rate):
        f = self.f
        blob = self.net.learnable_params[i]
        xp = blob.xp
        n = len(self.net.learnable_params)
        m = self.history[i].data
        v = self.history[n + i].data
        g = blob.diff
        b1, b2 = f(self.param.momentum), f(self.param.momentum2)
        t = self.iter + 1
        correction = f(math.sqrt(1.0 - float(b2) ** t) / (1.0 - float(b1) ** t))
        m *= b1
        m += f(f(1) - b1) * g
        v *= b2
        v += f(f(1) - b2) * (g * g)
        upd = xp.sqrt(v)
        upd += f(self.param.delta)
        xp.divide(m, upd, out=upd)
        g[...] = f(self._local_rate(i, rate) * correction) * upd
