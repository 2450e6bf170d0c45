"""Replay of captured changes into the new table, and the last backlog applied under the swap lock."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.capture import (
    RETRYABLE,
    CapturePlan,
    backlog,
    capture_plan,
    changelog_name,
    column_list,
    function_name,
    is_installed,
    trigger_names,
)
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, PartitionError, StateError
from pg_partition.core.db.execute import Executor, Progress, log
from pg_partition.core.db.locks import locks_table


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

    def __init__(self, plan: CapturePlan, ex: Executor) -> None:
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
                sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in p.key_types), column_list(p.key))
            self.delete = sql.SQL("DELETE FROM {d} AS d USING {u} WHERE {cond}").format(
                d=p.dest.ident, u=unnest,
                cond=sql.SQL(" AND ").join(sql.SQL("d.{c} = k.{c}").format(c=sql.Identifier(c)) for c in p.key))
            where = sql.SQL("({}) IN (SELECT * FROM {})").format(column_list(p.key), unnest)
        self.insert = sql.SQL("INSERT INTO {d} ({cols}) {ovr}SELECT {cols} FROM {s} WHERE {where}").format(
            d=p.dest.ident, s=p.source.ident, cols=column_list(p.columns), where=where,
            ovr=sql.SQL("OVERRIDING SYSTEM VALUE " if p.overriding else ""))
        self.take = sql.SQL(
            "DELETE FROM {cl} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {cl} LIMIT %s)) RETURNING {cols}"
        ).format(cl=p.changelog.ident, cols=column_list(p.key))
        # the distinct keys of the whole backlog, each row also carrying how many entries were taken
        self.take_all = sql.SQL("WITH taken AS (DELETE FROM {cl} RETURNING {cols}) SELECT {cols}, "
                                "sum(count(*)) OVER () FROM taken GROUP BY {cols}"
                                ).format(cl=p.changelog.ident, cols=column_list(p.key))

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


def run_together(ex: Executor, stmts: Sequence[sql.Composable]) -> None:
    """Run parameterless DDL ``stmts`` in one round trip (simple query protocol), logged and recorded one per
    line exactly as :meth:`Executor.run` does. Why: under the swap's ACCESS EXCLUSIVE lock every round trip is
    time the application waits, and on a busy server each one costs a scheduler slice on both sides."""
    if ex.dry_run or len(stmts) < 2:
        for stmt in stmts:
            ex.run(stmt)  # type: ignore[arg-type]
        return
    sql_log = logging.getLogger(f"{ex.logger.name}.sql")
    for stmt in stmts:
        text = stmt.as_string(ex.conn)
        ex.statements.append(text)
        sql_log.info("SQL: %s", text)
    ex.conn.execute(sql.SQL("; ").join(stmts))  # type: ignore[arg-type]


def _distinct(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return list(dict.fromkeys(tuple(r) for r in rows))


@locks_table(item_of=lambda *a, **k: "replay")  # shared with the fill items, one replay at a time
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
    plan = capture_plan(conn, source, dest)
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
        except RETRYABLE as exc:
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


@dataclass(frozen=True)
class FinishPlan:
    """What :func:`finish_in_swap` needs, read from the catalog *before* the swap takes its exclusive lock, so the
    locked transaction only acts (every catalog read under the lock is time the application waits)."""

    plan: CapturePlan | None  # None: no changelog, nothing to apply
    triggers: tuple[str, ...]


def prepare_finish(conn: psycopg.Connection[Any], source: QualifiedName, dest: QualifiedName) -> FinishPlan:
    """Read the capture plan and trigger names for the swap's locked apply (outside the lock)."""
    triggers = tuple(trigger_names(conn, source))
    if not catalog.exists(conn, changelog_name(source)):
        if triggers:
            raise StateError(f"{source} has capture triggers {list(triggers)} but no changelog "
                             f"{changelog_name(source)}", where=str(source),
                             fix="remove capture (capture.uninstall) and re-run the conversion from the fill")
        return FinishPlan(None, triggers)
    return FinishPlan(capture_plan(conn, source, dest), triggers)


