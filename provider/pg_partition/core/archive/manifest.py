"""The manifest written beside each archived object: what it holds, its sha256, rows, and DDL."""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.archive.policy import MANIFEST_VERSION, ArchivePolicy
from pg_partition.core.archive.s3 import S3Client, manifest_key_for
from pg_partition.core.db.catalog import TableInfo
from pg_partition.core.db.errors import (
    InvalidInputError,
    VerificationError,
)

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- manifest


def table_ddl(conn: psycopg.Connection[Any], info: TableInfo) -> str:
    """Readable DDL of the archived table for the manifest (columns, checks, indexes), from the catalog."""
    lines = []
    for c in info.columns:
        col = sql.SQL("    {} ").format(sql.Identifier(c.name)).as_string(conn) + c.type
        if c.collation:
            col += " COLLATE " + sql.Identifier(c.collation).as_string(conn)
        if c.generated == "s" and c.default:
            col += f" GENERATED ALWAYS AS ({c.default}) STORED"
        elif c.identity:
            col += " GENERATED " + ("ALWAYS" if c.identity == "a" else "BY DEFAULT") + " AS IDENTITY"
        elif c.default:
            col += " DEFAULT " + c.default
        if c.not_null:
            col += " NOT NULL"
        lines.append(col)
    for name, definition in info.checks:
        lines.append(sql.SQL("    CONSTRAINT {} ").format(sql.Identifier(name)).as_string(conn) + definition)
    text = f"CREATE TABLE {info.name.ident.as_string(conn)} (\n" + ",\n".join(lines) + "\n);\n"
    for idx in info.indexes:
        text += idx.definition + ";\n"
    return text


def put_manifest(s3: S3Client, manifest: dict[str, Any], policy: ArchivePolicy) -> None:
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    s3.put_object(Bucket=manifest["bucket"], Key=manifest["manifest_key"], Body=body,
                  ContentType="application/json", **policy.put_args())


def get_manifest(s3: S3Client, bucket: str, key: str) -> dict[str, Any]:
    """Read a manifest (``key`` may be the manifest's key or its object's key)."""
    mkey = key if key.endswith(".manifest.json") else manifest_key_for(key)
    try:
        body = s3.get_object(Bucket=bucket, Key=mkey)["Body"].read()
    except Exception as exc:
        raise InvalidInputError(f"cannot read the archive manifest s3://{bucket}/{mkey}: {exc}",
                                fix="check the bucket and key (list the archive prefix with find_archives)") from exc
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise VerificationError(f"the manifest s3://{bucket}/{mkey} is not valid JSON",
                                fix="the manifest was damaged; re-archive the table if it still exists") from exc
    missing = {"format", "key", "bytes", "sha256", "rows", "table"} - set(manifest)
    if missing or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise VerificationError(f"s3://{bucket}/{mkey} is not a pg-partition manifest (missing {sorted(missing)})",
                                fix="point at a *.manifest.json written by pg-partition")
    return dict(manifest)
