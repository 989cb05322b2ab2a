"""Redis authentication: one ACL user per infrastructure role, with development passwords generated into files.

Only infrastructure roles open the ledger (clients never do: they reach the coordinator over the broker). Each
gets its own Redis user, allowed the ledger's keys (`hfgan:*`) and the commands the store uses (reads, writes,
transactions, scripts), nothing `@dangerous` (no FLUSHALL, KEYS, CONFIG, ACL, DEBUG ...) and no pub/sub channels.
The default user keeps every permission but gets a random password of its own (`default.password`, for an operator;
no role is given it), so a connection without a password gets nothing (NOAUTH). It is not turned off: Redis 7.0
replays the append-only file as the default user, and with that user off every transaction in the file (the effects
of the store's scripts) failed with NOPERM on a restart, silently dropping the ledger's writes (tests/compose saw a
resumed run's info reduced to its status).

    python -m hfgan_core.state.acl generate --out secrets/redis [--host redis] [--port 6379] [--db 0]

writes, into the (git-ignored) directory, `users.acl` (for Redis's `aclfile`, passwords as SHA-256 hashes),
`<role>.password` (one random password per role, mode 0600) and `<role>.url` (`redis://<role>:<password>@host:port/db`,
for `HFGAN_STATE_URL_FILE`). Existing passwords are kept, so regenerating does not invalidate running workers.
`broker_config/redis-acl.conf` is the Redis configuration that loads the file (docs/security.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import quote

ROLE_USERS = ("coordinator", "server", "clustering", "aggregator", "observer")
KEY_PATTERN = "hfgan:*"
# Commands the round store uses, and nothing dangerous: the categories are applied in order.
ROLE_RULE = (
    f"resetkeys ~{KEY_PATTERN} resetchannels -@all +@read +@write +@transaction +@scripting +@connection -@dangerous"
)


def role_acl(user: str, password: str) -> str:
    """One `users.acl` line: the user on, its password as a SHA-256 hash, the role rule."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user {user} on #{digest} {ROLE_RULE}"


def acl_file(passwords: dict[str, str], admin_password: str) -> str:
    # No comment line: Redis refuses to start on an aclfile with anything but `user` lines.
    digest = hashlib.sha256(admin_password.encode()).hexdigest()
    lines = [f"user default on #{digest} ~* &* +@all"]
    lines += [role_acl(user, passwords[user]) for user in sorted(passwords)]
    return "\n".join(lines) + "\n"


def _password(path: Path) -> str:
    """The password in `path`, or a new random one written there (mode 0600)."""
    password = path.read_text().strip() if path.exists() else ""
    if not password:
        password = secrets.token_urlsafe(24)
        _write_secret(path, password + "\n")
    return password


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def generate(out: Path, host: str = "redis", port: int = 6379, db: int = 0) -> dict[str, str]:
    """Write users.acl, default.password, <role>.password and <role>.url into `out` (keeping passwords already
    there). Returns the roles' passwords."""
    out.mkdir(parents=True, exist_ok=True)
    passwords: dict[str, str] = {}
    for user in ROLE_USERS:
        password = passwords[user] = _password(out / f"{user}.password")
        _write_secret(out / f"{user}.url", f"redis://{user}:{quote(password, safe='')}@{host}:{port}/{db}\n")
    (out / "users.acl").write_text(acl_file(passwords, _password(out / "default.password")))
    return passwords


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hfgan_core.state.acl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write users.acl and per-role passwords and URLs into --out")
    g.add_argument("--out", default="secrets/redis", help="output directory (git-ignored; default secrets/redis)")
    g.add_argument("--host", default="redis", help="Redis host in the generated URLs (default redis)")
    g.add_argument("--port", type=int, default=6379)
    g.add_argument("--db", type=int, default=0)
    args = p.parse_args(argv)
    try:
        generate(Path(args.out), args.host, args.port, args.db)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/users.acl and a password and URL file per role: {', '.join(ROLE_USERS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
