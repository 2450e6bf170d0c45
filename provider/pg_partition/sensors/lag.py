"""ReplicationLagSensor: hold a DAG until physical standbys and logical slots are within lag limits.

Why: steps that write a lot of WAL (fill, index builds, swap) should start only when replicas and the warehouse
feed have caught up, so the replicas stay usable and no slot retains WAL until the disk fills. Deferrable by
default: the wait happens in the triggerer (:class:`~pg_partition.triggers.lag.ReplicationLagTrigger`), not in a
worker slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from airflow.configuration import conf
from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.bases.sensor import PokeReturnValue

from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.lag import LagGate, LagMeasurementError, LagPauseTooLong, LagThresholds, LagVerdict, measure
from pg_partition.core.params import is_none, parse_bool
from pg_partition.hooks.partition import PartitionHook
from pg_partition.operators.base import PartitionBaseOperator
from pg_partition.triggers.lag import ReplicationLagTrigger, defer_until_lag_ok


class ReplicationLagSensor(BaseSensorOperator):
    """Succeed once replication lag on ``conn_id`` is within ``max_lag_bytes`` and/or ``max_lag_seconds``.

    :param conn_id: Postgres connection to the primary (or to a standby, to watch its own replay delay).
    :param max_lag_bytes: limit for standby replay lag, a standby's own replay delay and slots' unconfirmed WAL;
        a number or "100MB". ``None``: no byte limit.
    :param max_lag_seconds: limit for standby replay lag in seconds (and logical walsenders'); ``None``: none.
        With neither limit the sensor succeeds at once (gating disabled) and says so.
    :param standbys: application_names (Aurora: instance ids) of the standbys to watch; ``None``: all connected.
        A named standby that is not connected fails the task (its lag is unknown, not zero).
    :param watch_slots: replication slot names to watch; ``None``: every slot; ``[]``: none. ``slots`` is an
        alias. A named slot that does not exist, or a lost one, fails the task.
    :param deferrable: wait in the triggerer instead of poking in a worker slot. Default:
        ``[operators] default_deferrable`` of the deployment (True when unset).
    Standard sensor options (``poke_interval``, ``timeout``, ``soft_fail``, ``mode``...) apply; in deferrable
    mode ``timeout`` bounds the deferral and ``soft_fail`` turns a timeout into a skip.

    Give the task ``retries`` (1-2): Airflow 3.3.2 can mark a deferred task failed when its trigger fires within
    seconds of the deferral, before the scheduler processed the deferring worker's exit (apache/airflow#67287,
    #71580); the retry simply checks lag again.
    """

    template_fields: Sequence[str] = ("conn_id", "max_lag_bytes", "max_lag_seconds", "standbys", "watch_slots",
                                      "deferrable")
    ui_color = "#f0e4d7"

    def __init__(
        self,
        *,
        conn_id: str,
        max_lag_bytes: int | str | None = None,
        max_lag_seconds: float | str | None = None,
        standbys: Sequence[str] | str | None = None,
        watch_slots: Sequence[str] | str | None = None,
        slots: Sequence[str] | str | None = None,
        deferrable: bool | str | None = None,
        poke_interval: timedelta | float = 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        if watch_slots is not None and slots is not None:
            raise InvalidInputError("both watch_slots and slots were given", where=f"task {self.task_id}",
                                    fix="slots is an alias of watch_slots; give only one")
        self.conn_id = conn_id
        self.max_lag_bytes = max_lag_bytes
        self.max_lag_seconds = max_lag_seconds
        self.standbys = standbys
        self.watch_slots = watch_slots if watch_slots is not None else slots
        # the deployment's [operators] default_deferrable decides unless the DAG says; our default stays True
        # (a lag wait can last hours: it should not hold a worker slot) when the setting is absent
        self.deferrable = deferrable if deferrable is not None else conf.getboolean(
            "operators", "default_deferrable", fallback=True)

    def thresholds(self) -> LagThresholds:
        """Parse the (rendered) arguments; bad values raise InvalidInputError before anything is polled."""
        return LagThresholds.parse(max_lag_bytes=self.max_lag_bytes, max_lag_seconds=self.max_lag_seconds,
                                   standbys=self.standbys, slots=self.watch_slots)

    def _check(self, thresholds: LagThresholds) -> LagVerdict:
        with PartitionHook(postgres_conn_id=self.conn_id).open(autocommit=True) as conn:
            verdict = thresholds.evaluate(measure(conn))
        if verdict.ok:
            self.log.info("%s", verdict.summary())
        else:
            self.log.info("Replication lag over threshold (%s): %s", thresholds.describe(), verdict.summary())
        return verdict

    @staticmethod
    def _result(verdict: LagVerdict) -> dict[str, Any]:
        return {"ok": verdict.ok, "worst_bytes": verdict.worst_bytes, "worst_seconds": verdict.worst_seconds,
                "measured_at": verdict.report.measured_at}

    def poke(self, context: Context) -> PokeReturnValue:
        verdict = self._check(self.thresholds())
        return PokeReturnValue(verdict.ok, self._result(verdict) if verdict.ok else None)

    def execute(self, context: Context) -> Any:
        thresholds = self.thresholds()
        if not thresholds.enabled:
            self.log.info("No max_lag_bytes / max_lag_seconds given: not gating on replication lag")
            return {"ok": True, "gated": False}
        if not parse_bool(self.deferrable, what="deferrable"):
            return super().execute(context)
        verdict = self._check(thresholds)  # the common case (no lag) never defers
        if verdict.ok:
            return self._result(verdict)
        self.log.info("Deferring to ReplicationLagTrigger (poll every %.0fs, timeout %.0fs)",
                      self.poke_interval, self.timeout)
        self.defer(
            trigger=ReplicationLagTrigger.from_thresholds(self.conn_id, thresholds, poll_interval=self.poke_interval),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        if event and event.get("status") == "ok":
            self.log.info("Replication lag back within limits after %s trigger poll(s): %s",
                          event.get("polls"), event.get("summary"))
            return event.get("result")
        message = (event or {}).get("message", "the replication-lag trigger ended without an event")
        raise LagMeasurementError(f"replication-lag trigger: {message}", where=f"connection {self.conn_id!r}",
                                  fix="see the message above; the task can be retried once it is fixed")


LAG_FIELDS = ("max_lag_bytes", "max_lag_seconds", "watch_slots", "max_pause_seconds")


class LagGated:
    """Replication-lag gating for batch operators (fill, replay): a :class:`LagGate` as the loop's throttle, on
    its own connection, and a deferral to the trigger when a pause outlasts ``max_pause_seconds``.

    Mixed into a :class:`PartitionBaseOperator`; the lag arguments are template fields (DAG params arrive as
    strings such as "None", "100MB" or "['feed']", which the gate parses).
    """

    max_lag_bytes: Any
    max_lag_seconds: Any
    watch_slots: Any
    max_pause_seconds: Any
    lag_poll_seconds: float

    def init_lag(self, *, max_lag_bytes: Any = None, max_lag_seconds: Any = None, watch_slots: Any = None,
                 max_pause_seconds: Any = 600, lag_poll_seconds: float = 30.0) -> None:
        self.max_lag_bytes = max_lag_bytes
        self.max_lag_seconds = max_lag_seconds
        self.watch_slots = watch_slots
        self.max_pause_seconds = max_pause_seconds
        self.lag_poll_seconds = float(lag_poll_seconds)

    @contextmanager
    def throttle(self) -> Iterator[Callable[[], None] | None]:
        """The gate bound to its own autocommit connection (a pause never holds the loop's transaction open),
        or None when no limit is set."""
        assert isinstance(self, PartitionBaseOperator)
        if is_none(self.max_lag_bytes) and is_none(self.max_lag_seconds):
            yield None
            return
        gate = LagGate.from_params(max_lag_bytes=self.max_lag_bytes, max_lag_seconds=self.max_lag_seconds,
                                   watch_slots=self.watch_slots, max_pause_seconds=self.max_pause_seconds)
        with self.connection() as gate_conn:
            yield gate.bind(gate_conn)

    def lag_gate(self) -> dict[str, Any]:
        """What a :class:`ReplicationLagSensor` in front of the step did, without a task of its own: one
        measurement when the step starts. Within the limits (or no limit set: nothing measured) the step runs on
        in the same process; over them, the task defers to the trigger at once (raises TaskDeferred) and
        ``resume_after_lag`` runs the step once lag is back within limits. Returns the verdict for XCom."""
        assert isinstance(self, PartitionBaseOperator)
        if is_none(self.max_lag_bytes) and is_none(self.max_lag_seconds):
            return {"ok": True, "gated": False}
        gate = LagGate.from_params(max_lag_bytes=self.max_lag_bytes, max_lag_seconds=self.max_lag_seconds,
                                   watch_slots=self.watch_slots, max_pause_seconds=0)
        with self.hook().open(autocommit=True) as conn:
            try:
                gate.wait_until_ok(conn)
            except LagPauseTooLong as exc:
                self.defer_for_lag(exc)
                raise  # pragma: no cover - defer raises TaskDeferred
        if gate.last_verdict is None:  # thresholds parsed to "no limit"
            return {"ok": True, "gated": False}
        self.log.info("replication lag within limits at the start of %s: %s", self.task_id,
                      gate.last_verdict.summary())
        return ReplicationLagSensor._result(gate.last_verdict)

    def defer_for_lag(self, exc: LagPauseTooLong) -> None:
        """Hand the wait to the triggerer (raises TaskDeferred); ``resume_after_lag`` continues the loop."""
        assert isinstance(self, PartitionBaseOperator)
        defer_until_lag_ok(self, exc, conn_id=str(self.conn_id), method_name="resume_after_lag",
                           poll_interval=self.lag_poll_seconds)

    @staticmethod
    def check_lag_event(event: dict[str, Any] | None, conn_id: str) -> None:
        if event and event.get("status") == "ok":
            return
        message = (event or {}).get("message", "the replication-lag trigger ended without an event")
        raise LagMeasurementError(f"replication-lag trigger: {message}", where=f"connection {conn_id!r}",
                                  fix="fix what the message names, then clear the task: it resumes from its "
                                  "checkpoint")
