"""The broker connection: persistent MQTT 5 session, QoS 1, manual acknowledgement, jittered reconnects.

One thread owns the connection: it connects, reads, writes and sends every PUBACK (the intake hands them over;
paho's manual loop is not safe with two writers, and an SSL socket must not be used from two threads). It keeps
reading while the spool takes nothing, so keepalive is answered and the session never drops under backpressure
(a drop would throw away the acknowledgements of what the intake then commits: duplicates). Memory stays
bounded all the same: QoS 1 by Receive Maximum, QoS 0 by the inbox, which drops and counts what it cannot hold.

paho's own reconnect is switched off: this loop reconnects with jittered exponential backoff, so a fleet of
restarted bridges does not hammer a recovering broker in step.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fmi_bridge.backoff import Backoff
from fmi_bridge.config import Config
from fmi_bridge.logs import RateLimiter
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt import publish_decoder
from fmi_bridge.mqtt.buffered_client import BufferedClient
from fmi_bridge.mqtt.inbox import Inbox
from fmi_bridge.readings import Inbound

log = logging.getLogger(__name__)

QOS = 1
# Retained readings only when the subscription is new: a resumed session must not get them again on every
# reconnect (a new session gets the broker's last retained reading once; its event_id is unchanged).
RETAIN_HANDLING = SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
UNREACHABLE_WARN_SECONDS = 5.0  # a broker away longer than this is a WARNING; a restart takes less
FLAPPING_LOSSES = 3  # connections lost within a minute before each loss is a WARNING
LOSS_WINDOW_SECONDS = 60.0
SESSION_TAKEN_OVER = 0x8E  # MQTT 5.0, 3.14.2.1: "Another Connection using the same ClientID has connected"
CONNECTION_CLOSED = 0x80  # what paho reports for a connection the peer closed without a DISCONNECT packet
PACKETS_PER_TURN = 200  # packets parsed from the read buffer before the loop sends PUBACKs and keepalive again


class MqttLink:
    def __init__(self, config: Config, metrics: Metrics, inbox: Inbox) -> None:
        self.config = config
        self.metrics = metrics
        self.inbox = inbox
        self._drop_log = RateLimiter(per_second=0.2, burst=1)
        self.connected = False
        self.subscribed = False
        self.subscription_refused: str | None = None  # the broker's reason codes, while it refuses
        self._subscribe_backoff = Backoff(initial=1.0, maximum=60.0)
        self._subscribe_at: float | None = None  # when to ask again after a refusal
        self.reading = True  # cleared at shutdown: the broker keeps what was not read
        self.generation = 0
        self._closing = False
        self._unreachable_since: float | None = None  # the first failed connect of the current run of them
        self._losses: deque[float] = deque()  # when recent connections were lost (flapping shows as a WARNING)
        self._ended: deque[float] = deque()  # ...of them, those the broker ended (a takeover looks like this)
        self._takeover_reported = False
        self._end_pending: float | None = None  # when the broker last ended the connection, until the next connect
        self._acks: deque[Inbound] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.heartbeat = time.monotonic()
        self._backoff = Backoff(initial=1.0, maximum=60.0)
        self.client = BufferedClient(
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
        publish_decoder.install()  # a property paho cannot parse costs neither the message nor the connection
        metrics.watch_count(
            "fmi_bridge_mqtt_properties_skipped",
            "Messages delivered without their MQTT 5 properties, which paho could not parse",
            publish_decoder.properties_skipped,
        )

    # -- the connection loop (its own thread) ---------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Until `stop`; then the acknowledgements handed over so far are sent and the session is left open."""
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            if not self.reading:  # the bridge is stopping: no new connection
                stop.wait(0.1)
                continue
            try:
                self.client.connect(
                    self.config.mqtt_broker,
                    self.config.mqtt_port,
                    self.config.mqtt_keepalive,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
            except (OSError, ssl.SSLError) as exc:
                self._end_pending = None  # the broker went away: its end of the connection was no takeover
                delay = self._backoff.next_delay()
                now = time.monotonic()
                self._unreachable_since = self._unreachable_since or now
                # A broker that is only restarting (or stopped first at a normal stop) is no alarm; one that
                # stays away is.
                level = logging.WARNING if now - self._unreachable_since >= UNREACHABLE_WARN_SECONDS else logging.INFO
                log.log(
                    level,
                    "broker unreachable; trying again",
                    extra={
                        "broker": f"{self.config.mqtt_broker}:{self.config.mqtt_port}",
                        "error": str(exc),
                        "retry_in_seconds": round(delay, 2),
                    },
                )
                stop.wait(delay)
                continue
            self._unreachable_since = None
            while not stop.is_set() and self._pump(timeout=1.0) == mqtt.MQTT_ERR_SUCCESS:
                self.heartbeat = time.monotonic()
                if self._subscribe_at is not None and self.heartbeat >= self._subscribe_at:
                    self._subscribe()
            if not stop.is_set():
                stop.wait(self._backoff.next_delay())
        self._close()
        self.heartbeat = time.monotonic()

    def _pump(self, timeout: float) -> int:
        """One turn of the network loop, as paho's loop(), with the acknowledgements handed over sent first."""
        self._send_acks()
        sock = self.client.socket()
        if sock is None:
            return int(mqtt.MQTT_ERR_NO_CONN)
        buffered = self.reading and (self.client.buffered() or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0))
        readable, writable, _ = select.select(
            [self._wake_r, sock] if self.reading else [self._wake_r],
            [sock] if self.client.want_write() else [],
            [],
            0.0 if buffered else timeout,
        )
        if self._wake_r in readable:
            self._drain_wakeups()
        if sock in readable or buffered:
            for _ in range(PACKETS_PER_TURN):
                rc = self.client.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    return int(rc)
                if not self.client.buffered():
                    break
        if writable or self.client.want_write():
            rc = self.client.loop_write()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return int(rc)
        return int(self.client.loop_misc())

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
        properties.SessionExpiryInterval = self.config.mqtt_session_expiry
        properties.ReceiveMaximum = self.config.mqtt_receive_maximum
        return properties

    def _close(self) -> None:
        """Send what was acknowledged, then disconnect without unsubscribing: the broker keeps the session and
        queues readings meanwhile."""
        self._closing = True
        self.reading = False
        if self.connected:
            self._send_acks()
            self.client.disconnect()
            for _ in range(20):  # let the PUBACKs and the DISCONNECT packet go out
                if self._pump(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break

    # -- callbacks (paho's thread) --------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        self.generation += 1
        self.connected = True
        self._count_ended()
        self._backoff.reset()
        self.metrics.connects.inc()
        # A resumed session gets again what the bridge had not acknowledged: the copies waiting in the inbox
        # go. A session the broker lost sends nothing again, so they stay and are spooled (never acknowledged).
        again = self.inbox.drop_earlier(self.generation) if flags.session_present else 0
        log.info(
            "connected to broker",
            extra={
                "session_present": bool(flags.session_present),
                "client_id": self.config.mqtt_client_id,
                "inbox_dropped_for_redelivery": again,
            },
        )
        self._subscribe()  # on every connect: cheap, and right even if the broker lost the session

    def _subscribe(self) -> None:
        self._subscribe_at = None
        options = SubscribeOptions(qos=QOS, retainHandling=RETAIN_HANDLING)
        self.client.subscribe([(topic, options) for topic in self.config.mqtt_topic])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        refused = [
            f"{topic}: {reason} (0x{reason.value:02X})"
            for topic, reason in zip(self.config.mqtt_topic, reasons, strict=False)
            if reason.is_failure
        ]
        if refused:
            # An ACL or a filter the broker will not take: connected but idle would look healthy. Say it, keep
            # readiness failing, and ask again with backoff (an operator may fix the ACL meanwhile).
            delay = self._subscribe_backoff.next_delay()
            self._subscribe_at = time.monotonic() + delay
            self.subscription_refused = "; ".join(refused)
            log.error(
                "broker refused the subscription; asking again",
                extra={"reasons": refused, "retry_in_seconds": round(delay, 1)},
            )
            return
        self._subscribe_backoff.reset()
        self.subscription_refused = None
        self.subscribed = True
        log.info("subscribed", extra={"topics": list(self.config.mqtt_topic)})

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self.connected
        self.connected = False
        self.subscribed = False
        self._subscribe_at = None  # the next connect subscribes anyway
        if not was_connected:
            return
        self.metrics.disconnects.inc()
        now = time.monotonic()
        from_server = bool(flags.is_disconnect_packet_from_server)
        said = f"{reason} (0x{reason.value:02X})" if from_server else None
        if self._closing:
            why = "the bridge is stopping"
        elif from_server:
            why = f"the broker sent DISCONNECT: {said}"
        elif reason.value == CONNECTION_CLOSED:
            why = "the broker closed the connection without a DISCONNECT packet"
        else:
            why = f"the bridge closed it: {reason} (0x{reason.value:02X})"
        _recent(self._losses, now).append(now)
        # Ended by the broker, not by a fault of ours: what a second client with our client id causes (MQTT
        # 5.0 names it 0x8E; Mosquitto 2.0 just closes the old connection). Counted once the next connect is
        # taken at once: a broker that went away (a restart, a normal stop) refuses it first.
        if not self._closing and (from_server or reason.value == CONNECTION_CLOSED):
            self._end_pending = now
        # One loss is no alarm; a connection lost again and again (a packet it cannot take) is.
        flapping = len(self._losses) >= FLAPPING_LOSSES and not self._closing
        log.log(
            logging.WARNING if flapping else logging.INFO,
            "disconnected from broker",
            extra={"reason": why, "losses_in_the_last_minute": len(self._losses)},
        )

    def _count_ended(self) -> None:
        """At a connect: the connection before it was ended by the broker although it is there (see above)."""
        if self._end_pending is None:
            return
        now = time.monotonic()
        _recent(self._ended, now).append(self._end_pending)
        self._end_pending = None
        taken = self.session_taken
        if taken and not self._takeover_reported:
            log.error(
                "another client keeps taking the bridge's session",
                extra={"detail": taken, "client_id": self.config.mqtt_client_id, "action": self._takeover_action()},
            )
        self._takeover_reported = taken is not None

    @property
    def session_taken(self) -> str | None:
        """Why the session looks taken over by another client, while it does (readiness says it), else None."""
        since = time.monotonic() - LOSS_WINDOW_SECONDS
        ended = sum(1 for moment in list(self._ended) if moment >= since)  # read only: readiness's thread asks
        if ended < FLAPPING_LOSSES:
            return None
        return (
            f"the broker ended the bridge's connection {ended} times in the last minute, each time after accepting "
            f"it: another client is connecting with the client id {self.config.mqtt_client_id!r}"
        )

    def _takeover_action(self) -> str:
        action = "give each bridge (and every other client) its own MQTT_CLIENT_ID"
        if self.config.mqtt_username:
            # The bundled PPRD/PRD broker takes the login as the client id (use_username_as_clientid).
            action += "; where the broker takes the login as the client id, its own MQTT_USERNAME too"
        return action

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", "backslashreplace")  # validation rejects it as bad_topic
        if message.retain:
            self.metrics.retained.inc()
        inbound = Inbound(topic, bytes(message.payload), datetime.now(UTC), message.qos, message.mid, self.generation)
        if not self.inbox.put(inbound):
            self.metrics.qos0_dropped.inc()
            allowed, held_back = self._drop_log.allow("qos0")
            if allowed:
                log.warning(
                    "QoS 0 messages dropped: the intake is behind and QoS 0 is at most once",
                    extra={"dropped_since_last": held_back + 1, "inbox_messages": len(self.inbox)},
                )

    # -- acknowledgement: handed over by the intake, sent by this link's thread -----------------------------

    def ack_later(self, messages: list[Inbound]) -> None:
        """Called by the intake after the spool commit; the link's thread sends the PUBACKs."""
        self._acks.extend(message for message in messages if message.qos > 0)
        self.wake()

    def wake(self) -> None:
        """Break the link's select() early: acknowledgements to send."""
        with contextlib.suppress(OSError):  # already awake (buffer full), or shutting down: the loop comes round
            self._wake_w.send(b"\0")

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: nothing left to read
            while self._wake_r.recv(4096):
                pass

    def _send_acks(self) -> None:
        """A message from an earlier connection is redelivered by the broker, so it is not acked here."""
        while self._acks:
            message = self._acks.popleft()
            if message.generation == self.generation and self.connected:
                self.client.ack(message.mid, message.qos)


def _recent(moments: deque[float], now: float) -> deque[float]:
    """The deque with what is older than the loss window dropped."""
    while moments and moments[0] < now - LOSS_WINDOW_SECONDS:
        moments.popleft()
    return moments
