"""netlib.tools.parse_log / plot_log: Caffe's parse_log.py and plot_training_log.py.example.

The expected numbers are read by hand from the raw log lines (quoted in the comments), not
computed with the parser's own code.
"""
import csv
import datetime
import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path
from netlib.errors import ConfigError, NetlibError, NetlibFileNotFoundError, ParseError
from netlib.tools import parse_log as pl
from netlib.tools import plot_log
from netlib.tools.cli import GlogFormatter, UsageError


def caffe_log():
    return shared_path("reference", "caffe_made", "lenet_small_run", "caffe_train_lenet.log")


def read(path):
    with open(path) as f:
        return f.read()


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-9)


# -- the real Caffe log (year-prefixed glog lines: I20261123 08:42:55.183014 ...) -------------

def test_real_caffe_log_rows():
    train, test = pl.parse_log(caffe_log())
    # Train rows at iterations 0, 20, ..., 280 (display: 20); test rows at 0, 100, 200, 300.
    assert [r["NumIters"] for r in train] == [float(i) for i in range(0, 300, 20)]
    assert [r["NumIters"] for r in test] == [0.0, 100.0, 200.0, 300.0]
    assert list(train[0].keys()) == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert list(test[0].keys()) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    # The start: "I20261123 08:42:55.183014 22281 solver.cpp:289] Solving LeNet".

    # First train row: "I20261123 08:42:55.481755 ... Train net output #0: loss = 2.37778 ...";
    # printed before any lr line, so it copies the second row's rate, which is the one of
    # "I20261123 08:42:55.481778 ... Iteration 0, lr = 0.01".
    assert train[0]["loss"] == 2.37778
    assert train[0]["Seconds"] == approx(0.298741)  # 55.481755 - 55.183014
    assert train[0]["LearningRate"] == 0.01
    # Middle train row: "I20261123 08:42:58.359455 ... Train net output #0: loss = 0.202546";
    # the last lr line before it: "I20261123 08:42:57.654744 ... Iteration 80, lr = 0.00994042".
    assert train[5]["NumIters"] == 100.0
    assert train[5]["loss"] == 0.202546
    assert train[5]["Seconds"] == approx(3.176441)  # 58.359455 - 55.183014
    assert train[5]["LearningRate"] == 0.00994042
    # Last train row: "I20261123 08:43:03.210028 ... Train net output #0: loss = 0.00996346";
    # last lr line before it: "I20261123 08:43:02.730762 ... Iteration 260, lr = 0.00980933".
    assert train[-1]["NumIters"] == 280.0
    assert train[-1]["loss"] == 0.00996346
    assert train[-1]["Seconds"] == approx(8.027014)  # 63.210028 - 55.183014
    assert train[-1]["LearningRate"] == 0.00980933

    # First test row: "I20261123 08:42:55.448305 ... Test net output #0: accuracy = 0.078" and
    # "... Test net output #1: loss = 2.33173 (* 1 = 2.33173 loss)"; its rate is the second test
    # row's: the last lr line before iteration 100's test, "Iteration 80, lr = 0.00994042".
    assert test[0]["accuracy"] == 0.078
    assert test[0]["loss"] == 2.33173
    assert test[0]["Seconds"] == approx(0.265291)  # 55.448305 - 55.183014
    assert test[0]["LearningRate"] == 0.00994042
    # Last test row: "I20261123 08:43:03.858546 ... Test net output #0: accuracy = 1",
    # "... Test net output #1: loss = 0.00744882 (* 1 = 0.00744882 loss)"; last lr line before:
    # "I20261123 08:43:03.210040 ... Iteration 280, lr = 0.00979502".
    assert test[-1]["accuracy"] == 1.0
    assert test[-1]["loss"] == 0.00744882
    assert test[-1]["Seconds"] == approx(8.675532)  # 63.858546 - 55.183014
    assert test[-1]["LearningRate"] == 0.00979502


