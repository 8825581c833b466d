"""``python -m ceu``: the ``ceu`` command; with no argument, the embedded default (``ceu unlearn``)."""
import sys

from ceu.cli import main

sys.exit(main())
