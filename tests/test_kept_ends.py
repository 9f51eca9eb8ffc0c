"""An answer's end that went out while Redis was away, kept in the database for the takeover of its stream
(services/callback/kept_ends.py), on real MariaDB. What the takeover does with it: tests/test_replicas.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from services.auth.db import make_engine
from services.callback.kept_ends import KeptEnds, wecom_kept_ends
from services.chat.spool_rows import utc_now

END = {"note": "the rest was sent separately", "close_reason": "separately", "closed_bytes": "7"}


@pytest.fixture
def engine(mysql_url):
    engine = make_engine(mysql_url)
    wecom_kept_ends.drop(engine, checkfirst=True)  # made by the first end kept, as in a serving process
    yield engine
    engine.dispose()


def test_an_end_is_found_by_its_bot_and_stream_and_a_second_keep_changes_nothing(engine):
    ends, other_bot = KeptEnds(engine, "sales"), KeptEnds(engine, "support")
    assert ends.find("s1") is None  # no table yet: none kept
    ends.keep("s1", "done", END)
    ends.keep("s1", "error", {"note": "a later try"})  # the same post's end, kept once
    assert ends.find("s1") == ("done", END)
    assert other_bot.find("s1") is None and ends.find("s2") is None


def test_an_end_older_than_a_takeover_could_come_is_swept_when_another_is_kept(engine):
    ends = KeptEnds(engine, "sales")
    ends.keep("old", "done", END)
    with engine.begin() as connection:
        connection.execute(update(wecom_kept_ends).values(kept_at=utc_now() - timedelta(minutes=11)))
    ends.keep("new", "done", END)
    assert ends.find("old") is None and ends.find("new") == ("done", END)


def test_a_database_that_does_not_answer_keeps_and_finds_nothing_and_raises_nothing(caplog):
    ends = KeptEnds(make_engine("mysql+pymysql://gw:secret-pw@127.0.0.1:1/gw"), "sales")
    ends.keep("s1", "done", END)
    assert ends.find("s1") is None
    assert "could not keep the answer's end" in caplog.text and "secret-pw" not in caplog.text
