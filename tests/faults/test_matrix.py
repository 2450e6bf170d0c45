"""The fault matrix (issue 9): every step x fault cell, FAULT_TRIALS seeded trials each.

Each trial gets a fresh database (and bucket), injects its fault at a seeded point, retries the step, finishes
the flow and checks the invariants (row-level hashes, no row in two places, no drop without a verified archive,
no leftovers, state = catalog). A cell fails with the first failing trial's seed; rerun just that trial with
``FAULT_TRIAL_SEED=<seed> pytest tests/faults -k '<cell id>'``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest

from tests.faults.conftest import RESULTS
from tests.faults.driver import Env, trial_seed, trials
from tests.faults.matrix import CELLS, Cell

log = logging.getLogger("pg_partition.faults")


def _param(cell: Cell) -> Any:
    marks = [pytest.mark.faults]
    if cell.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=cell.xfail))
    return pytest.param(cell, id=cell.id, marks=marks)


def _healthy(env: Env) -> None:
    """The cluster and S3 are back after every trial: the next cell (and the rest of the suite) needs them."""
    with env.admin() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if env.cluster.standby is not None:
        env.cluster.wait_for_standby(timeout=120)
    if env.s3_server.proc is None:
        env.s3_server.start()
    env.s3().list_buckets()


@pytest.mark.parametrize("cell", [_param(c) for c in CELLS])
def test_cell(cell: Cell, cluster: Any, s3_server: Any) -> None:
    n = trials()
    passed = 0
    first: tuple[int, BaseException] | None = None
    for t in range(n):
        seed = trial_seed(cell.id, t)
        env = Env(cluster, s3_server)
        env.dbname = env.create_database()
        try:
            detail = cell.run(env, random.Random(seed))
            passed += 1
            log.warning("fault cell %s trial %d (seed %d): passed: %s", cell.id, t, seed, detail)
        except Exception as exc:
            log.error("fault cell %s trial %d (seed %d) FAILED: %s", cell.id, t, seed, exc)
            if first is None:
                first = (seed, exc)
        finally:
            _healthy(env)
            env.drop_database(env.dbname)
    RESULTS[(cell.step, cell.fault)] = {"trials": n, "passed": passed,
                                        "first_failure_seed": first[0] if first else None}
    if first is not None:
        raise AssertionError(f"{cell.id}: {n - passed} of {n} trials failed; first failing seed {first[0]} "
                             f"(FAULT_TRIAL_SEED={first[0]}): {first[1]}") from first[1]
