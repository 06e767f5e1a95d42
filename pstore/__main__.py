"""``python -m pstore``: the same as the ``pstore`` command."""

import sys

from .cli import main

sys.exit(main())
