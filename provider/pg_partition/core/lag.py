"""Replication and slot lag: measure it, judge it against thresholds, and pause bulk work while it is too high.

Why: copying billions of rows writes WAL faster than a standby can replay it or a logical consumer (the warehouse
feed) can confirm it. Unchecked, read replicas serve stale data, failover loses more, and a slot that cannot keep
up retains WAL until the primary's disk fills. Every bulk loop (fill, replay, archive upload) calls
:meth:`LagGate.wait_until_ok` between batches; the Airflow sensor and its trigger use the same measurements.

What is measured (all read-only, works without superuser given ``pg_monitor``):

* on a primary, every physical standby in ``pg_stat_replication``: sent/write/flush/replay lag in bytes
  (``pg_wal_lsn_diff`` against the insert position ``pg_current_wal_insert_lsn()``) and write/flush/replay lag
  in seconds (PostgreSQL's own lag tracker, which keeps growing while a standby's replay is stuck);
* on a standby, this server's replay delay: bytes received but not replayed, and seconds since the last replayed
  commit -- zero when everything received is replayed, so an idle primary does not look like lag;
* every replication slot: WAL retained (``restart_lsn``) and not yet confirmed by its consumer
  (``confirmed_flush_lsn``) in bytes, whether it is active, and the seconds lag of the walsender serving it;
* on Aurora, ``aurora_replica_status()`` when that function exists (reader lag in milliseconds; Aurora LSNs are not
  byte positions, so Aurora readers are judged on seconds only).

Missing things are errors, never "zero lag": a standby or slot the user named that does not exist raises
:class:`StandbyMissingError` / :class:`SlotMissingError`, a lost slot raises :class:`SlotLostError`, and statistics
hidden by missing privileges raise :class:`LagMeasurementError`.

The measurement is written once as a sans-IO plan (a generator that yields SQL and receives rows); :func:`measure`
drives it over a ``psycopg.Connection`` and :func:`ameasure` over a ``psycopg.AsyncConnection``, so the task, the
sensor and the triggerer run exactly the same SQL and parsing.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pg_partition.core.errors import InvalidInputError, PartitionError

log = logging.getLogger("pg_partition")

SOURCE_PG = "pg_stat_replication"
SOURCE_AURORA = "aurora_replica_status"


class LagMeasurementError(PartitionError):
    """Lag could not be measured (missing privileges, an expected standby or slot is absent, a slot is lost)."""


class StandbyMissingError(LagMeasurementError):
    """A standby the user named is not connected: its lag is unknown, which is not the same as zero."""


class SlotMissingError(LagMeasurementError):
    """A replication slot the user named does not exist."""


class SlotLostError(LagMeasurementError):
    """A watched slot was invalidated (``wal_status = 'lost'``): it will never catch up, so waiting is pointless."""


class LagPauseTooLong(PartitionError):
    """Raised by :class:`LagGate` when lag stayed over the threshold longer than ``max_pause_seconds``.

    Operators catch it and defer to :class:`~pg_partition.triggers.lag.ReplicationLagTrigger`, freeing the worker
    slot; on resume they continue from their checkpoint. ``state`` is JSON-safe (for logs, XCom or the trigger).
    """

    def __init__(self, verdict: LagVerdict, *, paused_seconds: float, max_pause_seconds: float,
                 thresholds: LagThresholds) -> None:
        self.verdict = verdict
        self.paused_seconds = paused_seconds
        self.max_pause_seconds = max_pause_seconds
        self.thresholds = thresholds
        self.state: dict[str, Any] = {
            "paused_seconds": round(paused_seconds, 3),
            "max_pause_seconds": max_pause_seconds,
            "reasons": list(verdict.reasons),
            "thresholds": thresholds.to_dict(),
            "report": verdict.report.to_dict(),
        }
        super().__init__(
            f"replication lag stayed over the threshold for {paused_seconds:.0f}s "
            f"(limit {max_pause_seconds:.0f}s): " + "; ".join(verdict.reasons),
            fix="the task defers to the replication-lag trigger and resumes from its checkpoint when lag drops; "
            "if it never drops, look at the standby/slot named above (paused replay, a stopped subscriber, an "
            "unconsumed slot) or raise max_lag_bytes / max_lag_seconds",
        )


# --------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class StandbyLag:
    """One physical standby as seen from the server we are connected to (or one Aurora reader)."""

    name: str
    source: str = SOURCE_PG
    client_addr: str | None = None
    state: str | None = None
    sync_state: str | None = None
    sent_lag_bytes: int | None = None
    write_lag_bytes: int | None = None
    flush_lag_bytes: int | None = None
    replay_lag_bytes: int | None = None
    write_lag_seconds: float | None = None
    flush_lag_seconds: float | None = None
    replay_lag_seconds: float | None = None

    @property
    def label(self) -> str:
        where = f" at {self.client_addr}" if self.client_addr else ""
        return f"standby {self.name!r}{where}"


@dataclass(frozen=True)
class SlotLag:
    """One replication slot: how much WAL it keeps on disk and how much its consumer has not confirmed."""

    name: str
    slot_type: str
    plugin: str | None = None
    database: str | None = None
    active: bool = False
    temporary: bool = False
    wal_status: str | None = None
    retained_bytes: int | None = None
    unconfirmed_bytes: int | None = None
    lag_seconds: float | None = None

    @property
    def label(self) -> str:
        return f"{self.slot_type} slot {self.name!r} ({'active' if self.active else 'inactive'})"


@dataclass(frozen=True)
class LocalReplay:
    """Replay delay of the server we are connected to, when it is a standby."""

    receive_lsn: str | None
    replay_lsn: str | None
    replay_lag_bytes: int | None
    replay_delay_seconds: float | None
    paused: bool
    receiver: str | None  # pg_stat_wal_receiver.status, or None when there is no WAL receiver


@dataclass(frozen=True)
class LagReport:
    """Everything one measurement saw. JSON round-trips through :meth:`to_dict` / :meth:`from_dict`."""

    in_recovery: bool
    server_version: int
    aurora: bool
    measured_at: str
    standbys: tuple[StandbyLag, ...] = ()
    slots: tuple[SlotLag, ...] = ()
    local: LocalReplay | None = None

    def standby_names(self) -> set[str]:
        return {s.name for s in self.standbys}

    def slot_names(self) -> set[str]:
        return {s.name for s in self.slots}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (lists, not tuples): it travels in trigger events and XCom."""
        result: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LagReport:
        local = data.get("local")
        return cls(
            in_recovery=bool(data["in_recovery"]),
            server_version=int(data["server_version"]),
            aurora=bool(data["aurora"]),
            measured_at=str(data["measured_at"]),
            standbys=tuple(StandbyLag(**s) for s in data.get("standbys", ())),
            slots=tuple(SlotLag(**s) for s in data.get("slots", ())),
            local=LocalReplay(**local) if local else None,
        )


