"""Fuzzing the ``netlib`` command line (hypothesis, seeded and bounded).

Property: any argument list made of the command's own words (commands,
flags, real and missing files) and hostile values (huge, negative and
non-numeric numbers, empty strings, NUL and undecodable bytes) ends with an
exit code, 0 or a one-line ``netlib: error: ...`` (exit 1), within 10 s:
never a traceback and never netlib's "internal error" line.  Long run::

    NETLIB_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz_cli.py
"""
import os

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from netlib.tools import cli  # noqa: E402
from fuzzing import alarm as _alarm  # noqa: E402

EXAMPLES = int(os.environ.get("NETLIB_FUZZ_EXAMPLES", "150"))

NET = """name: "tiny"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }
"""

# Commands that only read (train gets a solver that never reaches a file it could write
# beyond the temp folder; 'data' and 'run' are left out: they write data sets or run scripts).
COMMANDS = ["train", "test", "time", "device_query", "help", "parse_log", "bogus", ""]
FLAGS = ["--solver", "--model", "--weights", "--snapshot", "--iterations", "--phase", "--level", "--stage",
         "--gpu", "--sigint_effect", "--sighup_effect", "--memory", "--forbid_python_layers", "--log", "-h",
         "--nosuchflag"]
VALUES = ["net.prototxt", "solver.prototxt", "missing.prototxt", "net.prototxt.bad", "-1", "0", "1", "3",
          "2147483648", "-2147483649", "99999999999999999999", "1e5", "nan", "abc", "", "TRAIN", "TEST",
          "stop", "snapshot", "none", "0,1", "all", "\x00", "caf\u00e9", "\udcff", "log/../x.log"]


def _work(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "net.prototxt.bad").write_text(NET.replace("num_output: 2", "num_output: 2 num_output: 3"))
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nmax_iter: 0\n'
                                              'snapshot_prefix: "snap"\nsnapshot_after_train: false\n')
    import netlib
    netlib.Net(str(tmp_path / "net.prototxt"), netlib.TEST).save_hdf5(str(tmp_path / "w.h5"))


# the flags that get a command to its real work (so the hostile values reach it)
NEEDS = {"train": ["--solver", "solver.prototxt"], "test": ["--model", "net.prototxt", "--weights", "w.h5"],
         "time": ["--model", "net.prototxt", "--iterations", "1"]}


@st.composite
def argv(draw):
    command = draw(st.sampled_from(COMMANDS))
    out = [command]
    if command in NEEDS and draw(st.integers(0, 3)):
        out += NEEDS[command]
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(FLAGS))
        if draw(st.booleans()):
            out += [flag, draw(st.sampled_from(VALUES))]
        elif draw(st.booleans()):
            out.append("%s=%s" % (flag, draw(st.sampled_from(VALUES))))
        else:
            out.append(flag)
    return [a for a in out if a != "" or draw(st.booleans())]


def test_fuzz_command_line(tmp_path, monkeypatch, capsys):
    _work(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETLIB_NO_PROGRESS", "1")
    monkeypatch.delenv("NETLIB_DEBUG", raising=False)

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv())
    def run(args):
        with _alarm():
            code = cli.main(list(args))
        _, err = capsys.readouterr()
        assert code in (0, 1), (args, code, err)
        assert "Traceback" not in err and "internal error" not in err, (args, err)
        if code:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert lines and lines[-1].startswith("netlib: error: "), (args, err)
    run()


@pytest.mark.parametrize("args,fragment", [
    (["train", "--solver", "solver.prototxt", "--level", "99999999999999999999"], "--level"),
    (["time", "--model", "net.prototxt", "--iterations", "2147483648"], "out of range"),
    (["train", "--solver", "\udcffx.prototxt"], "\\udcff"),        # shown escaped, not a UnicodeEncodeError
    (["train", "--log", "\x00"], "NUL byte"),                      # found by the 10,000-case run
])
def test_found_by_fuzzing(tmp_path, monkeypatch, capsys, args, fragment):
    _work(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 1
    err = capsys.readouterr()[1]
    assert err.startswith("netlib: error: ") and fragment in err and "internal error" not in err
