"""zaphub_db.repositories.ownership on one connection, on every face: leases, tokens, fences."""

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from zaphub_db.crypto import Keyring, new_key
from zaphub_db.errors import NotFoundError, OwnershipLostError, ValidationError
from zaphub_db.models import WhatsAppSession
from zaphub_db.repositories import auth_state, ownership, sessions
from zaphub_db.testing.factories import SessionFactory

RING = Keyring({1: new_key()})


def lapse(db: Session, session_id: uuid.UUID) -> None:
    """Make the session's lease lapse (now() is the test transaction's start)."""
    db.execute(
        text("UPDATE sessions SET owner_expires_at = now() - interval '1 second' WHERE id = :s"),
        {"s": session_id},
    )


def token_of(db: Session, session_id: uuid.UUID) -> int:
    found: int = db.execute(
        text("SELECT owner_token FROM sessions WHERE id = :s"), {"s": session_id}
    ).scalar_one()
    return found


def test_acquire_renew_release(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    now = db.execute(text("SELECT now()")).scalar_one()
    held = ownership.acquire_session(db, session.id, node="node-a", lease=timedelta(seconds=20))
    assert held is not None
    assert (held.session_id, held.node, held.token) == (session.id, "node-a", 1)
    assert held.expires_at == now + timedelta(seconds=20)
    assert ownership.acquire_session(db, str(session.id), node="node-b") is None
    assert ownership.renew_session(db, held, lease=timedelta(minutes=2))
    assert ownership.owned_sessions(db, "node-a")[0].expires_at == now + timedelta(minutes=2)
    assert ownership.release_session(db, held)
    assert ownership.owned_sessions(db, "node-a") == []
    assert not ownership.renew_session(db, held), "a released ownership is not renewed"
    assert not ownership.release_session(db, held)
    taken = ownership.acquire_session(db, session.id, node="node-b")
    assert taken is not None
    assert taken.token == 2


def test_a_lapsed_lease_is_taken_over_and_every_acquisition_grows_the_token(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    first = ownership.acquire_session(db, session.id, node="node-a")
    assert first is not None
    again = ownership.acquire_session(db, session.id, node="node-a")
    assert again is not None
    assert again.token == first.token + 1
    lapse(db, session.id)
    assert ownership.owned_sessions(db, "node-a") == []
    taken = ownership.acquire_session(db, session.id, node="node-b")
    assert taken is not None
    assert taken.token == first.token + 2
    assert not ownership.renew_session(db, again), "the old owner's renewal fails"
    assert [o.session_id for o in ownership.owned_sessions(db, "node-b")] == [session.id]


def test_acquiring_a_missing_session_is_not_found(db: Session) -> None:
    with pytest.raises(NotFoundError):
        ownership.acquire_session(db, uuid.uuid4(), node="node-a")


def test_a_stale_owners_writes_are_refused_and_change_nothing(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create(label="before")
    stale = ownership.acquire_session(db, session.id, node="node-a")
    assert stale is not None
    auth_state.set_auth_values(db, RING, session.id, {"creds": {"": b"a's"}}, ownership=stale)
    lapse(db, session.id)
    current = ownership.acquire_session(db, session.id, node="node-b")
    assert current is not None
    with pytest.raises(OwnershipLostError) as caught:
        auth_state.set_auth_values(
            db, RING, session.id, {"creds": {"": b"stale"}, "pre-key": {"1": None}}, ownership=stale
        )
    assert (caught.value.token, caught.value.current_token) == (stale.token, current.token)
    with pytest.raises(OwnershipLostError):
        auth_state.set_auth_values(db, RING, session.id, {"pre-key": {"1": None}}, ownership=stale)
    with pytest.raises(OwnershipLostError):
        auth_state.clear_auth_state(db, session.id, ownership=stale)
    with pytest.raises(OwnershipLostError, match="no longer owned under token 1"):
        sessions.update_session(db, session.id, ownership=stale, label="stale", status="connected")
    db.expire_all()
    assert auth_state.get_auth_values(db, RING, session.id, "creds", [""]) == {"": b"a's"}
    assert sessions.get_session_by_id(db, session.id).label == "before"  # type: ignore[union-attr]
    # The current owner writes.
    auth_state.set_auth_values(db, RING, session.id, {"creds": {"": b"b's"}}, ownership=current)
    updated = sessions.update_session(db, session.id, ownership=current, label="after")
    assert updated is not None
    assert updated.label == "after"
    assert auth_state.clear_auth_state(db, session.id, ownership=current) == 1


def test_a_lapsed_lease_nobody_took_over_still_writes(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    held = ownership.acquire_session(db, session.id, node="node-a")
    assert held is not None
    lapse(db, session.id)
    auth_state.set_auth_values(db, RING, session.id, {"creds": {"": b"late"}}, ownership=held)
    assert ownership.renew_session(db, held)
    assert auth_state.get_auth_values(db, RING, session.id, "creds", [""]) == {"": b"late"}


def test_a_fenced_write_for_a_missing_session_or_of_another_session_is_refused(
    db: Session,
) -> None:
    one: WhatsAppSession = SessionFactory.create()
    other: WhatsAppSession = SessionFactory.create()
    held = ownership.acquire_session(db, one.id, node="node-a")
    assert held is not None
    with pytest.raises(ValidationError, match="the ownership is of session"):
        auth_state.set_auth_values(db, RING, other.id, {"creds": {"": b"x"}}, ownership=held)
    with pytest.raises(ValidationError, match="must be an Ownership"):
        sessions.update_session(db, one.id, ownership="token 1", label="x")  # type: ignore[arg-type]
    assert sessions.update_session(db, uuid.uuid4(), label="x") is None
    db.execute(text("DELETE FROM sessions WHERE id = :s"), {"s": one.id})
    with pytest.raises(NotFoundError):
        auth_state.set_auth_values(db, RING, one.id, {"creds": {"": b"x"}}, ownership=held)
    assert sessions.update_session(db, one.id, ownership=held, label="x") is None


def test_acquire_sessions_takes_the_free_assignable_ones(db: Session) -> None:
    free = [
        SessionFactory.create(status=status) for status in ("initializing", "connected", "failed")
    ]
    for status in ("disabled", "logged_out"):
        SessionFactory.create(status=status)
    held_elsewhere: WhatsAppSession = SessionFactory.create()
    assert ownership.acquire_session(db, held_elsewhere.id, node="node-b") is not None
    lapsed: WhatsAppSession = SessionFactory.create()
    assert ownership.acquire_session(db, lapsed.id, node="node-c") is not None
    lapse(db, lapsed.id)
    among = [s.id for s in free] + [lapsed.id, held_elsewhere.id]
    taken = ownership.acquire_sessions(db, node="node-a", limit=10, among=among)
    # Assignable among those: 5; nodes in play: node-a and node-b (node-c's
    # lease lapsed): a share of 3.
    assert [o.session_id for o in taken] == [free[0].id, free[1].id, free[2].id]
    assert {o.token for o in taken} == {1}
    more = ownership.acquire_sessions(db, node="node-a", limit=10, among=among)
    assert more == [], "node-a holds its share"
    lone = ownership.acquire_sessions(db, node="node-d", limit=1, among=[lapsed.id])
    assert [(o.session_id, o.token) for o in lone] == [(lapsed.id, 2)]
    assert ownership.acquire_sessions(db, node="node-a", limit=0) == []


def test_owned_sessions_and_owners(db: Session) -> None:
    db.execute(text("UPDATE sessions SET owner_node = NULL, owner_expires_at = NULL"))
    a: WhatsAppSession = SessionFactory.create()
    b: WhatsAppSession = SessionFactory.create()
    held_a = ownership.acquire_session(db, a.id, node="node-a")
    held_b = ownership.acquire_session(db, b.id, node="node-b")
    assert ownership.owned_sessions(db, "node-a") == [held_a]
    lapse(db, b.id)
    assert ownership.owned_sessions(db, "node-b") == []
    owners = ownership.session_owners(db)
    assert [o.session_id for o in owners] == [a.id, b.id]
    assert held_b is not None
    assert owners[1].token == held_b.token


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda db, s: ownership.acquire_session(db, s, node=""), "must be a string|not be empty"),
        (lambda db, s: ownership.acquire_session(db, s, node="  "), "not be empty"),
        (lambda db, s: ownership.acquire_session(db, s, node="n" * 256), "at most 255"),
        (lambda db, s: ownership.acquire_session(db, s, node=7), "must be a string"),  # type: ignore[arg-type]
        (
            lambda db, s: ownership.acquire_session(db, s, node="a", lease=timedelta(0)),
            "longer than zero",
        ),
        (lambda db, s: ownership.acquire_session(db, s, node="a", lease=30), "must be a timedelta"),  # type: ignore[arg-type]
        (lambda db, s: ownership.acquire_sessions(db, node="a", limit=-1), "limit"),
        (
            lambda db, s: ownership.acquire_sessions(db, node="a", limit=1, among=str(s)),
            "not one string",
        ),
        (lambda db, s: ownership.acquire_sessions(db, node="a", limit=1, among=["x"]), "among"),
        (lambda db, s: ownership.renew_session(db, s), "must be an Ownership"),
    ],
)
def test_bad_arguments_are_refused(db: Session, call, message: str) -> None:  # type: ignore[no-untyped-def]
    session: WhatsAppSession = SessionFactory.create()
    with pytest.raises(ValidationError, match=message):
        call(db, session.id)
    assert token_of(db, session.id) == 0


def test_ownership_changes_leave_updated_at_alone(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    # An hour ago, past the trigger (which would keep it at now()).
    db.execute(text("SET LOCAL session_replication_role = replica"))
    db.execute(
        text("UPDATE sessions SET updated_at = now() - interval '1 hour' WHERE id = :s"),
        {"s": session.id},
    )
    db.execute(text("SET LOCAL session_replication_role = origin"))

    def updated_at() -> object:
        return db.execute(
            text("SELECT updated_at FROM sessions WHERE id = :s"), {"s": session.id}
        ).scalar_one()

    before = updated_at()
    held = ownership.acquire_session(db, session.id, node="node-a")
    assert held is not None
    assert ownership.renew_session(db, held)
    assert ownership.release_session(db, held)
    assert ownership.acquire_sessions(db, node="node-b", limit=1, among=[session.id])
    assert updated_at() == before, "a lease is not a change of the session"
    sessions.update_session(db, session.id, status="connected")
    assert updated_at() != before
