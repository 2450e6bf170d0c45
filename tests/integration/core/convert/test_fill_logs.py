"""Logs at terabyte scale (issue 17): a fill logs its first batch's SQL at INFO as the template and every other
batch's at DEBUG (logger ``pg_partition.sql``), one line saying so, and its progress lines at INFO."""

from __future__ import annotations

import logging

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities


def test_fill_logs_the_batch_template_once_at_info_and_the_rest_at_debug(conn, caplog) -> None:
    seed_activities(conn, QualifiedName("public", "activities"), rows=3_000, months=1)
    spec = ConvertSpec.create("public.activities", "created_at", period="year")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, past=0, future=0, cover_data=True)
    items = convert.plan_fill(ex, spec, batch_size=500)["items"]
    # the SQL logger's own level is set by operators from [pg_partition] sql_log_level (an earlier test in this
    # process may have run one): open both loggers to DEBUG
    with caplog.at_level(logging.DEBUG, logger="pg_partition"), caplog.at_level(logging.DEBUG,
                                                                                logger="pg_partition.sql"):
        results = [convert.fill(ex, spec, it) for it in items]
    batches = sum(r["batches"] for r in results)
    assert batches >= 6 and sum(r["rows"] for r in results) == 3_000
    sql_lines = [r for r in caplog.records if r.name == "pg_partition.sql"]
    inserts = [r for r in sql_lines if r.getMessage().startswith("SQL: INSERT")]
    assert len(inserts) == batches  # every statement is still logged, so DEBUG shows them all
    filled = [r for r in results if r["batches"]]
    assert sorted(r.levelname for r in inserts).count("INFO") == len(filled)  # one template per item
    assert {r.levelname for r in sql_lines if r.levelname != "INFO"} == {"DEBUG"}
    others = [r.getMessage() for r in caplog.records if r.name == "pg_partition"]
    assert any("run the same two statements" in m and "(their SQL at DEBUG)" in m for m in others), others
    assert any(m.startswith("fill ") and "rows/s" in m for m in others)  # the progress line, at INFO
