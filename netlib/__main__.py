"""``python -m netlib ...`` is the ``netlib`` command."""
import sys

from .tools.cli import main

sys.exit(main())
