"""Change capture for online conversion of tables that take UPDATEs and DELETEs.

pgslice copies rows by primary-key range and resumes from the destination's ``max(id)``, so an UPDATE or DELETE
that hits a row after it was copied is lost, and a transaction that commits late with a low id is never copied.
Here, before the fill starts, statement-level AFTER triggers on the source record the primary key of every row
that an INSERT, UPDATE (both the old and the new key, so a key change is two entries) or DELETE touched, in a
changelog table next to the source (``<table>_changelog``). The replay loop then makes each recorded key in the
destination equal to the source's current row (or absent when the source no longer has it). The fill and the
replay together converge to an exact copy whatever the write pattern; the swap applies the last backlog under its
exclusive lock, so the new table is exact at the moment it takes over.

Objects, all removed by :func:`finish_in_swap` (in the swap's transaction) or :func:`uninstall` (unprep/unswap):

- ``<schema>.<table>_changelog``: one row per changed key (the source's primary-key columns, consumed in physical
  order by ``ctid``), with a b-tree index on the key columns. The index costs the trigger one index insert per
  changed row, but without it every lookup by key (verify's exclusion of pending keys, a replay batch's anti-join)
  scans the whole changelog once per source row: under sustained writes the backlog grows while verify runs and
  verify never ends (issue 15, case 1).
- ``<schema>.<table>_capture()``: the trigger function, ``SECURITY DEFINER`` owned by the role that installed it,
  so the application's roles need no privilege on the changelog (and written so the caller's search_path cannot
  redirect anything in it).
- Triggers on the source named ``pg_partition_capture_{insert,update,delete,truncate}`` (the swap recognises
  capture by the ``pg_partition_capture`` prefix). Statement-level with transition tables: one INSERT into the
  changelog per statement, however many rows it touched. ``ENABLE ALWAYS`` so they also fire for sessions with
  ``session_replication_role = replica`` (logical-replication apply workers, some bulk loaders). TRUNCATE cannot
  be captured row by row, so it is refused while capture is on (the error says how to proceed).

Correctness argument for replay (one ``REPEATABLE READ`` transaction per batch, snapshot S):

1. A changelog entry is written by the same transaction as the change it records, so an entry is visible in S
   exactly when its change is.
2. The batch deletes entries visible in S and, for those keys, replaces the destination rows with the source's
   rows as seen in S. Every change committed after S keeps its entry for a later round.
3. Replay batches and fill batches write the destination one at a time: a replay batch locks the destination in
   SHARE ROW EXCLUSIVE mode (which conflicts with the fill's ROW EXCLUSIVE) *before* its snapshot is taken (LOCK
   TABLE takes no snapshot), so whichever of the two writes a key last also read the source last. A fill batch
   must likewise take its snapshot after its first write to the destination (the default READ COMMITTED
   ``DELETE range; INSERT ... SELECT range`` does; in REPEATABLE READ it must ``LOCK TABLE`` the destination
   first), otherwise an older fill snapshot could overwrite a newer replayed row.

Hence, for every key, the destination holds the source's state as of the last writer's snapshot, and every later
change of that key is still in the changelog. When the changelog is empty (under the swap's lock), the two are
equal. Replay is idempotent (applying a key twice writes the same row) and resumable after SIGKILL (a killed batch
rolls back, its entries stay).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.spec import ConvertSpec, checkpoint, forget, put, recorded_job
from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, PreflightError, StateError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import locks_table
from pg_partition.core.db.names import derived_name
from pg_partition.core.params import parse_switch

AUTO_HELP = "on (capture is the default; off is append-only mode, an explicit opt-in)"
APPEND_ONLY_LIMITS = (
    "append-only mode (pgslice's way): the fill and catch-up copy rows by primary key above a high-water mark, so "
    "an UPDATE or DELETE of a row after it was copied is not carried over, and a row whose id was taken with "
    "nextval before the fill's high-water mark but inserted later (an ORM reserving ids) is never copied")
TRIGGER_PREFIX = "pg_partition_capture"
TRIGGERS = {
    "insert": f"{TRIGGER_PREFIX}_insert",
    "update": f"{TRIGGER_PREFIX}_update",
    "delete": f"{TRIGGER_PREFIX}_delete",
    "truncate": f"{TRIGGER_PREFIX}_truncate",
}
NEW_TABLE = "pg_partition_new"
OLD_TABLE = "pg_partition_old"
MARKER = "pg_partition change capture for "

# Transient conflicts a replay batch may hit (a swap or DDL racing it); the batch rolls back and is retried.
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
              psycopg.errors.LockNotAvailable)


def changelog_name(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "changelog"))


def function_name(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "capture"))


def _marker(source: QualifiedName) -> str:
    return MARKER + str(source)


@dataclass(frozen=True)
class CapturePlan:
    """Everything a replay needs to know about the pair of tables, read once from the catalog."""

    source: QualifiedName
    dest: QualifiedName
    changelog: QualifiedName
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    columns: tuple[str, ...]  # non-generated columns copied from source to dest
    overriding: bool  # dest has an identity ALWAYS column: INSERT needs OVERRIDING SYSTEM VALUE


def _key_of(conn: psycopg.Connection[Any], source: QualifiedName) -> tuple[tuple[str, ...], tuple[str, ...]]:
    info = catalog.describe(conn, source)
    if info.is_partitioned:
        raise InvalidInputError(f"{source} is already partitioned", where=str(source),
                                fix="change capture is for converting an unpartitioned table")
    if info.primary_key is None:
        raise PreflightError(
            f"{source} has no primary key, so changed rows cannot be identified", where=str(source),
            fix="add a primary key (an integer id) to the table before converting it",
        )
    key = info.primary_key.columns
    types = tuple((info.column(c) or _missing(source, c)).type for c in key)
    return key, types


def _missing(table: QualifiedName, column: str) -> Any:
    raise StateError(f"column {column!r} is missing from {table}", where=str(table))


def capture_plan(conn: psycopg.Connection[Any], source: QualifiedName, dest: QualifiedName) -> CapturePlan:
    key, types = _key_of(conn, source)
    src_oid = catalog.table_oid(conn, source)
    dest_oid = catalog.table_oid(conn, dest)
    if dest_oid is None:
        raise InvalidInputError(f"destination {dest} does not exist", where=str(dest),
                                fix="run prep (and add partitions) before installing capture or replaying")
    assert src_oid is not None
    src_cols = catalog.columns(conn, src_oid)
    dest_cols = {c.name: c for c in catalog.columns(conn, dest_oid)}
    missing = [c.name for c in src_cols if c.name not in dest_cols]
    if missing:
        raise StateError(f"{dest} lacks columns of {source}: {', '.join(missing)}", where=str(dest),
                         fix="re-create the intermediate table (unprep, then prep)")
    absent_key = [c for c in key if c not in dest_cols]
    if absent_key:
        raise StateError(f"{dest} lacks key columns {absent_key}", where=str(dest))
    columns = tuple(c.name for c in src_cols if c.generated == "" and dest_cols[c.name].generated == "")
    overriding = any(dest_cols[c].identity == "a" for c in columns)
    return CapturePlan(source, dest, changelog_name(source), key, types, columns, overriding)


def trigger_names(conn: psycopg.Connection[Any], table: QualifiedName) -> list[str]:
    rows = conn.execute(
        """SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND NOT t.tgisinternal AND t.tgname LIKE %s
           ORDER BY 1""",
        (table.schema, table.name, TRIGGER_PREFIX + "%"),
    ).fetchall()
    return [r[0] for r in rows]


def _function_exists(conn: psycopg.Connection[Any], fn: QualifiedName) -> str | None:
    """The function's comment ('' when it has none) if it exists, else None."""
    row = conn.execute(
        """SELECT coalesce(obj_description(p.oid, 'pg_proc'), '') FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0""",
        (fn.schema, fn.name),
    ).fetchone()
    return None if row is None else str(row[0])


