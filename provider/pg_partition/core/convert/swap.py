"""swap (short lock; publications, sequences, NOTIFY), and its rollbacks unswap and unprep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert import capture, parity, replay
from pg_partition.core.convert.capture import CAPTURE_STEP, capture_on
from pg_partition.core.convert.catchup import (
    catch_up,
    common_columns,
    copy_missing,
    copy_missing_locked,
    outside_error,
    prepare_locked_copy,
    rows_outside,
    safe_low,
)
from pg_partition.core.convert.fill import fill_status, recorded_plan
from pg_partition.core.convert.preflight import CAPTURE_TRIGGER_PREFIX
from pg_partition.core.convert.prep import index_plan, prep_record
from pg_partition.core.convert.spec import (
    PREPPED,
    SWAPPED,
    ConvertSpec,
    checkpoint,
    forget,
    put,
    recorded_job,
    set_status,
)
from pg_partition.core.db import catalog, state
from pg_partition.core.db.capabilities import capabilities
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import LockTimeoutExhausted, PreflightError, StateError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import locks_table
from pg_partition.core.db.names import fit_identifier
from pg_partition.core.db.partitions import copy_grants

# --- swap ----------------------------------------------------------------------------------------------------


def _publications(conn: psycopg.Connection[Any], table: QualifiedName) -> tuple[list[dict[str, Any]], list[str]]:
    """Explicit memberships of ``table`` (with row filter and column list), and every publication that
    publishes it (FOR ALL TABLES / TABLES IN SCHEMA included)."""
    oid = catalog.table_oid(conn, table)
    # row filters and column lists (prqual/prattrs) exist from 15; before, a membership is the whole table
    filters = sql.SQL(
        """pg_get_expr(pr.prqual, pr.prrelid),
                  CASE WHEN pr.prattrs IS NOT NULL THEN array(
                      SELECT a.attname FROM pg_attribute a WHERE a.attrelid = pr.prrelid
                      AND a.attnum = ANY(pr.prattrs::int2[]) ORDER BY a.attnum)::text[] END"""
        if capabilities(conn).publication_row_filters else "NULL::text, NULL::text[]")
    explicit = conn.execute(sql.SQL(
        """SELECT p.pubname, {filters}
           FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
           WHERE pr.prrelid = %s ORDER BY 1""").format(filters=filters), (oid,)).fetchall()
    every = conn.execute(
        "SELECT DISTINCT pubname FROM pg_publication_tables WHERE schemaname = %s AND tablename = %s ORDER BY 1",
        (table.schema, table.name)).fetchall()
    return ([{"name": r[0], "row_filter": r[1], "columns": r[2]} for r in explicit], [r[0] for r in every])


def _move_publications(ex: Executor, explicit: list[dict[str, Any]], every: list[str], old: QualifiedName,
                       new: QualifiedName, *, via_root: bool) -> None:
    conn = ex.conn
    if via_root:
        for pubname in every:
            row = conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (pubname,)).fetchone()
            if row and not row[0]:
                ex.run(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(
                    sql.Identifier(pubname)))
    for pub in explicit:
        ex.run(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(sql.Identifier(pub["name"]), old.ident))
        cols = sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, pub["columns"]))) \
            if pub["columns"] else sql.SQL("")
        filt = sql.SQL(" WHERE ({})").format(sql.SQL(pub["row_filter"])) if pub["row_filter"] else sql.SQL("")
        ex.run(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}{}{}").format(
            sql.Identifier(pub["name"]), new.ident, cols, filt))


def _sequence_state(conn: psycopg.Connection[Any], seq: QualifiedName) -> int:
    """The next value the sequence would hand out."""
    row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident)).fetchone()
    assert row is not None
    return int(row[0]) + 1 if row[1] else int(row[0])


def _move_sequences(ex: Executor, old_info: TableInfo, new_info: TableInfo, new_name: QualifiedName, *,
                    top: int) -> list[str]:
    """Carry id generation from the table that stops being live (``old``) to the one that becomes live (``new``),
    both already renamed; ``top`` is the largest id the new live table holds. Serial: the shared sequence
    changes owner. Identity: the new table's own identity is restarted past every id either side handed out,
    and the two sequences swap names. Both TableInfos are read before the lock; only the sequences' positions
    are read under it."""
    conn = ex.conn
    done: list[str] = []
    for col, old_seq in old_info.sequences.items():
        column = old_info.column(col)
        if column is None:
            continue
        if column.identity:
            new_seq = new_info.sequences.get(col)
            if new_seq is None:
                raise StateError(f"{new_name}.{col} has no identity sequence", fix="re-create it with prep")
            restart = max(_sequence_state(conn, old_seq), _sequence_state(conn, new_seq), top + 1)
            ex.run(sql.SQL("ALTER TABLE {} ALTER COLUMN {} RESTART WITH {}").format(
                new_name.ident, sql.Identifier(col), sql.Literal(restart)))
            parked = old_seq.sibling(fit_identifier(old_seq.name, "_swap"))
            ex.run(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(old_seq.ident, sql.Identifier(parked.name)))
            ex.run(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(new_seq.ident, sql.Identifier(old_seq.name)))
            ex.run(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(parked.ident, sql.Identifier(new_seq.name)))
            done.append(f"{col}: identity restarted at {restart}")
        else:
            ex.run(sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(
                old_seq.ident, new_name.ident, sql.Identifier(col)))
            done.append(f"{col}: {old_seq} now owned by {new_name}")
    return done


def _capture_triggers(conn: psycopg.Connection[Any], table: QualifiedName) -> list[str]:
    oid = catalog.table_oid(conn, table)
    return [r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgname LIKE %s",
        (oid, CAPTURE_TRIGGER_PREFIX + "%"))]


def new_identity_needed(conn: psycopg.Connection[Any], parent: QualifiedName) -> bool:
    """Whether the published new parent needs ``REPLICA IDENTITY FULL`` at the swap.

    After the swap publications use ``publish_via_partition_root``, so subscribers see the parent, and the
    parent's replica identity decides which columns pgoutput marks as the key. A parent without a primary key
    (``primary_key=per_partition``: the keys live on the partitions) marks none, and a subscriber keyed by ``id``
    stops applying with "publisher did not send replica identity column expected by the logical replication
    target relation". FULL on the parent marks every column, so any subscriber key is covered; the partitions
    keep their own primary-key identity, so WAL still carries only the old key (no extra WAL). A parent with a
    primary key (``primary_key=composite``: ``(id, <partition column>)``) or an identity set already is left
    alone."""
    oid = catalog.table_oid(conn, parent)
    if oid is None:
        return False
    row = conn.execute(
        """SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
           FROM pg_class c WHERE c.oid = %s""", (oid,)).fetchone()
    return row is not None and row[0] == "d" and not row[1]


def is_swapped(conn: psycopg.Connection[Any], spec: ConvertSpec) -> bool:
    job = recorded_job(conn, spec.table)
    if job is None or job.status != SWAPPED:
        return False
    info = catalog.describe(conn, spec.table) if catalog.exists(conn, spec.table) else None
    return info is not None and info.is_partitioned and catalog.exists(conn, spec.retired)


def _notify(ex: Executor, spec: ConvertSpec) -> None:
    ex.run(sql.SQL("SELECT pg_notify('pg_partition', {})").format(sql.Literal(str(spec.table))))


@locks_table()  # the per-table lock, also for a direct caller of the engine
def swap(
    ex: Executor,
    spec: ConvertSpec,
    *,
    lock_timeout: str = "2s",
    retries: int = 5,
    sync: bool = True,
    require_complete_fill: bool = True,
    wait_timeout: float = 3600.0,
    drain_below: int = 50,
    drain_rounds: int = 20,
) -> dict[str, Any]:
    """Make the partitioned table live in one short transaction under ``lock_timeout`` with retries.

    Under ACCESS EXCLUSIVE on both tables: finish change capture if it is installed, copy the rows committed
    since the last catch-up (``sync``; an anti-join above the safe high-water mark, so only seconds' worth of
    rows), rename ``<table>`` to ``<table>_retired`` and the intermediate to ``<table>``, restore index names,
    move sequence ownership or restart identity, carry publication membership (publish_via_partition_root),
    re-grant, ``NOTIFY pg_partition, '<table>'`` and record the swap. Logs how long the lock was held.

    With capture, each attempt first replays the backlog down to fewer than ``drain_below`` entries (at most
    ``drain_rounds`` batches; not paced: a pause there only grows what the lock must apply) right before asking
    for the lock, so the locked apply is a few entries whatever happened since the replay task (issue 18: lock
    held <= 100 ms under write load). Every catalog read happens before the lock; ``lock_ms`` is the ACCESS
    EXCLUSIVE hold, from the grant to the end of the COMMIT.
    """
    conn = ex.conn
    if not ex.dry_run and is_swapped(conn, spec):
        replay.drop_changelog(ex, spec.table, lock_timeout=lock_timeout, retries=retries)  # a kill after the commit
        ex.logger.info("%s is already swapped in; nothing to do", spec.table)
        return {"already_swapped": True, **(checkpoint(conn, spec, "swap") or {})}
    if not catalog.exists(conn, spec.intermediate) and not ex.dry_run:
        raise StateError(f"{spec.intermediate} does not exist", fix="run prep, add_partitions and fill first")
    src = catalog.describe(conn, spec.table)
    if src.is_partitioned:
        raise PreflightError(f"{spec.table} is already partitioned", fix="nothing to swap")
    captured_triggers = _capture_triggers(conn, spec.table)
    if captured_triggers:
        sync = False  # capture has every insert too: the locked apply replaces the locked anti-join
    rec = checkpoint(conn, spec, "prep")
    indexes = rec["indexes"] if rec else index_plan(conn, spec, src)
    plan = checkpoint(conn, spec, "plan")
    if not ex.dry_run:
        status = fill_status(conn, spec)
        if require_complete_fill and (not status["planned"] or status["pending"]):
            raise StateError(
                f"the fill of {spec.intermediate} is not complete (pending: {status['pending'] or 'no plan'})",
                fix="run plan_fill and fill for every item (or pass require_complete_fill=false to swap anyway)")
        known = {m["source"] for m in indexes}
        extra = [i.name for i in src.indexes if i.name not in known]
        if extra:
            raise StateError(f"{spec.table} has indexes created after prep: {', '.join(extra)}",
                             fix="run prep again (it adds missing indexes to the intermediate), then swap")
        inter_idx = {i.name: i for i in catalog.describe(conn, spec.intermediate).indexes}
        missing = [m["temp"] for m in indexes if m["on_parent"] and not (
            m["temp"] in inter_idx and inter_idx[m["temp"]].is_valid)]
        if missing:
            raise StateError(f"indexes of {spec.intermediate} are missing or not yet valid: {', '.join(missing)}",
                             fix="run the indexes step (build_indexes) first")
    if plan and not ex.dry_run:
        # no row left behind: a row no partition takes would stay only in the retired table (and be archived
        # with it); refuse before any lock, in every mode (a DEFAULT partition takes such rows)
        outside = rows_outside(conn, plan, spec.table, spec.intermediate, logger=ex.logger)
        if outside[0]:
            raise outside_error(*outside, spec.table, spec.intermediate, plan["column"])
        if sync and not _capture_triggers(conn, spec.table):
            refusal = capture.composite_key_refusal(conn, spec.table)
            if refusal is not None:
                raise refusal
    explicit, every = _publications(conn, spec.table)
    identity_full = bool(every) and new_identity_needed(conn, spec.intermediate)
    low = safe_low(conn, spec, plan) if plan else 0
    # every catalog read happens here, before the lock: the locked transaction only acts
    new_info = None if ex.dry_run else catalog.describe(conn, spec.intermediate)
    extras = parity.read(conn, src.oid)  # RLS, policies, user triggers, dependent views of the source
    # what the locked transaction will run, computed now: privileges as a diff, and whether the RLS flags,
    # policies and triggers need statements at all (the intermediate has none of them unless the source does)
    grants = None if new_info is None else parity.privilege_statements(conn, src.oid, new_info.oid, spec.table)
    extras_needed = new_info is None or _extras_differ(extras, parity.read(conn, new_info.oid))
    prepared = prepare_locked_copy(conn, plan, spec.table, spec.intermediate) \
        if sync and plan and not ex.dry_run else None
    finish = replay.prepare_finish(conn, spec.table, spec.intermediate) \
        if captured_triggers and not ex.dry_run else None
    last_pass: dict[str, Any] | None = None
    if prepared is not None:
        # one more catch-up just before locking: the locked anti-join then only sees the last milliseconds' rows
        last_pass = copy_missing(ex, plan, spec.table, spec.intermediate, low=low, live=True,
                                 wait_timeout=wait_timeout)
        low = max(low, int(last_pass["high_water"]))
    lock_started: list[float] = []
    outcome: dict[str, Any] = {}

    def body() -> None:
        lock_started.clear()
        ex.run(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(
            spec.table.ident, spec.intermediate.ident))
        lock_started.append(time.monotonic())
        triggers = captured_triggers
        if triggers:
            outcome["locked_keys"] = replay.finish_in_swap(ex, source=spec.table, dest=spec.intermediate,
                                                           prepared=finish, drop_changelog=False, dest_locked=True)
        synced = copy_missing_locked(ex, prepared, low=low) if prepared is not None else {
            "rows": 0, "outside_rows": 0, "high_water": low}
        if synced["outside_rows"]:  # written in the last moments before the lock: refuse, the lock rolls back
            raise outside_error(int(synced["outside_rows"]), None, None, 0, spec.table, spec.intermediate,
                                plan["column"] if plan else "the partition column")
        renames: list[sql.Composable] = [
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.table.ident, sql.Identifier(spec.retired.name)),
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.intermediate.ident, sql.Identifier(spec.table.name))]
        for m in indexes:
            if not m["on_parent"]:
                continue
            renames.append(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["source"]).ident, sql.Identifier(m["retired"])))
            renames.append(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["temp"]).ident, sql.Identifier(m["source"])))
        replay.run_together(ex, renames)  # one round trip under the lock
        seqs = _move_sequences(ex, src, new_info, spec.table, top=int(synced["high_water"])) \
            if new_info is not None else []
        _move_publications(ex, explicit, every, spec.retired, spec.table, via_root=True)
        if identity_full:  # see new_identity_needed: subscribers need a key for UPDATE/DELETE on the root
            ex.run(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(spec.table.ident))
        if new_info is None:
            copy_grants(ex, src.grants, spec.table)
        else:  # schema parity (issue 15): privileges as a diff, RLS, policies, triggers, views re-pointed
            if grants is not None:
                parity.run_privileges(ex, grants)
        if extras_needed:
            parity.apply_extras(ex, extras, spec.table, new_info.oid if new_info else None)
        parity.repoint_views(ex, extras.views)
        _notify(ex, spec)
        put(ex, spec, "swap", {"high_water": synced["high_water"], "synced_rows": synced["rows"],
                               "outside_rows": synced["outside_rows"]})
        set_status(ex, spec, SWAPPED)
        outcome.update(synced=synced, sequences=seqs, capture_triggers=triggers,
                       lock_body_ms=round((time.monotonic() - lock_started[0]) * 1000, 1))

    started = time.monotonic()
    drains: list[dict[str, Any]] = []
    lock_ended = _locked_attempts(ex, body, lock_timeout=lock_timeout, retries=retries, what=f"swap {spec.table}",
                                  before=(lambda: _drain(ex, spec, drains, drain_below, drain_rounds))
                                  if finish is not None else None)
    lock_ms = round((lock_ended - lock_started[0]) * 1000, 1) if lock_started else 0.0
    ex.logger.info("swap of %s: ACCESS EXCLUSIVE lock held for %.1f ms, commit included (%d rows synced, %s "
                   "captured keys applied under the lock)", spec.table, lock_ms,
                   outcome.get("synced", {}).get("rows", 0), outcome.get("locked_keys", 0))
    result = {"lock_ms": lock_ms, "seconds": round(time.monotonic() - started, 3),
              "drain_before_lock": drains[-1] if drains else None,
              "publications": [p["name"] for p in explicit], "last_pass_rows": last_pass["rows"] if last_pass else 0,
              **outcome}
    if finish is not None:  # out of the lock: the changelog is empty and nothing writes it any more
        replay.drop_changelog(ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    if not ex.dry_run:
        with conn.transaction():
            put(ex, spec, "swap", {**result, "high_water": outcome["synced"]["high_water"]})
            put(ex, spec, "timing", {"seconds": result["seconds"], "lock_ms": lock_ms}, "swap")
    return result


def _extras_differ(want: parity.Extras, have: parity.Extras) -> bool:
    """Whether :func:`parity.apply_extras` has anything to change on the new table (RLS flags, policies, user
    triggers, REPLICA IDENTITY USING INDEX); when not, the swap skips its ALTER TABLE statements under the lock."""
    return (want.rls, want.force_rls, want.policies, want.triggers, want.identity_index) != (
        have.rls, have.force_rls, have.policies, have.triggers, have.identity_index)


def _drain(ex: Executor, spec: ConvertSpec, drains: list[dict[str, Any]], below: int, rounds: int) -> None:
    stats = replay.drain_before_lock(ex, spec.table, spec.intermediate, below=below, max_rounds=rounds)
    if stats is not None:
        drains.append({"entries": stats.entries, "batches": stats.batches, "backlog_left": stats.backlog})


def _locked_attempts(ex: Executor, body: Callable[[], None], *, lock_timeout: str, retries: int, what: str,
                     before: Callable[[], None] | None) -> float:
    """``ex.with_lock_timeout(body)``, with ``before`` run outside the transaction ahead of every attempt (the
    pre-lock drain: a lock wait of ``lock_timeout`` lets the backlog grow again, so each retry drains first).
    Returns the monotonic time the transaction (and so the lock) ended."""
    if before is None or ex.dry_run:
        ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=what)
        return time.monotonic()
    for attempt in range(1, retries + 1):
        before()
        try:
            ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=1, what=what)
            return time.monotonic()
        except LockTimeoutExhausted as exc:
            if attempt == retries:
                raise LockTimeoutExhausted(
                    f"{what} could not get its lock within lock_timeout={lock_timeout} after {retries} attempts",
                    fix=exc.fix) from exc
            ex.logger.warning("%s: lock not granted within lock_timeout=%s (attempt %d of %d); draining the "
                              "backlog again and retrying", what, lock_timeout, attempt, retries)
            time.sleep(min(0.2 * 2 ** (attempt - 1), 10.0))
    raise AssertionError("unreachable")  # pragma: no cover


def _columns_back(ex: Executor, spec: ConvertSpec, plan: dict[str, Any], low: int) -> dict[str, list[str]]:
    """Which columns the unswap's copy-back carries, after an application migration changed the new table.

    Only the columns both tables have are copied back (a column added to the new table after the swap does not
    exist in the retired one; a column dropped from it leaves the retired table's column NULL or at its default
    for those rows). Refused, before anything changes, when a dropped column is NOT NULL without a default in the
    retired table and rows are waiting to be copied back: they could not be inserted there."""
    conn = ex.conn
    new_info = catalog.describe(conn, spec.table)
    old_info = catalog.describe(conn, spec.retired)
    carried = set(common_columns(conn, new_info, spec.retired))
    extra = [c.name for c in new_info.columns if not c.generated and c.name not in carried]
    missing = [c for c in old_info.columns if not c.generated and c.name not in carried]
    out = {"columns_not_copied_back": extra, "columns_left_null": [c.name for c in missing]}
    blocking = [c.name for c in missing if c.not_null and c.default is None and not c.identity]
    if blocking:
        waiting = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} > {}").format(
            spec.table.ident, sql.Identifier(plan["key"]), sql.Literal(low))).fetchone()
        if waiting and waiting[0]:
            raise StateError(
                f"{waiting[0]} rows written to {spec.table} since the swap cannot be copied back: "
                f"{spec.retired} requires {', '.join(blocking)} (NOT NULL, no default), which {spec.table} no "
                "longer has", where=str(spec.retired),
                fix=f"give {spec.retired} a default for {', '.join(blocking)} (ALTER TABLE ... ALTER COLUMN ... "
                "SET DEFAULT ...) or drop NOT NULL there, then unswap again; nothing was changed")
    if extra or missing:
        ex.logger.warning(
            "unswap of %s after a schema change: copying back only the columns both tables have; not copied back "
            "(absent from %s): %s; left NULL or default for the rows copied back (absent from %s): %s",
            spec.table, spec.retired, ", ".join(extra) or "none", spec.table,
            ", ".join(c.name for c in missing) or "none")
    return out


@locks_table()  # the per-table lock, also for a direct caller of the engine
def unswap(ex: Executor, spec: ConvertSpec, *, lock_timeout: str = "2s", retries: int = 5,
           wait_timeout: float = 3600.0) -> dict[str, Any]:
    """Roll a swap back: the original table becomes live again, the partitioned one the intermediate.

    Rows inserted into the partitioned table after the swap are copied back first (outside the lock, then the
    last few under it), so nothing the application wrote is lost; updates or deletes made after the swap to rows
    that existed before it are not carried back (append-only mode).

    Change capture: the swap removed it, so nothing keeps the intermediate in step with the table any more. Any
    capture leftover is removed, and when the conversion ran with capture its fill checkpoints are forgotten, so
    a later swap is refused until a new run installs capture again and fills again (otherwise updates made after
    the unswap would be silently lost).
    """
    conn = ex.conn
    if not is_swapped(conn, spec):
        if catalog.exists(conn, spec.intermediate) and not catalog.describe(conn, spec.table).is_partitioned:
            ex.logger.info("%s is not swapped; nothing to unswap", spec.table)
            return {"already_unswapped": True}
        if not ex.dry_run:
            raise StateError(f"{spec.table} is not a swapped-in conversion", fix="nothing to roll back")
    rec = prep_record(conn, spec)
    plan = recorded_plan(conn, spec)
    back = dict(plan, has_default=True, where=None)  # every row written after the swap goes back
    swap_cp = checkpoint(conn, spec, "swap") or {}
    low = int(swap_cp.get("high_water", plan["high_water"]))
    columns = _columns_back(ex, spec, plan, low)
    old_info = catalog.describe(conn, spec.retired)
    # rows copied back were written (and seen by the user triggers) on the partitioned table: the original's
    # triggers must not fire for them a second time (an audit row twice); re-enabled under the lock below
    paused = _pause_user_triggers(ex, spec, old_info.oid, lock_timeout=lock_timeout, retries=retries)
    pre = copy_missing(ex, back, spec.table, spec.retired, low=low, live=True, wait_timeout=wait_timeout)
    new_info = catalog.describe(conn, spec.table)
    views = parity.dependent_views(conn, new_info.oid)
    explicit, _ = _publications(conn, spec.table)
    prepared = prepare_locked_copy(conn, back, spec.table, spec.retired)
    captured = capture_on(conn, spec.table)
    lock_started: list[float] = []
    outcome: dict[str, Any] = {}

    def body() -> None:
        lock_started.clear()
        ex.run(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(spec.table.ident, spec.retired.ident))
        lock_started.append(time.monotonic())
        synced = copy_missing_locked(ex, prepared, low=int(pre["high_water"]))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.table.ident,
                                                            sql.Identifier(spec.intermediate.name)))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.retired.ident, sql.Identifier(spec.table.name)))
        for m in rec["indexes"]:
            if not m["on_parent"]:
                continue
            ex.run(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["source"]).ident, sql.Identifier(m["temp"])))
            ex.run(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["retired"]).ident, sql.Identifier(m["source"])))
        top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
            sql.Identifier(plan["key"]), spec.table.ident)).fetchone()
        seqs = _move_sequences(ex, new_info, old_info, spec.table,
                               top=max(int(synced["high_water"]), int(top[0]) if top and top[0] else 0))
        _move_publications(ex, explicit, [], spec.intermediate, spec.table, via_root=False)
        parity.sync_privileges(ex, new_info.oid, old_info.oid, spec.table)
        parity.repoint_views(ex, views)
        # the intermediate is not live any more: no RLS, policies or user triggers acting on a later refill
        parity.apply_extras(ex, parity.Extras(), spec.intermediate, new_info.oid)
        _resume_user_triggers(ex, spec, paused)
        _notify(ex, spec)
        if not ex.dry_run:
            forget(conn, spec, ("swap", CAPTURE_STEP, "unswap_triggers",
                                *(("plan", "fill", "catch_up") if captured else ())))
        set_status(ex, spec, PREPPED)
        outcome.update(synced_rows=synced["rows"], sequences=seqs, **columns)

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"unswap {spec.table}")
    lock_ms = round((time.monotonic() - lock_started[0]) * 1000, 1) if lock_started else 0.0
    ex.logger.info("unswap of %s: ACCESS EXCLUSIVE lock held for %.1f ms", spec.table, lock_ms)
    removed = capture.uninstall(ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    if captured:
        ex.logger.warning("the conversion of %s ran with change capture: its fill is forgotten; run the DAG again "
                          "(it installs capture and fills again) before swapping again", spec.table)
    return {"lock_ms": lock_ms, "copied_back_rows": pre["rows"] + outcome.get("synced_rows", 0),
            "capture_removed": removed, "refill_needed": captured, **outcome}


def _pause_user_triggers(ex: Executor, spec: ConvertSpec, oid: int, *, lock_timeout: str,
                         retries: int) -> list[dict[str, Any]]:
    """Disable the original table's user triggers for the copy-back; their states are recorded first (once, so
    a retried unswap restores the states from before the first attempt, not the disabled ones)."""
    recorded = checkpoint(ex.conn, spec, "unswap_triggers")
    if recorded is not None:
        return list(recorded["triggers"])
    triggers = [{"name": t["name"], "enabled": t["enabled"]} for t in parity.read(ex.conn, oid).triggers]
    if ex.dry_run or not triggers:
        return triggers

    def body() -> None:
        put(ex, spec, "unswap_triggers", {"triggers": triggers})
        for t in triggers:
            ex.run(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(spec.retired.ident, sql.Identifier(t["name"])))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"pause triggers of {spec.retired}")
    return triggers


def _resume_user_triggers(ex: Executor, spec: ConvertSpec, triggers: list[dict[str, Any]]) -> None:
    """Restore each paused trigger's recorded state (the table is already renamed back)."""
    for t in triggers:
        state_sql = parity.TRIGGER_STATES.get(t["enabled"], "ENABLE TRIGGER")
        ex.run(sql.SQL("ALTER TABLE {} {} {}").format(spec.table.ident, sql.SQL(state_sql), sql.Identifier(t["name"])))


