"""The statement catalogue: docs/statements.sql is every statement the repositories
build once, as psycopg sends it, so that a change to one shows as a diff of SQL."""

from __future__ import annotations

from tests.processes import ROOT
from zaphub_db.repositories import catalogue, queue

CATALOGUE = ROOT / "docs" / "statements.sql"


def test_docs_statements_sql_is_the_catalogue_of_this_code() -> None:
    expected = catalogue.render()
    assert CATALOGUE.read_text() == expected, (
        "docs/statements.sql is out of date: python -m zaphub_db.repositories.catalogue "
        "> docs/statements.sql, then review the diff"
    )


def test_the_catalogue_holds_each_claim_variant_and_the_hot_statements() -> None:
    names = catalogue.statements()
    claims = [name for name in names if name.startswith("queue.claim_statement(")]
    assert len(claims) == 8
    for hot in (
        "messages._CREATE",
        "bulk._BULK_INSERT",
        "queue._MARK_SENT",
        "enqueuer._INSERT",
    ):
        assert hot in names
    # A claim's text is what the queue sends: the same compiled statement.
    statement = queue.claim_statement(ordered=True, limited=False, one_session=True).statement
    rendered = catalogue.sql(statement)
    assert "SKIP LOCKED" in rendered
    assert rendered in CATALOGUE.read_text()
