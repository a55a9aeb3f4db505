"""The ``netlib`` command: Caffe's ``caffe`` tool (tools/caffe.cpp) in Python.

Commands::

    netlib train --solver S [--weights W1,W2 | --snapshot STATE] [--level L --stage a,b]
                 [--sigint_effect stop|snapshot|none] [--sighup_effect ...] [--gpu 0]
    netlib test  --model M --weights W [--iterations 50] [--level L --stage a,b]
    netlib time  --model M [--iterations 50] [--phase TRAIN|TEST] [--memory]
    netlib device_query
    netlib data mnist [--from DIR] [--out DIR]      # IDX files -> HDF5 for LeNet
    netlib data digits [--out DIR]                  # the bundled 8x8 digits -> HDF5
    netlib export-onnx MODEL WEIGHTS OUT.onnx [--opset 13]   # a deploy net -> ONNX

Flags are gflags-style: ``--flag=value``, ``--flag value`` and ``-flag value``
all work, anywhere on the line.  ``--log FILE`` copies the log to FILE.

Log lines go to stderr in glog's format
(``I1123 10:00:00.123456 12345 solver.py:612] Iteration 100, lr = 0.00992565``)
so Caffe's ``tools/extra/parse_log.py`` / ``parse_log.sh`` read them.  A
progress bar (tqdm, on stderr) runs during train and test when stderr is a
terminal and neither ``CI`` nor ``NETLIB_NO_PROGRESS`` is set
(``NETLIB_PROGRESS=1`` forces it on).  Any error prints one line
``netlib: error: ...`` and exits with status 1 (``NETLIB_DEBUG=1`` adds the
traceback).  SIGINT and SIGHUP are handed to the solver as Caffe does
(defaults: SIGINT stops, SIGHUP snapshots).
"""
import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("netlib")

COMMANDS = ("train", "test", "time", "device_query", "data", "export-onnx")

#: Caffe's other binaries and tools/extra scripts: ``netlib NAME ARGS`` runs
#: ``main(ARGS)`` of the module, which parses its own (gflags-style) flags.
TOOLS = {
    "convert_imageset": "netlib.tools.convert_imageset",
    "compute_image_mean": "netlib.tools.compute_image_mean",
    "extract_features": "netlib.tools.extract_features",
    "parse_log": "netlib.tools.parse_log",
    "plot_training_log": "netlib.tools.plot_log",
    "draw_net": "netlib.tools.draw_net",
}

USAGE = """usage: netlib <command> <args>

commands:
  train           train or finetune a model
  test            score a model
  time            benchmark model execution time
  device_query    show CPU/NumPy and GPU (CuPy) information
  data            prepare data sets: 'data mnist [--from DIR] [--out DIR] [--backend lmdb|leveldb|hdf5]',
                  'data cifar10 --from DIR [--out DIR] [--backend lmdb|leveldb]', 'data digits [--out DIR]'
  export-onnx MODEL WEIGHTS OUT.onnx [--opset 13]  write a deploy net with its weights as ONNX
                  (needs pip install onnx; WEIGHTS may be '-' for the net's fillers)
  convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME    images -> LMDB/LevelDB of Datums
  compute_image_mean [--backend lmdb|leveldb] DB [MEAN.binaryproto]
  extract_features WEIGHTS MODEL BLOB1,BLOB2 DB1,DB2 NUM_BATCHES [lmdb|leveldb|hdf5]
  parse_log LOGFILE OUTPUT_DIR [--delimiter ,]               training log -> .train/.test CSV tables
  plot_training_log CHART_TYPE OUT.png|svg LOG1 [LOG2 ...]  (netlib <tool> --help for each tool's flags)
  draw_net NET.prototxt OUT.png|svg|dot [--rankdir LR] [--phase TRAIN|TEST|ALL] [--display_lrm]
  run SCRIPT.py [ARGS...] | run -m MODULE [ARGS...]   run an unchanged pycaffe script ('import caffe' gives netlib)

flags (--flag=value, --flag value or -flag value):
  --solver        the solver definition protocol buffer text file
  --model         the model definition protocol buffer text file
  --weights       comma-separated .caffemodel/.h5 weights to start from (train: finetune; test: required);
                  cannot be combined with --snapshot
  --snapshot      the solver state to resume training from
  --iterations    the number of iterations to run (test, time; default 50)
  --memory        time: instead of timing, print the bytes the net needs (weights, activations
                  with and without reuse, conv workspace) and what one reuse forward holds
  --phase         network phase (TRAIN or TEST); used by time (default TRAIN) and test (default TEST)
  --level         network level (default 0)
  --stage         comma-separated network stages
  --gpu           GPU device ids ('0', '0,1' or 'all'). Several: train starts one process per GPU over
                  NCCL (under mpirun, rank r takes the r-th id). Default: CPU
  --sigint_effect action on SIGINT during train: stop, snapshot or none (default stop)
  --sighup_effect action on SIGHUP during train: stop, snapshot or none (default snapshot)
  --log           also write the log to this file
  --forbid_python_layers  refuse nets with Python layers (type "Python") before importing any module
  --from, --out   folders for 'netlib data'
  --opset         export-onnx: the ONNX opset to write (13 to 17; default 13)
"""


