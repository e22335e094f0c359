"""zaphub_db.repositories.auth_state against a real database, on every face."""

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from tests.helpers import engine_of
from zaphub_db.crypto import Keyring, new_key
from zaphub_db.errors import AuthStateCorruptError, NotFoundError, ValidationError
from zaphub_db.models import AuthValue, WhatsAppSession
from zaphub_db.repositories import auth_state as repo
from zaphub_db.repositories.sessions import delete_session
from zaphub_db.testing.factories import AuthValueFactory, SessionFactory
from zaphub_db.testing.statements import recording


@pytest.fixture
def ring() -> Keyring:
    return Keyring({1: new_key()})


def stored(db: Session, session_id: uuid.UUID) -> dict[tuple[str, str], bytes]:
    rows = db.execute(
        text("SELECT category, key_id, value FROM auth_state WHERE session_id = :s"),
        {"s": session_id},
    )
    return {(row.category, row.key_id): bytes(row.value) for row in rows}


def test_bytes_round_trip_and_missing_ids_are_absent(db: Session, ring: Keyring) -> None:
    session: WhatsAppSession = SessionFactory.create()
    values = {
        "": b"",
        "nul": b"\x00\x00",
        "all": bytes(range(256)),
        "big": bytes(range(256)) * 4096,  # 1 MiB
        "ünïcode id": b'{"noiseKey": 1}',
    }
    repo.set_auth_values(db, ring, session.id, {"creds": values})
    got = repo.get_auth_values(db, ring, session.id, "creds", [*values, "missing"])
    assert got == values
    assert repo.get_auth_values(db, ring, str(session.id), "pre-key", list(values)) == {}
    assert repo.get_auth_values(db, ring, session.id, "creds", []) == {}


def test_values_are_sealed_at_rest_with_the_current_key(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    ring = Keyring({1: new_key(), 2: new_key()}, current=2)
    secret = b"noise key private half"
    repo.set_auth_values(db, ring, session.id, {"creds": {"": secret}})
    row = db.execute(
        text("SELECT value, key_version FROM auth_state WHERE session_id = :s"), {"s": session.id}
    ).one()
    assert secret not in bytes(row.value)
    assert row.key_version == 2


def test_none_deletes_and_a_value_overwrites(db: Session, ring: Keyring) -> None:
    session: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, session.id, {"pre-key": {"1": b"a", "2": b"b", "3": b"c"}})
    repo.set_auth_values(
        db, ring, session.id, {"pre-key": {"1": None, "2": b"B", "4": None}, "session": {"x": b"s"}}
    )
    assert repo.get_auth_values(db, ring, session.id, "pre-key", ["1", "2", "3", "4"]) == {
        "2": b"B",
        "3": b"c",
    }
    assert repo.get_auth_values(db, ring, session.id, "session", ["x"]) == {"x": b"s"}


def test_statements_per_call(db: Session, ring: Keyring) -> None:
    """get: one; set: one upsert and one delete per 10,000 values; clear: one."""
    session: WhatsAppSession = SessionFactory.create()
    engine = engine_of(db)
    upserts = {"pre-key": {str(i): b"k%d" % i for i in range(10_001)}}
    with recording(engine) as sent:
        repo.set_auth_values(db, ring, session.id, upserts)
    assert len(sent) == 2
    deletes: dict[str, dict[str, bytes | None]] = {
        "pre-key": dict.fromkeys(map(str, range(10_000)))
    }
    deletes["session"] = {"a": b"1"}
    with recording(engine) as sent:
        repo.set_auth_values(db, ring, session.id, deletes)
    assert len(sent) == 2
    with recording(engine) as sent:
        got = repo.get_auth_values(db, ring, session.id, "pre-key", ["9999", "10000"])
    assert (len(sent), got) == (1, {"10000": b"k10000"})
    with recording(engine) as sent:
        assert repo.clear_auth_state(db, session.id) == 2
    assert len(sent) == 1


def test_bad_input_is_refused_before_anything_is_written(db: Session, ring: Keyring) -> None:
    session: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, session.id, {"creds": {"": b"kept"}})
    bad_changes = [
        ({"creds": {"": b"new"}, "pre-key": {"1": "a str"}}, "must be bytes"),
        ({"creds": {"": b"new"}, "": {"1": b"x"}}, "category must not be empty"),
        ({"creds": {"": b"new"}, "c" * 65: {"1": b"x"}}, "at most 64"),
        ({"creds": {"": b"new", "k" * 256: b"x"}}, "at most 255"),
        ({"creds": {"": b"new", "a\x00b": b"x"}}, "NUL"),
        ({"creds": [b"new"]}, "must be a mapping"),
        ([("creds", {})], "changes must be a mapping"),
    ]
    for changes, message in bad_changes:
        with pytest.raises(ValidationError, match=message):
            repo.set_auth_values(db, ring, session.id, changes)  # type: ignore[arg-type]
    assert repo.get_auth_values(db, ring, session.id, "creds", [""]) == {"": b"kept"}
    with pytest.raises(ValidationError, match=r"never stored in clear.*generate-key"):
        repo.set_auth_values(db, None, session.id, {"creds": {"": b"x"}})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="never stored in clear"):
        repo.get_auth_values(db, None, session.id, "creds", [""])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not one string"):
        repo.get_auth_values(db, ring, session.id, "creds", "abc")
    with pytest.raises(ValidationError, match="session_id"):
        repo.get_auth_values(db, ring, "not-a-uuid", "creds", [""])


