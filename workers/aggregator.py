"""`python -m workers.aggregator`: per-cluster weighted averages from the update log (start any number)."""

import sys

from workers.common import main


def _flags(p, env):
    p.add_argument("--index", type=int, help="this aggregator's index (names it aggregator.<index>)")


if __name__ == "__main__":
    sys.exit(main("aggregator", __doc__, _flags))
