"""Headless Chromium (Debian's `chromium` package) for the tests that check a page as a browser renders it.

`dump_dom` loads a URL, lets its scripts run (virtual time: timers and fetches complete before the DOM is
printed) and returns the DOM as the scripts left it; `screenshot` saves a PNG. No browser: the test fails, naming the
package (scripts/test.sh installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("no chromium: apt-get install chromium (scripts/test.sh installs it)")
    return exe


def _run(url: str, *extra: str, budget_ms: int, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="hfgan-chromium-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url],
            capture_output=True,
            timeout=timeout,
        )


def dump_dom(url: str, *, budget_ms: int = 6000, timeout: float = 180) -> str:
    res = _run(url, "--dump-dom", budget_ms=budget_ms, timeout=timeout)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    return res.stdout.decode()


def screenshot(url: str, out: Path, *, size: str = "1200,1000", budget_ms: int = 6000, timeout: float = 180) -> Path:
    res = _run(url, f"--screenshot={out}", f"--window-size={size}", budget_ms=budget_ms, timeout=timeout)
    assert res.returncode == 0 and out.is_file(), res.stderr.decode(errors="replace")[-2000:]
    return out
