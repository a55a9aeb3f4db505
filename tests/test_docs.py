"""The docs/ pages run as written.

A page marks its runnable parts with HTML comments before fenced blocks:
``<!-- file: NAME -->`` (write the block to NAME), ``<!-- run: python -->``
(run it; each block in a fresh namespace, as a reader would paste it) and
``<!-- run: shell -->`` (a ``netlib ...`` command line, run in-process).
Each page runs in its own temporary folder.
"""
import os
import re
import shlex
import sys


from conftest import ROOT
from netlib.tools import cli

DOCS = os.path.join(ROOT, "docs")
STEP = re.compile(r"<!-- (file|run): (\S+) -->\n```[\w]*\n(.*?)\n```", re.S)


def steps(page):
    text = open(os.path.join(DOCS, page), encoding="utf-8").read()
    return STEP.findall(text)


def run_page(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind, arg, body in steps(page):
        if kind == "file":
            (tmp_path / arg).write_text(body + "\n")
        elif arg == "python":
            exec(compile(body, "%s:block" % page, "exec"), {"__name__": "__main__"})
        else:
            for line in body.splitlines():
                words = shlex.split(line)
                assert words[0] == "netlib", line
                assert cli.main(words[1:]) == 0, line


def test_python_layer_tutorial(tmp_path, monkeypatch, capsys):
    assert [k for k, _, _ in steps("python-layer-tutorial.md")].count("run") >= 4
    run_page("python-layer-tutorial.md", tmp_path, monkeypatch)
    out = capsys.readouterr()
    assert "scale [ 2.   -1.    0.5]" in out.out or "scale [ 2.  -1.   0.5]" in out.out, out.out
    assert "Iteration 300, loss = " in out.err
    sys.modules.pop("my_layers", None)


def test_api_reference_is_current():
    """docs/api.md is what tools/make_api_reference.py writes from the code."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import make_api_reference
    finally:
        sys.path.pop(0)
    current = open(os.path.join(DOCS, "api.md"), encoding="utf-8").read()
    assert current == make_api_reference.render(), "docs/api.md is stale: run python tools/make_api_reference.py"


def test_docs_link_to_pages_that_exist():
    for page in os.listdir(DOCS):
        if page.endswith(".md"):
            text = open(os.path.join(DOCS, page), encoding="utf-8").read()
            for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
                assert os.path.exists(os.path.join(DOCS, target)), (page, target)
