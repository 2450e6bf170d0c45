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
#
# Each ACL entry is (grantee oid, grantee name or None for PUBLIC, privilege, grant option, grantor oid, grantor
# name). The grantor matters: a privilege that alice granted (with the grant option the owner gave her) is revoked
# when alice revokes it or loses that option; recorded as the owner's, it would survive both. A grant by the
# owner (or by a superuser, which PostgreSQL records as the owner's) is re-made as is. A grant by another role is
# re-made *as that role* (SET ROLE, then GRANT: PostgreSQL records the current role as the grantor; GRANTED BY
# other than the current role only exists from 16 and needs the same membership), after the grants that give it
# its grant option. Where the session cannot act as that role (a non-superuser that is not a member of it), the
# privilege is carried as the owner's grant, so nobody loses access, and a warning names the grant and how to
# re-attribute it. The same holds for REVOKEs of grants by other roles.

Acl = tuple[int, "str | None", str, bool, int, str]

_ACL = """SELECT a.grantee, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
                 a.privilege_type, a.is_grantable, a.grantor, pg_get_userbyid(a.grantor) FROM aclexplode({}) a"""


def _acl_rows(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> set[Acl]:
    return {(int(r[0]), r[1], r[2], bool(r[3]), int(r[4]), str(r[5])) for r in conn.execute(query, params)}


def _table_acl(conn: psycopg.Connection[Any], oid: int) -> set[Acl]:
    q = _ACL.format("coalesce((SELECT relacl FROM pg_class WHERE oid = %(o)s), "
                    "acldefault('r', (SELECT relowner FROM pg_class WHERE oid = %(o)s)))")
    return _acl_rows(conn, q, {"o": oid})


def _column_acls(conn: psycopg.Connection[Any], oid: int) -> dict[str, set[Acl]]:
    out: dict[str, set[Acl]] = {}
    for (name,) in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT "
                                "attisdropped", (oid,)).fetchall():
        q = _ACL.format("(SELECT attacl FROM pg_attribute WHERE attrelid = %(o)s AND attname = %(n)s)")
        out[name] = _acl_rows(conn, q, {"o": oid, "n": name})
    return out


