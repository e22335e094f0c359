"""Input checks that run before any round trip.

Whatever can be judged here is judged here, so that bad input never reaches
the database and never aborts the caller's transaction (PostgreSQL discards
everything a transaction did once one of its statements fails).
"""

import json
import os
import re
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Text, bindparam, cast
from sqlalchemy.dialects.postgresql import JSONB

from zaphub_db.errors import ValidationError, quoted

INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1
# Deeper JSON is refused before it is encoded (PostgreSQL's own parser gives
# up near its stack limit, Python's json near its recursion limit).
MAX_JSON_DEPTH = 1000
# The largest JSON value (payload, config, wa_response) a call accepts, in
# bytes of its UTF-8 text: ZAPHUB_MAX_JSON_BYTES, else 16 MiB (WhatsApp's own
# cap on media; anything larger belongs in object storage, by reference).
# jsonb itself stops at 256 MB, after the client has spent seconds and
# gigabytes encoding and sending it; this limit refuses it first.
DEFAULT_MAX_JSON_BYTES = 16 * 1024 * 1024


def _max_json_bytes() -> int:
    configured = os.environ.get("ZAPHUB_MAX_JSON_BYTES", "").strip()
    if not configured:
        return DEFAULT_MAX_JSON_BYTES
    if not configured.isdigit() or not 0 < int(configured) < 256 * 1024 * 1024:
        raise ValidationError(
            "ZAPHUB_MAX_JSON_BYTES must be a whole number of bytes below 256 MiB "
            f"(jsonb's own limit), got {quoted(configured)}"
        )
    return int(configured)


MAX_JSON_BYTES = _max_json_bytes()
# A JSON escape of the NUL character: \u0000 after an even number of
# backslashes (the text "\u0000" written out is encoded as \\u0000 and is fine).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _encodable(value: str, field: str) -> None:
    # A lone surrogate ("\ud800") cannot be encoded in UTF-8: the driver would
    # raise UnicodeEncodeError, or the server refuse the JSON escape.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                f"{field} holds a character that is not valid Unicode text "
                f"(a lone surrogate at position {exc.start})"
            ) from None


def as_uuid(value: Any, field: str = "id") -> uuid.UUID:
    """A ``uuid.UUID`` from a UUID or its string form."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValidationError(f"{field} must be a UUID, got {quoted(value)}")


def choice(value: Any, allowed: type[StrEnum], field: str) -> str:
    """``value`` if it is one of ``allowed``'s values."""
    if isinstance(value, str) and value in allowed._value2member_map_:
        return str(value)
    listed = ", ".join(member.value for member in allowed)
    raise ValidationError(f"{field} must be one of {listed}; got {quoted(value)}")


def text_value(value: Any, field: str, max_length: int | None = None) -> str:
    """A string PostgreSQL can store: no NUL character, within the column's length."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(f"{field} contains a NUL character, which PostgreSQL cannot store")
    _encodable(value, field)
    if max_length is not None and len(value) > max_length:
        raise ValidationError(
            f"{field} is {len(value)} characters long; the column holds at most {max_length}"
        )
    return value


def optional_text(value: Any, field: str, max_length: int | None = None) -> str | None:
    """Like :func:`text_value`, but ``None`` passes."""
    return None if value is None else text_value(value, field, max_length)


def json_text(value: Any, field: str) -> str:
    """A dict encoded as the JSON text that ``jsonb`` will accept.

    Encoding is the check: it rejects what ``jsonb`` would refuse at the
    database (values JSON cannot represent, NaN and infinities, the NUL
    character ``\\u0000``). The text is what gets bound (see :func:`jsonb`),
    so a payload is encoded once per call, not once to check and again to send.
    """
    if not isinstance(value, dict):
        raise ValidationError(f"{field} must be a JSON object (dict), got {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        # Python's encoder (and decoder) recurse: near the interpreter's
        # recursion limit they give up, below MAX_JSON_DEPTH if the stack is deep.
        raise ValidationError(
            f"{field} is nested too deeply to encode (the limit is {MAX_JSON_DEPTH} levels, "
            "fewer when Python's recursion limit is reached first)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{field} is not valid JSON: {exc}") from exc
    # A character is 1 to 4 bytes of UTF-8: count bytes only when it matters.
    if len(encoded) > MAX_JSON_BYTES // 4 and (
        len(encoded) > MAX_JSON_BYTES
        or len(encoded.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES
    ):
        raise ValidationError(
            f"{field} is {len(encoded.encode('utf-8', 'surrogatepass')):,} bytes of JSON; "
            f"the limit is {MAX_JSON_BYTES:,} (ZAPHUB_MAX_JSON_BYTES)"
        )
    if "\\u0000" in encoded and _JSON_NUL.search(encoded):
        raise ValidationError(f"{field} contains a NUL character, which jsonb cannot store")
    _encodable(encoded, field)
    # Only a text with that many brackets can be that deep: count first (in C).
    if encoded.count("{") + encoded.count("[") > MAX_JSON_DEPTH and (
        _json_depth(value) > MAX_JSON_DEPTH
    ):
        raise ValidationError(f"{field} is nested deeper than {MAX_JSON_DEPTH} levels")
    return encoded


def _json_depth(value: Any) -> int:
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest


def jsonb(name: str) -> ColumnElement[Any]:
    """A bound parameter holding :func:`json_text` output, read as ``jsonb``."""
    return cast(bindparam(name, type_=Text), JSONB)


def integer(value: Any, field: str, minimum: int = 0, maximum: int = INT4_MAX) -> int:
    """An int (not a bool) within the column's range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field} must be an integer, got {quoted(value)}")
    if not minimum <= value <= maximum:
        raise ValidationError(
            f"{field} must be between {minimum} and {maximum}, got {quoted(value)}"
        )
    return value


def timestamp(value: Any, field: str) -> datetime | None:
    """A timezone-aware datetime, or ``None``.

    Naive datetimes are refused: PostgreSQL would read them in the
    connection's time zone, which is rarely what the caller meant.
    """
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(f"{field} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{field} must be timezone-aware (e.g. datetime.now(UTC))")
    return value


def limit_offset(limit: Any, offset: Any) -> tuple[int | None, int]:
    """A non-negative ``limit`` (or ``None`` for no limit) and ``offset``."""
    checked_limit = None if limit is None else integer(limit, "limit", maximum=INT8_MAX)
    return checked_limit, integer(offset, "offset", maximum=INT8_MAX)


# How far back from now() a cut-off may reach: PostgreSQL's timestamps begin
# in 4714 BC, so now() minus about 6,700 years is the edge; this bound stays
# well inside it for the next few thousand years. Ages and retention periods
# are checked against it, not against the queue's 30-day lease bound.
MAX_AGE = timedelta(days=2_000_000)


def interval(value: Any, field: str, maximum: timedelta) -> timedelta:
    """A non-negative ``timedelta`` no longer than ``maximum``.

    The bound keeps every timestamp computed from it (now() + value) inside
    PostgreSQL's range, where an overflow would abort the caller's transaction.
    """
    if not isinstance(value, timedelta):
        raise ValidationError(f"{field} must be a timedelta, got {type(value).__name__}")
    if not timedelta(0) <= value <= maximum:
        raise ValidationError(f"{field} must be between 0 and {maximum}, got {value}")
    return value


def positive_interval(value: Any, field: str, maximum: timedelta) -> timedelta:
    """Like :func:`interval`, longer than zero (a lease)."""
    checked = interval(value, field, maximum)
    if checked <= timedelta(0):
        raise ValidationError(f"{field} must be longer than zero, got {checked}")
    return checked
