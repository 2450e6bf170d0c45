"""The deferrable ReplicationLagSensor through a REAL scheduler, triggerer, DAG processor and execution API server
(LocalExecutor), not dag.test()'s inline trigger runner.

The standby's replay is paused and WAL written, so the sensor's first check fails and it defers; the test waits
until the task instance is DEFERRED and the triggerer's log shows our trigger polling and over the threshold, then
resumes replay and waits for the run to succeed with the triggerer having fired the event. Every process is started
in its own process group and stopped by that group's id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.airflow import Airflow, airflow_home
from tests.support.lag import replay_paused, standby_caught_up, wait_until, write_wal

DAG_ID = "pgp_lag_sensor_test"
TASK_ID = "wait_for_replicas"
LAG_DAGS = Path(__file__).resolve().parent / "lag_dags"


class LagAirflow(Airflow):
    """The stack, with this test's task and run states."""

    def ti_state(self) -> str | None:
        rows = self.query("SELECT state FROM task_instance WHERE dag_id = ? AND task_id = ?", DAG_ID, TASK_ID)
        return str(rows[0][0]) if rows and rows[0][0] else None

    def run_state(self) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE dag_id = ?", DAG_ID)
        return str(rows[0][0]) if rows else None


@pytest.fixture
def airflow_stack(airflow_db: Path, db, tmp_path: Path) -> Iterator[LagAirflow]:
    home, _, env = airflow_home(airflow_db, tmp_path, LAG_DAGS,
                                AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
                                AIRFLOW__TRIGGERER__CAPACITY="10", PGP_LAG_TEST_CONN_ID=db.conn_id)
    stack = LagAirflow(home, env)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.scheduler
def test_deferrable_sensor_defers_to_a_real_triggerer_until_replay_resumes(airflow_stack, db, cluster) -> None:
    af = airflow_stack
    with db.connect() as p:
        wait_until(lambda: standby_caught_up(p), "standby caught up")
        with replay_paused(cluster):
            write_wal(p)  # ~5 MB the paused standby cannot replay: over the 1 MB limit
            af.start("api-server", "api-server", "--apps", "execution", "--workers", "1")
            af.start("triggerer", "triggerer")
            af.start("dag-processor", "dag-processor")
            af.start("scheduler", "scheduler")

            def deferred_and_polled() -> bool:
                af.alive()
                return af.ti_state() == "deferred" and "Replication lag over threshold (poll 1)" in trigger_log(af)

            wait_until(deferred_and_polled, "the sensor deferred and the triggerer polled", timeout=240)
            # the deferral is a row in the trigger table, claimed by a running triggerer job
            (classpath, triggerer_id), = af.query(
                "SELECT t.classpath, t.triggerer_id FROM trigger t JOIN task_instance ti ON ti.trigger_id = t.id "
                "WHERE ti.dag_id = ? AND ti.task_id = ?", DAG_ID, TASK_ID)
            assert classpath == "pg_partition.triggers.lag.ReplicationLagTrigger" and triggerer_id is not None
            assert af.query("SELECT job_type, state FROM job WHERE id = ?", triggerer_id) == [
                ("TriggererJob", "running")]
            # still held back while replay is paused: more polls, all over the threshold, no success
            wait_until(lambda: "Replication lag over threshold (poll 3)" in trigger_log(af), "more polls")
            assert af.ti_state() == "deferred" and af.run_state() == "running"
            # Airflow 3.3.2 race (apache/airflow#67287, #71580): if the trigger fires and the task is queued again
            # before the scheduler has processed the executor's "success" for the worker that exited on defer(),
            # the scheduler marks the task failed. Resume replay only after that event was processed.
            wait_until(lambda: "Received executor event with state success for task instance "
                       f"TaskInstanceKey(dag_id='{DAG_ID}'" in af.log("scheduler").read_text(errors="replace"),
                       "the scheduler processed the deferring worker's exit")
        # replay resumed: the triggerer sees lag drop, fires, the task resumes on a worker and succeeds
        wait_until(lambda: af.alive() or af.run_state() in {"success", "failed"}, "dag run finished", timeout=240)
    assert af.run_state() == "success", task_log(af)
    assert af.ti_state() == "success"
    triggered = trigger_log(af)
    assert "wait_for_replicas" in triggered and "starting" in triggered
    assert "standby 'standby1' at 127.0.0.1 replay:" in triggered and "> max 1.0 MB" in triggered
    assert "Replication lag OK after" in triggered and "Trigger fired event" in triggered
    main = task_log(af)
    assert "Deferring to ReplicationLagTrigger" in main and "Pausing task as DEFERRED" in main
    assert "Replication lag back within limits" in main
    # polling must not block the triggerer's event loop. (Airflow imports a trigger's module inside the loop
    # when the trigger is created -- psycopg's import can trip the 0.2 s warning once, before the first poll.)
    first_poll = next(line for line in triggered.splitlines() if "(poll 1)" in line)
    first_poll_at = first_poll.split('"timestamp":"', 1)[1][:26]
    blocked = [line for line in af.log("triggerer").read_text(errors="replace").splitlines()
               if "async thread was blocked" in line and line[:26] > first_poll_at]
    assert not blocked, blocked


def trigger_log(af: LagAirflow) -> str:
    """What the triggerer process wrote for the deferred task instance (``attempt=N.log.trigger.<job>.log``)."""
    logs = af.home / "logs"
    files = sorted(logs.rglob("attempt=*.log.trigger.*.log")) if logs.exists() else []
    return "".join(p.read_text(errors="replace") for p in files)


def task_log(af: LagAirflow) -> str:
    """The task's own log (the worker's attempts: before the deferral and after resuming)."""
    logs = af.home / "logs"
    files = sorted(logs.rglob(f"task_id={TASK_ID}/attempt=*.log")) if logs.exists() else []
    return "".join(p.read_text(errors="replace") for p in files if ".trigger." not in p.name) or "(no task log)"
