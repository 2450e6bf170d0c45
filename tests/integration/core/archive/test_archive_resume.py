"""A worker killed mid-upload: the next attempt resumes the recorded multipart upload and keeps the parts S3
already holds (real moto S3 over HTTP, real PostgreSQL, a real SIGKILL of the archiving process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

from pg_partition.core import archive
from pg_partition.core.db.catalog import exists
from pg_partition.core.db.execute import Executor
from tests.support.archive import DETACHED, PARENT, open_uploads, partitioned_activities, queue, row_hash

KILLED_AFTER_TWO_PARTS = textwrap.dedent("""
    import os, signal, sys
    import psycopg
    from pg_partition.core import archive
    from pg_partition.core.db.execute import Executor

    dsn, endpoint, queue_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")

    class KilledAfterPartTwo:
        '''The real client; the process is SIGKILLed right after S3 stored part 2 (no cleanup can run).'''
        def __getattr__(self, name):
            return getattr(client, name)
        def upload_part(self, **kw):
            out = client.upload_part(**kw)
            if kw["PartNumber"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

    with psycopg.connect(dsn, autocommit=True) as conn:
        archive.archive_queued(Executor(conn), KilledAfterPartTwo(), queue_id)
""")


def test_killed_upload_resumes_from_the_parts_s3_holds(db, conn, bucket) -> None:
    s = partitioned_activities(conn, rows=450_000, policy={"bucket": bucket.name, "prefix": "arch",
                                                           "format": "csv", "part_size": 5 * 1024 * 1024})
    client = bucket.client()
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_PARTS, db.dsn, bucket.server.endpoint,
                             str(s.queue_id)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    row = queue(conn, s.queue_id)
    assert row.status == "uploading" and row.archive["upload"]["upload_id"]
    upload_id = row.archive["upload"]["upload_id"]
    held = client.list_parts(Bucket=bucket.name, Key=row.archive["upload"]["key"], UploadId=upload_id)["Parts"]
    assert [p["PartNumber"] for p in held] == [1, 2]

    uploaded: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def upload_part(self, **kw: Any) -> Any:
            uploaded.append(kw["PartNumber"])
            assert kw["UploadId"] == upload_id  # the same upload, resumed
            return client.upload_part(**kw)

    result = archive.archive_queued(Executor(conn), Counting(), s.queue_id)
    assert result["status"] == "dropped" and result["rows"] == s.rows  # verified (sha256, rows) before the drop
    manifest = archive.get_manifest(client, bucket.name, result["key"])
    assert manifest["parts"] >= 3
    assert sorted(uploaded) == list(range(3, manifest["parts"] + 1))  # parts 1 and 2 were not sent again
    assert open_uploads(client, bucket.name) == []
    assert not exists(conn, DETACHED)
    archive.restore(Executor(conn), client, manifest)
    assert row_hash(conn, PARENT.sibling("activities_202401")) == s.hash
