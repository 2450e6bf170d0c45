"""The "our code starts" line that marks where Airflow's start-up of a task ends (bench/peers.py reads it)."""

from __future__ import annotations

import time
from typing import Any

import psutil
import pytest

from bench.peers import code_starts
from pg_partition.operators.base import PartitionBaseOperator


class _Probe(PartitionBaseOperator):
    def execute(self, context: Any) -> None:  # pragma: no cover - never run here
        raise AssertionError("not called")


def test_pre_execute_logs_when_our_code_starts_and_the_bench_reads_it(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Any) -> None:
    """Airflow's task logger (structlog) writes the line to stdout here, as in ``airflow dags test``."""
    op = _Probe(task_id="preflight", conn_id="c", table="public.t")
    before = time.time()
    op.pre_execute({})
    after = time.time()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "our code starts" in line]
    assert len(lines) == 1, out
    log = tmp_path / "task.log"
    log.write_text("noise\n" + lines[0] + "\nmore noise\n")
    ((task, started_at),) = code_starts(log)
    assert task == "preflight"
    assert before - 0.001 <= started_at <= after + 0.001
    age = float(lines[0].split("process_age=")[1].split("s")[0])
    assert age == pytest.approx(after - psutil.Process().create_time(), abs=0.05)
