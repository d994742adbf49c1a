"""How the SQLite sink writes times: fixed-width UTC text, so text order is time order."""

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from workers.sinks.sqlite import timestamp_text


@given(st.datetimes(min_value=datetime(1000, 1, 1)))
def test_timestamp_text_is_what_strftime_wrote(moment):
    aware = moment.replace(tzinfo=UTC)
    assert timestamp_text(aware) == aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert len(timestamp_text(aware)) == 27


def test_years_before_1000_keep_the_width():
    assert timestamp_text(datetime(999, 1, 2, 3, 4, 5, 6, UTC)) == "0999-01-02T03:04:05.000006Z"
    assert timestamp_text(datetime(999, 12, 31, tzinfo=UTC)) < timestamp_text(
        datetime(1000, 1, 1, tzinfo=UTC))