def test_a_set_for_a_missing_session_is_not_found(db: Session, ring: Keyring) -> None:
    savepoint = db.begin_nested()
    with pytest.raises(NotFoundError):
        repo.set_auth_values(db, ring, uuid.uuid4(), {"creds": {"": b"x"}})
    savepoint.rollback()


def test_a_ciphertext_moved_to_another_row_is_corrupt(db: Session, ring: Keyring) -> None:
    one: WhatsAppSession = SessionFactory.create()
    other: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, one.id, {"pre-key": {"1": b"one's", "2": b"two's"}})
    repo.set_auth_values(db, ring, other.id, {"pre-key": {"1": b"other's"}})
    # Within the session, to another key id; and to another session.
    moved = db.execute(
        text("SELECT value FROM auth_state WHERE session_id = :a AND key_id = '2'"), {"a": one.id}
    ).scalar_one()
    for target in (one.id, other.id):
        db.execute(
            text("UPDATE auth_state SET value = :v WHERE session_id = :s AND key_id = '1'"),
            {"v": moved, "s": target},
        )
    for session_id in (one.id, other.id):
        with pytest.raises(AuthStateCorruptError) as caught:
            repo.get_auth_values(db, ring, session_id, "pre-key", ["1"])
        error = caught.value
        assert (error.session_id, error.category, error.key_id, error.key_version) == (
            session_id,
            "pre-key",
            "1",
            1,
        )
        assert f"auth state of session {session_id}, pre-key '1' (key 1) is corrupt" in str(error)
    # The untouched value still reads.
    assert repo.get_auth_values(db, ring, one.id, "pre-key", ["2"]) == {"2": b"two's"}


def test_a_flipped_byte_is_corrupt(db: Session, ring: Keyring) -> None:
    session: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, session.id, {"creds": {"": b"credentials"}})
    db.execute(
        text(
            "UPDATE auth_state SET value = set_byte(value, 20, get_byte(value, 20) # 1) "
            "WHERE session_id = :s"
        ),
        {"s": session.id},
    )
    with pytest.raises(AuthStateCorruptError, match="fails authentication"):
        repo.get_auth_values(db, ring, session.id, "creds", [""])


def test_a_wrong_key_or_a_missing_key_id_is_corrupt(db: Session, ring: Keyring) -> None:
    session: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, session.id, {"creds": {"": b"credentials"}})
    with pytest.raises(AuthStateCorruptError, match="fails authentication with key 1"):
        repo.get_auth_values(db, Keyring({1: new_key()}), session.id, "creds", [""])
    with pytest.raises(AuthStateCorruptError, match="key 1, which the keyring lacks") as caught:
        repo.get_auth_values(db, Keyring({2: new_key()}), session.id, "creds", [""])
    assert caught.value.key_version == 1


def test_clear_auth_state_deletes_one_sessions_values(db: Session, ring: Keyring) -> None:
    one: WhatsAppSession = SessionFactory.create()
    other: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, one.id, {"creds": {"": b"1"}, "pre-key": {"1": b"2"}})
    repo.set_auth_values(db, ring, other.id, {"creds": {"": b"3"}})
    assert repo.clear_auth_state(db, one.id) == 2
    assert repo.clear_auth_state(db, one.id) == 0
    assert repo.get_auth_values(db, ring, other.id, "creds", [""]) == {"": b"3"}


def test_deleting_a_session_deletes_its_auth_state(db: Session, ring: Keyring) -> None:
    session: WhatsAppSession = SessionFactory.create()
    repo.set_auth_values(db, ring, session.id, {"creds": {"": b"1"}})
    loaded: AuthValue = AuthValueFactory.create(session=session)
    assert delete_session(db, session.id)
    assert stored(db, session.id) == {}
    assert loaded not in db, "the Session drops what it held of the deleted session"


def test_the_factory_seals_with_the_plugins_keyring(db: Session, zaphub_keyring: Keyring) -> None:
    value: AuthValue = AuthValueFactory.create(category="creds", key_id="", plaintext=b"c")
    more: AuthValue = AuthValueFactory.create(session_id=value.session_id)
    got = repo.get_auth_values(db, zaphub_keyring, value.session_id, "creds", [""])
    assert got == {"": b"c"}
    got = repo.get_auth_values(db, zaphub_keyring, value.session_id, "pre-key", [more.key_id])
    assert list(got) == [more.key_id]
    assert got[more.key_id].startswith(b"pre-key material ")
    assert "value" not in repr(value)
    assert "creds" in repr(value)


def test_rotation_reseals_every_value_under_the_current_key(db: Session) -> None:
    old_key, current_key = new_key(), new_key()
    old = Keyring({1: old_key})
    session: WhatsAppSession = SessionFactory.create()
    other: WhatsAppSession = SessionFactory.create()
    values = {str(i): b"v%d" % i for i in range(25)}
    repo.set_auth_values(db, old, session.id, {"pre-key": values})
    repo.set_auth_values(db, old, other.id, {"creds": {"": b"c"}})
    both = Keyring({1: old_key, 2: current_key}, current=2)
    assert repo.count_stale_auth_values(db, both) == 26
    after = None
    batches = 0
    while True:
        batch = repo.rotate_auth_keys(db, both, batch_size=10, after=after)
        batches += 1
        assert batch.rotated == batch.read
        if batch.last is None:
            break
        after = batch.last
    assert batches == 3
    assert repo.count_stale_auth_values(db, both) == 0
    only_new = Keyring({2: current_key})
    assert repo.get_auth_values(db, only_new, session.id, "pre-key", list(values)) == values
    assert repo.get_auth_values(db, only_new, other.id, "creds", [""]) == {"": b"c"}
