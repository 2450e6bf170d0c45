"""The deferrable ReplicationLagSensor through a REAL scheduler, triggerer, DAG processor and execution API server
(LocalExecutor), not dag.test()'s inline trigger runner.

The standby's replay is paused and WAL written, so the sensor's first check fails and it defers; the test waits
until the task instance is DEFERRED and the triggerer's log shows our trigger polling and over the threshold, then
resumes replay and waits for the run to succeed with the triggerer having fired the event. Every process is started
in its own process group and stopped by that group's id.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lag import replay_paused, standby_caught_up, wait_until, write_wal
from tools.stack import free_port

DAG_ID = "pgp_lag_sensor_test"
TASK_ID = "wait_for_replicas"
LAG_DAGS = Path(__file__).resolve().parent / "lag_dags"


class Airflow:
    """Airflow components as subprocesses against one metadata DB, each logging to its own file."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"

    def log(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def start(self, name: str, *args: str) -> None:
        with self.log(name).open("ab") as out:
            self.procs[name] = subprocess.Popen([self.airflow, *args], env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"airflow {name} exited:\n{self.log(name).read_text()[-4000:]}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.procs.values():  # workers the executor forked share the group; leave none behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def query(self, stmt: str, *params: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.home / "airflow.db", timeout=30) as db:
            return db.execute(stmt, params).fetchall()

    def ti_state(self) -> str | None:
        rows = self.query("SELECT state FROM task_instance WHERE dag_id = ? AND task_id = ?", DAG_ID, TASK_ID)
        return str(rows[0][0]) if rows and rows[0][0] else None

    def run_state(self) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE dag_id = ?", DAG_ID)
        return str(rows[0][0]) if rows else None


@pytest.fixture
def airflow_stack(airflow_db: Path, db, tmp_path: Path) -> Iterator[Airflow]:
    home = tmp_path / "airflow"
    home.mkdir()
    # a copy of the session's migrated metadata DB: no second migration, and the session's DB is untouched
    with sqlite3.connect(airflow_db / "airflow.db") as src, sqlite3.connect(home / "airflow.db") as dst:
        src.backup(dst)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(LAG_DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),  # never the default 8080 nor 8793/8794 (other services on this host)
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # on a busy machine a task's call to the execution API can exceed the 5 s default and the task dies
        # before it runs; wait longer and retry more
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "10",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__TRIGGERER__CAPACITY": "10",
        "PGP_LAG_TEST_CONN_ID": db.conn_id,
    })
    stack = Airflow(home, env)
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


def trigger_log(af: Airflow) -> str:
    """What the triggerer process wrote for the deferred task instance (``attempt=N.log.trigger.<job>.log``)."""
    logs = af.home / "logs"
    files = sorted(logs.rglob("attempt=*.log.trigger.*.log")) if logs.exists() else []
    return "".join(p.read_text(errors="replace") for p in files)


def task_log(af: Airflow) -> str:
    """The task's own log (the worker's attempts: before the deferral and after resuming)."""
    logs = af.home / "logs"
    files = sorted(logs.rglob(f"task_id={TASK_ID}/attempt=*.log")) if logs.exists() else []
    return "".join(p.read_text(errors="replace") for p in files if ".trigger." not in p.name) or "(no task log)"
