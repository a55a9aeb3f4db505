"""Read Caffe and netlib training logs into train/test tables (Caffe's ``tools/extra/parse_log.py``).

Usage::

    netlib parse_log LOGFILE OUTPUT_DIR [--verbose] [--delimiter ,]
    tools/parse_log LOGFILE OUTPUT_DIR            # from a source checkout

writes ``OUTPUT_DIR/<basename(LOGFILE)>.train`` and ``.test``: CSV tables with the columns
``NumIters,Seconds,LearningRate`` and then one column per train (test) net output, named as the log
names them (``loss``, ``accuracy``...).  A table without rows is not written.

The rows are the ones Caffe's script gives: a row starts at the first ``Train net output`` /
``Test net output`` line of an iteration, takes the iteration of the last ``Iteration N`` line, the
learning rate of the last ``lr = ...`` line seen so far (the first row, printed before any ``lr``
line, copies the second row's rate) and the seconds of its first output line since the ``Solving``
line (the first timestamped line when there is none).  A row is complete when it has as many columns
as the first one.  Both glog prefixes are read: ``I1123 08:42:55.123456 12345 solver.cpp:218] ...``
(the year is the log file's ctime year, plus one at each month roll-over such as Dec 31 -> Jan 1,
as ``extract_seconds.py`` does) and the year-prefixed ``I20261123 08:42:55.123456 ...`` that newer
glog writes.  Numbers are written as Python writes floats (``100.0``, ``0.00992565``, ``nan``) with the
csv module's excel dialect (``\\r\\n`` line ends), as Caffe's script does.

Python API::

    from netlib.tools.parse_log import parse_log, save_csv_files, write_csv
    train_rows, test_rows = parse_log("caffe.INFO")       # lists of OrderedDicts
    train_rows[0]["NumIters"], train_rows[0]["loss"]
    write_csv("out.train", train_rows, delimiter=",")
"""
import csv
import datetime
import os
import re
import sys
from collections import OrderedDict

__all__ = ["parse_log", "write_csv", "save_csv_files", "parse_line_datetime", "main", "run_script"]

USAGE = """usage: netlib parse_log LOGFILE OUTPUT_DIR [--verbose] [--delimiter ,]

Parse a Caffe (or netlib) training log into two CSV files, OUTPUT_DIR/<LOGFILE name>.train and
OUTPUT_DIR/<LOGFILE name>.test, with the columns NumIters, Seconds, LearningRate and one column per
net output.

  --verbose      print the names of the files written (or skipped)
  --delimiter D  column delimiter of the output files (default ','; '\\t' or 'tab' for a tab)
"""

# glog's line prefix: level letter, MMDD or YYYYMMDD, HH:MM:SS.micros (then thread id, file:line]).
_PREFIX = re.compile(r"^\s*[IWEFD](\d{8}|\d{4}) +(\d{1,2}):(\d{1,2}):(\d{1,2})\.(\d{1,6})(?:\s|$)")
_ITERATION = re.compile(r"Iteration (\d+)")
# Caffe's number pattern, plus nan/inf (which Caffe's regexes skip).
_NUMBER = r"(-?(?:nan|inf)|[\.\deE+-]+)"
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = " + _NUMBER, re.IGNORECASE)
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = " + _NUMBER, re.IGNORECASE)
_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")


def parse_line_datetime(line, year):
    """The timestamp of a glog line as a :class:`datetime.datetime`, or None when the line has
    no glog prefix.  ``year`` is used for the ``I1123 ...`` prefix; ``I20261123 ...`` names its
    own year.  Raises ValueError for a prefix that is no valid date (``I0230 ...``)."""
    m = _PREFIX.match(line)
    if not m:
        return None
    date = m.group(1)
    if len(date) == 8:
        year, date = int(date[:4]), date[4:]
    return datetime.datetime(year, int(date[:2]), int(date[2:]), int(m.group(2)), int(m.group(3)),
                             int(m.group(4)), int(m.group(5)))


