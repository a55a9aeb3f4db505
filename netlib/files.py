"""Reading and writing Caffe's files: prototxt, binary protos, HDF5 weights.

Every reader upgrades legacy formats (V0/V1 nets, ``input_dim`` inputs, the
``solver_type`` enum) the way Caffe does on load, and turns parse failures into
:class:`~netlib.errors.ParseError` carrying ``file:line:column``.  Writers go
through :func:`atomic_write`: a temporary file in the target's folder, then
``os.replace``, so an interrupted write never leaves a half-written file.
"""
import contextlib
import os
import re
import tempfile

from google.protobuf import message as _message
from google.protobuf import text_format

from .errors import NetlibFileNotFoundError, ParseError, WeightsError
from .proto import caffe_pb2


def _looks_like_text(source):
    return "\n" in source or "{" in source or ":" in source and not os.path.exists(source)


def read_text_proto(path, message):
    """Parse the prototxt file ``path`` into ``message`` (raises ParseError)."""
    if not os.path.isfile(path):
        raise NetlibFileNotFoundError("%s: no such file" % path)
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    return parse_text_proto(text, message, path)


_DUPLICATE = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields\.')


def parse_text_proto(text, message, path=None):
    """Parse prototxt ``text`` into ``message`` (cleared first), strictly as
    Caffe's ``TextFormat::Parse``: a non-repeated field given twice is an
    error (not "the last value wins"); errors name path:line:column."""
    message.Clear()              # (C++'s Parse clears; Python's does not)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        msg = str(exc)
        prefix = "%s:%s : " % (line, column)
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
        dup = _DUPLICATE.match(msg)
        if dup:
            column = _field_column(text, line, column, dup.group(2))
            msg = ('field "%s" of %s is given twice; it is not a repeated field, so it takes one value '
                   "(Caffe's parser refuses this too)" % (dup.group(2), dup.group(1)))
        raise ParseError(msg, path, line, column) from None
    return message


def _field_column(text, line, column, field):
    """The column of the field name whose value protobuf's error points at
    (the last ``field`` token before ``column`` on ``line``); ``column``
    itself when it cannot be found (the name on an earlier line)."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return column
    head = lines[line - 1][:max(0, column - 1)]
    found = [m.start() for m in re.finditer(r"(?<![\w.])%s\b" % re.escape(field), head)]
    return found[-1] + 1 if found else column


def read_binary_proto(path, message):
    """Parse a binary protobuf file into ``message`` (raises WeightsError)."""
    if not os.path.isfile(path):
        raise NetlibFileNotFoundError("%s: no such file" % path)
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        message.ParseFromString(data)
    except (_message.DecodeError, RuntimeError, ValueError) as exc:
        raise WeightsError("%s: not a valid binary %s (truncated or corrupt file): %s"
                           % (path, message.DESCRIPTOR.name, exc)) from None
    return message


def read_net_param(source):
    """A NetParameter from a path, prototxt text or NetParameter, upgraded."""
    from .upgrade import upgrade_net
    if isinstance(source, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(source)
        path = None
    else:
        source = os.fspath(source)
        param = caffe_pb2.NetParameter()
        if os.path.isfile(source):
            path = source
            read_text_proto(source, param)
        elif _looks_like_text(source):
            path = None
            parse_text_proto(source, param)
        else:
            raise NetlibFileNotFoundError("%s: no such net prototxt file" % source)
    upgrade_net(param, path)
    return param


def read_solver_param(source):
    """A SolverParameter from a path, text or message (solver_type upgraded)."""
    from .upgrade import upgrade_solver
    if isinstance(source, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
        path = None
    else:
        source = os.fspath(source)
        param = caffe_pb2.SolverParameter()
        if os.path.isfile(source):
            path = source
            read_text_proto(source, param)
        elif _looks_like_text(source):
            path = None
            parse_text_proto(source, param)
        else:
            raise NetlibFileNotFoundError("%s: no such solver file" % source)
    upgrade_solver(param, path)
    return param


def is_hdf5(path):
    """True when ``path`` is an HDF5 file (by content, as Caffe's H5Fis_hdf5)."""
    import h5py
    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


#: Exceptions h5py raises on a corrupt file (besides OSError): bad heap or
#: B-tree signatures surface as RuntimeError, broken links as KeyError,
#: unreadable types as TypeError/ValueError.
H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, UnicodeDecodeError)


