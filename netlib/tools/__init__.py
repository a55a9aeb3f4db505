"""Command-line tools: the ``netlib`` command (:mod:`netlib.tools.cli`) and
data preparation (:mod:`netlib.tools.mnist`)."""
