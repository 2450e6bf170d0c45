"""The product's whole lifecycle on this server version, as the non-superuser owner ``app_owner`` (owner of the
database and of every table the test creates, member of pg_monitor, neither superuser nor replication), through
the real DAGs (``dag.test()``), real PostgreSQL primary + streaming standby and a real S3 endpoint:

* conversion with change capture while the application writes, verify, swap, then unswap; the new table equals
  the retired one row for row (except keys written after the swap), the standby has the same rows;
* rotation: rows waiting in the DEFAULT partition moved into the premade partition, old partitions detached
  (CONCURRENTLY where the server has it and no DEFAULT exists), nothing lost;
* Parquet archive of a detached partition and its restore, row-level equal;
* pg_dump archive and restore where the client (Debian's pg_dump) can dump this server; on a newer server the
  archive is refused before anything is written, with a message naming the client package and Parquet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pg_partition.core import archive
from pg_partition.core.archive.policy import EXTENSIONS
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import PreflightError
from pg_partition.operators.convert import ConvertUnswapOperator
from tests.support import matrix
from tests.support.archive import DETACHED, PARENT, partitioned_activities, row_hash
from tests.support.capture import Writer, same_columns_hash
from tools.seed import seed_activities
from tools.stack import client_bindir, tool_major

TABLE = QualifiedName("public", "activities")
ROWS = 20_000


def _wait_for(predicate: Any, poll: float = 0.05) -> None:
    while not predicate():
        time.sleep(poll)


def _owner_of(conn: Any, table: str) -> str:
    return str(conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass",
                            (table,)).fetchone()[0])


def test_runs_as_a_non_superuser_owner(owner_db, owner_conn) -> None:
    """The premise of every scenario here: the connection the DAGs use is not privileged."""
    row = owner_conn.execute(
        "SELECT current_user, rolsuper, rolreplication, rolcreaterole, rolcreatedb, "
        "pg_has_role(current_user, 'pg_monitor', 'MEMBER'), "
        "(SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()) "
        "FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row == ("app_owner", False, False, False, False, True, "app_owner")


def test_convert_with_capture_under_a_writer_verify_swap_unswap(owner_db, owner_conn, cluster, run_dag) -> None:
    seed_activities(owner_conn, TABLE, rows=ROWS, months=6)
    assert _owner_of(owner_conn, "public.activities") == "app_owner"
    writer = Writer(owner_db.dsn, TABLE, low=20, high=ROWS, seed=14)
    writer.start()
    _wait_for(lambda: sum(writer.ops.values()) >= 20 or bool(writer.errors))
    common = {"conn_id": owner_db.conn_id, "table": str(TABLE), "column": "created_at", "period": "month"}
    result = run_dag("pg_partition_convert", {**common, "future": 3, "cover_data": True, "batch_size": 2_000,
                                              "capture_changes": "on", "lock_timeout": "2s", "lock_retries": 10})
    if result.state != "success":
        writer.stop_event.set()
        writer.join()
    assert result.state == "success", result.task_states
    _wait_for(lambda: sum(writer.post_swap_ops.values()) >= 30 or bool(writer.errors))
    writer.stop()

    assert result.xcom("verify")["ok"] is True
    assert result.xcom("add_partitions")["capture"]["capture"] is True and result.xcom("replay")["entries"] > 0
    assert catalog.describe(owner_conn, TABLE).is_partitioned
    assert _owner_of(owner_conn, "public.activities") == "app_owner"
    retired = QualifiedName("public", "activities_retired")
    post = writer.post_swap_keys
    assert post, "the application wrote after the swap"
    a, b = same_columns_hash(owner_conn, retired, TABLE, exclude=post)
    assert a == b and a[0] > ROWS // 2

    # the standby streamed all of it
    with owner_db.connect() as c:
        primary_hash = matrix.table_hash(c, "SELECT * FROM public.activities")
        matrix.wait_for_standby_replay(c, owner_db.standby_dsn())
    with psycopg.connect(owner_db.standby_dsn(), autocommit=True) as standby:
        # replayed up to the primary's LSN; the rows must match (polled briefly: one run on a loaded machine saw
        # a different hash right after the LSN check, which this would show as a timeout with both hashes)
        deadline = time.monotonic() + 60
        while (standby_hash := matrix.table_hash(standby, "SELECT * FROM public.activities")) != primary_hash:
            assert time.monotonic() < deadline, (standby_hash, primary_hash)
            time.sleep(0.5)

    # unswap: the original table is back under its name with every row inserted after the swap (its documented
    # contract: updates/deletes made after the swap to older rows are not carried back)
    expected = matrix.table_hash(owner_conn, (
        "SELECT * FROM public.activities_retired UNION ALL SELECT p.* FROM public.activities p "
        "WHERE NOT EXISTS (SELECT 1 FROM public.activities_retired r WHERE r.id = p.id)"))
    assert expected[0] > a[0]
    out = ConvertUnswapOperator(task_id="unswap", **common).execute({})
    assert out.get("already_unswapped") is not True and out["copied_back_rows"] > 0, out
    assert not catalog.describe(owner_conn, TABLE).is_partitioned
    assert matrix.table_hash(owner_conn, "SELECT * FROM public.activities") == expected


def _make_events(conn: Any, name: str, months: list[str], *, default: bool) -> None:
    conn.execute(f"CREATE TABLE {name} (id bigint GENERATED BY DEFAULT AS IDENTITY, created_at timestamptz NOT NULL, "
                 "payload text) PARTITION BY RANGE (created_at)")
    for m in months:
        y, mo = map(int, m.split("-"))
        ny, nmo = (y + 1, 1) if mo == 12 else (y, mo + 1)
        conn.execute(f"CREATE TABLE {name}_{y}{mo:02d} PARTITION OF {name} FOR VALUES FROM "
                     f"('{y}-{mo:02d}-01 00:00+00') TO ('{ny}-{nmo:02d}-01 00:00+00')")
    if default:
        conn.execute(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT")
    conn.execute(f"INSERT INTO {name} (created_at, payload) SELECT %s::timestamptz + g * interval '1 hour', "
                 "md5(g::text) FROM generate_series(0, 5000) g", (f"{months[0]}-01",))


def test_rotate_moves_default_rows_and_detaches(owner_db, owner_conn, cluster, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, run_dag) -> None:
    months = ["2024-05", "2024-06", "2024-07", "2024-08", "2024-09", "2024-10", "2024-11"]
    _make_events(owner_conn, "events", months, default=True)
    _make_events(owner_conn, "events_nd", months, default=False)
    # rows that arrived before their month's partition existed: they sit in the DEFAULT partition
    owner_conn.execute("INSERT INTO events (created_at, payload) SELECT '2024-12-01 00:00+00'::timestamptz "
                       "+ g * interval '7 hours', 'early' FROM generate_series(0, 199) g")
    before = {t: matrix.table_hash(owner_conn, f"SELECT * FROM {t}") for t in ("events", "events_nd")}
    assert owner_conn.execute("SELECT count(*) FROM events_default").fetchone() == (200,)

    config = tmp_path / "pg_partition.yaml"
    config.write_text(f"""
