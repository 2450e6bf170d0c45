"""The cost report against real PostgreSQL and the moto S3 server: its numbers are pg_total_relation_size's and
the S3 object sizes, its history builds the before/after, and its chart is a real PNG stored beside the archive."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pg_partition.core.advise import cost
from pg_partition.core.db import state
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError
from tools.seed import seed_activities

TABLE = QualifiedName("public", "activities")
PREFIX = "archive/pgp"
GIB = 1024**3


def build_layout(conn: psycopg.Connection[Any]) -> None:
    """What a conversion plus one rotation leave: a partitioned table (3 months), the retired original, one
    detached partition queued for archive, and queue rows for the retired table and an already dropped one."""
    seed_activities(conn, "public.activities_retired", rows=3_000)
    conn.execute("""CREATE TABLE public.activities (id bigint NOT NULL, created_at timestamp NOT NULL, body text)
                    PARTITION BY RANGE (created_at)""")
    for month in (2, 3, 4):
        conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF public.activities FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier("public", f"activities_20240{month}"), sql.Literal(f"2024-0{month}-01"),
            sql.Literal(f"2024-0{month + 1}-01")))
    conn.execute("CREATE INDEX ON public.activities (created_at)")
    conn.execute("""INSERT INTO public.activities
                    SELECT g, timestamp '2024-02-01' + g * interval '1 hour', repeat(md5(g::text), 3)
                    FROM generate_series(1, 2000) g""")
    conn.execute("""CREATE TABLE public.activities_202401 AS
                    SELECT g AS id, timestamp '2024-01-01' + g * interval '1 hour' AS created_at, 'x' AS body
                    FROM generate_series(1, 400) g""")
    # VACUUM now: an autovacuum later would add visibility/free-space map forks and change the sizes between
    # the report and the assertions
    for name in ("public.activities", "public.activities_202401", "public.activities_retired"):
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(*name.split("."))))
    state.ensure_schema(conn)
    queue = sql.Identifier(state.SCHEMA, "archive_queue")
    for name, status in (("activities_202401", "pending"), ("activities_retired", "pending"),
                         ("activities_202312", "dropped")):
        conn.execute(sql.SQL("INSERT INTO {} (schema_name, table_name, parent_schema, parent_table, status) "
                             "VALUES ('public', %s, 'public', 'activities', %s)").format(queue), (name, status))


def put_archive_objects(bucket: Any, database: str) -> dict[str, int]:
    """Archived objects of this table, plus decoys that must not be counted. Returns the counted ones."""
    base = f"{PREFIX}/{database}/public/activities"
    counted = {
        f"{base}/period=2023-12/activities_202312.dump": 123_457,
        f"{base}/period=2023-12/_activities_202312.dump.manifest.json": 1_811,
        f"{base}/period=2023-11/activities_202311.dump": 98_765,
    }
    decoys = {
        f"{PREFIX}/{database}/public/activities_other/period=2023-12/x.dump": 5_000,
        f"{PREFIX}/otherdb/public/activities/period=2023-12/activities_202312.dump": 7_000,
        f"{PREFIX}/reports/public.activities/cost-20240101T000000Z.png": 300,
    }
    client = bucket.client()
    for key, size in {**counted, **decoys}.items():
        client.put_object(Bucket=bucket.name, Key=key, Body=b"\0" * size)
    return counted


def relation_size(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def leaves_size(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree(%s::regclass) "
                       "WHERE isleaf", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def listed_bytes(bucket: Any, prefix: str) -> int:
    """The S3 server's own answer, independently of the code under test."""
    resp = bucket.client().list_objects_v2(Bucket=bucket.name, Prefix=prefix)
    return sum(int(o["Size"]) for o in resp.get("Contents", []))


def assert_png(data: bytes) -> tuple[int, int]:
    from matplotlib import image as mpimg
    from PIL import Image

    assert data[:8] == cost.PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        size = img.size
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (size[1], size[0]) and pixels.std() > 0  # not a blank canvas
    return size


