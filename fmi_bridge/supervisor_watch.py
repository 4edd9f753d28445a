"""Supervisor event listener: when a program goes FATAL, stop supervisord so the platform restarts the container.

A container whose subscriber can no longer start must not look alive with only the broker running.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = dict(token.split(":", 1) for token in sys.stdin.readline().split())
        payload = sys.stdin.read(int(header.get("len", "0")))
        if header.get("eventname") == "PROCESS_STATE_FATAL":
            sys.stderr.write(f"program went FATAL, stopping supervisord: {payload}\n")
            sys.stderr.flush()
            os.kill(os.getppid(), signal.SIGTERM)
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
