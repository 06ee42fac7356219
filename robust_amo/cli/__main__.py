"""``python -m robust_amo.cli`` (and ``torchrun -m robust_amo.cli``): the console script."""

import sys

from robust_amo.cli import main

sys.exit(main())
