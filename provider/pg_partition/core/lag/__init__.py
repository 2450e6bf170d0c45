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

from pg_partition.core.lag.gate import LagGate, LagPauseTooLong, LagThresholds, LagVerdict, acheck, check
from pg_partition.core.lag.measure import (
    AURORA_SQL,
    CURRENT_LSN_PRIMARY,
    CURRENT_LSN_STANDBY,
    LOCAL_SQL,
    PROBE_SQL,
    SLOTS_SQL,
    SOURCE_AURORA,
    SOURCE_PG,
    STANDBYS_SQL,
    LagMeasurementError,
    LagReport,
    LocalReplay,
    SlotLag,
    SlotLostError,
    SlotMissingError,
    StandbyLag,
    StandbyMissingError,
    ameasure,
    measure,
    measure_plan,
    parse_aurora_rows,
    parse_local_row,
    parse_slot_rows,
    parse_standby_rows,
)

__all__ = [
    "AURORA_SQL",
    "CURRENT_LSN_PRIMARY",
    "CURRENT_LSN_STANDBY",
    "LOCAL_SQL",
    "PROBE_SQL",
    "SLOTS_SQL",
    "SOURCE_AURORA",
    "SOURCE_PG",
    "STANDBYS_SQL",
    "LagGate",
    "LagMeasurementError",
    "LagPauseTooLong",
    "LagReport",
    "LagThresholds",
    "LagVerdict",
    "LocalReplay",
    "SlotLag",
    "SlotLostError",
    "SlotMissingError",
    "StandbyLag",
    "StandbyMissingError",
    "acheck",
    "ameasure",
    "check",
    "measure",
    "measure_plan",
    "parse_aurora_rows",
    "parse_local_row",
    "parse_slot_rows",
    "parse_standby_rows",
]
