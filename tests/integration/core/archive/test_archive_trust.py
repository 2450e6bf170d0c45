"""Issue 16: the archive queue is a trust boundary. A forged queue row never gets a table uploaded or dropped; a
replaced archive is refused at restore against the checksum recorded in the database; a missing bucket is named;
two archive runs on one table exclude each other; no secret reaches argv, logs, results, manifests or state."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from typing import Any

import boto3
import psycopg
import pytest
from psycopg import sql

from pg_partition.core import archive
from pg_partition.core.archive import export
from pg_partition.core.db.catalog import QualifiedName, exists
from pg_partition.core.db.errors import InvalidInputError, StateError, VerificationError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import TableBusyError, table_lock
from tests.support.archive import DETACHED, PARENT, catalog_snapshot, partitioned_activities, queue, row_hash


def policy(bucket: Any, **kw: Any) -> dict[str, Any]:
    return {"bucket": bucket.name, "prefix": "arch"} | kw


def test_a_forged_queue_row_naming_an_ordinary_table_is_refused(conn, bucket) -> None:
    """The issue's attack, minus the (now refused) foreign state schema: a queue row naming the owner's live
    table and a bucket of the attacker's choosing. Nothing is uploaded and the table stays."""
    s = partitioned_activities(conn, policy=policy(bucket))
    conn.execute("CREATE TABLE public.accounts (id int PRIMARY KEY, secret text)")
    conn.execute("INSERT INTO public.accounts VALUES (1, 'crown jewels')")
    forged = archive.enqueue(conn, QualifiedName("public", "accounts"), policy=policy(bucket))
    before, keys = catalog_snapshot(conn), bucket.keys()
    for dry_run in (True, False):
        with pytest.raises(StateError, match=r"names public.accounts, which is neither a conversion's retired "
                           r"table .* refusing to archive or drop it"):
            archive.archive_queued(Executor(conn, dry_run=dry_run), bucket.client(), forged)
    assert catalog_snapshot(conn) == before and bucket.keys() == keys
    assert conn.execute("SELECT secret FROM public.accounts").fetchall() == [("crown jewels",)]
    assert queue(conn, s.queue_id).status == "pending"


def test_a_queue_row_naming_a_table_owned_by_another_role_is_refused(conn, bucket) -> None:
    """Even a well-formed <parent>_retired row is refused when the table is not the running role's own."""
    partitioned_activities(conn, policy=policy(bucket))
    carol = f"pgp_carol_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: a name of its own
    conn.execute(f"CREATE ROLE {carol}")
    conn.execute("CREATE TABLE public.activities_retired (id int)")
    conn.execute(f"ALTER TABLE public.activities_retired OWNER TO {carol}")
    rid = archive.enqueue_retired(conn, PARENT, policy=policy(bucket))
    assert rid is not None
    before, keys = catalog_snapshot(conn), bucket.keys()
    with pytest.raises(StateError, match=rf"names public.activities_retired, owned by {carol}, not by the role "
                       r"running pg-partition"):
        archive.archive_queued(Executor(conn), bucket.client(), rid)
    assert catalog_snapshot(conn) == before and bucket.keys() == keys


def test_the_detached_partition_of_a_real_rotation_still_archives(conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    assert result["status"] == "dropped"
    row = queue(conn, s.queue_id)
    assert row.archive["sha256"] == result["sha256"] and row.archive["bytes"] == result["bytes"]


def test_a_replaced_archive_is_refused_at_restore(db, conn, bucket) -> None:
    """Whoever can write the bucket replaces the object and its manifest together (self-consistent); restore
    compares with the checksum the queue recorded when the archive was written and restores nothing."""
    s = partitioned_activities(conn, policy=policy(bucket))
    result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    client = bucket.client()
    manifest = archive.get_manifest(client, bucket.name, result["key"])
    forged = b"PGDMP-not-really" * 1000
    client.put_object(Bucket=bucket.name, Key=manifest["key"], Body=forged)
    fake = manifest | {"sha256": hashlib.sha256(forged).hexdigest(), "bytes": len(forged)}
    client.put_object(Bucket=bucket.name, Key=manifest["manifest_key"], Body=json.dumps(fake).encode())
    tampered = archive.get_manifest(client, bucket.name, result["key"])
    before, parent = catalog_snapshot(conn), row_hash(conn, PARENT)
    with pytest.raises(VerificationError, match=r"differs from what archive queue row \d+ recorded"):
        archive.restore(Executor(conn), client, tampered, target="attach")
    assert catalog_snapshot(conn) == before and not exists(conn, DETACHED)
    assert row_hash(conn, PARENT) == parent


def test_a_missing_bucket_is_named(conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket) | {"bucket": "pgp-no-such-bucket"})
    before = catalog_snapshot(conn)
    with pytest.raises(InvalidInputError, match="the S3 bucket 'pgp-no-such-bucket' does not exist"):
        archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    assert catalog_snapshot(conn) == before and exists(conn, DETACHED)
    assert "pgp-no-such-bucket" in (queue(conn, s.queue_id).last_error or "")


