"""Issue 15 case 6: after the swap the table's definition equals the original's apart from partitioning.

A generic catalog diff (written here, independent of the engine's own introspection) is taken of randomly
generated table shapes (seeded: column types, keys, constraints, indexes, storage options, RLS and policies,
table and column grants with grant options, replica identity, triggers, comments, statistics targets, dependent
views) before the conversion, after the swap and after the unswap; row hashes are compared at each point.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.errors import PreflightError
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all, row_hash

SHAPES = 16  # number of random table shapes (seeds 0..SHAPES-1)
ROLES = ("parity_reader", "parity_writer", "parity_auditor")


# --- the generic definition of a table, read straight from the catalog -----------------------------------------


def _acl(conn: psycopg.Connection[Any], expr: str, params: tuple[Any, ...]) -> list[tuple[str, str, bool]]:
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        f"""SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type,
                   a.is_grantable FROM aclexplode({expr}) a ORDER BY 1, 2, 3""", params)]


def definition(conn: psycopg.Connection[Any], table: str, column: str = "created_at") -> dict[str, Any]:
    """Everything the issue lists, normalised so a partitioned table and a plain one compare equal when they
    differ only by partitioning: storage options and replica identity of a partitioned table are read from each
    leaf (they cannot be set on the parent), primary and unique keys as column lists (per partition or on the
    parent with the partition column), trigger and view definitions with the table's name."""
    oid = conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()[0]  # type: ignore[index]
    rel = conn.execute("SELECT relkind, relrowsecurity, relforcerowsecurity, relreplident, relpersistence, "
                       "pg_get_userbyid(relowner), obj_description(oid, 'pg_class') FROM pg_class WHERE oid = %s",
                       (oid,)).fetchone()
    assert rel is not None
    partitioned = rel[0] == "p"
    leaves = [r[0] for r in conn.execute(
        "SELECT relid::oid FROM pg_partition_tree(%s) WHERE isleaf", (oid,))] if partitioned else [oid]
    storage = {tuple(sorted(r[0] or [])) + tuple(sorted(f"toast.{o}" for o in (r[1] or []))) for r in conn.execute(
        "SELECT c.reloptions, t.reloptions FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid "
        "WHERE c.oid = ANY(%s)", (leaves,))}
    leaf_replident = {r[0] for r in conn.execute("SELECT relreplident FROM pg_class WHERE oid = ANY(%s)", (leaves,))}
    columns = []
    for a in conn.execute(
            """SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attstattarget,
                      co.collname, a.attstorage, col_description(a.attrelid, a.attnum)
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", (oid,)):
        default = a[4]
        if default and a[5] == "" and default.startswith("nextval("):
            default = "nextval(<sequence>)"  # the serial's sequence follows the live table
        columns.append((a[1], a[2], a[3], default, a[5], a[6], a[7], a[8], a[9], a[10],
                        _acl(conn, "(SELECT attacl FROM pg_attribute WHERE attrelid = %s AND attnum = %s)",
                             (oid, a[0]))))
    constraints = sorted(tuple(r) for r in conn.execute(
        "SELECT conname, contype, pg_get_constraintdef(oid), obj_description(oid, 'pg_constraint') "
        "FROM pg_constraint WHERE conrelid = %s AND contype IN ('c', 'f')", (oid,)))
    keys = set()
    for rel_oid in [oid, *leaves]:
        for r in conn.execute(
                """SELECT i.indisprimary, array(SELECT a.attname FROM unnest(i.indkey) k
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k)
                   FROM pg_index i WHERE i.indrelid = %s AND (i.indisprimary OR i.indisunique)""", (rel_oid,)):
            keys.add((r[0], tuple(c for c in r[1] if c != column)))
    indexes = sorted(tuple(r) for r in conn.execute(
        """SELECT ic.relname, regexp_replace(pg_get_indexdef(i.indexrelid), ' ON (ONLY )?\\S+ ', ' ON <t> '),
                  obj_description(i.indexrelid, 'pg_class')
           FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
           WHERE i.indrelid = %s AND NOT i.indisprimary AND NOT i.indisunique""", (oid,)))
    policies = sorted(tuple(r) for r in conn.execute(
        """SELECT polname, polcmd, polpermissive,
                  array(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r) END FROM unnest(polroles) r
                        ORDER BY 1)::text, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
           FROM pg_policy WHERE polrelid = %s""", (oid,)))
    triggers = sorted(tuple(r) for r in conn.execute(
        """SELECT tgname, tgenabled, regexp_replace(pg_get_triggerdef(oid), ' ON \\S+ ', ' ON <t> ')
           FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgname NOT LIKE 'pg_partition%%'""",
        (oid,)))
    views = sorted(tuple(r) for r in conn.execute(
        """SELECT DISTINCT v.oid::regclass::text, pg_get_viewdef(v.oid), v.reloptions::text
           FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid JOIN pg_class v ON v.oid = rw.ev_class
           WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
             AND d.refobjid = %s AND v.oid <> %s""", (oid, oid)))
    return {
        "rls": (rel[1], rel[2]), "replica_identity": rel[3] if not partitioned else (rel[3], leaf_replident),
        "persistence": rel[4], "owner": rel[5], "comment": rel[6],
        "acl": _acl(conn, "coalesce((SELECT relacl FROM pg_class WHERE oid = %s), acldefault('r', %s::oid))",
                    (oid, conn.execute("SELECT relowner FROM pg_class WHERE oid = %s", (oid,)).fetchone()[0])),  # type: ignore[index]
        "storage": storage, "columns": columns, "constraints": constraints, "keys": keys, "indexes": indexes,
        "policies": policies, "triggers": triggers, "views": views,
    }


def comparable(d: dict[str, Any], *, partitioned: bool) -> dict[str, Any]:
    """The definition of the original table as the partitioned one should show it: replica identity on the
    parent and on every leaf."""
    out = dict(d)
    if partitioned:
        out["replica_identity"] = (d["replica_identity"], {d["replica_identity"]})
    return out


# --- random shapes -----------------------------------------------------------------------------------------------


@dataclass
class Shape:
    ddl: list[str] = field(default_factory=list)
    insert_cols: list[str] = field(default_factory=list)
    insert_exprs: list[str] = field(default_factory=list)
    primary_key: str = "per_partition"
    column: str = "created_at"
    text_cols: list[str] = field(default_factory=list)


COLUMN_POOL: list[tuple[str, str]] = [  # (type, value expression over g)
    ("integer", "(g * 7) % 1000"),
    ("bigint", "g * 1000003"),
    ("smallint", "(g % 300)::smallint"),
    ("numeric(12,2)", "(g * 1.25)::numeric(12,2)"),
    ("text", "md5(g::text)"),
    ("varchar(40)", "left(md5((g * 3)::text), 40)"),
    ("boolean", "g % 3 = 0"),
    ("jsonb", "jsonb_build_object('g', g, 'tag', md5(g::text))"),
    ("uuid", "md5(g::text)::uuid"),
    ("date", "date '2024-01-01' + (g % 400)"),
    ("double precision", "g / 7.0"),
    ("integer[]", "ARRAY[g, g + 1]"),
    ("bytea", "decode(md5(g::text), 'hex')"),
]


def make_shape(rnd: random.Random) -> Shape:
    s = Shape()
    key_type = rnd.choice(["bigint GENERATED ALWAYS AS IDENTITY", "bigint GENERATED BY DEFAULT AS IDENTITY",
                           "bigserial", "integer", "bigint"])
    cols = [f"id {key_type}"]
    if key_type in ("integer", "bigint"):
        s.insert_cols.append("id")
        s.insert_exprs.append("g")
    ptype = rnd.choice(["timestamptz", "timestamp", "date"])
    cols.append(f"created_at {ptype} NOT NULL")
    s.insert_cols.append("created_at")
    s.insert_exprs.append(f"('2024-03-01'::date + (g % 90) * interval '1 day' + (g % 24) * interval '1 hour')::{ptype}")
    composite = rnd.random() < 0.35
    if composite:
        cols.append("tenant integer NOT NULL DEFAULT 1")
        s.insert_cols.append("tenant")
        s.insert_exprs.append("g % 5")
    for i, (typ, expr) in enumerate(rnd.sample(COLUMN_POOL, rnd.randint(1, 6))):
        name = f"c{i}_{typ.split('(')[0].split('[')[0].replace(' ', '_')}"
        extra = ""
        if rnd.random() < 0.4:
            extra += " NOT NULL"
        if typ == "text":
            s.text_cols.append(name)
            if rnd.random() < 0.3:
                extra += ' COLLATE "C"'
        if typ == "integer" and rnd.random() < 0.5:
            extra += f" DEFAULT 42 CHECK ({name} >= 0)"
        cols.append(f"{name} {typ}{extra}")
        s.insert_cols.append(name)
        s.insert_exprs.append(expr)
    if rnd.random() < 0.4:
        cols.append("doubled bigint GENERATED ALWAYS AS (id * 2) STORED")
    if rnd.random() < 0.4:
        cols.append("kind text NOT NULL DEFAULT 'a'")
        s.insert_cols.append("kind")
        s.insert_exprs.append("(ARRAY['a', 'b', 'c'])[1 + g % 3]")
    pk = "id, tenant" if composite else "id"
    s.primary_key = rnd.choice(["per_partition", "composite"])
    s.ddl.append(f"CREATE TABLE parity_t ({', '.join(cols)}, CONSTRAINT parity_t_pkey PRIMARY KEY ({pk}))")
    if rnd.random() < 0.5:
        s.ddl.append("CREATE TABLE parity_lookup (k integer PRIMARY KEY)")
        s.ddl.append("INSERT INTO parity_lookup SELECT generate_series(0, 4)")
        if composite:
            s.ddl.append("ALTER TABLE parity_t ADD CONSTRAINT parity_t_tenant_fk FOREIGN KEY (tenant) "
                         "REFERENCES parity_lookup (k)")
    if rnd.random() < 0.5:
        s.ddl.append("ALTER TABLE parity_t ADD CONSTRAINT parity_t_created_check CHECK (created_at IS NOT NULL)")
    # indexes
    s.ddl.append("CREATE INDEX parity_t_created_idx ON parity_t (created_at)")
    if s.text_cols and rnd.random() < 0.6:
        s.ddl.append(f"CREATE INDEX parity_t_lower_idx ON parity_t (lower({s.text_cols[0]}))")
    if rnd.random() < 0.4:
        s.ddl.append("CREATE INDEX parity_t_partial_idx ON parity_t (id) WHERE id % 2 = 0")
    if rnd.random() < 0.4:
        s.ddl.append("CREATE UNIQUE INDEX parity_t_uniq ON parity_t (id, created_at)")
    # storage options (leaf-level on a partitioned table)
    opts = []
    if rnd.random() < 0.6:
        opts.append(f"fillfactor = {rnd.choice([50, 70, 90])}")
    if rnd.random() < 0.5:
        opts.append(f"autovacuum_vacuum_scale_factor = {rnd.choice(['0.01', '0.05'])}")
    if rnd.random() < 0.3:
        opts.append("autovacuum_enabled = false")
    if rnd.random() < 0.3:
        opts.append("toast.autovacuum_enabled = false")
    if opts:
        s.ddl.append(f"ALTER TABLE parity_t SET ({', '.join(opts)})")
    # statistics targets, comments
    if rnd.random() < 0.6:
        s.ddl.append(f"ALTER TABLE parity_t ALTER COLUMN created_at SET STATISTICS {rnd.choice([50, 500, 1000])}")
    if rnd.random() < 0.6:
        s.ddl.append("COMMENT ON TABLE parity_t IS 'events of the parity test; it''s random'")
    if rnd.random() < 0.6:
        s.ddl.append("COMMENT ON COLUMN parity_t.created_at IS 'when it happened'")
    # replica identity
    s.ddl.append(f"ALTER TABLE parity_t REPLICA IDENTITY {rnd.choice(['DEFAULT', 'FULL', 'NOTHING'])}")
    # grants: table and columns, with and without grant option; the owner's own privileges trimmed sometimes
    for role in ROLES:
        if rnd.random() < 0.6:
            privs = rnd.sample(["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"],
                               rnd.randint(1, 3))
            option = " WITH GRANT OPTION" if rnd.random() < 0.4 else ""
            s.ddl.append(f"GRANT {', '.join(privs)} ON parity_t TO {role}{option}")
        if rnd.random() < 0.5:
            option = " WITH GRANT OPTION" if rnd.random() < 0.4 else ""
            s.ddl.append(f"GRANT SELECT (id, created_at), UPDATE (created_at) ON parity_t TO {role}{option}")
    if rnd.random() < 0.2:
        s.ddl.append("REVOKE TRUNCATE ON parity_t FROM CURRENT_USER")
    # row-level security
    if rnd.random() < 0.5:
        s.ddl.append("ALTER TABLE parity_t ENABLE ROW LEVEL SECURITY")
        if rnd.random() < 0.5:
            s.ddl.append("ALTER TABLE parity_t FORCE ROW LEVEL SECURITY")
    if rnd.random() < 0.5:
        s.ddl.append("CREATE POLICY parity_read ON parity_t FOR SELECT TO parity_reader USING (id % 2 = 0)")
    if rnd.random() < 0.3:
        s.ddl.append("CREATE POLICY parity_write ON parity_t AS RESTRICTIVE FOR INSERT TO parity_writer, "
                     "parity_auditor WITH CHECK (created_at IS NOT NULL)")
    # user triggers: an audit counter that must not fire during the fill
    s.ddl.append("CREATE TABLE parity_audit (n bigint NOT NULL)")
    s.ddl.append("INSERT INTO parity_audit VALUES (0)")
    s.ddl.append("CREATE FUNCTION parity_count() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$BEGIN UPDATE parity_audit SET n = n + 1; RETURN NULL; END$$")
    s.ddl.append("CREATE TRIGGER parity_audit_row AFTER INSERT ON parity_t FOR EACH ROW EXECUTE FUNCTION "
                 "parity_count()")
    if rnd.random() < 0.5:
        s.ddl.append("CREATE FUNCTION parity_touch() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$BEGIN RETURN NEW; END$$")
        s.ddl.append("CREATE TRIGGER parity_touch BEFORE UPDATE OF created_at ON parity_t FOR EACH ROW "
                     "WHEN (OLD.created_at IS DISTINCT FROM NEW.created_at) EXECUTE FUNCTION parity_touch()")
        if rnd.random() < 0.5:
            s.ddl.append("ALTER TABLE parity_t DISABLE TRIGGER parity_touch")
    if rnd.random() < 0.4:
        s.ddl.append("CREATE FUNCTION parity_stmt() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$")
        s.ddl.append("CREATE TRIGGER parity_stmt AFTER DELETE ON parity_t REFERENCING OLD TABLE AS gone "
                     "FOR EACH STATEMENT EXECUTE FUNCTION parity_stmt()")
    # dependent views
    if rnd.random() < 0.7:
        s.ddl.append("CREATE VIEW parity_recent AS SELECT id, created_at FROM parity_t WHERE id > 10")
        if rnd.random() < 0.5:
            s.ddl.append("CREATE VIEW parity_recent_count AS SELECT count(*) AS n FROM parity_recent")
    if rnd.random() < 0.4:
        s.ddl.append("CREATE VIEW parity_guarded WITH (security_barrier) AS SELECT * FROM parity_t "
                     "WHERE id % 3 = 0 WITH CASCADED CHECK OPTION")
        s.ddl.append("GRANT SELECT ON parity_guarded TO parity_reader")
    return s


@pytest.fixture
def roles(conn: psycopg.Connection[Any]) -> None:
    for role in ROLES:  # roles are cluster-wide: create once, keep (harmless, NOLOGIN)
        conn.execute(sql.SQL("DO $$BEGIN CREATE ROLE {} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
                     .format(sql.Identifier(role)))


def audit(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT n FROM parity_audit").fetchone()[0])  # type: ignore[index]


@pytest.mark.parametrize("seed", range(SHAPES))
def test_random_shape_keeps_its_definition_through_convert_and_unswap(conn, roles, seed: int) -> None:
    rnd = random.Random(seed)
    shape = make_shape(rnd)
    for stmt in shape.ddl:
        conn.execute(stmt)
    conn.execute(f"INSERT INTO parity_t ({', '.join(shape.insert_cols)}) SELECT {', '.join(shape.insert_exprs)} "
                 "FROM generate_series(1, 600) g")
    before = definition(conn, "parity_t")
    hashed = row_hash(conn, "parity_t")
    audited = audit(conn)
    assert audited == 600
    spec = ConvertSpec.create("parity_t", "created_at", period="month", primary_key=shape.primary_key)
    key = catalog.describe(conn, spec.table).primary_key
    # a composite key needs change capture (append-only mode is refused for it: its high-water mark is one column)
    convert_all(conn, spec, capture=key is not None and len(key.columns) > 1)

    shape_text = "\n".join(shape.ddl)
    assert row_hash(conn, "parity_t") == hashed, shape_text
    assert audit(conn) == audited, "a user trigger fired during the conversion:\n" + shape_text
    after = definition(conn, "parity_t")
    expected = comparable(before, partitioned=True)
    diff = {k: (expected[k], after[k]) for k in expected if expected[k] != after[k]}
    assert not diff, f"definition changed by the conversion (seed {seed}):\n{shape_text}\n{diff}"
    # the user trigger works on the new table (recreated on the parent, so it fires for every partition)
    conn.execute("INSERT INTO parity_t (" + ", ".join(shape.insert_cols) + ") SELECT "
                 + ", ".join(shape.insert_exprs) + " FROM generate_series(601, 601) g")
    assert audit(conn) == audited + 1
    hashed = row_hash(conn, "parity_t")

    convert.unswap(Executor(conn), spec)
    assert row_hash(conn, "parity_t") == hashed, shape_text
    assert audit(conn) == audited + 1, "the copy-back fired the original's trigger again"
    conn.execute("INSERT INTO parity_t (" + ", ".join(shape.insert_cols) + ") SELECT "
                 + ", ".join(shape.insert_exprs) + " FROM generate_series(602, 602) g")
    assert audit(conn) == audited + 2, "the original's trigger is not active again after the unswap"
    hashed = row_hash(conn, "parity_t")
    rolled = definition(conn, "parity_t")
    diff = {k: (before[k], rolled[k]) for k in before if before[k] != rolled[k]}
    assert not diff, f"definition changed by the unswap (seed {seed}):\n{shape_text}\n{diff}"
    # the intermediate is idle again: nothing on it may act during a later refill
    assert conn.execute("SELECT relrowsecurity, relforcerowsecurity, (SELECT count(*) FROM pg_trigger WHERE "
                        "tgrelid = c.oid AND NOT tgisinternal), (SELECT count(*) FROM pg_policy WHERE polrelid = "
                        "c.oid) FROM pg_class c WHERE c.oid = 'parity_t_intermediate'::regclass").fetchone() == (
        False, False, 0, 0)
    convert.unprep(Executor(conn), spec)
    assert row_hash(conn, "parity_t") == hashed


def test_rls_without_policies_stays_deny_all(conn, roles) -> None:
    """The issue's report: RLS on and no policy (deny-all) became readable by every role with SELECT."""
    conn.execute("CREATE TABLE secrets (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO secrets SELECT g, '2024-05-01'::timestamptz + g * interval '1 hour', 'x' "
                 "FROM generate_series(1, 100) g")
    conn.execute("ALTER TABLE secrets ENABLE ROW LEVEL SECURITY")
    conn.execute("GRANT SELECT ON secrets TO parity_reader")
    convert_all(conn, ConvertSpec.create("secrets", "created_at"))
    with conn.transaction():
        conn.execute("SET LOCAL ROLE parity_reader")
        assert conn.execute("SELECT count(*) FROM secrets").fetchone() == (0,)
        conn.execute("RESET ROLE")


def test_materialized_view_over_the_table_is_refused_with_its_name(conn) -> None:
    conn.execute("CREATE TABLE mv_src (id bigint PRIMARY KEY, created_at timestamptz NOT NULL)")
    conn.execute("CREATE MATERIALIZED VIEW mv_src_summary AS SELECT count(*) FROM mv_src")
    spec = ConvertSpec.create("mv_src", "created_at")
    with pytest.raises(PreflightError, match="mv_src_summary"):
        convert.prep(Executor(conn), spec)
    assert conn.execute("SELECT to_regclass('mv_src_intermediate')").fetchone() == (None,)
