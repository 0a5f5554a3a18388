"""``python -m bench``: every workload on every default target; see bench/README.md."""

import sys

from bench.run import main

sys.exit(main())