PROBE_SQL = sql.SQL(
    "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int, "
    "to_regproc('aurora_replica_status') IS NOT NULL, clock_timestamp()"
)

# The WAL position lag is measured against: on a primary its insert position -- not pg_current_wal_lsn(), the
# write position, which trails by whatever sits in WAL buffers (megabytes right after a big batch with
# synchronous_commit=off), so a gate checking just after a batch would under-count; on a standby what it has
# replayed (its own cascaded standbys and slots cannot be ahead of that).
CURRENT_LSN_PRIMARY = sql.SQL("pg_current_wal_insert_lsn()")
CURRENT_LSN_STANDBY = sql.SQL("pg_last_wal_replay_lsn()")

# Physical standbys only: walsenders that serve a logical slot are reported with that slot, base backups are not
# replicas. ``state`` is NULL when the role may not read the statistics (needs pg_monitor / pg_read_all_stats).
STANDBYS_SQL = sql.SQL(
    """SELECT r.application_name, host(r.client_addr), r.state, r.sync_state,
       pg_wal_lsn_diff({cur}, r.sent_lsn)::bigint,
       pg_wal_lsn_diff({cur}, r.write_lsn)::bigint,
       pg_wal_lsn_diff({cur}, r.flush_lsn)::bigint,
       pg_wal_lsn_diff({cur}, r.replay_lsn)::bigint,
       extract(epoch FROM r.write_lag)::float8,
       extract(epoch FROM r.flush_lag)::float8,
       extract(epoch FROM r.replay_lag)::float8
  FROM pg_stat_replication r
 WHERE r.state IS DISTINCT FROM 'backup'
   AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s
                    WHERE s.active_pid = r.pid AND s.slot_type = 'logical')
 ORDER BY r.application_name, r.pid"""
)