def _owner(conn: psycopg.Connection[Any], oid: int) -> tuple[int, str]:
    row = conn.execute("SELECT relowner, pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


@dataclass
class _Grantors:
    """Which grantors this session can act as (SET ROLE), and what it could not reproduce."""

    conn: psycopg.Connection[Any]
    owner: tuple[int, str]
    target: QualifiedName
    warnings: list[str] = field(default_factory=list)
    _can: dict[int, bool] = field(default_factory=dict)

    def can_act_as(self, role: int) -> bool:
        if role not in self._can:
            # from 16 SET ROLE needs the membership's SET option, before that membership is enough
            option = "SET" if self.conn.info.server_version >= 160000 else "MEMBER"
            row = self.conn.execute("SELECT pg_has_role(current_user, %s::oid, %s)", (role, option)).fetchone()
            self._can[role] = bool(row and row[0])
        return self._can[role]

    def normalize(self, acl: set[Acl], source_owner: int, column: str | None) -> set[Acl]:
        """The source's entries as they can be made on the target: the source owner's grants become the target
        owner's; a grant by a role this session cannot act as becomes the owner's, with a warning."""
        out: set[Acl] = set()
        for g, n, p, opt, by, by_name in acl:
            if by == source_owner:
                by, by_name = self.owner
            elif by != self.owner[0] and not self.can_act_as(by):
                what = f"{p}{f' ({column})' if column else ''}"
                self.warnings.append(
                    f"{what} on {self.target} granted to {n or 'PUBLIC'} by {by_name}: carried as a grant by the "
                    f"owner {self.owner[1]}, because this session cannot act as {by_name} (not a member with SET); "
                    f"to keep {by_name} as its grantor, run as {by_name}: GRANT {p}"
                    f"{f' ({column})' if column else ''} ON {self.target} TO {n or 'PUBLIC'}"
                    f"{' WITH GRANT OPTION' if opt else ''}; then as {self.owner[1]}: REVOKE {p}"
                    f"{f' ({column})' if column else ''} ON {self.target} FROM {n or 'PUBLIC'}")
                by, by_name = self.owner
            out.add((g, n, p, opt, by, by_name))
        return out

    def settle(self, want: set[Acl], have: set[Acl]) -> set[Acl]:
        """An owner's grant that the target already holds from a role this session cannot act as (a grant this
        module carried as the owner's, going back at unswap) counts as present: re-making it as the owner's
        would only add a second grant next to the one with the true grantor."""
        out = set(want)
        for entry in have:
            g, n, p, opt, by, _ = entry
            mine = (g, n, p, opt, *self.owner)
            if by != self.owner[0] and mine in out and not self.can_act_as(by):
                out.discard(mine)
                out.add(entry)
        return out


def _acl_statements(have: set[Acl], want: set[Acl], target: sql.Composable, column: str | None,
                    grantors: _Grantors) -> list[tuple[str | None, sql.Composed]]:
    """(grantor to act as, or None for this session) and the GRANT or REVOKE making ``have`` equal ``want``.

    Order: grants by the owner, then grants by other roles in dependency order (a grantor's own grant option
    first); then revokes of other roles' grants, then the owner's (dependent grants go before the option they
    depend on, so no CASCADE is ever needed)."""
    owner = grantors.owner[0]
    col = sql.SQL(" ({})").format(sql.Identifier(column)) if column else sql.SQL("")
    have_map = {(g, n, p, by, byn): o for g, n, p, o, by, byn in have}
    want_map = {(g, n, p, by, byn): o for g, n, p, o, by, byn in want}
    grants: list[tuple[tuple[int, str | None, str, int, str], bool]] = []
    for key, opt in want_map.items():
        if have_map.get(key) != opt:
            grants.append((key, opt))
    # a grant by role R of privilege P needs R's grant option for P first: order by depth of that chain
    options = {(g, p): by for (g, _, p, by, _), o in want_map.items() if o}

    def depth(g: int, p: str, by: int, seen: int = 0) -> int:
        if by == owner or seen > 50:
            return 0
        return 1 + depth(by, p, options.get((by, p), owner), seen + 1)

    grants.sort(key=lambda kv: (depth(kv[0][0], kv[0][2], kv[0][3]), str(kv)))
    out: list[tuple[str | None, sql.Composed]] = []
    revokes: list[tuple[int, tuple[str | None, sql.Composed]]] = []
    for (g, n, p, by, byn), opt in grants:
        actor = None if by == owner else byn
        if (g, n, p, by, byn) in have_map and have_map[(g, n, p, by, byn)] and not opt:
            revokes.append((0, (actor, sql.SQL("REVOKE GRANT OPTION FOR {}{} ON {} FROM {}").format(
                sql.SQL(p), col, target, _role(g, n)))))
        else:
            out.append((actor, sql.SQL("GRANT {}{} ON {} TO {}{}").format(
                sql.SQL(p), col, target, _role(g, n), sql.SQL(" WITH GRANT OPTION") if opt else sql.SQL(""))))
    for (g, n, p, by, byn) in sorted(set(have_map) - set(want_map), key=str):
        if by != owner and not grantors.can_act_as(by):
            grantors.warnings.append(
                f"{p}{f' ({column})' if column else ''} on {grantors.target} granted to {n or 'PUBLIC'} by {byn} "
                f"is not on the source, but this session cannot act as {byn} to revoke it; run as {byn}: REVOKE "
                f"{p}{f' ({column})' if column else ''} ON {grantors.target} FROM {n or 'PUBLIC'}")
            continue
        revokes.append((0 if by != owner else 1, (None if by == owner else byn, sql.SQL(
            "REVOKE {}{} ON {} FROM {}").format(sql.SQL(p), col, target, _role(g, n)))))
    revokes.sort(key=lambda r: r[0])
    return out + [r for _, r in revokes]


@dataclass
class PrivilegePlan:
    """The GRANT/REVOKE statements (each with the grantor to act as, None for this session) that make a table's
    privileges equal to another's, and the grantors that could not be reproduced. Computed by reading only, so
    the swap builds it before its lock and only runs it under it."""

    statements: list[tuple[str | None, sql.Composed]]
    warnings: list[str]
    session_role: str


def privilege_statements(conn: psycopg.Connection[Any], source_oid: int, target_oid: int,
                         target: QualifiedName) -> PrivilegePlan:
    """What makes ``target``'s table and column privileges (grant options and grantors) equal to the source's."""
    grantors = _Grantors(conn, _owner(conn, target_oid), target)
    source_owner = _owner(conn, source_oid)[0]
    have = _table_acl(conn, target_oid)
    stmts = _acl_statements(have, grantors.settle(grantors.normalize(_table_acl(conn, source_oid), source_owner,
                                                                     None), have), target.ident, None, grantors)
    have_cols = _column_acls(conn, target_oid)
    for name, want in _column_acls(conn, source_oid).items():
        if name in have_cols:
            stmts += _acl_statements(have_cols[name], grantors.settle(
                grantors.normalize(want, source_owner, name), have_cols[name]), target.ident, name, grantors)
    me = conn.execute("SELECT current_user").fetchone()
    assert me is not None
    return PrivilegePlan(stmts, grantors.warnings, str(me[0]))


def run_privileges(ex: Executor, plan: PrivilegePlan) -> list[str]:
    """Run a :class:`PrivilegePlan`; returns (and logs) a warning for each grantor that could not be reproduced."""
    for actor, stmt in plan.statements:
        if actor is None:
            ex.run(stmt)
            continue
        # the grantor PostgreSQL records is the current role (a failure aborts the transaction, which also
        # undoes the SET ROLE)
        ex.run(sql.SQL("SET ROLE {}").format(sql.Identifier(actor)))
        ex.run(stmt)
        ex.run(sql.SQL("SET ROLE {}").format(sql.Identifier(plan.session_role)))
    for w in plan.warnings:
        ex.logger.warning("grantor not reproduced: %s", w)
    return plan.warnings


def sync_privileges(ex: Executor, source_oid: int, target_oid: int, target: QualifiedName) -> list[str]:
    """Make ``target``'s table and column privileges (grant options and grantors) equal to the source's.
    Returns (and logs) a warning for each grantor that could not be reproduced."""
    return run_privileges(ex, privilege_statements(ex.conn, source_oid, target_oid, target))


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
