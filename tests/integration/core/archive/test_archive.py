"""Archive -> verify -> drop -> restore against real PostgreSQL and the moto S3 server over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pg_partition.core import archive
from pg_partition.core.db.catalog import QualifiedName, describe, exists
from pg_partition.core.db.errors import PreflightError, VerificationError
from pg_partition.core.db.execute import Executor
from tests.support.archive import (
    DETACHED,
    PARENT,
    catalog_snapshot,
    count,
    open_uploads,
    partitioned_activities,
    queue,
    row_hash,
)


def policy(bucket: Any, **kw: Any) -> dict[str, Any]:
    return {"bucket": bucket.name, "prefix": "arch"} | kw


def test_pg_dump_round_trip_archive_drop_restore(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket, sse="AES256"))
    result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)

    assert result["status"] == "dropped" and result["rows"] == s.rows
    assert not exists(conn, DETACHED)
    key = f"arch/{db.name}/public/activities/period=2024-01/activities_202401.dump"
    assert sorted(bucket.keys()) == sorted([key, archive.manifest_key_for(key)])
    row = queue(conn, s.queue_id)
    assert row.status == "dropped" and row.last_error is None and row.archive["stage"] == "verified"
    assert row.archive["verification"]["sha256"] == result["sha256"]

    manifest = json.loads(bucket.client().get_object(Bucket=bucket.name,
                                                     Key=archive.manifest_key_for(key))["Body"].read())
    assert manifest["rows"] == s.rows and manifest["format"] == "pg_dump"
    assert manifest["bounds"] == {"column": "created_at", "from": "2024-01-01",
                                  "to": "2024-02-01", "period": "month", "label": "2024-01"}
    assert manifest["pg_dump_version"].startswith("15") and manifest["server_version"].startswith("15")
    assert 'CREATE TABLE "pgpartition_archive"."activities_202401"' in manifest["ddl"]
    head = bucket.client().head_object(Bucket=bucket.name, Key=key)
    assert head["ContentLength"] == manifest["bytes"] and head["ServerSideEncryption"] == "AES256"
    assert bucket.client().head_object(Bucket=bucket.name,
                                       Key=archive.manifest_key_for(key))["ServerSideEncryption"] == "AES256"
    assert open_uploads(bucket.client(), bucket.name) == []

    # running it again is a no-op
    assert archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)["skipped"] is True

    found = archive.locate_manifest(bucket.client(), bucket.name, prefix="arch", database=db.name, table=PARENT,
                                    period="2024-01")
    assert found["key"] == key
    restored = archive.restore(Executor(conn), bucket.client(), found, target="attach")
    assert restored["status"] == "restored" and restored["verification"]["sha256"] == manifest["sha256"]

    back = PARENT.sibling("activities_202401")
    assert row_hash(conn, back) == s.hash
    assert row_hash(conn, PARENT) == s.parent_hash
    parent = describe(conn, PARENT)
    part = next(p for p in parent.partitions if p.name == back)
    assert (str(part.start_day), str(part.end_day)) == ("2024-01-01", "2024-02-01")
    child = describe(conn, back)
    assert child.checks == []  # the pre-validated bounds CHECK is gone after ATTACH
    assert child.primary_key is not None and child.primary_key.columns == ("id", "created_at")
    assert {i.columns for i in child.indexes} == {("id", "created_at"), ("created_at",), ("owner_type", "owner_id")}
    assert conn.execute("SELECT obj_description(%s::regclass)", (str(back),)).fetchone()[0] is None
    assert queue(conn, s.queue_id).status == "restored"
    # restoring again is a no-op
    again = archive.restore(Executor(conn), bucket.client(), found, target="attach")
    assert again["status"] == "already restored"


def test_parquet_round_trip_with_non_utc_session(db, conn, bucket) -> None:
    conn.execute("SET TimeZone = 'America/New_York'")
    s = partitioned_activities(conn, policy=policy(bucket, format="parquet"))
    result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    assert result["status"] == "dropped" and result["format"] == "parquet"
    key = result["key"]
    assert key == f"arch/{db.name}/public/activities/period=2024-01/activities_202401.parquet"

    body = bucket.client().get_object(Bucket=bucket.name, Key=key)["Body"].read()
    table = pq.read_table(pa.BufferReader(body))
    assert table.num_rows == s.rows
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("id").nullable is False
    first = min(table.column("created_at").to_pylist())
    assert first.year == 2024 and first.month == 1 and str(first.tzinfo) == "UTC"
    assert pq.ParquetFile(pa.BufferReader(body)).metadata.num_row_groups >= 1

    manifest = archive.locate_manifest(bucket.client(), bucket.name, prefix="arch", database=db.name,
                                       table=PARENT, period="2024-01")
    archive.restore(Executor(conn), bucket.client(), manifest, target="attach")
    assert row_hash(conn, PARENT.sibling("activities_202401")) == s.hash
    assert row_hash(conn, PARENT) == s.parent_hash
    # and the same archive into a separate schema for ad-hoc queries
    out = archive.restore(Executor(conn), bucket.client(), manifest, target="schema", schema="adhoc")
    assert out["table"] == "adhoc.activities_202401"
    assert row_hash(conn, QualifiedName("adhoc", "activities_202401")) == s.hash


TYPED = """
CREATE TABLE public.typed (
    id integer PRIMARY KEY, small smallint, big bigint, price numeric(12, 2), exact numeric,
    flag boolean, r real, d double precision, label varchar(20), code char(3), body text, raw bytea,
    day date, at timestamptz, local_at timestamp, t time, doc jsonb, tags integer[], u uuid, span interval,
    addr inet)
