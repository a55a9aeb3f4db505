#!/usr/bin/env python3
"""Write docs/api.md: the reference of netlib's pycaffe surface, from the code.

Each entry is the name as pycaffe spells it, its signature (``inspect``) and
the first paragraph of its docstring, grouped as pycaffe's modules are.
tests/test_docs.py fails when docs/api.md differs from what this writes, so
the page cannot drift from the code::

    python tools/make_api_reference.py          # rewrite docs/api.md
    python tools/make_api_reference.py --check  # exit 1 if it is stale
"""
import argparse
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "docs", "api.md")

# (section title, object path, members) -- members None: the object itself only.
SECTIONS = [
    ("Module `caffe` (`import netlib as caffe`)", "netlib", [
        "Net", "get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
        "AdamSolver", "Layer", "layer_type_list", "set_mode_cpu", "set_mode_gpu", "set_device",
        "set_random_seed", "init_log", "log", "Timer", "solver_count", "set_solver_count", "solver_rank",
        "set_solver_rank", "set_multiprocess", "has_nccl", "NCCL", "NetSpec", "to_proto", "Classifier",
        "Detector", "set_python_layers_allowed"]),
    ("`Net`", "netlib.Net", [
        "__init__", "blobs", "params", "layers", "layer_dict", "_layer_names", "_blob_names", "inputs", "outputs",
        "top_names", "bottom_names", "blob_loss_weights", "forward", "backward", "jvp", "hvp", "gnvp", "jacobian", "forward_all",
        "forward_backward_all", "_forward", "_backward", "reshape", "set_input_arrays", "copy_from", "share_with",
        "save", "save_hdf5", "to_onnx", "load_hdf5", "clear_param_diffs", "before_forward", "after_forward",
        "before_backward", "after_backward", "close", "reuse_memory", "memory_estimate", "memory_usage"]),
    ("`Blob`", "netlib.Blob", [
        "data", "diff", "shape", "reshape", "count", "count_axes", "num", "channels", "height", "width"]),
    ("`Layer` (Python layers)", "netlib.Layer", ["setup", "reshape", "forward", "backward", "jvp", "backward_jvp", "blobs", "type"]),
    ("Solvers (`SGDSolver` and the others)", "netlib.Solver", [
        "net", "test_nets", "iter", "param", "lr", "step", "solve", "restore", "snapshot", "apply_update",
        "add_callback", "share_weights"]),
    ("`caffe.io`", "netlib.io", [
        "Transformer", "Transformer.set_transpose", "Transformer.set_channel_swap", "Transformer.set_raw_scale",
        "Transformer.set_mean", "Transformer.set_input_scale", "Transformer.preprocess", "Transformer.deprocess",
        "load_image", "resize_image", "oversample", "blobproto_to_array", "array_to_blobproto",
        "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist", "array_to_datum",
        "datum_to_array"]),
    ("`caffe.net_spec` (`layers as L`, `params as P`)", "netlib.net_spec", [
        "NetSpec", "NetSpec.to_proto", "to_proto", "layers", "params", "param_name_dict", "Top", "Function"]),
    ("`caffe.Classifier`", "netlib.classifier", ["Classifier", "Classifier.predict"]),
    ("`caffe.Detector`", "netlib.detector", [
        "Detector", "Detector.detect_windows", "Detector.detect_selective_search", "Detector.crop",
        "Detector.configure_crop"]),
    ("`caffe.draw`", "netlib.draw", ["get_pydot_graph", "draw_net", "draw_net_to_file"]),
    ("`caffe.coord_map`", "netlib.coord_map", ["coord_map_from_to", "crop", "conv_params", "crop_params",
                                               "coord_map", "compose", "inverse"]),
    ("Running unchanged `import caffe` code", "netlib.compat", ["run", "install", "uninstall"]),
    ("Checking a layer's gradient, jvp and hvp rules", "netlib.testing", ["check_gradient", "check_jvp", "check_hvp"]),
    ("Optional compiled kernels (`netlib.accel`, numba)", "netlib.accel", [
        "available", "enabled", "set_enabled", "kernels", "kernels_for", "status"]),
]


