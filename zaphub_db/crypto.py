"""Encryption at rest of auth state: a :class:`Keyring` of AES-256-GCM keys.

Each value is sealed with the keyring's current key and a fresh random
nonce, and with *associated data* naming the row it belongs to (the
session, the category and the key id): a value copied onto another row,
a flipped byte or a wrong key fail authentication instead of decrypting to
garbage. A sealed value is ``nonce (12 bytes) || ciphertext || tag (16
bytes)``; the id of the key that sealed it is stored beside it
(``auth_state.key_version``), so that values written under an older key
still open while ``zaphub-db auth rotate-keys`` re-seals them.

Keys come from ``ZAPHUB_AUTH_KEYS`` (:meth:`Keyring.from_env`): a
comma-separated list of ``id:base64key``, the first one current, e.g.
``2:<new key>,1:<old key>`` during a rotation. ``zaphub-db auth
generate-key`` prints a new entry. The AEAD itself is the ``cryptography``
package's ``AESGCM``; it is imported when a keyring is built, not when this
module is.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from zaphub_db.errors import ValidationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEYS_VARIABLE = "ZAPHUB_AUTH_KEYS"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random, so at most ~2**32 seals per key is safe
TAG_BYTES = 16
# Key ids go in auth_state.key_version, a smallint with CHECK (key_version > 0).
MAX_KEY_ID = 32767
# Changes if the associated data's layout ever does, so old and new never mix.
_AAD_PREFIX = b"zaphub-db auth_state v1\x00"

_HOW_TO_MAKE_ONE = (
    f"set {KEYS_VARIABLE} to the line `zaphub-db auth generate-key` prints "
    "(id:base64key; several comma-separated, the first one current)"
)


class InvalidSealError(Exception):
    """A sealed value failed authentication, or names a key the keyring lacks.

    Internal: the repositories turn it into ``AuthStateCorruptError`` naming
    the row.
    """


def associated_data(session_id: uuid.UUID, category: str, key_id: str) -> bytes:
    """The associated data that binds a value to its row (length-prefixed, unambiguous)."""
    parts = [part.encode() for part in (category, key_id)]
    return b"".join(
        [_AAD_PREFIX, session_id.bytes, *(len(p).to_bytes(4, "big") + p for p in parts)]
    )


def new_key() -> bytes:
    """32 random bytes from the operating system: a new AES-256 key."""
    return secrets.token_bytes(KEY_BYTES)


def key_entry(key_id: int, key: bytes) -> str:
    """One ``id:base64key`` entry of ``ZAPHUB_AUTH_KEYS``."""
    return f"{key_id}:{base64.b64encode(key).decode()}"


class Keyring:
    """The AES-256-GCM keys that seal auth state, by id, and which one is current.

    ``Keyring({1: old_key, 2: new_key}, current=2)`` builds one in code;
    :meth:`from_env` reads ``ZAPHUB_AUTH_KEYS``. Key ids are whole numbers
    from 1 to 32767; each key is 32 bytes. New values are sealed with the
    current key; a value sealed with any key of the ring opens. The keys
    never appear in ``repr`` or in an error.
    """

    def __init__(self, keys: Mapping[int, bytes], *, current: int | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise ValidationError(f"a keyring needs at least one key: {_HOW_TO_MAKE_ONE}")
        self._ciphers: dict[int, AESGCM] = {}
        for key_id, key in keys.items():
            _check_id(key_id)
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ValidationError(
                    f"key {key_id} of the keyring must be {KEY_BYTES} bytes (AES-256), "
                    f"not {len(key) if isinstance(key, bytes) else type(key).__name__}"
                )
            self._ciphers[key_id] = AESGCM(key)
        if current is None:
            if len(keys) > 1:
                raise ValidationError(
                    "a keyring of several keys needs current= (the id that seals new values)"
                )
            current = next(iter(keys))
        if current not in self._ciphers:
            raise ValidationError(f"current key {current!r} is not in the keyring")
        self.current = current

    @classmethod
    def from_env(
        cls, variable: str = KEYS_VARIABLE, environ: Mapping[str, str] | None = None
    ) -> Keyring:
        """The keyring of ``ZAPHUB_AUTH_KEYS`` (``id:base64key,...``, the first one current).

        Raises ``ValidationError`` when it is unset, empty or malformed,
        saying how to make a key.
        """
        value = (os.environ if environ is None else environ).get(variable, "").strip()
        if not value:
            raise ValidationError(f"{variable} is not set: {_HOW_TO_MAKE_ONE}")
        return cls.parse(value, source=variable)

    @classmethod
    def parse(cls, entries: str, *, source: str = KEYS_VARIABLE) -> Keyring:
        """A keyring from ``id:base64key,...`` text, the first entry current."""
        keys: dict[int, bytes] = {}
        for number, entry in enumerate(entries.split(","), start=1):
            key_id_text, colon, encoded = entry.strip().partition(":")
            if not colon:
                raise ValidationError(
                    f"entry {number} of {source} is not id:base64key: {_HOW_TO_MAKE_ONE}"
                )
            try:
                key_id = int(key_id_text)
            except ValueError:
                raise ValidationError(
                    f"entry {number} of {source} has no whole-number key id before ':'"
                ) from None
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ValidationError(
                    f"key {key_id} of {source} is not valid base64: {_HOW_TO_MAKE_ONE}"
                ) from None
            if key_id in keys:
                raise ValidationError(f"key id {key_id} appears twice in {source}")
            keys[key_id] = key
            if number == 1:
                current = key_id
        return cls(keys, current=current)

    @property
    def key_ids(self) -> frozenset[int]:
        """The ids of the keys in the ring."""
        return frozenset(self._ciphers)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated with the current key."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._ciphers[self.current].encrypt(nonce, plaintext, associated)

    def open(self, key_id: int, sealed: bytes, associated: bytes) -> bytes:
        """The plaintext of a value sealed with key ``key_id``; :class:`InvalidSealError` if it
        fails authentication or the ring lacks that key."""
        from cryptography.exceptions import InvalidTag

        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise InvalidSealError(f"sealed with key {key_id}, which the keyring lacks")
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise InvalidSealError("shorter than a nonce and a tag")
        try:
            return cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
        except InvalidTag:
            raise InvalidSealError(
                f"fails authentication with key {key_id} (tampered, moved from another row, "
                "or sealed with a different key of the same id)"
            ) from None

    def __repr__(self) -> str:
        return f"<Keyring keys={sorted(self._ciphers)} current={self.current}>"


def _check_id(key_id: object) -> None:
    if isinstance(key_id, bool) or not isinstance(key_id, int) or not 1 <= key_id <= MAX_KEY_ID:
        raise ValidationError(f"a key id is a whole number from 1 to {MAX_KEY_ID}, not {key_id!r}")