"""
TYPED_ROWS = """
INSERT INTO public.typed
SELECT g, (g % 30000)::smallint, g::bigint * 1000000007, (g * 1.25)::numeric(12, 2),
       ('1234567890123456789012345678901234567890.' || g)::numeric,
       g % 2 = 0, g / 7.0, g / 3.0, 'label ' || g, lpad((g % 1000)::text, 3, '0'),
       E'line one\\nline "two"\\ttab \\\\ back ' || repeat('é', g % 5) || ', comma',
       decode(md5(g::text), 'hex'), date '2024-01-01' + g % 400,
       timestamptz '2024-03-10 06:30:00+00' + g * interval '17 minutes',
       timestamp '2024-11-03 01:30:00' + g * interval '1 second', time '13:14:15.123456',
       jsonb_build_object('g', g, 'nested', jsonb_build_array(1, 'x', null)), ARRAY[g, g + 1],
       md5(g::text)::uuid, make_interval(days => g % 40, secs => g % 100), '10.0.0.1'::inet + g
FROM generate_series(1, 3000) g;
INSERT INTO public.typed (id) VALUES (0);  -- a row of NULLs
"""


@pytest.mark.parametrize("fmt", ["pg_dump", "parquet", "csv"])
def test_types_survive_every_format(db, conn, bucket, fmt) -> None:
    conn.execute("SET TimeZone = 'Europe/Berlin'")
    conn.execute(TYPED)
    conn.execute(TYPED_ROWS)
    before = row_hash(conn, QualifiedName("public", "typed"))
    qid = archive.enqueue(conn, QualifiedName("public", "typed"), label="2024", policy=policy(bucket, format=fmt))
    result = archive.archive_queued(Executor(conn), bucket.client(), qid)
    assert result["status"] == "dropped" and result["rows"] == 3001
    manifest = archive.get_manifest(bucket.client(), bucket.name, result["key"])
    archive.restore(Executor(conn), bucket.client(), manifest, target="schema", schema="back")
    assert row_hash(conn, QualifiedName("back", "typed")) == before
    if fmt == "parquet":
        body = bucket.client().get_object(Bucket=bucket.name, Key=result["key"])["Body"].read()
        schema = pq.read_schema(pa.BufferReader(body))
        assert schema.field("price").type == pa.decimal128(12, 2)
        assert schema.field("exact").type == pa.string()  # unconstrained numeric: exact text, not a float
        assert schema.field("at").type == pa.timestamp("us", tz="UTC")
        assert schema.field("local_at").type == pa.timestamp("us")
        assert schema.field("raw").type == pa.binary() and schema.field("day").type == pa.date32()


def test_s3_stopped_mid_upload_then_retry(db, conn, bucket, s3_server) -> None:
    import boto3
    from botocore.config import Config

    s = partitioned_activities(conn, rows=150_000, policy=policy(bucket, compress=0, part_size=5 * 1024 * 1024))
    # A real client with few retries, so the dead endpoint is noticed quickly.
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2))

    class StopsServerAfterFirstPart:
        """The real client; after part 1 is stored it stops the real S3 server (nothing is simulated)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def upload_part(self, **kwargs: Any) -> Any:
            out = client.upload_part(**kwargs)
            if kwargs["PartNumber"] == 1:
                s3_server.stop()
            return out

    try:
        with pytest.raises(Exception):  # noqa: B017 - a connection error from botocore, whatever its class
            archive.archive_queued(Executor(conn), StopsServerAfterFirstPart(), s.queue_id)
        assert exists(conn, DETACHED) and count(conn, DETACHED) == s.rows
        row = queue(conn, s.queue_id)
        assert row.status == "failed" and row.attempts == 1 and row.last_error
        assert "upload" in row.archive  # the open upload id is remembered for the next attempt to abort
    finally:
        if s3_server.proc is None:
            s3_server.start()  # same port, so the session's aws_test connection keeps working
    # moto keeps buckets in memory: they are gone after its restart
    client.create_bucket(Bucket=bucket.name)
    assert open_uploads(client, bucket.name) == []

    result = archive.archive_queued(Executor(conn), client, s.queue_id)
    assert result["status"] == "dropped" and queue(conn, s.queue_id).attempts == 2
    assert not exists(conn, DETACHED)
    archive.restore(Executor(conn), client, archive.get_manifest(client, bucket.name, result["key"]))
    assert row_hash(conn, PARENT.sibling("activities_202401")) == s.hash


