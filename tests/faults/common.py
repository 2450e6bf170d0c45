"""Shared pieces of the fault cells: the scenario record, row hashes over several relations, and the generic
leftover checks (capture triggers, changelogs, intermediates, invalid indexes, detach pending)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.db.catalog import QualifiedName
from tests.faults.driver import Env


@dataclass
class Scenario:
    """One prepared database for one trial: the step to fault, how to finish the flow, what must hold after."""

    env: Env
    step: str  # "module:function" in tests/faults, run by the worker and re-run in-process
    ctx: dict[str, Any]
    finish: Callable[[dict[str, Any]], Any]
    check: Callable[[Scenario, Sequence[int]], None]
    after_fault: Callable[[Scenario], None] | None = None
    expected: dict[str, Any] = field(default_factory=dict)

    def conn(self) -> psycopg.Connection[Any]:
        return self.env.connect()


def connect(ctx: dict[str, Any]) -> psycopg.Connection[Any]:
    return psycopg.connect(ctx["dsn"], autocommit=True)


def rels(*names: QualifiedName | str) -> list[QualifiedName]:
    return [n if isinstance(n, QualifiedName) else QualifiedName.parse(n) for n in names]


def logical_hash(conn: psycopg.Connection[Any], relations: Sequence[QualifiedName | str], *, key: str = "id",
                 exclude: Sequence[int] = ()) -> tuple[int, int, str]:
    """(rows, distinct keys, md5 over every row's text in key order) over the UNION ALL of ``relations``.

    rows == distinct keys means no row sits in two places; equal md5 means no row lost, added or changed.
    ``exclude``: keys written by the application during the case (checked separately).
    """
    union = sql.SQL(" UNION ALL ").join(sql.SQL("SELECT * FROM {}").format(r.ident) for r in rels(*relations))
    row = conn.execute(sql.SQL(
        "SELECT count(*), count(DISTINCT {k}), coalesce(md5(string_agg(md5(t::text), '' ORDER BY {k})), '') "
        "FROM ({u}) t WHERE NOT ({k} = ANY(%s))").format(k=sql.Identifier(key), u=union),
        (list(exclude),)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), str(row[2])


def key_counts(conn: psycopg.Connection[Any], relations: Sequence[QualifiedName | str], keys: Sequence[int],
               key: str = "id") -> dict[int, int]:
    """How many times each of ``keys`` occurs over ``relations`` (the application's rows: exactly once each)."""
    union = sql.SQL(" UNION ALL ").join(sql.SQL("SELECT {} AS k FROM {}").format(sql.Identifier(key), r.ident)
                                        for r in rels(*relations))
    found = dict(conn.execute(sql.SQL("SELECT k, count(*) FROM ({}) t WHERE k = ANY(%s) GROUP BY k").format(union),
                              (list(keys),)).fetchall())
    return {k: int(found.get(k, 0)) for k in keys}


def leftovers(conn: psycopg.Connection[Any]) -> list[str]:
    """Objects a completed flow must not leave: capture triggers/functions/changelogs, intermediates, invalid
    indexes, partitions stuck 'detach pending', pre-validated bounds CHECKs, restore markers."""
    out: list[str] = []
    out += [f"trigger {r[0]} on {r[1]}" for r in conn.execute(
        "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal "
        "AND tgname LIKE 'pg_partition_capture%'")]
    out += [f"relation {r[0]}" for r in conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 'p') "
        "AND (c.relname LIKE '%%\\_changelog' OR c.relname LIKE '%%\\_intermediate')")]
    out += [f"function {r[0]}" for r in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND obj_description(p.oid, 'pg_proc') LIKE 'pg_partition change capture%%'")]
    out += [f"invalid index {r[0]}" for r in conn.execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid OR NOT indisready")]
    out += [f"detach pending {r[0]}" for r in conn.execute(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhdetachpending")]
    out += [f"bounds CHECK {r[0]} on {r[1]}" for r in conn.execute(
        "SELECT conname, conrelid::regclass::text FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid "
        "WHERE contype = 'c' AND conname LIKE '%%\\_bounds' AND r.relispartition")]
    out += [f"restore marker on {r[0]}" for r in conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE obj_description(c.oid, 'pg_class') "
        "LIKE 'pg_partition restore of %%' AND c.relispartition")]
    return out


def partitions_of(conn: psycopg.Connection[Any], parent: str) -> list[QualifiedName]:
    return [QualifiedName(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.inhparent = %s::regclass ORDER BY 2", (parent,))]


def tables_in_schema(conn: psycopg.Connection[Any], schema: str) -> list[QualifiedName]:
    return [QualifiedName(schema, r[0]) for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1", (schema,))]
