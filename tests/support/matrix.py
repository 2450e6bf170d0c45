"""Helpers for the version-matrix scenarios (tests/matrix): which server this session runs, the results file the
matrix runner (tools/matrix.py) turns into docs/support-matrix.md, row-level hashes and standby catch-up.

Results are written only when ``MATRIX_RESULTS`` names a folder (the runner sets it); a plain ``make test`` runs the
same scenarios on the default version and writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql


def results_file(major: int) -> Path | None:
    folder = os.environ.get("MATRIX_RESULTS")
    return Path(folder) / f"pg{major}.json" if folder else None


def record(major: int, section: str, key: str, value: Any) -> None:
    """Merge ``{section: {key: value}}`` into this version's results file (one pytest process per version)."""
    path = results_file(major)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(section, {})[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def table_hash(conn: psycopg.Connection[Any], query: sql.Composable | str) -> tuple[int, str]:
    """(rows, md5 over every row's md5 in id order) of ``query``'s rows: equal hashes, equal rows."""
    row = conn.execute(sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY t.id)), '') FROM ({}) t"
    ).format(sql.SQL(query) if isinstance(query, str) else query)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def wait_for_standby_replay(primary: psycopg.Connection[Any], standby_dsn: str, poll: float = 0.05) -> None:
    """Until the standby has replayed everything the primary had written when called (pytest-timeout guards)."""
    target = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
    assert target is not None
    with psycopg.connect(standby_dsn, autocommit=True) as standby:
        while True:
            row = standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target[0],)).fetchone()
            if row is not None and row[0]:
                return
            time.sleep(poll)