class UsageError(Exception):
    """A bad command line (reported as one line, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _build_parser():
    p = _Parser(prog="netlib", add_help=False, allow_abbrev=False)
    p.add_argument("command", nargs="?")
    p.add_argument("rest", nargs="*")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--solver", default="")
    p.add_argument("--model", default="")
    p.add_argument("--weights", default="")
    p.add_argument("--snapshot", default="")
    p.add_argument("--iterations", type=_int32("--iterations"), default=50)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--phase", default="")
    p.add_argument("--level", type=_int32("--level"), default=0)
    p.add_argument("--stage", default="")
    p.add_argument("--gpu", default="")
    p.add_argument("--sigint_effect", default="stop")
    p.add_argument("--sighup_effect", default="snapshot")
    p.add_argument("--log", default="")
    p.add_argument("--from", dest="from_dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--forbid_python_layers", action="store_true")
    p.add_argument("--opset", type=_int32("--opset"), default=13)
    return p


def tool_parser(prog, usage):
    """An argparse parser for a ``netlib <tool>`` subcommand: errors raise
    UsageError (one line, exit 1); ``--help`` prints ``usage`` and exits 0."""
    p = _Parser(prog="netlib " + prog, usage=usage, add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    return p


def parse_tool_args(parser, argv):
    """Parse gflags-style ``argv`` (``-flag v``, ``--flag=v``, anywhere) with
    ``parser``; returns None after printing the usage for ``--help``."""
    args = parser.parse_intermixed_args(normalize_argv(argv))
    if args.help:
        sys.stdout.write(parser.usage.rstrip() + "\n")
        return None
    return args


def backend_flag(value):
    """A tool's ``--backend`` value as 'lmdb' or 'leveldb' (UsageError otherwise)."""
    from ..data.db import backend_name
    from ..errors import ConfigError
    try:
        return backend_name(value)
    except ConfigError:
        raise UsageError("--backend must be lmdb or leveldb, got %r" % (value,)) from None


def normalize_argv(argv):
    """gflags spellings -> argparse: ``-flag`` becomes ``--flag``."""
    out = []
    for arg in argv:
        if (len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[1].isalpha()):
            arg = "-" + arg
        out.append(arg)
    return out


def _int32(flag):
    """An argparse type: an integer that fits Caffe's int32 flags."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%s takes an integer, got %r" % (flag, text)) from None
        if not -2 ** 31 <= value < 2 ** 31:
            raise argparse.ArgumentTypeError("%s %s is out of range (a 32-bit integer, as Caffe's flag)"
                                             % (flag, text))
        return value
    return parse


def parse_args(argv):
    args = _build_parser().parse_intermixed_args(normalize_argv(argv))
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\0" in v for v in values):     # no file name can hold one
            raise UsageError("argument %s contains a NUL byte"
                             % ("--" + name if name not in ("command", "rest") else name))
    for name in ("sigint_effect", "sighup_effect"):
        value = getattr(args, name).lower()
        if value not in ("stop", "snapshot", "none"):
            raise UsageError("--%s must be stop, snapshot or none, got %r" % (name, getattr(args, name)))
        setattr(args, name, value)
    if args.phase:
        if args.phase.upper() not in ("TRAIN", "TEST"):
            raise UsageError("--phase must be TRAIN or TEST, got %r" % args.phase)
        args.phase = args.phase.upper()
    args.stages = [s for s in args.stage.split(",") if s] if args.stage else []
    return args


# -- logging ---------------------------------------------------------------------------
_LEVEL_CHARS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    """glog's line prefix: ``I1123 10:00:00.123456 12345 file.py:123] message``
    (level letter, month+day, local time with microseconds, thread id,
    source file:line).  Caffe's parse_log.py / extract_seconds.py read it."""

    def format(self, record):
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        prefix = "%s%02d%02d %02d:%02d:%02d.%06d %5d %s:%d] " % (
            _LEVEL_CHARS.get(record.levelno, "I"), t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min,
            t.tm_sec, micros, threading.get_native_id(), record.filename, record.lineno)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return prefix + message


