#!/usr/bin/env python
"""Make the NetSpec / coord_map goldens with real BVLC pycaffe.

Run under the real pycaffe environment (never needed by the tests):

    source /opt/caffe/env.sh
    python tools/make_netspec_goldens.py [OUT_DIR]

It runs the scripts of tests/golden/netspec/netspec_cases.py and
coord_map_cases.py with ``caffe``, ``caffe.layers``, ``caffe.params`` and
``caffe.coord_map`` and writes into OUT_DIR (default tests/golden/netspec/):

* ``<case>.prototxt``: real pycaffe's ``str()`` of each case's NetParameter;
* ``errors.json``: {error case: exception class name};
* ``constants.json``: pycaffe's ``param_name_dict()`` and the P constants;
* ``coord_map.json``: {case: {label: encoded result}} of the coord_map cases;
* ``versions.json``: the protobuf version/backend and numpy version used.

The texts are what pycaffe prints with its protobuf (4.21, upb backend).
That printer lists the fields of each message in .proto declaration order,
whereas protobuf's other printers (C++ TextFormat, which Caffe itself uses,
the pure-Python one, and recent upb, which netlib requires) use field-number
order; values, names and repeated-field order are printed the same.  The
tests therefore put each golden block's fields in field-number order (moving
whole lines, never re-printing a value) before comparing bytes.
"""
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "tests", "golden", "netspec")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(GOLDEN, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(out_dir=GOLDEN):
    import numpy
    import google.protobuf
    from google.protobuf.internal import api_implementation
    import caffe
    import caffe.coord_map as cm
    from caffe import layers as L, params as P
    from caffe import net_spec
    if "netlib" in caffe.__file__:
        sys.exit("this must run under real pycaffe (source /opt/caffe/env.sh)")

    cases = load("netspec_cases")
    for name in cases.CASES:
        text = str(getattr(cases, "case_" + name)(caffe, L, P))
        with open(os.path.join(out_dir, name + ".prototxt"), "w") as f:
            f.write(text)

    errors = {}
    for name in cases.ERRORS:
        try:
            getattr(cases, "error_" + name)(caffe, L, P)
        except Exception as e:  # noqa: BLE001 - its class is the golden
            errors[name] = type(e).__name__
        else:
            errors[name] = "no exception"

    constants = {"param_name_dict": net_spec.param_name_dict(),
                 "params": {"%s.%s" % c: int(getattr(getattr(P, c[0]), c[1]))
                            for c in cases.PARAM_CONSTANTS}}

    cmc = load("coord_map_cases")
    maps = {name: {k: cmc.encode(v)
                   for k, v in getattr(cmc, "case_" + name)(caffe, L, P, cm).items()}
            for name in cmc.CASES}

    versions = {"protobuf": google.protobuf.__version__,
                "protobuf_backend": api_implementation.Type(), "numpy": numpy.__version__,
                "python": sys.version.split()[0]}
    for fname, obj in [("errors.json", errors), ("constants.json", constants),
                       ("coord_map.json", maps), ("versions.json", versions)]:
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
    print("wrote %d prototxt cases, %d error cases, %d coord_map cases to %s"
          % (len(cases.CASES), len(errors), len(maps), out_dir))


if __name__ == "__main__":
    main(*sys.argv[1:])