def drain_before_lock(
    ex: Executor,
    source: QualifiedName,
    dest: QualifiedName,
    *,
    below: int = 50,
    max_rounds: int = 20,
    batch_size: int = 5000,
    throttle: Callable[[], None] | None = None,
) -> ReplayStats | None:
    """Replay right before the swap takes its lock, until fewer than ``below`` entries wait or after
    ``max_rounds`` batches (bounded: under a writer faster than replay it gives up and the locked apply takes
    the rest, as before).

    Why: everything left in the changelog is applied while the application waits on the swap's ACCESS
    EXCLUSIVE lock; the replay task ran minutes earlier (indexes, ANALYZE and verify ran since), so without this
    the locked apply grows with the write rate times those minutes. Returns None when capture is not installed
    or in a dry run.
    """
    if ex.dry_run or not is_installed(ex.conn, source):
        return None
    stats = replay(ex, source, dest, batch_size=batch_size, until_backlog_below=max(below, 1), throttle=throttle,
                   max_batches=max_rounds)
    ex.logger.info("swap: pre-lock replay of %s left %d entries (threshold %d, %d batches)", source,
                   stats.backlog, below, stats.batches)
    return stats


def finish_in_swap(ex: Executor, source: QualifiedName, dest: QualifiedName, *, chunk: int = 10000,
                   prepared: FinishPlan | None = None, drop_changelog: bool = True, dest_locked: bool = False) -> int:
    """Apply the whole remaining backlog to ``dest`` and remove capture, inside the swap's transaction.

    Call it after the swap holds ACCESS EXCLUSIVE on ``source`` and before renaming anything: no write can be in
    flight, so the changelog is complete and the destination becomes an exact copy. Everything here (apply, drop
    triggers/function/changelog) commits or rolls back with the swap: if the swap's transaction fails (lock
    timeout, error) the backlog and the triggers are intact and the next attempt starts over.
    ``prepared`` (:func:`prepare_finish`, read before the lock) spares the catalog reads under the lock.
    ``drop_changelog=False`` leaves the (now empty, no longer written) changelog for :func:`drop_changelog`
    after the swap commits: its DROP is catalog and file work the application need not wait for.
    ``dest_locked``: the caller already holds ACCESS EXCLUSIVE on ``dest`` (the swap), so no LOCK is sent.
    Returns the number of distinct keys applied; logs the backlog size and how long it took.
    """
    conn = ex.conn
    cl = changelog_name(source)
    if prepared is None:
        prepared = prepare_finish(conn, source, dest)
    if prepared.plan is None:
        ex.logger.info("no change capture on %s; nothing to apply", source)
        return 0
    started = time.monotonic()
    applier = _Applier(prepared.plan, ex)
    applied = 0
    if ex.dry_run:
        for stmt in (applier.take_all, applier.delete, applier.insert):
            ex.run(stmt)
        waiting = applied = backlog(conn, source)
    else:
        if not dest_locked:
            ex.run(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(dest.ident))
        # one statement takes (and counts) the whole backlog: no separate count(*) under the lock
        taken = [tuple(r) for r in applier.execute(applier.take_all, ()).fetchall()]
        waiting = int(taken[0][-1]) if taken else 0
        keys = [k[:-1] for k in taken]
        for i in range(0, len(keys), chunk):
            applier.apply(keys[i:i + chunk])
        applied = len(keys)
    run_together(ex, [*(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), source.ident)
                        for name in prepared.triggers),
                      sql.SQL("DROP FUNCTION IF EXISTS {}()").format(function_name(source).ident)])
    if drop_changelog:
        ex.run(sql.SQL("DROP TABLE IF EXISTS {}").format(cl.ident))
    ex.logger.info("swap: change-capture backlog of %s applied under the lock: %d entries, %d distinct keys in "
                   "%.3fs; capture removed", source, waiting, applied, time.monotonic() - started)
    return applied


def drop_changelog(ex: Executor, source: QualifiedName, *, lock_timeout: str = "2s", retries: int = 5) -> None:
    """Drop the changelog of ``source`` once no capture trigger feeds it (after the swap committed; safe to run
    again: a swap retried after a kill finds it and drops it)."""
    cl = changelog_name(source)
    if ex.dry_run or not catalog.exists(ex.conn, cl) or (catalog.exists(ex.conn, source)
                                                          and trigger_names(ex.conn, source)):
        return

    def body() -> None:
        ex.run(sql.SQL("DROP TABLE IF EXISTS {}").format(cl.ident))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"drop {cl}")
