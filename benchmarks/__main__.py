"""``python -m benchmarks NAME [--smoke] [--json]``: the same as ``dft bench``."""

import sys

from benchmarks.runner import main

sys.exit(main())
