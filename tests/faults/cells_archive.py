"""Archive steps under faults: upload, verify, drop (the stages of one archive-queue row) and restore.

Scenario: ``public.events`` (January-July 2024) after a rotation with retention 3: January and February are
detached into the archive schema and queued. The archive step takes every pending queue row through
upload -> verify -> drop, as the ``pg_partition_archive`` DAG's mapped tasks do; the restore step attaches both
months back from S3. The invariant that matters most: a table is never gone unless S3 holds an archive whose
bytes match its verified manifest (checked right after every fault, before the retry, and at the end), and the
archive restores to exactly the rows that were dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import psycopg

from pg_partition.core import archive, rotate
from pg_partition.core.db import catalog
from pg_partition.core.db.execute import Executor
from tests.faults import cells_rotate
from tests.faults.common import Scenario, connect, key_counts, leftovers, logical_hash, partitions_of, tables_in_schema
from tests.faults.driver import Env, s3_client

PREFIX = "faults"
MONTHS = ("events_202401", "events_202402")


def _defaults(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"bucket": ctx["bucket"], "prefix": PREFIX}


# ------------------------------------------------------------------------------------------------ the steps


def step_archive(ctx: dict[str, Any]) -> Any:
    """Every pending queue row through upload -> verify -> drop; one row's failure does not stop the others
    (they are separate mapped tasks in the DAG), but the step fails if any row failed."""
    s3 = s3_client(ctx["s3_endpoint"])
    done, errors = [], []
    with connect(ctx) as conn:
        ex = Executor(conn)
        for row in archive.pending_queue(conn):
            try:
                done.append(archive.archive_queued(ex, s3, row.id, defaults=_defaults(ctx))["status"])
            except Exception as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    return done


def step_restore(ctx: dict[str, Any]) -> Any:
    s3 = s3_client(ctx["s3_endpoint"])
    out = []
    with connect(ctx) as conn:
        for key in ctx["manifests"]:
            manifest = archive.get_manifest(s3, ctx["bucket"], key)
            out.append(archive.restore(Executor(conn), s3, manifest, target="attach",
                                       lock_timeout=ctx.get("lock_timeout", "2s"),
                                       retries=int(ctx.get("retries", 5)))["status"])
    return out


# ------------------------------------------------------------------------------------------------ scenarios


def _detached(env: Env) -> tuple[dict[str, Any], psycopg.Connection[Any], dict[str, Any]]:
    env.bucket = env.create_bucket()
    ctx = env.ctx(cfg={"premake": 1, "retention": 3}, fresh_bucket_for_calibration=True)
    conn = env.connect()
    cells_rotate.make_events(conn, (2024, 1), 7)
    cells_rotate.add_rows(conn, "2024-01-01", "2024-07-01", 6_000)
    expected: dict[str, Any] = {"full": logical_hash(conn, [cells_rotate.PARENT])}
    for m in MONTHS:
        expected[m] = logical_hash(conn, [f"public.{m}"])
    rotate.detach_expired(Executor(conn), cells_rotate.config(ctx), cells_rotate.TODAY)
    assert sorted(t.name for t in tables_in_schema(conn, cells_rotate.ARCHIVE_SCHEMA)) == list(MONTHS)
    expected["remaining"] = logical_hash(conn, [cells_rotate.PARENT])
    return ctx, conn, expected


def scenario_archive(env: Env) -> Scenario:
    ctx, conn, expected = _detached(env)
    conn.close()
    return Scenario(env, "cells_archive:step_archive", ctx, step_archive, check_archived,
                    after_fault=no_drop_without_verified_archive, expected=expected)


def scenario_restore(env: Env, **params: Any) -> Scenario:
    ctx, conn, expected = _detached(env)
    results = step_archive(ctx)
    assert results == ["dropped", "dropped"], results
    ctx["manifests"] = [r[0] for r in conn.execute(
        "SELECT archive->>'key' FROM pgpartition.archive_queue ORDER BY table_name")]
    ctx["fresh_bucket_for_calibration"] = False  # restore only reads S3
    ctx.update(params)
    conn.close()
    return Scenario(env, "cells_archive:step_restore", ctx, step_restore, check_restored,
                    after_fault=restore_all_or_nothing, expected=expected)


# ------------------------------------------------------------------------------------------------ invariants


def _object_matches(s3: Any, manifest: dict[str, Any]) -> str | None:
    """None if the S3 object is exactly what the manifest says (size and sha256 of every byte), else why not."""
    try:
        body = s3.get_object(Bucket=manifest["bucket"], Key=manifest["key"])["Body"].read()
    except Exception as exc:
        return f"cannot read s3://{manifest['bucket']}/{manifest['key']}: {exc}"
    if len(body) != int(manifest["bytes"]):
        return f"size {len(body)} != manifest {manifest['bytes']}"
    digest = hashlib.sha256(body).hexdigest()
    return None if digest == manifest["sha256"] else f"sha256 {digest} != manifest {manifest['sha256']}"


def no_drop_without_verified_archive(sc: Scenario) -> None:
    """At any moment: a queued table that is gone has status 'dropped', a verified stage, and an S3 object whose
    bytes match the manifest; and a row marked 'dropped' really has no table left."""
    s3 = sc.env.s3()
    with sc.conn() as conn:
        for row in archive.pending_queue(conn) + _dropped(conn):
            gone = not catalog.exists(conn, row.table)
            if gone:
                assert row.status == "dropped" and row.archive.get("stage") == "verified", \
                    f"{row.table} is gone but its queue row is {row.status}/{row.archive.get('stage')}"
                problem = _object_matches(s3, row.archive["manifest"])
                assert problem is None, f"{row.table} was dropped but its archive is not intact: {problem}"
            else:
                assert row.status != "dropped", f"{row.table} is marked dropped but still exists"
                assert logical_hash(conn, [row.table]) == sc.expected[row.table_name], f"{row.table} changed"


def _dropped(conn: psycopg.Connection[Any]) -> list[archive.QueueRow]:
    return [archive.queue_row(conn, r[0]) for r in conn.execute(
        "SELECT id FROM pgpartition.archive_queue WHERE status = 'dropped'")]


def check_archived(sc: Scenario, app_ids: Sequence[int] = ()) -> None:
    """Both months dropped with intact, verified archives that restore to exactly the dropped rows; the parent
    unchanged; no multipart upload left open."""
    s3 = sc.env.s3()
    no_drop_without_verified_archive(sc)
    with sc.conn() as conn:
        rows = {r.table_name: r for r in _dropped(conn)}
        assert sorted(rows) == list(MONTHS), f"dropped: {sorted(rows)}; pending: {archive.pending_queue(conn)}"
        for name, row in rows.items():
            manifest = row.archive["manifest"]
            assert manifest["rows"] == sc.expected[name][0]
            archive.restore(Executor(conn), s3, manifest, target="schema", schema="faultcheck")
            assert logical_hash(conn, [f"faultcheck.{name}"]) == sc.expected[name], f"archive of {name} differs"
        conn.execute("DROP SCHEMA IF EXISTS faultcheck CASCADE")
        assert logical_hash(conn, [cells_rotate.PARENT]) == sc.expected["remaining"]
        assert tables_in_schema(conn, cells_rotate.ARCHIVE_SCHEMA) == []
        assert leftovers(conn) == []
    uploads = s3.list_multipart_uploads(Bucket=sc.ctx["bucket"]).get("Uploads", []) or []
    assert uploads == [], f"multipart uploads left open: {[(u['Key'], u['UploadId']) for u in uploads]}"


def restore_all_or_nothing(sc: Scenario) -> None:
    """Right after the fault: a month is either attached with every one of its rows, or not visible at all."""
    with sc.conn() as conn:
        attached = {p.name for p in partitions_of(conn, cells_rotate.PARENT)}
        extra = 0
        for name in MONTHS:
            if name in attached:
                got = logical_hash(conn, [f"public.{name}"])
                assert got == sc.expected[name], f"{name} is attached with different rows: {got}"
                extra += got[0]
        rows, distinct, _ = logical_hash(conn, [cells_rotate.PARENT])
        assert rows == distinct == sc.expected["remaining"][0] + extra


def check_restored(sc: Scenario, app_ids: Sequence[int] = ()) -> None:
    with sc.conn() as conn:
        rows, distinct, digest = logical_hash(conn, [cells_rotate.PARENT], exclude=app_ids)
        assert rows == distinct, f"{rows - distinct} rows are in two places"
        assert (rows, distinct, digest) == sc.expected["full"], "the restored table differs from the original"
        if app_ids:
            bad = {k: v for k, v in key_counts(conn, [cells_rotate.PARENT], app_ids).items() if v != 1}
            assert not bad, f"application rows lost or duplicated: {bad}"
        attached = {p.name for p in partitions_of(conn, cells_rotate.PARENT)}
        assert set(MONTHS) <= attached
        statuses = dict(conn.execute("SELECT table_name, status FROM pgpartition.archive_queue").fetchall())
        assert statuses == dict.fromkeys(MONTHS, "restored"), statuses
        stray = [r[0] for r in conn.execute(
            "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' AND NOT c.relispartition")]
        assert stray == [], f"standalone tables left by the restore: {stray}"
        assert leftovers(conn) == []
