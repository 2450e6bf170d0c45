"""Judging lag against thresholds, and the gate that pauses fill/replay batches while lag is high."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pg_partition.core.db.errors import InvalidInputError, PartitionError
from pg_partition.core.lag.measure import (
    SOURCE_AURORA,
    LagReport,
    SlotLag,
    SlotLostError,
    SlotMissingError,
    StandbyLag,
    StandbyMissingError,
    ameasure,
    measure,
)
from pg_partition.core.params import format_bytes, format_seconds, parse_bytes, parse_names, parse_seconds

log = logging.getLogger("pg_partition")


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