def _resolve(path):
    import importlib
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _lookup(owner, name):
    obj = owner
    for attr in name.split("."):
        raw = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        obj = raw
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj


def _summary(obj):
    doc = inspect.getdoc(obj) if not isinstance(obj, (int, float, str)) else None
    if not doc:
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _signature(name, obj):
    leaf = name.split(".")[-1]
    if isinstance(obj, property):
        return "`%s`" % leaf, "property"
    target = obj
    if inspect.isclass(obj):
        target = obj.__init__
    if callable(target):
        try:
            sig = str(inspect.signature(target))
        except (TypeError, ValueError):
            sig = "(...)"
        if inspect.isclass(obj) or (inspect.isfunction(target) and "self" in sig.split(",")[0]):
            sig = "(" + sig[1:].split(",", 1)[1].lstrip() if "," in sig else "()"
        sig = sig.replace("<class 'numpy.float32'>", "numpy.float32")
        if leaf == "__init__":
            return "`%s%s`" % ("Net", sig), "constructor"
        return "`%s%s`" % (leaf, sig), "class" if inspect.isclass(obj) else "function"
    return "`%s`" % leaf, type(obj).__name__


def render():
    lines = ["# API reference: the pycaffe surface", "",
             "Generated from the code by `tools/make_api_reference.py` (tests/test_docs.py checks that it is "
             "current). Every name is pycaffe's and works the same way after `import netlib as caffe`; see "
             "[moving from pycaffe](moving-from-pycaffe.md) for the few differences.", ""]
    for title, path, members in SECTIONS:
        owner = _resolve(path)
        lines += ["## " + title, ""]
        for name in members:
            try:
                obj = _lookup(owner, name)
            except AttributeError:
                # instance attributes set in __init__ (Net.blobs, Solver.net, ...)
                doc = _instance_attribute_doc(path, name)
                lines.append("* `%s`: %s" % (name, doc))
                continue
            if isinstance(obj, (str, int, float)) and (path, name) in _ATTRIBUTES:
                lines.append("* `%s`: %s" % (name, _ATTRIBUTES[(path, name)]))
                continue
            sig, _ = _signature(name, obj)
            summary = _summary(owner if name == "__init__" else obj)
            lines.append("* %s%s" % (sig, (": " + summary) if summary else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_ATTRIBUTES = {
    ("netlib.Net", "blobs"): "OrderedDict blob name -> Blob, in creation order (split blobs included).",
    ("netlib.Net", "layers"): "list of the Layer objects, in order.",
    ("netlib.Net", "layer_dict"): "OrderedDict layer name -> Layer.",
    ("netlib.Net", "_blob_names"): "list of the blob names, in blob-index order.",
    ("netlib.Layer", "blobs"): "the layer's parameter blobs; `self.blobs.add_blob(*shape)` adds a learnable one.",
    ("netlib.Layer", "type"): "the layer's type string (`'Python'` for Python layers).",
    ("netlib.Solver", "net"): "the training Net.",
    ("netlib.Solver", "test_nets"): "list of the test Nets (sharing the training weights).",
    ("netlib.Solver", "iter"): "the current iteration.",
    ("netlib.Solver", "param"): "the SolverParameter message (`solver.param.base_lr = ...` takes effect).",
}


def _instance_attribute_doc(path, name):
    try:
        return _ATTRIBUTES[(path, name)]
    except KeyError:
        raise SystemExit("make_api_reference: %s has no member %r (update SECTIONS or _ATTRIBUTES)"
                         % (path, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else ""
        if current != text:
            print("docs/api.md is stale: run python tools/make_api_reference.py")
            return 1
        return 0
    with open(OUT, "w", encoding="utf-8") as handle:
        handle.write(text)
    print("wrote %s" % OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
