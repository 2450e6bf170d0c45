"""Verify an archive before any drop (HEAD, sha256, pg_restore --list, rows), then drop the table."""

from __future__ import annotations

import csv
import gzip
import io
import logging
from collections.abc import Iterable
from typing import IO, Any

import psycopg
from psycopg import sql

from pg_partition.core.archive import arrow_copy
from pg_partition.core.archive.policy import MiB
from pg_partition.core.archive.readers import Hashing, IterReader, S3RangeReader, dump_copy_data, s3_chunks
from pg_partition.core.archive.s3 import S3Client
from pg_partition.core.archive.tools import pg_restore_for
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    VerificationError,
)

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- verify


def verify_archive(conn: psycopg.Connection[Any] | None, s3: S3Client, manifest: dict[str, Any], *,
                   pg_restore: str | None = None, pg_dump: str | None = None,
                   check_table: bool = True) -> dict[str, Any]:
    """Check an archived object against its manifest; raise VerificationError on any mismatch.

    HEAD: size and ETag. Full streaming read: sha256, and the contents decoded (pg_restore --list and
    --data-only for dumps, the Parquet footer, gunzip+CSV) to count rows. With ``check_table`` the live table
    must still hold the manifest's row count.
    """
    bucket, key = manifest["bucket"], manifest["key"]
    where = f"s3://{bucket}/{key}"
    checks: dict[str, Any] = {}
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        raise VerificationError(f"the archived object is missing or unreadable: {exc}", where=where,
                                fix="the table was not dropped; the next archive run uploads it again") from exc
    size = int(head["ContentLength"])
    if size != int(manifest["bytes"]):
        raise VerificationError(f"object size {size} differs from the manifest's {manifest['bytes']}", where=where,
                                fix="the object was replaced or truncated; the table was kept and will be "
                                "archived again")
    checks["size"] = size
    etag = str(head.get("ETag", "")).strip('"')
    if manifest.get("etag") and etag and etag != manifest["etag"]:
        raise VerificationError(f"object ETag {etag} differs from the manifest's {manifest['etag']}",
                                where=where, fix="the object was overwritten; the table was kept for retry")
    if manifest.get("sse") and manifest["sse"].get("algorithm"):
        if head.get("ServerSideEncryption") != manifest["sse"]["algorithm"]:
            raise VerificationError(
                f"object encryption is {head.get('ServerSideEncryption')!r}, expected {manifest['sse']['algorithm']}",
                where=where, fix="check the bucket policy; the table was kept")
        checks["sse"] = head.get("ServerSideEncryption")
    hashing = Hashing(s3_chunks(s3, bucket, key, if_match=etag or None))
    fmt = manifest["format"]
    if fmt == "pg_dump":
        tool = pg_restore_for(int(manifest.get("pg_dump_major") or 0), pg_restore, pg_dump)
        try:
            with dump_copy_data(hashing, tool, list_toc=True) as (info, data, toc):
                for _ in data:
                    pass
        except Exception as exc:
            _raise_if_hash_differs(hashing, manifest, where, exc)
            raise
        rows = info.rows
        name = manifest["table"]
        if not any(f" TABLE DATA {name['schema']} {name['name']} " in f" {line} " for line in toc):
            raise VerificationError(f"pg_restore --list shows no TABLE DATA entry for {name['schema']}."
                                    f"{name['name']}", where=where, fix="the dump is not of this table")
        checks["pg_restore_list"] = [t for t in toc if t and not t.startswith(";")]
    elif fmt == "parquet":
        for _ in hashing:
            pass
        rows = _parquet_rows(s3, bucket, key, size, etag or None, manifest)
    else:
        try:
            rows = _csv_rows(hashing, gz=fmt == "csv")
        except Exception as exc:
            _raise_if_hash_differs(hashing, manifest, where, exc)
            raise VerificationError(f"the CSV archive cannot be decoded: {exc}", where=where) from exc
    if hashing.size != size:
        raise VerificationError(f"read {hashing.size} bytes, HEAD says {size}", where=where)
    if hashing.sha.hexdigest() != manifest["sha256"]:
        raise VerificationError(
            f"sha256 {hashing.sha.hexdigest()} differs from the manifest's {manifest['sha256']}", where=where,
            fix="the object is corrupt; nothing was dropped and the next run archives the table again")
    checks["sha256"] = manifest["sha256"]
    if rows != int(manifest["rows"]):
        raise VerificationError(f"the object holds {rows} rows, the manifest says {manifest['rows']}", where=where)
    checks["rows"] = rows
    if check_table and conn is not None:
        table = QualifiedName(manifest["table"]["schema"], manifest["table"]["name"])
        if catalog.exists(conn, table):
            live = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0])  # type: ignore[index]
            if live != rows:
                raise VerificationError(f"{table} now holds {live} rows but the archive has {rows}", where=where,
                                        fix="the table changed after it was archived; it was kept and will be "
                                        "archived again")
            checks["live_rows"] = live
    log.info("verified %s: %s", where, {k: v for k, v in checks.items() if k != "pg_restore_list"})
    return checks


def _raise_if_hash_differs(hashing: Hashing, manifest: dict[str, Any], where: str, cause: BaseException) -> None:
    """A decode error on a corrupt object: finish hashing it and report the checksum, the root cause."""
    for _ in hashing:
        pass
    if hashing.sha.hexdigest() != manifest["sha256"]:
        raise VerificationError(
            f"sha256 {hashing.sha.hexdigest()} differs from the manifest's {manifest['sha256']} (and the object "
            f"cannot be decoded: {cause})", where=where,
            fix="the object is corrupt; nothing was dropped and the next run archives the table again") from cause


def _parquet_rows(s3: S3Client, bucket: str, key: str, size: int, etag: str | None,
                  manifest: dict[str, Any]) -> int:
    pa = arrow_copy.load_pyarrow()
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(pa.PythonFile(S3RangeReader(s3, bucket, key, size, etag), mode="r")).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    expected = [c["name"] for c in manifest["columns"]]
    if names != expected:
        raise VerificationError(f"Parquet columns {names} differ from the manifest's {expected}",
                                where=f"s3://{bucket}/{key}")
    return int(meta.num_rows)


def _csv_rows(chunks: Iterable[bytes], *, gz: bool) -> int:
    raw: IO[bytes] = io.BufferedReader(IterReader(chunks), buffer_size=MiB)
    if gz:
        raw = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    n = sum(1 for _ in csv.reader(text))
    return max(n - 1, 0)  # minus the header line