class _Progress:
    """The active tqdm bar (None when off); log lines print above it."""
    bar = None


class _StderrHandler(logging.StreamHandler):
    """Writes log lines intact, above the progress bar when one is shown."""

    def emit(self, record):
        try:
            msg = self.format(record)
            bar = _Progress.bar
            if bar is not None:
                from tqdm import tqdm
                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
                self.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def progress_enabled(stream=None):
    """Progress bars: forced by NETLIB_PROGRESS=1, off with CI or
    NETLIB_NO_PROGRESS set or when stderr is not a terminal."""
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("NETLIB_PROGRESS", "") not in ("", "0"):
        return True
    if os.environ.get("CI") or os.environ.get("NETLIB_NO_PROGRESS"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_bar(total, initial=0, desc=""):
    """A tqdm bar on stderr (or None when progress is off)."""
    if not progress_enabled():
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
               leave=False, unit="it")
    _Progress.bar = bar
    try:
        yield bar
    finally:
        _Progress.bar = None
        bar.close()


@contextlib.contextmanager
def logging_to(log_file):
    """Route the 'netlib' logger to stderr (and ``log_file``) for one command."""
    logger = logging.getLogger("netlib")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    formatter = GlogFormatter()
    handlers = [_StderrHandler(sys.stderr)]
    if log_file:
        folder = os.path.dirname(os.path.abspath(log_file))
        if not os.path.isdir(folder):
            from ..errors import NetlibFileNotFoundError
            raise NetlibFileNotFoundError("--log %s: folder %s does not exist" % (log_file, folder))
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(formatter)
    logger.handlers = handlers
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        for h in handlers:
            with contextlib.suppress(Exception):
                h.flush()
            if isinstance(h, logging.FileHandler):
                h.close()
        logger.level, logger.propagate = saved[0], saved[1]
        logger.handlers = saved[2]


# -- devices ---------------------------------------------------------------------------
def _parse_gpus(text):
    from ..errors import ConfigError
    from .. import backend
    if text == "all":
        if backend.cupy is None:
            raise ConfigError("--gpu all: CuPy is not installed (pip install cupy-cuda12x)")
        return list(range(backend.cupy.cuda.runtime.getDeviceCount()))
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError("--gpu takes device ids such as 0 or 0,1 or 'all', got %r" % text) from None


def _check_devices(gpus):
    """Every id names a CUDA device (before processes start for them)."""
    from ..errors import ConfigError
    from .. import backend
    backend.set_mode_gpu()             # the clear "needs CuPy / no device" errors
    count = backend.cupy.cuda.runtime.getDeviceCount()
    bad = [g for g in gpus if not 0 <= g < count]
    if bad:
        raise ConfigError("--gpu %s: there %s %d CUDA device%s (ids 0..%d)" % (
            ",".join(str(g) for g in gpus), "is" if count == 1 else "are", count, "" if count == 1 else "s",
            count - 1))


def select_device(gpu_flag, solver_param=None, rank=None):
    """Caffe's device choice: --gpu wins; else a solver file that explicitly
    says ``solver_mode: GPU`` asks for its ``device_id`` (netlib falls back to
    the CPU with a warning when CuPy is missing); else the CPU.  Rank r of a
    data-parallel run (MPI, or ``rank`` of an NCCL run) takes the r-th id."""
    from .. import backend
    gpus = _parse_gpus(gpu_flag) if gpu_flag else []
    explicit = bool(gpus)
    if not gpus and solver_param is not None and solver_param.HasField("solver_mode") \
            and solver_param.solver_mode == solver_param.GPU:
        gpus = [solver_param.device_id]
    if not gpus:
        log.info("Use CPU.")
        backend.set_mode_cpu()
        return None
    if backend.cupy is None and not explicit:
        log.warning("The solver asks for solver_mode: GPU but CuPy is not installed; using the CPU.")
        backend.set_mode_cpu()
        return None
    if backend.cupy is None:
        backend.set_mode_gpu()             # the clear "needs CuPy" error, before anything else
    from .. import parallel
    w = parallel.world()
    if len(gpus) > 1 and w is None and rank is None:
        from ..errors import ConfigError
        raise ConfigError("--gpu %s: several GPUs need NCCL (CuPy built with it; has_nccl() is False here) or "
                          "MPI: mpirun -n %d netlib train --solver ... --gpu %s (rank r uses the r-th id)"
                          % (gpu_flag, len(gpus), gpu_flag))
    if rank is not None:
        device = gpus[rank % len(gpus)]
    else:
        device = gpus[w.rank % len(gpus)] if w is not None else gpus[0]
    log.info("Using GPUs %s", ", ".join(str(g) for g in gpus))
    backend.set_mode_gpu()
    backend.set_device(device)
    return device


