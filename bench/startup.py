"""Airflow's start-up against ours, measured apart: ``python -m bench.startup parse|profile``.

``parse`` (no database): what every task process pays to parse a DAG file, in fresh processes, rounds alternating
the order of the files. For each ``dags/*.py``: the time to import ``airflow.sdk`` (Airflow's floor: every task
process pays it, whatever the DAG), then the time to run the DAG file on top of it (our imports and the DAG's
construction), split into importing its ``pg_partition.dag_factory`` module and building the DAG. Two probes of
costs that are ours to choose but sit in files other helpers own: importing ``pglast`` (the ``where`` parser, today
imported by every convert DAG parse) and constructing an ``Asset`` whose URI scheme is not ``x-`` prefixed
(Airflow then loads every provider's asset URI normalizers, among them the amazon provider's S3Hook).

``profile`` (starts the bench stack, seeds ``BENCH_STARTUP_ROWS`` rows, default 100,000): runs the bench's
``airflow dags test pg_partition_convert`` under each of ``BENCH_STARTUP_MODES`` (comma separated: ``plain``,
``importtime`` (``python -X importtime``), ``cprofile``, ``pyspy`` (py-spy speedscope, needs py-spy in the venv))
and keeps every log/profile in ``BENCH_STARTUP_OUT`` (default ``/tmp/pgp-startup``), printing each task instance's
start/end relative to the process launch and the moment our first operator's code started.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_STARTUP_ROUNDS", "5"))

# Run in a fresh interpreter: prints three numbers (seconds): airflow.sdk import, factory import, DAG file run.
_PARSE = """
import importlib, runpy, sys, time
t0 = time.perf_counter()
import airflow.sdk, airflow.sdk.definitions.dag
from airflow.sdk import Asset, BaseOperator, DAG
t1 = time.perf_counter()
factory = sys.argv[2]
if factory:
    importlib.import_module(factory)
t2 = time.perf_counter()
runpy.run_path(sys.argv[1])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""
_PROBES = {
    "import pglast (the where parser)": "import pglast, pglast.enums, pglast.parser, pglast.stream",
    "Asset(uri='pg-partition://...') (provider URI normalizers)":
        "from airflow.sdk import Asset; Asset(name='probe', uri='pg-partition://archive/pending')",
    "Asset(uri='x-pg-partition://...') (no normalizer lookup)":
        "from airflow.sdk import Asset; Asset(name='probe', uri='x-pg-partition://archive/pending')",
}
_PROBE = """
import sys, time
import airflow.sdk, airflow.sdk.definitions.dag
from airflow.sdk import Asset, BaseOperator, DAG
t0 = time.perf_counter()
exec(sys.argv[1])
print(time.perf_counter() - t0)
"""


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "PG_PARTITION_CONFIG": str(REPO / "dags" / "pg_partition.yaml"),
                "PYTHONPATH": str(REPO / "provider")})
    return env


def _factory(dag_file: Path) -> str:
    for line in dag_file.read_text().splitlines():
        if line.startswith("from pg_partition.dag_factory."):
            return line.split()[1]
    return ""


def parse() -> None:
    from bench.peers import compile_bytecode

    print(f"bytecode compiled: {compile_bytecode():.1f}s (once, not counted); load: {os.getloadavg()}", flush=True)
    files = sorted((REPO / "dags").glob("pg_partition_*.py"))
    out: dict[str, list[tuple[float, float, float]]] = {f.name: [] for f in files}
    probes: dict[str, list[float]] = {k: [] for k in _PROBES}
    with tempfile.TemporaryDirectory(prefix="pgp-startup-") as tmp:
        env = _env(Path(tmp))
        for r in range(ROUNDS):
            order = files if r % 2 == 0 else list(reversed(files))
            for f in order:
                res = subprocess.run([sys.executable, "-c", _PARSE, str(f), _factory(f)], env=env,
                                     capture_output=True, text=True, check=True)
                a, b, c = (float(x) for x in res.stdout.split()[-3:])
                out[f.name].append((a, b, c))
            for name, code in (_PROBES.items() if r % 2 == 0 else reversed(list(_PROBES.items()))):
                res = subprocess.run([sys.executable, "-c", _PROBE, code], env=env, capture_output=True, text=True,
                                     check=True)
                probes[name].append(float(res.stdout.split()[-1]))
    med = statistics.median
    print(f"median of {ROUNDS} fresh processes per file (s): airflow.sdk import | dag_factory import | DAG build")
    for name, xs in out.items():
        print(f"  {name:<28} {med(x[0] for x in xs):6.3f} | {med(x[1] for x in xs):6.3f} | "
              f"{med(x[2] for x in xs):6.3f}")
    for name, ys in probes.items():
        print(f"  probe: {name:<60} {med(ys):6.3f}")
    print(f"load after: {os.getloadavg()}")


def profile() -> None:
    from bench import peers
    from bench.common import bench_env

    out_dir = Path(os.environ.get("BENCH_STARTUP_OUT", "/tmp/pgp-startup"))
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = os.environ.get("BENCH_STARTUP_MODES", "plain").split(",")
    rows = int(os.environ.get("BENCH_STARTUP_ROWS", "100000"))
    with bench_env() as env:
        print(f"bytecode {peers.compile_bytecode():.1f}s, migrate {peers.migrate_airflow(env):.1f}s", flush=True)
        template = peers.seed_template(env, rows)
        for i, mode in enumerate(modes):
            db = peers.clone(env, template, f"p{i}")
            conf = {"conn_id": peers.CONN_ID, "table": "public.activities", "column": "created_at", "period": "month",
                    "future": peers.FUTURE, "cover_data": True, "batch_size": peers.BATCH}
            pre = {"plain": [sys.executable], "importtime": [sys.executable, "-X", "importtime"],
                   "cprofile": [sys.executable, "-m", "cProfile", "-o", str(out_dir / f"{i}-cprofile.prof")],
                   "pyspy": [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "200", "-f", "speedscope",
                             "-o", str(out_dir / f"{i}-pyspy.json"), "--", sys.executable]}[mode]
            log = out_dir / f"{i}-{mode}.log"
            t0 = time.time()
            with log.open("w") as fh:
                rc = subprocess.run([*pre, peers.airflow_bin(), "dags", "test", peers.DAG_ID, "-c", json.dumps(conf)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=peers.airflow_env(env, db)).returncode
            wall = time.time() - t0
            ours = min((ts for _t, ts in peers.code_starts(log)), default=float("nan"))
            print(f"{mode}: rc {rc}, wall {wall:.2f}s, our first operator's code at {ours - t0:.2f}s "
                  f"(load {os.getloadavg()[0]:.1f}); log {log}", flush=True)
            for t in sorted(peers.task_instances(env), key=lambda t: t["start"]):
                print(f"   {t['task']:<16} {t['map_index']:>3} {t['start'] - t0:7.2f} {t['end'] - t0:7.2f} "
                      f"{t['end'] - t['start']:6.2f} {t['state']}", flush=True)
            peers.drop(env, db)


if __name__ == "__main__":
    {"parse": parse, "profile": profile}[sys.argv[1] if len(sys.argv) > 1 else "parse"]()
