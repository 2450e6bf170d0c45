"""pgslice beside us: the same conversion of twin tables in one run, in alternating order, step by step.

Three contestants convert identical copies of the seeded ``activities`` table (the public_activity gem's schema:
primary key + 4 indexes, monthly partitions covering the data + 3 future ones, batch 10,000):

* **pgslice 0.7.2**, run by path (``BENCH_PGSLICE``, default ``../shared/peers/pgslice-0.7.2`` relative to the
  repository; never copied here): ``prep``, ``add_partitions --intermediate --past N --future 3``, ``fill
  --batch-size 10000``, ``analyze``, ``swap``, ``fill --swapped``;
* **ours, the DAG**: ``airflow dags test pg_partition_convert`` with the DAG's default params (``defer_indexes``
  on, at most 4 fill tasks) in a fresh process against a throwaway SQLite metadata DB. Its wall time is split
  into Airflow's start-up (process start, imports, DAG parse, run creation: wall minus the span of its task
  instances) and the run itself (first task start to last task end). The venv's bytecode is compiled first, once
  (:func:`compile_bytecode`), as in any deployment;
* **ours, the engine alone**: the same steps as the DAG, called in-process from ``pg_partition.core`` with the
  same options (``defer_indexes``), so the Airflow overhead is visible as the difference.

How the DAG's ``airflow dags test`` wall time is split (each an exact definition, all wall clock, one process):

* **Airflow's start-up**: from the ``airflow dags test`` process's launch to the moment our first operator's code
  starts, i.e. when ``PartitionBaseOperator.pre_execute`` of the first task runs (Airflow calls it right before
  ``execute``). It logs ``pg-partition task <id>: our code starts (started_at=<epoch s>, ...)`` at INFO on the
  ``airflow.task.operators.pg_partition`` logger, which this bench lets through (``[logging] namespace_levels``)
  while everything else stays at WARNING. It covers Python and Airflow's imports, the CLI, the parse of every
  file in the DAGs folder (``dags test`` builds a DagBag of the whole folder), the DAG's serialization, the run's
  creation and, inside the first task instance, Airflow's lazy start of its in-process Execution API server (its
  FastAPI app: most of the first task's span) and its task runner. Our share of it (importing pg_partition and
  building the DAGs at parse) is measured apart, see bench/results/2026-11-29e-startup.md.
* **the run**: from there to the last task instance's end (``end_date`` in the metadata DB). Everything our code
  does, plus Airflow's per-task work for tasks 2..n (scheduling, task runner, XCom, state updates). The goal ratio
  (``<= 2x pgslice`` at 100k rows) uses this.
* **the tail**: from the last task's end to the process's exit (Airflow's shutdown; reported, not counted).
* the split used before 2026-11-29e is kept beside it: "before the first task" (launch to the first task
  instance's ``start_date``) and "from the first task's start" (first ``start_date`` to last ``end_date``).

``dag indexes_during_fill`` and ``engine indexes_during_fill`` do the same with ``defer_indexes`` off (every index
maintained during the copy, as pgslice does). ``BENCH_PEER_CONTESTANTS`` picks contestants by name (comma
separated; default: all four and pgslice).

Each twin is a ``CREATE DATABASE ... TEMPLATE`` clone of one seeded database, checkpointed and read once before
its contestant starts, and dropped after it. Rounds alternate the order (round 1: DAG, engine, pgslice; round 2:
pgslice, engine, DAG; ...) and the report quotes medians and the ratio of medians. Without Ruby (or the pgslice
directory) the pgslice contestant is skipped with a clear line and our numbers are still printed.

Sizes: ``BENCH_PEER_SIZES`` (default 100,000 and 2,000,000; ``make bench-large`` uses 10,000,000), rounds
``BENCH_PEER_ROUNDS`` (default 2). CI's tiny run (BENCH_ROWS below 100,000) uses BENCH_ROWS as the only size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.common import BenchEnv, Figure
from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities
from tools.stack import postgres_conn_json

REPO = Path(__file__).resolve().parent.parent
DAG_ID = "pg_partition_convert"
CONN_ID = "pg_bench"
FUTURE = 3
BATCH = int(os.environ.get("BENCH_BATCH_SIZE", "10000"))

# The steps compared side by side, and which of each contestant's tasks/commands make them up.
STEPS = ("prep", "add_partitions", "fill", "indexes+analyze", "swap", "after swap")
DAG_STEP = {
    "preflight": "prep", "prep": "prep", "install_capture": "prep",
    "add_partitions": "add_partitions",
    "plan_fill": "fill", "fill": "fill", "replay": "fill",
    "indexes": "indexes+analyze", "verify": "swap", "swap": "swap", "after_swap": "after swap", "report": "after swap",
}
PGSLICE_STEP = {"prep": "prep", "add_partitions": "add_partitions", "fill": "fill", "analyze": "indexes+analyze",
                "swap": "swap", "fill --swapped": "after swap"}


def pgslice_dir() -> Path:
    return (REPO / os.environ.get("BENCH_PGSLICE", "../shared/peers/pgslice-0.7.2")).resolve()


def pgslice_missing() -> str | None:
    """Why pgslice cannot run here (None when it can)."""
    ruby = shutil.which("ruby")
    if ruby is None:
        return "Ruby is not installed (apt-get install ruby ruby-pg ruby-thor, see ../shared/peers/README.md)"
    if not (pgslice_dir() / "exe" / "pgslice").exists():
        return f"pgslice not found at {pgslice_dir()} (set BENCH_PGSLICE)"
    probe = subprocess.run([ruby, "-e", 'require "pg"; require "thor"'], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"Ruby lacks the pg or thor library: {probe.stderr.strip()[:200]}"
    return None


def sizes(rows: int) -> list[int]:
    given = os.environ.get("BENCH_PEER_SIZES")
    if given:
        return [int(s) for s in given.split(",") if s.strip()]
    return [rows] if rows < 100_000 else [100_000, 2_000_000]


# --- twins -----------------------------------------------------------------------------------------------------


def seed_template(env: BenchEnv, rows: int) -> str:
    name = env.new_database()
    with env.connect(name) as conn:
        seed_activities(conn, "public.activities", rows=rows, timestamptz=True)
    return name


def clone(env: BenchEnv, template: str, tag: str) -> str:
    """A twin of the template database (file copy: seconds), checkpointed and with its table read once."""
    name = f"{template}_{tag}"
    with env.connect("postgres") as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    with env.connect(name) as conn:
        conn.execute("CHECKPOINT")
        conn.execute("SELECT count(*) FROM activities")
    return name


def drop(env: BenchEnv, name: str) -> None:
    with env.connect("postgres") as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def check_converted(env: BenchEnv, db: str, rows: int, who: str) -> None:
    """Every contestant must end with a partitioned ``activities`` holding every row, or its time means nothing."""
    with env.connect(db) as conn:
        kind = conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.activities'::regclass").fetchone()
        count = conn.execute("SELECT count(*) FROM activities").fetchone()
    if not kind or kind[0] != "p" or not count or count[0] != rows:
        raise RuntimeError(f"{who} did not convert the table: relkind {kind}, {count} rows (expected {rows})")


# --- contestants ---------------------------------------------------------------------------------------------


def run_pgslice(env: BenchEnv, db: str) -> dict[str, Any]:
    url = f"postgres://postgres@127.0.0.1:{env.cluster.primary.port}/{db}"
    with env.connect(db) as conn:
        past = conn.execute(
            "SELECT (extract(year FROM age(date_trunc('month', now()), date_trunc('month', min(created_at))))"
            " * 12 + extract(month FROM age(date_trunc('month', now()), date_trunc('month', min(created_at)))))"
            "::int FROM activities").fetchone()
    commands = [
        ("prep", ["prep", "activities", "created_at", "month"]),
        ("add_partitions", ["add_partitions", "activities", "--intermediate", "--past", str((past or [0])[0] or 0),
                            "--future", str(FUTURE)]),
        ("fill", ["fill", "activities", "--batch-size", str(BATCH)]),
        ("analyze", ["analyze", "activities"]),
        ("swap", ["swap", "activities"]),
        ("fill --swapped", ["fill", "activities", "--swapped", "--batch-size", str(BATCH)]),
    ]
    base = ["ruby", "-I", str(pgslice_dir() / "lib"), str(pgslice_dir() / "exe" / "pgslice")]
    steps: dict[str, float] = defaultdict(float)
    started = time.monotonic()
    for name, args in commands:
        t0 = time.monotonic()
        res = subprocess.run([*base, *args, "--url", url], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"pgslice {name} failed: {res.stderr.strip()[-500:]}")
        steps[PGSLICE_STEP[name]] += time.monotonic() - t0
    return {"total": time.monotonic() - started, "steps": dict(steps)}


def airflow_env(env: BenchEnv, db: str) -> dict[str, str]:
    home = env.root / "airflow"
    home.mkdir(exist_ok=True)
    out = dict(os.environ)
    out.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        # only our operators' INFO lines (one "our code starts" line per task, see run_dag) on top of WARNING
        "AIRFLOW__LOGGING__NAMESPACE_LEVELS": "airflow.task.operators.pg_partition=INFO",
        "PG_PARTITION_CONFIG": str(REPO / "dags" / "pg_partition.yaml"),
        f"AIRFLOW_CONN_{CONN_ID.upper()}": postgres_conn_json(env.cluster.primary, db),
    })
    return out


def airflow_bin() -> str:
    return shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"


def compile_bytecode() -> float:
    """Compile every module of the venv (Airflow and its dependencies) and of this repository to bytecode, once.

    Why: this machine exports ``PYTHONDONTWRITEBYTECODE=1`` and uv installs without bytecode, so without this
    every ``airflow`` process compiles ~2,500 modules from source (20 s of a 100k-row run under load, most of it
    inside the first task). A deployment (the Airflow image, a pip install) has its bytecode, so the DAG is
    measured with it. Python reads .pyc files whatever PYTHONDONTWRITEBYTECODE says. Not counted."""
    t0 = time.monotonic()
    site = Path(sys.prefix)
    targets = [str(p) for p in site.glob("lib/python3*/site-packages")] + [str(REPO / d) for d in (
        "provider", "dags", "tools")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *targets], check=False,
                   capture_output=True, text=True)
    return time.monotonic() - t0


def migrate_airflow(env: BenchEnv) -> float:
    t0 = time.monotonic()
    subprocess.run([airflow_bin(), "db", "migrate"], check=True, capture_output=True, text=True,
                   env=airflow_env(env, "postgres"))
    return time.monotonic() - t0


def _ts(value: str | None) -> float:
    if not value:
        return 0.0
    return datetime.fromisoformat(value).timestamp()


def task_instances(env: BenchEnv) -> list[dict[str, Any]]:
    """The latest run's task instances, read straight from the SQLite metadata DB (no Airflow import here)."""
    db = sqlite3.connect(env.root / "airflow" / "airflow.db")
    try:
        run = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)).fetchone()
        rows = db.execute("SELECT task_id, map_index, state, start_date, end_date FROM task_instance "
                          "WHERE dag_id = ? AND run_id = ?", (DAG_ID, run[0])).fetchall()
    finally:
        db.close()
    return [{"task": r[0], "map_index": r[1], "state": r[2], "start": _ts(r[3]), "end": _ts(r[4])} for r in rows]


