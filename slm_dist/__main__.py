"""`python -m slm_dist`: the same command line as `slm-dist`."""

import sys

from slm_dist.cli import main

sys.exit(main())
