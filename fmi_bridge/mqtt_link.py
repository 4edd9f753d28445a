"""The broker connection: persistent MQTT 5 session, QoS 1, manual acknowledgement, jittered reconnects.

paho's own reconnect is switched off: this loop reconnects with jittered exponential backoff, so a fleet of
restarted bridges does not hammer a recovering broker in step.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fmi_bridge.backoff import Backoff
from fmi_bridge.config import Config
from fmi_bridge.metrics import Metrics
from fmi_bridge.readings import Inbound

log = logging.getLogger(__name__)

QOS = 1


class MqttLink:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.deliver: Callable[[Inbound], None] = lambda message: None  # set to the intake before connecting
        self.connected = False
        self.subscribed = False
        self.generation = 0
        self._closing = False
        self.heartbeat = time.monotonic()
        self._backoff = Backoff(initial=1.0, maximum=60.0)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.mqtt_client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        if config.mqtt_username:
            self.client.username_pw_set(config.mqtt_username, config.mqtt_password)
        if config.mqtt_tls_ca:
            self.client.tls_set(
                ca_certs=str(config.mqtt_tls_ca),
                certfile=str(config.mqtt_tls_cert) if config.mqtt_tls_cert else None,
                keyfile=str(config.mqtt_tls_key) if config.mqtt_tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- the connection loop (its own thread) ---------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                self.client.connect(
                    self.config.mqtt_broker,
                    self.config.mqtt_port,
                    self.config.mqtt_keepalive,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
            except (OSError, ssl.SSLError) as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "broker unreachable; trying again",
                    extra={
                        "broker": f"{self.config.mqtt_broker}:{self.config.mqtt_port}",
                        "error": str(exc),
                        "retry_in_seconds": round(delay, 2),
                    },
                )
                stop.wait(delay)
                continue
            while not stop.is_set() and self.client.loop(timeout=1.0) == mqtt.MQTT_ERR_SUCCESS:
                self.heartbeat = time.monotonic()
            if not stop.is_set():
                stop.wait(self._backoff.next_delay())
        self.heartbeat = time.monotonic()

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
        properties.SessionExpiryInterval = self.config.mqtt_session_expiry
        properties.ReceiveMaximum = self.config.mqtt_receive_maximum
        return properties

    def close(self) -> None:
        """Disconnect without unsubscribing: the broker keeps the session and queues readings meanwhile."""
        self._closing = True
        if self.connected:
            self.client.disconnect()
            for _ in range(20):  # let the DISCONNECT packet go out
                if self.client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break

    # -- callbacks (paho's thread) --------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        self.generation += 1
        self.connected = True
        self._backoff.reset()
        self.metrics.connects.inc()
        log.info(
            "connected to broker",
            extra={"session_present": bool(flags.session_present), "client_id": self.config.mqtt_client_id},
        )
        # Subscribe on every connect: cheap, and right even if the broker lost the session.
        client.subscribe([(topic, SubscribeOptions(qos=QOS)) for topic in self.config.mqtt_topic])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:
            log.error(
                "broker refused the subscription", extra={"reasons": refused, "topics": list(self.config.mqtt_topic)}
            )
            return
        self.subscribed = True
        log.info("subscribed", extra={"topics": list(self.config.mqtt_topic)})

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self.connected
        self.connected = False
        self.subscribed = False
        if was_connected:
            self.metrics.disconnects.inc()
            level = logging.INFO if self._closing else logging.WARNING
            log.log(level, "disconnected from broker", extra={"reason": str(reason)})

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", "backslashreplace")  # validation rejects it as bad_topic
        self.deliver(
            Inbound(topic, bytes(message.payload), datetime.now(UTC), message.qos, message.mid, self.generation)
        )

    # -- acknowledgement (the intake's thread) --------------------------------------------------------------

    def ack(self, message: Inbound) -> None:
        """PUBACK after the spool commit; a message from an earlier connection is redelivered, not acked."""
        if message.qos > 0 and message.generation == self.generation and self.connected:
            self.client.ack(message.mid, message.qos)
