"""Unchanged pycaffe code: ``netlib run`` / ``python -m netlib.compat`` make
``caffe`` netlib for one process; Python-layer modules that ``import caffe``
load in ``netlib.Net`` and ``netlib train`` without a runner."""
import os
import subprocess
import sys
import textwrap
import types

import numpy
import pytest

import netlib
from conftest import ROOT, shared_path
from netlib import compat
from netlib.tools import cli

import python_net_sources as pns

SCRIPT = '''
import sys
import caffe
import caffe.proto
from caffe.proto import caffe_pb2
from caffe import Layer, TEST
import netlib

caffe.set_mode_cpu()
assert caffe is netlib and caffe_pb2 is netlib.caffe_pb2 and Layer is netlib.Layer
assert caffe.proto.caffe_pb2 is netlib.proto.caffe_pb2
param = caffe_pb2.NetParameter()
layer = param.layer.add(name="x", type="Input", top=["x"])
layer.input_param.shape.add(dim=[2, 3])
relu = param.layer.add(name="r", type="ReLU", bottom=["x"], top=["y"])
with open(sys.argv[1], "w") as handle:
    handle.write(str(param))
net = caffe.Net(sys.argv[1], TEST)
import numpy
out = net.forward(x=numpy.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], numpy.float32))
print("sum", float(out["y"].sum()), "argv", sys.argv[1:], "name", __name__)
'''


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_python_m_netlib_compat_runs_an_import_caffe_script(tmp_path):
    script = tmp_path / "classify.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "netlib.compat", str(script), str(tmp_path / "n.prototxt"),
                           "--flag"], capture_output=True, text=True, env=_env(), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "sum 12.0 argv ['%s', '--flag'] name __main__" % (tmp_path / "n.prototxt") in proc.stdout


def test_netlib_run_in_process_and_the_script_sees_its_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    script = tmp_path / "s.py"
    script.write_text("import caffe, helper_mod\nprint('value', helper_mod.VALUE, caffe.__name__)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.argv)
    assert cli.main(["run", str(script)]) == 0
    assert "value 7 netlib" in capsys.readouterr().out
    assert sys.argv == before


def test_exit_codes_and_the_scripts_own_traceback(tmp_path, capsys):
    (tmp_path / "exit3.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "boom.py").write_text("def f():\n    raise ValueError('bad value in script')\nf()\n")
    assert cli.main(["run", str(tmp_path / "exit3.py")]) == 3
    assert cli.main(["run", str(tmp_path / "boom.py")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: bad value in script" in err and "boom.py" in err


def test_a_missing_script_is_one_error_line(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.py")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.py" in err and "Traceback" not in err


def test_run_dash_m_runs_a_module(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymod.py").write_text("import sys, caffe\nprint('mod', caffe.TRAIN, sys.argv[1:])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["run", "-m", "mymod", "a"]) == 0
    assert "mod 0 ['a']" in capsys.readouterr().out


def test_caffe_submodules_are_the_netlib_modules():
    compat.install()
    import caffe
    import caffe.io
    from caffe import layers as L, params as P
    import caffe.draw
    import caffe.coord_map
    import caffe.net_spec
    from caffe.pycaffe import Net
    assert caffe.io is netlib.io and caffe.draw is netlib.draw and caffe.coord_map is netlib.coord_map
    assert caffe.net_spec is netlib.net_spec and Net is netlib.Net
    assert L is netlib.layers and P is netlib.params
    assert netlib.io.__spec__.name == "netlib.io"   # the shared modules keep their own identity
    with pytest.raises(ImportError):
        import caffe.no_such_module  # noqa: F401


def test_install_refuses_when_the_real_pycaffe_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "caffe", types.ModuleType("caffe"))
    with pytest.raises(netlib.ConfigError, match="already imported"):
        compat.install()


def test_nothing_named_caffe_is_installed_and_nets_load_pycaffe_modules(tmp_path):
    """A fresh process: no ``caffe`` is importable until a net loads a Python
    layer; then the module's ``import caffe`` gives netlib."""
    code = textwrap.dedent('''
        import importlib.util, sys
        import netlib
        assert importlib.util.find_spec("caffe") is None, "a caffe package is importable"
        sys.path.insert(0, %r)
        net = netlib.Net(%r, netlib.TRAIN)
        loss = float(net.forward()["loss"][0])
        import caffe
        print("ok", caffe is netlib, loss > 0, type(net.layers[-1]).__module__)
    ''' % (pns.MODULES, shared_path("reference", "models", "pycaffe_linreg", "linreg.prototxt")))
    env = _env()
    env["PYTHONPATH"] = ROOT    # not the caller's path: a real pycaffe there would be found
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ok True True pyloss" in proc.stdout


def test_pycaffe_pyloss_trains_linreg_through_netlib_train(tmp_path, capsys, monkeypatch):
    """Caffe's pycaffe linear-regression example: the real linreg.prototxt and
    a pyloss module that says ``import caffe``, trained by ``netlib train``."""
    linreg = shared_path("reference", "models", "pycaffe_linreg", "linreg.prototxt")
    monkeypatch.syspath_prepend(pns.MODULES)
    (tmp_path / "solver.prototxt").write_text(
        'net: "%s" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" max_iter: 100 display: 10 '
        'snapshot_prefix: "%s" random_seed: 3' % (linreg, tmp_path / "linreg"))
    assert cli.main(["train", "--solver", str(tmp_path / "solver.prototxt")]) == 0
    err = capsys.readouterr().err
    losses = [float(l.rsplit("=", 1)[1]) for l in err.splitlines() if ", loss = " in l]
    assert len(losses) == 11, err[-2000:]
    # x and y are fresh Gaussians each iteration: the best the two InnerProducts
    # can do is shrink towards zero, so the loss falls by far.
    assert losses[-1] < 0.1 * losses[0], losses
    net = netlib.Net(linreg, netlib.TEST, weights=str(tmp_path / "linreg_iter_100.caffemodel"))
    assert float(numpy.abs(net.params["ipx"][0].data).max()) < 0.1


def test_set_mode_gpu_without_cupy_is_a_clear_error(monkeypatch):
    from netlib import backend
    monkeypatch.setattr(backend, "cupy", None)
    with pytest.raises(netlib.ConfigError, match="CuPy"):
        netlib.set_mode_gpu()
    assert backend.default_xp() is numpy


def test_a_real_caffe_on_the_scripts_path_is_shadowed(tmp_path, capsys):
    """pycaffe scripts often do sys.path.insert(0, caffe_root + 'python');
    under netlib run that folder's caffe package is never imported."""
    fake = tmp_path / "caffe_root" / "python" / "caffe"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit('the real pycaffe was imported')\n")
    script = tmp_path / "s.py"
    script.write_text("import sys\nsys.path.insert(0, %r)\nimport caffe\nimport caffe.io\n"
                      "print('got', caffe.__name__, caffe.io.__name__)\n" % str(fake.parent))
    assert cli.main(["run", str(script)]) == 0
    assert "got netlib netlib.io" in capsys.readouterr().out
