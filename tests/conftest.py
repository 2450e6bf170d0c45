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

from tools.stack import PgCluster, S3Server, free_port, postgres_conn_json  # noqa: E402


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
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

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kwargs)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.cluster.primary.port} user=postgres dbname={self.name}"

    def standby_dsn(self) -> str:
        assert self.cluster.standby is not None
        return f"host=127.0.0.1 port={self.cluster.standby.port} user=postgres dbname={self.name}"


def _create_database(cluster: PgCluster) -> Database:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with cluster.primary.connect(autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    conn_id = f"pg_{name}"
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = postgres_conn_json(cluster.primary, name)
    return Database(name, cluster, conn_id)


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
def airflow_db() -> Path:
    """Migrate the throwaway metadata DB once per session."""
    airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True, text=True, env=os.environ.copy())
    return AIRFLOW_HOME


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)
