"""`python -m workers.client`: one device: its data shard, the client-side blocks, its side of every step."""

import sys

from workers.common import main


def _flags(p, env):
    p.add_argument("--client", type=int, help="a fixed client index (default: claim a free slot of the run)")


if __name__ == "__main__":
    sys.exit(main("client", __doc__, _flags))
