"""The net benchmark (benchmarks/bench_nets.py) runs in its tiny configuration.

Only checks that it completes and prints a row per net and mode plus the
memory table; nothing is compared against a time (benchmarks are never timed
tests).
"""
import os
import subprocess
import sys

from conftest import ROOT, shared_path


def test_bench_nets_quick_lenet():
    shared_path("reference", "models", "mnist", "lenet.prototxt")
    script = os.path.join(ROOT, "benchmarks", "bench_nets.py")
    res = subprocess.run([sys.executable, script, "--quick", "--nets", "lenet", "--rounds", "1",
                          "--threads", "1", "--in-process"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith("lenet")]
    modes = [(r[1], r[2]) for r in rows if r[2] in ("train", "test")]
    assert modes == [("2", "train"), ("1", "test"), ("2", "test")], res.stdout
    for r in rows[:3]:
        float(r[3])                      # netlib ms is a number
        if r[4] != "-":                  # torch columns when PyTorch is installed
            float(r[4]) and float(r[5])
    mem = [r for r in rows if r[2] not in ("train", "test")]
    assert len(mem) == 1 and mem[0][1] == "1" and "error" not in " ".join(mem[0]), res.stdout
    assert any("peak resident memory" in ln for ln in lines)