def test_numbers_match_the_server_and_s3(db: Any, conn: psycopg.Connection[Any], bucket: Any) -> None:
    build_layout(conn)
    counted = put_archive_objects(bucket, db.name)
    prefixes = cost.archive_prefixes(PREFIX, db.name, TABLE)
    assert prefixes == (f"{PREFIX}/{db.name}/public/activities/",)
    usage = cost.s3_usage(bucket.client(), bucket.name, prefixes)
    assert (usage.bytes, usage.objects) == (sum(counted.values()), len(counted))
    assert usage.bytes == listed_bytes(bucket, prefixes[0])

    r = cost.build_report(conn, TABLE, s3=usage, snapshot_id="first")
    a = r.after
    assert a.live.total == leaves_size(conn, "public.activities")
    assert [p.name for p in a.partitions] == [f"public.activities_20240{m}" for m in (2, 3, 4)]
    for p in a.partitions:
        assert p.total == relation_size(conn, p.name)
        assert p.total == p.table + p.indexes + p.toast
    assert sum(p.rows_estimate for p in a.partitions) == 2000
    assert a.retired is not None and a.retired.total == relation_size(conn, "public.activities_retired")
    # the retired table is queued too, but counted once; the dropped queue entry is not counted at all
    assert [d.name for d in a.detached] == ["public.activities_202401"]
    assert a.detached[0].total == relation_size(conn, "public.activities_202401")
    expected_db = (leaves_size(conn, "public.activities") + relation_size(conn, "public.activities_retired")
                   + relation_size(conn, "public.activities_202401"))
    assert a.database_bytes == expected_db and a.breakdown()["total"] == expected_db
    assert (a.s3_bytes, a.s3_objects) == (sum(counted.values()), 3)

    # no earlier measurement: the retired table (the original) is the "before"
    assert r.before.database_bytes == a.retired.total and r.before.s3_bytes == 0
    assert r.before.source.startswith("the retired table")
    after = r.cost_after
    assert after.database == pytest.approx(expected_db / GIB * 0.115)
    assert after.backups == pytest.approx(expected_db / GIB * 0.095)
    assert after.s3 == pytest.approx(sum(counted.values()) / GIB * 0.025)
    assert r.cost_before.total == pytest.approx(a.retired.total / GIB * (0.115 + 0.095))

    md = cost.render_markdown(r)
    assert "| **in the database** |" in md and "public.activities_retired (retired, to archive)" in md
    assert f"| public.activities_202402 | {a.partitions[0].rows_estimate:,} |" in md
    assert cost._usd(after.total, 6) in md and "| $0.00 | $0.00 |" not in md

    w, h = assert_png(cost.render_chart(r))
    assert w >= 800 and h >= 800


def test_prices_are_configurable(db: Any, conn: psycopg.Connection[Any]) -> None:
    seed_activities(conn, TABLE, rows=500)
    conn.execute("VACUUM public.activities")
    prices = cost.Prices(database=1.0, backups=0.5, s3=0.25)
    r = cost.build_report(conn, TABLE, prices=prices, before_bytes=4 * GIB)
    total = relation_size(conn, "public.activities")
    assert r.before.source == "given" and r.before.database_bytes == 4 * GIB
    assert r.cost_before.total == pytest.approx(4 * 1.5)
    assert r.cost_after.total == pytest.approx(total / GIB * 1.5)
    assert r.monthly_saving == pytest.approx(6 - total / GIB * 1.5)
    assert r.after.partitions == [] and r.after.retired is None and r.after.detached == []
    assert_png(cost.render_chart(r))  # an unpartitioned table charts as one bar
    # nothing was recorded without a snapshot id: the state schema was not even created
    assert conn.execute("SELECT to_regnamespace(%s)", (state.SCHEMA,)).fetchone() == (None,)


