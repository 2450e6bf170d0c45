"""Partition periods, bounds and names.

Bounds are computed in UTC calendar arithmetic (dateutil ``relativedelta``), never in the session's time zone:
a month partition of a ``timestamptz`` column starts at midnight UTC on the 1st, whatever ``TimeZone`` the
connection uses, so DST transitions and month ends never shift or overlap ranges.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from enum import Enum

from dateutil.relativedelta import relativedelta

from pg_partition.core.db.errors import InvalidInputError

MAX_IDENTIFIER_BYTES = 63


class Period(str, Enum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    QUARTER = "quarter"
    YEAR = "year"

    @classmethod
    def parse(cls, value: str | Period) -> Period:
        try:
            return cls(str(value.value if isinstance(value, Period) else value).lower())
        except ValueError:
            raise InvalidInputError(
                f"unknown period {value!r}",
                fix="use one of: " + ", ".join(p.value for p in cls),
            ) from None

    @property
    def step(self) -> relativedelta:
        return {
            Period.DAY: relativedelta(days=1),
            Period.WEEK: relativedelta(weeks=1),
            Period.MONTH: relativedelta(months=1),
            Period.QUARTER: relativedelta(months=3),
            Period.YEAR: relativedelta(years=1),
        }[self]


class ColumnKind(str, Enum):
    """How bounds are written for the partition column's type."""

    TIMESTAMPTZ = "timestamp with time zone"
    TIMESTAMP = "timestamp without time zone"
    DATE = "date"

    @classmethod
    def from_type(cls, type_name: str) -> ColumnKind | None:
        """``format_type()`` text -> kind; precision modifiers (``timestamp(3) with time zone``) are accepted."""
        t = type_name.lower()
        if t == "date":
            return cls.DATE
        if t.startswith("timestamp"):
            return cls.TIMESTAMPTZ if t.endswith(" with time zone") else cls.TIMESTAMP
        return None


def floor(moment: date | datetime, period: Period) -> date:
    """The first day of the period containing ``moment`` (an aware datetime is first converted to UTC)."""
    if isinstance(moment, datetime):
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc)
        moment = moment.date()
    if period is Period.DAY:
        return moment
    if period is Period.WEEK:
        return moment - timedelta(days=moment.weekday())
    if period is Period.MONTH:
        return moment.replace(day=1)
    if period is Period.QUARTER:
        return moment.replace(month=(moment.month - 1) // 3 * 3 + 1, day=1)
    return moment.replace(month=1, day=1)


def shift(start: date, period: Period, n: int) -> date:
    result: date = start + period.step * n
    return result


@dataclass(frozen=True, order=True)
class Range:
    """One partition's half-open range ``[start, end)`` as calendar days."""

    start: date
    end: date

    def literal(self, kind: ColumnKind) -> tuple[str, str]:
        return bound_literal(self.start, kind), bound_literal(self.end, kind)

    def label(self, period: Period) -> str:
        """Hive-style label used in archive keys: ``2024-01`` for months, ``2024-01-15`` for days, ..."""
        if period is Period.MONTH:
            return self.start.strftime("%Y-%m")
        if period is Period.YEAR:
            return self.start.strftime("%Y")
        if period is Period.QUARTER:
            return f"{self.start.year}-Q{(self.start.month - 1) // 3 + 1}"
        return self.start.isoformat()


def bound_literal(day: date, kind: ColumnKind) -> str:
    if kind is ColumnKind.DATE:
        return day.isoformat()
    if kind is ColumnKind.TIMESTAMPTZ:
        return datetime.combine(day, time(), timezone.utc).isoformat(sep=" ")
    return datetime.combine(day, time()).isoformat(sep=" ")


def ranges(start: date, period: Period, count: int) -> list[Range]:
    """``count`` consecutive ranges from ``start`` (which must already be floored)."""
    return [Range(shift(start, period, i), shift(start, period, i + 1)) for i in range(count)]


def window(today: date, period: Period, past: int, future: int) -> list[Range]:
    """pgslice's add_partitions: ``past`` ranges before the current one, the current one, ``future`` after."""
    first = shift(floor(today, period), period, -past)
    return ranges(first, period, past + 1 + future)


def covering(low: date | datetime, high: date | datetime, period: Period) -> list[Range]:
    """Every range from the one holding ``low`` through the one holding ``high``."""
    first, last = floor(low, period), floor(high, period)
    out: list[Range] = []
    cur = first
    while cur <= last:
        out.append(Range(cur, shift(cur, period, 1)))
        cur = shift(cur, period, 1)
    return out


def suffix(start: date, period: Period) -> str:
    if period is Period.YEAR:
        return start.strftime("%Y")
    if period is Period.QUARTER:
        return f"{start.year}q{(start.month - 1) // 3 + 1}"
    if period is Period.MONTH:
        return start.strftime("%Y%m")
    return start.strftime("%Y%m%d")


def fit_identifier(base: str, tail: str) -> str:
    """``base + tail`` cut to PostgreSQL's 63-byte limit, deterministically and without collisions.

    PostgreSQL silently truncates long identifiers, so two long tables could map to one partition name. When the
    name does not fit, the base is shortened (on a UTF-8 character boundary) and a short hash of the full base
    keeps names of different tables apart.
    """
    name = base + tail
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = "_" + hashlib.sha1(base.encode()).hexdigest()[:6]
    room = MAX_IDENTIFIER_BYTES - len(tail.encode()) - len(digest)
    cut = base.encode()[:room].decode("utf-8", errors="ignore")
    return cut + digest + tail


def partition_name(table: str, start: date, period: Period) -> str:
    return fit_identifier(table, "_" + suffix(start, period))


def derived_name(table: str, role: str) -> str:
    """Names of the conversion's companions: ``<table>_intermediate``, ``<table>_retired``, ``<table>_default``."""
    return fit_identifier(table, "_" + role)


_BOUND_RE = re.compile(r"FOR VALUES FROM \('([^']*)'\) TO \('([^']*)'\)")


def parse_bound(expr: str) -> tuple[str, str] | None:
    """``pg_get_expr(relpartbound)`` of a single-column RANGE partition -> (from, to) text; None for DEFAULT."""
    if expr.strip() == "DEFAULT":
        return None
    m = _BOUND_RE.fullmatch(expr.strip())
    if not m:
        raise InvalidInputError(
            f"unsupported partition bound {expr!r}",
            fix="only single-column RANGE partitions with literal bounds are managed by pg-partition",
        )
    return m.group(1), m.group(2)


def parse_bound_day(text: str) -> date:
    """A bound literal from the catalog (``2024-01-01``, ``2024-01-01 00:00:00``, ``...+00``) -> its UTC day."""
    value = datetime.fromisoformat(text.replace(" ", "T"))
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.date()
