"""`python -m workers.clustering`: activation summaries in, cluster assignment and KLD scores out."""

import sys

from workers.common import main

if __name__ == "__main__":
    sys.exit(main("clustering", __doc__))
