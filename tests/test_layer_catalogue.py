"""The layer catalogue: every BVLC Caffe type and the fork types are registered,
and the README's table lists exactly what ``layer_type_list()`` gives."""
import json
import os
import re

import netlib
from conftest import ROOT

# Real BVLC Caffe's layer_type_list() (tests/golden/pycaffe_api/api.json, from
# a build without OpenCV) plus the two types that need OpenCV there.
BVLC_TYPES = set(json.load(open(os.path.join(ROOT, "tests", "golden", "pycaffe_api", "api.json")))
                 ["layer_type_list"]) | {"ImageData", "WindowData"}
FORK_TYPES = {"ConvolutionDepthwise", "DepthwiseConvolution",              # MobileNet ports
              "Permute", "PriorBox", "Normalize", "DetectionOutput"}       # the SSD fork


def readme_table():
    """{type: row text} from the README's "Layer types" table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Layer types", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and not set(line) <= set("|- "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([A-Za-z0-9]+)`", cells[1] if len(cells) > 1 else ""):
                assert name not in rows, "%s is listed twice in the README's table" % name
                rows[name] = line
    return rows


def builtin_types():
    """layer_type_list() less the types other tests register from their own
    modules (e.g. the README's example layer)."""
    from netlib.layer import layer_class
    return [t for t in netlib.layer_type_list()
            if t == "Python" or layer_class(t).__module__.startswith("netlib.")]


def test_every_bvlc_type_is_registered():
    assert len(BVLC_TYPES) == 61
    assert BVLC_TYPES <= set(netlib.layer_type_list()), sorted(BVLC_TYPES - set(netlib.layer_type_list()))


def test_the_fork_types_are_registered():
    assert FORK_TYPES <= set(netlib.layer_type_list()), sorted(FORK_TYPES - set(netlib.layer_type_list()))


def test_the_readme_table_lists_every_type_and_marks_the_forks():
    table = readme_table()
    assert set(table) == set(builtin_types())
    for name, row in table.items():
        assert ("fork" in row.lower()) == (name in FORK_TYPES), row
