"""Application-latency pacing for the conversion's long steps (fill, replay, index builds, verify, swap's drain).

A mixin, like the replication-lag one (:class:`pg_partition.sensors.lag.LagGated`): it parses the two DAG params
(``throttle_ratio``, ``throttle_target_ms``; both empty: no throttle) and opens
:func:`pg_partition.core.convert.throttle.latency_throttle` on a connection of its own. The baseline the ratio
applies to is measured once per conversion (by ``plan_fill``, before any copy) and kept in the conversion's
state in PostgreSQL, so a retried or mapped task on another worker compares against the same number. What the
throttle judges (the application's running statements when this role can see them, else the canary) is chosen by
that baseline: see the module docstring of :mod:`pg_partition.core.convert.throttle`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from pg_partition.core.convert import throttle as latency
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.execute import Executor
from pg_partition.core.params import is_none, parse_float
from pg_partition.operators.base import PartitionBaseOperator

PACE_FIELDS = ("throttle_ratio", "throttle_target_ms")


class LatencyPaced:
    """Adds ``throttle_ratio`` / ``throttle_target_ms`` to a :class:`PartitionBaseOperator`."""

    throttle_ratio: Any
    throttle_target_ms: Any

    def init_pace(self, *, throttle_ratio: Any = None, throttle_target_ms: Any = None) -> None:
        self.throttle_ratio = throttle_ratio
        self.throttle_target_ms = throttle_target_ms

    def pace_targets(self) -> tuple[float | None, float | None]:
        """(ratio, target_ms), checked before anything runs; (None, None) when pacing is off."""
        ratio = None if is_none(self.throttle_ratio) else parse_float(
            self.throttle_ratio, what="throttle_ratio")
        target = None if is_none(self.throttle_target_ms) else parse_float(
            self.throttle_target_ms, what="throttle_target_ms")
        if ratio is not None and not 1.0 <= ratio <= 100.0:
            raise InvalidInputError(f"throttle_ratio={ratio} is outside 1..100",
                                    fix="e.g. 1.5: keep the canary's p99 under 1.5x its value before the conversion")
        if target is not None and not 0.1 <= target <= 60_000:
            raise InvalidInputError(f"throttle_target_ms={target} is outside 0.1..60000",
                                    fix="e.g. 20 (milliseconds)")
        return ratio, target

    def _connect(self) -> Callable[[], psycopg.Connection[Any]]:
        assert isinstance(self, PartitionBaseOperator)
        hook = self.hook()

        def connect() -> psycopg.Connection[Any]:
            conn = hook.get_conn()
            assert isinstance(conn, psycopg.Connection)
            return conn
        return connect

    def measure_pace_baseline(self, ex: Executor, spec: ConvertSpec) -> dict[str, Any] | None:
        """Record the canary's baseline for the conversion (once; a retry reuses it) when a ratio is set."""
        ratio, _ = self.pace_targets()
        if ratio is None or ex.dry_run:
            return None
        return latency.measure_baseline(ex, spec, self._connect())

    @contextmanager
    def paced(self, ex: Executor, spec: ConvertSpec) -> Iterator[latency.LatencyThrottle | None]:
        ratio, target = self.pace_targets()
        with latency.latency_throttle(ex, spec, self._connect(), ratio=ratio, target_ms=target) as thr:
            yield thr
