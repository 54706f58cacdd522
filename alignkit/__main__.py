"""`python -m alignkit STAGE ...`: the `alignkit` command (also `accelerate launch -m alignkit STAGE ...`)."""

import sys

from .cli import main

sys.exit(main())
