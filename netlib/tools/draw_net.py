"""Draw a net's graph (pycaffe's ``python/draw_net.py``).

Usage::

    netlib draw_net INPUT_NET_PROTO_FILE OUTPUT_IMAGE_FILE [--rankdir LR] [--phase TRAIN|TEST|ALL]
                    [--display_lrm]
    tools/draw_net ...                                   # from a source checkout

The format is the output file's extension: ``.dot`` and ``.raw`` write the DOT text (no Graphviz
needed; lay it out later with ``dot -Tpng net.dot -o net.png``), ``.png``, ``.svg``, ``.pdf`` and
Graphviz's other formats run Graphviz's ``dot``.  The graph is :func:`netlib.draw.get_pydot_graph`'s
(pycaffe's): the prototxt is read as pycaffe reads it, and legacy V0/V1 nets are upgraded first.
Prints ``Drawing net to OUTPUT_IMAGE_FILE`` as pycaffe's script does.  Needs pydot
(``pip install pydot``).  Any error (missing file, bad prototxt, unknown phase, no pydot, no
Graphviz) is one line ``netlib: error: ...`` (``draw_net: error: ...`` from tools/draw_net) and
exit status 1.
"""
import sys

from .parse_log import run_script

__all__ = ["main", "run_script", "USAGE"]

USAGE = """usage: netlib draw_net INPUT_NET_PROTO_FILE OUTPUT_IMAGE_FILE [--rankdir LR] [--phase ALL]
                       [--display_lrm]

Draw a graph of the net architecture into OUTPUT_IMAGE_FILE, in the format of its extension:
.dot/.raw DOT text (no Graphviz needed), .png/.svg/.pdf/... through Graphviz's dot program.

  --rankdir R    TB (top-bottom, i.e. vertical), LR (left-right, i.e. horizontal; the default),
                 BT, RL, or another Graphviz rankdir
  --phase P      which network phase to draw: TRAIN, TEST or ALL (default ALL: every layer,
                 whatever its phase)
  --display_lrm  show the learning rate multipliers, when not both zero, of the learning layers
                 (Convolution, Deconvolution, InnerProduct)
"""


def main(argv=None):
    """``netlib draw_net INPUT OUTPUT [--rankdir LR] [--phase TRAIN|TEST|ALL] [--display_lrm]``;
    ``argv`` are the arguments after the command name.  Returns 0; raises
    :class:`netlib.tools.cli.UsageError` for a bad command line and netlib errors
    (:class:`netlib.errors.NetlibError`) for bad files or missing pydot/Graphviz."""
    from .. import draw
    from ..proto import caffe_pb2
    from .cli import UsageError, parse_tool_args, tool_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = tool_parser("draw_net", USAGE)
    parser.add_argument("input_net_proto_file", nargs="?")
    parser.add_argument("output_image_file", nargs="?")
    parser.add_argument("--rankdir", default="LR")
    parser.add_argument("--phase", default="ALL")
    parser.add_argument("--display_lrm", action="store_true")
    args = parse_tool_args(parser, argv)
    if args is None:
        return 0
    if not args.input_net_proto_file or not args.output_image_file:
        raise UsageError("draw_net needs INPUT_NET_PROTO_FILE and OUTPUT_IMAGE_FILE (usage: netlib "
                         "draw_net INPUT OUTPUT [--rankdir LR] [--phase TRAIN|TEST|ALL] [--display_lrm])")
    phases = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}
    if args.phase not in phases:
        raise UsageError("Unknown phase: %s (TRAIN, TEST or ALL)" % args.phase)
    draw._import_pydot()  # fail before reading anything when pydot is missing
    net = draw.read_net_for_drawing(args.input_net_proto_file)
    print("Drawing net to %s" % args.output_image_file)
    sys.stdout.flush()
    draw.draw_net_to_file(net, args.output_image_file, args.rankdir, phases[args.phase], args.display_lrm)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_script(main, "draw_net"))
