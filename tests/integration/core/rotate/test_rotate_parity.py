"""Issue 15 case 6, rotation side: new partitions keep the storage options and replica identity of the table."""

from __future__ import annotations

from datetime import date

from pg_partition.core import rotate
from pg_partition.core.db.execute import Executor
from tests.integration.core.rotate.test_rotate import cfg, make_events


def leaf_settings(conn, name: str) -> tuple[list[str], list[str], str]:
    row = conn.execute("SELECT coalesce(c.reloptions, '{}'), coalesce(t.reloptions, '{}'), c.relreplident "
                       "FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = %s::regclass",
                       (name,)).fetchone()
    return sorted(row[0]), sorted(row[1]), row[2]


def test_premade_partitions_copy_storage_options_and_replica_identity(conn) -> None:
    make_events(conn, ["2024-10", "2024-11"])
    for part in ("events_202410", "events_202411"):
        conn.execute(f"ALTER TABLE {part} SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, "
                     "toast.autovacuum_enabled = false)")
        conn.execute(f"ALTER TABLE {part} REPLICA IDENTITY FULL")
    expected = leaf_settings(conn, "events_202411")
    assert expected == (["autovacuum_vacuum_scale_factor=0.01", "fillfactor=70"], ["autovacuum_enabled=false"], "f")
    result = rotate.premake(Executor(conn), cfg(premake=2), date(2024, 11, 20))
    assert result.created == ["public.events_202412", "public.events_202501"]
    for made in result.created:
        assert leaf_settings(conn, made) == expected, made
