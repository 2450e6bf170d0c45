"""The rollback paths: unswap (with rows written after the swap carried back) and unprep, then converting again."""

from __future__ import annotations

import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec, recorded_job
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import StateError
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all, row_hash, snapshot
from tools.seed import seed_activities

TABLE = QualifiedName("public", "activities")


def test_unswap_carries_new_rows_back_and_restores_names_then_unprep_and_convert_again(conn) -> None:
    seed_activities(conn, TABLE, rows=10_000, timestamptz=True)
    conn.execute("CREATE PUBLICATION acts FOR TABLE activities")
    original = snapshot(conn)
    source_indexes = {i.name for i in catalog.describe(conn, TABLE).indexes}
    spec = ConvertSpec.create("activities", "created_at", period="month")
    convert_all(conn, spec)
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 25)")
    after_swap = row_hash(conn, "activities")
    assert after_swap[0] == 10_025

    ex = Executor(conn)
    result = convert.unswap(ex, spec)
    assert result["copied_back_rows"] == 25 and result["lock_ms"] > 0
    info = catalog.describe(conn, TABLE)
    assert not info.is_partitioned
    assert row_hash(conn, "activities") == after_swap == row_hash(conn, "activities_intermediate")
    assert {i.name for i in info.indexes} == source_indexes
    assert info.sequences == {"id": QualifiedName("public", "activities_id_seq")}
    assert info.publications == ["acts"]
    assert catalog.describe(conn, spec.intermediate).publications == []
    new_id = conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now()) RETURNING id"
                          ).fetchone()[0]
    assert new_id == 10_026
    assert convert.unswap(ex, spec) == {"already_unswapped": True}

    assert convert.unprep(ex, spec)["dropped"] is True
    assert recorded_job(conn, TABLE) is None
    now = snapshot(conn)
    assert {r[:2] for r in now["relations"] if r[0] == "public"} == {
        r[:2] for r in original["relations"] if r[0] == "public"}
    assert convert.unprep(ex, spec)["dropped"] is False  # idempotent

    # a different conversion is welcome once the first one is rolled back
    day = ConvertSpec.create("activities", "created_at", period="week", primary_key="composite")
    before = row_hash(conn, "activities")
    convert_all(conn, day)
    assert row_hash(conn, "activities") == before
    assert catalog.describe(conn, TABLE).is_partitioned


def test_unswap_identity_restarts_the_original_identity(conn) -> None:
    seed_activities(conn, TABLE, rows=3_000, timestamptz=False, identity=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    convert_all(conn, spec)
    ids = [r[0] for r in conn.execute("INSERT INTO activities (created_at, updated_at) "
                                      "SELECT now(), now() FROM generate_series(1, 3) RETURNING id")]
    assert ids == [3_001, 3_002, 3_003]
    convert.unswap(Executor(conn), spec)
    info = catalog.describe(conn, TABLE)
    assert info.column("id").identity == "d"
    assert info.sequences["id"] == QualifiedName("public", "activities_id_seq")
    assert conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now()) RETURNING id"
                        ).fetchone()[0] == 3_004
    assert conn.execute("SELECT count(*) FROM activities").fetchone()[0] == 3_004


def test_unprep_is_refused_while_swapped(conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at")
    convert_all(conn, spec)
    before = snapshot(conn)
    with pytest.raises(StateError, match="run unswap first"):
        convert.unprep(Executor(conn), spec)
    assert snapshot(conn) == before


def test_unprep_before_any_fill(conn) -> None:
    seed_activities(conn, TABLE, rows=1_000, timestamptz=True)
    original = snapshot(conn)
    spec = ConvertSpec.create("activities", "created_at", default_partition=True)
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True)
    assert catalog.exists(conn, spec.default_name)
    convert.unprep(ex, spec)
    now = snapshot(conn)
    assert {r[:2] for r in now["relations"] if r[0] == "public"} == {
        r[:2] for r in original["relations"] if r[0] == "public"}