@locks_table()  # the per-table lock, also for a direct caller of the engine
def unprep(ex: Executor, spec: ConvertSpec, *, lock_timeout: str = "2s", retries: int = 5) -> dict[str, Any]:
    """Remove change capture (triggers, function, changelog), drop the intermediate table (with its partitions)
    and forget the conversion. Refused while swapped."""
    conn = ex.conn
    if is_swapped(conn, spec):
        raise StateError(f"{spec.table} is the swapped-in partitioned table; unprep would drop live data",
                         fix="run unswap first")
    if not ex.dry_run and not _being_converted(conn, spec):
        what = "does not exist" if not catalog.exists(conn, spec.table) else "exists"
        raise StateError(
            f"{spec.table} is not being converted: it {what}, and there is no recorded conversion, no "
            f"{spec.intermediate} and no change capture to remove", where=str(spec.table),
            fix="check the schema and table name (unprep undoes prep for the table given to the convert DAG); "
            "if the conversion was already undone, there is nothing left to do")
    # the capture triggers first: they cost the application on every write and feed only the intermediate
    capture_removed = catalog.exists(conn, spec.table) and capture.uninstall(
        ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    dropped = False
    if catalog.exists(conn, spec.intermediate):
        inter = catalog.describe(conn, spec.intermediate)
        if not inter.is_partitioned:
            raise StateError(f"{spec.intermediate} is not partitioned, so it is not this conversion's",
                             fix="inspect and drop it by hand")

        def body() -> None:
            ex.run(sql.SQL("DROP TABLE {}").format(spec.intermediate.ident))

        ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"unprep {spec.intermediate}")
        dropped = True
    if not ex.dry_run and state.ready(conn):
        forget(conn, spec)
    return {"dropped": dropped, "intermediate": str(spec.intermediate), "capture_removed": capture_removed}