def _synchronize():
    from .. import backend
    if backend.default_xp() is not __import__("numpy") and backend.cupy is not None:
        backend.cupy.cuda.Device().synchronize()


# -- signals ---------------------------------------------------------------------------
class SignalHandler:
    """Caffe's SignalHandler: SIGINT/SIGHUP set a flag that the solver reads
    through ``action_request()`` after each iteration.  A second SIGINT while
    a stop is still pending aborts at once (KeyboardInterrupt)."""

    def __init__(self, sigint_effect="stop", sighup_effect="snapshot"):
        self.effects = {"SIGINT": sigint_effect, "SIGHUP": sighup_effect}
        self.pending = {"SIGINT": False, "SIGHUP": False}
        self._saved = {}

    def _on_signal(self, signum, frame):
        name = "SIGHUP" if signum == getattr(signal, "SIGHUP", None) else "SIGINT"
        if name == "SIGINT" and self.pending["SIGINT"] and self.effects["SIGINT"] == "stop":
            raise KeyboardInterrupt
        self.pending[name] = True

    def action_request(self):
        for name in ("SIGINT", "SIGHUP"):
            if self.pending[name]:
                self.pending[name] = False
                effect = self.effects[name]
                if effect != "none":
                    log.info("Received %s: %s requested", name, effect)
                return effect
        return "none"

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved.clear()


# -- commands --------------------------------------------------------------------------
def _need(flag, value, what):
    if not value:
        raise UsageError("%s needs --%s (%s)" % (what, flag, {
            "solver": "a solver definition to train", "model": "a model definition",
            "weights": "model weights to score"}.get(flag, flag)))


def _make_solver(param, path):
    from ..solver import get_solver
    return get_solver(param, solver_path=path)