CODE_STARTS = re.compile(r"pg-partition task (\S+): our code starts \(started_at=([0-9.]+)")


def code_starts(log: Path) -> list[tuple[str, float]]:
    """(task id, epoch seconds) of every "our code starts" line that PartitionBaseOperator.pre_execute logged."""
    return [(m[1], float(m[2])) for m in CODE_STARTS.finditer(log.read_text(errors="replace"))]


def run_dag(env: BenchEnv, db: str, *, defer_indexes: bool | None = None) -> dict[str, Any]:
    """``defer_indexes=None``: the DAG's default."""
    conf: dict[str, Any] = {"conn_id": CONN_ID, "table": "public.activities", "column": "created_at",
                            "period": "month", "future": FUTURE, "cover_data": True, "batch_size": BATCH}
    if defer_indexes is not None:
        conf["defer_indexes"] = defer_indexes
    log = env.root / f"dags-test-{db}.log"
    t0 = time.monotonic()
    wall_start = time.time()
    with log.open("w") as fh:
        res = subprocess.run([airflow_bin(), "dags", "test", DAG_ID, "-c", json.dumps(conf)], stdout=fh,
                             stderr=subprocess.STDOUT, env=airflow_env(env, db))
    wall = time.monotonic() - t0
    tis = task_instances(env)
    bad = [t for t in tis if t["state"] not in ("success", "skipped")]
    if res.returncode != 0 or bad:
        raise RuntimeError(f"airflow dags test failed (rc {res.returncode}, {bad[:3]}); log {log}")
    starts = code_starts(log)
    if not starts:
        raise RuntimeError(f"no 'our code starts' line in {log}: cannot tell Airflow's start-up from the run")
    return split_dag_times(tis, starts, wall_start, wall)


