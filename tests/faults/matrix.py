"""The fault matrix: which fault is injected into which step, and how each case runs.

A cell's runner takes a fresh database (``env.dbname``) and a seeded RNG, prepares the step's scenario, injects
the fault, re-runs the step (the task retry), finishes the flow, and checks the invariants; it returns a line
describing what happened, or raises. Combinations that make no sense are absent (the table prints N/A) with the
reason in ``NOT_APPLICABLE``.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.faults import cells_archive, cells_convert, cells_rotate
from tests.faults.common import Scenario
from tests.faults.driver import (
    AppProbe,
    Env,
    LockHolder,
    LogCapture,
    Worker,
    calibrate,
    choose_point,
    kill_at,
    restart_pg_at,
    s3_outage_at,
)
from tests.faults.worker import resolve

STEPS = ["fill", "replay", "index build", "swap", "catch-up", "premake", "default-partition move",
         "detach concurrently", "archive upload", "verify", "drop", "restore"]
FAULTS = ["worker killed", "PostgreSQL restarted", "S3 unavailable", "lock contention", "disk full"]

Runner = Callable[[Env, random.Random], str]
ScenarioFn = Callable[..., Scenario]


@dataclass(frozen=True)
class Cell:
    step: str
    fault: str
    run: Runner
    xfail: str | None = None

    @property
    def id(self) -> str:
        return f"{self.step}/{self.fault}".replace(" ", "-")


# ------------------------------------------------------------------------------------------------ point faults

KINDS = {"worker killed": ("db", "s3"), "PostgreSQL restarted": ("db",), "S3 unavailable": ("s3",)}


def point_fault(fault: str, scenario: ScenarioFn, phases: tuple[str, ...] | None = None) -> Runner:
    """Stop the step at a seeded point (of the wanted phases), inject ``fault``, check right after, re-run the
    step in-process (the task's retry), finish the flow and check every invariant."""

    def run(env: Env, rng: random.Random) -> str:
        sc = scenario(env)
        step = resolve(sc.step)
        labels = calibrate(env, scenario.__name__, step, sc.ctx)
        point = choose_point(rng, labels, phases=phases, kinds=KINDS[fault])
        if fault == "worker killed":
            outcome = kill_at(env, sc.step, sc.ctx, point, rng)
        elif fault == "PostgreSQL restarted":
            outcome = restart_pg_at(env, sc.step, sc.ctx, point)
        else:
            outcome = s3_outage_at(env, sc.step, sc.ctx, point)
        assert outcome.landed, f"the fault did not land: {outcome.detail}"
        if sc.after_fault is not None:
            sc.after_fault(sc)
        step(sc.ctx)  # the retried task completes
        sc.finish(sc.ctx)
        sc.check(sc, ())
        return f"{outcome.detail} (of {len(labels)} points)"

    return run


# ------------------------------------------------------------------------------------------------ lock contention

LOCK_TIMEOUT = 0.25  # seconds: every lock-taking step runs with lock_timeout=250ms in these cells
HOLD = 3.0  # the other session holds its lock this long (plus up to 1s, seeded): many times lock_timeout


def app_bound() -> float:
    """How long an application statement may wait: lock_timeout, with a generous allowance for a loaded CI
    machine. Still well below HOLD: a step that queued for its lock without lock_timeout would block the
    application for the whole HOLD and fail this bound."""
    return max(1.5, 4 * LOCK_TIMEOUT)


def lock_contention(scenario: Callable[[Env], Scenario], holder_sql: list[str], insert: str, select: str) -> Runner:
    def run(env: Env, rng: random.Random) -> str:
        sc = scenario(env)
        hold = HOLD + rng.uniform(0, 1.0)
        holder = LockHolder(env.dsn, holder_sql, hold)
        holder.start()
        holder.acquired.wait()
        assert holder.error is None, holder.error
        app = AppProbe(env.dsn, insert, select)
        app.start()
        time.sleep(0.2)
        cap = LogCapture()
        with cap.attached():
            resolve(sc.step)(sc.ctx)
        ended = time.monotonic()
        holder.join()
        time.sleep(0.2)
        app.stop_event.set()
        app.join()
        assert holder.error is None, holder.error
        assert ended >= holder.releasing_at, "the step finished while the conflicting lock was held?"
        retries = [(t, m) for t, m in cap.lines if re.search(r"retrying|timed out after", m)]
        assert retries, "the step never hit lock_timeout although a conflicting lock was held"
        sets = [(t, m) for t, m in cap.lines if "lock_timeout = " in m]
        assert sets and all(f"'{int(LOCK_TIMEOUT * 1000)}ms'" in m for _, m in sets), sets
        longest_try = 0.0
        for t_retry, _ in retries:  # each try waited at most lock_timeout (+ the statements before its lock)
            t_set = max(t for t, _ in sets if t <= t_retry)
            longest_try = max(longest_try, t_retry - t_set)
        assert longest_try <= LOCK_TIMEOUT + 0.75, f"a try waited {longest_try:.2f}s for its lock"
        assert app.errors == [], app.errors[:3]
        worst = app.worst()
        assert worst <= app_bound(), (
            f"an application statement was blocked {worst:.2f}s (lock_timeout {LOCK_TIMEOUT}s, "
            f"holder {hold:.1f}s)")
        assert app.ids, "the application wrote nothing"
        sc.finish(sc.ctx)
        sc.check(sc, app.ids)
        return (f"{len(retries)} lock timeouts retried, longest try {longest_try:.2f}s, app worst statement "
                f"{worst:.3f}s over {len(app.latencies)} statements (bound {app_bound():.2f}s, holder {hold:.1f}s)")

    return run


LT = f"{int(LOCK_TIMEOUT * 1000)}ms"
EVENTS_INSERT = "INSERT INTO public.events (created_at, payload) VALUES ('2024-06-10 12:00+00', 'app') RETURNING id"
EVENTS_SELECT = "SELECT count(*) FROM public.events WHERE created_at >= '2024-06-10' AND created_at < '2024-06-11'"
SUE = ["BEGIN", "LOCK TABLE public.events IN SHARE UPDATE EXCLUSIVE MODE"]  # e.g. a long VACUUM or CIC


def _swap_scenario(env: Env) -> Scenario:
    return cells_convert.scenario_swap(env, lock_timeout=LT, retries=30)


def _premake_scenario(env: Env) -> Scenario:
    return cells_rotate.scenario_premake(env, lock_timeout=LT, lock_retries=30)


def _move_scenario(env: Env) -> Scenario:
    return cells_rotate.scenario_default_move(env, lock_timeout=LT, lock_retries=30)


def _detach_scenario(env: Env) -> Scenario:
    # DETACH CONCURRENTLY blocks nobody while it waits, so its per-try bound is detach_timeout (set short here)
    return cells_rotate.scenario_detach(env, lock_timeout=LT, detach_timeout=LT, lock_retries=40)


def _restore_scenario(env: Env) -> Scenario:
    return cells_archive.scenario_restore(env, lock_timeout=LT, retries=30)


# ------------------------------------------------------------------------------------------------ disk full


def disk_full(scenario: Callable[[Env], Scenario]) -> Runner:
    """The step runs with every local file write failing (ENOSPC) and TMPDIR an empty read-only directory: it
    must succeed (it streams; there is no local dump path) and leave TMPDIR empty."""

    def run(env: Env, rng: random.Random) -> str:
        sc = scenario(env)
        tmp = Path(tempfile.mkdtemp(prefix="faults-tmp-"))
        os.chmod(tmp, 0o555)
        try:
            worker = Worker(sc.step, sc.ctx, env={"FAULT_DISKFULL": "1", "TMPDIR": str(tmp)})
            code = worker.finish()
            assert code == 0, f"the step needs local disk:\n{worker.log_tail()}"
            left = list(tmp.iterdir())
            assert left == [], f"files written to TMPDIR: {left}"
        finally:
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        sc.finish(sc.ctx)
        sc.check(sc, ())
        return f"completed with no writable local disk: {worker.result()}"

    return run


# ------------------------------------------------------------------------------------------------ the cells


def _cells() -> list[Cell]:
    cells: list[Cell] = []
    convert_steps: list[tuple[str, ScenarioFn]] = [
        ("fill", cells_convert.scenario_fill), ("replay", cells_convert.scenario_replay),
        ("index build", cells_convert.scenario_indexes), ("swap", cells_convert.scenario_swap),
        ("catch-up", cells_convert.scenario_catch_up), ("premake", cells_rotate.scenario_premake),
        ("default-partition move", cells_rotate.scenario_default_move),
        ("detach concurrently", cells_rotate.scenario_detach)]
    for step, scenario in convert_steps:
        for fault in ("worker killed", "PostgreSQL restarted"):
            cells.append(Cell(step, fault, point_fault(fault, scenario)))
    archive_phases = {"archive upload": ("upload",), "verify": ("verify",), "drop": ("drop",)}
    for step, phases in archive_phases.items():
        for fault in ("worker killed", "PostgreSQL restarted", "S3 unavailable"):
            if step == "drop" and fault == "S3 unavailable":
                continue
            cells.append(Cell(step, fault, point_fault(fault, cells_archive.scenario_archive, phases)))
    for fault in ("worker killed", "PostgreSQL restarted", "S3 unavailable"):
        cells.append(Cell("restore", fault, point_fault(fault, cells_archive.scenario_restore)))
    cells += [
        Cell("swap", "lock contention", lock_contention(
            _swap_scenario, ["BEGIN", "SELECT 1 FROM public.activities LIMIT 1"],
            "INSERT INTO public.activities (created_at, updated_at, key) VALUES (now(), now(), 'app') RETURNING id",
            "SELECT count(*) FROM public.activities WHERE id BETWEEN 100 AND 200")),
        Cell("premake", "lock contention", lock_contention(_premake_scenario, SUE, EVENTS_INSERT, EVENTS_SELECT)),
        Cell("default-partition move", "lock contention", lock_contention(
            _move_scenario, ["BEGIN", "SELECT count(*) FROM public.events_default"], EVENTS_INSERT, EVENTS_SELECT)),
        Cell("detach concurrently", "lock contention", lock_contention(
            _detach_scenario, SUE, EVENTS_INSERT, EVENTS_SELECT)),
        Cell("restore", "lock contention", lock_contention(_restore_scenario, SUE, EVENTS_INSERT, EVENTS_SELECT)),
        Cell("archive upload", "disk full", disk_full(cells_archive.scenario_archive)),
        Cell("restore", "disk full", disk_full(lambda env: cells_archive.scenario_restore(env))),
    ]
    return cells


CELLS = _cells()

NOT_APPLICABLE: dict[str, str] = {
    "S3 unavailable": "only upload, verify and restore talk to S3 (drop runs after a verified archive, "
                      "without S3)",
    "lock contention": "only swap, premake, default-partition move, detach and restore's attach take locks that "
                       "conflict with the application; fill, replay, index build (on the not-yet-live table) "
                       "and catch-up take none that do",
    "disk full": "the archive streams (pg_dump/COPY -> S3 multipart and back); the other steps never write local "
                 "files. Shown on upload (upload+verify+drop in one task) and restore",
}


def lookup(step: str, fault: str) -> Cell | None:
    return next((c for c in CELLS if c.step == step and c.fault == fault), None)


def describe() -> dict[str, Any]:
    return {"steps": STEPS, "faults": FAULTS, "cells": [c.id for c in CELLS]}