def test_a_second_archive_run_on_the_same_table_fails_naming_the_holder(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    with db.connect() as other:
        other.execute("SET application_name = 'the_other_run'")
        with table_lock(other, DETACHED, what="test"):
            before, keys = catalog_snapshot(conn), bucket.keys()
            with pytest.raises(TableBusyError, match=rf"pid {other.info.backend_pid}, application_name "
                               r"'the_other_run'"):
                archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
            assert catalog_snapshot(conn) == before and bucket.keys() == keys
        result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)  # free again
    assert result["status"] == "dropped"


def test_no_secret_leaves_the_connection(db, conn, bucket, s3_server, caplog, monkeypatch) -> None:
    """A planted database password and sslpassword, and a planted S3 secret key: searched for in pg_dump's
    /proc/<pid>/cmdline, every log line, the result (XCom), the manifest, the state rows and an error text."""
    password, ssl_password, s3_secret = "PlantedPw-7d1f", "PlantedSslPw-93ab", "PlantedS3Secret-55c2"
    s = partitioned_activities(conn, policy=policy(bucket))
    conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))  # trust auth: unused
    secret_conn = psycopg.connect(db.dsn + f" password={password} sslpassword={ssl_password} sslmode=disable",
                                  autocommit=True)
    assert secret_conn.info.password == password
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="AKIAPLANTED", aws_secret_access_key=s3_secret)
    seen: list[dict[str, Any]] = []
    real_popen = subprocess.Popen

    def watching_popen(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        proc = real_popen(cmd, *args, **kwargs)  # the real pg_dump runs; we only look at it
        argv = ""
        for _ in range(400):  # until the child has exec'd pg_dump (it cannot finish: we have not read its pipe)
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
            if "pg_" in argv:
                break
            time.sleep(0.005)
        env = kwargs.get("env") or {}
        service = env.get("PGSERVICEFILE")
        if any(str(c).startswith("--dbname=") for c in cmd):  # the pg_dump that connects (not --version probes)
            seen.append({"argv": argv, "service": service, "service_mode": os.stat(service).st_mode & 0o777
                         if service else None, "pgpassword": env.get("PGPASSWORD")})
        return proc

    monkeypatch.setattr(export.subprocess, "Popen", watching_popen)
    caplog.set_level(logging.DEBUG)
    result = archive.archive_queued(Executor(secret_conn), client, s.queue_id)
    assert result["status"] == "dropped"
    assert len(seen) == 1 and "pg_dump" in seen[0]["argv"] and "--dbname=" in seen[0]["argv"]  # read while alive
    assert seen[0]["pgpassword"] == password  # through the environment...
    assert seen[0]["service_mode"] == 0o600 and not os.path.exists(seen[0]["service"])  # ...and a removed file
    manifest_text = json.dumps(archive.get_manifest(client, bucket.name, result["key"]))
    state_text = json.dumps(conn.execute("SELECT json_agg(q) FROM pgpartition.archive_queue q").fetchone()[0])
    jobs_text = json.dumps(conn.execute("SELECT json_agg(j) FROM pgpartition.jobs j").fetchone()[0])
    # an error path too: a queue id that does not exist
    try:
        archive.archive_queued(Executor(secret_conn), client, 999_999)
    except Exception as exc:
        error_text = str(exc)
    else:  # pragma: no cover
        raise AssertionError("a missing queue row must fail")
    everything = "\n".join([seen[0]["argv"], caplog.text, json.dumps(result, default=str), manifest_text,
                            state_text, jobs_text, error_text])
    for secret in (password, ssl_password, s3_secret):
        assert secret not in everything, secret
    secret_conn.close()


def test_the_hook_conninfo_has_no_password(db, monkeypatch) -> None:
    from pg_partition.hooks.partition import PartitionHook

    monkeypatch.setenv(f"AIRFLOW_CONN_{db.conn_id.upper()}_SECRET", json.dumps({
        "conn_type": "postgres", "host": "127.0.0.1", "port": db.cluster.primary.port, "login": "postgres",
        "password": "PlantedHookPw-1", "schema": db.name}))
    hook = PartitionHook(postgres_conn_id=f"{db.conn_id}_secret")
    info = hook.conninfo()
    assert "PlantedHookPw-1" not in info and f"dbname={db.name}" in info
    assert hook.secret_env() == {"PGPASSWORD": "PlantedHookPw-1"}
    with hook.open() as conn:
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)


def test_two_sessions_exclude_each_other_but_fill_items_share(db) -> None:
    table = QualifiedName("public", "t")
    with db.connect() as a, db.connect() as b, db.connect() as c:
        with table_lock(a, table), pytest.raises(TableBusyError, match=f"pid {a.info.backend_pid}"), \
                table_lock(b, table):
            pass
        with table_lock(a, table, shared=True, item="p1"), table_lock(b, table, shared=True, item="p2"):
            with pytest.raises(TableBusyError), table_lock(c, table, shared=True, item="p1"):
                pass  # the same item: one at a time
            with pytest.raises(TableBusyError), table_lock(c, table):
                pass  # any other step waits for the fills
        with table_lock(b, QualifiedName("public", "other")), table_lock(a, table):
            pass  # different tables never block each other
        with table_lock(a, table), table_lock(a, table):
            pass  # re-entrant on one session
        with table_lock(c, table):
            pass  # and everything was released
