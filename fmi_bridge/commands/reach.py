"""Whether each endpoint the configuration names answers: a TCP connection within SETUP_TIMEOUT_SECONDS, so that
check-config says at once which endpoint (and which variable) is wrong instead of the bridge retrying it later."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fmi_bridge.config import Config, split_host_port

GOOGLE = "Google's endpoint"


@dataclass(frozen=True)
class Endpoint:
    service: str
    host: str
    port: int
    variable: str  # what sets it

    def __str__(self) -> str:
        return f"{self.service} at {self.host}:{self.port} ({self.variable})"


def endpoints(config: Config) -> list[Endpoint]:
    found = [Endpoint("the MQTT broker", config.mqtt_broker, config.mqtt_port, "MQTT_BROKER, MQTT_PORT")]
    if config.pubsub_enabled:
        if config.pubsub_emulator_host:
            found.append(_host_port("Pub/Sub", config.pubsub_emulator_host, "PUBSUB_EMULATOR_HOST"))
        else:
            endpoint = config.pubsub_endpoint or "pubsub.googleapis.com:443"
            found.append(_host_port("Pub/Sub", endpoint, "PUBSUB_ENDPOINT"))
    if config.bigquery_enabled:
        if config.bigquery_emulator_host:
            url = urlsplit(config.bigquery_emulator_host)
            port = url.port or (443 if url.scheme == "https" else 80)
            found.append(Endpoint("BigQuery", url.hostname or "", port, "BIGQUERY_EMULATOR_HOST"))
        else:
            found.append(Endpoint("BigQuery", "bigquery.googleapis.com", 443, GOOGLE))
        if config.bigquery_write_method == "storage_write":
            if config.bigquery_storage_emulator_host:
                storage = config.bigquery_storage_emulator_host
                found.append(_host_port("the BigQuery Storage Write API", storage, "BIGQUERY_STORAGE_EMULATOR_HOST"))
            else:
                found.append(Endpoint("the BigQuery Storage Write API", "bigquerystorage.googleapis.com", 443, GOOGLE))
    return found


def _host_port(service: str, address: str, variable: str) -> Endpoint:
    return Endpoint(service, *split_host_port(address), variable)


def reach(endpoint: Endpoint, timeout: float) -> float:
    """Seconds a TCP connection took; OSError (refused, unresolvable, timed out) when there is none."""
    started = time.monotonic()
    with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
        return time.monotonic() - started


def check(config: Config, timeout: float) -> tuple[dict[str, str], list[str]]:
    """(what answered, one phrase per endpoint that did not)."""
    answered: dict[str, str] = {}
    failed: list[str] = []
    for endpoint in endpoints(config):
        try:
            answered[str(endpoint)] = f"answered in {reach(endpoint, timeout) * 1000:.0f} ms"
        except OSError as exc:
            reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else exc.strerror
            failed.append(f"{endpoint}: {reason or type(exc).__name__}")
    return answered, failed
