"""Plot training logs (Caffe's ``tools/extra/plot_training_log.py.example``).

Usage::

    netlib plot_training_log CHART_TYPE OUT_FILE LOG1 [LOG2 ...]
    tools/plot_training_log 6 loss.png caffe.INFO netlib_train.log

draws one line per log into ``OUT_FILE``, a ``.png`` or ``.svg`` file.  The chart types are Caffe's::

    0: Test accuracy  vs. Iters          4: Train learning rate  vs. Iters
    1: Test accuracy  vs. Seconds        5: Train learning rate  vs. Seconds
    2: Test loss  vs. Iters              6: Train loss  vs. Iters
    3: Test loss  vs. Seconds            7: Train loss  vs. Seconds

The logs are read with :func:`netlib.tools.parse_log.parse_log` (no ``.log`` suffix needed, nothing
is run in a shell).  The y values are the table column named ``accuracy`` / ``loss`` (or else the
first column whose name contains that word) and ``LearningRate``; the x values ``NumIters`` or
``Seconds``.  Needs matplotlib (drawn with the non-interactive Agg backend).

Python API::

    from netlib.tools.plot_log import plot
    plot(6, "loss.png", ["caffe.INFO"])
"""
import os
import sys

__all__ = ["CHART_TYPES", "chart_description", "plot", "main"]

# Caffe's numbering: the non-x fields sorted by name, each against Iters then Seconds.
_SEPARATOR = "  vs. "
_Y_FIELDS = ("Test accuracy", "Test loss", "Train learning rate", "Train loss")
_X_FIELDS = ("Iters", "Seconds")
CHART_TYPES = tuple("%s%s%s" % (y, _SEPARATOR, x) for y in _Y_FIELDS for x in _X_FIELDS)
_X_COLUMNS = {"Iters": "NumIters", "Seconds": "Seconds"}
_FORMATS = {".png": "png", ".svg": "svg"}

USAGE = """usage: netlib plot_training_log CHART_TYPE OUT_FILE LOG1 [LOG2 ...]

Plot one line per training log (Caffe or netlib) into OUT_FILE (.png or .svg).
Supported chart types:
%s
""" % "\n".join("    %d: %s" % (i, d) for i, d in enumerate(CHART_TYPES))


def chart_description(chart_type):
    """``(table, x_field, y_field)`` of a chart type 0-7, e.g. ``('Train', 'Iters', 'Train loss')``."""
    y_field, x_field = CHART_TYPES[chart_type].split(_SEPARATOR)
    return y_field.split()[0], x_field, y_field


def _check_chart_type(chart_type):
    import operator
    from .cli import UsageError
    value = None
    if isinstance(chart_type, str):
        if chart_type.strip().isdigit():
            value = int(chart_type)
    elif not isinstance(chart_type, bool):
        try:
            value = operator.index(chart_type)
        except TypeError:
            pass
    if value is None or not 0 <= value < len(CHART_TYPES):
        raise UsageError("%r is not a valid chart type; one of %s" % (
            chart_type, ", ".join("%d (%s)" % (i, d.replace(_SEPARATOR, " vs "))
                                  for i, d in enumerate(CHART_TYPES))))
    return value


def _image_format(out_path):
    from .cli import UsageError
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in _FORMATS:
        raise UsageError("plot_training_log writes .png or .svg files, not %r (%s)" % (ext or "no extension",
                                                                                  out_path))
    return _FORMATS[ext]


def _label(path):
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".log") and len(name) > 4 else name


def _y_column(table, y_field, rows, path):
    from ..errors import ConfigError
    if y_field == "Train learning rate":
        return "LearningRate"
    word = y_field.split()[-1]  # accuracy / loss
    columns = [c for c in rows[0] if c not in ("NumIters", "Seconds", "LearningRate")]
    if word in columns:
        return word
    for c in columns:
        if word in c.lower():
            return c
    raise ConfigError("%s: the %s table has no %s column (its columns: %s)" % (
        path, table.lower(), word, ", ".join(columns) or "none"))


def _series(chart_type, path):
    """``(xs, ys)`` of one log for a chart type."""
    from ..errors import ConfigError
    from .parse_log import parse_log
    table, x_field, y_field = chart_description(chart_type)
    train_rows, test_rows = parse_log(path)
    rows = train_rows if table == "Train" else test_rows
    if not rows:
        raise ConfigError("%s has no %s rows (no complete '%s net output' lines)"
                          % (path, table.lower(), table))
    y_column = _y_column(table, y_field, rows, path)
    x_column = _X_COLUMNS[x_field]
    points = [(r[x_column], r[y_column]) for r in rows if y_column in r]
    return [p[0] for p in points], [p[1] for p in points]


def _import_matplotlib():
    from ..errors import ConfigError
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plot_training_log needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def plot(chart_type, out_path, logs):
    """Draw chart ``chart_type`` (0-7, see :data:`CHART_TYPES`) of the training logs ``logs``
    (a path or a list of paths) into ``out_path`` (``.png`` or ``.svg``).  Returns ``out_path``.

    Raises :class:`netlib.tools.cli.UsageError` for a bad chart type or extension,
    :class:`netlib.errors.NetlibFileNotFoundError` for a missing log or output folder and
    :class:`netlib.errors.ConfigError` without matplotlib or for a log without the chart's data.
    """
    from ..errors import NetlibFileNotFoundError
    from .cli import UsageError
    chart_type = _check_chart_type(chart_type)
    image_format = _image_format(out_path)
    if isinstance(logs, (str, os.PathLike)):
        logs = [logs]
    logs = [os.fspath(p) for p in logs]
    if not logs:
        raise UsageError("plot_training_log needs at least one log file")
    for path in logs:
        if not os.path.exists(path):
            raise NetlibFileNotFoundError("log file %s does not exist" % path)
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise NetlibFileNotFoundError("output folder %s does not exist" % folder)
    Figure, FigureCanvasAgg = _import_matplotlib()

    series = [(path, _series(chart_type, path)) for path in logs]
    table, x_field, y_field = chart_description(chart_type)
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = ("o", "s", "^", "v", "D", "x", "+", "*", "p", "h")
    for i, (path, (xs, ys)) in enumerate(series):
        ax.plot(xs, ys, label=_label(path), color="C%d" % (i % 10), marker=markers[i % len(markers)],
                linewidth=0.75, markersize=4)
    # Caffe's legend places: accuracy lower right, loss and learning rate upper right.
    ax.legend(loc="lower right" if "accuracy" in y_field else "upper right", ncol=1)
    ax.set_title(CHART_TYPES[chart_type])
    ax.set_xlabel(x_field)
    ax.set_ylabel(y_field)
    fig.savefig(out_path, format=image_format)
    return out_path


def main(argv=None):
    """``netlib plot_training_log CHART_TYPE OUT_FILE LOG1 [LOG2 ...]``; ``argv`` are the arguments
    after the command name.  Returns 0; raises :class:`netlib.tools.cli.UsageError` for a bad
    command line."""
    from .cli import UsageError
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    options = [a for a in argv if a.startswith("--")]
    if options:
        raise UsageError("plot_training_log takes no options, got %s" % " ".join(options))
    if len(argv) < 3:
        raise UsageError("plot_training_log needs CHART_TYPE OUT_FILE LOG1 [LOG2 ...] "
                         "(netlib plot_training_log --help lists the chart types)")
    plot(argv[0], argv[1], argv[2:])
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .parse_log import run_script
    sys.exit(run_script(main, "plot_training_log"))