def _child_argv(argv):
    """``argv`` for the other ranks of a ``--gpu a,b`` run: the same, less
    ``--log`` (rank 0 alone writes the log)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log":
            skip = True
        elif not a.startswith("--log="):
            out.append(a)
    return out


def cmd_train(args):
    """``netlib train``; with ``--gpu a,b`` and no mpirun, one process per GPU over NCCL (netlib.nccl)."""
    from .. import nccl, parallel
    parallel.world()        # under mpirun: rank and size first, so only rank 0 logs from here on
    joined = nccl.environment_rank()
    if joined is not None and joined[0] > 0:
        logging.getLogger("netlib").setLevel(logging.WARNING)
    gpus = _parse_gpus(args.gpu) if args.gpu else []
    children = []
    if joined is None and len(gpus) > 1 and parallel.world() is None and nccl.has_nccl():
        _need("solver", args.solver, "train")
        _check_devices(gpus)
        children, joined = nccl.start_ranks(_child_argv(getattr(args, "argv", [])), gpus)
    failed = True
    try:
        code = _train(args, joined)
        failed = False
    finally:
        status = nccl.join_ranks(children, failed) if children else 0
    if status:
        from ..errors import SolverError
        raise SolverError("--gpu %s: another rank ended with status %d (its error is above)" % (args.gpu, status))
    return code


def _train(args, joined):
    from ..solver import read_solver
    from .. import parallel
    _need("solver", args.solver, "train")
    if args.snapshot and args.weights:
        raise UsageError("give --snapshot to resume training or --weights to finetune, not both")
    param, path = read_solver(args.solver)
    param.train_state.level = args.level
    for s in args.stages:
        param.train_state.stage.append(s)
    if args.snapshot:
        param.ClearField("weights")
        if not os.path.isfile(args.snapshot):
            from ..errors import NetlibFileNotFoundError
            raise NetlibFileNotFoundError("--snapshot %s: no such solver state file" % args.snapshot)
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    select_device(args.gpu, param, rank=joined[0] if joined else None)
    if joined:
        from ..nccl import NcclWorld
        parallel.set_world(NcclWorld(joined[1], joined[2], joined[0]))
    with SignalHandler(args.sigint_effect, args.sighup_effect) as handler:
        log.info("Starting Optimization")
        solver = _make_solver(param, path)
        solver.action_request = handler.action_request
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            solver.restore(args.snapshot)
        with progress_bar(solver.param.max_iter, initial=min(solver.iter, solver.param.max_iter),
                          desc="train") as bar:
            if bar is not None:
                def _tick(s, bar=bar):
                    bar.set_postfix_str("loss=%.4g" % float(getattr(s, "smoothed_loss", 0.0)), refresh=False)
                    delta = min(s.iter, bar.total) - bar.n
                    if delta > 0:
                        bar.update(delta)  # redraws at most every 0.1 s
                solver.iteration_callbacks.append(_tick)
            solver.solve()
    if solver._sync is not None:
        log.info("Data-parallel: %s", solver._sync.summary())
    log.info("Optimization Done.")
    return 0


def cmd_test(args):
    import numpy
    from .. import Net
    from ..backend import to_numpy
    _need("model", args.model, "test")
    _need("weights", args.weights, "test")
    if args.iterations <= 0:
        raise UsageError("--iterations must be positive, got %d" % args.iterations)
    select_device(args.gpu)
    phase = args.phase or "TEST"
    net = Net(args.model, phase, level=args.level, stages=args.stages)
    for w in args.weights.split(","):
        if w:
            net.copy_from(w)
    log.info("Running for %d iterations.", args.iterations)
    scores, names = None, []
    total_loss = 0.0
    with progress_bar(args.iterations, desc="test") as bar:
        for i in range(args.iterations):
            loss = net.forward_prefilled()
            total_loss += loss
            values, names = [], []
            for name, blob in zip(net.outputs, net.output_blobs):
                v = to_numpy(blob.data).ravel().astype(numpy.float32)
                values.append(v)
                names.extend([name] * v.size)
                for x in v:
                    log.info("Batch %d, %s = %s", i, name, _g(x))
            flat = numpy.concatenate(values) if values else numpy.zeros(0, numpy.float32)
            scores = flat.astype(numpy.float64) if scores is None else scores + flat
            if bar is not None:
                bar.update(1)
    log.info("Loss: %s", _g(total_loss / args.iterations))
    weights = net.blob_loss_weights
    for name, total in zip(names, scores if scores is not None else []):
        mean = total / args.iterations
        w = weights.get(name, 0.0)
        suffix = " (* %s = %s loss)" % (_g(w), _g(w * mean)) if w else ""
        log.info("%s = %s%s", name, _g(mean), suffix)
    return 0


def cmd_time(args):
    from .. import Net
    _need("model", args.model, "time")
    if args.iterations <= 0:
        raise UsageError("--iterations must be positive, got %d" % args.iterations)
    select_device(args.gpu)
    phase = args.phase or "TRAIN"
    net = Net(args.model, phase, level=args.level, stages=args.stages)
    if args.memory:
        return _time_memory(net)
    log.info("Performing Forward")
    loss = net.forward_prefilled()
    log.info("Initial loss: %s", _g(loss))
    log.info("Performing Backward")
    net.backward_from_to(len(net.layers) - 1, 0)
    layers = net.layers
    n = len(layers)
    fwd = [0.0] * n
    bwd = [0.0] * n
    forward_total = backward_total = 0.0
    skipped = set()
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", args.iterations)
    clock = time.perf_counter
    total_start = clock()
    for j in range(args.iterations):
        iter_start = clock()
        for i in range(n):
            t0 = clock()
            net.forward_from_to(i, i)
            _synchronize()
            fwd[i] += clock() - t0
        forward_total += clock() - iter_start
        back_start = clock()
        for i in range(n - 1, -1, -1):
            t0 = clock()
            # Caffe's time runs every layer's Backward, needed or not.
            if net.layer_need_backward[i]:
                net.backward_from_to(i, i)
            elif i not in skipped:
                try:
                    layers[i].Backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
                except Exception:  # a layer that cannot run a backward it never needs
                    skipped.add(i)
            _synchronize()
            bwd[i] += clock() - t0
        backward_total += clock() - back_start
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1, _g((clock() - iter_start) * 1e3))
    total = (clock() - total_start) * 1e3
    it = args.iterations
    log.info("Average time per layer: ")
    for i, name in enumerate(net.layer_names):
        log.info("%10s\tforward: %s ms.", name, _g(fwd[i] * 1e3 / it))
        log.info("%10s\tbackward: %s ms.", name, _g(bwd[i] * 1e3 / it))
    log.info("Average Forward pass: %s ms.", _g(forward_total * 1e3 / it))
    log.info("Average Backward pass: %s ms.", _g(backward_total * 1e3 / it))
    log.info("Average Forward-Backward: %s ms.", _g(total / it))
    log.info("Total Time: %s ms.", _g(total))
    log.info("*** Benchmark ends ***")
    return 0


def _time_memory(net):
    """``time --memory``: the estimate (from shapes, before a forward), then
    the buffers one forward with ``reuse_memory()`` holds and the peak RSS."""
    from ..memory import format_estimate
    log.info("Memory estimate (before any forward):")
    for line in format_estimate(net.memory_estimate()):
        log.info("  %s", line)
    net.reuse_memory()
    log.info("Performing Forward with reuse_memory()")
    net.forward_prefilled()
    used = net.memory_usage()
    for key in ("weights", "activations", "workspace", "diffs"):
        log.info("  %-20s %10.2f MiB held", key, used[key] / 2.0 ** 20)
    try:
        with open("/proc/self/status") as f:
            peak = [l.split()[1] for l in f if l.startswith("VmHWM")]
        if peak:
            log.info("Peak resident memory (VmHWM): %.1f MiB", int(peak[0]) / 1024.0)
    except OSError:  # not Linux
        pass
    return 0


def cmd_device_query(args):
    import platform
    import numpy
    from .. import backend, __version__
    log.info("netlib %s, Python %s, NumPy %s", __version__, platform.python_version(), numpy.__version__)
    log.info("CPU: %s (%s), %d logical cores", platform.processor() or platform.machine(),
             platform.machine(), os.cpu_count() or 0)
    try:
        config = numpy.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        if blas:
            log.info("BLAS: %s %s", blas.get("name", "?"), blas.get("version", ""))
    except Exception:  # older NumPy has no mode="dicts"
        pass
    if backend.cupy is None:
        log.info("CuPy is not installed: no GPU backend (pip install cupy-cuda12x)")
        if args.gpu:
            from ..errors import ConfigError
            raise ConfigError("--gpu %s: CuPy is not installed" % args.gpu)
        return 0
    cupy = backend.cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        log.info("CuPy %s is installed but no CUDA device is usable: %s", cupy.__version__, exc)
        return 0
    wanted = _parse_gpus(args.gpu) if args.gpu else list(range(count))
    for d in wanted:
        if not 0 <= d < count:
            from ..errors import ConfigError
            raise ConfigError("--gpu %d: there are %d CUDA devices" % (d, count))
        prop = cupy.cuda.runtime.getDeviceProperties(d)
        name = prop.get("name", b"?")
        name = name.decode() if isinstance(name, bytes) else name
        log.info("Device id:                     %d", d)
        log.info("Name:                          %s", name)
        log.info("Major revision number:         %s", prop.get("major"))
        log.info("Minor revision number:         %s", prop.get("minor"))
        log.info("Total global memory:           %s", prop.get("totalGlobalMem"))
        log.info("Number of multiprocessors:     %s", prop.get("multiProcessorCount"))
        log.info("Clock rate:                    %s", prop.get("clockRate"))
    return 0


def cmd_data(args):
    if not args.rest:
        raise UsageError("data needs a data set name: 'netlib data mnist' or 'netlib data digits'")
    what = args.rest[0]
    if len(args.rest) > 1:
        raise UsageError("unexpected arguments after 'data %s': %s" % (what, " ".join(args.rest[1:])))
    if what == "mnist":
        from . import mnist
        out = args.out or os.path.join("data", "mnist")
        train, test = mnist.convert(args.from_dir, out, backend=args.backend or "lmdb")
        log.info("MNIST ready: %s and %s", train, test)
        return 0
    if what == "cifar10":
        from . import cifar10
        if not args.from_dir:
            raise UsageError("data cifar10 needs --from DIR, the folder of the CIFAR-10 binary batches "
                             "(data_batch_1.bin ... test_batch.bin)")
        out = args.out or os.path.join("data", "cifar10")
        train, test = cifar10.convert(args.from_dir, out, backend=args.backend or "lmdb")
        log.info("CIFAR-10 ready: %s and %s", train, test)
        return 0
    if what == "digits":
        from .. import datasets
        out = args.out or os.path.join("models", "digits")
        train, test = datasets.write_digits_hdf5(out)
        log.info("Digits ready: %s and %s", train, test)
        return 0
    raise UsageError("unknown data set %r (mnist, cifar10, digits)" % what)


def _g(value):
    """C++ ostream's default float format (%g, 6 significant digits)."""
    return "%g" % float(value)


