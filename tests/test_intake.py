"""The intake on a real spool: one message that breaks anything becomes a reject; the inbox stays bounded."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

from fmi_bridge.intake import Intake
from fmi_bridge.metrics import Metrics
from fmi_bridge.mqtt.inbox import Inbox
from fmi_bridge.readings import UNPROCESSABLE, Inbound, Reading, Reject, validate
from fmi_bridge.spool import READING, REJECT, Spool
from tests.support import wait_until

NOW = datetime(2026, 11, 22, tzinfo=UTC)
TOPIC = "FCTS/FAE/MOR/SolvExtract/TAG"


def message(n: int, payload: bytes | None = None) -> Inbound:
    body = {"site_code": "MOR", "sensor_id": "FT-1", "timestamp": "2026-11-20T08:00:00Z", "value": n}
    return Inbound(TOPIC, payload or json.dumps(body).encode(), NOW, qos=1, mid=n)


def test_a_message_that_breaks_processing_is_kept_as_unprocessable_and_the_rest_go_on(tmp_path: Path) -> None:
    """The catch-all behind validation: whatever fault a future input finds, intake does not die for it."""

    def fragile(inbound: Inbound) -> Reading | Reject:
        if b"\xc3\xa9" in inbound.payload:
            raise RuntimeError("a fault nobody foresaw")
        return validate(inbound)

    spool = Spool.open(tmp_path, max_bytes=10**9, min_free_bytes=1, reading_bits=3, reject_bits=2)
    inbox, acked = Inbox(), []
    intake = Intake(spool, Metrics(), inbox, ack=acked.extend, committed=lambda: None, validator=fragile)
    stop = threading.Event()
    worker = threading.Thread(target=intake.run, args=(stop,))
    worker.start()
    poison = message(2, '{"caf\u00e9": 1, "value": "\\ud800"}'.encode())
    for inbound in (message(1), poison, message(3)):
        inbox.put(inbound)

    wait_until(lambda: len(acked) == 3, 10, "all three acknowledged after the commit")
    stop.set()
    worker.join(10)

    assert not worker.is_alive()
    records = spool.pending(2, 10)
    assert [record.kind for record in records] == [READING, REJECT, READING]
    reject = records[1].row
    assert reject["reason"] == UNPROCESSABLE
    assert reject["detail"] == "RuntimeError: a fault nobody foresaw"
    assert reject["payload"] == poison.payload.decode()  # the raw payload is kept for audit


def test_the_inbox_drops_qos0_at_its_bound_and_always_takes_qos1() -> None:
    inbox = Inbox(max_messages=3, max_bytes=10**6)
    for n in range(3):
        assert inbox.put(message(n))
    assert not inbox.has_room()
    assert not inbox.put(Inbound(TOPIC, b"{}", NOW, qos=0))  # at most once: dropped, counted by the link
    assert inbox.put(message(9))  # at least once: the broker's Receive Maximum bounds these
    assert len(inbox) == 4

    assert len(inbox.take(3, timeout=0)) == 3
    assert inbox.has_room()


def test_the_inbox_bound_counts_the_topic_too() -> None:
    """A 64 KiB topic with an empty payload is 64 KiB held, not nothing."""
    inbox = Inbox(max_messages=1000, max_bytes=1024**2)
    long_topic = "FCTS/FAE/MOR/SolvExtract/" + "T" * 65_000
    held = 0
    while inbox.put(Inbound(long_topic, b"", NOW, qos=0)):
        held += 1
    assert 14 <= held <= 17  # about 1 MiB of topics, far from the 1,000 messages an empty payload would allow