# Unconfirmed: WAL the consumer has not confirmed (confirmed_flush_lsn for logical slots; physical slots only
# have restart_lsn, which a standby advances as it flushes). Retained: WAL kept on disk for the slot.
SLOTS_SQL = sql.SQL(
    """SELECT s.slot_name::text, s.slot_type, s.plugin::text, s.database::text, s.active, s.temporary,
       s.wal_status,
       pg_wal_lsn_diff({cur}, s.restart_lsn)::bigint,
       pg_wal_lsn_diff({cur}, COALESCE(s.confirmed_flush_lsn, s.restart_lsn))::bigint,
       extract(epoch FROM r.replay_lag)::float8
  FROM pg_replication_slots s
  LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
 ORDER BY s.slot_name"""
)

# On a standby. Seconds since the last replayed commit are only lag while something received is still waiting to
# be replayed; when receive == replay the standby is caught up even if the primary has been idle for an hour.
LOCAL_SQL = sql.SQL(
    """SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint,
       extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8,
       pg_is_wal_replay_paused(),
       (SELECT count(*) FROM pg_stat_wal_receiver)::int,
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1)"""
)

# Aurora PostgreSQL: readers share the storage volume and are not walsenders; this function reports them.
# The writer's own row has session_id 'MASTER_SESSION_ID'. Verified only against a stand-in function with the
# documented columns (Aurora is not available in this project's tests).
AURORA_SQL = sql.SQL(
    """SELECT server_id::text, session_id::text, replica_lag_in_msec::float8
  FROM aurora_replica_status()
 ORDER BY server_id"""
)

_PERMISSION_FIX = ("grant the monitoring role to the connection's user: GRANT pg_monitor TO <user> "
                   "(on RDS/Aurora the master user can grant it)")

Plan = Generator[sql.SQL | sql.Composed, list[tuple[Any, ...]], LagReport]


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def parse_standby_rows(rows: Iterable[Sequence[Any]]) -> tuple[StandbyLag, ...]:
    """Rows of :data:`STANDBYS_SQL` -> :class:`StandbyLag`. Hidden statistics are an error, not zero lag."""
    out: list[StandbyLag] = []
    for r in rows:
        if r[2] is None:
            raise LagMeasurementError(
                f"pg_stat_replication hides the state and positions of standby {r[0]!r} from this user, so its "
                "lag cannot be measured", where="pg_stat_replication", fix=_PERMISSION_FIX)
        out.append(StandbyLag(
            name=str(r[0]), source=SOURCE_PG, client_addr=r[1], state=r[2], sync_state=r[3],
            sent_lag_bytes=_int(r[4]), write_lag_bytes=_int(r[5]), flush_lag_bytes=_int(r[6]),
            replay_lag_bytes=_int(r[7]), write_lag_seconds=_num(r[8]), flush_lag_seconds=_num(r[9]),
            replay_lag_seconds=_num(r[10]),
        ))
    return tuple(out)


def parse_slot_rows(rows: Iterable[Sequence[Any]]) -> tuple[SlotLag, ...]:
    return tuple(
        SlotLag(name=str(r[0]), slot_type=str(r[1]), plugin=r[2], database=r[3], active=bool(r[4]),
                temporary=bool(r[5]), wal_status=r[6], retained_bytes=_int(r[7]), unconfirmed_bytes=_int(r[8]),
                lag_seconds=_num(r[9]))
        for r in rows
    )


