"""The Mosquitto configuration of one environment: the shipped mosquitto.conf plus the listener and security.

LOCAL and DEV: a plain listener that allows anonymous clients. PPRD and PRD: a TLS listener only, password
file, and an ACL (the bridge reads FCTS/FAE/#; a site publisher, whose user name is its site code, writes only
FCTS/FAE/<its site>/SolvExtract/<pi_tag>).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fmi_bridge import APP_DIR

BASE_CONF = APP_DIR / "mosquitto.conf"
SECURED_ENVIRONMENTS = ("PPRD", "PRD")


@dataclass(frozen=True)
class BrokerSecurity:
    password_file: Path
    acl_file: Path
    tls_cert: Path
    tls_key: Path
    tls_ca: Path | None = None  # with it, clients may also present certificates signed by this CA


def acl_text(bridge_user: str) -> str:
    return (
        "# The bridge may only read readings.\n"
        f"user {bridge_user}\n"
        "topic read FCTS/FAE/#\n\n"
        "# Every other user is a site publisher named after its site code: it writes its own site only.\n"
        "pattern write FCTS/FAE/%u/SolvExtract/+\n"
    )


def render(
    app_env: str, *, port: int, data_dir: Path, run_as: str, security: BrokerSecurity | None, bind_address: str = ""
) -> str:
    lines = [
        BASE_CONF.read_text().rstrip(),
        "",
        f"# --- {app_env} ---",
        f"user {run_as}",
        f"persistence_location {data_dir}/",
        f"listener {port} {bind_address}".rstrip(),
    ]
    if app_env in SECURED_ENVIRONMENTS:
        if security is None:
            raise ValueError(f"APP_ENV={app_env} needs the broker's TLS certificate, key and password file")
        lines += [
            "use_username_as_clientid true",  # a login can only ever have its own session
            f"certfile {security.tls_cert}",
            f"keyfile {security.tls_key}",
            "tls_version tlsv1.2",
            "allow_anonymous false",
            f"password_file {security.password_file}",
            f"acl_file {security.acl_file}",
        ]
        if security.tls_ca:
            lines += [f"cafile {security.tls_ca}", "require_certificate false"]
    else:
        lines += ["allow_anonymous true"]
    return "\n".join(lines) + "\n"
