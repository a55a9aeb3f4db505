"""Time classic nets in netlib and in PyTorch CPU (same shapes), train step and inference.

    python benchmarks/bench_nets.py [--nets lenet,cifar10_quick,...] [--rounds 3]
                                    [--threads 2] [--quick] [--no-memory] [--engines netlib,torch]

Nets (real prototxts from ../shared/reference/models, else models/ in the repo):
LeNet b64 (mnist/lenet.prototxt), CIFAR-10 quick b100 (cifar10/cifar10_quick.prototxt),
CaffeNet b16 (bvlc_reference_caffenet/deploy.prototxt), VGG-16 b4
(vgg16_19/VGG_ILSVRC_16_layers_deploy.prototxt), ResNet-50 b8
(resnet_50/ResNet-50-deploy.prototxt), GoogLeNet b8 (bvlc_googlenet/deploy.prototxt,
the deploy net: no auxiliary classifiers), MobileNet v1 b8
(mobilenet_v1/mobilenet_deploy.prototxt).

How each benchmark net is made from the deploy prototxt (``bench_param``): the
prototxt is read and upgraded with netlib's reader (legacy ``input:`` fields
become an Input layer); every data layer (Input/Data/DummyData/...) is dropped
and one Input layer is put first with top ``data`` of shape (batch, C, H, W)
and, in TRAIN, a second top ``label`` of shape (batch,).  In TRAIN the final
Softmax becomes a SoftmaxWithLoss(logits, label) (one is appended on the last
top when the net has neither) and every BatchNorm gets use_global_stats false
(batch statistics); in TEST the deploy net is kept (Softmax output, BatchNorm
with the prototxt's setting).  Inputs are filled once with N(0,1) data and
random class ids (so no data-layer work is timed); weights are He-scaled
Gaussians, biases 0, BatchNorm mean 0 / variance 1, copied from netlib into the
PyTorch twin.

Modes: ``train``: one training step = zero the parameter diffs (the solver's
ClearParamDiffs) + forward + backward, float32.  netlib:
``net.clear_param_diffs(); net.forward_backward()``; PyTorch:
``grad.zero_()`` for every parameter, ``loss.backward()``.  ``test``: TEST
phase forward only (netlib ``net.forward_prefilled()``, PyTorch under
``torch.inference_mode()`` in eval mode), at batch 1 and at a large batch (the
train batch).

The PyTorch twin (benchmarks/torch_nets.py) is built from the same
NetParameter layer for layer; the benchmark asserts that every top blob has the
same shape in both engines.  Engines are interleaved round by round (the order
rotates each round); each round times ``reps`` iterations (enough for ~0.3 s,
decided from a warm-up) and reports the mean; the table shows the median over
``--rounds`` rounds in milliseconds and netlib/torch.  Each case (net, mode,
batch) runs in a fresh child process (``--in-process`` to disable): measured
in one process, a case's speed depended on the cases before it (PyTorch
ResNet-50 batch-8 inference took 1.05 s after the other nets, 0.5-0.6 s
alone).

TEST-phase netlib nets run with ``net.reuse_memory()`` (the liveness plan:
blobs that are neither inputs nor outputs share pooled buffers; ``--no-reuse``
turns it off).

Memory: peak resident memory (VmHWM from /proc/self/status) of TEST-phase
inference runs, each in a fresh child process per engine (build the net, two
forwards): CaffeNet deploy at batch 10 and every net at batch 1 and the
large batch (weights: netlib's fillers from the prototxt, the twin's own
in-place He init; no copies between engines).  Each cell reads
``peak (base/built)``: base is the resident memory after imports, built the
peak after building the net, before any forward; ``weights`` is the
parameters' bytes.  (The CUDA build of torch alone is ~500 MB resident after
``import torch``.)  The machine is shared: figures from
a busy machine are noisy.

Thread count (--threads, default 2) is set in OPENBLAS/OMP/MKL_NUM_THREADS
before numpy is imported and with torch.set_num_threads.  PyTorch is optional:
without it only netlib columns are printed.  Not run by the tests as a timing
(tests/test_bench_nets.py only checks that --quick completes).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (prototxt under models/, (C, H, W), train batch, label)
NETS = {
    "lenet": ("mnist/lenet.prototxt", (1, 28, 28), 64, "LeNet"),
    "cifar10_quick": ("cifar10/cifar10_quick.prototxt", (3, 32, 32), 100, "CIFAR-10 quick"),
    "caffenet": ("bvlc_reference_caffenet/deploy.prototxt", (3, 227, 227), 16, "CaffeNet"),
    "vgg16": ("vgg16_19/VGG_ILSVRC_16_layers_deploy.prototxt", (3, 224, 224), 4, "VGG-16"),
    "resnet50": ("resnet_50/ResNet-50-deploy.prototxt", (3, 224, 224), 8, "ResNet-50"),
    "googlenet": ("bvlc_googlenet/deploy.prototxt", (3, 224, 224), 8, "GoogLeNet"),
    "mobilenet_v1": ("mobilenet_v1/mobilenet_deploy.prototxt", (3, 224, 224), 8, "MobileNet v1"),
}
MEM_EXTRA = {"caffenet": [10]}   # extra inference batches measured for memory
DATA_TYPES = {"Input", "Data", "DummyData", "ImageData", "HDF5Data", "MemoryData",
              "WindowData", "Python"}


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated subset of: " + ", ".join(NETS))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case (median)")
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP/torch threads")
    ap.add_argument("--quick", action="store_true", help="tiny configuration: batch <= 2, one rep per round")
    ap.add_argument("--modes", default="train,test1,testN", help="subset of train,test1,testN")
    ap.add_argument("--engines", default="netlib,torch", help="subset of netlib,torch")
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    ap.add_argument("--no-reuse", action="store_true",
                    help="TEST-phase netlib nets without net.reuse_memory() (every blob keeps its own buffer)")
    ap.add_argument("--target-s", type=float, default=0.3, help="seconds of work per round and engine")
    ap.add_argument("--write-prototxt", metavar="DIR",
                    help="write the benchmark nets' prototxts (NAME_train.prototxt, NAME_test.prototxt "
                         "at the train batch) to DIR, e.g. for 'netlib time --model', and exit")
    ap.add_argument("--in-process", action="store_true",
                    help="run every case in this process (default: a fresh child process per case, so that "
                         "one case's heap history cannot slow the next)")
    ap.add_argument("--case-child", nargs=3, metavar=("NET", "MODE", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--mem-child", nargs=3, metavar=("ENGINE", "NET", "BATCH"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


ARGS = _args()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def _vm(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0   # kB -> MB
    return float("nan")


def _torch():
    if "torch" not in ARGS.engines.split(","):
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(ARGS.threads)
    return torch


def model_path(rel):
    shared = os.environ.get("NETLIB_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
    for base in (os.path.join(shared, "reference", "models"), os.path.join(ROOT, "models")):
        path = os.path.join(base, rel)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("model prototxt %s not found under ../shared/reference/models or models/" % rel)


def bench_param(name, phase, batch):
    """The benchmark NetParameter of ``name`` (see the module docstring)."""
    from netlib.files import read_net_param
    from netlib.proto import caffe_pb2
    rel, chw, _, _ = NETS[name]
    src = read_net_param(model_path(rel))
    param = caffe_pb2.NetParameter()
    param.name = src.name
    param.state.phase = caffe_pb2.TRAIN if phase == "train" else caffe_pb2.TEST
    inp = param.layer.add(name="data", type="Input")
    inp.top.append("data")
    inp.input_param.shape.add().dim.extend([batch] + list(chw))
    if phase == "train":
        inp.top.append("label")
        inp.input_param.shape.add().dim.extend([batch])
    has_loss = False
    for lp in src.layer:
        if lp.type in DATA_TYPES:
            continue
        if lp.type == "Accuracy":
            continue
        new = param.layer.add()
        new.CopyFrom(lp)
        del new.include[:]
        del new.exclude[:]
        if phase == "train":
            if lp.type == "Softmax":
                new.type = "SoftmaxWithLoss"
                del new.top[:]
                new.bottom.append("label")
                new.top.append("loss")
                has_loss = True
            elif lp.type.endswith("Loss"):
                has_loss = True
            elif lp.type == "BatchNorm":
                new.batch_norm_param.use_global_stats = False
    if phase == "train" and not has_loss:
        last = param.layer[-1].top[0]
        loss = param.layer.add(name="loss", type="SoftmaxWithLoss")
        loss.bottom.extend([last, "label"])
        loss.top.append("loss")
    return param


def fill_netlib(net, seed=0):
    """He-scaled weights, zero biases, BN mean 0 / var 1; returns {layer: [arrays]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for lname, layer in zip(net.layer_names, net.layers):
        if not layer.blobs:
            continue
        if layer.type == "BatchNorm":
            layer.blobs[0].data[...] = 0
            layer.blobs[1].data[...] = 1
            layer.blobs[2].data[...] = 1
        else:
            for k, blob in enumerate(layer.blobs):
                shape = tuple(blob.shape)
                if layer.type == "Scale" and k == 0:
                    blob.data[...] = 1
                elif len(shape) >= 2:
                    fan_in = int(np.prod(shape[1:]))
                    if layer.type == "InnerProduct" and layer.layer_param.inner_product_param.transpose:
                        fan_in = shape[0]
                    data = blob.data
                    if data.dtype == np.float32 and data.flags.c_contiguous:
                        rng.standard_normal(dtype=np.float32, out=data)   # in place: no temporaries
                    else:
                        data[...] = rng.standard_normal(shape)
                    data *= np.float32(np.sqrt(2.0 / fan_in))
                else:
                    blob.data[...] = 0
        out[lname] = [np.asarray(b.data) for b in layer.blobs]
    return out


def fill_inputs(net, rng):
    num_classes = None
    for name in net.inputs:
        blob = net.blobs[name]
        if name != "label":
            blob.data[...] = rng.standard_normal(tuple(blob.shape)).astype(np.float32)
    if "label" in net.inputs:
        logits = None
        for lp in net.param.layer:
            if lp.type == "SoftmaxWithLoss":
                logits = lp.bottom[0]
        num_classes = net.blobs[logits].shape[1]
        net.blobs["label"].data[...] = rng.randint(0, num_classes, net.blobs["label"].shape)
    return num_classes


class Case:
    """One (net, mode, batch): both engines built, inputs filled, shapes checked."""

    def __init__(self, name, mode, batch, torch):
        import netlib
        phase = "train" if mode == "train" else "test"
        self.param = bench_param(name, phase, batch)
        self.net = netlib.Net(self.param, phase=netlib.TRAIN if phase == "train" else netlib.TEST)
        init = fill_netlib(self.net)
        if phase == "test" and not ARGS.no_reuse:
            self.net.reuse_memory()      # inference: the liveness plan (outputs and inputs kept)
        classes = fill_inputs(self.net, np.random.RandomState(1))
        self.train = phase == "train"
        self.runs = {"netlib": self._netlib_step}
        if torch is not None:
            from torch_nets import TorchTwin
            self.torch = torch
            self.twin = TorchTwin(self.param,
                                  phase=0 if self.train else 1, init=init)
            self.tin = {k: torch.from_numpy(np.array(self.net.blobs[k].data)) for k in self.twin.inputs}
            for top, shape in self.twin.shapes.items():
                if top in self.net.blobs and tuple(self.net.blobs[top].shape) != tuple(shape):
                    raise AssertionError("%s %s: blob %s has shape %s in netlib, %s in torch"
                                         % (name, mode, top, tuple(self.net.blobs[top].shape), shape))
            with torch.no_grad():
                self.twin(self.tin, check=True)
            self.runs["torch"] = self._torch_train if self.train else self._torch_test
        self.classes = classes

    def _netlib_step(self):
        if self.train:
            self.net.clear_param_diffs()
            self.net.forward_backward()
        else:
            self.net.forward_prefilled()

    def _torch_train(self):
        self.twin.zero_grad_like_caffe()
        self.twin(self.tin)["__loss__"].backward()

    def _torch_test(self):
        with self.torch.inference_mode():
            self.twin(self.tin)


def _time(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run_case(name, mode, batch, torch, rounds, target):
    case = Case(name, mode, batch, torch)
    engines = list(case.runs)
    warm = {e: _time(case.runs[e], 1) for e in engines}       # first call: lazy buffers
    warm = {e: _time(case.runs[e], 1) for e in engines}
    reps = {e: max(1, min(200, int(target / max(warm[e], 1e-6)))) for e in engines}
    times = {e: [] for e in engines}
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            times[e].append(_time(case.runs[e], reps[e]))
    del case
    gc.collect()
    return {e: float(np.median(v)) * 1000.0 for e, v in times.items()}


def run_case_isolated(name, mode, batch, rounds, target):
    """``run_case`` in a fresh child process (same flags); returns its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(ARGS.threads),
           "--engines", ARGS.engines, "--rounds", str(rounds), "--target-s", str(target),
           "--case-child", name, mode, str(batch)] + (["--no-reuse"] if ARGS.no_reuse else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("case %s %s b%d failed:\n%s" % (name, mode, batch, res.stderr))
    return json.loads(res.stdout.strip().splitlines()[-1])


def mem_child(engine, name, batch):
    """In a fresh process: build the TEST net, forward twice, print peak RSS as JSON."""
    if engine == "torch":
        import torch
        torch.set_num_threads(ARGS.threads)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from torch_nets import TorchTwin
        param = bench_param(name, "test", batch)
        base = _vm("VmRSS")
        twin = TorchTwin(param, phase=1).eval()
        built = _vm("VmHWM")
        x = twin.make_inputs()
        with torch.inference_mode():
            twin(x)
            twin(x)
        wbytes = twin.weight_bytes()
    else:
        import netlib
        param = bench_param(name, "test", batch)
        base = _vm("VmRSS")
        net = netlib.Net(param, phase=netlib.TEST)   # weights: the prototxt's fillers
        built = _vm("VmHWM")
        if not ARGS.no_reuse:
            net.reuse_memory()
        fill_inputs(net, np.random.RandomState(1))
        net.forward_prefilled()
        net.forward_prefilled()
        wbytes = sum(int(b.count) * 4 for b in net.learnable_params)
    print(json.dumps({"peak_mb": _vm("VmHWM"), "base_mb": base, "built_mb": built,
                      "weights_mb": wbytes / 2.0 ** 20}))


def measure_memory(engine, name, batch):
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(ARGS.threads),
           "--mem-child", engine, name, str(batch)] + (["--no-reuse"] if ARGS.no_reuse else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    if ARGS.case_child:
        name, mode, batch = ARGS.case_child
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(run_case(name, mode, int(batch), _torch(), ARGS.rounds, ARGS.target_s)))
        return 0
    if ARGS.mem_child:
        engine, name, batch = ARGS.mem_child
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        mem_child(engine, name, int(batch))
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    names = [n.strip() for n in ARGS.nets.split(",") if n.strip()]
    for n in names:
        if n not in NETS:
            raise SystemExit("unknown net %r; choose from %s" % (n, ", ".join(NETS)))
    if ARGS.write_prototxt:
        from google.protobuf import text_format
        os.makedirs(ARGS.write_prototxt, exist_ok=True)
        for name in names:
            for phase in ("train", "test"):
                path = os.path.join(ARGS.write_prototxt, "%s_%s.prototxt" % (name, phase))
                with open(path, "w") as fh:
                    fh.write(text_format.MessageToString(bench_param(name, phase, NETS[name][2])))
                print(path)
        return 0
    modes = [m.strip() for m in ARGS.modes.split(",") if m.strip()]
    torch = _torch()
    rounds = 1 if ARGS.quick and ARGS.rounds == 3 else ARGS.rounds
    target = 0.0 if ARGS.quick else ARGS.target_s
    print("# bench_nets: threads=%d rounds=%d numpy %s%s%s" % (
        ARGS.threads, rounds, np.__version__,
        (", torch %s" % torch.__version__) if torch is not None
        else ", torch not used (not installed or --engines)",
        ", QUICK (tiny batches)" if ARGS.quick else ""))
    print("%-15s %5s %-6s %11s %11s %13s" % ("net", "batch", "mode", "netlib ms", "torch ms", "netlib/torch"))
    sys.stdout.flush()
    for name in names:
        train_batch = NETS[name][2]
        if ARGS.quick:
            train_batch = min(train_batch, 2)
        cases = {"train": ("train", train_batch), "test1": ("test", 1), "testN": ("test", train_batch)}
        for m in modes:
            mode, batch = cases[m]
            if ARGS.in_process:
                res = run_case(name, mode, batch, torch, rounds, target)
            else:
                res = run_case_isolated(name, mode, batch, rounds, target)
            nl, tt = res.get("netlib"), res.get("torch")
            print("%-15s %5d %-6s %11.2f %11s %13s" % (
                name, batch, mode, nl, "%.2f" % tt if tt is not None else "-",
                "%.2f" % (nl / tt) if tt else "-"))
            sys.stdout.flush()
    if ARGS.no_memory:
        return 0
    print()
    print("# peak resident memory of TEST-phase inference, MB: fresh child process per engine, VmHWM;")
    print("# 'peak (base/built)': base = resident after imports, built = peak after building the net")
    print("%-15s %5s %20s %20s %11s" % ("net", "batch", "netlib MB", "torch MB", "weights MB"))
    engines = ["netlib"] + (["torch"] if torch is not None else [])
    for name in names:
        batches = [1] if ARGS.quick else sorted({1, NETS[name][2]} | set(MEM_EXTRA.get(name, [])))
        for batch in batches:
            got = {e: measure_memory(e, name, batch) for e in engines}

            def cell(e):
                r = got.get(e)
                if r is None:
                    return "-"
                if "error" in r:
                    return "error"
                return "%.0f (%.0f/%.0f)" % (r["peak_mb"], r["base_mb"], r["built_mb"])
            wmb = next((r["weights_mb"] for r in got.values() if "weights_mb" in r), float("nan"))
            print("%-15s %5d %20s %20s %11.1f" % (name, batch, cell("netlib"), cell("torch"), wmb))
            for e, r in got.items():
                if "error" in r:
                    print("  %s error: %s" % (e, r["error"]))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
