"""Caffe's ``convert_imageset``: a list of image files into an LMDB/LevelDB of Datums.

Usage::

    netlib convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
    tools/convert_imageset ...                        # from a source checkout

LISTFILE holds one image a line, ``subfolder1/file1.JPEG 7``: the line is
split at its **last** space into the path and the integer label (a line
without a space is all path, label as C's ``atoi`` reads it: 0 for
``file.jpg``).  The file read is ROOTFOLDER and the path joined by plain
string concatenation, as Caffe does, so ROOTFOLDER needs its trailing ``/``.
Record ``i`` (the line's position, after ``--shuffle``) is stored under the
key ``%08d_<path>`` (``00000000_subfolder1/file1.JPEG``).

Flags (Caffe's names and defaults; booleans as gflags takes them:
``--gray``, ``--gray=true``, ``--gray=false``, ``--nogray``):

  --gray           read the images as grayscale (1 channel) instead of BGR color
  --shuffle        shuffle the lines (with netlib's generator, netlib.random.get_rng())
  --backend        lmdb (default) or leveldb
  --resize_width   --resize_height   resize every image to this size (both must be > 0)
  --check_size     refuse images whose size differs from the first one's
  --encoded        store the image files (JPEG/PNG) instead of raw pixels
  --encode_type    the format to (re-)encode to, 'jpg' or 'png' (implies --encoded)

Records are Caffe's ``ReadImageToDatum``: a raw record is the uint8 image in
CHW order, BGR (or gray), from :func:`netlib.data.image.imread` (and
:func:`netlib.data.image.resize`, OpenCV's INTER_LINEAR, when resizing),
with ``channels``, ``height``, ``width``, ``data``, ``label`` and
``encoded: false``.  An encoded record (``encoded: true``, ``data``,
``label``) holds the original file's bytes when no resize is asked for and
the file's extension matches the encoding (``jpeg`` counts as ``jpg``);
otherwise the decoded (resized) image re-encoded with
:func:`netlib.data.image.imencode`.  (As in Caffe, ``--gray`` does not make
an encoded record gray when the file itself is stored: decode it with
``force_gray`` in the data layer.)  Without ``--encode_type`` the encoding is
the file's extension.

An image that cannot be read is logged as an error (``Could not open or find
file ...``) and skipped, as Caffe does; the number skipped is logged at the
end.  The database is built beside DB_NAME and renamed into place when
complete: an error or Ctrl-C leaves no DB_NAME.  An existing DB_NAME is
refused.  A commit every 1000 records (``Processed 1000 files.``).

Python API::

    from netlib.tools.convert_imageset import convert_imageset
    count = convert_imageset("images/", "train.txt", "train_lmdb", backend="lmdb",
                             resize_height=256, resize_width=256, shuffle=True)
"""
import logging
import os
import re

from ..errors import ConfigError, NetlibFileNotFoundError

log = logging.getLogger("netlib")

__all__ = ["convert_imageset", "read_list", "read_image_to_datum", "main"]

USAGE = """usage: netlib convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

Convert a set of images to the leveldb/lmdb format used as input for Caffe. LISTFILE holds lines
'path label' (split at the last space); each image is ROOTFOLDER + path.

flags (--flag=value, --flag value or -flag value; booleans --flag, --flag=false or --noflag):
  --gray           treat images as grayscale ones (default false)
  --shuffle        randomly shuffle the order of images and their labels (default false)
  --backend        the backend {lmdb, leveldb} for storing the result (default lmdb)
  --resize_width   width images are resized to (default 0: no resize)
  --resize_height  height images are resized to (default 0: no resize)
  --check_size     check that all the datum have the same size (default false)
  --encoded        save the encoded image in the datum (default false)
  --encode_type    what type to encode the image as ('png', 'jpg', ...); implies --encoded
"""

