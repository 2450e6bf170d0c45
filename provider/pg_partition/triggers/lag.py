"""ReplicationLagTrigger: waits in the triggerer, without a worker slot, until replication lag is back in limits.

Why a trigger: lag caused by a bulk copy can take many minutes to drain (a paused replica, a warehouse feed that
is down). A sensor or a paused fill that sleeps holds a worker slot the whole time; deferring hands the wait to
the triggerer, which polls with ``psycopg.AsyncConnection`` on its event loop (never a blocking call) using the
same SQL and judgement as the task (:func:`pg_partition.core.lag.acheck`).

Used by :class:`~pg_partition.sensors.lag.ReplicationLagSensor` (``deferrable=True``) and by batch operators that
catch :class:`~pg_partition.core.lag.LagPauseTooLong` (see :func:`defer_until_lag_ok`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import psycopg
from airflow.sdk import BaseHook
from airflow.triggers.base import BaseTrigger, TriggerEvent

from pg_partition.core.db.errors import PartitionError
from pg_partition.core.lag import LagMeasurementError, LagPauseTooLong, LagThresholds, acheck

APPLICATION_NAME = "pg_partition"
CLASSPATH = "pg_partition.triggers.lag.ReplicationLagTrigger"

# Airflow Postgres connection extras that are not libpq parameters (PostgresHook's own switches).
_NOT_LIBPQ = {"cursor", "iam", "redshift", "aws_conn_id", "cluster-identifier", "sqlalchemy_scheme",
              "sqlalchemy_query", "enable_log_db_messages", "azure_conn_id", "redshift-serverless"}


def _libpq_keywords() -> set[str]:
    return {opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults()}


def conninfo_from_connection(conn: Any, extra: dict[str, Any]) -> str:
    """A libpq connection string from an Airflow Connection (host/port/login/password/schema + libpq extras).

    IAM authentication is PostgresHook's own feature and needs boto3 calls; it is refused here rather than
    silently connecting without it.
    """
    if extra.get("iam"):
        raise PartitionError(
            f"connection {conn.conn_id!r} uses IAM authentication, which the replication-lag trigger cannot use",
            fix="use a password/certificate connection for lag checks, or set deferrable=False on the sensor")
    keywords = _libpq_keywords()
    params: dict[str, Any] = {
        "host": conn.host or "localhost", "port": conn.port or 5432, "user": conn.login,
        "password": conn.password, "dbname": extra.get("dbname") or conn.schema,
        "application_name": APPLICATION_NAME,
    }
    for key, value in extra.items():
        if key in keywords and key not in _NOT_LIBPQ and key not in params and value is not None:
            params[key] = value
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v not in (None, "")})


class ReplicationLagTrigger(BaseTrigger):
    """Fire once the lag on ``conn_id`` is within the thresholds (or once with an error).

    Events: ``{"status": "ok", "polls": n, "summary": str, "result": {...}}`` or
    ``{"status": "error", "error": class name, "message": str, "polls": n}``. A missing named standby/slot or a
    lost slot is an error event at once (waiting would not help); connection failures are retried
    ``max_connect_failures`` times in a row, then reported.
    """

    def __init__(
        self,
        conn_id: str,
        max_lag_bytes: int | None = None,
        max_lag_seconds: float | None = None,
        standbys: list[str] | None = None,
        slots: list[str] | None = None,
        poll_interval: float = 30.0,
        max_connect_failures: int = 10,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.max_lag_bytes = None if max_lag_bytes is None else int(max_lag_bytes)
        self.max_lag_seconds = None if max_lag_seconds is None else float(max_lag_seconds)
        self.standbys = None if standbys is None else [str(s) for s in standbys]
        self.slots = None if slots is None else [str(s) for s in slots]
        self.poll_interval = float(poll_interval)
        self.max_connect_failures = int(max_connect_failures)
        self.polls = 0  # measurements taken by run(); not serialized (observability for logs and tests)

    @classmethod
    def from_thresholds(cls, conn_id: str, thresholds: LagThresholds, *, poll_interval: float = 30.0,
                        max_connect_failures: int = 10) -> ReplicationLagTrigger:
        d = thresholds.to_dict()
        return cls(conn_id=conn_id, max_lag_bytes=d["max_lag_bytes"], max_lag_seconds=d["max_lag_seconds"],
                   standbys=d["standbys"], slots=d["slots"], poll_interval=poll_interval,
                   max_connect_failures=max_connect_failures)

    @property
    def thresholds(self) -> LagThresholds:
        return LagThresholds(
            self.max_lag_bytes, self.max_lag_seconds,
            None if self.standbys is None else tuple(self.standbys),
            None if self.slots is None else tuple(self.slots),
        )

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (CLASSPATH, {
            "conn_id": self.conn_id,
            "max_lag_bytes": self.max_lag_bytes,
            "max_lag_seconds": self.max_lag_seconds,
            "standbys": self.standbys,
            "slots": self.slots,
            "poll_interval": self.poll_interval,
            "max_connect_failures": self.max_connect_failures,
        })

    async def conninfo(self) -> str:
        conn = await BaseHook.aget_connection(self.conn_id)
        aextra = getattr(conn, "aextra_dejson", None)
        extra = await aextra() if aextra is not None else conn.extra_dejson
        return conninfo_from_connection(conn, dict(extra or {}))

    def _error(self, exc: BaseException, polls: int) -> TriggerEvent:
        self.log.error("Replication-lag trigger failed: %s", exc)
        return TriggerEvent({"status": "error", "error": type(exc).__name__, "message": str(exc),
                             "polls": polls})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        thresholds = self.thresholds
        try:
            conninfo = await self.conninfo()
        except Exception as exc:  # any failure to resolve the connection is reported as an event
            yield self._error(exc, self.polls)
            return
        self.log.info("Waiting for replication lag on %r to be within %s (poll every %.0fs)",
                      self.conn_id, thresholds.describe(), self.poll_interval)
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as aconn:
                    failures = 0
                    while True:
                        verdict = await acheck(aconn, thresholds)
                        self.polls += 1
                        if verdict.ok:
                            self.log.info("Replication lag OK after %d poll(s): %s", self.polls, verdict.summary())
                            yield TriggerEvent({
                                "status": "ok", "polls": self.polls, "summary": verdict.summary(),
                                "result": {"ok": True, "worst_bytes": verdict.worst_bytes,
                                           "worst_seconds": verdict.worst_seconds,
                                           "measured_at": verdict.report.measured_at},
                            })
                            return
                        self.log.info("Replication lag over threshold (poll %d), next check in %.0fs: %s",
                                      self.polls, self.poll_interval, verdict.summary())
                        await asyncio.sleep(self.poll_interval)
            except LagMeasurementError as exc:
                yield self._error(exc, self.polls)
                return
            except psycopg.OperationalError as exc:
                failures += 1
                if failures >= self.max_connect_failures:
                    yield self._error(exc, self.polls)
                    return
                self.log.warning("Lag check on %r failed (%d/%d in a row), retrying in %.0fs: %s",
                                 self.conn_id, failures, self.max_connect_failures, self.poll_interval, exc)
                await asyncio.sleep(self.poll_interval)


def defer_until_lag_ok(operator: Any, exc: LagPauseTooLong, *, conn_id: str, method_name: str,
                       poll_interval: float = 30.0, timeout: timedelta | None = None,
                       kwargs: dict[str, Any] | None = None) -> None:
    """Hand a too-long lag pause to the triggerer: ``operator.defer`` with this trigger (raises TaskDeferred).

    ``method_name`` is called when lag is back in limits (with ``event=`` and ``kwargs``); it should re-enter the
    batch loop, which continues from its checkpoint in PostgreSQL.
    """
    operator.log.info("Deferring to the replication-lag trigger after a %.0fs pause: %s",
                      exc.paused_seconds, "; ".join(exc.verdict.reasons))
    operator.defer(
        trigger=ReplicationLagTrigger.from_thresholds(conn_id, exc.thresholds, poll_interval=poll_interval),
        method_name=method_name, kwargs=kwargs, timeout=timeout,
    )
