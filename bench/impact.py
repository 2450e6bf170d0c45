"""Application impact of an online conversion: a pgbench workload before and during it, same run, same server.

The workload is the users' application on ``activities``: look up by ``id``, list a user's latest activities by
``owner_id``, insert an activity, update one. It runs for BENCH_IMPACT_SECONDS before the conversion (baseline),
then continuously while the whole conversion runs (with change capture, because the workload updates rows):
prep, add partitions, install capture, fill, index builds, analyze, replay, swap.

Figures: tps during / before, p50 and p99 latency during / before (goal p99 <= 2x without throttle, <= 1.5x with
it), the slowest application transaction during the conversion (an upper bound of the longest lock wait any
application statement saw; goal <= lock_timeout + the p99 before), and the swap's ACCESS EXCLUSIVE hold (from the
grant to the end of the COMMIT; goal <= 100 ms). Per-transaction latencies come from pgbench's own log (``-l``).

The trade-off curve: the same measurement with the throttle off and at each target of BENCH_THROTTLE_TARGETS
(default "3,2,1.5": multiples of the judged signal's p90 before the conversion, see
pg_partition.core.convert.throttle: the application's running statements when the throttle can see them, else the
canary; "canary:1.5" forces the canary, to compare the two in one run), each on a fresh copy of the table with its
own "before" baseline in the same run, and the workload once more "after" the conversion (BENCH_IMPACT_AFTER=0 skips
it): a "before" and an "after" that disagree show the drift of a shared machine's load. ``main()`` writes the
curve's table and chart (conversion time vs application p99) next to the other results (BENCH_IMPACT_OUT names
them). BENCH_IMPACT_BATCHES (e.g. "2500") adds throttle-off points with other fill batch sizes (default 10,000).
BENCH_IMPACT_REVERSE=1 measures the points in reverse order (throttled first), so two runs alternate the order.

Which signal sees what the application feels: BENCH_IMPACT_SIGNALS=<file name> runs the workload alone and beside
a synthetic fill at several duty cycles and session counts, samples every candidate signal (the sleeping canary,
a burst canary, the running statements' age, Little's law) and writes each phase's application p50/p99 beside
them (bench/results/<file name>).

Run alone: ``.venv/bin/python -m bench.impact`` (BENCH_ROWS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import RESULTS, BenchEnv, Figure, bench_env
from pg_partition.core import convert
from pg_partition.core.convert import capture, replay, throttle, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.convert.throttle import percentile
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities

GROUP = "application impact"
LOCK_TIMEOUT_MS = 2000
CURVE: list[dict[str, Any]] = []  # the last run's trade-off points (throttle off first)
SCRIPT = """\\set id random(1, :maxid)
\\set owner random(0, 19999)
SELECT * FROM activities WHERE id = :id;
SELECT id, key, created_at FROM activities WHERE owner_type = 'User' AND owner_id = :owner ORDER BY id DESC LIMIT 20;
INSERT INTO activities (trackable_type, trackable_id, owner_type, owner_id, key, parameters, created_at, updated_at)
  VALUES ('Job', :id, 'User', :owner, 'bench.insert', '--- {}', now(), now());
