"""The short soak (issue 15): a conversion with change capture under a sustained mixed write load (pgbench,
INSERT/UPDATE/DELETE at a fixed rate), every write mirrored into a truth table in the same transaction; the
converted table must equal the truth table row for row. ``make soak`` runs the long one (>= 2M rows)."""

from __future__ import annotations

import os

from bench.soak import run_soak
from tools.stack import pg_bindir

ROWS = int(os.environ.get("SOAK_TEST_ROWS", "50000"))
RATE = int(os.environ.get("SOAK_TEST_RATE", "50"))
SECONDS = int(os.environ.get("SOAK_TEST_SECONDS", "40"))


def test_short_soak_converted_table_equals_truth(db) -> None:
    res = run_soak(db.dsn, str(pg_bindir() / "pgbench"), rows=ROWS, rate=RATE, seconds=SECONDS, clients=2,
                   log=lambda *_: None)
    assert res.error is None, res.as_dict()
    assert res.pgbench_ok and res.load_failed == 0, res.as_dict()
    assert res.finished_under_load, f"the conversion outlasted the {SECONDS}s load: {res.as_dict()}"
    assert res.load_tx > RATE * SECONDS // 2, res.as_dict()  # the load really ran
    assert res.rows_after == res.truth_rows and res.mismatched_rows == 0, res.as_dict()
    with db.connect() as c:  # and it really is the partitioned table now
        assert c.execute("SELECT relkind FROM pg_class WHERE oid = 'soak'::regclass").fetchone() == ("p",)
