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

- ``<schema>.<table>_changelog``: one row per changed key (the source's primary-key columns, no index, so the
  trigger's cost is one heap append per changed row; consumed in physical order by ``ctid``).
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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core import catalog
from pg_partition.core.catalog import QualifiedName
from pg_partition.core.errors import InvalidInputError, PartitionError, PreflightError, StateError
from pg_partition.core.execute import Executor, Progress, log
from pg_partition.core.names import derived_name

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
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure,
              psycopg.errors.LockNotAvailable)


def changelog_name(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "changelog"))


def function_name(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "capture"))


def _marker(source: QualifiedName) -> str:
    return MARKER + str(source)


@dataclass(frozen=True)
class _Plan:
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


def _plan(conn: psycopg.Connection[Any], source: QualifiedName, dest: QualifiedName) -> _Plan:
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
    return _Plan(source, dest, changelog_name(source), key, types, columns, overriding)


def _trigger_names(conn: psycopg.Connection[Any], table: QualifiedName) -> list[str]:
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
    return set(TRIGGERS.values()) <= set(_trigger_names(conn, source))


def status(conn: psycopg.Connection[Any], source: QualifiedName) -> dict[str, Any]:
    """What of the capture exists (for reports and for cleanup decisions)."""
    cl = changelog_name(source)
    has_cl = catalog.exists(conn, cl)
    return {
        "table": str(source),
        "triggers": _trigger_names(conn, source) if catalog.exists(conn, source) else [],
        "changelog": str(cl) if has_cl else None,
        "function": str(function_name(source)) if _function_exists(conn, function_name(source)) is not None
        else None,
        "installed": is_installed(conn, source),
        "publications_including_changelog": publishing_changelog(conn, source),
        "backlog": backlog(conn, source) if has_cl else 0,
    }


def should_capture(conn: psycopg.Connection[Any], source: QualifiedName,
                   setting: bool | str | None = "auto") -> tuple[bool, str]:
    """Decide ``capture_changes``: an explicit true/false wins; ``auto`` (or None) turns capture on when the
    table has seen UPDATE or DELETE since statistics were last reset (pg_stat_user_tables n_tup_upd/n_tup_del).

    Why auto means "has it ever been updated": the cost of capture is a few percent of write throughput, the cost
    of skipping it on a table that does get updates is silently lost changes. Returns (decision, reason).
    """
    if isinstance(setting, str) and setting.strip().lower() not in ("", "auto", "none"):
        text = setting.strip().lower()
        if text in ("1", "true", "yes", "on"):
            setting = True
        elif text in ("0", "false", "no", "off"):
            setting = False
        else:
            raise InvalidInputError(f"capture_changes={setting!r} is not true, false or auto",
                                    fix="use true, false, or auto (on when the table has seen UPDATE/DELETE)")
    if isinstance(setting, bool):
        return setting, f"capture_changes={str(setting).lower()} (explicit)"
    info = catalog.describe(conn, source)
    upd, dele = info.stats.get("n_tup_upd", 0), info.stats.get("n_tup_del", 0)
    if upd or dele:
        return True, (f"auto: {source} has seen {upd} updated and {dele} deleted rows (pg_stat_user_tables), "
                      "so changes are captured")
    return False, (f"auto: {source} looks append-only (no UPDATE/DELETE in pg_stat_user_tables); the fill and "
                   "catch-up suffice. Pass capture_changes=true if the application may still update or delete")


def backlog(conn: psycopg.Connection[Any], source: QualifiedName) -> int:
    """Committed changelog entries not yet replayed (0 when capture is not installed)."""
    cl = changelog_name(source)
    if not catalog.exists(conn, cl):
        return 0
    return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(cl.ident)).fetchone()[0])  # type: ignore[index]


def _cols(names: Sequence[str], prefix: str | None = None) -> sql.Composable:
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
    cols = _cols(key)
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
    plan = _plan(conn, source, dest)  # validates source (plain, has a primary key) and dest (exists, same columns)
    key, types = plan.key, plan.key_types
    if is_installed(conn, source):
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
        ex.run(_function_sql(source, key, conn))
        ex.run(sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(fn.ident, sql.Literal(_marker(source))))
        present = set() if ex.dry_run else set(_trigger_names(conn, source))
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
    triggers = _trigger_names(conn, source) if catalog.exists(conn, source) else []
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


@dataclass
class ReplayStats:
    """What a replay did. ``entries`` counts changelog rows consumed; ``keys`` distinct keys applied."""

    batches: int = 0
    entries: int = 0
    keys: int = 0
    deleted: int = 0
    inserted: int = 0
    seconds: float = 0.0
    backlog: int = 0
    retries: int = 0
    stopped_because: str = ""
    statements: list[str] = field(default_factory=list, repr=False)

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("statements")
        out["keys_per_s"] = round(self.keys_per_s, 1)
        return out