def _has_own_year(line):
    m = _PREFIX.match(line)
    return bool(m) and len(m.group(1)) == 8


def _log_created_year(path):
    """The year of the log file's ctime (what extract_seconds.py starts from)."""
    return datetime.datetime.fromtimestamp(os.path.getctime(path)).year


def _check_log(path):
    from ..errors import NetlibFileNotFoundError
    if not os.path.exists(path):
        raise NetlibFileNotFoundError("log file %s does not exist" % path)
    if os.path.isdir(path):
        raise NetlibFileNotFoundError("%s is a folder, not a log file" % path)


def parse_log(path, year=None):
    """Parse a Caffe or netlib training log.

    Returns ``(train_rows, test_rows)``: lists of OrderedDicts, one per table row, with the keys
    ``NumIters``, ``Seconds``, ``LearningRate`` (floats) and then one float per net output, in the
    order of the log's ``#k``.  ``year`` is the year of the first ``I1123 ...``-style line (default:
    the year of the file's ctime, as Caffe's script takes it).

    Raises :class:`netlib.errors.NetlibFileNotFoundError` for a missing file and
    :class:`netlib.errors.ParseError` for a file without any glog-format line.
    """
    _check_log(path)
    if year is None:
        year = _log_created_year(path)
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    return _parse_lines(lines, year, path)


def _parse_lines(lines, year, path="<log>"):
    from ..errors import ParseError

    # The start time: the 'Solving' line (get_start_time in extract_seconds.py); parsing goes on
    # after it.  Without one, the first timestamped line.
    start_time = start_line = body = None
    first_time = first_index = None
    for i, line in enumerate(lines):
        try:
            t = parse_line_datetime(line, year)
        except ValueError:
            continue
        if t is None:
            continue
        if first_time is None:
            first_time, first_index = t, i
        if "Solving" in line:
            start_time, start_line, body = t, line, lines[i + 1:]
            break
    if start_time is None:
        if first_time is None:
            raise ParseError("no glog-format log lines (such as 'I1123 08:42:55.123456 1234 "
                             "solver.cpp:218] ...' or 'I20261123 08:42:55.123456 ...'); "
                             "not a Caffe or netlib log", path=path)
        start_time, start_line, body = first_time, lines[first_index], lines[first_index:]
    if _has_own_year(start_line):
        year = start_time.year

    iteration = -1
    learning_rate = float("nan")
    train_rows, test_rows = [], []
    train_row = test_row = None
    last_time = start_time
    for line in body:
        m = _ITERATION.search(line)
        if m:
            iteration = float(m.group(1))
        if iteration == -1:
            continue  # nothing counts before the first 'Iteration N' line
        try:
            t = parse_line_datetime(line, year)
        except ValueError:
            continue
        if t is None:
            continue  # not a log line (a continuation line, a resumed solver's noise...)
        if _has_own_year(line):
            year = t.year
        elif t.month < last_time.month:  # into the next year
            year += 1
            t = parse_line_datetime(line, year)
        last_time = t
        seconds = (t - start_time).total_seconds()

        m = _LEARNING_RATE.search(line)
        if m:
            learning_rate = float(m.group(1))
        train_row = _net_output(_TRAIN_OUTPUT, train_row, train_rows, line, iteration, seconds,
                                learning_rate)
        test_row = _net_output(_TEST_OUTPUT, test_row, test_rows, line, iteration, seconds,
                               learning_rate)

    for rows in (train_rows, test_rows):
        if len(rows) > 1:  # the first row precedes the first 'lr =' line
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train_rows, test_rows


