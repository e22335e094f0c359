"""factory_boy factories for the zaphub_db models.

They write through the Session bound with :func:`bind_session`; the pytest
plugin binds them to ``zaphub_session`` for each test. Rows are valid: real
JID shapes, allowed statuses, unique idempotency keys.

    message = MessageFactory()                   # with a new session
    message = MessageFactory(session=existing)   # in a given session
    value = AuthValueFactory(session=existing, category="creds", key_id="",
                             plaintext=b"...")   # sealed with factory_keyring()
    delivery = WebhookDeliveryFactory(session=existing)  # queued, to its webhook_url
"""

import functools
import itertools
from typing import Any

from factory.alchemy import SQLAlchemyModelFactory
from factory.declarations import LazyAttribute, LazyFunction, SelfAttribute, Sequence, SubFactory
from sqlalchemy.orm import Session

from zaphub_db.crypto import Keyring, associated_data, new_key
from zaphub_db.models import (
    AuthValue,
    Event,
    GlobalEvent,
    Message,
    WebhookDelivery,
    WhatsAppSession,
)
from zaphub_db.repositories import layout

_current: Session | None = None
_phone_numbers = itertools.count(5534900000001)


def bind_session(session: Session | None) -> None:
    """Make the factories write through ``session`` (``None`` unbinds them)."""
    global _current
    _current = session


def _bound_session() -> Session:
    if _current is None:
        raise RuntimeError(
            "zaphub_db factories are not bound to a Session: use the zaphub_session "
            "fixture, or call zaphub_db.testing.factories.bind_session(session)"
        )
    return _current


class _Base(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_factory = _bound_session
        sqlalchemy_session_persistence = "flush"


class SessionFactory(_Base):
    """A WhatsApp session (``sessions`` row)."""

    class Meta:
        model = WhatsAppSession

    label = Sequence(lambda n: f"Test session {n}")
    status = "initializing"
    webhook_url = Sequence(lambda n: f"https://app.example.com/webhooks/{n}")
    config = LazyFunction(lambda: {"autoReply": False})


def _jid(_: Any) -> str:
    return f"{next(_phone_numbers)}@s.whatsapp.net"


class MessageFactory(_Base):
    """An outbound text message, queued, in a new session unless ``session`` is given."""

    class Meta:
        model = Message
        exclude = ("session",)

    session = SubFactory(SessionFactory)
    session_id = SelfAttribute("session.id")
    message_id = Sequence(lambda n: f"client-msg-{n:06d}")
    direction = "outbound"
    jid = LazyAttribute(_jid)
    type = "text"
    payload = Sequence(lambda n: {"text": f"Hello #{n}"})
    status = "queued"


class EventFactory(_Base):
    """An info ``connection.open`` event, in a new session unless ``session`` is given."""

    class Meta:
        model = Event
        exclude = ("session",)

    session = SubFactory(SessionFactory)
    # EventFactory(session=None) makes a global event.
    session_id = LazyAttribute(lambda o: None if o.session is None else o.session.id)
    event_type = "connection.open"
    event_category = "connection"
    payload = LazyFunction(dict)
    severity = "info"

    @classmethod
    def _create(cls, model_class: Any, *args: Any, **kwargs: Any) -> Any:
        # On the distributed layout a global event is a GlobalEvent
        # (global_events): a distributed table holds no NULL session_id.
        if kwargs.get("session_id") is None and layout.distributed(_bound_session()):
            model_class = GlobalEvent
        return super()._create(model_class, *args, **kwargs)


class WebhookDeliveryFactory(_Base):
    """A queued webhook delivery to its session's ``webhook_url``, in a new session unless
    ``session`` is given."""

    class Meta:
        model = WebhookDelivery
        exclude = ("session",)

    session = SubFactory(SessionFactory)
    session_id = SelfAttribute("session.id")
    url = LazyAttribute(lambda o: o.session.webhook_url or "https://app.example.com/webhooks")
    event_type = "message.received"
    payload = Sequence(lambda n: {"event": "message.received", "n": n})
    status = "queued"


@functools.cache
def factory_keyring() -> Keyring:
    """The keyring the factories seal auth state with: one random key per process
    (the ``zaphub_keyring`` fixture), never a key of any real deployment."""
    return Keyring({1: new_key()})


class AuthValueFactory(_Base):
    """A ``pre-key`` value of a session's auth state, sealed with :func:`factory_keyring`
    (or ``keyring=``); ``plaintext`` is what ``get_auth_values`` gives back."""

    class Meta:
        model = AuthValue
        exclude = ("session",)

    class Params:
        plaintext = Sequence(lambda n: f"pre-key material {n}".encode())
        keyring = LazyFunction(factory_keyring)

    session = SubFactory(SessionFactory)
    session_id = SelfAttribute("session.id")
    category = "pre-key"
    key_id = Sequence(str)
    key_version = LazyAttribute(lambda o: o.keyring.current)
    value = LazyAttribute(
        lambda o: o.keyring.seal(o.plaintext, associated_data(o.session_id, o.category, o.key_id))
    )