def split_dag_times(tis: list[dict[str, Any]], starts: list[tuple[str, float]], wall_start: float,
                    wall: float) -> dict[str, Any]:
    """The module docstring's split of one ``dags test`` run, from its task instances (epoch ``start``/``end``)
    and its "our code starts" lines."""
    ran = [dict(t) for t in tis if t["start"] and t["end"]]
    first, last = min(t["start"] for t in ran), max(t["end"] for t in ran)
    ours_first = min(ts for _task, ts in starts)
    # Airflow's start-up inside the first task instance is not the run: its span starts where our code starts
    # (its task runner, and under ``dags test`` the in-process Execution API server Airflow starts lazily there)
    head = next(t for t in ran if t["start"] == first)
    airflow_in_first = max(ours_first - head["start"], 0.0)
    head["start"] = max(head["start"], ours_first)
    steps: dict[str, float] = defaultdict(float)
    spans: dict[str, list[float]] = {}
    for t in ran:  # a step's time is the span of its tasks (mapped fill tasks may overlap)
        s = spans.setdefault(DAG_STEP.get(t["task"], "other"), [t["start"], t["end"]])
        s[0], s[1] = min(s[0], t["start"]), max(s[1], t["end"])
    for name, (a, b) in spans.items():
        steps[name] = b - a
    busy = sum(t["end"] - t["start"] for t in ran)
    covered, reach = 0.0, ours_first  # the union of the task instances' spans (mapped fills overlap)
    for t in sorted(ran, key=lambda t: t["start"]):
        if t["end"] > reach:
            covered += t["end"] - max(t["start"], reach)
            reach = t["end"]
    per_task: dict[str, float] = defaultdict(float)
    for t in ran:
        per_task[t["task"]] += t["end"] - t["start"]
    # Airflow's time inside each task instance before our code starts (task 2..n: the per-task overhead in the run)
    by_task: dict[str, float] = {}
    for t in sorted(ran, key=lambda t: t["start"]):
        mine = [ts for task, ts in starts if task == t["task"] and t["start"] <= ts <= t["end"]]
        if mine:
            by_task.setdefault(t["task"], 0.0)
            by_task[t["task"]] += min(mine) - t["start"]
    return {"total": last - ours_first, "wall": wall, "airflow_startup": ours_first - wall_start,
            "first_task_airflow": airflow_in_first, "from_first_task": last - first,
            "before_first_task": first - wall_start, "after_last_task": wall_start + wall - last,
            "airflow_in_tasks": sum(v for k, v in by_task.items() if k != head["task"]),
            "steps": dict(steps), "tasks": len(ran), "task_seconds": busy, "per_task": dict(per_task),
            "gaps": last - ours_first - covered,
            "fill_tasks": sum(1 for t in ran if t["task"] == "fill")}


