"""The message format on the wire: header names, units, payload encoding. Pure; no I/O.

This is a public contract: services in other languages schedule by publishing messages
that follow it (docs/reference/wire-format.md). Times are integer milliseconds since the Unix
epoch: pamqp would encode a float header as a 32-bit float and lose up to a minute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from rmqdelay.core.errors import InvalidKeyError, InvalidPayloadError, MessageDecodeError
from rmqdelay.core.task import Task

TASK_ID = "rmqdelay-id"
DUE_MS = "rmqdelay-due"
PUBLISHED_MS = "rmqdelay-published"
ATTEMPT = "rmqdelay-attempt"
KEYS = "rmqdelay-keys"
#: The keys again, as a JSON array in a string: RabbitMQ streams drop array and table
#: header values (3.10 all of them, 4.x those not named x-...), so the journal's copy of
#: a task has only this to say which keys it has.
KEYS_JSON = "rmqdelay-keys-json"
#: On a copy the journal keeper carried forward (docs/design.md, "Keeping the journal"):
#: it is published straight to the stream, so the destination its routing key gave is a
#: header; and when it was written (ms), for the keeper to carry it again in its turn.
JOURNAL_DESTINATION = "rmqdelay-journal-destination"
JOURNALED_MS = "rmqdelay-journaled"
#: On the keeper's progress record (a marker too): the journal offset it has kept through.
KEPT_THROUGH = "rmqdelay-kept-through"
CANCEL_KEY = "rmqdelay-cancel-key"
CANCEL_AT_MS = "rmqdelay-cancel-at"
#: Optional: when the cancel stops mattering (ms); absent, the cancel lasts the retention.
CANCEL_UNTIL_MS = "rmqdelay-cancel-until"
MARKER = "rmqdelay-marker"
#: Snapshot parts (in the snapshot stream) and the record announcing a complete snapshot
#: (in the cancellation stream) carry these.
SNAPSHOT = "rmqdelay-snapshot"
SNAPSHOT_PART = "rmqdelay-snapshot-part"
SNAPSHOT_PARTS = "rmqdelay-snapshot-parts"
#: The last cancellation-stream offset the snapshot includes.
SNAPSHOT_COVERS = "rmqdelay-snapshot-covers"
SNAPSHOT_TAKEN_MS = "rmqdelay-snapshot-taken"
#: Keys are AMQP strings in an array header; these bounds keep headers well under frame size.
MAX_KEY_BYTES = 255
MAX_KEYS = 32
ROUTE_IN = "rmqdelay-route-in"
#: A task published more than this after its due time was scheduled in the past (``at=``
#: long gone): the scheduler warns, and workers count it apart from the lateness figures.
PAST_DUE_TOLERANCE_MS = 1000
#: Route value meaning "on to the work exchange" (any other value is a level number).
DELIVER = "work"
JSON = "application/json"
#: Content types a worker hands to its handler (as bytes) unless told otherwise.
DEFAULT_ACCEPT = frozenset({JSON, "application/octet-stream", "text/plain"})
#: AMQP properties a publisher sets besides headers and content type, as pamqp names them:
#: what ``Task.properties`` and ``rmqdelay parked show`` hold.
PUBLISHER_PROPERTIES = (
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
)


def route_header(level: int) -> str:
    """Header that the exchange after ``level`` routes on."""
    return f"rmqdelay-route-{level}"


def route_headers(plan: tuple[int, ...]) -> dict[str, str]:
    """The hop plan as headers: the first stop, then for each level the stop after it.

    Values are strings, not ints: headers exchanges compare types too, and every client
    library encodes a string the same way.
    """
    stops = [*(str(level) for level in plan), DELIVER]
    headers = {ROUTE_IN: stops[0]}
    headers.update({route_header(level): nxt for level, nxt in zip(plan, stops[1:], strict=True)})
    return headers


def task_headers(
    task_id: str,
    *,
    due_ms: int,
    published_ms: int,
    route: Mapping[str, Any],
    attempt: int = 1,
    keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """All rmqdelay headers of a scheduled message; ``route`` is the backend's (the hop
    plan's ``route_headers``, or the plugin's x-delay).

    The attempt and the keys are left out at their defaults (1, none), as the wire format
    allows: each header is encoded per publish and copied per hop (~1.7 us each to encode).
    """
    headers = {TASK_ID: task_id, DUE_MS: due_ms, PUBLISHED_MS: published_ms, **route}
    if attempt != 1:
        headers[ATTEMPT] = attempt
    if keys:
        headers[KEYS] = list(keys)
        headers[KEYS_JSON] = _JSON_ENCODER.encode(keys)
    return headers


def keys_from_json(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """``headers`` with the keys array restored from its JSON copy where a stream dropped
    it (a journal record); raises MessageDecodeError if the copy is not an array."""
    text = headers.get(KEYS_JSON)
    if KEYS in headers or text is None:
        return headers
    try:
        keys = json.loads(text) if isinstance(text, str | bytes) else None
    except ValueError:
        keys = None
    if not isinstance(keys, list):
        raise MessageDecodeError(f"header {KEYS_JSON!r} must be a JSON array, got {text!r}")
    return {**headers, KEYS: keys}


def check_key(key: object, what: str = "a cancel key") -> str:
    """Return ``key`` if it can be a cancel key (or, ``what`` says, a task id), else say why.

    Keys are header values, not names: any Unicode text of 1 to MAX_KEY_BYTES UTF-8 bytes.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"{what} must be a non-empty string, got {key!r}")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"{what} {key[:40]!r}... is {size} bytes; the limit is {MAX_KEY_BYTES}"
        )
    try:
        key.encode()
    except UnicodeEncodeError as e:
        raise InvalidKeyError(f"{what} {key[:40]!r} is not valid Unicode text ({e.reason})") from e
    return key


