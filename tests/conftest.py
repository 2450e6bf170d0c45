"""Test harness: real PostgreSQL (primary + streaming standby), a real S3 endpoint (moto server over HTTP) and a
throwaway Airflow metadata DB, all started here and stopped at the end of the session.

Airflow reads its configuration at import time, so the environment is set up before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tools/

_TMP = Path(tempfile.mkdtemp(prefix="pgp-test-"))
os.chmod(_TMP, 0o755)
AIRFLOW_HOME = _TMP / "airflow"
AIRFLOW_HOME.mkdir()
os.environ.update({
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "PG_PARTITION_CONFIG": str(REPO / "dags" / "pg_partition.yaml"),
})

from tests.support.feed import subscriber  # noqa: E402,F401  (the subscriber cluster fixture of the feed tests)
from tools.stack import PgCluster, S3Server, free_port, postgres_conn_json  # noqa: E402


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    """The primary + standby of the version ``PG_MAJOR`` names (13..18; unset: Debian's default)."""
    c = PgCluster.create(_TMP / "pg")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server(free_port(), _TMP / "moto.log")
    server.start()
    os.environ["AIRFLOW_CONN_AWS_TEST"] = server.aws_conn_uri()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Bucket:
    name: str
    server: S3Server
    conn_id: str = "aws_test"

    def client(self) -> Any:
        return self.server.client()

    def keys(self, prefix: str = "") -> list[str]:
        resp = self.client().list_objects_v2(Bucket=self.name, Prefix=prefix)
        return [o["Key"] for o in resp.get("Contents", [])]


@pytest.fixture
def bucket(s3_server: S3Server) -> Bucket:
    name = f"pgp-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return Bucket(name, s3_server)


@dataclass
class Database:
    """One isolated database on the primary, with an Airflow connection id pointing at it."""

    name: str
    cluster: PgCluster
    conn_id: str
    user: str = "postgres"

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kwargs)

    def admin_connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """As the superuser ``postgres`` (what the harness, not the product, may do: e.g. read every table)."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(f"host=127.0.0.1 port={self.cluster.primary.port} user=postgres dbname={self.name}",
                               **kwargs)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.cluster.primary.port} user={self.user} dbname={self.name}"

    def standby_dsn(self) -> str:
        assert self.cluster.standby is not None
        return f"host=127.0.0.1 port={self.cluster.standby.port} user={self.user} dbname={self.name}"


# The role the product runs as on managed services (RDS, Aurora, Cloud SQL): it owns the database and its tables,
# is a member of pg_monitor, and is neither superuser nor replication, nor may it create roles or databases.
OWNER_ROLE = "app_owner"


def _create_owner_role(cluster: PgCluster) -> str:
    with cluster.primary.connect(autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER_ROLE,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {OWNER_ROLE} LOGIN NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE "
                         "NOBYPASSRLS")
        conn.execute(f"GRANT pg_monitor TO {OWNER_ROLE}")
    return OWNER_ROLE


def _create_database(cluster: PgCluster, owner: str | None = None) -> Database:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with cluster.primary.connect(autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))
    conn_id = f"pg_{name}"
    login = owner or "postgres"
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = postgres_conn_json(cluster.primary, name, login)
    return Database(name, cluster, conn_id, login)


def _drop_database(db: Database) -> None:
    os.environ.pop(f"AIRFLOW_CONN_{db.conn_id.upper()}", None)
    with db.cluster.primary.connect(autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                                    (db.name,)).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


@pytest.fixture
def db(cluster: PgCluster) -> Iterator[Database]:
    database = _create_database(cluster)
    try:
        yield database
    finally:
        _drop_database(database)


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with db.connect() as c:
        yield c


@pytest.fixture(scope="session")
def owner_role(cluster: PgCluster) -> str:
    """``app_owner``: LOGIN NOSUPERUSER NOREPLICATION, member of pg_monitor (created once per cluster)."""
    return _create_owner_role(cluster)


@pytest.fixture
def owner_db(cluster: PgCluster, owner_role: str) -> Iterator[Database]:
    """A database owned by the non-superuser ``app_owner``; ``connect()`` and its Airflow connection id log in
    as that role, so whatever the test creates through them is owned by it, as on RDS/Aurora."""
    database = _create_database(cluster, owner=owner_role)
    try:
        yield database
    finally:
        _drop_database(database)


@pytest.fixture
def owner_conn(owner_db: Database) -> Iterator[psycopg.Connection[Any]]:
    with owner_db.connect() as c:
        yield c


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the throwaway metadata DB once per session."""
    airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True, text=True, env=os.environ.copy())
    return AIRFLOW_HOME


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)


@dataclass
class DagRunResult:
    """What a ``dag.test()`` run left in the metadata DB: final states and XCom return values per task."""

    dag_id: str
    run_id: str
    state: str
    task_states: dict[str, str]
    returns: dict[str, Any]

    def xcom(self, task_id: str, map_index: int = -1) -> Any:
        return self.returns.get(task_id if map_index < 0 else f"{task_id}[{map_index}]")


def load_dag(dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, f"import errors in dags/: {bag.import_errors}"
    assert dag_id in bag.dags, f"no DAG {dag_id!r} in dags/ (found {sorted(bag.dags)})"
    return bag.dags[dag_id]


@pytest.fixture
def run_dag(airflow_db: Path) -> Any:
    """``run_dag(dag_id, conf)`` runs a DAG from dags/ with ``dag.test()`` (real metadata DB, real task runner)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    def _run(dag_id: str, conf: dict[str, Any] | None = None) -> DagRunResult:
        dag = load_dag(dag_id)
        dr = dag.test(run_conf=conf or {})
        with create_session() as session:
            tis = session.query(TaskInstance).filter(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == dr.run_id).all()
            states = {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state)
                      for ti in tis}
            returns: dict[str, Any] = {}
            for x in session.query(XComModel).filter(
                    XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id, XComModel.key == "return_value"):
                key = x.task_id if x.map_index < 0 else f"{x.task_id}[{x.map_index}]"
                returns[key] = XComModel.deserialize_value(x)
        return DagRunResult(dag_id, dr.run_id, str(dr.state), states, returns)

    return _run
