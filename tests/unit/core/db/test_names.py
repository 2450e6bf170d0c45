from datetime import date, datetime, timedelta, timezone
from itertools import pairwise

import pytest

from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.names import (
    ColumnKind,
    Period,
    Range,
    bound_literal,
    covering,
    fit_identifier,
    floor,
    parse_bound,
    parse_bound_day,
    partition_name,
    window,
)


def test_floor_each_period() -> None:
    d = date(2024, 2, 29)  # leap day, a Thursday
    assert floor(d, Period.DAY) == d
    assert floor(d, Period.WEEK) == date(2024, 2, 26)
    assert floor(d, Period.MONTH) == date(2024, 2, 1)
    assert floor(d, Period.QUARTER) == date(2024, 1, 1)
    assert floor(d, Period.YEAR) == date(2024, 1, 1)


def test_floor_converts_aware_datetimes_to_utc() -> None:
    chicago_new_year = datetime(2023, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-6)))
    assert floor(chicago_new_year, Period.MONTH) == date(2024, 1, 1)


def test_window_crosses_year_end_and_month_lengths() -> None:
    got = window(date(2024, 1, 31), Period.MONTH, past=2, future=1)
    assert [r.start for r in got] == [date(2023, 11, 1), date(2023, 12, 1), date(2024, 1, 1), date(2024, 2, 1)]
    assert got[-1].end == date(2024, 3, 1)
    assert all(a.end == b.start for a, b in pairwise(got))


def test_covering_includes_both_ends() -> None:
    got = covering(date(2024, 3, 15), date(2024, 5, 1), Period.MONTH)
    assert [r.start.month for r in got] == [3, 4, 5]


def test_bound_literals_are_utc() -> None:
    assert bound_literal(date(2024, 3, 10), ColumnKind.TIMESTAMPTZ) == "2024-03-10 00:00:00+00:00"
    assert bound_literal(date(2024, 3, 10), ColumnKind.TIMESTAMP) == "2024-03-10 00:00:00"
    assert bound_literal(date(2024, 3, 10), ColumnKind.DATE) == "2024-03-10"


def test_partition_names_and_63_byte_limit() -> None:
    assert partition_name("activities", date(2024, 1, 1), Period.MONTH) == "activities_202401"
    assert partition_name("activities", date(2024, 4, 1), Period.QUARTER) == "activities_2024q2"
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    na = partition_name(long_a, date(2024, 1, 1), Period.DAY)
    nb = partition_name(long_b, date(2024, 1, 1), Period.DAY)
    assert len(na.encode()) <= 63 and len(nb.encode()) <= 63
    assert na != nb and na.endswith("_20240101")
    assert partition_name(long_a, date(2024, 1, 1), Period.DAY) == na  # deterministic
    utf = fit_identifier("é" * 40, "_202401")
    assert len(utf.encode()) <= 63
    utf.encode().decode()  # still valid UTF-8


def test_parse_bound_variants() -> None:
    assert parse_bound("DEFAULT") is None
    frm, to = parse_bound("FOR VALUES FROM ('2023-12-31 18:00:00-06') TO ('2024-01-31 18:00:00-06')")  # type: ignore[misc]
    assert parse_bound_day(frm) == date(2024, 1, 1)
    assert parse_bound_day(to) == date(2024, 2, 1)
    with pytest.raises(InvalidInputError):
        parse_bound("FOR VALUES IN (1)")


def test_period_parse_error_lists_choices() -> None:
    with pytest.raises(InvalidInputError, match="day, week, month, quarter, year"):
        Period.parse("fortnight")


def test_range_labels() -> None:
    assert Range(date(2024, 1, 1), date(2024, 2, 1)).label(Period.MONTH) == "2024-01"
    assert Range(date(2024, 4, 1), date(2024, 7, 1)).label(Period.QUARTER) == "2024-Q2"
