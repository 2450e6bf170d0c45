"""Rotation of a partitioned table: premake future partitions, keep the DEFAULT partition empty, detach old ones.

One call of each function handles one table in one database (one config entry); the DAG maps over the fleet.
Everything here is idempotent and resumable: a killed run leaves the catalog in a state the next run recognises
(a standalone table not yet attached, a partition "detach pending", a detached table not yet queued), and the
intent of every detach is recorded in the state schema's ``checkpoints`` before it starts.

Choices, and why:

* **Premake** goes through :func:`pg_partition.core.db.partitions.create_partition` (standalone CREATE + CHECK +
  ``ATTACH PARTITION`` under ``lock_timeout``): SHARE UPDATE EXCLUSIVE on the parent, never ACCESS EXCLUSIVE.
  The per-partition primary key of a pgslice-style layout and the parent's grants are carried over; indexes come
  from the parent's partitioned indexes, which PostgreSQL attaches automatically.
* **Rows in the DEFAULT partition** that belong to a range being created make its ATTACH fail (pg_partman's most
  reported problem), so they are moved first. The final step is one short transaction under ``lock_timeout``
  with retries: ``LOCK TABLE ONLY parent IN SHARE ROW EXCLUSIVE MODE`` (readers go on; inserts through the
  parent wait), ACCESS EXCLUSIVE on the DEFAULT partition (which ATTACH takes anyway, to scan it), then what is
  left of the range moves into a temporary table, the empty new partition is attached and the rows are
  re-inserted through the parent. Readers and logical-replication subscribers see the rows move atomically, and
  no insert can slip into the DEFAULT partition between the sweep and the ATTACH. Why the parent lock: without
  it, an insert that routed its row to the DEFAULT partition just before the ATTACH commits (and then waited for
  the DEFAULT's lock) fails with "violates partition constraint"; with it, inserts pause for the few
  milliseconds of the final step and then route to the new partition. (That step scans the DEFAULT partition,
  so it is short only while the DEFAULT stays small, which the health check enforces.)
  When more than ``batch_size`` rows must move (and the table is not published) they are first moved in
  committed batches straight into the standalone new table, to keep the locked step short; those rows are
  invisible through the parent until the ATTACH a few statements later (the trade-off against holding the
  locks for the whole move). Tables referenced by foreign keys are refused: deleting rows from the DEFAULT
  partition would cascade or fail.
* **Retention** detaches partitions wholly older than the window with ``DETACH PARTITION ... CONCURRENTLY``
  (PostgreSQL 14+, outside any transaction), which never blocks readers or writers. PostgreSQL refuses it when a
  DEFAULT partition exists; then, and on PostgreSQL 13, a plain ``DETACH`` runs under ``lock_timeout`` with
  retries, and the log says so. A concurrent detach interrupted in its second phase leaves the partition "detach
  pending"; the next run completes it with ``FINALIZE``. The detached table is moved to the archive schema and a
  ``pending`` row is inserted in the state schema's ``archive_queue`` in one transaction.
"""

from __future__ import annotations

from pg_partition.core.rotate.health import Health, health, rotate
from pg_partition.core.rotate.plan import (
    DEFAULT_ROWS_SCAN_LIMIT,
    Plan,
    PlannedCreate,
    PlannedDetach,
    RotationSpec,
    concurrent_detach_possible,
    count_default_rows,
    covered,
    describe_managed,
    desired_ranges,
    job_id,
    older,
    plan,
    queue_status,
    retention_cutoff,
    unfinished_detaches,
)
from pg_partition.core.rotate.premake import PremakeResult, move_default_rows_and_attach, premake
from pg_partition.core.rotate.retention import DetachResult, detach_expired

__all__ = [
    "DEFAULT_ROWS_SCAN_LIMIT",
    "DetachResult",
    "Health",
    "Plan",
    "PlannedCreate",
    "PlannedDetach",
    "PremakeResult",
    "RotationSpec",
    "concurrent_detach_possible",
    "count_default_rows",
    "covered",
    "describe_managed",
    "desired_ranges",
    "detach_expired",
    "health",
    "job_id",
    "move_default_rows_and_attach",
    "older",
    "plan",
    "premake",
    "queue_status",
    "retention_cutoff",
    "rotate",
    "unfinished_detaches",
]
