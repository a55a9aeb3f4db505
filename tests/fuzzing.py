"""Shared machinery of the fuzz tests (tests/test_fuzz_*.py).

* :func:`mutated`: a hypothesis strategy of 1-4 random mutations of a real file;
* :func:`check`: the property every reader must have: the input loads, or a
  :class:`netlib.errors.NetlibError` naming the file is raised; never another
  exception, never a hang (a 10 s alarm per case), and never more memory than
  :data:`MEMORY_BOUND` (the peak resident set of the case, measured by
  resetting the kernel's high-water mark before it, and the peak of Python
  and NumPy allocations, touched or not, traced by tracemalloc);
* the counts per reader (loaded / clean error), written as JSON to
  ``NETLIB_FUZZ_REPORT`` when it is set (merged with what is there).
"""
import collections
import contextlib
import gc
import json
import os
import re
import signal
import tracemalloc

import pytest
from hypothesis import HealthCheck, settings, strategies as st

from netlib.errors import NetlibError

EXAMPLES = int(os.environ.get("NETLIB_FUZZ_EXAMPLES", "150"))
#: Most memory one case may take beyond what the process held before it.
MEMORY_BOUND = int(os.environ.get("NETLIB_FUZZ_MEMORY_BOUND", str(1 << 30)))
HANG_SECONDS = 10

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

COUNTS = collections.defaultdict(collections.Counter)


@contextlib.contextmanager
def module_setup():
    """For a fuzz module's autouse fixture: trace allocations while it runs
    (tracemalloc is started and stopped once, with no data threads at work:
    stopping it while other threads allocate can crash CPython 3.11), then
    write the report."""
    gc.collect()
    tracemalloc.start()
    try:
        yield
    finally:
        gc.collect()
        tracemalloc.stop()
        write_report()


def write_report():
    path = os.environ.get("NETLIB_FUZZ_REPORT")
    if not path:
        return
    report = {}
    if os.path.isfile(path):
        with open(path) as fh:
            report = json.load(fh)
    report.update({k: dict(v) for k, v in COUNTS.items()})
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1, sort_keys=True)


@contextlib.contextmanager
def alarm(seconds=HANG_SECONDS):
    def boom(signum, frame):
        raise TimeoutError("reader hung for more than %d s" % seconds)
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


@contextlib.contextmanager
def memory_bound(bound=MEMORY_BOUND):
    """Fail when the block takes more than ``bound`` bytes: resident (Linux's
    VmHWM, reset through /proc/self/clear_refs) or allocated by Python/NumPy
    (tracemalloc's peak, which also sees memory that was never touched)."""
    rss = None
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        rss = _status_kb("VmRSS")
    except OSError:                      # not Linux: tracemalloc alone
        pass
    tracing = tracemalloc.is_tracing()   # started once per module by module_setup()
    if tracing:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    error = None
    try:
        yield
    except BaseException as exc:         # checked below first: a clean error may follow a huge allocation
        error = exc
    peak = tracemalloc.get_traced_memory()[1] - base if tracing else 0
    hwm = _status_kb("VmHWM") if rss is not None else None
    assert peak <= bound, "the case allocated %d MB (bound %d MB)" % (peak >> 20, bound >> 20)
    if hwm is not None:
        assert (hwm - rss) * 1024 <= bound, \
            "the case took %d MB resident (bound %d MB)" % ((hwm - rss) >> 10, bound >> 20)
    if error is not None:
        raise error


@st.composite
def mutated(draw, base, other=b"", text=False):
    """``base`` with 1-4 random mutations."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        kind = draw(st.sampled_from(
            ["flip", "truncate", "insert", "delete", "splice", "nul", "utf8", "overwrite"]
            + (["number", "negative", "enum", "nest"] if text else [])))
        pos = draw(st.integers(0, max(0, n - 1)))
        if kind == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "splice" and other:
            cut = draw(st.integers(0, len(other)))
            data[pos:] = other[cut:]
        elif kind == "overwrite":          # length-preserving: keeps the framing, breaks the content
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "nul":
            data[pos:pos] = b"\0"
        elif kind == "utf8":
            data[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"]))
        elif kind in ("number", "negative"):
            numbers = [m.span() for m in re.finditer(rb"\d+", bytes(data))]
            if numbers:
                a, b = numbers[draw(st.integers(0, len(numbers) - 1))]
                data[a:b] = (b"99999999999999999999" if kind == "number"
                             else draw(st.sampled_from([b"-1", b"-2147483649", b"0", b"4294967296"])))
        elif kind == "enum":
            names = [m.span() for m in re.finditer(rb"\b[A-Z][A-Z_]{2,}\b", bytes(data))]
            if names:
                a, b = names[draw(st.integers(0, len(names) - 1))]
                data[a:b] = b"NO_SUCH_VALUE"
        elif kind == "nest":
            depth = draw(st.integers(1, 200))
            data[pos:pos] = b"layer { " * depth + b"}" * draw(st.integers(0, depth))
    return bytes(data)


def check(path, load, key, names=None):
    """Run ``load()`` (which reads the fuzzed file at ``path``) under the
    property; ``names``: the strings of which the error must name one
    (default: ``path`` or its base name).  Counts the outcome under ``key``."""
    names = names or (path, os.path.basename(path))
    try:
        with memory_bound(), alarm():
            load()
    except NetlibError as exc:
        assert any(n in str(exc) for n in names), \
            "error does not name the file: %s: %s" % (type(exc).__name__, exc)
        COUNTS[key]["clean error"] += 1
    else:
        COUNTS[key]["loaded"] += 1


def write(path, data):
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def need(path):
    if not os.path.exists(path):
        pytest.skip("needs %s (the ../shared reference folder)" % path)
    return path
