"""Strict prototxt parsing, as Caffe's ``TextFormat::Parse``: a non-repeated
field given twice is an error naming file:line:column (not "the last value
wins"), for nets and solvers, in Python and on the command line.  Repeated
fields (``layer``, ``bottom``, ``top``, ``dim``, ``stepvalue``...) may of
course be given many times."""
import pytest

import netlib
from netlib.errors import NetlibError, ParseError
from netlib.files import parse_text_proto
from netlib.proto import caffe_pb2
from netlib.tools import cli

NET_OK = """name: "n"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4 } }
"""

# (description, text, line, column of the second occurrence, field name)
DUPLICATES = [
    ("net name", 'name: "a"\nname: "b"\n', 2, 1, "name"),
    ("layer type", 'layer {\n  name: "in" type: "Input"\n  type: "Input" top: "x" }\n', 3, 3, "type"),
    ("nested param", NET_OK.replace("num_output: 4", "num_output: 4\n  num_output: 5"), 4, 3, "num_output"),
    ("blob shape in a filler", 'layer { name: "c" type: "Convolution" convolution_param {\n'
     ' weight_filler { type: "xavier" type: "gaussian" } } }\n', 2, 33, "type"),
    ("phase in a rule", 'layer { name: "d" type: "Input" include {\n phase: TRAIN\n phase: TEST } }\n', 3, 2,
     "phase"),
]


@pytest.mark.parametrize("what,text,line,column,field", DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_duplicate_singular_field_in_a_net_file(tmp_path, what, text, line, column, field):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    with pytest.raises(ParseError) as info:
        netlib.Net(str(path), netlib.TEST)
    err = info.value
    assert isinstance(err, NetlibError)
    assert (err.line, err.column) == (line, column)
    assert str(err).startswith("%s:%d:%d: " % (path, line, column)), str(err)
    assert 'field "%s"' % field in str(err) and "given twice" in str(err)


def test_duplicate_in_net_text_has_no_file_but_a_position():
    with pytest.raises(ParseError, match=r'^<string>:2:1: field "name"'):
        netlib.Net('name: "a"\nname: "b"\n' + NET_OK.split("\n", 1)[1], netlib.TEST)


def test_repeated_fields_stay_repeatable():
    p = parse_text_proto(NET_OK + 'layer { name: "s" type: "Silence" bottom: "y" bottom: "x" }\n',
                         caffe_pb2.NetParameter())
    assert len(p.layer) == 3 and list(p.layer[2].bottom) == ["y", "x"]
    s = parse_text_proto('lr_policy: "multistep" stepvalue: 10 stepvalue: 20 stepvalue: 30\n',
                         caffe_pb2.SolverParameter())
    assert list(s.stepvalue) == [10, 20, 30]


def test_parse_clears_the_message_first():
    msg = caffe_pb2.NetParameter(name="old", force_backward=True)
    parse_text_proto('name: "new"\n', msg)
    assert msg.name == "new" and not msg.HasField("force_backward")


def test_duplicate_field_in_a_solver_file(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET_OK)
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "%s"\nbase_lr: 0.01\nmax_iter: 10\nbase_lr: 0.1\n' % (tmp_path / "net.prototxt"))
    with pytest.raises(ParseError) as info:
        netlib.get_solver(str(path))
    assert (info.value.line, info.value.column) == (4, 1)       # the second base_lr
    assert 'field "base_lr" of caffe.SolverParameter is given twice' in str(info.value)


def test_cli_prints_one_line_with_the_position(tmp_path, capsys):
    (tmp_path / "net.prototxt").write_text(NET_OK)
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "%s"\nmax_iter: 10\nmax_iter: 20\n' % (tmp_path / "net.prototxt"))
    code = cli.main(["train", "--solver", str(path)])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in err
    assert lines[-1].startswith("netlib: error: ")
    assert "%s:3:1:" % path in lines[-1] and 'field "max_iter"' in lines[-1]