def test_real_caffe_log_csv(tmp_path, capsys):
    log = caffe_log()
    assert pl.main([log, str(tmp_path), "--verbose"]) == 0
    out = capsys.readouterr().out
    train_file = tmp_path / "caffe_train_lenet.log.train"
    test_file = tmp_path / "caffe_train_lenet.log.test"
    assert "Wrote %s" % train_file in out and "Wrote %s" % test_file in out
    # Caffe's script writes with the csv module's excel dialect: \r\n line ends, repr floats.
    test_lines = test_file.read_bytes().decode().split("\r\n")
    assert test_lines[0] == "NumIters,Seconds,LearningRate,accuracy,loss"
    assert test_lines[1] == "0.0,0.265291,0.00994042,0.078,2.33173"
    assert test_lines[4] == "300.0,8.675532,0.00979502,1.0,0.00744882"
    assert test_lines[5:] == [""]
    train_lines = train_file.read_text().splitlines()
    assert train_lines[0] == "NumIters,Seconds,LearningRate,loss"
    assert train_lines[1] == "0.0,0.298741,0.01,2.37778"
    assert len(train_lines) == 16


def test_real_caffe_log_without_year_prefix_gives_the_same_rows(tmp_path):
    """The same log with Caffe-era prefixes (I1123 ...), which Caffe's own script reads."""
    lines = read(caffe_log()).splitlines()
    old = [line[0] + line[5:] if line[:1] in "IWEF" and line[1:9].isdigit() else line
           for line in lines]
    assert old[521].startswith("I1123 08:42:55.183014 22281 solver.cpp:289] Solving LeNet")
    path = tmp_path / "old_style.log"
    path.write_text("\n".join(old) + "\n")
    assert pl.parse_log(str(path), year=2026) == pl.parse_log(caffe_log())


