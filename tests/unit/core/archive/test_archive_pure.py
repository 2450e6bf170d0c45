"""Archive logic that needs no services: the policy model, the key layout, RDS export SQL, pg_dump pattern and
COPY header parsing, and the refusal of a too-old pg_dump."""

from __future__ import annotations

from typing import Any

import pytest

from pg_partition.core import archive
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, PreflightError


def test_policy_layers_and_validation() -> None:
    policy = archive.ArchivePolicy.build({"bucket": "bkt", "format": "parquet", "drop": "false"},
                                         {"format": None, "sse": "SSE-KMS", "kms_key_id": "alias/k"})
    assert (policy.bucket, policy.format, policy.drop, policy.sse) == ("bkt", "parquet", False, "aws:kms")
    assert policy.put_args() == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/k"}
    with pytest.raises(InvalidInputError, match="no S3 bucket"):
        archive.ArchivePolicy.build({"format": "pg_dump"})
    with pytest.raises(InvalidInputError, match="format: Input should be 'pg_dump', 'parquet' or 'csv'"):
        archive.ArchivePolicy.build({"bucket": "bkt", "format": "xml"})
    with pytest.raises(InvalidInputError, match="kms_key_id is only used with sse: aws:kms"):
        archive.ArchivePolicy.build({"bucket": "bkt", "kms_key_id": "k"})
    with pytest.raises(InvalidInputError, match=r"mode: rds exports with aws_s3\.query_export_to_s3, which writes csv"):
        archive.ArchivePolicy.build({"bucket": "bkt", "mode": "rds", "format": "parquet"})
    with pytest.raises(InvalidInputError, match="bucket: String should have at least 3 characters"):
        archive.ArchivePolicy.build({"bucket": "b"})
    with pytest.raises(InvalidInputError, match="max_inflight: Input should be less than or equal to 64"):
        archive.ArchivePolicy.build({"bucket": "bkt", "max_inflight": 65})
    with pytest.raises(InvalidInputError, match="parquet_compression: Input should be"):
        archive.ArchivePolicy.build({"bucket": "bkt", "parquet_compression": "zip"})
    with pytest.raises(InvalidInputError, match="unknown archive policy field"):
        archive.ArchivePolicy.build({"bucket": "bkt", "buckets": "x"})


def test_hive_key_layout_and_manifest_beside_it() -> None:
    policy = archive.ArchivePolicy.build({"bucket": "bkt", "prefix": "/arch/", "format": "parquet"})
    key = archive.object_key(policy, "app", "public", "activities", "2024-01", "activities_202401")
    assert key == "arch/app/public/activities/period=2024-01/activities_202401.parquet"
    # '_' prefix: Athena/Hive/Spark skip it, so the manifest is never read as data
    assert archive.manifest_key_for(key) == "arch/app/public/activities/period=2024-01/_activities_202401.parquet" \
        ".manifest.json"
    odd = archive.object_key(policy, "db", "s/x", "t", "all", "t")
    assert odd == "arch/db/s%2Fx/t/period=all/t.parquet"


def test_rds_export_sql_is_generated_exactly() -> None:
    # aws_s3.query_export_to_s3 exists only on RDS/Aurora, so this SQL cannot run here: we check its text.
    stmt = archive.rds_export_sql(QualifiedName("archive", 'odd"name'), "bkt", "p/k.csv", "eu-west-1",
                                  columns=["id", "created_at"], kms_key_id="arn:aws:kms:eu-west-1:1:key/x")
    assert stmt.as_string() == (
        "SELECT rows_uploaded, files_uploaded, bytes_uploaded FROM aws_s3.query_export_to_s3("
        "'SELECT \"id\", \"created_at\" FROM \"archive\".\"odd\"\"name\"', "
        "aws_commons.create_s3_uri('bkt', 'p/k.csv', 'eu-west-1'), options := 'format csv, header true', "
        "kms_key := 'arn:aws:kms:eu-west-1:1:key/x')")
    # a name with a quote cannot break out of the query literal
    evil = archive.rds_export_sql(QualifiedName("s", "t'); DROP TABLE x; --"), "b", "k", "r")
    assert "FROM \"s\".\"t''); DROP TABLE x; --\"'" in evil.as_string()


def test_dump_pattern_and_copy_header_parsing() -> None:
    assert archive.dump_pattern(QualifiedName("My.S", 'a"b*')) == '"My.S"."a""b*"'
    assert archive.parse_ident_list('id, "Created At", "we""ird", x') == ["id", "Created At", 'we"ird', "x"]


def test_old_pg_dump_is_refused_with_a_clear_message(tmp_path: Any) -> None:
    # Only pg_dump 15 is installed here, so an older pg_dump is a small script printing an older version.
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 13.11'\n")
    fake.chmod(0o755)
    with pytest.raises(PreflightError) as err:
        archive.find_pg_tool("pg_dump", 15, str(fake), server="the server (PostgreSQL 15.18)")
    text = str(err.value)
    assert "pg_dump 13.11" in text and "older than the server (PostgreSQL 15.18)" in text
    assert "postgresql-client-15" in text
    assert archive.find_pg_tool("pg_dump", 15).major >= 15
