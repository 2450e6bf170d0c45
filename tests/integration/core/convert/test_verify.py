"""Verification: per-partition count + content hash, naming the partition and the differing key ranges."""

from __future__ import annotations

import psycopg
import pytest

from pg_partition.core.convert import capture, replay, verify
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, VerificationError
from pg_partition.core.db.execute import Executor
from tests.support.capture import fill, make_intermediate, retired, swap
from tools.seed import seed_activities

SRC = QualifiedName("public", "activities")


@pytest.fixture
def filled(conn):
    seed_activities(conn, SRC, rows=12_000, months=5, indexes=False)
    dest = make_intermediate(conn, SRC)
    fill(conn, SRC, dest, batch=5000)
    return dest


def _part_of(conn: psycopg.Connection, key: int) -> str:
    return conn.execute("SELECT tableoid::regclass::text FROM activities_intermediate WHERE id = %s",
                        (key,)).fetchone()[0]


def test_identical_copy_verifies(conn, filled) -> None:
    report = verify.verify(conn, SRC, filled, raise_on_mismatch=True)
    assert report.ok and report.outside_rows == 0
    assert report.rows == 12_000 == sum(p.source_rows for p in report.partitions)
    assert len(report.partitions) >= 6
    assert all(p.source_hash == p.dest_hash and p.source_hash != "0" for p in report.partitions if p.source_rows)
    assert "matches" in report.summary()
    d = report.as_dict()
    assert d["ok"] is True and d["partitions"][0]["ok"] is True


def test_planted_mismatch_names_partition_and_key_ranges(conn, filled) -> None:
    p_changed, p_gone = _part_of(conn, 1234), _part_of(conn, 8000)
    conn.execute("UPDATE activities_intermediate SET parameters = parameters || 'x' WHERE id = 1234")  # content
    conn.execute("DELETE FROM activities_intermediate WHERE id BETWEEN 8000 AND 8004")  # missing rows
    conn.execute("INSERT INTO activities_intermediate (id, key, created_at, updated_at) "
                 "SELECT 999999, key, created_at, updated_at FROM activities WHERE id = 9000")  # extra row

    report = verify.verify(conn, SRC, filled)
    assert not report.ok
    bad = {p.partition: p for p in report.mismatches}
    assert f"public.{p_changed}" in bad and f"public.{p_gone}" in bad
    changed = bad[f"public.{p_changed}"]
    assert changed.source_rows == changed.dest_rows and changed.source_hash != changed.dest_hash
    assert [(d.low, d.high, d.source_rows, d.dest_rows) for d in changed.diffs] == [(1234, 1234, 1, 1)]
    gone = bad[f"public.{p_gone}"]
    assert (8000, 8004, 5, 0) in [(d.low, d.high, d.source_rows, d.dest_rows) for d in gone.diffs]
    extra = [d for p in report.mismatches for d in p.diffs if d.low == 999999]
    assert [(d.source_rows, d.dest_rows) for d in extra] == [(0, 1)]

    with pytest.raises(VerificationError) as err:
        report.raise_if_mismatch()
    text = str(err.value)
    assert f"partition public.{p_gone}" in text and "id 8000..8004 (source 5 rows, destination 0)" in text
    assert "id 1234 (source 1 rows, destination 1)" in text and "How to fix" in text

    # only= restricts to named partitions
    one = verify.verify(conn, SRC, filled, only=[p_changed])
    assert [p.partition for p in one.partitions] == [f"public.{p_changed}"]


def test_pending_changes_are_excluded_until_replayed(conn) -> None:
    seed_activities(conn, SRC, rows=4000, months=4, indexes=False)
    dest = make_intermediate(conn, SRC)
    capture.install(Executor(conn), SRC, dest)
    fill(conn, SRC, dest)
    conn.execute("UPDATE activities SET key = 'changed' WHERE id IN (10, 20, 30)")
    conn.execute("DELETE FROM activities WHERE id = 40")

    report = verify.verify(conn, SRC, dest)
    assert report.ok, report.summary()
    assert sum(p.excluded_keys for p in report.partitions) == 3  # 40 is gone from the source side

    strict = verify.verify(conn, SRC, dest, exclude_pending=False)
    assert not strict.ok
    assert sorted(d.low for p in strict.mismatches for d in p.diffs) == [10, 20, 30, 40]

    replay.replay(conn, SRC, dest)
    assert verify.verify(conn, SRC, dest, exclude_pending=False).ok


