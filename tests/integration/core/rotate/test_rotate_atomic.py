"""Issue 15 case 8: moving rows out of the DEFAULT partition never hides them from readers of the parent."""

from __future__ import annotations

import threading
from datetime import date

import psycopg

from pg_partition.core import rotate
from pg_partition.core.db.execute import Executor
from tests.integration.core.rotate.test_rotate import cfg, fill, make_events, row_hash


def test_default_rows_stay_visible_through_the_parent_during_the_move(db, conn) -> None:
    """A reader polls ``count(*)`` and an UPDATE hits the moving rows through the parent during the move: the
    count never drops below the total and every UPDATE finds its row (before: batches committed into a table not
    yet attached hid up to a third of the rows)."""
    make_events(conn, ["2024-11"], default=True)
    fill(conn, "2024-12-01", "2024-12-31", 60_000)  # all in the DEFAULT partition, to be moved into 2024-12
    fill(conn, "2024-11-01", "2024-11-30", 1_000)
    total = 61_000
    before = row_hash(conn)
    stop = threading.Event()
    counts: list[int] = []
    missed_updates: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        with db.connect() as r:
            while not stop.is_set():
                row = r.execute("SELECT count(*) FROM events").fetchone()
                assert row is not None
                counts.append(int(row[0]))

    def updater() -> None:
        with db.connect() as u:
            i = 0
            while not stop.is_set():
                i += 1
                rid = 1 + (i * 7919) % 60_000  # ids of December rows (the first fill)
                try:
                    cur = u.execute("UPDATE events SET payload = payload WHERE id = %s", (rid,))
                    if cur.rowcount != 1:
                        missed_updates.append(rid)
                except psycopg.Error as exc:  # pragma: no cover - reported below
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader), threading.Thread(target=updater)]
    for t in threads:
        t.start()
    try:
        while len(counts) < 5:
            stop.wait(0.01)
        result = rotate.premake(Executor(conn), cfg(batch_size=2_000), date(2024, 11, 20))
        n = len(counts)
        while len(counts) < n + 5:  # the reader keeps going after the ATTACH
            stop.wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert result.moved_rows == 60_000
    assert errors == []
    assert len(counts) > 10
    assert min(counts) == total and max(counts) == total, f"reader saw {min(counts)} of {total} rows"
    assert missed_updates == []
    assert row_hash(conn) == before
    assert conn.execute("SELECT count(*) FROM ONLY events_202412").fetchone() == (60_000,)
    assert conn.execute("SELECT count(*) FROM events_default").fetchone() == (0,)
