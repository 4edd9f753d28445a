"""Whether this machine can serve a configuration, asked before anything starts: the ports the container and the
subscriber will listen on, and the spool's folder. Each problem is one line naming the variable, so a clashing
neighbour (another exporter on 9464, a second bridge) stops start-up with exit 2 instead of tracebacks and a
crash loop."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket (include/net/tcp_states.h)


class UnusableError(Exception):
    """The environment cannot serve a setting; the message names the variable and why."""


def port_problem(variable: str, host: str, port: int) -> str | None:
    """None when host:port can be listened on now, else the line that says why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server and Mosquitto bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            return describe(variable, host, port, exc)
    return None


def describe(variable: str, host: str, port: int, exc: OSError) -> str:
    where = f"{variable}={port}: cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        held = holder(port)
        return f"{where}: the port is in use ({f'by {held}' if held else 'by a program this user cannot see'})"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges)"
    return f"{where}: {exc.strerror or exc}"


def holder(port: int) -> str | None:
    """'pid N: command line' of a process listening on the port, where /proc lets this user see it."""
    inodes = set(_listening_inodes(port))
    if not inodes:
        return None
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {pid}: {command.strip()[:120]}"
        except OSError:  # gone meanwhile, or another user's
            continue
    return None


def _listening_inodes(port: int) -> Iterable[str]:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == LISTEN:
                yield f"socket:[{fields[9]}]"


def folder_problem(variable: str, folder: Path) -> str | None:
    """None when the folder exists (or can be made) and this user can write in it, else the line that says why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{variable}={folder}: the folder cannot be used: {exc.strerror or exc}"
    return None


def duplicate_ports(ports: dict[str, int]) -> str | None:
    """Two settings naming one port: the second program would find it taken."""
    seen: dict[int, str] = {}
    for variable, port in ports.items():
        if port in seen:
            return f"{seen[port]} and {variable} are both {port}: each needs a port of its own"
        seen[port] = variable
    return None
