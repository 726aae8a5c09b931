"""Run a Python script in a child process and SIGKILL it part-way (the fault tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def kill_after_lines(script: str, after_lines: int, extra_s: float) -> bool:
    """Run ``script`` (python -c) and SIGKILL it once it printed ``after_lines`` lines (plus
    ``extra_s`` seconds); a line starting with "done" means it finished first. Returns
    whether it was killed before finishing."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        seen = 0
        for line in child.stdout:
            if line.startswith("done"):
                return False
            seen += 1
            if seen >= after_lines:
                time.sleep(extra_s)
                break
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        return True
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