def test_plot_real_caffe_log(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "acc.png"
    assert plot_log.main(["0", str(out), caffe_log()]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- netlib-style logs -----------------------------------------------------------------------

# (seconds after the start, source line, message): Caffe's texts as netlib's solver logs them.
NETLIB_LINES = [
    (0.0, 629, "Solving TinyNet"),
    (0.1, 665, "Iteration 0, Testing net (#0)"),
    (0.2, 707, "    Test net output #0: accuracy = 0.1"),
    (0.2001, 707, "    Test net output #1: loss = 2.3 (* 1 = 2.3 loss)"),
    (0.3, 580, "Iteration 0 (0 iter/s, 0.3s/10 iters), loss = 2.4"),
    (0.3001, 608, "    Train net output #0: loss = 2.4 (* 1 = 2.4 loss)"),
    (0.3002, 448, "Iteration 0, lr = 0.1"),
    (1.5, 580, "Iteration 10 (8.33333 iter/s, 1.2s/10 iters), loss = 1.5"),
    (1.5001, 608, "    Train net output #0: loss = 1.5 (* 1 = 1.5 loss)"),
    (1.5002, 448, "Iteration 10, lr = 0.05"),
    (2.0, 665, "Iteration 20, Testing net (#0)"),
    (2.25, 707, "    Test net output #0: accuracy = 0.75"),
    (2.2501, 707, "    Test net output #1: loss = 0.5 (* 1 = 0.5 loss)"),
    (2.5, 580, "Iteration 20 (10 iter/s, 1s/10 iters), loss = 0.6"),
    (2.5001, 608, "    Train net output #0: loss = 0.6 (* 1 = 0.6 loss)"),
    (2.5002, 448, "Iteration 20, lr = 0.025"),
    (3.0, 645, "Iteration 30, loss = 0.55"),
    (3.0001, 665, "Iteration 30, Testing net (#0)"),
    (3.25, 707, "    Test net output #0: accuracy = 0.8"),
    (3.2501, 707, "    Test net output #1: loss = 0.45 (* 1 = 0.45 loss)"),
    (3.3, 648, "Optimization Done."),
]
# What Caffe's script makes of it (read off the lines above).
NETLIB_TRAIN = [(0.0, 0.3001, 0.1, 2.4), (10.0, 1.5001, 0.1, 1.5), (20.0, 2.5001, 0.05, 0.6)]
NETLIB_TEST = [(0.0, 0.2, 0.05, 0.1, 2.3), (20.0, 2.25, 0.05, 0.75, 0.5),
               (30.0, 3.25, 0.025, 0.8, 0.45)]


def glog_line(when, source_line, message, with_year=False):
    date = ("%04d" % when.year if with_year else "") + "%02d%02d" % (when.month, when.day)
    return "I%s %02d:%02d:%02d.%06d  4321 solver.py:%d] %s" % (
        date, when.hour, when.minute, when.second, when.microsecond, source_line, message)


def write_log(path, start, with_year=False, lines=NETLIB_LINES):
    text = ["I%s 07:59:59.000000  4321 cli.py:340] Use CPU." % (
        ("%04d" % start.year if with_year else "") + "%02d%02d" % (start.month, start.day)),
        "net: \"tiny.prototxt\"", "test_iter: 3", ""]  # a solver dump: no glog prefix
    for offset, source_line, message in lines:
        when = start + datetime.timedelta(microseconds=round(offset * 1e6))
        text.append(glog_line(when, source_line, message, with_year))
        if "Iteration 10," in message:  # a continuation line (a warning's second line)
            text.append("    (second line of a multi-line message)")
    path.write_text("\n".join(text) + "\n")
    return str(path)


def check_netlib_rows(train, test):
    assert [tuple(r.values()) for r in train] == [tuple(approx(v) for v in row) for row in NETLIB_TRAIN]
    assert [tuple(r.values()) for r in test] == [tuple(approx(v) for v in row) for row in NETLIB_TEST]
    assert list(train[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert list(test[0]) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]


@pytest.mark.parametrize("with_year", [False, True], ids=["I1123", "I20251123"])
def test_netlib_log(tmp_path, with_year):
    path = write_log(tmp_path / "netlib.log", datetime.datetime(2025, 11, 23, 8, 0, 0), with_year)
    first = read(path).splitlines()[4]
    assert first.startswith("I20251123 08:00:00.000000" if with_year else "I1123 08:00:00.000000")
    check_netlib_rows(*pl.parse_log(path, year=2025))
    check_netlib_rows(*pl.parse_log(path))  # the year from the file's ctime: same differences


def test_netlib_log_written_by_glog_formatter(tmp_path):
    """Lines made by netlib's own GlogFormatter (the format ``netlib train --log`` writes)."""
    formatter = GlogFormatter()
    start = datetime.datetime(2025, 6, 10, 12, 0, 0).timestamp()
    lines = []
    for offset, source_line, message in NETLIB_LINES:
        record = logging.makeLogRecord({"msg": message, "levelno": logging.INFO, "levelname": "INFO",
                                        "created": start + offset, "filename": "solver.py",
                                        "lineno": source_line})
        lines.append(formatter.format(record))
    assert lines[0].startswith("I0610 12:00:00.000000 ")
    path = tmp_path / "formatter.log"
    path.write_text("\n".join(lines) + "\n")
    train, test = pl.parse_log(str(path))
    assert [r["NumIters"] for r in train] == [0.0, 10.0, 20.0]
    assert [r["loss"] for r in train] == [2.4, 1.5, 0.6]
    assert [r["accuracy"] for r in test] == [0.1, 0.75, 0.8]
    assert test[1]["Seconds"] == pytest.approx(2.25, abs=2e-6)  # float timestamps: +-1 us


@pytest.mark.parametrize("with_year", [False, True], ids=["I1231", "I20251231"])
def test_seconds_across_new_year(tmp_path, with_year):
    # Solving at Dec 31 23:59:59.000000; the lines after it cross into Jan 1 of the next year.
    path = write_log(tmp_path / "newyear.log", datetime.datetime(2025, 12, 31, 23, 59, 59), with_year)
    text = read(path)
    assert ("I20251231 23:59:59.000000" if with_year else "I1231 23:59:59.000000") in text
    # "Iteration 10 ..., loss = 1.5" is at Jan 1 00:00:00.500000 and its output 100 us later.
    assert ("I20260101 00:00:00.500100" if with_year else "I0101 00:00:00.500100") in text
    for year in (2025, None):
        train, test = pl.parse_log(path, year=year)
        check_netlib_rows(train, test)
        assert train[1]["Seconds"] == approx(1.5001)
        assert test[-1]["Seconds"] == approx(3.25)


def test_month_roll_over_within_a_year(tmp_path):
    # Jan 31 23:59:59 -> Feb 1: no new year, 1.5001 s as before.
    path = write_log(tmp_path / "feb.log", datetime.datetime(2025, 1, 31, 23, 59, 59))
    check_netlib_rows(*pl.parse_log(path, year=2025))


def test_log_without_solving_line_starts_at_first_timestamp(tmp_path):
    path = write_log(tmp_path / "nosolve.log", datetime.datetime(2025, 3, 1, 8, 0, 0),
                     lines=NETLIB_LINES[1:])
    train, test = pl.parse_log(path, year=2025)
    # The first timestamped line is "I0301 07:59:59.000000 ... Use CPU.", one second earlier.
    assert train[0]["Seconds"] == approx(1.3001)
    assert test[-1]["Seconds"] == approx(4.25)


def test_log_with_setup_only_gives_no_rows(tmp_path, capsys):
    path = write_log(tmp_path / "setup.log", datetime.datetime(2025, 3, 1, 8, 0, 0),
                     lines=NETLIB_LINES[:2])
    assert pl.parse_log(path) == ([], [])
    assert pl.main([path, str(tmp_path)]) == 0
    assert "nothing written" in capsys.readouterr().err
    assert not os.path.exists(path + ".train") and not os.path.exists(path + ".test")


def test_single_row_is_dropped_like_caffe(tmp_path):
    """Caffe keeps a table's first row only once a second one starts."""
    path = write_log(tmp_path / "one.log", datetime.datetime(2025, 3, 1, 8, 0, 0),
                     lines=NETLIB_LINES[:7])  # up to "Iteration 0, lr = 0.1"
    assert pl.parse_log(path) == ([], [])
    path = write_log(tmp_path / "two.log", datetime.datetime(2025, 3, 1, 8, 0, 0),
                     lines=NETLIB_LINES[:10])  # up to "Iteration 10, lr = 0.05"
    train, test = pl.parse_log(path)
    assert test == []
    assert [r["NumIters"] for r in train] == [0.0, 10.0]


# -- CSV files -------------------------------------------------------------------------------

def read_table(path, delimiter=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def test_main_writes_csv_tables(tmp_path, capsys):
    path = write_log(tmp_path / "run.INFO", datetime.datetime(2025, 11, 23, 8, 0, 0))
    out = tmp_path / "out"
    out.mkdir()
    assert pl.main([path, str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert sorted(os.listdir(out)) == ["run.INFO.test", "run.INFO.train"]
    train = read_table(out / "run.INFO.train")
    test = read_table(out / "run.INFO.test")
    assert train[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert test[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert train[1:] == [["0.0", "0.3001", "0.1", "2.4"], ["10.0", "1.5001", "0.1", "1.5"],
                         ["20.0", "2.5001", "0.05", "0.6"]]
    assert test[2] == ["20.0", "2.25", "0.05", "0.75", "0.5"]


@pytest.mark.parametrize("given, used", [(";", ";"), ("\t", "\t"), ("\\t", "\t"), (" ", " ")])
def test_main_delimiter(tmp_path, given, used):
    path = write_log(tmp_path / "run.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    assert pl.main([path, str(tmp_path), "--delimiter", given]) == 0
    first = (tmp_path / "run.log.test").read_text().splitlines()[0]
    assert first == used.join(["NumIters", "Seconds", "LearningRate", "accuracy", "loss"])
    assert read_table(tmp_path / "run.log.test", used)[3] == ["30.0", "3.25", "0.025", "0.8", "0.45"]


def test_write_csv_api(tmp_path):
    rows = [{"NumIters": 0.0, "Seconds": 0.5, "LearningRate": float("nan"), "loss": 1.25},
            {"NumIters": 10.0, "Seconds": 1.0, "LearningRate": 0.1, "loss": 1.0, "extra": 3.0}]
    assert pl.write_csv(str(tmp_path / "t.csv"), rows, delimiter="|")
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "NumIters|Seconds|LearningRate|loss|extra", "0.0|0.5|nan|1.25|", "10.0|1.0|0.1|1.0|3.0"]
    assert not pl.write_csv(str(tmp_path / "none.csv"), [])
    assert not (tmp_path / "none.csv").exists()


# -- plots -----------------------------------------------------------------------------------

def test_chart_types_are_caffes():
    assert plot_log.CHART_TYPES == (
        "Test accuracy  vs. Iters", "Test accuracy  vs. Seconds", "Test loss  vs. Iters",
        "Test loss  vs. Seconds", "Train learning rate  vs. Iters", "Train learning rate  vs. Seconds",
        "Train loss  vs. Iters", "Train loss  vs. Seconds")
    assert plot_log.chart_description(7) == ("Train", "Seconds", "Train loss")


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_log(tmp_path / "a.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    b = write_log(tmp_path / "b", datetime.datetime(2025, 11, 23, 9, 0, 0), with_year=True)
    out = tmp_path / "loss.png"
    assert plot_log.main(["6", str(out), a, b]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (640, 480)


def test_plot_svg_all_chart_types(tmp_path):
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "a.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    for chart_type in range(8):
        out = tmp_path / ("chart%d.SVG" % chart_type)
        assert plot_log.plot(chart_type, str(out), [log]) == str(out)
        text = out.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text[:1000]
        assert "<!-- %s -->" % plot_log.CHART_TYPES[chart_type] in text  # the title


def test_plot_errors(tmp_path, monkeypatch):
    log = write_log(tmp_path / "a.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    for bad in ("8", "-1", "x", "1.5"):
        with pytest.raises(UsageError, match="not a valid chart type"):
            plot_log.main([bad, str(tmp_path / "x.png"), log])
    with pytest.raises(UsageError, match=r"\.png or \.svg"):
        plot_log.main(["0", str(tmp_path / "x.jpg"), log])
    with pytest.raises(UsageError, match="CHART_TYPE OUT_FILE LOG1"):
        plot_log.main(["0", str(tmp_path / "x.png")])
    with pytest.raises(UsageError):
        plot_log.main([])
    with pytest.raises(NetlibFileNotFoundError, match="missing.log"):
        plot_log.plot(0, str(tmp_path / "x.png"), [log, str(tmp_path / "missing.log")])
    with pytest.raises(NetlibFileNotFoundError, match="folder"):
        plot_log.plot(0, str(tmp_path / "nope" / "x.png"), log)

    # A test table whose columns are not called accuracy/loss; a log without test rows.
    renamed = tmp_path / "renamed.log"
    renamed.write_text(read(log).replace(": accuracy =", ": top1 =")
                       .replace("Test net output #1: loss =", "Test net output #1: test_loss ="))
    with pytest.raises(ConfigError, match=r"renamed.log: the test table has no accuracy column "
                                          r"\(its columns: top1, test_loss\)"):
        plot_log.plot(0, str(tmp_path / "x.png"), [str(renamed)])
    plot_log.plot(2, str(tmp_path / "x.png"), [str(renamed)])  # 'test_loss' contains 'loss'
    no_test = write_log(tmp_path / "train_only.log", datetime.datetime(2025, 11, 23, 8, 0, 0),
                        lines=[line for line in NETLIB_LINES if "Test" not in line[2]])
    with pytest.raises(ConfigError, match="train_only.log has no test rows"):
        plot_log.plot(1, str(tmp_path / "x.png"), no_test)
    plot_log.plot(5, str(tmp_path / "lr.png"), no_test)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        plot_log.plot(0, str(tmp_path / "y.png"), [log])
    assert str(err.value) == "plot_training_log needs matplotlib: pip install matplotlib"
    assert not (tmp_path / "y.png").exists()


def test_plot_help(capsys):
    assert plot_log.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "    0: Test accuracy  vs. Iters" in out and "    7: Train loss  vs. Seconds" in out


# -- parse_log errors ------------------------------------------------------------------------

def test_parse_errors(tmp_path):
    with pytest.raises(NetlibFileNotFoundError, match="missing.log") as err:
        pl.parse_log(str(tmp_path / "missing.log"))
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(NetlibFileNotFoundError, match="folder"):
        pl.parse_log(str(tmp_path))
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\nIteration 5, loss = 1\n    Train net output #0: loss = 1\n")
    with pytest.raises(ParseError, match="junk.txt: no glog-format log lines"):
        pl.parse_log(str(junk))
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(ParseError, match="empty.log"):
        pl.main([str(empty), str(tmp_path)])
    assert issubclass(ParseError, NetlibError)


def test_main_errors(tmp_path, capsys):
    log = write_log(tmp_path / "a.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    for argv in ([], [log], [log, str(tmp_path), "extra"], [log, str(tmp_path), "--bogus"]):
        with pytest.raises(UsageError, match="usage: netlib parse_log"):
            pl.main(argv)
    for bad in ("ab", "", '"', "\n"):
        with pytest.raises(UsageError, match="--delimiter"):
            pl.main([log, str(tmp_path), "--delimiter", bad])
    with pytest.raises(NetlibFileNotFoundError, match="output folder"):
        pl.main([log, str(tmp_path / "nope")])
    with pytest.raises(NetlibFileNotFoundError):
        pl.main([str(tmp_path / "missing.log"), str(tmp_path)])
    assert pl.main(["--help"]) == 0
    assert "usage: netlib parse_log LOGFILE OUTPUT_DIR" in capsys.readouterr().out


def test_run_script_reports_one_line(tmp_path, capsys):
    assert pl.run_script(pl.main, "parse_log", [str(tmp_path / "missing.log"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("parse_log: error: log file ") and err.count("\n") == 1
    assert pl.run_script(plot_log.main, "plot_training_log", ["9", "x.png", "a.log"]) == 1
    assert capsys.readouterr().err.startswith("plot_training_log: error: '9' is not a valid chart type")


# -- the scripts -----------------------------------------------------------------------------

def test_tools_scripts(tmp_path):
    log = write_log(tmp_path / "a.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    env = dict(os.environ, PYTHONPATH="")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "parse_log"), log,
                          str(tmp_path), "--verbose"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "Wrote" in run.stdout and (tmp_path / "a.log.train").exists()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "parse_log"), log],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert run.returncode == 1 and run.stderr.startswith("parse_log: error: ")
    if os.name == "posix":
        assert os.access(os.path.join(ROOT, "tools", "parse_log"), os.X_OK)
        assert os.access(os.path.join(ROOT, "tools", "plot_training_log"), os.X_OK)
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.svg"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_training_log"), "3",
                          str(out), log], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert out.read_text().lstrip().startswith("<?xml")


def test_netlib_command_dispatch(tmp_path):
    """``netlib parse_log`` / ``netlib plot_training_log`` through the netlib command."""
    from netlib.tools import cli
    log = write_log(tmp_path / "a.log", datetime.datetime(2025, 11, 23, 8, 0, 0))
    assert cli.main(["parse_log", log, str(tmp_path)]) == 0
    assert read_table(tmp_path / "a.log.train")[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert cli.main(["parse_log", log]) == 1
    pytest.importorskip("matplotlib")
    assert cli.main(["plot_training_log", "6", str(tmp_path / "a.png"), log]) == 0
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
