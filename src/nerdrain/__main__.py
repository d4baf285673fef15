"""``python -m nerdrain`` is ``nerd-rain`` (useful where the package is on PYTHONPATH but not installed)."""

import sys

from .cli import main

sys.exit(main())
