"""Measuring replication lag: standbys (bytes, seconds), slots, the standby side, Aurora; one SQL plan for
sync and async callers."""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pg_partition.core.db.errors import PartitionError

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