BOOL_FLAGS = ("gray", "shuffle", "check_size", "encoded")
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")
_ATOI = re.compile(rb"^[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _atoi(text):
    """C's atoi: leading blanks, a sign and digits; 0 when there are none."""
    match = _ATOI.match(text)
    return int(match.group(1)) if match else 0


def read_list(listfile):
    """The lines of a convert_imageset list file as ``[(path, label)]``,
    split at the last space (Caffe's semantics; ``path`` keeps the file's
    bytes, decoded with the file-system encoding)."""
    if not os.path.isfile(listfile):
        raise NetlibFileNotFoundError("%s: no such list file (LISTFILE)" % listfile)
    with open(listfile, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # std::getline yields no line after the final newline
    out = []
    for number, line in enumerate(lines, 1):
        pos = line.rfind(b" ")
        if pos < 0:
            path, label_text = line.rstrip(b"\r"), line
        else:
            path, label_text = line[:pos], line[pos + 1:]
            if not _ATOI.match(label_text):
                log.warning("%s:%d: the label %r is not an integer; using 0 as Caffe does",
                            listfile, number, label_text.decode("utf-8", "replace"))
        label = _atoi(label_text)
        if not -2 ** 31 <= label < 2 ** 31:
            raise ConfigError("%s:%d: the label %d does not fit a Datum's int32 label" % (listfile, number, label))
        out.append((os.fsdecode(path), label))
    return out


def _match_ext(filename, encoding):
    """Caffe's matchExt: does the file's extension name the encoding?"""
    p = filename.rfind(".")
    ext = (filename[p + 1:] if p >= 0 else filename).lower()
    encoding = encoding.lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def _imencode_ext(encoding):
    enc = encoding.lower().lstrip(".")
    return {"jpeg": "jpg", "jpe": "jpg"}.get(enc, enc)


def read_image_to_datum(filename, label, height=0, width=0, is_color=True, encoding=""):
    """Caffe's ReadImageToDatum: ``(datum, (C, H, W))`` of the image file, or
    None (after logging an error) when it cannot be read.  ``height`` and
    ``width`` both > 0 resize; a non-empty ``encoding`` makes an encoded Datum."""
    from ..data import image
    from ..proto import caffe_pb2
    try:
        img = image.imread(filename, color=is_color)
    except (image.ImageError, OSError) as exc:
        log.error("Could not open or find file %s (%s)", filename, _one_line(exc))
        return None
    if height > 0 and width > 0:
        img = image.resize(img, height, width)
    shape = (img.shape[2], img.shape[0], img.shape[1])
    datum = caffe_pb2.Datum()
    if encoding:
        # Caffe's test (cv_img.channels() == 3) == is_color always holds for an image read in the
        # asked-for mode: only a resize or another format makes it re-encode.
        if (img.shape[2] == 3) == is_color and not height and not width and _match_ext(filename, encoding):
            try:
                with open(filename, "rb") as handle:
                    datum.data = handle.read()
            except OSError as exc:
                log.error("Could not open or find file %s (%s)", filename, _one_line(exc))
                return None
        else:
            try:
                datum.data = image.imencode(img, _imencode_ext(encoding))
            except (image.ImageError, ValueError) as exc:
                raise ConfigError("%s: cannot encode the image as %r (%s); give --encode_type jpg or png"
                                  % (filename, encoding, _one_line(exc))) from None
        datum.label = int(label)
        datum.encoded = True
        return datum, shape
    datum.channels, datum.height, datum.width = shape
    datum.data = image.hwc_to_chw(img).tobytes()
    datum.label = int(label)
    datum.encoded = False  # Caffe's CVMatToDatum sets it, so the bytes match Caffe's records
    return datum, shape


def _one_line(exc):
    return " ".join(str(exc).split())


def convert_imageset(root, listfile, db_path, backend="lmdb", gray=False, shuffle=False, resize_height=0,
                     resize_width=0, check_size=False, encoded=False, encode_type=""):
    """Convert the images of ``listfile`` (paths relative to ``root``, joined
    by string concatenation) into a new database ``db_path``; returns the
    number of records written (see the module docstring)."""
    from ..data.db import backend_name, create_db
    from .cli import progress_bar
    backend = backend_name(backend)
    root = os.fspath(root)
    is_color = not gray
    encode_type = (encode_type or "").lstrip(".")
    lines = read_list(listfile)
    if shuffle:
        from ..random import get_rng
        log.info("Shuffling data")
        order = get_rng().permutation(len(lines))
        lines = [lines[i] for i in order]
    log.info("A total of %d images.", len(lines))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
    resize_height = max(0, int(resize_height))
    resize_width = max(0, int(resize_width))
    if bool(resize_height) != bool(resize_width):
        log.warning("only one of --resize_height (%d) and --resize_width (%d) is set: images are not "
                    "resized (both must be > 0)", resize_height, resize_width)

    count = 0
    skipped = 0
    first_shape = None
    first_file = None
    hinted = False
    with create_db(db_path, backend) as writer, progress_bar(len(lines), desc="convert_imageset") as bar:
        for line_id, (path, label) in enumerate(lines):
            enc = encode_type
            if encoded and not enc:
                p = path.rfind(".")
                if p < 0:
                    log.warning("Failed to guess the encoding of '%s'", path)
                enc = path[p + 1:].lower()
            filename = root + path
            result = read_image_to_datum(filename, label, resize_height, resize_width, is_color, enc)
            if bar is not None:
                bar.update(1)
            if result is None:
                skipped += 1
                if not hinted and not os.path.exists(filename) and root and not root.endswith(os.sep) \
                        and os.path.exists(os.path.join(root, path)):
                    hinted = True
                    log.error("ROOTFOLDER %s and the path %s are joined without a separator, as Caffe does: "
                              "end ROOTFOLDER with '/'", root, path)
                continue
            datum, shape = result
            if check_size:
                if first_shape is None:
                    first_shape, first_file = shape, filename
                elif shape != first_shape:
                    raise ConfigError("Incorrect data field size (--check_size): %s is %dx%dx%d "
                                      "(channels x height x width) but the first image %s is %dx%dx%d"
                                      % ((filename,) + shape + (first_file,) + first_shape))
            key = b"%08d_" % line_id + os.fsencode(path)
            writer.put(key, datum.SerializeToString())
            count += 1
            if count % 1000 == 0:
                writer.commit()
                log.info("Processed %d files.", count)
        if count % 1000 != 0:
            log.info("Processed %d files.", count)
    if skipped:
        log.error("%d of %d images could not be read and were skipped (see the errors above)",
                  skipped, len(lines))
    log.info("Wrote %d records to %s", count, db_path)
    return count


def _split_bool_flags(argv):
    """Take gflags booleans out of ``argv``: ``--gray``, ``-gray``,
    ``--gray=true|false`` and ``--nogray``; returns (values, other args)."""
    from .cli import UsageError
    values, rest = {}, []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("---") and len(arg) > 1:
            body = arg.lstrip("-")
            name, eq, value = body.partition("=")
            if name in BOOL_FLAGS:
                if not eq:
                    values[name] = True
                elif value.lower() in _TRUE:
                    values[name] = True
                elif value.lower() in _FALSE:
                    values[name] = False
                else:
                    raise UsageError("--%s takes true or false, got %r" % (name, value))
                continue
            if name.startswith("no") and name[2:] in BOOL_FLAGS:
                if eq:
                    raise UsageError("--%s takes no value, got %r" % (name, value))
                values[name[2:]] = False
                continue
        rest.append(arg)
    return values, rest


def main(argv):
    """``netlib convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``."""
    from .cli import UsageError, backend_flag, parse_tool_args, tool_parser
    bools, argv = _split_bool_flags(list(argv))
    parser = tool_parser("convert_imageset", USAGE)
    parser.add_argument("--backend", default="lmdb")
    parser.add_argument("--resize_width", type=int, default=0)
    parser.add_argument("--resize_height", type=int, default=0)
    parser.add_argument("--encode_type", default="")
    parser.add_argument("paths", nargs="*")
    args = parse_tool_args(parser, argv)
    if args is None:
        return 0
    if len(args.paths) != 3:
        raise UsageError("convert_imageset takes ROOTFOLDER/ LISTFILE DB_NAME, got %d arguments "
                         "(netlib convert_imageset --help)" % len(args.paths))
    backend = backend_flag(args.backend)
    root, listfile, db_name = args.paths
    convert_imageset(root, listfile, db_name, backend=backend, gray=bools.get("gray", False),
                     shuffle=bools.get("shuffle", False), resize_height=args.resize_height,
                     resize_width=args.resize_width, check_size=bools.get("check_size", False),
                     encoded=bools.get("encoded", False), encode_type=args.encode_type)
    return 0