def is_installed(conn: psycopg.Connection[Any], source: QualifiedName) -> bool:
    """True when every capture trigger is on ``source`` and the changelog exists."""
    if not catalog.exists(conn, source) or not catalog.exists(conn, changelog_name(source)):
        return False
    return set(TRIGGERS.values()) <= set(trigger_names(conn, source))


def status(conn: psycopg.Connection[Any], source: QualifiedName) -> dict[str, Any]:
    """What of the capture exists (for reports and for cleanup decisions)."""
    cl = changelog_name(source)
    has_cl = catalog.exists(conn, cl)
    return {
        "table": str(source),
        "triggers": trigger_names(conn, source) if catalog.exists(conn, source) else [],
        "changelog": str(cl) if has_cl else None,
        "function": str(function_name(source)) if _function_exists(conn, function_name(source)) is not None
        else None,
        "installed": is_installed(conn, source),
        "publications_including_changelog": publishing_changelog(conn, source),
        "backlog": backlog(conn, source) if has_cl else 0,
    }


def should_capture(conn: psycopg.Connection[Any], source: QualifiedName,
                   setting: bool | str | None = "auto") -> tuple[bool, str]:
    """Decide ``capture_changes``: an explicit true/false wins; ``auto`` (or None) means on.

    Why auto is always on: the only evidence that a table is append-only would be pg_stat_user_tables'
    n_tup_upd/n_tup_del, and those counters reset on crash recovery, failover and ``pg_stat_reset()``; nothing
    else in the catalog tells whether the application will update or delete, or insert ids it reserved earlier.
    The cost of capture is one changelog append per changed row; the cost of skipping it wrongly is rows lost
    without a warning. Append-only mode is therefore an explicit ``off``, whose reason states its limitation.
    Returns (decision, reason).
    """
    setting = parse_switch(setting, what="capture_changes", auto_help=AUTO_HELP)
    if setting is False:
        return False, f"capture_changes=off (explicit): {APPEND_ONLY_LIMITS}"
    if setting is True:
        return True, "capture_changes=on (explicit)"
    return True, (f"auto: changes to {source} are captured (the safe default: whether a table takes UPDATE/DELETE "
                  "cannot be told from resettable statistics); pass capture_changes=off for append-only mode")


