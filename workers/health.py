"""`python -m workers.health`: exit 0 when this container's worker beat recently, 1 (with the reason) otherwise.

The container health check of compose.yaml. The worker writes `$HFGAN_HEALTH_FILE` with every heartbeat it records
in the ledger; the limit defaults to the ledger heartbeat's TTL (`HFGAN_HEARTBEAT_TTL_S`, 10 s), the age at which the
coordinator, too, counts the worker as gone. Imports no torch: it runs every few seconds.
"""

import argparse
import sys

from hfgan_core.runtime.health import beat_problem
from hfgan_core.settings import ConfigError, Settings


def main(argv=None) -> int:
    try:
        env = Settings.from_env()
    except ConfigError as exc:
        print(f"health: {exc}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m workers.health", description=__doc__.splitlines()[0])
    p.add_argument("--file", default=env.health_file, help="heartbeat file ($HFGAN_HEALTH_FILE)")
    p.add_argument(
        "--max-age",
        type=float,
        default=env.heartbeat_ttl_s or 10.0,
        help="seconds (default $HFGAN_HEARTBEAT_TTL_S or 10)",
    )
    args = p.parse_args(argv)
    if not args.file:
        print("health: no heartbeat file (set HFGAN_HEALTH_FILE)", file=sys.stderr)
        return 2
    problem = beat_problem(args.file, args.max_age)
    if problem is not None:
        print(f"health: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
