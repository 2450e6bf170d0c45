"""The fault driver's own checks can fail: each test here breaks one thing on purpose and expects the matrix's
invariant (or bound) to catch it. Without these, a green matrix would not mean much."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.faults import cells_archive, cells_convert, matrix
from tests.faults.driver import Env

pytestmark = pytest.mark.faults


@pytest.fixture
def env(cluster: Any, s3_server: Any) -> Any:
    e = Env(cluster, s3_server)
    e.dbname = e.create_database()
    yield e
    e.drop_database(e.dbname)


def test_lock_check_catches_a_swap_that_waits_without_a_short_lock_timeout(env: Env) -> None:
    """The same swap with lock_timeout=30s queues behind the holder and stalls the application: caught."""
    def too_patient(e: Env) -> Any:
        return cells_convert.scenario_swap(e, lock_timeout="30s", retries=1)

    run = matrix.lock_contention(too_patient, ["BEGIN", "SELECT 1 FROM public.activities LIMIT 1"],
                                 "INSERT INTO public.activities (created_at, updated_at) VALUES (now(), now()) "
                                 "RETURNING id", "SELECT 1")
    with pytest.raises(AssertionError, match=r"never hit lock_timeout|blocked"):
        run(env, random.Random(1))


def test_conversion_check_catches_a_lost_row(env: Env) -> None:
    sc = cells_convert.scenario_fill(env)
    cells_convert.step_fill(sc.ctx)
    sc.finish(sc.ctx)
    sc.check(sc, ())
    with sc.conn() as conn:
        conn.execute("DELETE FROM public.activities WHERE id = 4242")
    with pytest.raises(AssertionError, match="differs from the source"):
        sc.check(sc, ())


def test_archive_check_catches_a_drop_without_an_archive(env: Env) -> None:
    sc = cells_archive.scenario_archive(env)
    assert sc.after_fault is not None
    sc.after_fault(sc)  # consistent before anything happened
    with sc.conn() as conn:
        conn.execute("DROP TABLE pgpartition_archive.events_202401")
    with pytest.raises(AssertionError, match="is gone but its queue row is pending"):
        sc.after_fault(sc)