def cmd_export_onnx(args):
    """``export-onnx MODEL WEIGHTS OUT.onnx``: the TEST-phase net, its weights, as ONNX."""
    if len(args.rest) != 3:
        raise UsageError("export-onnx needs MODEL WEIGHTS OUT.onnx (WEIGHTS may be '-' for none)")
    model, weights, out = args.rest
    from ..net import Net
    from ..onnx_export import export_onnx
    net = Net(model, "TEST", weights=None if weights == "-" else weights)
    export_onnx(net, out, opset=args.opset)
    log.info("Wrote %s (inputs %s, outputs %s)", out, ", ".join(net.inputs), ", ".join(net.outputs))
    return 0


_HANDLERS = {"train": cmd_train, "test": cmd_test, "time": cmd_time,
             "device_query": cmd_device_query, "data": cmd_data, "export-onnx": cmd_export_onnx}


def _one_line(text):
    """The message on one line, printable on any stream (undecodable
    arguments, kept by Python as surrogates, are shown escaped)."""
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv=None):
    """The ``netlib`` command: returns its exit code.  In a data-parallel
    run (mpirun) a failing rank prints its line (prefixed with its rank) and
    ends the whole job, so no other rank waits for it forever."""
    code = _main(argv)
    if code:
        from .. import parallel
        parallel.abort_on_error(code)
    return code


