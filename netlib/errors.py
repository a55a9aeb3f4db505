"""netlib's exception hierarchy.

Every error the library raises on bad input derives from :class:`NetlibError`,
so a caller (and the ``netlib`` command) can catch one class and print one
clear line.  Subclasses also derive from the matching built-in exception
(``ValueError``, ``FileNotFoundError``...) so generic handlers keep working.

What each reader raises; every message names the file (for a record, the
database and key; for an image, the image and the list or window file that
named it).  The fuzz tests (tests/test_fuzz_readers.py, test_fuzz_data.py,
test_fuzz_cli.py) check for every reader below that nothing else escapes,
whatever the bytes:

================================  ==============================================
reader                            errors
================================  ==============================================
prototxt nets and solvers         ParseError (``file:line:column``: syntax, unknown
                                  field or enum value, a non-repeated field given
                                  twice), NetlibFileNotFoundError; then ConfigError,
                                  LayerError/ShapeError when the net is built (the
                                  message names layer, type and shapes; a blob over
                                  INT_MAX elements or ``NETLIB_MAX_BLOB_BYTES`` is a
                                  ShapeError before any allocation)
binary .caffemodel, .solverstate  WeightsError (truncated/corrupt proto, blob count
                                  vs shape, shape vs the layer's blob)
HDF5 weights and solver states    WeightsError (corrupt file, a dataset that is
                                  missing, of the wrong shape or type, or larger than
                                  the file can hold: refused before it is read)
mean .binaryproto                 WeightsError, ShapeError (not a (1, C, H, W) blob)
LMDB / LevelDB databases          DatabaseError (cannot open, corrupt LevelDB, an
                                  LMDB file shorter than its meta page), DatumError
                                  (a record that is not a Datum, or whose data does
                                  not fit its shape), ImageError (an encoded record
                                  that does not decode), ShapeError (records of one
                                  batch differ), NetlibFileNotFoundError
image files                       ImageError (unreadable, not an image, truncated,
                                  not 8-bit), NetlibFileNotFoundError
image lists (ImageData)           ConfigError (``list:line``: not ``path label``;
                                  empty), then the image errors above
window files (WindowData)         ParseError (``file:line``), ConfigError (missing
                                  foreground or background windows, a repeated
                                  image index), ShapeError (a window outside its
                                  image, not 3 channels), then the image errors
MNIST IDX files (``data mnist``)  ParseError (bad magic, truncated, corrupt gzip, a
                                  header over INT_MAX / ``NETLIB_MAX_BLOB_BYTES``)
================================  ==============================================

DatabaseError, DatumError and ImageError live in netlib.data (db, datum,
image); like every class here they derive from NetlibError.

Writing: a snapshot that cannot be written (full or read-only disk) is a
SnapshotError naming the file, the earlier snapshots intact; every file netlib
writes goes to a hidden temporary name, is fsync'd, then renamed (and the
folder fsync'd), and a start of training removes a killed run's leftovers.

Exit codes of the ``netlib`` command: 0 success; 1 any error, printed as one
line ``netlib: error: ...`` (a NetlibError, a usage error, an OS error,
MemoryError; an unexpected exception is also one line, marked
"internal error", with the traceback under ``NETLIB_DEBUG=1``); 130 when
interrupted by Ctrl-C outside training (in training SIGINT and SIGHUP follow
``--sigint_effect`` / ``--sighup_effect`` as in Caffe).
"""


class NetlibError(Exception):
    """Base class of every error netlib raises on bad input or state."""


class ParseError(NetlibError, ValueError):
    """A prototxt or binary proto that does not parse.

    ``str(err)`` starts with ``file:line:column`` when the position is known.
    """

    def __init__(self, message, path=None, line=None, column=None):
        self.path, self.line, self.column = path, line, column
        where = path or "<string>"
        if line is not None:
            where += ":%d:%d" % (line, column or 0)
        super().__init__("%s: %s" % (where, message))


class ConfigError(NetlibError, ValueError):
    """A well-formed file that asks for something inconsistent or missing."""


class UnknownLayerTypeError(ConfigError):
    """A layer type string that no registered class implements."""


class LayerError(NetlibError, ValueError):
    """A layer refused its inputs; the message names layer, type and shapes."""


class ShapeError(LayerError):
    """Blob shapes a layer cannot work with."""


class WeightsError(NetlibError, ValueError):
    """Weights or a solver state that do not fit the net they are loaded into."""


class NetlibFileNotFoundError(NetlibError, FileNotFoundError):
    """A file named in a command, prototxt or solver that does not exist."""


class SolverError(NetlibError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


class SnapshotError(SolverError, OSError):
    """A snapshot file that could not be written (a full or read-only disk);
    the earlier snapshots are intact.  Also an ``OSError``."""
