"""Time the non-convolution layers (InnerProduct, losses, LRN, BatchNorm/Scale,
element-wise and structural layers) at the shapes classic nets use.

    python benchmarks/bench_layers.py [--threads N] [--reps R] [--only TEXT]
                                      [--baseline REV] [--no-torch]

For every case it prints the median milliseconds of ``fwd`` (reshape +
forward) and ``f+b`` (reshape + forward + backward) of

* ``new``: the layer classes of the working tree,
* ``old``: the same layer types as they were at git revision ``--baseline``
  (default HEAD; the four family modules are read with ``git show`` and
  executed under private module names, so both versions live in this
  process and are timed interleaved: old, new, torch, old, new, ...),
* ``torch``: the PyTorch CPU equivalent (autograd for f+b), when importable,

and the ratios new/old and new/torch.  ``--nets resnet50,caffenet`` times
the same layer types inside whole training steps instead (old and new nets
stepped alternately; convolution and pooling are not counted) (``--memory``: the transient heap peak
of one reshape + forward + backward call, old and new, after warm-up).  Shapes: CaffeNet b16, VGG-16 b4,
ResNet-50 b8, GoogLeNet b8, CIFAR-10 quick b100, LeNet b64 (float32).
The machine may be shared: only the interleaved ratios mean much.
Not run by the tests.
"""
import argparse
import os
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP/torch threads")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (median)")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--baseline", default="HEAD", help="git revision of the 'old' layers ('' to skip)")
    ap.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    ap.add_argument("--nets", default="",
                    help="instead of the layer cases: build these bench_nets.py train nets (e.g. "
                         "resnet50,caffenet) once with the old and once with the new layer classes and "
                         "print the per-step time spent in the layer types of this benchmark")
    ap.add_argument("--batch", type=int, default=None, help="with --nets: the batch (default: bench_nets')")
    ap.add_argument("--memory", action="store_true",
                    help="also print the transient heap peak of one f+b call (tracemalloc; buffers a layer "
                         "keeps, and the shared scratch arrays once grown, are not counted)")
    return ap.parse_args()


ARGS = _args()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

import netlib.layer as layer_mod  # noqa: E402
from netlib.blob import Blob  # noqa: E402
from netlib.proto import caffe_pb2  # noqa: E402

torch = None
if not ARGS.no_torch:
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402
        torch.set_num_threads(ARGS.threads)
    except ImportError:  # pragma: no cover
        torch = None

FAMILIES = ("common", "loss", "neuron", "normalization")