UPDATE activities SET updated_at = now(), key = 'bench.update' WHERE id = :id;
"""


class Workload:
    """pgbench in consecutive short runs until stopped; collects per-transaction latencies (microseconds)."""

    def __init__(self, env: BenchEnv, db: str, maxid: int, clients: int, workdir: Path) -> None:
        self.env, self.db, self.maxid, self.clients, self.workdir = env, db, maxid, clients, workdir
        self.script = workdir / "app.sql"
        self.script.write_text(SCRIPT)
        self.latencies_us: list[int] = []
        self.ended: list[float] = []  # each transaction's end (unix seconds), to split latencies by phase
        self.transactions = 0
        self.seconds = 0.0
        self.failures = 0
        self._n = 0

    def run_for(self, seconds: int) -> None:
        self._n += 1
        prefix = self.workdir / f"log{self._n}"
        cmd = [self.env.pgbench(), "-n", "-f", str(self.script), "-c", str(self.clients), "-j", "2",
               "-T", str(seconds), "-D", f"maxid={self.maxid}", "-l", f"--log-prefix={prefix}",
               "-h", "127.0.0.1", "-p", str(self.env.cluster.primary.port), "-U", "postgres", self.db]
        start = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        self.seconds += time.monotonic() - start
        if res.returncode != 0:
            self.failures += 1
        for path in self.workdir.glob(f"log{self._n}.*"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    self.latencies_us.append(int(parts[2]))
                    self.ended.append(int(parts[4]) + int(parts[5]) / 1e6 if len(parts) >= 6 else 0.0)
                    self.transactions += 1
            path.unlink()

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, exclude: tuple[float, float] | None = None) -> float:
        """The ``q`` quantile (ms), leaving out the transactions that ended within ``exclude`` (unix start, stop)."""
        lat = self.latencies_us if exclude is None else [
            us for us, t in zip(self.latencies_us, self.ended, strict=True) if not exclude[0] <= t < exclude[1]]
        if not lat:
            return 0.0
        ordered = sorted(lat)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    def by_phase(self, phases: list[tuple[str, float]], end: float) -> dict[str, tuple[float, int]]:
        """p99 (ms) and count of the transactions that ended during each phase ([(name, unix start)], in
        order; the last ends at ``end``): which step of the conversion the application feels."""
        out: dict[str, tuple[float, int]] = {}
        bounds = [*(t for _, t in phases[1:]), end]
        for (name, start), stop in zip(phases, bounds, strict=True):
            lat = sorted(us for us, t in zip(self.latencies_us, self.ended, strict=True) if start <= t < stop)
            out[name] = (lat[min(len(lat) - 1, int(0.99 * len(lat)))] / 1000.0 if lat else 0.0, len(lat))
        return out


def _convert(env: BenchEnv, db: str, batch_size: int, target_factor: float | None,
             signal: str | None = None) -> dict[str, Any]:
    """The whole conversion with change capture, step by step as the DAG runs it (prep, partitions, capture,
    plan, fill, deferred indexes, analyze, replay, verify, swap), through the same throttle wiring as the
    operators: with ``target_factor`` the canary's baseline is measured once after planning (kept in the state
    schema) and fill, index builds, replay and verify are paced to keep the canary's p90 under that multiple."""
    spec = ConvertSpec.create("activities", "created_at", defer_indexes=True)
    out: dict[str, Any] = {"paused_s": 0.0, "canary_before": None, "target_ms": None, "over": 0, "batches": 0,
                           "phases": []}
    phases: list[tuple[str, float]] = out["phases"]

    def phase(name: str) -> None:
        phases.append((name, time.time()))
    def connect() -> Any:  # tagged as the hook tags the operators' sessions: the workload meter leaves them out
        return psycopg.connect(env.dsn(db) + f" application_name={throttle.OWN_APPLICATION_NAME}", autocommit=True)
    with connect() as conn:
        ex = Executor(conn, logger=logging.getLogger("pg_partition.bench"))

        phase("prep, partitions, capture, plan")
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=3)
        capture.install(ex, spec.table, spec.intermediate)
        convert.plan_fill(ex, spec, batch_size=batch_size)
        if target_factor is not None:
            phase("canary baseline")
            t0 = time.monotonic()
            out["canary_before"] = throttle.measure_baseline(ex, spec, connect)
            out["baseline_s"] = time.monotonic() - t0
        pacing = (throttle.latency_throttle(ex, spec, connect, ratio=target_factor, signal=signal)
                  if target_factor is not None else contextlib.nullcontext(None))
        with pacing as thr:
            out["target_ms"] = thr.target_ms if thr else None
            out["signal"] = thr.name if thr else None
            phase("fill")
            convert.fill(ex, spec, progress_every=3600, throttle=thr)
            phase("index builds")
            convert.build_indexes(ex, spec, throttle=thr)
            phase("analyze")
            convert.analyze(ex, spec)
            phase("replay, verify")
            replay.replay(ex, spec.table, spec.intermediate, until_backlog_below=500, throttle=thr)
            report = verify.verify_conversion(ex, spec, throttle=thr)
            out["verify_ok"] = report.ok
            if thr is not None:
                out.update(paused_s=thr.paused, over=thr.control.over, batches=thr.calls)
        phase("swap")
        out.update(convert.swap(ex, spec, lock_timeout=f"{LOCK_TIMEOUT_MS}ms"))
    phase("after")
    return out


