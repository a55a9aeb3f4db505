#!/usr/bin/env python3
"""Write tests/golden/pycaffe_api/ with real BVLC pycaffe.

The goldens back tests/test_pycaffe_net.py, tests/test_pycaffe_solver.py and
tests/test_python_layer.py, which mirror the subjects of pycaffe's own suite
(python/caffe/test/): what a Net exposes (names, orders, loss weights,
level/stage filtering), how forward/backward/set_input_arrays refuse bad
arguments, how Python-layer exceptions surface, and what a solver computes
(learning rates, weights after each step of each solver type, callback order,
snapshot file names, restore).

Outputs:

* ``api.json``: the net texts used (so the tests build the very same nets),
  the structural facts, the exception types and messages, and the solver facts;
* ``numbers.npz``: the starting weights, the inputs, and what real Caffe
  computed from them (forward/backward values, weights after solver steps).

Run with reference pycaffe's Python (numpy < 2 there; nothing of netlib is
imported)::

    source /opt/caffe/env.sh && GLOG_minloglevel=2 python tools/make_pycaffe_api_goldens.py

Build reference Caffe first: bash ../shared/tools/build-reference-caffe.sh.
"""
import collections
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "golden", "pycaffe_api")
CAFFE_COMMIT = "9b891540183ddc834a02b2bd81b31afae71b2153"