defaults:
  premake: 2
  retention: 3
  default_partition: move_rows
  archive: {{bucket: archive-bucket, prefix: pg, aws_conn_id: aws_test, format: parquet}}
tables:
  - {{conn_id: {owner_db.conn_id}, table: public.events}}
  - {{conn_id: {owner_db.conn_id}, table: public.events_nd}}
""")
    monkeypatch.setenv("PG_PARTITION_CONFIG", str(config))
    result = run_dag("pg_partition_rotate", {"today": "2024-11-20"})
    assert result.state == "success", result.task_states

    assert owner_conn.execute("SELECT count(*) FROM events_default").fetchone() == (0,)
    moved = owner_conn.execute("SELECT (SELECT count(*) FROM events_202412), (SELECT count(*) FROM events_202501)"
                               ).fetchone()
    assert moved == (107, 93)  # every 7 hours from Dec 1st: 107 in December, the rest in January
    detached = [result.xcom("rotate.detach", i) for i in (0, 1)]
    by_table = {("events_nd" if any("events_nd" in d for d in r["detached"]) else "events"): r for r in detached}
    for name in ("events", "events_nd"):
        r = by_table[name]
        assert [d.split(".")[-1] for d in r["detached"]] == [f"{name}_2024{m:02d}" for m in (5, 6, 7)], r
        archived = " UNION ALL ".join(f"SELECT * FROM {d}" for d in r["detached"])
        assert matrix.table_hash(owner_conn, f"SELECT * FROM {name} UNION ALL {archived}") == before[name]
    # a DEFAULT partition always forces plain DETACH; without one, CONCURRENTLY where the server has it (14+)
    assert len(by_table["events"]["fallbacks"]) == 3
    concurrent = not by_table["events_nd"]["fallbacks"]
    matrix.record(cluster.primary.major, "features", "rotation detach",
                  {"works": True, "why": "CONCURRENTLY" if concurrent else "plain DETACH under lock_timeout"})
    assert concurrent == (cluster.primary.major >= 14), by_table["events_nd"]


def _archive_and_restore(owner_db, owner_conn, bucket, run_dag, fmt: str) -> None:
    s = partitioned_activities(owner_conn, policy={"bucket": bucket.name, "aws_conn_id": bucket.conn_id,
                                                   "format": fmt, "prefix": "pg-partition", "drop": True})
    result = run_dag("pg_partition_archive", {"conn_ids": [owner_db.conn_id], "bucket": bucket.name,
                                              "aws_conn_id": bucket.conn_id, "max_lag_bytes": "1GB"})
    assert result.state == "success", result.task_states
    out = result.xcom("archive", 0)
    assert (out["status"], out["format"]) == ("dropped", fmt), out
    assert not catalog.exists(owner_conn, DETACHED)
    ext = EXTENSIONS[fmt]
    keys = bucket.keys()
    assert f"pg-partition/{owner_db.name}/public/activities/period=2024-01/activities_202401{ext}" in keys

    restored = run_dag("pg_partition_restore", {
        "conn_id": owner_db.conn_id, "table": "public.activities", "period": "2024-01", "target": "attach",
        "bucket": bucket.name, "aws_conn_id": bucket.conn_id})
    assert restored.state == "success", restored.task_states
    assert restored.xcom("restore")["status"] == "restored"
    assert row_hash(owner_conn, PARENT.sibling("activities_202401")) == s.hash
    assert row_hash(owner_conn, PARENT) == s.parent_hash


def test_parquet_archive_and_restore(owner_db, owner_conn, cluster, bucket, run_dag) -> None:
    _archive_and_restore(owner_db, owner_conn, bucket, run_dag, "parquet")
    matrix.record(cluster.primary.major, "features", "Parquet archive + restore", {"works": True, "why": ""})


def test_pg_dump_archive_where_the_client_allows(owner_db, owner_conn, cluster, bucket, run_dag) -> None:
    client = client_bindir()
    assert client is not None, "the PostgreSQL client programs (pg_dump) are part of the test machine"
    client_major, server_major = tool_major(client / "pg_dump"), cluster.primary.major
    if client_major >= server_major:
        _archive_and_restore(owner_db, owner_conn, bucket, run_dag, "pg_dump")
        matrix.record(server_major, "features", "pg_dump archive + restore",
                      {"works": True, "why": f"pg_dump {client_major}"})
        return
    # a pg_dump older than the server: refused up front, naming the package to install and the alternative
    s = partitioned_activities(owner_conn, policy={"bucket": bucket.name, "aws_conn_id": bucket.conn_id,
                                                   "format": "pg_dump", "prefix": "pg-partition", "drop": True})
    with pytest.raises(PreflightError) as refused:
        archive.check_pg_dump(owner_conn)
    message = str(refused.value)
    assert f"postgresql-client-{server_major}" in message and "parquet" in message.lower(), message
    result = run_dag("pg_partition_archive", {"conn_ids": [owner_db.conn_id], "bucket": bucket.name,
                                              "aws_conn_id": bucket.conn_id, "max_lag_bytes": "1GB"})
    assert result.state == "failed" and result.task_states["archive[0]"] == "failed", result.task_states
    assert bucket.keys() == []  # nothing written
    assert row_hash(owner_conn, DETACHED) == s.hash  # nothing dropped
    status, error = owner_conn.execute("SELECT status, last_error FROM pgpartition.archive_queue WHERE id = %s",
                                       (s.queue_id,)).fetchone()
    assert status == "failed" and "older than the server" in error  # retried by the next run once fixed
    matrix.record(server_major, "features", "pg_dump archive + restore",
                  {"works": False, "why": f"refused up front: pg_dump {client_major} < server {server_major}"})


def test_missing_privileges_are_refused_up_front_with_the_grant_to_run(owner_db, owner_conn, run_dag) -> None:
    """A role that owns the table but may not create schemas in the database (CREATE on it revoked, as a DBA
    might): the conversion stops at preflight, names the exact GRANT, and changes nothing."""
    from pg_partition.core.convert.preflight import check
    from pg_partition.core.convert.spec import ConvertSpec

    seed_activities(owner_conn, TABLE, rows=500, months=2, indexes=False)
    with owner_db.admin_connect() as admin:
        admin.execute(f'REVOKE CREATE ON DATABASE "{owner_db.name}" FROM app_owner, PUBLIC')
    before = matrix.table_hash(owner_conn, "SELECT * FROM public.activities")
    relations = owner_conn.execute("SELECT count(*) FROM pg_class").fetchone()
    with pytest.raises(PreflightError, match=rf'GRANT CREATE ON DATABASE "?{owner_db.name}"? TO "?app_owner"?;'):
        check(owner_conn, ConvertSpec.create(str(TABLE), "created_at"))
    result = run_dag("pg_partition_convert", {"conn_id": owner_db.conn_id, "table": str(TABLE),
                                              "column": "created_at", "period": "month"})
    assert result.state == "failed" and result.task_states["preflight"] == "failed", result.task_states
    assert owner_conn.execute("SELECT count(*) FROM pg_class").fetchone() == relations
    assert owner_conn.execute("SELECT to_regnamespace('pgpartition')").fetchone() == (None,)
    assert matrix.table_hash(owner_conn, "SELECT * FROM public.activities") == before


def test_advisor_as_the_owner(owner_db, owner_conn, run_dag) -> None:
    """The advisor reads statistics and sizes (pg_monitor is enough) and finds the append-only table."""
    seed_activities(owner_conn, "public.events", rows=6_000, months=6)
    # statistics reach pg_stat_user_tables asynchronously before 15 (no pg_stat_force_next_flush there)
    _wait_for(lambda: owner_conn.execute(
        "SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relname = 'events'").fetchone()[0] > 0)
    result = run_dag("pg_partition_advisor", {"conn_id": owner_db.conn_id, "memory_gb": 0.0001, "min_gb": 0})
    assert result.state == "success", result.task_states
    report = result.xcom("assess")
    assert report["scope"] == "database" and report["candidates"] == ["public.events"], report
    assert report["convert_params"]["public.events"]["column"] == "created_at"