def h5_dataset(group, key, path, what, shape=None):
    """``group[key]`` checked before it is read: an HDF5 dataset (not a
    group), of ``shape`` when given, and holding no more bytes than the file
    can (an uncompressed dataset larger than the file, as a corrupt header
    can declare, is refused before any allocation)."""
    import h5py
    ds = group.get(key)
    if not isinstance(ds, h5py.Dataset):
        raise WeightsError("%s: %s is %s, not an HDF5 dataset" % (path, what, "missing" if ds is None else "a group"))
    if shape is not None and tuple(ds.shape) != tuple(shape):
        raise WeightsError("%s: %s has shape %s, %s expected" % (path, what, tuple(ds.shape), tuple(shape)))
    nbytes = int(ds.size) * int(ds.dtype.itemsize)
    limit = os.path.getsize(path) * (1 if ds.compression is None else 1024) + (1 << 16)
    if nbytes > limit:
        raise WeightsError("%s: %s declares %d bytes (shape %s), more than the file can hold"
                           % (path, what, nbytes, tuple(ds.shape)))
    return ds


def read_weights_param(path):
    """A binary .caffemodel as an upgraded NetParameter (V1 models included)."""
    from .upgrade import upgrade_net
    param = read_binary_proto(path, caffe_pb2.NetParameter())
    upgrade_net(param, path)
    return param


def read_blobproto(path):
    """A BlobProto file (e.g. a mean .binaryproto)."""
    return read_binary_proto(path, caffe_pb2.BlobProto())


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write ``path`` through a temp file in the same folder, then rename.

    Yields the temporary path (for libraries such as h5py that open by name)
    when ``mode`` is None, else an open file object.  On any error the temp
    file is removed and ``path`` keeps its previous content.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
    try:
        if mode is None:
            os.close(fd)
            yield tmp
            _fsync_path(tmp)                 # what the library wrote, on disk before the rename
        else:
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_path(folder)                  # the rename itself survives a crash
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_hdf5(path):
    """An ``h5py.File`` built in memory, then written to ``path`` through
    :func:`atomic_write` (fsync'd, renamed): a full disk or a file-size limit
    is then a plain ``OSError`` from Python's own write, never a failed write
    inside the HDF5 library (which can crash the process, measured with
    h5py 3 on EFBIG)."""
    import io
    import h5py
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        yield f
    with atomic_write(path) as handle:
        handle.write(buf.getbuffer())


def _fsync_path(path):
    """fsync a file or a directory by name (directories: where the OS allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                          # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(prefix):
    """Remove the temporary files an interrupted :func:`atomic_write` of a
    snapshot ``prefix_iter_*`` left behind (``.NAME.<random>.tmp``: hidden, never
    under a snapshot's name); returns their paths."""
    folder = os.path.dirname(os.path.abspath(prefix))
    start = "." + os.path.basename(prefix) + "_iter_"
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith(start) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


def read_varint(data, pos):
    """A protobuf varint of ``data`` (bytes or memoryview) at ``pos``:
    ``(value, next position)``; ValueError when truncated or too long."""
    shift = result = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def write_binary_proto(path, message):
    """Serialize ``message`` to ``path`` atomically."""
    with atomic_write(path) as handle:
        handle.write(message.SerializeToString())


def write_text_proto(path, message):
    with atomic_write(path, "w") as handle:
        handle.write(text_format.MessageToString(message))
