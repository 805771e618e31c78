"""`python -m skinscan.cli`: the same command line as the `skinscan` script."""

import sys

from skinscan.cli import main

sys.exit(main())
