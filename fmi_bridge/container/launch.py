"""Container start: check the subscriber's configuration, write this environment's Mosquitto configuration, then
run supervisord and end with its outcome.

python -m fmi_bridge.container.launch            (the image's CMD, and `make run`)
python -m fmi_bridge.container.launch --render   only write the broker configuration and print its path

Exit codes: 2 for a bad setting (one line naming it, before anything starts); 1 when a program could not be
kept running (Supervisor gave up on it: FATAL); otherwise supervisord's own (0 after SIGTERM).
"""

from __future__ import annotations

import configparser
import getpass
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import xmlrpc.client
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from fmi_bridge import APP_DIR
from fmi_bridge.config import ENVIRONMENTS, Config, ConfigError, Setting, listen_address
from fmi_bridge.container.broker_conf import SECURED_ENVIRONMENTS, BrokerSecurity, acl_text, render
from fmi_bridge.container.secrets import SecretError, fetch_secrets
from fmi_bridge.container.supervisor_watch import FATAL_MARKER
from fmi_bridge.preflight import duplicate_ports, folder_problem, port_problem
from fmi_bridge.shutdown import stop_with_parent

BUNDLED_BROKER_HOSTS = ("localhost", "127.0.0.1", "::1")  # MQTT_BROKER naming the container's own Mosquitto
BROKER_USER = "mosquitto"  # Debian's package makes it: Mosquitto warns when it keeps root's rights

# The broker side of the container, declared like the subscriber's settings (the README lists both).
LAUNCH_SETTINGS: tuple[Setting, ...] = (
    Setting("BRIDGE_RUN_DIR", "Where the rendered broker configuration and supervisord's socket go.", "var/run"),
    Setting("MOSQUITTO_DATA_DIR", "Mosquitto's persistence folder; must survive restarts.", "var/mosquitto"),
    Setting(
        "MOSQUITTO_PORT",
        "Broker listener port; default MQTT_PORT when that is set (so MQTT_PORT alone moves the bundled broker and "
        "the bridge together), else 1883 (LOCAL, DEV) or 8883 with TLS (PPRD, PRD).",
    ),
    Setting("MOSQUITTO_PASSWORD_FILE", "PPRD/PRD: password file made with mosquitto_passwd (a mounted secret)."),
    Setting("MOSQUITTO_TLS_CERT", "PPRD/PRD: the broker's certificate (PEM); include `localhost` for the bridge."),
    Setting("MOSQUITTO_TLS_KEY", "PPRD/PRD: the broker's private key (PEM)."),
    Setting("MOSQUITTO_TLS_CA", "Optional: CA whose client certificates the broker also accepts."),
    Setting(
        "MOSQUITTO_ACL_FILE",
        "Optional ACL file; default: the bridge reads FCTS/FAE/#, a site user writes its own site.",
    ),
    Setting(
        "SECRET_MANAGER_EMULATOR_HOST",
        "host:port of a Secret Manager stand-in (plain gRPC, no credentials), for `<X>_SECRET` variables.",
    ),
)


class LaunchError(ValueError):
    pass


def _broker_user(data_dir: Path) -> str:
    """Who Mosquitto runs as: the launching user, or when that is root, Debian's `mosquitto` user (given the
    persistence folder), so the broker does not keep root's rights; root still where that user could not reach
    the folder (a checkout under a private home)."""
    if os.getuid() == 0:
        try:
            broker = pwd.getpwnam(BROKER_USER)
        except KeyError:
            return "root"
        if not all(_traversable(folder, broker) for folder in data_dir.parents):
            return "root"
        for path in (data_dir, *data_dir.iterdir()):
            os.chown(path, broker.pw_uid, broker.pw_gid)
        return BROKER_USER
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # an arbitrary uid with no passwd entry: mosquitto ignores `user` when not root
        return BROKER_USER


def _traversable(folder: Path, user: pwd.struct_passwd) -> bool:
    mode = folder.stat()
    if mode.st_uid == user.pw_uid:
        return bool(mode.st_mode & stat.S_IXUSR)
    if mode.st_gid == user.pw_gid:
        return bool(mode.st_mode & stat.S_IXGRP)
    return bool(mode.st_mode & stat.S_IXOTH)


def _file(environ: Mapping[str, str], name: str) -> Path:
    value = environ.get(name, "")
    if not value:
        raise LaunchError(f"{name} is required when APP_ENV={environ.get('APP_ENV')}")
    path = Path(value)
    if not path.is_file():
        raise LaunchError(f"{name}={value}: file does not exist")
    return path