def test_rows_outside_every_partition_and_default_partition(conn, filled) -> None:
    conn.execute("INSERT INTO activities (id, key, created_at, updated_at) VALUES (50000, 'x', '1999-01-01', now())")
    report = verify.verify(conn, SRC, filled)
    assert not report.ok and report.outside_rows == 1
    assert "1 rows of public.activities fall in no partition" in report.summary()

    conn.execute("CREATE TABLE activities_intermediate_default PARTITION OF activities_intermediate DEFAULT")
    conn.execute("INSERT INTO activities_intermediate SELECT * FROM activities WHERE id = 50000")
    report = verify.verify(conn, SRC, filled)
    assert report.ok, report.summary()
    default = [p for p in report.partitions if p.range_from is None]
    assert [(p.partition, p.source_rows, p.dest_rows) for p in default] == [
        ("public.activities_intermediate_default", 1, 1)]


def test_after_swap_retired_against_new(conn, filled) -> None:
    capture.install(Executor(conn), SRC, filled)
    conn.execute("UPDATE activities SET key = 'before swap' WHERE id = 77")
    swap(conn, SRC, filled)
    old = retired(SRC)
    assert verify.verify(conn, old, SRC).ok
    conn.execute("UPDATE activities SET key = 'after swap' WHERE id = 78")  # the application, after the swap
    after = verify.verify(conn, old, SRC)
    assert [(d.low, d.high) for p in after.mismatches for d in p.diffs] == [(78, 78)]
    assert verify.verify(conn, old, SRC, exclude_keys=[78]).ok


def test_refusals(conn, filled) -> None:
    with pytest.raises(InvalidInputError, match="partitioned"):
        verify.verify(conn, filled, SRC)
    with conn.transaction(), pytest.raises(InvalidInputError, match="outside a transaction"):
        verify.verify(conn, SRC, filled)


@pytest.mark.parametrize("extra", ["", ", doc json, spot point"])
def test_row_hash_form_and_its_fallback_both_catch_a_changed_value(conn, extra) -> None:
    """Rows are hashed by value (hash_record_extended, PostgreSQL 14+) when every column type has an extended
    hash function, else by their text; a type without one (json, point) is found by PostgreSQL itself, even when
    the table is empty, and both forms find a changed value in any column."""
    conn.execute(f"CREATE TABLE ev (id bigint PRIMARY KEY, amount numeric(12,2), tags text[], at timestamptz NOT "
                 f"NULL{extra})")
    conn.execute(f"CREATE TABLE ev_copy (id bigint NOT NULL, amount numeric(12,2), tags text[], at timestamptz NOT "
                 f"NULL{extra}) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE ev_copy_2024 PARTITION OF ev_copy FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    conn.execute("ALTER TABLE ev_copy_2024 ADD PRIMARY KEY (id)")
    src, dest = QualifiedName("public", "ev"), QualifiedName("public", "ev_copy")
    binary = conn.info.server_version >= 140000 and not extra
    form = verify.row_hash(conn, src, ["id", "amount", "tags", "at"] + (["doc", "spot"] if extra else []))
    assert form.as_string(conn).startswith("hash_record_extended(" if binary else "hashtextextended(")
    values = ", '{\"a\": 1}', point(1, 2)" if extra else ""
    conn.execute(f"INSERT INTO ev SELECT g, g * 1.5, ARRAY['a', g::text], '2024-03-01'::timestamptz + g * "
                 f"interval '1 hour'{values} FROM generate_series(1, 500) g")
    conn.execute("INSERT INTO ev_copy SELECT * FROM ev")
    assert verify.verify(conn, src, dest).ok
    changes = ["UPDATE ev_copy SET tags = ARRAY['a', 'b'] WHERE id = 7"]
    if extra:
        changes.append("UPDATE ev_copy SET doc = '{\"a\": 2}' WHERE id = 9")
    for change in changes:
        conn.execute(change)
    report = verify.verify(conn, src, dest)
    assert not report.ok
    assert sorted(d.low for p in report.mismatches for d in p.diffs) == ([7, 9] if extra else [7])