class _Applier:
    """Applies sets of keys to the destination: delete them there, insert the source's rows with those keys."""

    def __init__(self, plan: _Plan, ex: Executor) -> None:
        self.plan = plan
        self.ex = ex
        self.logged = False
        p = plan
        if len(p.key) == 1:
            k = sql.Identifier(p.key[0])
            arr = sql.SQL("%s::{}[]").format(sql.SQL(p.key_types[0]))
            self.delete = sql.SQL("DELETE FROM {d} WHERE {k} = ANY({arr})").format(d=p.dest.ident, k=k, arr=arr)
            where = sql.SQL("{k} = ANY({arr})").format(k=k, arr=arr)
        else:
            unnest = sql.SQL("unnest({}) AS k({})").format(
                sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in p.key_types), _cols(p.key))
            self.delete = sql.SQL("DELETE FROM {d} AS d USING {u} WHERE {cond}").format(
                d=p.dest.ident, u=unnest,
                cond=sql.SQL(" AND ").join(sql.SQL("d.{c} = k.{c}").format(c=sql.Identifier(c)) for c in p.key))
            where = sql.SQL("({}) IN (SELECT * FROM {})").format(_cols(p.key), unnest)
        self.insert = sql.SQL("INSERT INTO {d} ({cols}) {ovr}SELECT {cols} FROM {s} WHERE {where}").format(
            d=p.dest.ident, s=p.source.ident, cols=_cols(p.columns), where=where,
            ovr=sql.SQL("OVERRIDING SYSTEM VALUE " if p.overriding else ""))
        self.take = sql.SQL(
            "DELETE FROM {cl} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {cl} LIMIT %s)) RETURNING {cols}"
        ).format(cl=p.changelog.ident, cols=_cols(p.key))
        self.take_all = sql.SQL("WITH taken AS (DELETE FROM {cl} RETURNING {cols}) SELECT DISTINCT {cols} FROM taken"
                                ).format(cl=p.changelog.ident, cols=_cols(p.key))

    def execute(self, stmt: sql.Composed, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        """Run a statement of the replay loop: the SQL is logged once per loop, not once per batch."""
        text = stmt.as_string(self.ex.conn)
        if text not in self.ex.statements:
            self.ex.statements.append(text)
            self.ex.logger.info("SQL: %s", text)
        else:
            self.ex.logger.debug("SQL: %s", text)
        return self.ex.conn.execute(stmt, params)

    def params(self, keys: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
        return [[k[i] for k in keys] for i in range(len(self.plan.key))]

    def apply(self, keys: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Replace the destination rows of ``keys`` with the source's. Returns (deleted, inserted)."""
        if not keys:
            return 0, 0
        arrays = self.params(keys)
        deleted = self.execute(self.delete, arrays).rowcount
        try:
            inserted = self.execute(self.insert, arrays).rowcount
        except psycopg.errors.CheckViolation as exc:
            raise PartitionError(
                f"a changed row of {self.plan.source} fits no partition of {self.plan.dest}: "
                f"{exc.diag.message_primary}",
                where=str(self.plan.dest),
                fix="add the partitions it needs (add_partitions with more future/past, or cover_data), then run "
                "replay again; nothing was lost: the changes stay in the changelog",
            ) from exc
        return max(deleted, 0), max(inserted, 0)


def _distinct(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return list(dict.fromkeys(tuple(r) for r in rows))


def replay(
    ex_or_conn: Executor | psycopg.Connection[Any],
    source: QualifiedName,
    dest: QualifiedName,
    *,
    batch_size: int = 5000,
    until_backlog_below: int = 1000,
    throttle: Callable[[], None] | None = None,
    max_batches: int | None = None,
    max_retries: int = 10,
    logger: logging.Logger | None = None,
) -> ReplayStats:
    """Apply the changelog to ``dest`` in batches until fewer than ``until_backlog_below`` entries are waiting.

    Each batch is one short REPEATABLE READ transaction (see the module docstring for why that is exact):
    lock source (ACCESS SHARE: never blocks the application), dest (SHARE ROW EXCLUSIVE: waits for a running fill
    batch) and the changelog, all before the snapshot; take up to ``batch_size`` entries visible to the snapshot;
    delete their keys from dest; insert the source's rows with those keys. Entries committed meanwhile stay.

    The loop stops once a batch drains everything visible and the backlog is below ``until_backlog_below``
    (1 = drain completely), or after ``max_batches``, or when capture disappears (the swap finished).
    ``throttle`` is called between batches (sleep, wait for replication lag, ...). Needs a connection outside a
    transaction (autocommit, or idle); safe to run twice and to kill at any moment.
    """
    ex = ex_or_conn if isinstance(ex_or_conn, Executor) else Executor(ex_or_conn, logger=logger or log)
    conn = ex.conn
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}", fix="pass a positive batch_size")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise InvalidInputError("replay needs a connection outside a transaction",
                                fix="pass an autocommit connection (each batch is its own transaction)")
    threshold = max(until_backlog_below, 1)
    if not is_installed(conn, source):
        raise StateError(
            f"change capture is not installed on {source}", where=str(source),
            fix="install capture (InstallCaptureOperator / capture.install) before the fill; if the table was "
            "already swapped, there is nothing to replay",
        )
    plan = _plan(conn, source, dest)
    applier = _Applier(plan, ex)
    stats = ReplayStats(statements=ex.statements)
    started = time.monotonic()
    locks = [
        sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(plan.source.ident),
        sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(plan.dest.ident),
        sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(plan.changelog.ident),
    ]
    if ex.dry_run:
        for stmt in [*locks, applier.take, applier.delete, applier.insert]:
            ex.run(stmt)
        stats.backlog = backlog(conn, source)
        stats.stopped_because = "dry run"
        return stats

    progress = Progress(f"replay {source} -> {dest}", None, unit="keys", logger=ex.logger)

    def one_batch() -> tuple[int, int, int, int]:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for stmt in locks:
                applier.execute(stmt, ())
            rows = applier.execute(applier.take, (batch_size,)).fetchall()
            keys = _distinct(rows)
            deleted, inserted = applier.apply(keys)
        return len(rows), len(keys), deleted, inserted

    while True:
        try:
            entries, nkeys, deleted, inserted = one_batch()
        except psycopg.errors.UndefinedTable:
            if not is_installed(conn, source):
                stats.stopped_because = "capture removed (swap finished or capture uninstalled)"
                break
            raise
        except _RETRYABLE as exc:
            stats.retries += 1
            if stats.retries > max_retries:
                raise
            ex.logger.warning("replay batch rolled back (%s); retrying", type(exc).__name__)
            time.sleep(min(0.1 * stats.retries, 2.0))
            continue
        stats.batches += 1
        stats.entries += entries
        stats.keys += nkeys
        stats.deleted += deleted
        stats.inserted += inserted
        progress.add(nkeys)
        if max_batches is not None and stats.batches >= max_batches:
            stats.stopped_because = f"max_batches={max_batches}"
            break
        if entries < batch_size:
            waiting = backlog(conn, source)
            if waiting < threshold:
                stats.stopped_because = f"backlog {waiting} < {threshold}"
                break
        if throttle is not None:
            throttle()
    stats.seconds = time.monotonic() - started
    stats.backlog = backlog(conn, source)
    ex.logger.info(
        "replay %s -> %s: %d batches, %d entries, %d keys (%d rows deleted, %d inserted) in %.1fs, %.0f keys/s; "
        "backlog now %d (%s)", source, dest, stats.batches, stats.entries, stats.keys, stats.deleted,
        stats.inserted, stats.seconds, stats.keys_per_s, stats.backlog, stats.stopped_because,
    )
    return stats


def finish_in_swap(ex: Executor, source: QualifiedName, dest: QualifiedName, *, chunk: int = 10000) -> int:
    """Apply the whole remaining backlog to ``dest`` and remove capture, inside the swap's transaction.

    Call it after the swap holds ACCESS EXCLUSIVE on ``source`` and before renaming anything: no write can be in
    flight, so the changelog is complete and the destination becomes an exact copy. Everything here (apply, drop
    triggers/function/changelog) commits or rolls back with the swap: if the swap's transaction fails (lock
    timeout, error) the backlog and the triggers are intact and the next attempt starts over.
    Returns the number of distinct keys applied; logs the backlog size and how long it took.
    """
    conn = ex.conn
    cl = changelog_name(source)
    triggers = _trigger_names(conn, source)
    if not catalog.exists(conn, cl):
        if triggers:
            raise StateError(f"{source} has capture triggers {triggers} but no changelog {cl}", where=str(source),
                             fix="remove capture (capture.uninstall) and re-run the conversion from the fill")
        ex.logger.info("no change capture on %s; nothing to apply", source)
        return 0
    started = time.monotonic()
    plan = _plan(conn, source, dest)
    applier = _Applier(plan, ex)
    waiting = backlog(conn, source)
    ex.logger.info("swap: applying the last change-capture backlog of %s: %d entries", source, waiting)
    applied = 0
    if ex.dry_run:
        for stmt in (applier.take_all, applier.delete, applier.insert):
            ex.run(stmt)
        applied = waiting
    else:
        ex.run(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(dest.ident))
        keys = [tuple(r) for r in applier.execute(applier.take_all, ()).fetchall()]
        for i in range(0, len(keys), chunk):
            applier.apply(keys[i:i + chunk])
        applied = len(keys)
    for name in triggers:
        ex.run(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), source.ident))
    ex.run(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(function_name(source).ident))
    ex.run(sql.SQL("DROP TABLE IF EXISTS {}").format(cl.ident))
    ex.logger.info("swap: change-capture backlog of %s applied: %d entries, %d distinct keys in %.3fs; capture "
                   "removed", source, waiting, applied, time.monotonic() - started)
    return applied
