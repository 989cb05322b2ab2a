"""`python -m workers.coordinator`: the round lifecycle, deadlines, aggregation jobs and the run directory."""

import sys

from workers.common import main


def _flags(p, env):
    p.add_argument(
        "--standby-ok",
        action="store_true",
        default=env.standby_ok,
        help="wait as standby while another coordinator leads the run ($HFGAN_STANDBY_OK=1)",
    )
    p.add_argument(
        "--no-utility",
        dest="utility",
        action="store_false",
        default=not env.no_utility,
        help="skip the final utility metrics in summary.json ($HFGAN_NO_UTILITY=1)",
    )


if __name__ == "__main__":
    sys.exit(main("coordinator", __doc__, _flags))
