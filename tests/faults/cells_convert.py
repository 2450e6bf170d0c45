"""Conversion steps under faults: fill, replay, index build, swap, catch-up.

Every scenario is ``public.activities`` (10k rows over six months, the four public_activity indexes) taken to the
point just before the faulted step; ``finish`` runs the rest of the conversion exactly as the DAG would (each
step is idempotent, so steps already done are no-ops), and ``check`` proves the converted table equals the
source row for row and nothing of the conversion is left behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pg_partition.core import convert
from pg_partition.core.convert import capture, replay
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog, state
from pg_partition.core.db.execute import Executor
from tests.faults.common import Scenario, connect, key_counts, leftovers, logical_hash
from tests.faults.driver import Env
from tools.seed import seed_activities

TABLE = "public.activities"
ROWS = 10_000
BATCH = 400


def spec(ctx: dict[str, Any]) -> ConvertSpec:
    return ConvertSpec.create(TABLE, "created_at", period="month", defer_indexes=bool(ctx.get("defer")))


# ------------------------------------------------------------------------------------------------ the steps


def step_fill(ctx: dict[str, Any]) -> Any:
    with connect(ctx) as conn:
        return convert.fill(Executor(conn), spec(ctx))["rows"]


def step_indexes(ctx: dict[str, Any]) -> Any:
    with connect(ctx) as conn:
        return convert.build_indexes(Executor(conn), spec(ctx))


def step_replay(ctx: dict[str, Any]) -> Any:
    s = spec(ctx)
    with connect(ctx) as conn:
        return replay.replay(Executor(conn), s.table, s.intermediate, batch_size=150,
                              until_backlog_below=1).as_dict()


def step_swap(ctx: dict[str, Any]) -> Any:
    with connect(ctx) as conn:
        out = convert.swap(Executor(conn), spec(ctx), lock_timeout=ctx.get("lock_timeout", "2s"),
                           retries=int(ctx.get("retries", 5)))
        return {k: out.get(k) for k in ("lock_ms", "already_swapped")}


def step_catch_up(ctx: dict[str, Any]) -> Any:
    with connect(ctx) as conn:
        return convert.catch_up(Executor(conn), spec(ctx), batch_size=100)["rows"]


def finish(ctx: dict[str, Any]) -> None:
    """The rest of the DAG after the faulted step (every step is a no-op when already done)."""
    s = spec(ctx)
    with connect(ctx) as conn:
        ex = Executor(conn)
        if not convert.is_swapped(conn, s):
            convert.fill(ex, s)
            convert.build_indexes(ex, s)
            convert.analyze(ex, s)
            if capture.is_installed(conn, s.table):
                replay.replay(ex, s.table, s.intermediate, until_backlog_below=1)
            convert.catch_up(ex, s)
            convert.swap(ex, s)
        convert.catch_up(ex, s)


# ------------------------------------------------------------------------------------------------ scenarios


def _base(env: Env, *, defer: bool = False, capture_on: bool = False) -> tuple[dict[str, Any], Executor, Any]:
    ctx = env.ctx(defer=defer)
    conn = env.connect()
    s = spec(ctx)
    seed_activities(conn, s.table, rows=ROWS, months=6, timestamptz=True)
    ex = Executor(conn)
    convert.prep(ex, s)
    convert.add_partitions(ex, s, cover_data=True, future=1)
    if capture_on:
        capture.install(ex, s.table, s.intermediate)
    convert.plan_fill(ex, s, batch_size=BATCH)
    return ctx, ex, conn


def _scenario(env: Env, step: str, ctx: dict[str, Any], conn: Any, **kw: Any) -> Scenario:
    s = spec(ctx)
    source = catalog.describe(conn, s.retired if convert.is_swapped(conn, s) else s.table)
    # per-partition primary key (pgslice's layout): the key lives on each partition, every other index on the parent
    expected = {"hash": logical_hash(conn, [source.name]), "per_partition": len(source.indexes),
                "indexes": sorted(i.name for i in catalog.describe(conn, s.table).indexes if not i.is_primary)}
    conn.close()
    return Scenario(env, step, ctx, finish, check, expected=expected, **kw)


def scenario_fill(env: Env) -> Scenario:
    ctx, _, conn = _base(env)
    return _scenario(env, "cells_convert:step_fill", ctx, conn, after_fault=fill_checkpoints_agree)


def scenario_indexes(env: Env) -> Scenario:
    ctx, ex, conn = _base(env, defer=True)
    convert.fill(ex, spec(ctx))
    return _scenario(env, "cells_convert:step_indexes", ctx, conn)


def scenario_replay(env: Env) -> Scenario:
    ctx, ex, conn = _base(env, capture_on=True)
    convert.fill(ex, spec(ctx))
    # changes after the copy: updates, deletes, key changes and inserts, all in the changelog now
    conn.execute("UPDATE public.activities SET key = 'changed', parameters = md5(id::text) WHERE id % 7 = 0")
    conn.execute("DELETE FROM public.activities WHERE id % 31 = 0")
    conn.execute("UPDATE public.activities SET id = id + 1000000 WHERE id % 97 = 1")
    conn.execute("INSERT INTO public.activities (created_at, updated_at, key) "
                 "SELECT now() - g * interval '1 hour', now(), 'new' FROM generate_series(1, 300) g")
    return _scenario(env, "cells_convert:step_replay", ctx, conn)


def _ready_to_swap(env: Env) -> tuple[dict[str, Any], Executor, Any]:
    ctx, ex, conn = _base(env)
    s = spec(ctx)
    convert.fill(ex, s)
    convert.build_indexes(ex, s)
    convert.analyze(ex, s)
    convert.catch_up(ex, s)
    return ctx, ex, conn


def scenario_swap(env: Env, **params: Any) -> Scenario:
    ctx, _, conn = _ready_to_swap(env)
    ctx.update(params)
    conn.execute("INSERT INTO public.activities (created_at, updated_at, key) "
                 "SELECT now() - g * interval '1 minute', now(), 'late' FROM generate_series(1, 200) g")
    return _scenario(env, "cells_convert:step_swap", ctx, conn)


def scenario_catch_up(env: Env) -> Scenario:
    ctx, ex, conn = _ready_to_swap(env)
    conn.execute("INSERT INTO public.activities (created_at, updated_at, key) "
                 "SELECT now() - g * interval '1 minute', now(), 'late' FROM generate_series(1, 1500) g")
    convert.swap(ex, spec(ctx), sync=False)  # pgslice-style: the new table lacks those rows until catch-up
    return _scenario(env, "cells_convert:step_catch_up", ctx, conn)


# ------------------------------------------------------------------------------------------------ invariants


def fill_checkpoints_agree(sc: Scenario) -> None:
    """Right after the fault: the fill checkpoints committed with their batches, so they agree with the data."""
    s = spec(sc.ctx)
    with sc.conn() as conn:
        copied = sum(int(v.get("rows", 0)) for v in state.checkpoints(conn, s.job_id, "fill").values())
        rows = conn.execute("SELECT count(*) FROM public.activities_intermediate").fetchone()[0]
        assert copied == rows, f"fill checkpoints say {copied} rows copied, the intermediate holds {rows}"


def check(sc: Scenario, app_ids: Sequence[int] = ()) -> None:
    """The conversion completed: the live table is the partitioned one and equals the source row for row; the
    retired table is intact; no capture objects, intermediate, invalid index; state agrees with the catalog."""
    s = spec(sc.ctx)
    with sc.conn() as conn:
        info = catalog.describe(conn, s.table)
        assert info.is_partitioned, f"{s.table} is not the partitioned table after the flow"
        assert catalog.exists(conn, s.retired) and not catalog.exists(conn, s.intermediate)
        assert convert.is_swapped(conn, s), "the state schema does not record the swap the catalog shows"
        job = conn.execute("SELECT status FROM pgpartition.jobs WHERE job_id = %s", (s.job_id,)).fetchone()
        assert job == ("swapped",), job
        rows, distinct, digest = logical_hash(conn, [s.table], exclude=app_ids)
        assert rows == distinct, f"{rows - distinct} rows of {s.table} sit in two partitions"
        assert (rows, distinct, digest) == sc.expected["hash"], \
            f"{s.table} differs from the source: {(rows, digest)} vs {sc.expected['hash']}"
        assert logical_hash(conn, [s.retired], exclude=app_ids) == sc.expected["hash"], "the retired table changed"
        assert sorted(i.name for i in info.indexes) == sc.expected["indexes"], "index names not restored"
        for p in info.partitions:  # every partition has every index
            have = len(catalog.describe(conn, p.name).indexes)
            assert have == sc.expected["per_partition"], f"{p.name} has {have} indexes"
        if app_ids:
            counts = key_counts(conn, [s.table], app_ids)
            bad = {k: v for k, v in counts.items() if v != 1}
            assert not bad, f"application rows lost or duplicated (id: copies): {bad}"
        assert leftovers(conn) == []
