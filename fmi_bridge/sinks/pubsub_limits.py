"""Google Pub/Sub's documented Publish limits, as the bridge keeps them.

Source of every number: "Quotas and limits", https://cloud.google.com/pubsub/quotas (resource limits and
publisher throughput), and the `PubsubMessage` docstring of the installed client
(`google/pubsub_v1/types/pubsub.py`): all messages of one PublishRequest carry the same `ordering_key`.
The tests' conformance layer (tests/sinks/pubsub_conformance.py) holds its own copy of these rules, so a wrong
number here shows up as a refusal there.
"""

from __future__ import annotations

MAX_MESSAGES_PER_REQUEST = 1000  # "Publish request: 1,000 messages"
MAX_REQUEST_BYTES = 10_000_000  # "Publish request: 10 MB (total size)"; 10 MB read as 10**7, the smaller reading
MAX_ORDERING_KEY_BYTES = 1024  # "Ordering key size: 1 KB"
MAX_ATTRIBUTE_VALUE_BYTES = 1024  # "Attribute value size: 1024 bytes"
MAX_ATTRIBUTE_KEY_BYTES = 256  # "Attribute key size: 256 bytes"
MAX_ATTRIBUTES = 100  # "Attributes per message: 100"
MAX_MESSAGE_BYTES = 10_000_000  # "Message size (the data field): 10 MB"
# "If messages have ordering keys, the maximum publisher throughput is 1 MB/s per ordering key", measured on
# the published PubsubMessages. The bridge counts it over a window a little longer than a second, so network
# jitter of up to that margin cannot make Google see more than the limit in any one second.
KEY_BYTES_PER_SECOND = 1_000_000
KEY_WINDOW_SECONDS = 1.1


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def too_long(name: str, value: str, limit: int, what: str) -> str | None:
    """A detail naming the limit when `value` is longer than `limit` UTF-8 bytes, else None."""
    size = utf8_size(value)
    if size <= limit:
        return None
    return f"{name} is {size:,} bytes in UTF-8; Pub/Sub takes {what} of at most {limit:,} bytes"
