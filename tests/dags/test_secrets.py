"""Issue 16: no secret leaves the connection. A known password is planted in the Postgres connection and a known
secret key, access key id and session token in the AWS connection; the convert, archive and restore DAGs run for real
(dag.test(), every log record of the process written to a file at DEBUG, including the per-batch SQL), then every
place a secret could land is searched: the log file and anything under AIRFLOW_HOME/logs, captured stdout/stderr,
the whole Airflow metadata DB file (XCom, trigger kwargs, task instances, run conf, ...), every object, manifest and
object metadata in the bucket, every row of every table in the state schema, and the exception texts of a failed
run. The replication-lag trigger (what serialize() stores in the metadata DB, its events and log lines when the
server cannot be reached) is searched too."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import pytest

from pg_partition.core.db.catalog import QualifiedName
from tests.support.convert import row_hash
from tools.seed import seed_activities

PASSWORD = "Pl4nted-PG-pw-7f3c1e"
ACCESS_KEY = "AKIAPLANTED7F3C1E00"
SECRET_KEY = "Pl4nted-S3-secret-9b2d44/xyz"
SESSION_TOKEN = "Pl4ntedSessionToken0e5a7c"
SECRETS = (PASSWORD, SECRET_KEY, ACCESS_KEY, SESSION_TOKEN)


def _hits(blob: bytes | str, where: str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [f"{s[:6]}... in {where}" for s in SECRETS if s.encode() in data]


@pytest.fixture
def planted(db, s3_server) -> Any:
    """The database's connection and an AWS connection, both carrying planted secrets (pg_hba trusts 127.0.0.1,
    so the password is never checked; it only travels with the connection, which is what must not leak)."""
    pg_var = f"AIRFLOW_CONN_{db.conn_id.upper()}"
    pg = json.loads(os.environ[pg_var]) | {"password": PASSWORD}
    aws = json.loads(s3_server.aws_conn_uri()) | {"login": ACCESS_KEY, "password": SECRET_KEY}
    aws["extra"] = aws["extra"] | {"aws_session_token": SESSION_TOKEN}
    old = os.environ[pg_var]
    os.environ[pg_var] = json.dumps(pg)
    os.environ["AIRFLOW_CONN_AWS_PLANTED"] = json.dumps(aws)
    try:
        yield "aws_planted"
    finally:
        os.environ[pg_var] = old
        os.environ.pop("AIRFLOW_CONN_AWS_PLANTED", None)


def test_no_planted_secret_in_logs_xcom_triggers_s3_or_state(db, conn, bucket, run_dag, planted, airflow_db,
                                                           tmp_path, capfd) -> None:
    log_file = tmp_path / "all-task-logs.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("pg_partition", "pg_partition.sql", "airflow.task"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        seed_activities(conn, QualifiedName("public", "activities"), rows=4_000, timestamptz=True)
        before = row_hash(conn, "activities")
        converted = run_dag("pg_partition_convert", {
            "conn_id": db.conn_id, "table": "public.activities", "column": "created_at", "period": "month",
            "future": 1, "cover_data": True, "batch_size": 1_000})
        assert converted.state == "success", converted.task_states
        archived = run_dag("pg_partition_archive", {
            "conn_ids": [db.conn_id], "archive_retired": ["public.activities"], "bucket": bucket.name,
            "aws_conn_id": planted, "format": "pg_dump", "max_lag_bytes": "1GB"})
        assert archived.state == "success", archived.task_states
        dumps = [k for k in bucket.keys("") if k.endswith(".dump")]
        restored = run_dag("pg_partition_restore", {
            "conn_id": db.conn_id, "table": "", "s3_key": f"s3://{bucket.name}/{dumps[0]}",
            "target": "schema", "schema": "adhoc", "aws_conn_id": planted})
        assert restored.state == "success", restored.task_states
        assert row_hash(conn, "adhoc.activities_retired") == before
        # a run that fails: its exception text and traceback land in the same logs and metadata DB
        failed = run_dag("pg_partition_restore", {
            "conn_id": db.conn_id, "table": "", "s3_key": f"s3://{bucket.name}/no/such/key.dump",
            "target": "schema", "schema": "adhoc", "aws_conn_id": planted})
        assert failed.state == "failed"
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    out, err = capfd.readouterr()
    text = log_file.read_text(errors="replace")
    assert "SQL: " in text and "pg_partition" in text  # the file did receive the task logs, SQL included
    hits = _hits(text, "the task log file") + _hits(out + err, "stdout/stderr")
    for path in (airflow_db / "logs").rglob("*") if (airflow_db / "logs").exists() else []:
        if path.is_file():
            hits += _hits(path.read_bytes(), str(path))
    hits += _hits((airflow_db / "airflow.db").read_bytes(), "the Airflow metadata DB (XCom, trigger, ...)")
    s3 = bucket.client()
    keys = bucket.keys()
    assert any(k.endswith(".json") or "manifest" in k for k in keys), keys
    for key in keys:
        obj = s3.get_object(Bucket=bucket.name, Key=key)
        hits += _hits(obj["Body"].read(), f"s3://{bucket.name}/{key}")
        hits += _hits(json.dumps(obj.get("Metadata", {})), f"metadata of {key}")
    state_rows = 0
    for (table,) in conn.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                 "WHERE n.nspname = 'pgpartition' AND c.relkind IN ('r', 'p')").fetchall():
        for (row,) in conn.execute(f'SELECT t::text FROM pgpartition."{table}" t').fetchall():
            state_rows += 1
            hits += _hits(row, f"pgpartition.{table}")
    assert state_rows > 0
    hits += _hits(json.dumps(conn.execute("SELECT json_agg(a) FROM pg_stat_activity a").fetchone()[0] or []),
                  "pg_stat_activity")
    assert hits == []


def test_lag_trigger_keeps_the_password_out_of_its_serialization_events_and_logs(db, planted, caplog) -> None:
    """serialize() is what the metadata DB's trigger table stores: the conn_id and thresholds, never the
    conninfo. When the server cannot be reached the error event and the log lines carry libpq's message, which
    names host and port but not the password."""
    from pg_partition.triggers.lag import ReplicationLagTrigger

    trigger = ReplicationLagTrigger(conn_id=db.conn_id, max_lag_bytes=1, poll_interval=0.01, max_connect_failures=2)
    _classpath, kwargs = trigger.serialize()
    assert _hits(json.dumps(kwargs), "serialize()") == []
    conninfo = asyncio.run(trigger.conninfo())
    assert PASSWORD in conninfo  # it does reach libpq ...
    pg_var = f"AIRFLOW_CONN_{db.conn_id.upper()}"
    dead = json.loads(os.environ[pg_var]) | {"port": 1}  # nothing listens on port 1
    os.environ[pg_var] = json.dumps(dead)

    async def first_event() -> Any:
        async for event in trigger.run():
            return event
        return None

    with caplog.at_level(logging.DEBUG):
        event = asyncio.run(first_event())
    assert event is not None and event.payload["status"] == "error", event
    assert "port 1" in event.payload["message"] or "Connection refused" in event.payload["message"]
    # ... and nowhere else
    assert _hits(json.dumps(event.payload), "the error event") == []
    assert _hits(caplog.text, "the trigger's log") == []
