"""Run unchanged pycaffe code: ``caffe`` and ``caffe.*`` resolve to netlib.

A script written for BVLC Caffe says ``import caffe``, ``from caffe import
layers as L``, ``from caffe.proto import caffe_pb2`` or ``import caffe.io``.
Run it as it is with either of::

    netlib run script.py args...
    python -m netlib.compat script.py args...

(``-m package.module`` runs a module instead of a file, as ``python -m``.)
For that process only, an import hook at the front of ``sys.meta_path``
makes ``caffe`` the :mod:`netlib` package and ``caffe.X`` the module
``netlib.X`` (``caffe.proto.caffe_pb2`` is :mod:`netlib.proto.caffe_pb2`,
``caffe.io`` is :mod:`netlib.io`, ``caffe.pycaffe`` and ``caffe._caffe`` are
netlib itself).  The very module objects are shared, so ``caffe.Layer is
netlib.Layer``.  Nothing named ``caffe`` is installed on disk and a real
pycaffe elsewhere on ``sys.path`` is shadowed only inside that process.

Python-layer modules that a prototxt names do ``import caffe`` and subclass
``caffe.Layer`` (Caffe's pyloss.py, FCN's voc_layers.py).  netlib turns the
hook on before it imports such a module, so ``netlib train`` and
``netlib.Net`` load them unchanged.  If the real pycaffe was imported first
in the same process the hook cannot take over, and :func:`install` says so.
"""
import importlib
import importlib.abc
import importlib.util
import os
import runpy
import sys
import traceback

from .errors import ConfigError

ALIAS = "caffe"

# caffe.<name> whose netlib module has another name.
_RENAMED = {"pycaffe": "", "_caffe": ""}


def _target(fullname):
    """The netlib module name behind ``caffe`` / ``caffe.X.Y``."""
    if fullname == ALIAS:
        return "netlib"
    rest = fullname[len(ALIAS) + 1:]
    head, _, tail = rest.partition(".")
    if head in _RENAMED:
        head = _RENAMED[head]
    parts = ["netlib"] + [p for p in (head, tail) if p]
    return ".".join(parts)


class _Loader(importlib.abc.Loader):
    """Hands out the already-imported netlib module under its caffe name."""

    def __init__(self, target):
        self.target = target
        self._saved = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._saved = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module):
        # The import system stamped the alias spec on the shared module; the
        # module keeps its own, so its relative imports stay netlib's.
        module.__spec__ = self._saved


class CaffeAliasFinder(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` finder mapping ``caffe[.X]`` to ``netlib[.X]``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        name = _target(fullname)
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            return None     # the usual ModuleNotFoundError for caffe.<missing>
        is_package = found.submodule_search_locations is not None
        spec = importlib.util.spec_from_loader(fullname, _Loader(name), is_package=is_package)
        if is_package:
            spec.submodule_search_locations = list(found.submodule_search_locations)
        return spec


def installed():
    """True when ``caffe`` resolves to netlib in this process."""
    return any(isinstance(f, CaffeAliasFinder) for f in sys.meta_path)


def install():
    """Make ``import caffe`` (and ``caffe.*``) give netlib in this process.

    Idempotent.  Raises :class:`~netlib.errors.ConfigError` if a different
    module named ``caffe`` (the real pycaffe) is already imported.
    """
    import netlib
    current = sys.modules.get(ALIAS)
    if current is not None and current is not netlib:
        raise ConfigError("a module named 'caffe' is already imported from %s; netlib cannot stand in for it "
                          "in this process (import netlib first, or run the script with 'netlib run')"
                          % getattr(current, "__file__", "?"))
    if not installed():
        sys.meta_path.insert(0, CaffeAliasFinder())


def uninstall():
    """Undo :func:`install`: drop the hook and the ``caffe*`` entries it made."""
    import netlib
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, CaffeAliasFinder)]
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        module = sys.modules[name]
        if module is netlib or getattr(module, "__name__", "").startswith("netlib"):
            del sys.modules[name]


USAGE = """usage: netlib run SCRIPT.py [ARGS...]
       netlib run -m MODULE [ARGS...]
       python -m netlib.compat SCRIPT.py [ARGS...]

Runs an unchanged pycaffe script: 'import caffe' and 'caffe.*' give netlib in
that process only.  ARGS reach the script as sys.argv[1:].
"""


def run(argv):
    """Run ``argv = [script, args...]`` or ``['-m', module, args...]`` with the alias on.

    Returns the script's exit status (0 when it ends normally; ``SystemExit``
    codes pass through).
    """
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    if argv[0] == "-m" and (len(argv) < 2 or importlib.util.find_spec(argv[1]) is None):
        raise ConfigError("-m: no module named %r" % (argv[1] if len(argv) > 1 else ""))
    install()
    if argv[0] != "-m" and not os.path.isfile(argv[0]):
        from .errors import NetlibFileNotFoundError
        raise NetlibFileNotFoundError("%s: no such script" % argv[0])
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1]] + list(argv[2:])
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = argv[0]
            sys.argv = list(argv)
            folder = os.path.dirname(os.path.abspath(script))
            if sys.path:
                sys.path[0] = folder
            else:
                sys.path.insert(0, folder)
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        sys.stderr.write("%s\n" % code)
        return 1
    except Exception:
        # The script's own error: its traceback, as python would print it.
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path:
            sys.path[0] = saved_path0
    return 0


def main(argv=None):
    """``python -m netlib.compat``: errors of the runner itself are one line."""
    from .errors import NetlibError
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except NetlibError as exc:
        sys.stderr.write("netlib run: error: %s\n" % exc)
        return 1


if __name__ == "__main__":
    # Run through the importable module so there is one hook class per process.
    from netlib.compat import main as _main
    sys.exit(_main())
