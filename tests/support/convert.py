"""Helpers shared by the conversion tests (no tests here): row hashes, catalog snapshots, a whole conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core import convert
from pg_partition.core.convert import replay, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def ident(name: QualifiedName | str) -> sql.Composable:
    return (name if isinstance(name, QualifiedName) else QualifiedName.parse(name)).ident


def row_hash(conn: psycopg.Connection[Any], table: QualifiedName | str, key: str = "id") -> tuple[int, int, str]:
    """(rows, distinct keys, md5 over every row in key order): equal hashes mean no loss and no duplicate."""
    row = conn.execute(sql.SQL(
        "SELECT count(*), count(DISTINCT {k}), coalesce(md5(string_agg(md5(t::text), '' ORDER BY {k})), '') "
        "FROM {t} t").format(k=sql.Identifier(key), t=ident(table))).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), str(row[2])


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Everything a refused or dry-run step must leave untouched: relations, constraints, indexes, sequences'
    positions, publications, ACLs, comments, and whether the state schema exists."""
    rels = conn.execute(
        """SELECT n.nspname, c.relname, c.relkind, c.relacl::text, obj_description(c.oid, 'pg_class'),
                  pg_get_userbyid(c.relowner)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2""").fetchall()
    cons = conn.execute(
        """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
           WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
           ORDER BY 1, 2""").fetchall()
    seqs = conn.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences ORDER BY 1, 2").fetchall()
    pubs = conn.execute("SELECT pubname, pubviaroot, prrelid::regclass::text FROM pg_publication p "
                        "LEFT JOIN pg_publication_rel r ON r.prpubid = p.oid ORDER BY 1, 3").fetchall()
    schemas = conn.execute("SELECT nspname FROM pg_namespace ORDER BY 1").fetchall()
    return {"relations": rels, "constraints": cons, "sequences": seqs, "publications": pubs, "schemas": schemas}


def convert_all(
    conn: psycopg.Connection[Any],
    spec: ConvertSpec,
    *,
    cover_data: bool = True,
    future: int = 1,
    past: int = 0,
    batch_size: int = 2_000,
    where: str | None = None,
    swap: bool = True,
    capture: bool = False,
) -> dict[str, Any]:
    """Every step of a conversion in order, as the DAG runs them; returns each step's result. ``capture``: with
    change capture (replay after the fill, verify as the gate, then the swap replays again and applies the rest
    under its lock) instead of append-only catch-up."""
    ex = Executor(conn)
    out: dict[str, Any] = {"preflight": convert.preflight(conn, spec, where=where)}
    out["prep"] = convert.prep(ex, spec)
    out["add_partitions"] = convert.add_partitions(ex, spec, past=past, future=future, cover_data=cover_data,
                                                   where=where)
    if capture:
        out["capture"] = convert.install_capture(ex, spec, "on", where=where)
    out["plan"] = convert.plan_fill(ex, spec, where=where, batch_size=batch_size)
    # one work group on two sessions, as a DAG fill task copies its partitions
    group = {"key": "all", "items": out["plan"]["items"]}
    out["fill"] = convert.fill(ex, spec, group, sessions=2)["items"]
    if capture:  # as the DAG: replay what the application changed during the fill
        out["replay"] = replay.replay(ex, spec.table, spec.intermediate, batch_size=batch_size,
                                      until_backlog_below=50).as_dict()
    out["indexes"] = convert.build_indexes(ex, spec)
    if capture:  # the DAG's gate before the swap, with ANALYZE alongside on a second session
        out["verify"] = verify.verify_conversion(ex, spec, analyze=True)
        out["analyze"] = out["verify"].analyzed
        out["verify"].raise_if_mismatch()
        if swap:
            out["swap"] = convert.finish_and_swap(ex, spec, batch_size=batch_size)
    else:
        out["analyze"] = convert.analyze(ex, spec)
        out["catch_up_before"] = convert.catch_up(ex, spec)
        if swap:
            out["swap"] = convert.swap(ex, spec)
            out["catch_up"] = convert.catch_up(ex, spec)
    out["report"] = convert.report(conn, spec)
    return out