def baseline_registry(rev):
    """Layer type -> class as of git revision ``rev`` (the current registry is left as it was)."""
    layer_mod._load_builtin_layers()
    current = dict(layer_mod._REGISTRY)
    try:
        for fam in FAMILIES:
            src = subprocess.run(["git", "show", "%s:netlib/builtin/%s.py" % (rev, fam)], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            name = "netlib.builtin._baseline_%s" % fam
            mod = types.ModuleType(name)
            mod.__package__ = "netlib.builtin"
            mod.__file__ = "<%s:%s>" % (rev, fam)
            sys.modules[name] = mod
            exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        return dict(layer_mod._REGISTRY)
    finally:
        layer_mod._REGISTRY.clear()
        layer_mod._REGISTRY.update(current)


def make_layer(cls, text, phase):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    return cls(lp, phase=phase)


# name, layer prototxt, bottom shapes, in place, phase, torch builder
def _lrn(n, alpha, beta):
    return lambda xs: F.local_response_norm(xs[0], n, alpha=alpha, beta=beta, k=1.0)


CASES = [
    ("CaffeNet fc6 9216->4096 b16", 'type:"InnerProduct" inner_product_param{num_output:4096}',
     [(16, 256, 6, 6)], False, 0, "linear"),
    ("CaffeNet fc7 4096->4096 b16", 'type:"InnerProduct" inner_product_param{num_output:4096}',
     [(16, 4096)], False, 0, "linear"),
    ("VGG fc6 25088->4096 b4", 'type:"InnerProduct" inner_product_param{num_output:4096}',
     [(4, 512, 7, 7)], False, 0, "linear"),
    ("LeNet ip1 800->500 b64", 'type:"InnerProduct" inner_product_param{num_output:500}',
     [(64, 50, 4, 4)], False, 0, "linear"),
    ("SoftmaxWithLoss 1000 b16", 'type:"SoftmaxWithLoss"', [(16, 1000), "label1000"], False, 0,
     lambda xs: F.cross_entropy(xs[0], xs[1])),
    ("Softmax 1000 b16", 'type:"Softmax"', [(16, 1000)], False, 1, lambda xs: torch.softmax(xs[0], 1)),
    ("Accuracy 1000 b100", 'type:"Accuracy"', [(100, 1000), "label1000"], False, 1, None),
    ("LRN CaffeNet 96x27x27 b16", 'type:"LRN" lrn_param{local_size:5 alpha:0.0001 beta:0.75}',
     [(16, 96, 27, 27)], False, 0, _lrn(5, 0.0001, 0.75)),
    ("LRN GoogLeNet 64x56x56 b8", 'type:"LRN" lrn_param{local_size:5 alpha:0.0001 beta:0.75}',
     [(8, 64, 56, 56)], False, 0, _lrn(5, 0.0001, 0.75)),
    ("LRN 96x55x55 b16", 'type:"LRN" lrn_param{local_size:5 alpha:0.0001 beta:0.75}',
     [(16, 96, 55, 55)], False, 0, _lrn(5, 0.0001, 0.75)),
    ("BatchNorm TRAIN 256x56x56 b8 (in place)", 'type:"BatchNorm"', [(8, 256, 56, 56)], True, 0,
     lambda xs: F.batch_norm(xs[0], None, None, training=True, eps=1e-5)),
    ("BatchNorm TRAIN 64x112x112 b8 (in place)", 'type:"BatchNorm"', [(8, 64, 112, 112)], True, 0,
     lambda xs: F.batch_norm(xs[0], None, None, training=True, eps=1e-5)),
    ("BatchNorm TEST 256x56x56 b8", 'type:"BatchNorm" batch_norm_param{use_global_stats:true}',
     [(8, 256, 56, 56)], True, 1, None),
    ("Scale+bias 256x56x56 b8 (in place)", 'type:"Scale" scale_param{bias_term:true}',
     [(8, 256, 56, 56)], True, 0, "scale"),
    ("ReLU 256x56x56 b8 (in place)", 'type:"ReLU"', [(8, 256, 56, 56)], True, 0,
     lambda xs: torch.relu(xs[0])),
    ("ReLU CaffeNet 96x55x55 b16 (in place)", 'type:"ReLU"', [(16, 96, 55, 55)], True, 0,
     lambda xs: torch.relu(xs[0])),
    ("Dropout TRAIN 4096 b16 (in place)", 'type:"Dropout"', [(16, 4096)], True, 0,
     lambda xs: F.dropout(xs[0], 0.5, training=True)),
    ("Eltwise SUM 256x56x56 b8", 'type:"Eltwise"', [(8, 256, 56, 56), (8, 256, 56, 56)], False, 0,
     lambda xs: xs[0] + xs[1]),
    ("Split x2 256x56x56 b8", 'type:"Split"', [(8, 256, 56, 56)], "split2", 0, None),
    ("Concat GoogLeNet 4 -> 256x28x28 b8", 'type:"Concat"',
     [(8, 64, 28, 28), (8, 128, 28, 28), (8, 32, 28, 28), (8, 32, 28, 28)], False, 0,
     lambda xs: torch.cat(xs, 1)),
]


class Runner:
    """One layer instance with its blobs, ready to time."""

    def __init__(self, cls, text, shapes, in_place, phase, rng_seed=0):
        rng = np.random.default_rng(rng_seed)
        self.bottom = []
        for s in shapes:
            b = Blob()
            if isinstance(s, str):   # labels for the previous bottom's classes
                n = int(s[len("label"):])
                b.reshape(self.bottom[0].shape[0])
                b.data[...] = rng.integers(0, n, b.shape)
            else:
                b.reshape(s)
                b.data[...] = rng.standard_normal(s, dtype=np.float32)
            self.bottom.append(b)
        self.x0 = [b.data.copy() for b in self.bottom]
        if in_place is True:
            self.top = [self.bottom[0]]
        elif in_place == "split2":
            self.top = [Blob(), Blob()]
        else:
            self.top = [Blob()]
        self.layer = make_layer(cls, text, phase)
        self.layer.SetUp(self.bottom, self.top)
        for t in self.top:
            t.diff[...] = rng.standard_normal(t.shape, dtype=np.float32) if t.count > 1 else 1
        self.in_place = in_place is True
        self.has_backward = type(self.layer).__name__ not in ("AccuracyLayer",) and phase == 0
        self.dy = [t.diff.copy() for t in self.top]

    def fwd(self):
        # In place the input is not restored: the timed layers map their
        # output to valid inputs (ReLU, BatchNorm, Scale by 1, Dropout's x2
        # growth stays finite over the repetitions).
        self.layer.reshape(self.bottom, self.top)
        self.layer.forward(self.bottom, self.top)

    def fwd_bwd(self):
        self.fwd()
        if self.has_backward:
            pd = [True] + [False] * (len(self.bottom) - 1) if "Loss" in self.layer.type else \
                [True] * len(self.bottom)
            self.layer.backward(self.top, pd, self.bottom)


def torch_fns(case, runner):
    name, text, shapes, in_place, phase, fn = case
    if torch is None or fn is None:
        return None
    xs = [torch.from_numpy(b.data.copy()) for b in runner.bottom]
    if isinstance(shapes[-1], str):
        xs[-1] = xs[-1].long()
    grads = [x for x in xs if x.dtype == torch.float32]
    for x in grads:
        x.requires_grad_(True)
    if fn == "linear":
        w = torch.from_numpy(runner.layer.blobs[0].data.copy()).requires_grad_(True)
        bias = torch.from_numpy(runner.layer.blobs[1].data.copy()).requires_grad_(True)
        xs = [xs[0].reshape(xs[0].shape[0], -1)]
        grads = [grads[0], w, bias]
        fn = lambda v: F.linear(v[0], w, bias)   # noqa: E731
    elif fn == "scale":
        c = xs[0].shape[1]
        w = torch.ones(1, c, 1, 1, requires_grad=True)
        bias = torch.zeros(1, c, 1, 1, requires_grad=True)
        grads = grads + [w, bias]
        fn = lambda v: v[0] * w + bias   # noqa: E731
    dy = None

    def fwd():
        with torch.no_grad():
            fn(xs)

    def fwd_bwd():
        nonlocal dy
        y = fn(xs)
        if dy is None:
            dy = torch.randn_like(y) if y.dim() else torch.ones_like(y)
        for g in grads:
            g.grad = None
        y.backward(dy)
    return fwd, fwd_bwd


def median_ms(times):
    return float(np.median(times)) * 1000.0


def run_case(case, old_registry):
    name, text, shapes, in_place, phase, _ = case
    ltype = text.split('"')[1]
    variants = {"new": Runner(layer_mod.layer_class(ltype), text, shapes, in_place, phase)}
    if old_registry is not None:
        variants["old"] = Runner(old_registry[ltype], text, shapes, in_place, phase)
    fns = {k: (r.fwd, r.fwd_bwd) for k, r in variants.items()}
    t = torch_fns(case, variants["new"])
    if t is not None:
        fns["torch"] = t
    out = {}
    for which in (0, 1):
        if which == 1 and not variants["new"].has_backward:
            break
        for f in fns.values():   # warm up: lazy buffers, first-touch pages
            f[which]()
            f[which]()
        times = {k: [] for k in fns}
        keys = list(fns)
        for r in range(ARGS.reps):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                t0 = time.perf_counter()
                fns[k][which]()
                times[k].append(time.perf_counter() - t0)
        out["fwd" if which == 0 else "f+b"] = {k: median_ms(v) for k, v in times.items()}
    return out


def transient_peak_mib(runner):
    import tracemalloc
    runner.fwd_bwd()
    runner.fwd_bwd()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        runner.fwd_bwd()
        return (tracemalloc.get_traced_memory()[1] - base) / 2.0 ** 20
    finally:
        tracemalloc.stop()


def memory_case(case, old_registry):
    name, text, shapes, in_place, phase, _ = case
    ltype = text.split('"')[1]
    new = transient_peak_mib(Runner(layer_mod.layer_class(ltype), text, shapes, in_place, phase))
    old = None
    if old_registry is not None:
        old = transient_peak_mib(Runner(old_registry[ltype], text, shapes, in_place, phase))
    print("%-42s %-4s %9s %9.1f   (MiB transient peak)" % (name, "mem", "%.1f" % old if old is not None
                                                          else "-", new))


TIMED_TYPES = {"InnerProduct", "SoftmaxWithLoss", "Softmax", "Accuracy", "LRN", "BatchNorm", "Scale",
               "Bias", "ReLU", "Dropout", "Eltwise", "Split", "Concat", "Slice", "Flatten", "Reshape"}


def run_nets(old_registry):
    """Per-step milliseconds of TIMED_TYPES in whole train steps, old vs new layer classes."""
    import collections
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    argv, sys.argv = sys.argv, [sys.argv[0], "--threads", str(ARGS.threads)]
    try:
        import bench_nets
    finally:
        sys.argv = argv
    for name in ARGS.nets.split(","):
        batch = ARGS.batch or bench_nets.NETS[name][2]
        current = dict(layer_mod._REGISTRY)
        cases = {}
        for tag, registry in (("old", old_registry), ("new", current)):
            if registry is None:
                continue
            layer_mod._REGISTRY.clear()
            layer_mod._REGISTRY.update(registry)
            try:
                cases[tag] = bench_nets.Case(name, "train", batch, None)
            finally:
                layer_mod._REGISTRY.clear()
                layer_mod._REGISTRY.update(current)
        spent = {tag: collections.defaultdict(float) for tag in cases}
        for tag, case in cases.items():
            for layer in case.net.layers:
                if layer.type not in TIMED_TYPES:
                    continue
                for meth in ("reshape", "forward", "backward"):
                    def timed(*a, _f=getattr(layer, meth), _k=layer.type, _acc=spent[tag]):
                        t0 = time.perf_counter()
                        out = _f(*a)
                        _acc[_k] += time.perf_counter() - t0
                        return out
                    setattr(layer, meth, timed)
        per_step = {tag: collections.defaultdict(list) for tag in cases}
        tags = list(cases)
        for r in range(ARGS.reps + 2):
            for tag in tags[r % len(tags):] + tags[:r % len(tags)]:
                spent[tag].clear()
                cases[tag]._netlib_step()
                if r >= 2:   # the first two steps allocate the lazy buffers
                    for k in TIMED_TYPES:
                        per_step[tag][k].append(spent[tag].get(k, 0.0))
        print("%s b%d train step: ms per step in these layer types (median of %d)" % (name, batch, ARGS.reps))
        totals = dict.fromkeys(tags, 0.0)
        for k in sorted(TIMED_TYPES):
            med = {tag: median_ms(per_step[tag][k]) for tag in tags}
            for tag in tags:
                totals[tag] += med[tag]
            if max(med.values()) >= 0.05:
                o = med.get("old")
                print("  %-16s old %9s  new %9.2f  %s" % (k, "%.2f" % o if o is not None else "-", med["new"],
                                                        "%.2f" % (med["new"] / o) if o else ""))
        o = totals.get("old")
        print("  %-16s old %9s  new %9.2f  %s" % ("all of them", "%.2f" % o if o is not None else "-",
                                                totals["new"], "%.2f" % (totals["new"] / o) if o else ""))
        del cases
        sys.stdout.flush()


def main():
    old = baseline_registry(ARGS.baseline) if ARGS.baseline else None
    if ARGS.nets:
        run_nets(old)
        return
    print("threads %d, reps %d, baseline %s" % (ARGS.threads, ARGS.reps, ARGS.baseline or "-"))
    print("%-42s %-4s %9s %9s %9s %8s %8s" % ("case", "", "old ms", "new ms", "torch ms",
                                              "new/old", "new/tch"))
    for case in CASES:
        if ARGS.only and ARGS.only.lower() not in case[0].lower():
            continue
        if ARGS.memory:
            memory_case(case, old)
        res = run_case(case, old)
        for kind, r in res.items():
            o, n, t = r.get("old"), r["new"], r.get("torch")
            print("%-42s %-4s %9s %9.2f %9s %8s %8s" % (
                case[0], kind, "%.2f" % o if o is not None else "-", n,
                "%.2f" % t if t is not None else "-",
                "%.2f" % (n / o) if o else "-", "%.2f" % (n / t) if t else "-"))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
