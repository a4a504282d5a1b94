"""python -m difflab.summarize SWEEP_DIR (see :mod:`difflab.summarize`)."""

import sys

from difflab.summarize import main

sys.exit(main())
