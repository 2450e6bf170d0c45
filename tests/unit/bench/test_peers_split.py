"""bench/peers.py splits ``airflow dags test``'s wall time at our first operator's code: checked on a synthetic run."""

from __future__ import annotations

import pytest

from bench.peers import split_dag_times

T0 = 1_000.0  # process launch (epoch seconds)


def _ti(task: str, start: float, end: float, map_index: int = -1) -> dict[str, object]:
    return {"task": task, "map_index": map_index, "state": "success", "start": T0 + start, "end": T0 + end}


def test_split_at_our_first_code_with_per_task_airflow_time_and_gaps() -> None:
    tis = [
        _ti("preflight", 5.0, 9.5),  # Airflow's in-process API server start inside it: our code at 9.0
        _ti("prep", 9.7, 10.5),  # our code at 9.9
        _ti("fill", 10.6, 11.6, 0),  # two mapped fills, our code at 10.8 and 10.75
        _ti("fill", 10.6, 11.8, 1),
        _ti("report", 12.0, 12.4),  # our code at 12.1
    ]
    starts = [("preflight", T0 + 9.0), ("prep", T0 + 9.9), ("fill", T0 + 10.8), ("fill", T0 + 10.75),
              ("report", T0 + 12.1)]
    out = split_dag_times(tis, starts, wall_start=T0, wall=14.0)
    assert out["airflow_startup"] == pytest.approx(9.0)
    assert out["total"] == pytest.approx(12.4 - 9.0)  # the run: our first code to the last task's end
    assert out["after_last_task"] == pytest.approx(14.0 - 12.4)
    assert out["airflow_startup"] + out["total"] + out["after_last_task"] == pytest.approx(14.0)
    assert out["first_task_airflow"] == pytest.approx(4.0)
    # prep 0.2, each fill instance 0.15 (its earliest line within its span: 10.75), report 0.1
    assert out["airflow_in_tasks"] == pytest.approx(0.2 + 0.15 + 0.15 + 0.1)
    # the previous split, kept
    assert out["before_first_task"] == pytest.approx(5.0)
    assert out["from_first_task"] == pytest.approx(12.4 - 5.0)
    # busy time counts the first task from our code on; the gaps are the run outside every task's span
    busy = 0.5 + 0.8 + 1.0 + 1.2 + 0.4
    assert out["task_seconds"] == pytest.approx(busy)
    assert out["gaps"] == pytest.approx(0.2 + 0.1 + 0.2)  # 9.5-9.7, 10.5-10.6, 11.8-12.0 (the fills overlap)
    assert out["steps"]["prep"] == pytest.approx(10.5 - 9.0)  # preflight (from our code) and prep
    assert out["per_task"]["preflight"] == pytest.approx(0.5)
    assert out["tasks"] == 5 and out["fill_tasks"] == 2
    assert tis[0]["start"] == T0 + 5.0  # the caller's rows are not changed