def prepare(environ: dict[str, str]) -> Path:
    """Write the broker configuration, fill in the variables supervisord.conf uses; return the config path."""
    app_env = environ.get("APP_ENV", "")
    if app_env not in ENVIRONMENTS:
        raise LaunchError(f"APP_ENV={app_env!r}: must be one of {', '.join(ENVIRONMENTS)}")
    run_dir = Path(environ.get("BRIDGE_RUN_DIR") or "var/run").resolve()
    data_dir = Path(environ.get("MOSQUITTO_DATA_DIR") or "var/mosquitto").resolve()
    secured = app_env in SECURED_ENVIRONMENTS
    bundled = (environ.get("MQTT_BROKER") or "localhost") in BUNDLED_BROKER_HOSTS
    if bundled and environ.get("MQTT_PORT") and not environ.get("MOSQUITTO_PORT"):
        environ["MOSQUITTO_PORT"] = environ["MQTT_PORT"]  # one setting moves the bundled broker and the bridge
    port_text = environ.get("MOSQUITTO_PORT") or ("8883" if secured else "1883")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise LaunchError(f"MOSQUITTO_PORT={port_text!r}: must be a port number")
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fetch_secrets(environ, run_dir / "secrets")
    except SecretError as exc:
        raise LaunchError(str(exc)) from exc
    security = None
    if secured:
        acl = Path(environ["MOSQUITTO_ACL_FILE"]) if environ.get("MOSQUITTO_ACL_FILE") else run_dir / "acl"
        if not environ.get("MOSQUITTO_ACL_FILE"):
            if not environ.get("MQTT_USERNAME"):
                raise LaunchError(f"MQTT_USERNAME is required when APP_ENV={app_env}: the ACL names the bridge")
            acl.write_text(acl_text(environ["MQTT_USERNAME"]))
        security = BrokerSecurity(
            password_file=_file(environ, "MOSQUITTO_PASSWORD_FILE"),
            acl_file=acl,
            tls_cert=_file(environ, "MOSQUITTO_TLS_CERT"),
            tls_key=_file(environ, "MOSQUITTO_TLS_KEY"),
            tls_ca=_file(environ, "MOSQUITTO_TLS_CA") if environ.get("MOSQUITTO_TLS_CA") else None,
        )
    conf = run_dir / "mosquitto.conf"
    bind = broker_address(environ)
    conf.write_text(
        render(
            app_env,
            port=int(port_text),
            data_dir=data_dir,
            run_as=_broker_user(data_dir),
            security=security,
            bind_address=bind,
        )
    )
    environ["MOSQUITTO_PORT"] = port_text  # as rendered: the port checks read it
    environ.setdefault("MQTT_PORT", port_text)
    environ["BRIDGE_RUN_DIR"] = str(run_dir)
    environ["BRIDGE_APP_DIR"] = str(APP_DIR)
    environ["BRIDGE_PYTHON"] = sys.executable
    return conf


