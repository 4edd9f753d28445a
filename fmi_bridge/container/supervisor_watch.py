"""Supervisor event listener: when a program goes FATAL, stop supervisord so the platform restarts the container.

A container whose subscriber can no longer start must not look alive with only the broker running. The marker
file tells the launcher to end with exit 1, not supervisord's 0. On SIGTERM (a normal stop) it exits 0, so
Supervisor reports a clean stop rather than a program killed by a signal.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FATAL_MARKER = "fatal"  # in BRIDGE_RUN_DIR; fmi_bridge.container.launch reads it


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = dict(token.split(":", 1) for token in sys.stdin.readline().split())
        payload = sys.stdin.read(int(header.get("len", "0")))
        if header.get("eventname") == "PROCESS_STATE_FATAL":
            sys.stderr.write(f"program went FATAL, stopping supervisord: {payload}\n")
            sys.stderr.flush()
            run_dir = os.environ.get("BRIDGE_RUN_DIR")
            if run_dir:
                (Path(run_dir) / FATAL_MARKER).write_text(payload)
            os.kill(os.getppid(), signal.SIGTERM)
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
