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
BUCKET = "pg-partition-archive"  # the bucket of dags/pg_partition.yaml's archive policy


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
        "AIRFLOW_CONN_AWS_DEFAULT": s3.aws_conn_uri(),
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
        from tools.seed import seed_activities

        t0 = time.monotonic()
        with cluster.primary.connect(DB, autocommit=True) as conn:
            seed_activities(conn, "public.activities", rows=rows)
        print(f"[demo] seeded public.activities with {rows:,} rows in {time.monotonic() - t0:.1f}s", flush=True)

        env = _env(cluster, s3)
        res = _airflow(env, "db", "migrate", log=log)
        if res.returncode != 0:
            raise StackError(f"airflow db migrate failed; see {log}")

        with cluster.primary.connect(DB, autocommit=True) as conn:
            before = _logical_hash(conn)
        steps = [
            Step("pg_partition_advisor", {"conn_id": "pg_demo", "table": "public.activities", "memory_gb": 0.05}),
            Step("pg_partition_convert", {"conn_id": "pg_demo", "table": "public.activities"}),
            Step("pg_partition_rotate", {"conn_ids": ["pg_demo"]}),
            Step("pg_partition_archive", {"conn_ids": ["pg_demo"]}),
        ]
        if not _run_steps(env, steps, log):
            _summary(cluster, s3, steps, log, before)
            return 1
        # Bring every archived partition back from S3, as a user asking for old data would.
        with cluster.primary.connect(DB, autocommit=True) as conn:
            labels = [r[0] for r in conn.execute(
                "SELECT label FROM pgpartition.archive_queue WHERE status = 'dropped' ORDER BY label")]
        restores = [Step("pg_partition_restore", {"conn_id": "pg_demo", "table": "public.activities",
                                                  "period": label, "target": "attach"}) for label in labels]
        _run_steps(env, restores, log)
        steps += restores
        ok = _summary(cluster, s3, steps, log, before)
        return 0 if ok and all(s.ok for s in steps) else 1
    except StackError as exc:
        print(f"[demo] ERROR: {exc}", file=sys.stderr)
        print("[demo] stopped everything the demo had started.", file=sys.stderr)
        return 2
    finally:
        if s3:
            s3.stop()
        if cluster:
            cluster.stop()


def _run_steps(env: dict[str, str], steps: list[Step], log: Path) -> bool:
    for step in steps:
        label = step.dag_id + (f" ({step.conf['period']})" if "period" in step.conf else "")
        print(f"[demo] airflow dags test {label} ...", flush=True)
        t0 = time.monotonic()
        res = _airflow(env, "dags", "test", step.dag_id, "-c", json.dumps(step.conf), log=log)
        step.seconds = time.monotonic() - t0
        out = res.stdout + res.stderr
        step.ok = res.returncode == 0 and "state=failed" not in out and "DagRunState.FAILED" not in out
        if not step.ok:
            print(f"[demo] {step.dag_id} FAILED; the full log is in {log}", flush=True)
            return False
    return True


def _logical_hash(conn: Any) -> tuple[int, str]:
    """Row count and an order-independent hash of every row of public.activities (whatever its partitions)."""
    row = conn.execute("SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY t.id)) "
                       "FROM public.activities t").fetchone()
    return int(row[0]), str(row[1])


def _summary(cluster: PgCluster, s3: S3Server, steps: list[Step], log: Path, before: tuple[int, str]) -> bool:
    from pg_partition.core.advise import advisor
    from pg_partition.core.db import catalog
    from pg_partition.core.db.catalog import QualifiedName

    print("\n================ pg-partition demo summary ================")
    for s in steps:
        label = s.dag_id + (f" ({s.conf['period']})" if "period" in s.conf else "")
        print(f"  {label:<40} {'ok' if s.ok else 'FAILED':<7} {s.seconds:6.1f}s")
    with cluster.primary.connect(DB, autocommit=True) as conn:
        name = QualifiedName("public", "activities")
        info = catalog.describe(conn, name)
        print()
        print(advisor.render(advisor.assess(conn, name, memory_gb=0.05)))
        if info.is_partitioned:
            first, last = info.partitions[0], [p for p in info.partitions if not p.is_default][-1]
            print(f"\n  public.activities is partitioned: {len(info.partitions)} partitions, "
                  f"{first.name.name} .. {last.name.name}")
        queue = conn.execute("SELECT table_name, status, archive->>'key' FROM pgpartition.archive_queue "
                             "ORDER BY table_name").fetchall() if catalog.exists(
            conn, QualifiedName("pgpartition", "archive_queue")) else []
        for table, status, key in queue:
            print(f"  archive queue: {table:<28} {status:<9} {key or ''}")
        objects = s3.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
        print(f"  S3 bucket {BUCKET}: {len(objects)} objects, "
              f"{sum(o['Size'] for o in objects) / 1024**2:,.1f} MiB")
        for obj in objects[:8]:
            print(f"    s3://{BUCKET}/{obj['Key']}  {obj['Size']:,} bytes")
        after = _logical_hash(conn)
    same = after == before
    print(f"\n  rows before: {before[0]:,} (md5 {before[1][:12]}...), after convert + rotate + archive + restore: "
          f"{after[0]:,} (md5 {after[1][:12]}...) -> {'IDENTICAL: nothing lost' if same else 'DIFFERENT'}")
    print(f"\n  full Airflow output: {log}")
    print("============================================================")
    return same


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