def parse_local_row(row: Sequence[Any]) -> LocalReplay:
    """The row of :data:`LOCAL_SQL` -> :class:`LocalReplay`, turning "caught up" into zero delay (idle primary)."""
    receive, replay, diff, since_replay, paused, receivers, status = row
    if receivers and status is None:
        raise LagMeasurementError("pg_stat_wal_receiver hides the WAL receiver's status from this user",
                                  where="pg_stat_wal_receiver", fix=_PERMISSION_FIX)
    caught_up = receive is None or diff is None or int(diff) <= 0
    delay = 0.0 if caught_up else _num(since_replay)
    return LocalReplay(
        receive_lsn=receive, replay_lsn=replay, replay_lag_bytes=0 if caught_up else _int(diff),
        replay_delay_seconds=delay if delay is None else max(delay, 0.0), paused=bool(paused),
        receiver=status if receivers else None,
    )


def parse_aurora_rows(rows: Iterable[Sequence[Any]]) -> tuple[StandbyLag, ...]:
    """Rows of :data:`AURORA_SQL` -> one :class:`StandbyLag` per reader (the writer's row is skipped).

    Aurora reports -1 or NULL lag for instances it has no figure for; that is "unknown", not zero.
    """
    out: list[StandbyLag] = []
    for server_id, session_id, lag_ms in rows:
        if session_id == "MASTER_SESSION_ID":
            continue
        seconds = None if lag_ms is None or float(lag_ms) < 0 else float(lag_ms) / 1000.0
        out.append(StandbyLag(name=str(server_id), source=SOURCE_AURORA, state="streaming",
                              replay_lag_seconds=seconds, write_lag_seconds=None, flush_lag_seconds=None))
    return tuple(out)


def measure_plan() -> Plan:
    """The measurement as a sans-IO generator: yields each statement, receives its rows, returns the report."""
    probe = (yield PROBE_SQL)[0]
    in_recovery, version, aurora, now = bool(probe[0]), int(probe[1]), bool(probe[2]), probe[3]
    cur = CURRENT_LSN_STANDBY if in_recovery else CURRENT_LSN_PRIMARY
    standbys = parse_standby_rows((yield STANDBYS_SQL.format(cur=cur)))
    if aurora:
        standbys += parse_aurora_rows((yield AURORA_SQL))
    slots = parse_slot_rows((yield SLOTS_SQL.format(cur=cur)))
    local = parse_local_row((yield LOCAL_SQL)[0]) if in_recovery else None
    measured_at = now.isoformat() if isinstance(now, datetime) else datetime.now(timezone.utc).isoformat()
    return LagReport(in_recovery=in_recovery, server_version=version, aurora=aurora, measured_at=measured_at,
                     standbys=standbys, slots=slots, local=local)


def measure(conn: psycopg.Connection[Any]) -> LagReport:
    """Measure replication and slot lag on ``conn`` (read-only).

    Leaves no transaction open: on a non-autocommit connection that was idle, the implicit read transaction is
    rolled back, so a caller that then sleeps (the gate) does not hold back vacuum.
    """
    was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    plan = measure_plan()
    try:
        stmt = next(plan)
        while True:
            with conn.cursor(row_factory=tuple_row) as cur:
                rows = cur.execute(stmt).fetchall()
            stmt = plan.send(rows)
    except StopIteration as done:
        report: LagReport = done.value
        return report
    finally:
        if not conn.autocommit and was_idle and not conn.closed:
            conn.rollback()


async def ameasure(conn: psycopg.AsyncConnection[Any]) -> LagReport:
    """:func:`measure` over an async connection (the triggerer's event loop is never blocked)."""
    was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    plan = measure_plan()
    try:
        stmt = next(plan)
        while True:
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(stmt)
                rows = await cur.fetchall()
            stmt = plan.send(rows)
    except StopIteration as done:
        report: LagReport = done.value
        return report
    finally:
        if not conn.autocommit and was_idle and not conn.closed:
            await conn.rollback()


# --------------------------------------------------------------------------------------------------------------
# Thresholds


