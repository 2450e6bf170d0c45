"""Schema parity: the parts of a table's definition that ``CREATE TABLE (LIKE ...)`` does not carry over.

``LIKE`` copies columns, defaults, constraints, storage, compression, generated and identity columns, statistics
and comments; it does not copy row-level security (the ENABLE/FORCE flags and the policies), privileges (table
and column grants, grant options, the owner's own trimmed privileges), user triggers, storage options and
replica identity (those two live on each leaf: :mod:`pg_partition.core.db.leaf`), and views keep pointing at the
table they were created on (by OID), i.e. at ``_retired`` after a rename swap. A table with RLS enabled and no
policy is deny-all; without this module it became readable by every role with SELECT after the swap.

When each part is applied, and why:
- privileges: at prep (so nothing is ever more open than the source) and again under the swap lock (grants
  changed during the fill); a diff, so REVOKEs happen too;
- RLS flags, policies and user triggers: under the swap lock only. On the intermediate they would act during the
  fill (FORCE would filter the owner's copy, an audit trigger would fire once per copied row);
- dependent views: ``CREATE OR REPLACE VIEW`` with the definition read before the lock, run after the renames, so
  the same text now resolves to the new table (and, at unswap, back to the original). Materialized views cannot
  be re-pointed that way and are refused before anything changes, with their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.preflight import CAPTURE_TRIGGER_PREFIX
from pg_partition.core.db import leaf
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor

POLICY_COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}
TRIGGER_STATES = {"D": "DISABLE TRIGGER", "R": "ENABLE REPLICA TRIGGER", "A": "ENABLE ALWAYS TRIGGER"}


@dataclass
class Extras:
    """What the swap re-creates on the new table, read from the source before the lock."""

    rls: bool = False
    force_rls: bool = False
    policies: list[dict[str, Any]] = field(default_factory=list)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)
    identity_index: list[str] = field(default_factory=list)  # REPLICA IDENTITY USING INDEX: its key columns


def _role(oid: int, name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if oid == 0 or name is None else sql.Identifier(name)


def read(conn: psycopg.Connection[Any], oid: int) -> Extras:
    rel = conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    assert rel is not None
    policies = [{"name": r[0], "cmd": r[1], "permissive": r[2],
                 "roles": [[int(x), y] for x, y in zip(r[3], r[4], strict=True)],
                 "using": r[5], "check": r[6]} for r in conn.execute(
        """SELECT polname, polcmd, polpermissive, polroles::int8[],
                  array(SELECT CASE WHEN r = 0 THEN NULL ELSE pg_get_userbyid(r) END FROM unnest(polroles) r),
                  pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
           FROM pg_policy WHERE polrelid = %s ORDER BY polname""", (oid,))]
    triggers = [{"name": r[0], "definition": r[1], "enabled": r[2]} for r in conn.execute(
        """SELECT tgname, pg_get_triggerdef(oid), tgenabled FROM pg_trigger
           WHERE tgrelid = %s AND NOT tgisinternal AND left(tgname, length(%s)) <> %s ORDER BY tgname""",
        (oid, CAPTURE_TRIGGER_PREFIX, CAPTURE_TRIGGER_PREFIX))]
    return Extras(bool(rel[0]), bool(rel[1]), policies, triggers, dependent_views(conn, oid),
                  leaf.identity_columns(conn, oid))


def dependent_views(conn: psycopg.Connection[Any], oid: int, kinds: str = "v") -> list[dict[str, Any]]:
    """Views (``kinds``: v, m) whose query reads the table ``oid`` directly, with their definitions."""
    return [{"schema": r[0], "name": r[1], "definition": r[2], "options": list(r[3] or []), "kind": r[4]}
            for r in conn.execute(
        """SELECT DISTINCT n.nspname, v.relname, pg_get_viewdef(v.oid), v.reloptions, v.relkind::text
           FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid JOIN pg_class v ON v.oid = rw.ev_class
           JOIN pg_namespace n ON n.oid = v.relnamespace
           WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = %s
             AND v.oid <> %s AND v.relkind = ANY(%s) ORDER BY 1, 2""", (oid, oid, list(kinds)))]


def refusals(conn: psycopg.Connection[Any], oid: int, table: QualifiedName) -> list[tuple[str, str]]:
    """What cannot be carried to a partitioned table, as (problem, fix) pairs; checked before anything changes."""
    out: list[tuple[str, str]] = []
    mviews = dependent_views(conn, oid, "m")
    if mviews:
        names = ", ".join(f"{m['schema']}.{m['name']}" for m in mviews)
        out.append((f"materialized view(s) {names} read {table}; after the swap they would keep reading "
                    f"{table.name}_retired (a view follows its table by OID) and cannot be re-pointed in place",
                    f"drop them before the conversion and re-create them after the swap (DROP MATERIALIZED VIEW "
                    f"{names}; ... CREATE MATERIALIZED VIEW ...)"))
    rows = conn.execute(
        """SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND (tgtype & 1) = 1
           AND (tgoldtable IS NOT NULL OR tgnewtable IS NOT NULL) ORDER BY 1""", (oid,)).fetchall()
    if rows:
        names = ", ".join(r[0] for r in rows)
        out.append((f"row-level trigger(s) {names} on {table} use transition tables (REFERENCING), which "
                    "PostgreSQL does not support on partitioned tables",
                    "make them FOR EACH STATEMENT triggers (transition tables work there) or drop them"))
    return out


# --- privileges --------------------------------------------------------------------------------------------------

_ACL = """SELECT a.grantee, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
                 a.privilege_type, a.is_grantable FROM aclexplode({}) a"""


def _table_acl(conn: psycopg.Connection[Any], oid: int) -> set[tuple[int, str | None, str, bool]]:
    q = _ACL.format("coalesce((SELECT relacl FROM pg_class WHERE oid = %(o)s), "
                    "acldefault('r', (SELECT relowner FROM pg_class WHERE oid = %(o)s)))")
    return {(int(r[0]), r[1], r[2], bool(r[3])) for r in conn.execute(q, {"o": oid})}


def _column_acls(conn: psycopg.Connection[Any], oid: int) -> dict[str, set[tuple[int, str | None, str, bool]]]:
    out: dict[str, set[tuple[int, str | None, str, bool]]] = {}
    for (name,) in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT "
                                "attisdropped", (oid,)).fetchall():
        q = _ACL.format("(SELECT attacl FROM pg_attribute WHERE attrelid = %(o)s AND attname = %(n)s)")
        out[name] = {(int(r[0]), r[1], r[2], bool(r[3])) for r in conn.execute(q, {"o": oid, "n": name})}
    return out


def _acl_statements(have: set[tuple[int, str | None, str, bool]], want: set[tuple[int, str | None, str, bool]],
                    target: sql.Composable, column: str | None) -> list[sql.Composed]:
    """GRANT what ``want`` has and ``have`` lacks, REVOKE (the grant option or the privilege) what is extra."""
    out: list[sql.Composed] = []
    col = sql.SQL(" ({})").format(sql.Identifier(column)) if column else sql.SQL("")
    have_map = {(g, n, p): o for g, n, p, o in have}
    want_map = {(g, n, p): o for g, n, p, o in want}
    for (g, n, p), opt in sorted(want_map.items(), key=str):
        if have_map.get((g, n, p)) == opt:
            continue
        if (g, n, p) in have_map and have_map[(g, n, p)] and not opt:
            out.append(sql.SQL("REVOKE GRANT OPTION FOR {}{} ON {} FROM {}").format(
                sql.SQL(p), col, target, _role(g, n)))
        else:
            out.append(sql.SQL("GRANT {}{} ON {} TO {}{}").format(
                sql.SQL(p), col, target, _role(g, n), sql.SQL(" WITH GRANT OPTION") if opt else sql.SQL("")))
    for (g, n, p) in sorted(set(have_map) - set(want_map), key=str):
        out.append(sql.SQL("REVOKE {}{} ON {} FROM {}").format(sql.SQL(p), col, target, _role(g, n)))
    return out


def sync_privileges(ex: Executor, source_oid: int, target_oid: int, target: QualifiedName) -> None:
    """Make ``target``'s table and column privileges (with grant options) equal to the source's."""
    conn = ex.conn
    stmts = _acl_statements(_table_acl(conn, target_oid), _table_acl(conn, source_oid), target.ident, None)
    have_cols = _column_acls(conn, target_oid)
    for name, want in _column_acls(conn, source_oid).items():
        if name in have_cols:
            stmts += _acl_statements(have_cols[name], want, target.ident, name)
    for stmt in stmts:
        ex.run(stmt)


# --- applied under the swap lock -----------------------------------------------------------------------------


def apply_extras(ex: Executor, extras: Extras, target: QualifiedName, target_oid: int | None) -> None:
    """RLS flags, policies and user triggers of the source on ``target`` (the new live table, already renamed).
    Idempotent: policies and user triggers already on the target (an earlier swap, rolled back) are replaced."""
    conn = ex.conn
    if target_oid is not None:
        for (name,) in conn.execute("SELECT polname FROM pg_policy WHERE polrelid = %s", (target_oid,)).fetchall():
            ex.run(sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(name), target.ident))
        for (name,) in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal "
                "AND left(tgname, length(%s)) <> %s", (target_oid, CAPTURE_TRIGGER_PREFIX, CAPTURE_TRIGGER_PREFIX)
        ).fetchall():
            ex.run(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name), target.ident))
    for p in extras.policies:
        roles = sql.SQL(", ").join(_role(oid, name) for oid, name in p["roles"])
        ex.run(sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}{}{}").format(
            sql.Identifier(p["name"]), target.ident, sql.SQL("PERMISSIVE" if p["permissive"] else "RESTRICTIVE"),
            sql.SQL(POLICY_COMMANDS[p["cmd"]]), roles,
            sql.SQL(" USING ({})").format(sql.SQL(p["using"])) if p["using"] else sql.SQL(""),
            sql.SQL(" WITH CHECK ({})").format(sql.SQL(p["check"])) if p["check"] else sql.SQL("")))
    ex.run(sql.SQL("ALTER TABLE {} {} ROW LEVEL SECURITY").format(
        target.ident, sql.SQL("ENABLE" if extras.rls else "DISABLE")))
    ex.run(sql.SQL("ALTER TABLE {} {} ROW LEVEL SECURITY").format(
        target.ident, sql.SQL("FORCE" if extras.force_rls else "NO FORCE")))
    for t in extras.triggers:
        # the definition names the source table; run after the renames, that name is the new table
        ex.run(sql.SQL(t["definition"]))
        if t["enabled"] in TRIGGER_STATES:
            ex.run(sql.SQL("ALTER TABLE {} {} {}").format(target.ident, sql.SQL(TRIGGER_STATES[t["enabled"]]),
                                                          sql.Identifier(t["name"])))
    if extras.identity_index:
        apply_identity_index(ex, target, extras.identity_index)


def apply_identity_index(ex: Executor, target: QualifiedName, columns: list[str]) -> None:
    """The source's ``REPLICA IDENTITY USING INDEX`` on the new partitioned table: on each leaf, its index with
    the same key columns (the leaf's identity decides which old-row columns are WAL-logged); on the parent, its
    partitioned index with those columns when it has one (with ``publish_via_partition_root`` the parent's
    identity decides which columns subscribers are told form the key). Where either lacks such an index
    (a unique index must include the partition column on a partitioned table), ``FULL``: a subscriber keyed by
    those columns still finds every row (see :mod:`pg_partition.core.db.leaf`). Runs under the swap lock, after
    the indexes took the source's names, so the parent's index exists and is valid."""
    conn = ex.conn
    leaves = [] if ex.dry_run else [QualifiedName(r[0], r[1]) for r in conn.execute(
        """SELECT n.nspname, c.relname FROM pg_partition_tree(to_regclass(%s)) t
           JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE t.isleaf AND c.relkind = 'r' ORDER BY 1, 2""", (target.ident.as_string(conn),))]
    for part in leaves:
        ex.run(leaf.identity_statement(conn, part, columns, ex.logger))
    ex.run(leaf.identity_statement(conn, target, columns, ex.logger))


def repoint_views(ex: Executor, views: list[dict[str, Any]]) -> None:
    """Re-create each view from its definition text, read before the renames: the table name in it now resolves
    to the table that just became live. Views over these views follow by OID and need nothing."""
    for v in views:
        opts = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(val))
            for k, _, val in (o.partition("=") for o in v["options"]))) if v["options"] else sql.SQL("")
        ex.run(sql.SQL("CREATE OR REPLACE VIEW {}{} AS {}").format(
            sql.Identifier(v["schema"], v["name"]), opts, sql.SQL(v["definition"].rstrip().rstrip(";"))))