def measure(env: BenchEnv, rows: int, seconds: int, clients: int, target_factor: float | None,
            batch_size: int = 10_000, signal: str | None = None) -> dict[str, Any]:
    """One database, the workload alone, then the workload during a whole conversion."""
    db = env.new_database()
    with env.connect(db) as conn:
        seed_activities(conn, "public.activities", rows=rows, timestamptz=True)
        conn.execute("VACUUM ANALYZE activities")
    with tempfile.TemporaryDirectory(prefix="pgp-bench-impact-") as tmp:
        before = Workload(env, db, rows, clients, Path(tmp))
        before.run_for(seconds)
        during = Workload(env, db, rows, clients, Path(tmp))
        done = threading.Event()
        result: dict[str, Any] = {}
        errors: list[BaseException] = []
        ended: list[float] = []

        def conversion() -> None:
            try:
                result.update(_convert(env, db, batch_size, target_factor, signal))
            except BaseException as exc:
                errors.append(exc)
            finally:
                ended.append(time.monotonic())
                done.set()

        worker = threading.Thread(target=conversion)
        started = time.monotonic()
        worker.start()
        while not done.is_set():
            during.run_for(2)
        worker.join()
        if errors:
            raise errors[0]
        conversion_s = ended[0] - started
        # the same workload once more after the conversion: on a shared machine the load of others drifts, and a
        # "before" and an "after" that disagree say the ratio carries that drift, not the conversion's cost
        after = Workload(env, db, rows, clients, Path(tmp))
        if os.environ.get("BENCH_IMPACT_AFTER", "1") == "1":
            after.run_for(seconds)
    with env.connect("postgres") as conn:
        conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    return {"before": before, "during": during, "after": after, "result": result, "conversion_s": conversion_s,
            "factor": target_factor, "batch_size": batch_size, "signal": signal}


def _point(m: dict[str, Any]) -> dict[str, Any]:
    """One point of the trade-off curve."""
    b, d, r = m["before"], m["during"], m["result"]
    drain = r.get("drain_before_lock") or {}
    name = "off" if m["factor"] is None else \
        f"{'canary' if m['signal'] == 'canary' else 'statements'} p90 <= {m['factor']:g}x"
    if m["batch_size"] != 10_000:
        name += f", batch {m['batch_size']:,}"
    canary = r.get("canary_before") or {}
    phases = r.get("phases") or []
    # the canary's baseline (10 s of the application running beside a sleeping conversion) is not "during": it
    # would dilute the throttled runs' p99 with quiet seconds the throttle-off run does not have
    skip = next(((t, phases[i + 1][1]) for i, (n, t) in enumerate(phases) if n == "canary baseline"), None)
    p99_during, p50_during = d.percentile(0.99, skip), d.percentile(0.5, skip)
    return {"throttle": name, "batch_size": m["batch_size"], "baseline_s": r.get("baseline_s", 0.0),
            "phase_p99": d.by_phase(phases[:-1], phases[-1][1]) if len(phases) > 1 else {},
            "factor": m["factor"], "conversion_s": m["conversion_s"],
            "p99_before": b.percentile(0.99), "p99_during": p99_during,
            "p99_ratio": p99_during / max(b.percentile(0.99), 1e-9),
            "p99_after": m["after"].percentile(0.99),
            "p99_ratio_both": p99_during / max((b.percentile(0.99) + m["after"].percentile(0.99)) / 2, 1e-9)
            if m["after"].transactions else None,
            "p50_ratio": p50_during / max(b.percentile(0.5), 1e-9),
            "tps_ratio": d.tps / max(b.tps, 1e-9), "slowest_ms": max(d.latencies_us or [0]) / 1000.0,
            "paused_s": r.get("paused_s", 0.0), "canary_p90_before": canary.get("p90_ms"),
            "canary_p99_before": canary.get("p99_ms"), "canary_p50_before": canary.get("p50_ms"),
            "over": r.get("over", 0), "batches": r.get("batches", 0),
            "target_ms": r.get("target_ms"), "lock_ms": float(r["lock_ms"]),
            "signal_base": canary.get("app_age_p90_ms" if m["signal"] != "canary" and canary.get("signal") ==
                                      "statements" else "p90_ms"),
            "locked_keys": r.get("locked_keys", 0), "drained": drain.get("entries", 0),
            "failures": b.failures + d.failures, "verify_ok": r.get("verify_ok")}


