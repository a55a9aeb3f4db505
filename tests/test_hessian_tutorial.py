"""docs/hessian-tutorial.md runs as written (its paths pointed at ../shared)
and its eigenvalue is right: the Rayleigh quotient of its final vector,
recomputed in float64 from centred differences of the gradient (not from
hvp), and its residual."""
import contextlib
import io
import os
import re

import numpy

import netlib
from netlib import backend

from conftest import ROOT, shared_path


def test_tutorial_power_iteration(monkeypatch):
    mnist = shared_path("data", "mnist")
    weights = shared_path("reference", "models", "lenet_trained", "lenet_iter_10000.caffemodel")
    with open(os.path.join(ROOT, "docs", "hessian-tutorial.md")) as f:
        code = re.findall(r"```python\n(.*?)```", f.read(), re.S)[0]
    code = code.replace('MNIST = "data/mnist"', "MNIST = %r" % mnist)
    code = code.replace('WEIGHTS = "lenet_iter_10000.caffemodel"', "WEIGHTS = %r" % weights)
    assert mnist in code and weights in code
    monkeypatch.chdir(ROOT)
    scope = {"__name__": "__main__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "hessian-tutorial.md", "exec"), scope)
    printed = out.getvalue()
    lam = scope["lam"]
    assert "largest eigenvalue %.4f" % lam in printed
    assert 1 < lam < 1000
    assert scope["residual"] < 1e-3 * lam
    assert scope["lam_gn"] > 0

    # independent check in float64: v . (g(w + h v) - g(w - h v)) / 2h with the solver's L2 term
    net32 = scope["net"]
    net = netlib.Net(scope["param"], netlib.TRAIN, dtype=numpy.float64)
    for src, dst in zip(net32.learnable_params, net.learnable_params):
        dst.data[...] = backend.to_numpy(src.data)
    for name in ("data", "label"):
        net.blobs[name].data[...] = backend.to_numpy(net32.blobs[name].data)
    v = [numpy.asarray(backend.to_numpy(x), dtype=numpy.float64) for x in scope["v"]]
    base = [p.data.copy() for p in net.learnable_params]

    def grad(eps):
        for p, b, d in zip(net.learnable_params, base, v):
            p.data[...] = b + eps * d
        net.clear_param_diffs()
        net.forward_backward()
        return [p.diff.copy() + 0.0005 * m * p.data for p, m in zip(net.learnable_params, net.params_weight_decay)]

    h = 1e-6
    plus, minus = grad(h), grad(-h)
    rayleigh = sum(float((d * (a - b)).sum()) for d, a, b in zip(v, plus, minus)) / (2 * h)
    rayleigh /= sum(float((d * d).sum()) for d in v)
    assert abs(rayleigh - lam) < 1e-3 * lam, (rayleigh, lam)