def composite_key_refusal(conn: psycopg.Connection[Any], source: QualifiedName) -> PreflightError | None:
    """Why append-only mode cannot convert ``source`` safely, or None.

    Append-only mode finds rows written after the fill by a high-water mark on the first key column. With a
    composite key a new row can reuse an existing first-column value (a new order of an existing account), so it
    sits below the mark and is never copied. Change capture records every inserted key, whatever its shape."""
    if not catalog.exists(conn, source):
        return None
    pk = catalog.describe(conn, source).primary_key
    if pk is None or len(pk.columns) < 2:
        return None
    return PreflightError(
        f"{source} has a composite primary key ({', '.join(pk.columns)}): append-only mode (capture_changes=off) "
        f"finds late rows by a high-water mark on {pk.columns[0]!r} alone, so a new row with an existing "
        f"{pk.columns[0]} would never be copied", where=str(source),
        fix="convert with change capture (capture_changes: on or auto, the default); it records every inserted, "
        "updated and deleted key whatever the key's shape")


def backlog(conn: psycopg.Connection[Any], source: QualifiedName) -> int:
    """Committed changelog entries not yet replayed (0 when capture is not installed)."""
    cl = changelog_name(source)
    if not catalog.exists(conn, cl):
        return 0
    return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(cl.ident)).fetchone()[0])  # type: ignore[index]


def column_list(names: Sequence[str], prefix: str | None = None) -> sql.Composable:
    if prefix is None:
        return sql.SQL(", ").join(sql.Identifier(c) for c in names)
    return sql.SQL(", ").join(sql.Identifier(prefix, c) for c in names)


def _function_sql(source: QualifiedName, key: Sequence[str], conn: psycopg.Connection[Any]) -> sql.Composed:
    """The trigger function. One INSERT per statement; an UPDATE records old and new keys (UNION drops the
    duplicate when the key did not change).

    SECURITY DEFINER (the application's roles need no privilege on the changelog) without a ``SET search_path``
    clause, which would cost a GUC save/restore on every statement of the application: instead nothing in the
    body depends on the caller's search_path (schema-qualified changelog, transition tables resolved before the
    catalog, ``OPERATOR(pg_catalog.=)``, ``pg_catalog.format``), so a caller cannot redirect it."""
    cl = changelog_name(source).ident
    cols = column_list(key)
    body = sql.SQL(
        """
BEGIN
  IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
    INSERT INTO {cl} ({cols}) SELECT {cols} FROM {new};
  ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
    INSERT INTO {cl} ({cols}) SELECT {cols} FROM {new} UNION SELECT {cols} FROM {old};
  ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
    INSERT INTO {cl} ({cols}) SELECT {cols} FROM {old};
  ELSE
    RAISE EXCEPTION USING
      MESSAGE = pg_catalog.format(
        'TRUNCATE of %s is refused: pg_partition is converting it and captures changes row by row', {table}),
      HINT = 'remove the capture first (unprep, or pg_partition RemoveCaptureOperator), or wait for the swap';
  END IF;
  RETURN NULL;
END
"""
    ).format(cl=cl, cols=cols, new=sql.Identifier(NEW_TABLE), old=sql.Identifier(OLD_TABLE),
             table=sql.Literal(str(source)))
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS {body}"
    ).format(fn=function_name(source).ident, body=sql.Literal(body.as_string(conn)))


