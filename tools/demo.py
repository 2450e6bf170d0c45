"""`make demo`: the whole product on this machine, with real services under .demo/.

Starts a PostgreSQL primary + streaming standby and the S3 emulator (moto server), seeds ``activities``
(DEMO_ROWS, default 1,000,000), then runs the DAGs in dags/ end to end with ``airflow dags test`` and prints a
summary. Every run starts from a fresh demo database; ``make demo-clean`` removes everything. Services are
stopped when the demo ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.stack import PgCluster, S3Server, StackError, free_port, postgres_conn_json

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("DEMO_DIR", REPO / ".demo")).resolve()
DB = "demo"
BUCKET = "pg-partition-demo"


@dataclass
class Step:
    dag_id: str
    conf: dict[str, Any]
    seconds: float = 0.0
    ok: bool = False
    notes: list[str] = field(default_factory=list)


def _port(var: str) -> int | None:
    value = os.environ.get(var)
    return int(value) if value else None


def _env(cluster: PgCluster, s3: S3Server) -> dict[str, str]:
    home = DEMO / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW_CONN_PG_DEMO": postgres_conn_json(cluster.primary, DB),
        "AIRFLOW_CONN_AWS_DEMO": s3.aws_conn_uri(),
        "PG_PARTITION_S3_BUCKET": BUCKET,
    })
    return env


def _airflow(env: dict[str, str], *args: str, log: Path) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "airflow")
    res = subprocess.run([exe, *args], env=env, capture_output=True, text=True)
    with log.open("a") as fh:
        fh.write(f"$ airflow {' '.join(args)}\n{res.stdout}\n{res.stderr}\n")
    return res


def run(rows: int) -> int:
    DEMO.mkdir(exist_ok=True)
    log = DEMO / "demo.log"
    log.write_text("")
    cluster: PgCluster | None = None
    s3: S3Server | None = None
    steps: list[Step] = []
    try:
        print(f"[demo] starting PostgreSQL primary + standby under {DEMO / 'pg'} ...", flush=True)
        cluster = PgCluster.create(DEMO / "pg", primary_port=_port("DEMO_PG_PORT"),
                                   standby_port=_port("DEMO_STANDBY_PORT"))
        s3 = S3Server(_port("DEMO_S3_PORT") or free_port(), DEMO / "moto.log")
        s3.start()
        s3.client().create_bucket(Bucket=BUCKET)
        print(f"[demo] primary :{cluster.primary.port}, standby :{cluster.standby.port if cluster.standby else '-'},"
              f" S3 {s3.endpoint}", flush=True)

        with cluster.primary.connect(autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{DB}"')
        from pg_partition.core.seed import seed_activities

        t0 = time.monotonic()
        with cluster.primary.connect(DB, autocommit=True) as conn:
            seed_activities(conn, "public.activities", rows=rows)
        print(f"[demo] seeded public.activities with {rows:,} rows in {time.monotonic() - t0:.1f}s", flush=True)

        env = _env(cluster, s3)
        res = _airflow(env, "db", "migrate", log=log)
        if res.returncode != 0:
            raise StackError(f"airflow db migrate failed; see {log}")

        steps = [Step("pg_partition_advisor", {"conn_id": "pg_demo", "table": "public.activities",
                                               "memory_gb": 0.05})]
        for step in steps:
            print(f"[demo] airflow dags test {step.dag_id} ...", flush=True)
            t0 = time.monotonic()
            res = _airflow(env, "dags", "test", step.dag_id, "-c", json.dumps(step.conf), log=log)
            step.seconds = time.monotonic() - t0
            step.ok = res.returncode == 0 and "state=failed" not in res.stdout + res.stderr
            if not step.ok:
                print(f"[demo] {step.dag_id} FAILED; the full log is in {log}", flush=True)
                break

        _summary(cluster, steps, log)
        return 0 if steps and all(s.ok for s in steps) else 1
    except StackError as exc:
        print(f"[demo] ERROR: {exc}", file=sys.stderr)
        print("[demo] stopped everything the demo had started.", file=sys.stderr)
        return 2
    finally:
        if s3:
            s3.stop()
        if cluster:
            cluster.stop()


def _summary(cluster: PgCluster, steps: list[Step], log: Path) -> None:
    from pg_partition.core import advisor
    from pg_partition.core.catalog import QualifiedName

    print("\n================ pg-partition demo summary ================")
    for s in steps:
        print(f"  {s.dag_id:<28} {'ok' if s.ok else 'FAILED':<7} {s.seconds:6.1f}s")
    with cluster.primary.connect(DB, autocommit=True) as conn:
        print()
        print(advisor.render(advisor.assess(conn, QualifiedName("public", "activities"), memory_gb=0.05)))
    print(f"\n  full Airflow output: {log}")
    print("============================================================")


def clean() -> int:
    pid_files = list(DEMO.glob("pg/*/postmaster.pid")) if DEMO.exists() else []
    for pid_file in pid_files:
        from tools.stack import PgServer, pg_bindir

        PgServer("demo", pid_file.parent, 0, pg_bindir(), DEMO / "pg").stop("immediate")
    shutil.rmtree(DEMO, ignore_errors=True)
    print("[demo] removed .demo/")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "run"
    if cmd == "run":
        return run(int(os.environ.get("DEMO_ROWS", "1000000")))
    if cmd == "clean":
        return clean()
    print("usage: python -m tools.demo [run|clean]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
