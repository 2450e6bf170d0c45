"""The harness itself and catalog introspection, against the real primary and standby."""

from __future__ import annotations

import time

import psycopg

from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from tools.seed import seed_activities


def test_standby_streams_from_primary(db, cluster) -> None:
    with db.connect() as conn:
        conn.execute("CREATE TABLE probe (x int)")
        conn.execute("INSERT INTO probe VALUES (42)")
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(db.standby_dsn()) as sconn:
                assert sconn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
                row = sconn.execute("SELECT x FROM probe").fetchone()
                if row == (42,):
                    break
        except (psycopg.errors.UndefinedTable, psycopg.OperationalError):  # not replayed yet
            pass
        assert time.monotonic() < deadline, "standby never replayed the write"
        time.sleep(0.2)


def test_seed_and_describe_activities(conn) -> None:
    name = seed_activities(conn, "public.activities", rows=20_000)
    info = catalog.describe(conn, name)
    assert info.relkind == "r"
    assert [c.name for c in info.columns][:3] == ["id", "trackable_type", "trackable_id"]
    assert info.primary_key is not None and info.primary_key.columns == ("id",)
    assert {i.columns for i in info.indexes if not i.is_primary} == {
        ("trackable_type", "trackable_id"), ("owner_type", "owner_id"), ("recipient_type", "recipient_id"),
        ("created_at",)}
    assert info.sequences == {"id": QualifiedName("public", "activities_id_seq")}
    assert info.row_estimate == 20_000
    assert info.sizes.total >= info.sizes.table > 0
    lo, hi, n = conn.execute("SELECT min(created_at), max(created_at), count(*) FROM activities").fetchone()
    assert n == 20_000 and (hi - lo).days > 26 * 28


def test_describe_partitions_fks_grants_publications(conn) -> None:
    conn.execute('CREATE SCHEMA "Sales"')
    conn.execute('CREATE TABLE "Sales"."Orders" (id bigint PRIMARY KEY, at timestamptz NOT NULL)')
    conn.execute('CREATE TABLE "Sales".lines (id bigint, order_id bigint REFERENCES "Sales"."Orders")')
    conn.execute("CREATE ROLE reader_t NOLOGIN") if not conn.execute(
        "SELECT 1 FROM pg_roles WHERE rolname = 'reader_t'").fetchone() else None
    conn.execute('GRANT SELECT ON "Sales"."Orders" TO reader_t')
    conn.execute('CREATE PUBLICATION pub_orders FOR TABLE "Sales"."Orders"')
    conn.execute("SET TimeZone = 'America/Chicago'")
    conn.execute("CREATE TABLE ev (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE ev_202401 PARTITION OF ev FOR VALUES FROM ('2024-01-01 00:00+00') "
                 "TO ('2024-02-01 00:00+00')")
    conn.execute("CREATE TABLE ev_default PARTITION OF ev DEFAULT")

    orders = catalog.describe(conn, QualifiedName.parse('"Sales"."Orders"'))
    assert orders.name == QualifiedName("Sales", "Orders")
    assert [fk.table for fk in orders.foreign_keys_in] == [QualifiedName("Sales", "lines")]
    assert any(g.startswith("reader_t=r/") for g in orders.grants)
    assert orders.publications == ["pub_orders"]

    ev = catalog.describe(conn, QualifiedName.parse("ev"))
    assert ev.is_partitioned and ev.partition_key == "RANGE (at)"
    assert [p.name.name for p in ev.partitions] == ["ev_202401", "ev_default"]
    first = ev.partitions[0]
    assert str(first.start_day) == "2024-01-01" and str(first.end_day) == "2024-02-01"
    assert ev.default_partition is not None and ev.default_partition.name.name == "ev_default"