def changelog_index_name(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "changelog_key"))


def _index_sql(source: QualifiedName, key: Sequence[str]) -> sql.Composed:
    """The changelog's index on the key columns: every lookup by key (verify, replay) is an index probe."""
    return sql.SQL("CREATE INDEX IF NOT EXISTS {ix} ON {cl} ({cols})").format(
        ix=sql.Identifier(changelog_index_name(source).name), cl=changelog_name(source).ident, cols=column_list(key))


def install(
    ex: Executor,
    source: QualifiedName,
    dest: QualifiedName,
    *,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> bool:
    """Install the changelog, the trigger function and the capture triggers on ``source``. Idempotent.

    Returns True when something was created, False when capture was already complete.

    Why no in-flight write is missed: everything happens in one transaction that first takes SHARE ROW EXCLUSIVE
    on the source (the lock CREATE TRIGGER needs anyway). That mode conflicts with the ROW EXCLUSIVE lock every
    INSERT/UPDATE/DELETE holds until its transaction ends, so the lock is granted only once every transaction that
    has written the source has committed or rolled back (and those commits are visible to everyone by then: locks
    are released after the commit is published). Writers that come later wait for our commit and then see the
    triggers. So each write is either committed before capture exists (and the fill, which starts after this
    returns, sees it) or is captured. The wait is bounded by ``lock_timeout`` and retried ``retries`` times,
    because queueing behind a long transaction would also stall the application's writes queued behind us.

    Install before the fill's first batch: a write made between a fill batch and the install would be lost.
    """
    conn = ex.conn
    plan = capture_plan(conn, source, dest)
    key, types = plan.key, plan.key_types
    if is_installed(conn, source):
        ix = changelog_index_name(source)
        if not ex.dry_run and conn.execute("SELECT to_regclass(%s)", (ix.ident.as_string(conn),)).fetchone() == (
                None,):
            # capture installed by an older version: add the index (a SHARE lock on the changelog only, so the
            # application's writes wait at most for this short build; bounded by lock_timeout)
            ex.with_lock_timeout(lambda: ex.run(_index_sql(source, key)), lock_timeout=lock_timeout,
                                 retries=retries, what=f"index the changelog of {source}")
        ex.logger.info("change capture already installed on %s (backlog %d)", source, backlog(conn, source))
        return False
    cl = changelog_name(source)
    fn = function_name(source)
    if catalog.exists(conn, cl):
        comment = conn.execute("SELECT coalesce(obj_description(%s::regclass, 'pg_class'), '')",
                               (cl.ident.as_string(conn),)).fetchone()
        if comment is None or comment[0] != _marker(source):
            raise StateError(f"{cl} exists and was not created by pg_partition's capture", where=str(cl),
                             fix=f"rename or drop {cl}; pg_partition needs that name for the changelog")
    fn_comment = _function_exists(conn, fn)
    if fn_comment is not None and fn_comment != _marker(source):
        raise StateError(f"function {fn}() exists and was not created by pg_partition", where=str(fn),
                         fix=f"rename or drop {fn}(); pg_partition needs that name for the capture trigger")

    def body() -> None:
        ex.run(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(source.ident))
        ex.run(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {cl} ({cols}) WITH (autovacuum_vacuum_scale_factor = 0, "
            "autovacuum_vacuum_threshold = 10000, autovacuum_vacuum_insert_scale_factor = 0)"
        ).format(cl=cl.ident, cols=sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in zip(key, types, strict=True))))
        ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(cl.ident, sql.Literal(_marker(source))))
        ex.run(_index_sql(source, key))
        ex.run(_function_sql(source, key, conn))
        ex.run(sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(fn.ident, sql.Literal(_marker(source))))
        present = set() if ex.dry_run else set(trigger_names(conn, source))
        stmts = {
            "insert": "AFTER INSERT ON {t} REFERENCING NEW TABLE AS {new}",
            "update": "AFTER UPDATE ON {t} REFERENCING OLD TABLE AS {old} NEW TABLE AS {new}",
            "delete": "AFTER DELETE ON {t} REFERENCING OLD TABLE AS {old}",
            "truncate": "BEFORE TRUNCATE ON {t}",
        }
        for event, timing in stmts.items():
            name = TRIGGERS[event]
            if name in present:
                continue
            ex.run(sql.SQL("CREATE TRIGGER {name} " + timing + " FOR EACH STATEMENT EXECUTE FUNCTION {fn}()").format(
                name=sql.Identifier(name), t=source.ident, new=sql.Identifier(NEW_TABLE),
                old=sql.Identifier(OLD_TABLE), fn=fn.ident))
            ex.run(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(source.ident, sql.Identifier(name)))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"install change capture on {source}")
    for pub in publishing_changelog(conn, source):
        ex.logger.warning(
            "publication %s publishes every table of %s (FOR ALL TABLES / TABLES IN SCHEMA), so it also publishes "
            "the changelog %s: a subscriber without that table stops applying changes. Create an empty %s with "
            "the same columns on each subscriber, or publish the tables explicitly, before the fill starts",
            pub, source.schema, cl, cl)
    ex.logger.info("change capture installed on %s: changelog %s, triggers %s", source, cl,
                   ", ".join(TRIGGERS.values()))
    return True


