"""`python -m workers.coordinator`: the round lifecycle, deadlines, aggregation jobs and the run directory."""

import os
import sys

from workers.common import main


def _flags(p):
    p.add_argument(
        "--standby-ok",
        action="store_true",
        default=os.environ.get("HFGAN_STANDBY_OK", "") in ("1", "true", "yes"),
        help="wait as standby while another coordinator leads the run ($HFGAN_STANDBY_OK=1)",
    )
    p.add_argument(
        "--no-utility",
        dest="utility",
        action="store_false",
        default=os.environ.get("HFGAN_NO_UTILITY", "") not in ("1", "true", "yes"),
        help="skip the final utility metrics in summary.json ($HFGAN_NO_UTILITY=1)",
    )


if __name__ == "__main__":
    sys.exit(main("coordinator", __doc__, _flags))