def _rank_prefix():
    from .. import parallel
    w = parallel._world["world"]
    return "rank %d: " % w.rank if w is not None and w.size > 1 else ""


def _main(argv=None):
    """Run the ``netlib`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from ..errors import NetlibError
    try:
        if argv and argv[0] == "run":
            from ..compat import run
            with logging_to(""):
                return run(argv[1:])
        if argv and argv[0] in TOOLS:
            import importlib
            tool = importlib.import_module(TOOLS[argv[0]])
            with logging_to(""):
                return tool.main(argv[1:])
        args = parse_args(argv)
        args.argv = argv
        if args.help or args.command == "help":
            sys.stdout.write(USAGE)
            return 0
        if not args.command:
            raise UsageError("no command given; one of %s (netlib --help)" % ", ".join(COMMANDS))
        if args.command not in _HANDLERS:
            raise UsageError("unknown command %r; one of %s (netlib --help)"
                             % (args.command, ", ".join(COMMANDS + tuple(TOOLS))))
        if args.rest and args.command not in ("data", "export-onnx"):
            raise UsageError("unexpected arguments: %s" % " ".join(args.rest))
        from ..python_layer import python_layers_allowed, set_python_layers_allowed
        allowed = python_layers_allowed()
        try:
            if args.forbid_python_layers:
                set_python_layers_allowed(False)
            with logging_to(args.log):
                return _HANDLERS[args.command](args)
        finally:
            set_python_layers_allowed(allowed)
    except KeyboardInterrupt:
        sys.stderr.write("netlib: interrupted\n")
        return 130
    except UsageError as exc:
        sys.stderr.write("netlib: error: %s%s\n" % (_rank_prefix(), _one_line(exc)))
        return 1
    except (NetlibError, OSError, MemoryError) as exc:
        if os.environ.get("NETLIB_DEBUG"):
            import traceback
            traceback.print_exc()
        sys.stderr.write("netlib: error: %s%s\n" % (_rank_prefix(), _one_line(exc)))
        return 1
    except Exception as exc:  # a bug: still one line, traceback on request
        if os.environ.get("NETLIB_DEBUG"):
            import traceback
            traceback.print_exc()
        sys.stderr.write("netlib: error: %s: %s (internal error; set NETLIB_DEBUG=1 for the traceback)\n"
                         % (type(exc).__name__, _one_line(exc)))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