def publishing_changelog(conn: psycopg.Connection[Any], source: QualifiedName) -> list[str]:
    """Publications that will also publish the changelog (FOR ALL TABLES, or TABLES IN SCHEMA of its schema)."""
    rows = conn.execute("SELECT pubname FROM pg_publication WHERE puballtables ORDER BY 1").fetchall()
    names = [r[0] for r in rows]
    if conn.info.server_version >= 150000:
        names += [r[0] for r in conn.execute(
            """SELECT p.pubname FROM pg_publication_namespace pn JOIN pg_publication p ON p.oid = pn.pnpubid
               JOIN pg_namespace n ON n.oid = pn.pnnspid WHERE n.nspname = %s ORDER BY 1""",
            (source.schema,)).fetchall()]
    return sorted(set(names))


@locks_table()  # the per-table lock, also for a direct caller of the engine
def uninstall(ex: Executor, source: QualifiedName, *, lock_timeout: str = "2s", retries: int = 5) -> bool:
    """Remove the capture triggers, the trigger function and the changelog (unprep/unswap cleanup). Idempotent.

    The unreplayed backlog is discarded: only call this when the conversion is abandoned (the intermediate is
    dropped) or already swapped. Dropping a trigger takes ACCESS EXCLUSIVE on the table, hence lock_timeout.
    ``DROP FUNCTION ... CASCADE`` also removes capture triggers that followed a renamed table.
    Returns True when something was removed.
    """
    conn = ex.conn
    cl = changelog_name(source)
    fn = function_name(source)
    triggers = trigger_names(conn, source) if catalog.exists(conn, source) else []
    fn_comment = _function_exists(conn, fn)
    ours_fn = fn_comment == _marker(source)
    has_cl = catalog.exists(conn, cl)
    if not (triggers or ours_fn or has_cl):
        return False
    if has_cl:
        comment = conn.execute("SELECT coalesce(obj_description(%s::regclass, 'pg_class'), '')",
                               (cl.ident.as_string(conn),)).fetchone()
        if comment is None or comment[0] != _marker(source):
            raise StateError(f"{cl} was not created by pg_partition's capture; not dropping it", where=str(cl),
                             fix="drop it yourself if it is a leftover")
    pending = backlog(conn, source) if has_cl else 0

    def body() -> None:
        for name in triggers:
            ex.run(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), source.ident))
        if ours_fn:
            ex.run(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(fn.ident))
        if has_cl:
            ex.run(sql.SQL("DROP TABLE IF EXISTS {}").format(cl.ident))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"remove change capture on {source}")
    ex.logger.info("change capture removed from %s (%d unreplayed entries discarded)", source, pending)
    return True




# --- change capture ------------------------------------------------------------------------------------------

CAPTURE_STEP = "capture"