def check_keys(keys: object) -> tuple[str, ...]:
    """Validate a task's cancel keys (a list or tuple of strings, not one bare string)."""
    if isinstance(keys, str | bytes) or not isinstance(keys, list | tuple | set | frozenset):
        raise InvalidKeyError(
            f"keys must be a list of strings, got {type(keys).__name__} ({_short(keys)})"
        )
    if not keys:
        return ()  # the usual case
    if len(keys) > MAX_KEYS:
        raise InvalidKeyError(f"a task may have at most {MAX_KEYS} keys, got {len(keys)}")
    return tuple(dict.fromkeys(check_key(k) for k in keys))


def cancel_headers(key: str, at_ms: int, until_ms: int | None = None) -> dict[str, Any]:
    """Headers of a cancel record in the cancellation stream."""
    headers: dict[str, Any] = {CANCEL_KEY: key, CANCEL_AT_MS: at_ms}
    if until_ms is not None:
        headers[CANCEL_UNTIL_MS] = until_ms
    return headers


def decode_cancel(headers: Mapping[str, Any] | None) -> tuple[str, int, int | None]:
    """The key, time and expiry (None: the retention's) of a cancel record."""
    headers = headers or {}
    until = headers.get(CANCEL_UNTIL_MS)
    return (
        _str_header(headers, CANCEL_KEY),
        _time_header(headers, CANCEL_AT_MS),
        None if until is None else _time_header(headers, CANCEL_UNTIL_MS),
    )


def encode_snapshot_part(entries: list[tuple[str, int, int]]) -> bytes:
    """One part of a cancel-set snapshot: ``[[key, at_ms, until_ms], ...]`` as JSON."""
    return _JSON_ENCODER.encode(entries).encode()


def decode_snapshot_part(body: bytes) -> list[tuple[str, int, int]]:
    """The entries of a snapshot part; raises MessageDecodeError on anything else."""
    try:
        entries = json.loads(body)
    except ValueError as e:
        raise MessageDecodeError(f"snapshot part is not JSON: {e}") from None
    if not isinstance(entries, list):
        raise MessageDecodeError("snapshot part is not a list")
    out = []
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:])
        ):
            raise MessageDecodeError(f"snapshot entry is not [key, at_ms, until_ms]: {entry!r}")
        out.append((entry[0], entry[1], entry[2]))
    return out


def published_ms(task: Task) -> int:
    """The publish stamp of a task, exactly (the datetime may round)."""
    return _int_header(task.headers, PUBLISHED_MS)