class TimedExecutor(Executor):
    """The engine's executor, timing every statement by its first words (DELETE, INSERT, CREATE INDEX, ...)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        super().__init__(conn)
        self.logger = logging.getLogger("pg_partition.bench")
        self.by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def run(self, stmt: Any, params: Any = None, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = super().run(stmt, params, **kwargs)
        words = self.statements[-1].split()
        kind = " ".join(words[:2]).upper() if words[:1] in (["CREATE"], ["ALTER"]) else (words[:1] or ["?"])[0].upper()
        entry = self.by_kind[kind]
        entry[0] += time.perf_counter() - t0
        entry[1] += 1
        return out


def run_engine(env: BenchEnv, db: str, *, defer_indexes: bool = True) -> dict[str, Any]:
    """The DAG's steps with its default params called in-process (no Airflow; replay and the pre-swap verify
    included), each timed; statements timed by kind for the profile."""
    spec = ConvertSpec.create("activities", "created_at", defer_indexes=defer_indexes)
    steps: dict[str, float] = defaultdict(float)
    with env.connect(db) as conn:
        ex = TimedExecutor(conn)

        def step(name: str, fn: Callable[[], Any]) -> Any:
            t0 = time.monotonic()
            out = fn()
            steps[name] += time.monotonic() - t0
            return out

        started = time.monotonic()
        step("prep", lambda: convert.preflight(conn, spec))
        step("prep", lambda: convert.prep(ex, spec))
        step("add_partitions", lambda: convert.add_partitions(ex, spec, cover_data=True, future=FUTURE))
        step("prep", lambda: convert.install_capture(ex, spec, "auto"))
        step("fill", lambda: convert.plan_fill(ex, spec, batch_size=BATCH))
        step("fill", lambda: convert.fill(ex, spec, progress_every=3600, sessions=2))  # the DAG's 2 sessions
        captured = convert.capture_on(conn, spec.table)
        if captured:
            step("fill", lambda: convert.replay.replay(ex, spec.table, spec.intermediate, batch_size=BATCH,
                                                       until_backlog_below=1000))
        step("indexes+analyze", lambda: convert.build_indexes(ex, spec))
        # the DAG's gate, with ANALYZE alongside on a second session (counted with verify, as in the DAG)
        step("swap", lambda: convert.verify.verify_conversion(ex, spec, analyze=True).raise_if_mismatch())
        step("swap", lambda: convert.finish_and_swap(ex, spec, batch_size=BATCH))
        if not captured:  # the DAG's after_swap: catch-up in append-only mode; with capture and its default
            step("after swap", lambda: convert.catch_up(ex, spec))  # verify_after_swap=false, nothing
        step("after swap", lambda: convert.report(conn, spec))
        total = time.monotonic() - started
    return {"total": total, "steps": dict(steps), "by_kind": {k: tuple(v) for k, v in ex.by_kind.items()}}


# --- the suite -----------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def run_size(env: BenchEnv, rows: int, rounds: int, skip_pgslice: str | None) -> list[Figure]:
    t0 = time.monotonic()
    template = seed_template(env, rows)
    print(f"  seeded {rows:,} rows in {time.monotonic() - t0:.1f}s", flush=True)
    contestants: dict[str, Callable[[BenchEnv, str], dict[str, Any]]] = {
        "dag": run_dag, "engine": run_engine,
        "dag indexes_during_fill": lambda e, d: run_dag(e, d, defer_indexes=False),
        "engine indexes_during_fill": lambda e, d: run_engine(e, d, defer_indexes=False),
    }
    wanted = os.environ.get("BENCH_PEER_CONTESTANTS")
    if wanted:
        contestants = {k: v for k, v in contestants.items() if k in {w.strip() for w in wanted.split(",")}}
    if skip_pgslice is None:
        contestants["pgslice"] = run_pgslice
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(rounds):
        order = list(contestants) if r % 2 == 0 else list(reversed(contestants))
        for who in order:
            db = clone(env, template, f"{who.replace(' indexes_during_fill', 'i')}{r}")
            try:
                out = contestants[who](env, db)
                check_converted(env, db, rows, who)
            finally:
                drop(env, db)
            results[who].append(out)
            extra = (f" (wall {out['wall']:.1f}s = Airflow start-up {out['airflow_startup']:.1f}s + run "
                     f"{out['total']:.1f}s + tail {out['after_last_task']:.1f}s; previous split: "
                     f"{out['before_first_task']:.1f}s before the first task, {out['from_first_task']:.1f}s from its "
                     f"start, of which {out['first_task_airflow']:.1f}s Airflow inside the first task; Airflow "
                     f"inside tasks 2..n {out['airflow_in_tasks']:.1f}s; "
                     f"{out['tasks']} tasks busy {out['task_seconds']:.1f}s)") if who.startswith("dag") else ""
            print(f"  round {r + 1} {who}: {out['total']:.1f}s{extra}; "
                  + ", ".join(f"{k} {v:.1f}" for k, v in out["steps"].items()), flush=True)
    drop(env, template)
    return figures_for(rows, results, skip_pgslice)


def figures_for(rows: int, results: dict[str, list[dict[str, Any]]], skip: str | None) -> list[Figure]:
    group = f"vs pgslice, {rows:,} rows"
    prof = f"profile, {rows:,} rows"
    goal_ratio = 0.7 if rows >= 2_000_000 else 2.0
    goal = f"<= {goal_ratio}x"
    med = {who: _median([x["total"] for x in xs]) for who, xs in results.items()}
    step_med = {who: {s: _median([x["steps"].get(s, 0.0) for x in xs]) for s in STEPS} for who, xs in results.items()}
    peer = med.get("pgslice")
    base_name = "pgslice 0.7.2 whole flow" if peer is not None else ""
    rounds_note = "; ".join(f"{who}: " + ", ".join(f"{x['total']:.1f}" for x in xs) for who, xs in results.items())
    ours = [w for w in results if w != "pgslice"]
    figs: list[Figure] = []
    for who in ours:
        label = ("DAG run (from our first operator's code to the last task's end; Airflow start-up excluded)"
                 if who.startswith("dag") else "engine alone (no Airflow)")
        variant = ", indexes during the fill" if who.endswith("indexes_during_fill") else ", defaults"
        figs.append(Figure(group, f"whole conversion, {label}{variant}", med[who], "s", baseline=peer,
                           baseline_name=base_name, goal=goal if peer else "",
                           met=(med[who] / peer <= goal_ratio) if peer else None,
                           note=f"median of {len(results[who])} alternating rounds (s): {rounds_note}"
                           if who == ours[0] else ""))
    for who in (w for w in ours if w.startswith("dag")):
        xs = results[who]
        figs.append(Figure(group, f"{who}: airflow dags test wall time (start-up included)",
                           _median([x["wall"] for x in xs]), "s", baseline=peer, baseline_name=base_name))
        figs.append(Figure(group, f"{who}: Airflow start-up (process launch to our first operator's code)",
                           _median([x["airflow_startup"] for x in xs]), "s",
                           note=f"{xs[0]['tasks']} task instances ({xs[0]['fill_tasks']} mapped fill), "
                           f"busy {_median([x['task_seconds'] for x in xs]):.1f}s of the run"))
        figs.append(Figure(group, f"{who}: of which inside the first task instance (Airflow's in-process "
                           "Execution API server and task runner start)",
                           _median([x["first_task_airflow"] for x in xs]), "s"))
        figs.append(Figure(group, f"{who}: Airflow inside tasks 2..n before our code (sum, part of the run)",
                           _median([x["airflow_in_tasks"] for x in xs]), "s"))
        figs.append(Figure(group, f"{who}: tail after the last task (Airflow's shutdown, not counted)",
                           _median([x["after_last_task"] for x in xs]), "s"))
        figs.append(Figure(group, f"{who}: previous split: before the first task's start_date",
                           _median([x["before_first_task"] for x in xs]), "s"))
        figs.append(Figure(group, f"{who}: previous split: first task's start_date to the last task's end",
                           _median([x["from_first_task"] for x in xs]), "s", baseline=peer,
                           baseline_name=base_name))
    for s in STEPS:
        for who in ours:
            figs.append(Figure(group, f"step {s} ({who})", step_med[who][s], "s",
                               baseline=step_med["pgslice"][s] if peer else None,
                               baseline_name=f"pgslice {s}" if peer else ""))
    if skip:
        figs.append(Figure(group, "pgslice skipped", 0.0, "", note=skip))
    for who in (w for w in ours if w.startswith("engine")):
        kinds: dict[str, list[float]] = defaultdict(list)
        for x in results[who]:
            for k, (secs, _count) in x["by_kind"].items():
                kinds[k].append(secs)
        counts = {k: c for k, (_s, c) in results[who][0]["by_kind"].items()}
        for k, secs in sorted(kinds.items(), key=lambda kv: -_median(kv[1])):
            if _median(secs) >= 0.05:
                figs.append(Figure(prof, f"{who}: statements {k} ({counts.get(k, 0)}x)", _median(secs), "s"))
    for who in (w for w in ours if w.startswith("dag")):
        tasks: dict[str, list[float]] = defaultdict(list)
        for x in results[who]:
            for k, secs in x["per_task"].items():
                tasks[k].append(secs)
        for k, secs in sorted(tasks.items(), key=lambda kv: -_median(kv[1])):
            if _median(secs) >= 0.1:
                figs.append(Figure(prof, f"{who}: task {k} (sum over its task instances)", _median(secs), "s"))
        figs.append(Figure(prof, f"{who}: time between task instances (scheduling, task start-up)",
                           _median([x["gaps"] for x in results[who]]), "s",
                           note="the run minus the union of the task instances' spans (the first from our code on)"))
    return figs


def run(env: BenchEnv, rows: int) -> list[Figure]:
    rounds = int(os.environ.get("BENCH_PEER_ROUNDS", "2" if rows >= 100_000 else "1"))
    skip = pgslice_missing()
    if skip:
        print(f"  pgslice SKIPPED: {skip}", flush=True)
    print(f"  bytecode of the venv and the repository compiled: {compile_bytecode():.1f}s (once, not counted)",
          flush=True)
    print(f"  airflow db migrate: {migrate_airflow(env):.1f}s (once, not counted)", flush=True)
    figures: list[Figure] = []
    for n in sizes(rows):
        print(f"-- {n:,} rows, {rounds} round(s)", flush=True)
        for f in run_size(env, n, rounds, skip):
            env.add(f)
            figures.append(f)
    return figures
