"""Online conversion of a table into a RANGE-partitioned one: pgslice's steps, one short module each.

    preflight -> prep -> add_partitions -> [install_capture] -> plan_fill -> fill (per partition)
    -> [replay] -> build_indexes -> analyze -> verify -> [replay] -> swap -> [catch_up] -> report
    rollback: unswap, unprep

Where each step's SQL lives:

===================  ==========================================================================================
``spec``             what to convert (:class:`ConvertSpec`), the job row and per-step checkpoints in the state schema
``preflight``        read-only checks that refuse unsafe cases before anything changes; the ``where`` gate
``prep``             the intermediate partitioned table, its partitions, index builds and ANALYZE
``capture``          change-capture triggers and changelog (install/uninstall), and the capture decision
``fill``             the fill plan (safe high-water mark) and the batched, checkpointed copy
``replay``           applying captured changes, and the last backlog under the swap lock
``catchup``          append-only mode: rows written after the fill, before and after the swap
``verify``           per-partition count + content hash of the new table against its source range
``swap``             the rename swap under a short lock, unswap and unprep
``report``           rows, sizes and timings before and after
===================  ==========================================================================================

Every function takes an :class:`~pg_partition.core.db.execute.Executor` (dry run logs every statement and changes
nothing) and a :class:`ConvertSpec`; progress lives in the ``pgpartition`` state schema, so a task retried on
another worker continues where the last one stopped. This module re-exports the steps so callers import one name.
"""

from __future__ import annotations

from pg_partition.core.convert import capture, replay, verify
from pg_partition.core.convert.capture import capture_on, decide_capture, install_capture
from pg_partition.core.convert.catchup import catch_up
from pg_partition.core.convert.fill import fill, fill_status, plan_fill, recorded_plan, wait_for_writers
from pg_partition.core.convert.preflight import preflight, validate_where
from pg_partition.core.convert.prep import add_partitions, analyze, build_indexes, index_plan, prep
from pg_partition.core.convert.report import format_report, report
from pg_partition.core.convert.spec import ConvertSpec, load_spec
from pg_partition.core.convert.swap import finish_and_swap, is_swapped, swap, unprep, unswap

__all__ = [
    "ConvertSpec",
    "add_partitions",
    "analyze",
    "build_indexes",
    "capture",
    "capture_on",
    "catch_up",
    "decide_capture",
    "fill",
    "fill_status",
    "finish_and_swap",
    "format_report",
    "index_plan",
    "install_capture",
    "is_swapped",
    "load_spec",
    "plan_fill",
    "preflight",
    "prep",
    "recorded_plan",
    "replay",
    "report",
    "swap",
    "unprep",
    "unswap",
    "validate_where",
    "verify",
    "wait_for_writers",
]