def kill_pg_dump_of(dbname: str) -> None:
    """SIGKILL the pg_dump processes whose connection string names ``dbname`` (this test's database only)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_dump") and any(dbname.encode() in a for a in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


def test_failed_dump_aborts_the_upload_and_retry_succeeds(db, conn, bucket) -> None:
    """pg_dump killed mid-stream while S3 is up: the multipart upload must be aborted, not left open."""
    s = partitioned_activities(conn, rows=150_000, policy=policy(bucket, compress=0, part_size=5 * 1024 * 1024))
    client = bucket.client()

    class KillsPgDumpBeforeFirstPart:
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def upload_part(self, **kwargs: Any) -> Any:
            if kwargs["PartNumber"] == 1:
                # pg_dump cannot have finished: it blocks writing once the parts in flight are full. Kill its
                # server session and the process itself (a session kill alone races a fast dump).
                with db.connect() as other:
                    other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = 'pg_partition_archive'")
                kill_pg_dump_of(db.name)
            return client.upload_part(**kwargs)

    with pytest.raises(Exception, match=r"pg_dump of pgpartition_archive\.activities_202401 failed"):
        archive.archive_queued(Executor(conn), KillsPgDumpBeforeFirstPart(), s.queue_id)
    assert open_uploads(client, bucket.name) == []
    assert bucket.keys() == []
    assert exists(conn, DETACHED) and queue(conn, s.queue_id).status == "failed"
    assert "pg_dump" in (queue(conn, s.queue_id).last_error or "")
    assert archive.archive_queued(Executor(conn), client, s.queue_id)["status"] == "dropped"


def test_upload_left_open_by_a_killed_worker_is_aborted(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    row = queue(conn, s.queue_id)
    key, _ = archive.plan_keys(conn, row.target, archive.ArchivePolicy.build(row.archive["policy"]))
    stale = bucket.client().create_multipart_upload(Bucket=bucket.name, Key=key)["UploadId"]
    conn.execute("UPDATE pgpartition.archive_queue SET status = 'uploading' WHERE id = %s", (s.queue_id,))
    assert [u["UploadId"] for u in open_uploads(bucket.client(), bucket.name)] == [stale]
    assert archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)["status"] == "dropped"
    assert open_uploads(bucket.client(), bucket.name) == []


def test_corrupted_object_fails_verification_and_nothing_is_dropped(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    client = bucket.client()

    class CorruptsAfterUpload:
        """Real client; right after the manifest is written, one byte of the object is flipped in S3."""

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def put_object(self, **kwargs: Any) -> Any:
            out = client.put_object(**kwargs)
            if kwargs["Key"].endswith(".manifest.json"):
                key = json.loads(kwargs["Body"])["key"]
                data = bytearray(client.get_object(Bucket=kwargs["Bucket"], Key=key)["Body"].read())
                data[len(data) // 2] ^= 0xFF
                client.put_object(Bucket=kwargs["Bucket"], Key=key, Body=bytes(data))
            return out

    with pytest.raises(VerificationError):
        archive.archive_queued(Executor(conn), CorruptsAfterUpload(), s.queue_id)
    assert exists(conn, DETACHED) and row_hash(conn, DETACHED) == s.hash
    row = queue(conn, s.queue_id)
    assert row.status == "failed" and "differs from the manifest" in (row.last_error or "")

    # The sha256 check alone catches it too (ETag aside): same size, one byte different.
    manifest = dict(row.archive["manifest"])
    manifest.pop("etag")
    with pytest.raises(VerificationError, match=r"sha256 .* differs from the manifest"):
        archive.verify_archive(conn, client, manifest)
    # a restore of a corrupt object is refused before anything is created
    before = catalog_snapshot(conn)
    with pytest.raises(VerificationError):
        archive.restore(Executor(conn), client, manifest, target="schema", schema="adhoc")
    assert catalog_snapshot(conn) == before

    # the retry uploads again (the table is intact) and then drops it
    assert archive.archive_queued(Executor(conn), client, s.queue_id)["status"] == "dropped"


def test_pg_dump_older_than_server_is_refused(db, conn, bucket, tmp_path) -> None:
    # Only pg_dump 15 exists on this machine: the "older pg_dump" is a script that reports version 13.11,
    # which is exactly what the version check reads. The check runs before any byte is uploaded.
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 13.11'\n")
    fake.chmod(0o755)
    s = partitioned_activities(conn, policy=policy(bucket))
    with pytest.raises(PreflightError, match=r"pg_dump 13.11 .* is older than the server \(PostgreSQL 15"):
        archive.archive_queued(Executor(conn), bucket.client(), s.queue_id, pg_dump=str(fake))
    assert exists(conn, DETACHED) and bucket.keys() == []
    assert open_uploads(bucket.client(), bucket.name) == []
    row = queue(conn, s.queue_id)
    assert row.status == "failed" and "older than the server" in (row.last_error or "")


def test_restore_overlapping_an_existing_partition_is_refused(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    # premake (or a person) re-created January empty, with different bounds that still overlap
    conn.execute("CREATE TABLE public.activities_jan_half PARTITION OF public.activities "
                 "FOR VALUES FROM ('2024-01-15 00:00+00') TO ('2024-01-16 00:00+00')")
    before = catalog_snapshot(conn)
    manifest = archive.get_manifest(bucket.client(), bucket.name, result["key"])
    with pytest.raises(PreflightError, match=r"overlaps partition public.activities_jan_half") as err:
        archive.restore(Executor(conn), bucket.client(), manifest, target="attach")
    assert "How to fix" in str(err.value)
    assert catalog_snapshot(conn) == before

    # rows of January sitting in a DEFAULT partition also block the attach
    conn.execute("DROP TABLE public.activities_jan_half")
    conn.execute("CREATE TABLE public.activities_default PARTITION OF public.activities DEFAULT")
    conn.execute("INSERT INTO public.activities (trackable_type, created_at, updated_at) "
                 "VALUES ('x', '2024-01-20 00:00+00', now())")
    before = catalog_snapshot(conn)
    with pytest.raises(PreflightError, match="rows in the DEFAULT partition"):
        archive.restore(Executor(conn), bucket.client(), manifest, target="attach")
    assert catalog_snapshot(conn) == before


def test_dry_run_changes_nothing(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    out = archive.archive_queued(Executor(conn, dry_run=True), bucket.client(), s.queue_id)
    assert out["dry_run"] is True and out["key"].endswith("activities_202401.dump")
    assert any(st.startswith("DROP TABLE") for st in out["statements"])
    assert exists(conn, DETACHED) and bucket.keys() == [] and queue(conn, s.queue_id).status == "pending"


def test_keep_policy_and_sse_kms(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket, drop=False, sse="aws:kms", kms_key_id="alias/archive"))
    result = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    assert result["status"] == "kept" and exists(conn, DETACHED)
    head = bucket.client().head_object(Bucket=bucket.name, Key=result["key"])
    assert head["ServerSideEncryption"] == "aws:kms" and "alias/archive" in head.get("SSEKMSKeyId", "")
    assert queue(conn, s.queue_id).archive["verification"]["sse"] == "aws:kms"


def test_restore_resumes_after_a_crash_between_create_and_load(db, conn, bucket) -> None:
    """A worker killed after the standalone table was created (marker comment set) but before its load committed:
    the next restore reloads it and attaches it; a same-named table without the marker is refused."""
    s = partitioned_activities(conn, policy=policy(bucket))
    out = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    manifest = archive.get_manifest(bucket.client(), bucket.name, out["key"])
    child = PARENT.sibling("activities_202401")

    conn.execute("CREATE TABLE public.activities_202401 (LIKE public.activities)")
    with pytest.raises(PreflightError, match="already exists and is not a restore of this archive"):
        archive.restore(Executor(conn), bucket.client(), manifest)

    # what the first transaction of a restore leaves: the empty table, its CHECK and the marker
    conn.execute("ALTER TABLE public.activities_202401 ADD CONSTRAINT activities_202401_bounds CHECK "
                 "(created_at >= '2024-01-01 00:00+00' AND created_at < '2024-02-01 00:00+00')")
    conn.execute("INSERT INTO public.activities_202401 SELECT * FROM public.activities LIMIT 0")
    conn.execute(f"COMMENT ON TABLE public.activities_202401 IS '{archive.MARKER}s3://{bucket.name}/{out['key']} "
                 f"sha256={manifest['sha256']}'")
    result = archive.restore(Executor(conn), bucket.client(), manifest)
    assert result["status"] == "restored"
    assert row_hash(conn, child) == s.hash and row_hash(conn, PARENT) == s.parent_hash


def test_dry_run_restore_lists_statements_and_changes_nothing(db, conn, bucket) -> None:
    s = partitioned_activities(conn, policy=policy(bucket))
    out = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    manifest = archive.get_manifest(bucket.client(), bucket.name, out["key"])
    before = catalog_snapshot(conn)
    result = archive.restore(Executor(conn, dry_run=True), bucket.client(), manifest)
    assert result["status"] == "dry run"
    text = "\n".join(result["statements"])
    assert 'ATTACH PARTITION "public"."activities_202401" FOR VALUES FROM' in text
    assert 'ADD CONSTRAINT "activities_202401_bounds" CHECK' in text
    assert 'ALTER TABLE "public"."activities_202401" ADD PRIMARY KEY ("id", "created_at")' in text
    assert catalog_snapshot(conn) == before
