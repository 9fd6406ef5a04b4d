"""python -m wdopt.bench: see wdopt/bench/__init__.py."""

import sys

from .run import main

sys.exit(main())