#: One encoder for every task: json.dumps with options builds a new one per call.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_payload(payload: Any, content_type: str | None) -> tuple[bytes, str]:
    """Body and content type for a payload: JSON unless bytes with an explicit content type."""
    if isinstance(payload, bytes | bytearray | memoryview):
        if not content_type:
            raise InvalidPayloadError(
                "a bytes payload needs an explicit content_type, e.g. "
                "content_type='application/octet-stream'"
            )
        return bytes(payload), content_type
    if content_type not in (None, JSON):
        raise InvalidPayloadError(
            f"content_type {content_type!r} is only for bytes payloads; "
            f"a {type(payload).__name__} payload is sent as {JSON}"
        )
    try:
        body = _JSON_ENCODER.encode(payload)
    except (TypeError, ValueError) as e:
        raise InvalidPayloadError(f"payload is not JSON-serialisable: {e}") from e
    except RecursionError as e:
        raise InvalidPayloadError(
            "payload is nested too deeply to encode as JSON (or contains itself); flatten it"
        ) from e
    try:
        return body.encode(), JSON
    except UnicodeEncodeError as e:
        raise InvalidPayloadError(f"payload holds text that is not valid Unicode: {e}") from e


def check_size(body: bytes, limit: int) -> None:
    """Refuse a body the broker would refuse: RabbitMQ compares the body alone with its
    ``max_message_size``, and refuses by closing the publishing channel."""
    if len(body) > limit:
        raise InvalidPayloadError(
            f"payload of {len(body)} bytes is over the maximum message size of {limit} bytes "
            "(RMQDELAY_MAX_MESSAGE_SIZE, which should match the broker's max_message_size); "
            "store large data elsewhere and schedule a reference to it"
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def ms_to_datetime(ms: int) -> datetime:
    """Milliseconds since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def _str_header(headers: Mapping[str, Any], name: str) -> str:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value:
        raise MessageDecodeError(f"header {name!r} must be a non-empty string, got {value!r}")
    return value


def _int_header(headers: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = headers.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageDecodeError(f"header {name!r} must be an integer, got {value!r}")
    return value


#: The times a header may plausibly hold, in milliseconds since the epoch: from 2000 to
#: 2200. Outside, a time was almost surely written in another unit (a due time in
#: seconds is in January 1970; one in microseconds is in the year 55,000) and would run a
#: task at once or cancel a key for ever.
EARLIEST_MS = 946_684_800_000  # 2000-01-01
LATEST_MS = 7_258_118_400_000  # 2200-01-01


def _time_header(headers: Mapping[str, Any], name: str) -> int:
    """An integer header holding epoch milliseconds, refused (naming the likely unit
    mistake) when it is not a plausible time."""
    value = _int_header(headers, name)
    if EARLIEST_MS <= value <= LATEST_MS:
        return value
    raise MessageDecodeError(f"header {name!r} is {value}: {unit_mistake(value)}")


def unit_mistake(value: int) -> str:
    """What a time outside EARLIEST_MS..LATEST_MS most likely is."""
    for factor, unit in ((1000, "seconds"), (1 / 1000, "microseconds"), (1e-6, "nanoseconds")):
        if EARLIEST_MS <= value * factor <= LATEST_MS:
            return (
                f"not a time in milliseconds since the epoch, but it would be one in {unit}; "
                "times are integer milliseconds"
            )
    if value < 0:
        return "a time before 1970; times are integer milliseconds since the epoch"
    return (
        "not a plausible time in milliseconds since the epoch (2000-2200); times are "
        "integer milliseconds"
    )


def _identity(headers: Mapping[str, Any]) -> tuple[str, list[str], int]:
    """A task's id, cancel keys and attempt, held to the limits the wire format gives
    publishers (a key the scheduler would refuse must not pass the worker either)."""
    attempt = _int_header(headers, ATTEMPT, 1)
    if attempt < 1:
        raise MessageDecodeError(f"header {ATTEMPT!r} must be >= 1, got {attempt}")
    keys = headers.get(KEYS, [])
    if not isinstance(keys, list) or (keys and not all(isinstance(k, str) for k in keys)):
        raise MessageDecodeError(f"header {KEYS!r} must be an array of strings, got {keys!r}")
    task_id = _str_header(headers, TASK_ID)
    try:
        check_key(task_id, "the task id")
        if keys:
            check_keys(keys)
    except InvalidKeyError as e:
        raise MessageDecodeError(f"{e} (a limit of the wire format)") from None
    return task_id, keys, attempt


def decode_task(
    *,
    headers: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None,
    routing_key: str,
    redelivered: bool = False,
    accept: frozenset[str] = DEFAULT_ACCEPT,
    raw: bool = False,
    properties: Mapping[str, Any] | None = None,
) -> Task:
    """Build the Task a handler sees, or say exactly what is wrong with the message.

    ``raw``: any content type (or none) is fine and the payload is the body as it is, for
    handlers that pass messages on rather than read them.
    """
    headers = headers or {}
    payload: Any = body
    if raw:
        content_type = content_type or ""
    elif not content_type:
        raise MessageDecodeError("message has no content_type; rmqdelay sends application/json")
    else:
        # The usual case, exactly "application/json", needs no parsing.
        media_type = JSON if content_type == JSON else content_type.split(";")[0].strip().lower()
        if media_type not in accept:
            raise MessageDecodeError(
                f"content_type {content_type!r} is not one this worker accepts "
                f"({', '.join(sorted(accept))}); see 'rmqdelay consume --accept'"
            )
        if media_type == JSON:
            try:
                payload = json.loads(body)
            except ValueError as e:
                raise MessageDecodeError(f"body is not valid JSON: {e}") from e
            except RecursionError as e:
                raise MessageDecodeError("body is JSON nested too deeply to decode") from e
    task_id, keys, attempt = _identity(headers)
    return Task(
        id=task_id,
        destination=routing_key,
        payload=payload,
        due_at=ms_to_datetime(_time_header(headers, DUE_MS)),
        published_at=ms_to_datetime(_time_header(headers, PUBLISHED_MS)),
        attempt=attempt,
        keys=tuple(keys),
        content_type=content_type,
        headers=dict(headers),
        redelivered=redelivered,
        body=body,
        properties=properties if properties is not None else {},
    )


PARKED_REASON = "rmqdelay-parked-reason"
PARKED_ERROR = "rmqdelay-parked-error"
PARKED_ATTEMPTS = "rmqdelay-parked-attempts"
PARKED_DESTINATION = "rmqdelay-parked-destination"
PARKED_AT = "rmqdelay-parked-at"
PARKED_FROM = "rmqdelay-parked-from"
#: Records rmqdelay's tools append to the log beside a queue set aside
#: (``tools/aside_log.py``): the ids they took out (the body, a JSON list), and a purge.
ASIDE_TAKEN = "rmqdelay-aside-taken"
ASIDE_PURGED = "rmqdelay-aside-purged"
_PARKED = (PARKED_REASON, PARKED_ERROR, PARKED_ATTEMPTS, PARKED_DESTINATION, PARKED_AT, PARKED_FROM)
_MAX_REASON = 1000
#: Bookkeeping the broker adds to a message: dead-lettering (x-death, x-first-death-*,
#: x-last-death-*) and a quorum queue's counts of deliveries (x-delivery-count) and, from
#: RabbitMQ 4.3, acquisitions (x-acquired-count). None of it may go out again with a copy
#: we publish: RabbitMQ 3.x trusts a client-published x-death and drops a message expiring
#: into a queue it lists, and a copy must not show the original's counts.
BROKER_HEADERS = (
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-delivery-count",
    "x-acquired-count",
)


def strip_broker_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` without the broker's bookkeeping (``BROKER_HEADERS``)."""
    return {k: v for k, v in headers.items() if not k.startswith(BROKER_HEADERS)}


def parked_headers(
    headers: Mapping[str, Any] | None,
    *,
    reason: str,
    error: str,
    attempts: int,
    destination: str,
    now_ms: int,
    source: str,
) -> dict[str, Any]:
    """Headers of a message going to the parking lot: the original ones plus why."""
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return {
        **strip_broker_headers(headers or {}),
        PARKED_REASON: reason,
        PARKED_ERROR: error,
        PARKED_ATTEMPTS: attempts,
        PARKED_DESTINATION: destination,
        PARKED_AT: now_ms,
        PARKED_FROM: source,
    }


def _without_routing(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in strip_broker_headers(headers).items()
        if not k.startswith("rmqdelay-route-") and k not in _PARKED and k != "x-delay"
    }


def rescheduled_headers(
    headers: Mapping[str, Any], *, attempt: int, due_ms: int, route: Mapping[str, Any]
) -> dict[str, Any]:
    """Headers for sending a task through the levels again (a retry, or out of the parking
    lot): a new attempt, due time and route; the same id, keys and publish stamp, so a
    cancel of the original still hits it."""
    return {**_without_routing(headers), ATTEMPT: attempt, DUE_MS: due_ms, **route}
