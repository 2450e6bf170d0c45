"""Verify's time with a large change-capture backlog (issue 15, case 1), against the same verify when the changelog
has no index (the shape before the fix), in the same run.

A table of BENCH_ROWS rows over ~12 monthly partitions, filled, then UPDATEs of BENCH_BACKLOG_PCT percent of its
rows leave a backlog in the changelog; verify (one snapshot, each side read once, pending keys excluded through
the changelog's key index) is timed, then the index is dropped and the same verify timed again (capped by
BENCH_VERIFY_CAP seconds through statement_timeout: without the index each source row may scan the changelog).

Run: ``.venv/bin/python -m bench.verify_backlog``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import psycopg

from bench.common import Figure, bench_env, timer
from pg_partition.core import convert
from pg_partition.core.convert import capture, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities

GROUP = "verify"
BEFORE = os.environ.get("BENCH_VERIFY_BEFORE", "e9c8e76")  # the commit before issue 15's fixes


def _before_fix() -> ModuleType | None:
    """The per-partition verify of ``BEFORE`` (git show), loaded beside the current one for the comparison."""
    try:
        text = subprocess.run(["git", "show", f"{BEFORE}:provider/pg_partition/core/convert/verify.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = ModuleType("verify_before_fix")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(text, f"{BEFORE}:verify.py", "exec"), module.__dict__)
    return module


def main() -> int:
    rows = int(os.environ.get("BENCH_ROWS", "200000"))
    pct = int(os.environ.get("BENCH_BACKLOG_PCT", "20"))
    cap = int(os.environ.get("BENCH_VERIFY_CAP", "120"))
    with bench_env() as env:
        db = env.new_database()
        with env.connect(db) as conn:
            spec = ConvertSpec.create("activities", "created_at", period="month")
            seed_activities(conn, spec.table, rows=rows, months=12)
            ex = Executor(conn)
            convert.prep(ex, spec)
            convert.add_partitions(ex, spec, cover_data=True, future=1)
            capture.install(ex, spec.table, spec.intermediate)
            for item in convert.plan_fill(ex, spec)["items"]:
                convert.fill(ex, spec, item)
            conn.execute("UPDATE activities SET parameters = 'b' WHERE id %% 100 < %s", (pct,))
            backlog = capture.backlog(conn, spec.table)
            with timer() as t:
                indexed = verify.verify(conn, spec.table, spec.intermediate)
            assert indexed.ok, indexed.summary()
            conn.execute(f"DROP INDEX {capture.changelog_index_name(spec.table).ident.as_string(conn)}")
            conn.execute(f"SET statement_timeout = '{cap}s'")
            try:
                with timer() as u:
                    verify.verify(conn, spec.table, spec.intermediate)
                unindexed, note = u[0], ""
            except psycopg.errors.QueryCanceled:
                unindexed, note = float(cap), f"stopped at the {cap}s cap"
            env.add(Figure(GROUP, f"verify {rows:,} rows, {len(indexed.partitions)} partitions, backlog {backlog:,}",
                           t[0], "s", baseline=unindexed, baseline_name="same verify, changelog without index",
                           note=note))
            before = _before_fix()
            if before is not None:
                try:
                    with timer() as w:
                        before.verify(conn, spec.table, spec.intermediate)
                    old, note = w[0], ""
                except psycopg.errors.QueryCanceled:
                    old, note = float(cap), f"stopped at the {cap}s cap"
                env.add(Figure(GROUP, "verify (one snapshot, each side read once)", t[0], "s", baseline=old,
                               baseline_name=f"per-partition verify of {BEFORE}, no changelog index", note=note))
            print(f"source scans {indexed.source_scans}, destination scans {indexed.dest_scans}; {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