def _being_converted(conn: psycopg.Connection[Any], spec: ConvertSpec) -> bool:
    """Anything of a conversion of ``spec.table`` that unprep could undo."""
    if catalog.exists(conn, spec.intermediate) or (state.ready(conn) and recorded_job(conn, spec.table)):
        return True
    return catalog.exists(conn, capture.changelog_name(spec.table)) or (
        catalog.exists(conn, spec.table) and bool(capture.trigger_names(conn, spec.table)))


@locks_table()  # the per-table lock, also for a direct caller of the engine
def finish_and_swap(ex: Executor, spec: ConvertSpec, *, batch_size: int = 10_000,
                    replay_until_backlog_below: int = 1000, catch_up_first: bool = True, lock_timeout: str = "2s",
                    retries: int = 5, throttle: Callable[[], None] | None = None) -> dict[str, Any]:
    """Bring the copy as close to the source as possible outside any lock, then :func:`swap`.

    With change capture: replay until fewer than ``replay_until_backlog_below`` changes wait (so the swap's
    locked apply is small); the swap applies the rest and removes capture under its lock; no catch-up (capture
    has every insert too). Without capture (append-only): catch-up outside any lock, then the swap's last
    anti-join under the lock. Already swapped: the swap is a no-op that reports so.
    """
    swapped = is_swapped(ex.conn, spec)
    captured = not swapped and capture.is_installed(ex.conn, spec.table)
    caught: dict[str, Any] | None = None
    replayed: dict[str, Any] | None = None
    if captured and not ex.dry_run:
        replayed = replay.replay(ex, spec.table, spec.intermediate, batch_size=batch_size,
                                 until_backlog_below=replay_until_backlog_below, throttle=throttle).as_dict()
    elif catch_up_first and not swapped and not captured:
        caught = catch_up(ex, spec, batch_size=batch_size, throttle=throttle)
    result = swap(ex, spec, sync=not captured, lock_timeout=lock_timeout, retries=retries)
    return {**result, "catch_up_before": caught, "replay_before": replayed}
