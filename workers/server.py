"""`python -m workers.server`: the split-learning server (the middle blocks of G and D, one per run)."""

import sys

from workers.common import main

if __name__ == "__main__":
    sys.exit(main("server", __doc__))
