"""What a Storage Write API refusal means for a lane, read from its status code and, where the service sends
one, its `StorageError` detail (`google/cloud/bigquery_storage_v1/types/storage.py`, `StorageErrorCode`).

The status code alone is ambiguous: INVALID_ARGUMENT is a bad row, a schema the table lacks, or (as Apache
Beam's writer treats it, apache/beam#16906) a stream gone or finalized; NOT_FOUND is a lost stream or a missing
table. The detail says which, so it decides first; the code decides only when there is none (bqemulator sends
none).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from google.cloud.bigquery_storage_v1 import types

INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED = 3, 5, 6, 7  # google.rpc.Code
FAILED_PRECONDITION, OUT_OF_RANGE, UNAUTHENTICATED = 9, 11, 16
STORAGE_ERROR_TYPE = "type.googleapis.com/google.cloud.bigquery.storage.v1.StorageError"
_Code = types.StorageError.StorageErrorCode


class Meaning(Enum):
    # The Write API client's exceptions (google-cloud-bigquerystorage, Exceptions.OffsetAlreadyExists and
    # OffsetOutOfRange): "an offset before the current end of the stream ... expected when ExactOnce is enforced.
    # You can safely ignore it"; "a point beyond the current end of the stream ... usually means a bug in your
    # code that introduces a gap in appends". The first is ignored for the rows it covers only (the sink finds
    # where the stream ends); the second, at a lane's first unsettled offset, means the stream is not the one
    # the offsets were given on, so a new one is made.
    WRITTEN = "the stream holds this offset already"  # ALREADY_EXISTS: an earlier send landed
    BEYOND_END = "the offset is past the stream's end"  # OUT_OF_RANGE
    STREAM_GONE = "the stream is gone, expired or finalized"
    SCHEMA = "the table lacks fields the rows have"
    TABLE_MISSING = "the table does not exist"
    DENIED = "the service refuses the bridge's identity"
    REFUSED = "the service refuses the append as a whole"  # INVALID_ARGUMENT with no detail the sink knows
    RETRY = "anything else: the same append again after a backoff"


_BY_DETAIL = {
    _Code.OFFSET_ALREADY_EXISTS: Meaning.WRITTEN,
    _Code.OFFSET_OUT_OF_RANGE: Meaning.BEYOND_END,
    _Code.STREAM_NOT_FOUND: Meaning.STREAM_GONE,
    _Code.STREAM_FINALIZED: Meaning.STREAM_GONE,
    _Code.STREAM_ALREADY_COMMITTED: Meaning.STREAM_GONE,
    _Code.INVALID_STREAM_TYPE: Meaning.STREAM_GONE,
    _Code.INVALID_STREAM_STATE: Meaning.STREAM_GONE,
    _Code.SCHEMA_MISMATCH_EXTRA_FIELDS: Meaning.SCHEMA,
    _Code.TABLE_NOT_FOUND: Meaning.TABLE_MISSING,
}
_BY_CODE = {
    INVALID_ARGUMENT: Meaning.REFUSED,
    PERMISSION_DENIED: Meaning.DENIED,
    UNAUTHENTICATED: Meaning.DENIED,
    ALREADY_EXISTS: Meaning.WRITTEN,
    OUT_OF_RANGE: Meaning.BEYOND_END,
    NOT_FOUND: Meaning.STREAM_GONE,
    FAILED_PRECONDITION: Meaning.STREAM_GONE,  # bqemulator's answer for a finalized stream
}


@dataclass(frozen=True)
class Refusal:
    code: int  # google.rpc.Code
    message: str
    detail: Any = None  # types.StorageError, when the service sent one

    @classmethod
    def of(cls, code: int, message: str, details: Any) -> Refusal:
        """From a status's code, message and `details` (protobuf Any messages, as in google.rpc.Status and in
        google.api_core's exceptions)."""
        for packed in details or ():
            if getattr(packed, "type_url", "") == STORAGE_ERROR_TYPE:
                return cls(code, message, types.StorageError.deserialize(packed.value))
        return cls(code, message)

    @property
    def meaning(self) -> Meaning:
        if self.detail is not None and self.detail.code in _BY_DETAIL:
            return _BY_DETAIL[self.detail.code]
        return _BY_CODE.get(self.code, Meaning.RETRY)

    def describe(self) -> str:
        if self.detail is None:
            return f"{self.code} {self.message}"
        name = _Code(self.detail.code).name
        return f"{self.code} {name} {self.detail.entity}: {self.detail.error_message or self.message}"