_SIZE_UNITS = {"": 1, "b": 1, "bytes": 1, "kb": 1024, "kib": 1024, "k": 1024, "mb": 1024**2, "mib": 1024**2,
               "m": 1024**2, "gb": 1024**3, "gib": 1024**3, "g": 1024**3, "tb": 1024**4, "tib": 1024**4}
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "ms": 0.001,
               "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hour": 3600.0,
               "hours": 3600.0}
_NONE_TEXT = {"", "none", "null"}


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_TEXT)


def _parse_quantity(value: Any, units: Mapping[str, float], what: str, kind: str, example: str) -> float | None:
    """A number with an optional unit from ``units``; ``None``/"None" -> None. Shared by sizes and durations."""
    if _is_none(value):
        return None
    if isinstance(value, bool):
        raise InvalidInputError(f"{what}={value!r} is not a {kind}", fix=f"give a number or {example}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in units:
            raise InvalidInputError(f"{what}={value!r} is not a {kind}",
                                    fix=f"give a number or a number with a unit: {example}")
        number, unit = float(m.group(1)), m.group(2).lower()
    result = number * units[unit]
    if not math.isfinite(result) or result < 0:
        raise InvalidInputError(f"{what}={value!r} must be a non-negative {kind}", fix=f"use e.g. {example}")
    return result


def parse_bytes(value: Any, *, what: str = "max_lag_bytes") -> int | None:
    """``None``/"None" -> None (no byte threshold); ``104857600``, ``"100MB"``, ``"1.5 GB"`` -> bytes (1 kB = 1024)."""
    result = _parse_quantity(value, _SIZE_UNITS, what, "size", "104857600, '100MB', '2GB'")
    return None if result is None else int(result)


def parse_seconds(value: Any, *, what: str = "max_lag_seconds") -> float | None:
    """``None``/"None" -> None; ``30``, ``"30s"``, ``"5min"``, ``"500ms"`` -> seconds."""
    return _parse_quantity(value, _TIME_UNITS, what, "duration", "30, '30s', '5min', '1h'")


def parse_names(value: Any, *, what: str = "watch_slots") -> tuple[str, ...] | None:
    """Which standbys/slots to watch. ``None``, "None", "", "all", "*" -> None (all of them); ``[]``/"[]" -> none;
    a list, a JSON/Python list literal (how templated params render) or "a, b" -> those names."""
    if _is_none(value) or (isinstance(value, str) and value.strip().lower() in {"all", "*"}):
        return None
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                items = json.loads(text)
            except ValueError:
                try:
                    items = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise InvalidInputError(f"{what}={value!r} is not a list of names",
                                            fix='write ["a", "b"], "a, b", [] for none, or leave empty for all'
                                            ) from None
        else:
            items = [p for p in (s.strip() for s in text.split(",")) if p]
    if not isinstance(items, list | tuple | set | frozenset):
        raise InvalidInputError(f"{what}={value!r} is not a list of names",
                                fix='write ["a", "b"], "a, b", [] for none, or leave empty for all')
    names = tuple(str(x).strip() for x in items)
    if any(not n for n in names):
        raise InvalidInputError(f"{what}={value!r} contains an empty name", fix="remove the empty entry")
    return names


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def format_seconds(s: float | None) -> str:
    return "unknown" if s is None else f"{s:.1f}s"


@dataclass(frozen=True)
class LagVerdict:
    """The outcome of judging one report: ``ok`` or the human-readable reasons why not."""

    ok: bool
    reasons: tuple[str, ...]
    report: LagReport
    worst_bytes: int | None = None
    worst_seconds: float | None = None

    def summary(self) -> str:
        if self.ok:
            return (f"replication lag within limits (worst {format_bytes(self.worst_bytes)}, "
                    f"{format_seconds(self.worst_seconds)})")
        return "; ".join(self.reasons)


@dataclass(frozen=True)
class LagThresholds:
    """Limits and what they apply to.

    ``standbys``/``slots``: ``None`` watches every standby/slot there is; ``()`` watches none; names watch those
    and it is an error when one is missing. Bytes apply to standbys' replay lag, a standby's own replay delay and
    slots' unconfirmed WAL; seconds to standbys' replay lag, a standby's own replay delay and the walsender
    serving a slot. With neither limit set the gate is disabled.
    """

    max_lag_bytes: int | None = None
    max_lag_seconds: float | None = None
    standbys: tuple[str, ...] | None = None
    slots: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_lag_bytes is not None and self.max_lag_bytes < 0:
            raise InvalidInputError(f"max_lag_bytes={self.max_lag_bytes} is negative", fix="use 0 or more")
        if self.max_lag_seconds is not None and self.max_lag_seconds < 0:
            raise InvalidInputError(f"max_lag_seconds={self.max_lag_seconds} is negative", fix="use 0 or more")

    @classmethod
    def parse(cls, *, max_lag_bytes: Any = None, max_lag_seconds: Any = None, standbys: Any = None,
              slots: Any = None) -> LagThresholds:
        """From operator arguments or rendered DAG params (strings like "100MB", "None", "['s1']")."""
        return cls(parse_bytes(max_lag_bytes), parse_seconds(max_lag_seconds),
                   parse_names(standbys, what="standbys"), parse_names(slots, what="watch_slots"))

    @property
    def enabled(self) -> bool:
        return self.max_lag_bytes is not None or self.max_lag_seconds is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_lag_bytes": self.max_lag_bytes, "max_lag_seconds": self.max_lag_seconds,
            "standbys": None if self.standbys is None else list(self.standbys),
            "slots": None if self.slots is None else list(self.slots),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LagThresholds:
        return cls.parse(max_lag_bytes=data.get("max_lag_bytes"), max_lag_seconds=data.get("max_lag_seconds"),
                         standbys=data.get("standbys"), slots=data.get("slots"))

    def describe(self) -> str:
        limits = [f"bytes <= {format_bytes(self.max_lag_bytes)}" if self.max_lag_bytes is not None else "",
                  f"seconds <= {self.max_lag_seconds:g}" if self.max_lag_seconds is not None else ""]
        which = (f"standbys={'all' if self.standbys is None else list(self.standbys)}, "
                 f"slots={'all' if self.slots is None else list(self.slots)}")
        return f"{' and '.join(x for x in limits if x) or 'no limit'} ({which})"

    def check_expected(self, report: LagReport) -> None:
        """Named standbys/slots must exist; watched slots must not be lost. Raises, never returns "zero lag"."""
        if self.standbys:
            missing = [n for n in self.standbys if n not in report.standby_names()]
            if missing:
                seen = sorted(report.standby_names()) or ["none"]
                raise StandbyMissingError(
                    f"expected standby(s) {missing} are not connected (connected: {', '.join(seen)}); "
                    "their lag is unknown, not zero",
                    where="pg_stat_replication" + (" / aurora_replica_status()" if report.aurora else ""),
                    fix="start the standby or repair its connection (primary_conninfo, network, slot), or remove "
                    "it from the watched standbys; names are the standbys' application_name "
                    "(Aurora: the instance identifier)")
        if self.slots:
            missing = [n for n in self.slots if n not in report.slot_names()]
            if missing:
                raise SlotMissingError(
                    f"watched replication slot(s) {missing} do not exist "
                    f"(existing: {', '.join(sorted(report.slot_names())) or 'none'})",
                    where="pg_replication_slots",
                    fix="check the slot names in watch_slots, or leave watch_slots empty to watch every slot")
        for slot in self._watched_slots(report):
            if slot.wal_status == "lost":
                raise SlotLostError(
                    f"replication slot {slot.name!r} is lost (wal_status='lost'): the WAL it needs was removed, "
                    "so its consumer can never catch up and waiting for it is pointless",
                    where="pg_replication_slots",
                    fix=f"re-create the subscription/consumer and drop the lost slot {slot.name!r} with "
                    "pg_drop_replication_slot(), or exclude it from watch_slots")

    def _watched_standbys(self, report: LagReport) -> list[StandbyLag]:
        return [s for s in report.standbys if self.standbys is None or s.name in self.standbys]

    def _watched_slots(self, report: LagReport) -> list[SlotLag]:
        return [s for s in report.slots if self.slots is None or s.name in self.slots]

    def evaluate(self, report: LagReport) -> LagVerdict:
        """Judge a report. Raises :class:`LagMeasurementError` subclasses for missing/lost things (see above)."""
        if not self.enabled:
            return LagVerdict(True, (), report)
        self.check_expected(report)
        reasons: list[str] = []
        worst_b: list[int] = []
        worst_s: list[float] = []
        mb, ms = self.max_lag_bytes, self.max_lag_seconds

        def over_bytes(label: str, value: int | None, detail: str) -> None:
            if value is not None:
                worst_b.append(value)
            if mb is None:
                return
            if value is None:
                reasons.append(f"{label}: lag in bytes unknown ({detail})")
            elif value > mb:
                reasons.append(f"{label}: {format_bytes(value)} behind > max {format_bytes(mb)} ({detail})")

        def over_seconds(label: str, value: float | None, detail: str) -> None:
            if value is not None:
                worst_s.append(value)
            if ms is not None and value is not None and value > ms:
                reasons.append(f"{label}: {value:.1f}s behind > max {ms:g}s ({detail})")

        for sb in self._watched_standbys(report):
            if sb.source == SOURCE_AURORA:
                # Aurora readers share storage; only their time lag means anything.
                if ms is not None and sb.replay_lag_seconds is None:
                    reasons.append(f"Aurora reader {sb.name!r}: replica_lag_in_msec unknown")
                over_seconds(f"Aurora reader {sb.name!r}", sb.replay_lag_seconds, "replica_lag_in_msec")
                continue
            detail = (f"state={sb.state}, write {format_bytes(sb.write_lag_bytes)}, "
                      f"flush {format_bytes(sb.flush_lag_bytes)}")
            over_bytes(f"{sb.label} replay", sb.replay_lag_bytes, detail)
            # NULL lag seconds: PostgreSQL has no sample because the standby is caught up and idle.
            over_seconds(f"{sb.label} replay", sb.replay_lag_seconds, f"state={sb.state}")
        for slot in self._watched_slots(report):
            detail = f"retains {format_bytes(slot.retained_bytes)} of WAL"
            if slot.plugin:
                detail += f", plugin {slot.plugin}"
            if not slot.active:
                detail += ", no consumer connected"
            over_bytes(f"{slot.label} unconfirmed", slot.unconfirmed_bytes or 0, detail)
            if slot.slot_type == "logical":  # a physical slot's walsender is already judged as a standby
                over_seconds(f"{slot.label} consumer", slot.lag_seconds, "walsender replay_lag")
        if report.local is not None:
            loc = report.local
            label = "this standby (replay paused)" if loc.paused else "this standby"
            if loc.receiver is None:
                reasons.append(f"{label}: no WAL receiver is running, so its lag cannot be known")
            over_bytes(f"{label} replay", loc.replay_lag_bytes, f"received {loc.receive_lsn}, replayed "
                       f"{loc.replay_lsn}")
            if ms is not None and loc.replay_delay_seconds is None:
                reasons.append(f"{label}: replay delay unknown (nothing replayed since start)")
            over_seconds(f"{label} replay", loc.replay_delay_seconds, "since last replayed commit")
        return LagVerdict(not reasons, tuple(reasons), report,
                          max(worst_b) if worst_b else None, max(worst_s) if worst_s else None)


def check(conn: psycopg.Connection[Any], thresholds: LagThresholds) -> LagVerdict:
    return thresholds.evaluate(measure(conn))


async def acheck(conn: psycopg.AsyncConnection[Any], thresholds: LagThresholds) -> LagVerdict:
    return thresholds.evaluate(await ameasure(conn))


# --------------------------------------------------------------------------------------------------------------
# The gate bulk loops call between batches


_UNSET: Any = object()


@dataclass
class LagGate:
    """Pauses a batch loop while replication lag is over its thresholds.

    Call :meth:`wait_until_ok` between batches (never inside an open transaction: a paused transaction holds
    back vacuum). It measures at most every ``check_every`` seconds of work (a measurement is a couple of catalog
    reads, but there is no need to do it per batch of a fast loop); while over the threshold it sleeps
    ``poll_interval`` between measurements, logging why and for how long; once the pause exceeds
    ``max_pause_seconds`` it raises :class:`LagPauseTooLong` so the Airflow task can defer to the trigger
    instead of holding a worker slot, and resume from its checkpoint later.

    ``clock``/``sleep`` are injectable so the pure decision logic is unit-testable without waiting.
    """

    thresholds: LagThresholds
    check_every: float = 5.0
    poll_interval: float = 5.0
    max_pause_seconds: float | None = 600.0
    logger: logging.Logger = field(default_factory=lambda: log)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    measurer: Callable[[psycopg.Connection[Any]], LagReport] = measure
    checks: int = field(default=0, init=False)
    pauses: int = field(default=0, init=False)
    paused_seconds: float = field(default=0.0, init=False)
    last_verdict: LagVerdict | None = field(default=None, init=False, repr=False)
    _last_check: float | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_params(cls, *, max_lag_bytes: Any = None, max_lag_seconds: Any = None, watch_slots: Any = None,
                    standbys: Any = None, max_pause_seconds: Any = 600.0, check_every: float = 5.0,
                    poll_interval: float = 5.0, logger: logging.Logger | None = None) -> LagGate:
        """A gate from operator arguments / rendered DAG params (same spellings the sensor accepts)."""
        thresholds = LagThresholds.parse(max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds,
                                         standbys=standbys, slots=watch_slots)
        return cls(thresholds, check_every=check_every, poll_interval=poll_interval,
                   max_pause_seconds=parse_seconds(max_pause_seconds, what="max_pause_seconds"),
                   logger=logger or log)

    def check(self, conn: psycopg.Connection[Any]) -> LagVerdict:
        self.checks += 1
        self._last_check = self.clock()
        verdict = self.thresholds.evaluate(self.measurer(conn))
        self.last_verdict = verdict
        return verdict

    def wait_until_ok(self, conn: psycopg.Connection[Any], *, max_pause_seconds: float | None = _UNSET) -> float:
        """Return at once if lag is fine (or was checked less than ``check_every`` s ago); else pause until it is.

        Returns the seconds paused. Raises :class:`LagPauseTooLong` when the pause exceeds
        ``max_pause_seconds`` (``None``: pause as long as it takes), and :class:`LagMeasurementError` when a
        named standby or slot is missing.
        """
        limit = self.max_pause_seconds if max_pause_seconds is _UNSET else max_pause_seconds
        if not self.thresholds.enabled:
            return 0.0
        if self._last_check is not None and self.clock() - self._last_check < self.check_every:
            return 0.0
        verdict = self.check(conn)
        if verdict.ok:
            return 0.0
        started = self.clock()
        self.logger.warning("Pausing: replication lag over threshold (%s): %s",
                            self.thresholds.describe(), verdict.summary())
        last_log = started
        while True:
            paused = self.clock() - started
            if limit is not None and paused >= limit:
                self.paused_seconds += paused
                self.logger.warning("Lag pause exceeded max_pause_seconds=%.0f after %.1fs: %s",
                                    limit, paused, verdict.summary())
                raise LagPauseTooLong(verdict, paused_seconds=paused, max_pause_seconds=limit,
                                      thresholds=self.thresholds)
            wait = self.poll_interval if limit is None else max(min(self.poll_interval, limit - paused), 0.0)
            self.sleep(wait)
            verdict = self.check(conn)
            if verdict.ok:
                break
            if self.clock() - last_log >= 30.0:
                last_log = self.clock()
                self.logger.info("Still paused after %.0fs: %s", self.clock() - started, verdict.summary())
        paused = self.clock() - started
        self.pauses += 1
        self.paused_seconds += paused
        self.logger.warning("Resuming after a %.1fs pause for replication lag (%s)", paused, verdict.summary())
        return paused

    def bind(self, conn: psycopg.Connection[Any]) -> Callable[[], None]:
        """A ``throttle: Callable[[], None]`` for batch loops (the fill's ``throttle`` argument).

        Give it its own autocommit connection (not the one copying rows) so a pause never happens inside the
        loop's transaction.
        """

        def throttle() -> None:
            self.wait_until_ok(conn)

        return throttle
