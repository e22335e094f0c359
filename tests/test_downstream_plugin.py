"""The test kit as a downstream project uses it: only the plugin and the factories."""

import textwrap

import pytest

DOWNSTREAM_TESTS = textwrap.dedent(
    """
    from sqlalchemy import text

    from zaphub_db.repositories import create_message, get_messages_by_session
    from zaphub_db.testing.factories import EventFactory, MessageFactory, SessionFactory

    pytest_plugins = ["zaphub_db.testing.pytest_plugin"]


    def test_factories_write_valid_rows(zaphub_session):
        message: Message = MessageFactory.create()
        assert message.jid.endswith("@s.whatsapp.net")
        assert message.session_id is not None
        event: Event = EventFactory.create(session=None)
        assert event.session_id is None
        session: WhatsAppSession = SessionFactory.create(status="connected")
        create_message(zaphub_session, session_id=session.id, message_id="a",
                       jid="5534999999999@s.whatsapp.net", type="text", payload={"text": "x"})
        assert len(get_messages_by_session(zaphub_session, session.id)) == 1


    def test_work_is_rolled_back_between_tests(zaphub_session):
        assert zaphub_session.execute(text("SELECT count(*) FROM sessions")).scalar() == 0
        SessionFactory.create()
        zaphub_session.commit()  # even committed work is undone afterwards


    def test_still_empty(zaphub_session):
        assert zaphub_session.execute(text("SELECT count(*) FROM sessions")).scalar() == 0


    def test_the_schema_comes_from_the_migrations(zaphub_engine):
        with zaphub_engine.connect() as connection:
            count = connection.execute(text("SELECT count(*) FROM migration_history")).scalar()
        assert count >= 5
    """
)


def test_downstream_suite_runs_with_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_downstream=DOWNSTREAM_TESTS)
    # A separate process: the plugin makes (and drops) its own database there.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


DOWNSTREAM_ASYNC_TESTS = textwrap.dedent(
    """
    from sqlalchemy import text

    from zaphub_db import aio

    pytest_plugins = ["zaphub_db.testing.pytest_plugin"]


    async def test_an_unmarked_async_test_runs_and_reads_after_commit(zaphub_async_session):
        db = zaphub_async_session
        session = await aio.create_session(db, label="async downstream")
        await db.commit()
        assert session.label == "async downstream"  # no lazy load after the commit
        assert len(await aio.get_all_sessions(db)) == 1


    async def test_async_work_is_rolled_back_too(zaphub_async_session):
        count = (await zaphub_async_session.execute(text("SELECT count(*) FROM sessions")))
        assert count.scalar() == 0
    """
)
# The README's "Testing your own code" configuration, as a downstream project writes it.
DOWNSTREAM_PYTEST_CONFIG = textwrap.dedent(
    """
    [tool.pytest.ini_options]
    asyncio_mode = "auto"
    asyncio_default_fixture_loop_scope = "session"
    asyncio_default_test_loop_scope = "session"
    """
)


def test_downstream_async_suite_runs_as_the_readme_configures_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makefile(".toml", pyproject=DOWNSTREAM_PYTEST_CONFIG)
    pytester.makepyfile(test_downstream_async=DOWNSTREAM_ASYNC_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    output = result.stdout.str() + result.stderr.str()
    assert "unset" not in output  # pytest-asyncio warns when a loop scope is unset


def test_factories_need_a_bound_session() -> None:
    from zaphub_db.testing import factories

    factories.bind_session(None)
    with pytest.raises(RuntimeError, match="zaphub_session"):
        factories.SessionFactory.create()