def test_history_gives_before_and_time_series(db: Any, conn: psycopg.Connection[Any], bucket: Any) -> None:
    build_layout(conn)
    t0 = datetime.now(timezone.utc)
    first = cost.build_report(conn, TABLE, snapshot_id="run1", taken_at=t0)
    retired_size = relation_size(conn, "public.activities_retired")
    assert first.after.s3_bytes == 0 and len(first.history) == 1

    # the archive run: the retired table and the detached partition go to S3 and are dropped
    conn.execute("DROP TABLE public.activities_retired, public.activities_202401")
    counted = put_archive_objects(bucket, db.name)
    usage = cost.s3_usage(bucket.client(), bucket.name, cost.archive_prefixes(PREFIX, db.name, TABLE))
    second = cost.build_report(conn, TABLE, s3=usage, snapshot_id="run2", taken_at=t0 + timedelta(hours=1))
    assert [s.taken_at for s in second.history] == [first.after.taken_at, second.after.taken_at]
    assert second.before.database_bytes == retired_size and second.before.s3_bytes == 0
    assert second.after.retired is None and second.after.detached == []
    assert second.after.database_bytes == leaves_size(conn, "public.activities")
    assert second.after.s3_bytes == sum(counted.values())
    assert second.monthly_saving > 0
    assert_png(cost.render_chart(second))

    # a retried task (same snapshot id) replaces its own point instead of adding one
    retry = cost.build_report(conn, TABLE, s3=usage, snapshot_id="run2", taken_at=t0 + timedelta(hours=2))
    assert len(retry.history) == 2
    assert [s.taken_at for s in cost.history(conn, TABLE)] == [first.after.taken_at, retry.after.taken_at]


def test_missing_table_is_refused(db: Any, conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        cost.build_report(conn, QualifiedName("public", "nope"), snapshot_id="x")
    assert conn.execute("SELECT to_regnamespace(%s)", (state.SCHEMA,)).fetchone() == (None,)


def test_report_key_layout() -> None:
    at = datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=timezone.utc)
    assert cost.report_key("p/q/", QualifiedName("s", "t"), at) == "p/q/reports/s.t/cost-20240506T070809.000010Z.png"
    assert cost.report_key("", QualifiedName("s", "t"), at, "md") == "reports/s.t/cost-20240506T070809.000010Z.md"
    assert cost.archive_prefixes("", "d b", QualifiedName("s", "a/b")) == ("d b/s/a%2Fb/",)


def test_cost_report_dag_logs_table_and_stores_chart(db: Any, conn: psycopg.Connection[Any], bucket: Any,
                                                     run_dag: Any) -> None:
    build_layout(conn)
    counted = put_archive_objects(bucket, db.name)
    conf = {"conn_id": db.conn_id, "table": "public.activities", "aws_conn_id": bucket.conn_id,
            "bucket": bucket.name, "prefix": PREFIX}
    result = run_dag("pg_partition_cost_report", conf)
    assert result.state == "success", result.task_states
    out = result.xcom("cost_report")
    assert out["after"]["s3_bytes"] == sum(counted.values())
    assert out["after"]["database_bytes"] == (leaves_size(conn, "public.activities")
                                              + relation_size(conn, "public.activities_retired")
                                              + relation_size(conn, "public.activities_202401"))
    assert out["prices"] == {"database": 0.115, "backups": 0.095, "s3": 0.025}
    uri = out["chart_uri"]
    assert uri.startswith(f"s3://{bucket.name}/{PREFIX}/reports/public.activities/cost-") and uri.endswith(".png")
    key = uri.split("/", 3)[3]
    body = bucket.client().get_object(Bucket=bucket.name, Key=key)["Body"].read()
    assert len(body) == out["chart_bytes"]
    assert_png(body)
    md_key = out["markdown_uri"].split("/", 3)[3]
    md = bucket.client().get_object(Bucket=bucket.name, Key=md_key)["Body"].read().decode()
    assert md.startswith("### Cost report: public.activities")

    # a second run (after another archive run): the report PNGs are not counted as archive bytes, and the
    # time series has two points
    again = run_dag("pg_partition_cost_report", conf)
    assert again.state == "success", again.task_states
    out2 = again.xcom("cost_report")
    assert out2["after"]["s3_bytes"] == sum(counted.values()) and out2["history_points"] == 2
    # the decoy put by put_archive_objects, and a PNG + a Markdown per run
    assert len(bucket.keys(f"{PREFIX}/reports/public.activities/")) == 1 + 2 * 2


def test_cost_report_dag_fails_clearly_and_stores_nothing(db: Any, bucket: Any, run_dag: Any) -> None:
    result = run_dag("pg_partition_cost_report", {"conn_id": db.conn_id, "table": "public.nope",
                                                   "aws_conn_id": bucket.conn_id, "bucket": bucket.name,
                                                   "prefix": PREFIX})
    assert result.state == "failed" and result.task_states["cost_report"] == "failed"
    assert bucket.keys() == []
