"""netlib's exception hierarchy.

Every error the library raises on bad input derives from :class:`NetlibError`,
so a caller (and the ``netlib`` command) can catch one class and print one
clear line.  Subclasses also derive from the matching built-in exception
(``ValueError``, ``FileNotFoundError``...) so generic handlers keep working.
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
