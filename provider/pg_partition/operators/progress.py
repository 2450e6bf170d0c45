"""Progress across a whole conversion, for task logs: what one fill task cannot see on its own.

Each mapped fill task logs its own partition's progress (the engine's Progress line every ~10 s); at the end of
each one this module adds the overall line (partitions done / total, rows, rows/s, ETA) read from the state the
fills record in the database, so any worker, any executor, sees the same numbers. The report's tail (totals and
next steps) is built here too. Read-only: nothing here changes the database.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec


def overall_fill(conn: psycopg.Connection[Any], spec: ConvertSpec, parallel: int) -> dict[str, Any] | None:
    """Partitions done/total, rows copied/planned, rows per second of fill work and an ETA for ``parallel``
    fills at a time; None before a plan exists (dry run)."""
    status = convert.fill_status(conn, spec)
    if not status.get("planned"):
        return None
    items: dict[str, Any] = status.get("items") or {}
    plan = convert.recorded_plan(conn, spec)
    total = len(plan["items"])
    done = total - len(status["pending"])
    rows = int(status["rows"])
    planned = int(plan.get("rows") or 0)
    busy = sum(float(v.get("seconds", 0.0)) for v in items.values())
    rate = rows / busy if busy > 0 else 0.0
    remaining = max(planned - rows, 0)
    eta = remaining / (rate * max(parallel, 1)) if rate > 0 else None
    return {"done": done, "total": total, "rows": rows, "planned_rows": planned, "rate": rate,
            "fill_seconds": busy, "eta_seconds": 0.0 if not status["pending"] else eta, "parallel": parallel}


def overall_line(o: dict[str, Any]) -> str:
    pct = 100.0 * o["rows"] / o["planned_rows"] if o["planned_rows"] else 100.0
    eta = "done" if o["eta_seconds"] == 0 else (
        "unknown" if o["eta_seconds"] is None else f"~{o['eta_seconds']:,.0f}s with {o['parallel']} fills at once")
    return (f"overall fill: {o['done']}/{o['total']} partitions done, {o['rows']:,}/{o['planned_rows']:,} rows "
            f"({pct:.1f}%), {o['rate']:,.0f} rows/s per fill, ETA {eta}")


def report_tail(report: dict[str, Any], run_started: datetime | None, fill_seconds: float | None) -> list[str]:
    """Totals (rows, fill time summed over partitions, total time of the run) and what to do next."""
    fill = report.get("fill") or {}
    after = report.get("after") or {}
    table = report["table"]
    lines = []
    total = (datetime.now(timezone.utc) - run_started).total_seconds() if run_started else None
    lines.append(
        f"totals: {int(fill.get('copied_rows') or 0):,} rows copied by the fill"
        f" ({int(after.get('rows') or 0):,} rows in {after.get('table', table)} now)"
        + (f", fill time {fill_seconds:,.1f}s (summed over partitions)" if fill_seconds is not None else "")
        + (f", total time {total:,.0f}s (this DAG run)" if total is not None else ""))
    if report.get("swapped"):
        retired = (report.get("before") or {}).get("table", f"{table}_retired")
        lines += [
            "next steps:",
            f"  - {table} is partitioned and live; {retired} holds the original rows and is no longer written to.",
            f"  - keep {retired} while you may want to roll back (pg_partition_rollback: unswap + unprep).",
            f"  - then archive and drop it: trigger pg_partition_archive with archive_retired=[\"{table}\"]"
            " (verified archive in S3 first, drop after).",
            "  - add the table to pg_partition.yaml so pg_partition_rotate creates future partitions and detaches"
            " old ones.",
        ]
    else:
        lines += ["next steps:", f"  - {table} is not swapped yet: clear the failed task (every step resumes), or "
                  "roll back with pg_partition_rollback."]
    return lines