def decide_capture(conn: psycopg.Connection[Any], spec: ConvertSpec, setting: bool | str | None = "auto", *,
                   where: str | None = None) -> dict[str, Any]:
    """Whether this conversion captures changes (read-only). Returns ``{"capture": bool, "reason": str}``.

    An explicit on/off wins. ``auto`` reuses the decision recorded by an earlier run of the same conversion (so a
    resumed run does not flip because the application updated a row meanwhile), keeps capture that is already
    installed, and otherwise asks :func:`capture.should_capture` (on: the safe default). An explicit off
    (append-only mode) is refused for a composite primary key (:func:`composite_key_refusal`) and its reason
    states what that mode cannot carry over. Capture with a ``where`` filter is refused: replay copies every
    changed key's current row, filter or not, and verification compares whole tables, so the two cannot agree.
    """
    explicit = parse_switch(setting, what="capture_changes", auto_help=AUTO_HELP)
    recorded = checkpoint(conn, spec, CAPTURE_STEP)
    installed = catalog.exists(conn, spec.table) and is_installed(conn, spec.table)
    if explicit is not None:
        on, reason = explicit, f"capture_changes={'on' if explicit else 'off'} (explicit)"
    elif recorded is not None:
        on, reason = bool(recorded["capture"]), f"as decided earlier for this conversion: {recorded['reason']}"
    elif installed:
        on, reason = True, f"change capture is already installed on {spec.table}"
    else:
        on, reason = should_capture(conn, spec.table, "auto")
    if not on:
        refusal = composite_key_refusal(conn, spec.table)
        if refusal is not None:
            raise refusal
        if APPEND_ONLY_LIMITS not in reason:
            reason = f"{reason}; {APPEND_ONLY_LIMITS}"
    if on and where is not None and where.strip():
        raise InvalidInputError(
            f"change capture cannot be combined with a where filter ({where!r}) on {spec.table}",
            where=str(spec.table),
            fix="either convert every row with capture (leave where empty), or pass capture_changes=off to copy "
            "only the filtered rows in append-only mode (fill + catch-up); UPDATE/DELETE are then not carried over")
    return {"capture": on, "reason": reason, "installed": installed}


@locks_table()  # the per-table lock, also for a direct caller of the engine
def install_capture(ex: Executor, spec: ConvertSpec, setting: bool | str | None = "auto", *,
                    where: str | None = None, lock_timeout: str = "2s", retries: int = 5) -> dict[str, Any]:
    """Decide (:func:`decide_capture`) and make it so, before the fill: install the triggers and changelog
    (:func:`capture.install`, which waits for in-flight writers so no write is missed) or, for an explicit off,
    remove a capture an earlier run installed. The decision is recorded with the conversion.

    Installing capture after a fill plan was recorded without it (a run resumed with capture newly on) forgets
    the plan and the fill's checkpoints: rows changed between those batches and now were not captured, so the
    fill must copy everything again (batches replace their ranges, so nothing is duplicated).
    """
    conn = ex.conn
    decision = decide_capture(conn, spec, setting, where=where)
    out: dict[str, Any] = {**decision, "created": False, "removed": False, "replanned": False}
    if not decision["capture"]:
        if decision["installed"]:
            ex.logger.warning("capture_changes is off but capture is installed on %s: removing it (updates and "
                              "deletes are no longer carried over; catch-up copies new rows)", spec.table)
            out["removed"] = uninstall(ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    else:
        planned = checkpoint(conn, spec, "plan") is not None
        # a rehearsal before prep ran has no intermediate: the source stands in for the column check
        dest = spec.intermediate if not ex.dry_run or catalog.exists(conn, spec.intermediate) else spec.table
        out["created"] = install(ex, spec.table, dest, lock_timeout=lock_timeout, retries=retries)
        if out["created"] and planned and not ex.dry_run:
            ex.logger.warning("capture was installed after the fill of %s was planned: planning and filling again "
                              "(changes made before capture existed may not have been copied)", spec.table)
            with conn.transaction():
                forget(conn, spec, ("plan", "fill", "catch_up"))
            out["replanned"] = True
    # append-only mode is logged as a warning: its reason states what it cannot carry over
    ex.logger.log(logging.INFO if decision["capture"] else logging.WARNING, "change capture for %s: %s (%s)",
                  spec.table, "on" if decision["capture"] else "off", decision["reason"])
    if not ex.dry_run and state.ready(conn) and recorded_job(conn, spec.table) is not None:
        with conn.transaction():
            put(ex, spec, CAPTURE_STEP, {"capture": decision["capture"], "reason": decision["reason"]})
    return out


def capture_on(conn: psycopg.Connection[Any], table: QualifiedName) -> bool:
    """Whether the conversion of ``table`` runs with change capture: the recorded decision, else whether capture
    is installed (before the swap). Used to skip the capture tasks, or the catch-up, of the other mode."""
    rec = checkpoint(conn, ConvertSpec(table, "-"), CAPTURE_STEP)
    if rec is not None:
        return bool(rec["capture"])
    return catalog.exists(conn, table) and is_installed(conn, table)