def run(env: BenchEnv, rows: int) -> list[Figure]:
    seconds = int(os.environ.get("BENCH_IMPACT_SECONDS", str(max(3, min(20, rows // 50_000)))))
    clients = int(os.environ.get("BENCH_IMPACT_CLIENTS", "4"))
    # "1.5": the signal the baseline chooses (the application's statements when visible); "canary:1.5": the canary
    targets = [x.strip().split(":") for x in os.environ.get("BENCH_THROTTLE_TARGETS", "3,2,1.5").split(",")
               if x.strip()]
    factors = [(float(t[-1]), t[0] if len(t) == 2 else None) for t in targets]
    batches = [int(x) for x in os.environ.get("BENCH_IMPACT_BATCHES", "").split(",") if x.strip()]
    plan: list[tuple[float | None, int, str | None]] = [(None, 10_000, None),
                                                        *((f, 10_000, sig) for f, sig in factors),
                                                        *((None, b, None) for b in batches)]
    order = list(range(len(plan)))
    if os.environ.get("BENCH_IMPACT_REVERSE") == "1":
        order.reverse()
    measured = {i: measure(env, rows, seconds, clients, *plan[i]) for i in order}
    runs = [measured[i] for i in range(len(plan))]  # reported in plan order (throttle off first) either way
    points = [_point(m) for m in runs]
    CURVE[:] = points  # for main()'s curve report
    plain = runs[0]
    off = points[0]
    before, during = plain["before"], plain["during"]
    p99_before = before.percentile(0.99)
    figures = [
        Figure(GROUP, "application tps during conversion", during.tps, "tps", baseline=before.tps,
               baseline_name="tps before", note=f"{clients} pgbench clients; conversion took "
               f"{plain['conversion_s']:.1f}s; pgbench runs with errors: before {before.failures}, during "
               f"{during.failures}"),
        Figure(GROUP, "application p50 latency during conversion", during.percentile(0.5), "ms",
               baseline=before.percentile(0.5), baseline_name="p50 before"),
        Figure(GROUP, "application p99 latency during conversion (no throttle)", during.percentile(0.99), "ms",
               baseline=p99_before, baseline_name="p99 before", goal="<= 2x",
               met=during.percentile(0.99) <= 2 * max(p99_before, 1e-9)),
        Figure(GROUP, "slowest application transaction during conversion (bounds its longest lock wait)",
               max(during.latencies_us or [0]) / 1000.0, "ms", baseline=max(before.latencies_us or [0]) / 1000.0,
               baseline_name="slowest before", goal=f"<= lock_timeout {LOCK_TIMEOUT_MS} ms + p99 before",
               met=max(during.latencies_us or [0]) / 1000.0 <= LOCK_TIMEOUT_MS + p99_before),
        Figure(GROUP, "swap: exclusive lock held, capture on, under the workload (throttle off)", off["lock_ms"],
               "ms", goal="<= 100 ms", met=off["lock_ms"] <= 100,
               note=f"pre-lock replay drained {off['drained']:,} entries; {off['locked_keys']} keys applied under "
               "the lock; the hold is measured from the grant of ACCESS EXCLUSIVE to the end of the COMMIT"),
    ]
    for p in points[1:]:
        figures += [
            Figure(GROUP, f"application p99 during conversion, throttle {p['throttle']}", p["p99_during"], "ms",
                   baseline=p["p99_before"], baseline_name="p99 before", goal="<= 1.5x",
                   met=p["p99_ratio"] <= 1.5,
                   note=f"canary before p50/p90/p99 {p['canary_p50_before'] or 0:.2f}/{p['canary_p90_before'] or 0:.2f}"
                   f"/{p['canary_p99_before'] or 0:.2f} ms; judged signal's p90 before {p['signal_base'] or 0:.2f} ms, "
                   f"target {p['target_ms'] or 0:.2f} ms; over target "
                   f"{p['over']} of {p['batches']} batches; paused {p['paused_s']:.1f}s in total; tps "
                   f"{p['tps_ratio']:.2f}x of before"),
            Figure(GROUP, f"conversion time, throttle {p['throttle']} (the cost)", p["conversion_s"], "s",
                   baseline=off["conversion_s"], baseline_name="throttle off"),
            Figure(GROUP, f"swap: exclusive lock held, throttle {p['throttle']}", p["lock_ms"], "ms",
                   goal="<= 100 ms", met=p["lock_ms"] <= 100),
        ]
    for f in figures:
        env.add(f)
    return figures


def write_curve(points: list[dict[str, Any]], rows: int, clients: int, stem: Path) -> Path:
    """The trade-off curve (conversion time vs application p99) as a markdown table and a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = points[0]
    lines = ["| throttle | conversion s | x of off | app p99 before ms | during ms | after ms | p99 ratio | ratio to "
             "mean(before, after) | p50 ratio | tps ratio | slowest ms | paused s (batches over target) | judged p90 "
             "before, target ms | swap lock ms | drained before lock / keys under lock | verify |", "|" + "---|" * 16]
    for p in points:
        canary = (f"{p['signal_base'] or 0:.2f}, {p['target_ms']:.2f}"
                  if p["target_ms"] else "")
        paused = f"{p['paused_s']:.1f} ({p['over']}/{p['batches']})" if p["target_ms"] else f"{p['paused_s']:.1f}"
        lines.append(
            f"| {p['throttle']} | {p['conversion_s']:.1f} | {p['conversion_s'] / off['conversion_s']:.2f}x | "
            f"{p['p99_before']:.1f} | {p['p99_during']:.1f} | {p['p99_after']:.1f} | {p['p99_ratio']:.2f}x | "
            f"{p['p99_ratio_both'] or 0:.2f}x | {p['p50_ratio']:.2f}x | "
            f"{p['tps_ratio']:.2f}x | {p['slowest_ms']:.0f} | {paused} | {canary} | {p['lock_ms']:.1f} | "
            f"{p['drained']:,} / {p['locked_keys']} | {'ok' if p['verify_ok'] else p['verify_ok']} |")
    md = stem.with_suffix(".md")
    png = stem.with_suffix(".png")
    names = max((list(p["phase_p99"]) for p in points), key=len)  # the steps in order (a throttled run has most)
    phase_lines = ["| throttle | p99 before | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for p in points:
        cells = [f"{p['phase_p99'][n][0]:.1f} ({p['phase_p99'][n][1]})" if n in p["phase_p99"] else ""
                 for n in names]
        phase_lines.append(f"| {p['throttle']} | {p['p99_before']:.1f} | " + " | ".join(cells) + " |")
    md.write_text(f"# Application impact vs conversion time ({rows:,} rows, {clients} pgbench clients)\n\n"
                  + "\n".join(lines) + "\n\nConversion time includes the canary baseline where the throttle is "
                  "on; the p99 and p50 during it do not ("
                  + ", ".join(f"{p['throttle']}: {p['baseline_s']:.1f} s" for p in points if p["baseline_s"])
                  + ").\n\nApplication p99 (ms) by the conversion step during which the transaction ended "
                  "(transactions):\n\n" + "\n".join(phase_lines) + f"\n\n![curve]({png.name})\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p["conversion_s"] for p in points]
    ys = [p["p99_ratio"] for p in points]
    ax.plot(xs, ys, marker="o", color="#4c72b0")
    for p in points:
        ax.annotate(p["throttle"], (p["conversion_s"], p["p99_ratio"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="goal: p99 <= 1.5x before")
    ax.set_xlabel("conversion time (s)")
    ax.set_ylabel("application p99 during / before")
    ax.set_ylim(bottom=0)
    ax.set_title(f"gentle mode: the trade-off ({rows:,} rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return md


def _app_stats(w: Workload, start: float, stop: float) -> dict[str, float]:
    lat = sorted(us / 1000.0 for us, t in zip(w.latencies_us, w.ended, strict=True) if start <= t < stop)
    if not lat:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "mean": 0.0}
    return {"n": len(lat), "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "mean": sum(lat) / len(lat)}


def signals(env: BenchEnv, rows: int, seconds: float, clients: int) -> list[dict[str, Any]]:
    """Which throttle signal sees what the application feels: the workload runs throughout while a synthetic
    fill (INSERT ... SELECT of 10,000-row batches into a copy, tagged as the conversion) runs at several duty
    cycles and session counts; every candidate signal samples all along, and per phase the application's
    p50/p99/mean is set beside each signal's level. A good signal moves with the application's p99."""
    db = env.new_database()
    with env.connect(db) as conn:
        seed_activities(conn, "public.activities", rows=rows, timestamptz=True)
        conn.execute("VACUUM ANALYZE activities")
        conn.execute("CREATE UNLOGGED TABLE sink (LIKE activities)")

    def own() -> Any:
        return psycopg.connect(env.dsn(db) + f" application_name={throttle.OWN_APPLICATION_NAME}", autocommit=True)
    query = "SELECT id FROM activities ORDER BY id DESC LIMIT 1"
    phases = [("app alone", 0, 0.0), ("1 session, duty 1.0", 1, 1.0), ("1 session, duty 0.5", 1, 0.5),
              ("1 session, duty 0.25", 1, 0.25), ("2 sessions, duty 1.0", 2, 1.0), ("app alone again", 0, 0.0)]
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgp-bench-signals-") as tmp, \
            throttle.Canary(own, query=query, interval=0.05, window=100_000) as sleeper, \
            throttle.BurstCanary(own, query=query, burst=20, interval=0.1, window=100_000) as burst, \
            throttle.WorkloadMeter(own, interval=0.05, window=100_000) as meter:
        app = Workload(env, db, rows, clients, Path(tmp))
        stop_app = threading.Event()

        def app_loop() -> None:
            while not stop_app.is_set():
                app.run_for(2)
        app_thread = threading.Thread(target=app_loop)
        app_thread.start()
        time.sleep(2)
        for name, sessions, duty in phases:
            stop_load = threading.Event()

            def load(k: int, duty: float = duty, stop_load: threading.Event = stop_load) -> None:
                with own() as c:
                    lo = k * rows // 2
                    while not stop_load.is_set():
                        t0 = time.monotonic()
                        c.execute("INSERT INTO sink SELECT * FROM activities WHERE id > %s AND id <= %s",
                                  (lo, lo + 10_000))
                        c.execute("TRUNCATE sink") if lo % 200_000 == 0 else None
                        lo = (lo + 10_000) % rows
                        busy = time.monotonic() - t0
                        if duty < 1:
                            stop_load.wait(busy * (1 - duty) / duty)
            loaders = [threading.Thread(target=load, args=(k,)) for k in range(sessions)]
            for t in loaders:
                t.start()
            time.sleep(1)  # let the phase settle
            for src in (sleeper, burst):
                with src._lock:
                    src.samples.clear()
            with meter._lock:
                meter.ticks.clear()
            start = time.time()
            time.sleep(seconds)
            stop = time.time()
            point = {"phase": name, **_app_stats(app, start, stop),
                     "sleeper_p50": percentile(sleeper.recent(), 0.5), "sleeper_p90": sleeper.level(),
                     "burst_p50": percentile(burst.recent(), 0.5), "burst_p90": burst.level(),
                     "age_p50": percentile(meter.ages(), 0.5), "age_p90": meter.level(),
                     "active": meter.active(), "commits_s": meter.commits_per_s(), "little_ms": meter.little_ms()}
            stop_load.set()
            for t in loaders:
                t.join()
            out.append(point)
            print(point, flush=True)
        stop_app.set()
        app_thread.join()
    with env.connect("postgres") as conn:
        conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    return out


def write_signals(points: list[dict[str, Any]], rows: int, clients: int, path: Path) -> Path:
    base = points[0]
    cols = [("p99", "app p99"), ("mean", "app mean"), ("sleeper_p90", "sleeping canary p90"),
            ("burst_p50", "burst canary p50"), ("burst_p90", "burst canary p90"), ("age_p90", "statement age p90"),
            ("little_ms", "Little ms/commit"), ("commits_s", "commits/s")]
    lines = ["| phase | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for p in points:
        cells = [f"{p[k]:.2f} ({p[k] / base[k]:.2f}x)" if base[k] else f"{p[k]:.2f}" for k, _ in cols]
        lines.append(f"| {p['phase']} | " + " | ".join(cells) + " |")
    path.write_text(f"# Throttle signals vs the application ({rows:,} rows, {clients} pgbench clients)\n\n"
                    "Each cell: the phase's value (its ratio to the first phase, the application alone).\n\n"
                    + "\n".join(lines) + "\n")
    return path


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pg_partition.bench").setLevel(logging.INFO)
    rows = int(os.environ.get("BENCH_ROWS", "1000000"))
    if os.environ.get("BENCH_IMPACT_SIGNALS"):
        with bench_env("pgp-bench-signals-") as env:
            points = signals(env, rows, float(os.environ.get("BENCH_IMPACT_SECONDS", "8")),
                             int(os.environ.get("BENCH_IMPACT_CLIENTS", "4")))
            RESULTS.mkdir(parents=True, exist_ok=True)
            print(write_signals(points, rows, int(os.environ.get("BENCH_IMPACT_CLIENTS", "4")),
                                RESULTS / os.environ["BENCH_IMPACT_SIGNALS"]))
        return
    with bench_env("pgp-bench-impact-") as env:
        run(env, rows)
        print("\n".join(f.line() for f in env.figures), flush=True)
        stem = RESULTS / os.environ.get("BENCH_IMPACT_OUT", time.strftime("%Y-%m-%d-impact-curve"))
        RESULTS.mkdir(parents=True, exist_ok=True)
        print(write_curve(CURVE, rows, int(os.environ.get("BENCH_IMPACT_CLIENTS", "4")), stem))


if __name__ == "__main__":
    main()