def main(argv: list[str]) -> int:
    environ = dict(os.environ)
    render_only = argv[1:] == ["--render"]
    try:
        conf = prepare(environ)
        if not render_only:
            config = Config.from_env(environ)  # the subscriber's own check, before anything starts
            if problem := environment_problem(environ, config):
                raise LaunchError(problem)
            warn_of_another_broker_port(environ, config)
    except (LaunchError, ConfigError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if render_only:
        print(conf)
        return 0
    supervisord = shutil.which("supervisord", path=f"{Path(sys.executable).parent}:{environ.get('PATH', '')}")
    if supervisord is None:
        print("supervisord not found: pip install -r requirements.txt", file=sys.stderr)
        return 2
    return supervise(supervisord, environ, Path(environ["BRIDGE_RUN_DIR"]))


def warn_of_another_broker_port(environ: Mapping[str, str], config: Config) -> None:
    broker_port = int(environ["MOSQUITTO_PORT"])
    if config.mqtt_broker in BUNDLED_BROKER_HOSTS and config.mqtt_port != broker_port:
        print(
            f"warning: MQTT_PORT={config.mqtt_port} but the bundled broker listens on MOSQUITTO_PORT={broker_port}: "
            "the bridge will not reach it (set MQTT_PORT alone to move both)",
            file=sys.stderr,
        )


def broker_address(environ: Mapping[str, str]) -> str:
    return environ.get("LISTEN_ADDRESS") or listen_address(environ.get("APP_ENV", ""))


def environment_problem(environ: Mapping[str, str], config: Config) -> str | None:
    """What this machine cannot give the programs about to start: a port taken (named with what holds it), one
    port named twice, an unusable spool folder."""
    ports = {
        "MOSQUITTO_PORT": (broker_address(environ), int(environ["MOSQUITTO_PORT"])),
        "PORT": (config.listen_address, config.port),
        "METRICS_PORT": ("127.0.0.1", config.metrics_port),
    }
    if problem := duplicate_ports({name: port for name, (_, port) in ports.items()}):
        return problem
    if _answers(Path(environ["BRIDGE_RUN_DIR"]) / "supervisor.sock"):
        return (
            f"BRIDGE_RUN_DIR={environ['BRIDGE_RUN_DIR']}: a bridge started from it is running (its supervisord "
            "answers there); stop it, or give this one its own BRIDGE_RUN_DIR, ports and SPOOL_DIR"
        )
    for name, (host, port) in ports.items():
        if problem := port_problem(name, host, port):
            return problem
    return folder_problem("SPOOL_DIR", config.spool_dir)


def _answers(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as client:
        try:
            client.connect(str(socket_path))
        except OSError:  # none, or left by a run that ended
            return False
    return True


def supervise(supervisord: str, environ: dict[str, str], run_dir: Path) -> int:
    """supervisord as a child; 1 when it stopped because a program went FATAL (supervisord itself exits 0 then,
    which would look like a clean stop to whatever runs the container)."""
    marker = run_dir / FATAL_MARKER
    marker.unlink(missing_ok=True)
    conf = APP_DIR / "supervisord.conf"
    command = [supervisord, "-c", str(conf)]
    if os.getuid() == 0:
        command += ["--user", "root"]  # said explicitly: supervisord warns (CRIT) when root is only implied
    # A process group of its own: Ctrl-C in a terminal signals the whole foreground group, and supervisord
    # would log a WARN for it; here only this launcher hears it, and stops supervisord over its socket. If the
    # launcher itself is killed, the kernel tells supervisord (SIGTERM), so nothing is left running. Its output
    # comes through this launcher: a reader that goes away (`make run | tee`, tee gone) ends the run in order
    # instead of failing supervisord's writes and orphaning its programs.
    child = subprocess.Popen(
        command,
        env=environ,
        process_group=0,
        preexec_fn=stop_with_parent,  # noqa: PLW1509 (the launcher runs no thread)
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    asked = False

    def stop(received: int, frame: object = None) -> None:
        # Asked over its socket, supervisord stops everything as for a signal, without a WARN line for a stop
        # that is no fault; the signal itself is the fallback.
        nonlocal asked
        if asked and received != signal.SIGINT:
            return
        asked = True
        try:
            _supervisor_rpc(conf, run_dir).supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            child.send_signal(signal.SIGTERM if received == signal.SIGHUP else received)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    assert child.stdout is not None
    relay(child.stdout.fileno(), sys.stdout.fileno(), reader_gone=lambda: stop(signal.SIGTERM))
    code = child.wait()
    _stop_broker_left_behind(run_dir)
    if marker.exists():
        print(f"stopped: a program could not be kept running ({marker.read_text().strip()})", file=sys.stderr)
        return 1
    return code


def relay(source: int, target: int, reader_gone: Callable[[], None]) -> None:
    """Copy supervisord's output as it comes until it ends; when the target's reader is gone, say so once and
    keep draining (a full pipe would stall the programs' stop)."""
    gone = False
    while chunk := os.read(source, 65536):
        if gone:
            continue
        try:
            os.write(target, chunk)
        except OSError:  # EPIPE: the pipe's reader ended (Python ignores SIGPIPE); EIO: the terminal closed
            gone = True
            reader_gone()


def _stop_broker_left_behind(run_dir: Path) -> None:
    """Mosquitto drops its rights as it starts (which clears the parent-death signal): if supervisord ended
    without stopping it (killed), the broker of this run (started on its configuration file) is stopped here."""
    conf = str(run_dir / "mosquitto.conf").encode()
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            program, *args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if Path(program.decode()).name == "mosquitto" and args[:2] == [b"-c", conf]:
                os.kill(int(pid), signal.SIGTERM)
        except OSError:  # gone meanwhile, or not ours to signal
            continue


def _supervisor_rpc(conf: Path, run_dir: Path) -> Any:
    """supervisord's XML-RPC interface on its unix socket, with supervisorctl's credentials from the conf."""
    parser = configparser.RawConfigParser()
    parser.read(conf)
    transport = SupervisorTransport(
        parser.get("supervisorctl", "username"),
        parser.get("supervisorctl", "password"),
        f"unix://{run_dir}/supervisor.sock",
    )
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
