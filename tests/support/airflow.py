"""Real Airflow components (api-server, scheduler, dag-processor, triggerer) as subprocesses for tests that need a
real scheduler or the UI: one metadata DB copied from the session's, free ports, each process in its own group."""

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
from pathlib import Path

from tools.stack import free_port


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


def airflow_home(airflow_db: Path, tmp_path: Path, dags_folder: Path,
                 **overrides: str) -> tuple[Path, int, dict[str, str]]:
    """A home with a copy of the session's migrated metadata DB (no second migration; the session's DB stays
    untouched), a free API port, and the environment every component shares; ``overrides`` win."""
    home = tmp_path / "airflow"
    home.mkdir()
    with sqlite3.connect(airflow_db / "airflow.db") as src, sqlite3.connect(home / "airflow.db") as dst:
        src.backup(dst)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
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
        # a busy CI machine (load 20+ on 2 cores) made a task's call to the execution API time out at the 5 s
        # default and the task fail before it ran; wait longer and retry more instead
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "10",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    })
    env.update(overrides)
    return home, port, env
