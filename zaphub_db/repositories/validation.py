"""Input checks that run before any round trip.

Whatever can be judged here is judged here, so that bad input never reaches
the database and never aborts the caller's transaction (PostgreSQL discards
everything a transaction did once one of its statements fails).
"""

import json
import re
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Text, bindparam, cast
from sqlalchemy.dialects.postgresql import JSONB

from zaphub_db.errors import ValidationError

INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1
# Deeper JSON is refused before it is encoded (PostgreSQL's own parser gives
# up near its stack limit, Python's json near its recursion limit).
MAX_JSON_DEPTH = 1000
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
    raise ValidationError(f"{field} must be a UUID, got {value!r}")


def choice(value: Any, allowed: type[StrEnum], field: str) -> str:
    """``value`` if it is one of ``allowed``'s values."""
    if isinstance(value, str) and value in allowed._value2member_map_:
        return str(value)
    listed = ", ".join(member.value for member in allowed)
    raise ValidationError(f"{field} must be one of {listed}; got {value!r}")


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
        raise ValidationError(f"{field} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValidationError(f"{field} must be between {minimum} and {maximum}, got {value}")
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