def _net_output(regex, row, rows, line, iteration, seconds, learning_rate):
    """One line's share of a table: starts, fills and completes rows as Caffe's
    parse_line_for_net_output does.  Returns the row being filled (or None)."""
    m = regex.search(line)
    if m:
        try:
            value = float(m.group(3))
        except ValueError:
            value = None  # '1e' or '-': not a number after all
        if value is not None:
            if row is None or row["NumIters"] != iteration:
                if row is not None:
                    rows.append(row)  # a new iteration: keep the previous row as it is
                row = OrderedDict([("NumIters", iteration), ("Seconds", seconds),
                                   ("LearningRate", learning_rate)])
            row[m.group(2)] = value
    if row is not None and rows and len(row) == len(rows[0]):
        rows.append(row)  # as many columns as the first row: complete
        row = None
    return row


def _columns(rows):
    """The first row's keys, then any key only later rows have (Caffe's script would fail there)."""
    columns = list(rows[0].keys())
    seen = set(columns)
    for row in rows[1:]:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def write_csv(path, rows, delimiter=",", verbose=False):
    """Write ``rows`` (from :func:`parse_log`) to ``path`` as a CSV table with a header line.
    Writes nothing for no rows.  Returns True when the file was written."""
    if not rows:
        if verbose:
            print("Not writing %s; no lines to write" % path)
        return False

    class _Dialect(csv.excel):
        pass
    _Dialect.delimiter = delimiter

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), dialect=_Dialect, restval="")
        writer.writeheader()
        writer.writerows(rows)
    if verbose:
        print("Wrote %s" % path)
    return True


def save_csv_files(log_path, output_dir, train_rows, test_rows, delimiter=",", verbose=False):
    """Write ``OUTPUT_DIR/<basename(log_path)>.train`` and ``.test``; returns the paths written."""
    from ..errors import NetlibFileNotFoundError
    if not os.path.isdir(output_dir):
        raise NetlibFileNotFoundError("output folder %s does not exist" % output_dir)
    base = os.path.join(output_dir, os.path.basename(log_path))
    written = []
    for suffix, rows in ((".train", train_rows), (".test", test_rows)):
        if write_csv(base + suffix, rows, delimiter, verbose):
            written.append(base + suffix)
    return written


def _delimiter(text):
    from .cli import UsageError
    text = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(text, text)
    if len(text) != 1 or text in "\r\n\"":
        raise UsageError("--delimiter must be one character (other than a quote or a line end), "
                         "got %r" % text)
    return text


def main(argv=None):
    """``netlib parse_log LOGFILE OUTPUT_DIR [--verbose] [--delimiter ,]``; ``argv`` are the
    arguments after the command name.  Returns 0; raises
    :class:`netlib.tools.cli.UsageError` for a bad command line and netlib errors for bad files."""
    import argparse
    from .cli import UsageError

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError("%s (usage: netlib parse_log LOGFILE OUTPUT_DIR "
                             "[--verbose] [--delimiter ,])" % message)

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    p = _Parser(prog="netlib parse_log", add_help=False, allow_abbrev=False)
    p.add_argument("logfile_path")
    p.add_argument("output_dir")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--delimiter", default=",")
    args = p.parse_args(argv)
    delimiter = _delimiter(args.delimiter)
    train_rows, test_rows = parse_log(args.logfile_path)
    save_csv_files(args.logfile_path, args.output_dir, train_rows, test_rows,
                   delimiter=delimiter, verbose=args.verbose)
    if not train_rows and not test_rows:
        sys.stderr.write("parse_log: %s has no 'Train net output' or 'Test net output' lines; "
                         "nothing written\n" % args.logfile_path)
    return 0


def run_script(main_function, prog, argv=None):
    """Run ``main_function(argv)`` as a script: errors print one line ``prog: error: ...`` and
    return 1 (``NETLIB_DEBUG=1`` adds the traceback), as the ``netlib`` command does."""
    from ..errors import NetlibError
    from .cli import UsageError
    try:
        return main_function(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted\n" % prog)
        return 130
    except (UsageError, NetlibError, OSError) as exc:
        if os.environ.get("NETLIB_DEBUG"):
            import traceback
            traceback.print_exc()
        sys.stderr.write("%s: error: %s\n" % (prog, " ".join(str(exc).split())))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_script(main, "parse_log"))
