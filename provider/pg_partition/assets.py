"""Assets that connect the DAGs: rotation emits an event when partitions are detached; archive schedules on it.

The event's ``extra`` carries ``{"conn_ids": [...]}``: the Airflow connections whose ``pg_partition.archive_queue``
has new pending rows, so the archive DAG knows where to look without a shared file.
"""

from __future__ import annotations

from airflow.sdk import Asset

ARCHIVE_PENDING = Asset(name="pg_partition_archive_pending", uri="pg-partition://archive/pending")