# -- the nets (the tests read these texts back from api.json) ------------------------
# The structure of pycaffe's suite net: DummyData data+label, Convolution with
# two decay_mults, InnerProduct, SoftmaxWithLoss (net name 'testnet').
SUITE_NET = """name: 'testnet' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { num: 5 channels: 2 height: 3 width: 4
    num: 5 channels: 1 height: 1 width: 1
    data_filler { type: 'gaussian' std: 1 }
    data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 11 kernel_size: 2 pad: 3
    weight_filler { type: 'gaussian' std: 1 }
    bias_filler { type: 'constant' value: 2 } }
  param { decay_mult: 1 } param { decay_mult: 0 } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip'
  inner_product_param { num_output: 11
    weight_filler { type: 'gaussian' std: 2.5 }
    bias_filler { type: 'constant' value: -3 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""

# The same layers fed by Input layers, so both frameworks see the same numbers.
NUMERIC_NET = """name: 'numeric' force_backward: true
layer { type: 'Input' name: 'input' top: 'data' top: 'label'
  input_param { shape { dim: 5 dim: 2 dim: 3 dim: 4 } shape { dim: 5 dim: 1 dim: 1 dim: 1 } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 3 kernel_size: 2 pad: 3 }
  param { decay_mult: 1 } param { decay_mult: 0 } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip'
  inner_product_param { num_output: 3 } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""

LEVELS_NET = """layer { name: 'data' type: 'DummyData' top: 'data'
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } } }
layer { name: 'NoLevel' type: 'InnerProduct' bottom: 'data' top: 'NoLevel'
  inner_product_param { num_output: 1 } }
layer { name: 'Level0Only' type: 'InnerProduct' bottom: 'data' top: 'Level0Only'
  include { min_level: 0 max_level: 0 } inner_product_param { num_output: 1 } }
layer { name: 'Level1Only' type: 'InnerProduct' bottom: 'data' top: 'Level1Only'
  include { min_level: 1 max_level: 1 } inner_product_param { num_output: 1 } }
layer { name: 'Level>=0' type: 'InnerProduct' bottom: 'data' top: 'Level>=0'
  include { min_level: 0 } inner_product_param { num_output: 1 } }
layer { name: 'Level>=1' type: 'InnerProduct' bottom: 'data' top: 'Level>=1'
  include { min_level: 1 } inner_product_param { num_output: 1 } }
"""

STAGES_NET = """layer { name: 'data' type: 'DummyData' top: 'data'
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } } }
layer { name: 'A' type: 'InnerProduct' bottom: 'data' top: 'A'
  include { stage: 'A' } inner_product_param { num_output: 1 } }
layer { name: 'B' type: 'InnerProduct' bottom: 'data' top: 'B'
  include { stage: 'B' } inner_product_param { num_output: 1 } }
layer { name: 'AorB' type: 'InnerProduct' bottom: 'data' top: 'AorB'
  include { stage: 'A' } include { stage: 'B' } inner_product_param { num_output: 1 } }
layer { name: 'AandB' type: 'InnerProduct' bottom: 'data' top: 'AandB'
  include { stage: 'A' stage: 'B' } inner_product_param { num_output: 1 } }
"""

ALL_IN_ONE_NET = """layer { name: 'train_data' type: 'DummyData' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } shape { dim: 1 dim: 1 dim: 1 dim: 1 } }
  include { phase: TRAIN stage: 'train' } }
layer { name: 'val_data' type: 'DummyData' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } shape { dim: 1 dim: 1 dim: 1 dim: 1 } }
  include { phase: TEST stage: 'val' } }
layer { name: 'deploy_data' type: 'Input' top: 'data'
  input_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } }
  include { phase: TEST stage: 'deploy' } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip' inner_product_param { num_output: 2 } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label' top: 'loss'
  include { phase: TRAIN stage: 'train' } include { phase: TEST stage: 'val' } }
layer { name: 'pred' type: 'Softmax' bottom: 'ip' top: 'pred'
  include { phase: TEST stage: 'deploy' } }
"""

MEMORY_NET = """name: 'mem'
layer { name: 'data' type: 'MemoryData' top: 'data' top: 'label'
  memory_data_param { batch_size: 2 channels: 2 height: 3 width: 1 } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip' inner_product_param { num_output: 1 } }
"""

# Solver text appended to ``net: '<file>'``; the pycaffe suite's settings.
SUITE_SOLVER = """test_iter: 2 test_interval: 10 base_lr: 0.01 momentum: 0.9
weight_decay: 0.0005 lr_policy: 'inv' gamma: 0.0001 power: 0.75
display: 100 max_iter: 20 snapshot_after_train: false snapshot_prefix: 'model'
"""

# Per-type settings for the solver-type trajectories (3 steps each).
SOLVER_TYPES = collections.OrderedDict([
    ("SGD", "base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: 'step' gamma: 0.5 stepsize: 2"),
    ("Nesterov", "base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: 'fixed'"),
    ("AdaGrad", "base_lr: 0.1 weight_decay: 0.01 lr_policy: 'fixed'"),
    ("RMSProp", "base_lr: 0.01 rms_decay: 0.95 weight_decay: 0.01 lr_policy: 'fixed'"),
    ("AdaDelta", "base_lr: 1.0 momentum: 0.95 delta: 1e-6 weight_decay: 0.01 lr_policy: 'fixed'"),
    ("Adam", "base_lr: 0.01 momentum: 0.9 momentum2: 0.999 weight_decay: 0.01 lr_policy: 'fixed'"),
])

# Python layers whose exceptions pycaffe lets through (written next to the nets).
PYTHON_LAYER_MODULE = '''
import caffe


class Raises(caffe.Layer):
    def setup(self, bottom, top):
        raise RuntimeError("setup refused")


class RaisesInForward(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        raise ZeroDivisionError("forward refused")
'''


def private_members(net):
    """pycaffe's underscore members (the C++ accessors pycaffe.py builds on)."""
    return {"_inputs": list(net._inputs), "_outputs": list(net._outputs),
            "_blob_loss_weights": [float(w) for w in net._blob_loss_weights],
            "_top_ids": [list(net._top_ids(i)) for i in range(len(net.layers))],
            "_bottom_ids": [list(net._bottom_ids(i)) for i in range(len(net.layers))],
            "_blobs_shapes": [list(b.shape) for b in net._blobs]}


def exc_info(fn):
    """(exception class name, message) of what ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recording whatever Caffe raises
        return [type(exc).__name__, str(exc)]
    return None


def write(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def main():
    import caffe
    caffe.set_mode_cpu()
    work = tempfile.mkdtemp(prefix="pycaffe_api_")
    cwd = os.getcwd()
    os.chdir(work)
    sys.path.insert(0, work)
    try:
        facts, arrays = run_all(caffe, work)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "api.json"), "w") as f:
        json.dump(facts, f, indent=1, sort_keys=True)
        f.write("\n")
    np.savez_compressed(os.path.join(OUT, "numbers.npz"), **arrays)
    print("wrote", OUT)


def run_all(caffe, work):
    facts = {"caffe_commit": CAFFE_COMMIT, "generator": "tools/make_pycaffe_api_goldens.py",
             "nets": {"suite": SUITE_NET, "numeric": NUMERIC_NET, "levels": LEVELS_NET,
                      "stages": STAGES_NET, "all_in_one": ALL_IN_ONE_NET, "memory": MEMORY_NET},
             "solver_suite": SUITE_SOLVER, "solver_types": SOLVER_TYPES,
             "python_layer_module": PYTHON_LAYER_MODULE}
    arrays = {}
    paths = {k: write(work, k + ".prototxt", v) for k, v in facts["nets"].items()}
    # (this reference build has no OpenCV, hence no ImageData/WindowData)
    facts["layer_type_list"] = list(caffe.layer_type_list())

    # -- structure of the suite net -----------------------------------------------------
    net = caffe.Net(paths["suite"], caffe.TRAIN)
    facts["suite"] = {
        "layer_names": list(net._layer_names),
        "blob_names": list(net._blob_names),
        "layer_types": [l.type for l in net.layers],
        "layer_dict_keys": list(net.layer_dict),
        "inputs": list(net.inputs),
        "outputs": list(net.outputs),
        "top_names": [[k, list(v)] for k, v in net.top_names.items()],
        "bottom_names": [[k, list(v)] for k, v in net.bottom_names.items()],
        "blob_loss_weights": [[k, float(v)] for k, v in net.blob_loss_weights.items()],
        "blob_shapes": [[k, list(b.shape)] for k, b in net.blobs.items()],
        "param_shapes": [[k, [list(b.shape) for b in v]] for k, v in net.params.items()],
    }
    facts["suite"]["private"] = private_members(net)

    # -- levels, stages, all-in-one -----------------------------------------------------
    def blob_list(n):
        return [b for b in n.blobs if "data" not in b]

    facts["levels"] = {str(lv): blob_list(caffe.Net(paths["levels"], caffe.TEST, level=lv)) for lv in (0, 1)}
    facts["stages"] = {"+".join(st): blob_list(caffe.Net(paths["stages"], caffe.TEST, stages=st))
                       for st in (["A"], ["B"], ["A", "B"])}
    aio = {}
    for phase, stage in (("TRAIN", "train"), ("TEST", "val"), ("TEST", "deploy")):
        n = caffe.Net(paths["all_in_one"], getattr(caffe, phase), stages=[stage])
        aio[stage] = {"outputs": list(n.outputs), "inputs": list(n.inputs),
                      "data_shape": list(n.blobs["data"].shape), "layer_names": list(n._layer_names),
                      "private": private_members(n)}
    facts["all_in_one"] = aio

    # -- numbers: forward/backward, start/end ---------------------------------------------
    rng = np.random.RandomState(0)
    net = caffe.Net(paths["numeric"], caffe.TRAIN)
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            b.data[...] = rng.normal(scale=0.5, size=b.data.shape)
            arrays["w0/%s/%d" % (name, i)] = b.data.copy()
    x = rng.normal(size=(5, 2, 3, 4)).astype(np.float32)
    y = np.array([0, 2, 1, 1, 0], np.float32).reshape(5, 1, 1, 1)
    arrays["x"], arrays["y"] = x, y
    out = net.forward(data=x, label=y)
    arrays["fwd/loss"] = out["loss"].copy()
    arrays["fwd/ip"] = net.blobs["ip"].data.copy()
    back = net.backward()
    facts["numeric_backward_keys"] = sorted(back)
    arrays["bwd/data"] = back["data"].copy()
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            arrays["grad/%s/%d" % (name, i)] = b.diff.copy()
    part = net.forward(start="ip", end="ip")
    facts["forward_start_end_keys"] = sorted(part)
    part = net.backward(start="ip", end="ip")
    facts["backward_start_end_keys"] = sorted(part)
    facts["forward_blobs_keys"] = sorted(net.forward(blobs=["conv"], data=x, label=y))
    facts["backward_diffs_keys"] = sorted(net.backward(diffs=["conv"]))
    net.clear_param_diffs()
    facts["clear_param_diffs_zero"] = all(not b.diff.any() for v in net.params.values() for b in v)

    # -- argument checks --------------------------------------------------------------------
    errors = {}
    errors["forward_wrong_kwargs"] = exc_info(lambda: net.forward(data=x))
    errors["forward_extra_kwargs"] = exc_info(lambda: net.forward(data=x, label=y, other=y))
    errors["forward_batch_size"] = exc_info(lambda: net.forward(data=x[:4], label=y[:4]))
    errors["backward_wrong_kwargs"] = exc_info(lambda: net.backward(ip=np.ones((5, 3), np.float32)))
    errors["forward_unknown_start"] = exc_info(lambda: net.forward(start="nope"))
    errors["missing_net_file"] = exc_info(lambda: caffe.Net("missing.prototxt", caffe.TEST))
    errors["missing_weights_file"] = exc_info(
        lambda: caffe.Net(paths["numeric"], caffe.TEST, weights="missing.caffemodel"))
    mem = caffe.Net(paths["memory"], caffe.TEST)
    facts["memory_label_shape_setup"] = list(mem.blobs["label"].shape)
    good = np.arange(24, dtype=np.float32).reshape(4, 2, 3, 1)
    lab = np.arange(4, dtype=np.float32)
    errors["set_input_float64_data"] = exc_info(lambda: mem.set_input_arrays(good.astype(np.float64), lab))
    errors["set_input_float64_labels"] = exc_info(lambda: mem.set_input_arrays(good, lab.astype(np.float64)))
    errors["set_input_not_contiguous"] = exc_info(
        lambda: mem.set_input_arrays(good[:, :, ::-1, :], lab))
    errors["set_input_3d"] = exc_info(lambda: mem.set_input_arrays(good.reshape(4, 2, 3), lab))
    errors["set_input_wrong_channels"] = exc_info(
        lambda: mem.set_input_arrays(np.zeros((4, 3, 3, 1), np.float32), lab))
    errors["set_input_wrong_height"] = exc_info(
        lambda: mem.set_input_arrays(np.zeros((4, 2, 2, 1), np.float32), lab))
    errors["set_input_wrong_width"] = exc_info(
        lambda: mem.set_input_arrays(np.zeros((4, 2, 3, 2), np.float32), lab))
    errors["set_input_label_count"] = exc_info(lambda: mem.set_input_arrays(good, lab[:2]))
    errors["set_input_not_batch_multiple"] = exc_info(lambda: mem.set_input_arrays(good[:3], lab[:3]))
    errors["set_input_labels_2d"] = exc_info(lambda: mem.set_input_arrays(good, lab.reshape(4, 1)))
    errors["set_input_first_layer_not_memory"] = exc_info(lambda: net.set_input_arrays(good, lab))
    # Accepted: labels 1-D (pycaffe reshapes to N,1,1,1) or (N,1,1,1); batches cycle.
    mem.set_input_arrays(good, lab)
    served = []
    for _ in range(3):
        mem.forward()
        served.append([mem.blobs["data"].data.copy().tolist(), mem.blobs["label"].data.copy().tolist()])
    facts["memory_served"] = served
    facts["memory_label_shape_forward"] = list(mem.blobs["label"].shape)
    # The layer reads the caller's array in place (no copy is taken).
    good[...] += 100
    mem.forward()
    facts["memory_reads_caller_array"] = bool(mem.blobs["data"].data[0, 0, 0, 0] >= 100)

    # Python layer exceptions keep their own class.
    write(work, "pyapi_layers.py", PYTHON_LAYER_MODULE)
    base = "input: 'data' input_shape { dim: 2 dim: 3 }\n"
    raises = write(work, "raises.prototxt", base + "layer { type: 'Python' name: 'l' bottom: 'data' top: 't' "
                   "python_param { module: 'pyapi_layers' layer: 'Raises' } }")
    errors["python_setup_raises"] = exc_info(lambda: caffe.Net(raises, caffe.TEST))
    fwd = write(work, "fwd.prototxt", base + "layer { type: 'Python' name: 'l' bottom: 'data' top: 't' "
                "python_param { module: 'pyapi_layers' layer: 'RaisesInForward' } }")
    fnet = caffe.Net(fwd, caffe.TEST)
    errors["python_forward_raises"] = exc_info(lambda: fnet.forward())
    facts["errors"] = errors

    # -- save / load / share_with -----------------------------------------------------------
    net.save(os.path.join(work, "w.caffemodel"))
    legacy = caffe.Net(paths["numeric"], os.path.join(work, "w.caffemodel"), caffe.TEST)
    facts["legacy_ctor_loads"] = bool(np.array_equal(legacy.params["ip"][0].data, net.params["ip"][0].data))
    other = caffe.Net(paths["numeric"], caffe.TEST)
    other.share_with(net)
    net.params["ip"][0].data[0, 0] = 42.0
    net.params["ip"][0].diff[0, 0] = 7.0
    facts["share_with"] = {"data_shared": bool(other.params["ip"][0].data[0, 0] == 42.0),
                           "diff_shared": bool(other.params["ip"][0].diff[0, 0] == 7.0)}

    # -- solver --------------------------------------------------------------------------------
    facts["solver"], solver_arrays = run_solver(caffe, work, paths, arrays, x, y)
    arrays.update(solver_arrays)
    return facts, arrays


def set_w0(net, arrays):
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            b.data[...] = arrays["w0/%s/%d" % (name, i)]


def feed(net, x, y):
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = y


def run_solver(caffe, work, paths, arrays, x, y):
    facts, out = {}, {}
    sp = write(work, "solver.prototxt", "net: '%s'\n%s" % (paths["numeric"], SUITE_SOLVER))
    s = caffe.SGDSolver(sp)
    set_w0(s.net, arrays)
    feed(s.net, x, y)
    feed(s.test_nets[0], x, y)
    facts["param"] = {"max_iter": s.param.max_iter, "display": s.param.display, "base_lr": s.param.base_lr}
    facts["set_max_iter"] = exc_info(lambda: setattr(s.param, "max_iter", 5))
    facts["iter0"] = s.iter
    facts["num_test_nets"] = len(s.test_nets)
    calls = []
    s.add_callback(lambda: calls.append(["start", s.iter]), lambda: calls.append(["grads", s.iter]))
    lrs, losses = [], []
    for k in range(10):
        lrs.append(float(s.lr))
        s.step(1)
        losses.append(float(s.net.blobs["loss"].data))
        if k == 4:
            names = sorted(os.listdir(work))
            s.snapshot()
            facts["snapshot_files"] = sorted(set(os.listdir(work)) - set(names))
    facts["lrs"] = lrs
    facts["losses"] = losses
    facts["callback_calls"] = calls[:6]
    facts["iter_after_steps"] = s.iter
    for name, blobs in s.net.params.items():
        for i, b in enumerate(blobs):
            out["sgd10/%s/%d" % (name, i)] = b.data.copy()
    # Test nets get the train weights by sharing when they run (at iter 10 here).
    facts["test_net_shares_after_test"] = bool(
        np.array_equal(s.test_nets[0].params["ip"][0].data, s.net.params["ip"][0].data))

    # restore the iteration-5 snapshot in a fresh solver and step on
    r = caffe.SGDSolver(sp)
    feed(r.net, x, y)
    feed(r.test_nets[0], x, y)
    r.restore(os.path.join(work, "model_iter_5.solverstate"))
    facts["iter_after_restore"] = r.iter
    facts["lr_after_restore"] = float(r.lr)
    r.step(5)
    facts["restore_matches_continuous"] = bool(all(
        np.array_equal(a.data, b.data) for n in s.net.params for a, b in zip(s.net.params[n], r.net.params[n])))

    # base_lr is settable through solver.param and changes the rate
    s.param.base_lr = 0.5
    facts["lr_after_base_lr_set"] = float(s.lr)
    facts["base_lr_after_set"] = s.param.base_lr

    # apply_update as the suite does: zero weights, unit diff -> -base_lr on iteration 0
    a = caffe.SGDSolver(sp)
    w = a.net.layers[1].blobs[0]
    w.data[...] = 0
    w.diff[...] = 1
    a.apply_update()
    out["apply_update_w"] = w.data.copy()
    facts["apply_update_iter"] = a.iter

    # solve(): iter reaches max_iter
    z = caffe.SGDSolver(sp)
    feed(z.net, x, y)
    feed(z.test_nets[0], x, y)
    z.solve()
    facts["iter_after_solve"] = z.iter

    # hdf5 snapshot names
    sh = write(work, "solver_h5.prototxt", "net: '%s'\n%s snapshot_format: HDF5 snapshot_prefix: 'h5model'"
               % (paths["numeric"], SUITE_SOLVER.replace("snapshot_prefix: 'model'", "")))
    h = caffe.SGDSolver(sh)
    names = set(os.listdir(work))
    h.snapshot()
    facts["snapshot_files_hdf5"] = sorted(set(os.listdir(work)) - names)

    # every solver type: class, three steps from the same start
    classes = {}
    for kind, text in SOLVER_TYPES.items():
        path = write(work, "solver_%s.prototxt" % kind,
                     "net: '%s'\ntype: '%s' %s max_iter: 10 display: 0 snapshot_after_train: false"
                     % (paths["numeric"], kind, text))
        t = caffe.get_solver(path)
        classes[kind] = type(t).__name__
        set_w0(t.net, arrays)
        feed(t.net, x, y)
        t.step(3)
        for name, blobs in t.net.params.items():
            for i, b in enumerate(blobs):
                out["type3/%s/%s/%d" % (kind, name, i)] = b.data.copy()
    facts["solver_classes"] = classes
    return facts, out


if __name__ == "__main__":
    main()
