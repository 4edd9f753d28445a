"""Secrets at container start: `<X>_SECRET` names a Secret Manager version; its payload is written to a
private file and `<X>` points at it. Nothing secret goes into the image or the deployment descriptors.

    MQTT_PASSWORD_FILE_SECRET=mqtt-bridge-password             (this project, latest version)
    MOSQUITTO_TLS_KEY_SECRET=projects/p/secrets/broker-key/versions/3
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import grpc
from google.cloud import secretmanager
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import SecretManagerServiceGrpcTransport

SECRET_FILE_VARIABLES = (
    "MQTT_PASSWORD_FILE", "MQTT_TLS_CA", "MQTT_TLS_CERT", "MQTT_TLS_KEY",
    "MOSQUITTO_PASSWORD_FILE", "MOSQUITTO_TLS_CERT", "MOSQUITTO_TLS_KEY", "MOSQUITTO_TLS_CA", "MOSQUITTO_ACL_FILE",
)  # fmt: skip


class SecretError(ValueError):
    pass


def version_name(reference: str, project: str | None) -> str:
    if reference.startswith("projects/"):
        return reference if "/versions/" in reference else f"{reference}/versions/latest"
    if not project:
        raise SecretError(f"secret {reference!r} needs GCP_PROJECT_ID, or a full projects/.../secrets/... name")
    return f"projects/{project}/secrets/{reference}/versions/latest"


def secret_client(environ: MutableMapping[str, str]) -> Any:
    host = environ.get("SECRET_MANAGER_EMULATOR_HOST")
    if host:  # tests and local runs: plain gRPC, no credentials, like the other emulator hosts
        return secretmanager.SecretManagerServiceClient(
            transport=SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(host))
        )
    return secretmanager.SecretManagerServiceClient()


def fetch_secrets(environ: MutableMapping[str, str], directory: Path, client: Any = None) -> list[str]:
    """Fetch every `<X>_SECRET`, set `<X>` to its file; return the variables filled in."""
    wanted = {name: environ[f"{name}_SECRET"] for name in SECRET_FILE_VARIABLES if environ.get(f"{name}_SECRET")}
    if not wanted:
        return []
    client = client or secret_client(environ)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, reference in wanted.items():
        version = version_name(reference, environ.get("GCP_PROJECT_ID"))
        try:
            data = client.access_secret_version(name=version).payload.data
        except Exception as exc:  # any client failure ends start-up with the secret's name, not a trace
            raise SecretError(f"{name}_SECRET={reference}: cannot read {version}: {type(exc).__name__}") from exc
        path = directory / name.lower()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        environ[name] = str(path)
    return list(wanted)
