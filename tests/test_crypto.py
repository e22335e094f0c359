"""zaphub_db.crypto: the keyring that seals auth state (no database needed)."""

import base64
import uuid

import pytest

from zaphub_db.crypto import (
    KEYS_VARIABLE,
    InvalidSealError,
    Keyring,
    associated_data,
    key_entry,
    new_key,
)
from zaphub_db.errors import ValidationError

SESSION = uuid.UUID("6f1c2a4e-0000-4000-8000-000000000001")
ROW = associated_data(SESSION, "pre-key", "17")


def test_a_sealed_value_opens_with_its_key_and_row() -> None:
    ring = Keyring({1: new_key()})
    for plaintext in (b"", b"\x00" * 3, bytes(range(256)), b"x" * 1_000_000):
        sealed = ring.seal(plaintext, ROW)
        assert plaintext not in sealed or plaintext == b""
        assert len(sealed) == len(plaintext) + 28
        assert ring.open(1, sealed, ROW) == plaintext


def test_two_seals_of_one_value_differ() -> None:
    ring = Keyring({1: new_key()})
    assert ring.seal(b"same", ROW) != ring.seal(b"same", ROW)


@pytest.mark.parametrize(
    "other_row",
    [
        associated_data(uuid.uuid4(), "pre-key", "17"),
        associated_data(SESSION, "session", "17"),
        associated_data(SESSION, "pre-key", "18"),
        # Without length prefixes these two would run together the same way.
        associated_data(SESSION, "pre-key1", "7"),
    ],
)
def test_a_value_moved_to_another_row_does_not_open(other_row: bytes) -> None:
    ring = Keyring({1: new_key()})
    with pytest.raises(InvalidSealError, match="fails authentication"):
        ring.open(1, ring.seal(b"secret", ROW), other_row)


def test_a_flipped_byte_anywhere_does_not_open() -> None:
    ring = Keyring({1: new_key()})
    sealed = ring.seal(b"secret value", ROW)
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(InvalidSealError):
            ring.open(1, bytes(tampered), ROW)


def test_a_wrong_key_or_an_unknown_key_id_does_not_open() -> None:
    sealed = Keyring({1: new_key()}).seal(b"secret", ROW)
    with pytest.raises(InvalidSealError, match="fails authentication with key 1"):
        Keyring({1: new_key()}).open(1, sealed, ROW)
    with pytest.raises(InvalidSealError, match="key 7, which the keyring lacks"):
        Keyring({1: new_key()}).open(7, sealed, ROW)
    with pytest.raises(InvalidSealError, match="shorter"):
        Keyring({1: new_key()}).open(1, sealed[:20], ROW)


def test_values_sealed_with_an_old_key_open_after_a_new_one_becomes_current() -> None:
    old, new = new_key(), new_key()
    before = Keyring({1: old})
    sealed = before.seal(b"creds", ROW)
    after = Keyring({1: old, 2: new}, current=2)
    assert after.open(1, sealed, ROW) == b"creds"
    assert after.current == 2
    assert after.open(2, after.seal(b"creds", ROW), ROW) == b"creds"


def test_from_env_reads_entries_the_first_one_current() -> None:
    old, new = new_key(), new_key()
    ring = Keyring.from_env(environ={KEYS_VARIABLE: f" {key_entry(5, new)} , {key_entry(3, old)}"})
    assert ring.current == 5
    assert ring.key_ids == {3, 5}
    assert ring.open(3, Keyring({3: old}).seal(b"v", ROW), ROW) == b"v"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "",
            "ZAPHUB_AUTH_KEYS is not set: set ZAPHUB_AUTH_KEYS to the line `zaphub-db auth generate-key`",
        ),
        ("   ", "is not set"),
        ("abc", "entry 1 of ZAPHUB_AUTH_KEYS is not id:base64key"),
        ("x:" + base64.b64encode(b"k" * 32).decode(), "no whole-number key id"),
        ("1:not base64!", "key 1 of ZAPHUB_AUTH_KEYS is not valid base64"),
        ("1:" + base64.b64encode(b"short").decode(), "must be 32 bytes"),
        ("0:" + base64.b64encode(b"k" * 32).decode(), "from 1 to 32767"),
        ("40000:" + base64.b64encode(b"k" * 32).decode(), "from 1 to 32767"),
        (
            f"{key_entry(1, b'k' * 32)},{key_entry(1, b'j' * 32)}",
            "key id 1 appears twice",
        ),
    ],
)
def test_a_bad_key_list_is_refused_saying_how_to_make_one(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("`", "`")):
        Keyring.from_env(environ={KEYS_VARIABLE: value})


def test_keyring_built_in_code_checks_its_arguments() -> None:
    with pytest.raises(ValidationError, match="at least one key"):
        Keyring({})
    with pytest.raises(ValidationError, match="needs current="):
        Keyring({1: new_key(), 2: new_key()})
    with pytest.raises(ValidationError, match="current key 3 is not in the keyring"):
        Keyring({1: new_key()}, current=3)
    with pytest.raises(ValidationError, match="must be 32 bytes"):
        Keyring({1: "a string"})  # type: ignore[dict-item]
    with pytest.raises(ValidationError, match="from 1 to 32767"):
        Keyring({True: new_key()})


def test_a_keyring_never_shows_its_keys() -> None:
    key = new_key()
    ring = Keyring({4: key})
    shown = repr(ring) + str(ring)
    assert shown == "<Keyring keys=[4] current=4><Keyring keys=[4] current=4>"
    assert base64.b64encode(key).decode() not in shown
