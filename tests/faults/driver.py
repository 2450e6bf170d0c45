"""The fault driver: run a step in its own process, stop it at a seeded point, inject a fault, run it again.

Faults:

* ``kill``: SIGKILL of the process running the step, either while it waits just before point N (between two
  statements, maybe inside an open transaction) or a few milliseconds after it passed point N (in the middle of
  a statement). Then the step is run again.
* ``restart``: PostgreSQL (the primary) is restarted with a fast shutdown while the step waits at point N; the
  step then continues on a dead connection and must fail cleanly (an exception, not a hang), and its retry must
  complete. The cluster is healthy again (primary accepting connections, standby streaming) after each case.
* ``s3``: the moto S3 server is stopped while the step waits at an S3 call, the step continues and must fail
  cleanly, then S3 is started again. moto keeps everything in memory, so a restart loses the buckets: the driver
  recreates them and puts back the objects that existed before the outage (a real S3 outage loses nothing).
* ``lock``: another session holds a conflicting lock for longer than the step's whole ``lock_timeout`` budget
  per try; the step must wait at most ``lock_timeout`` per try and retry, and an application session doing
  INSERT and SELECT on the table the whole time must never be blocked much longer than ``lock_timeout``.

Points are numbered by :mod:`tests.faults.points`; the number of points of a step (and their phases) is measured
once per session by running the step on a clone of its scenario with the counter installed in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.faults import points as fault_points

REPO = Path(__file__).resolve().parents[2]
APP_NAME = "fault_worker"
log = logging.getLogger("pg_partition.faults")


# --------------------------------------------------------------------------------------------- configuration


def trials() -> int:
    """FAULT_TRIALS (default 1: the reduced matrix that plain ``pytest tests`` runs)."""
    return max(1, int(os.environ.get("FAULT_TRIALS", "1") or 1))


def base_seed() -> int:
    return int(os.environ.get("FAULT_SEED", "1") or 1)


def trial_seed(cell: str, trial: int) -> int:
    """A trial's seed: FAULT_TRIAL_SEED replays one trial exactly; otherwise derived from FAULT_SEED."""
    fixed = os.environ.get("FAULT_TRIAL_SEED")
    if fixed:
        return int(fixed)
    digest = hashlib.sha256(f"{base_seed()}:{cell}:{trial}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# --------------------------------------------------------------------------------------------- environment


@dataclass
class Env:
    """What a trial runs against: the session's cluster and S3 server, and this trial's database and bucket."""

    cluster: Any
    s3_server: Any
    dbname: str = ""
    bucket: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.dbname)

    def dsn_for(self, dbname: str) -> str:
        return (f"host=127.0.0.1 port={self.cluster.primary.port} user=postgres dbname={dbname} "
                f"application_name={APP_NAME}")

    def connect(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn_for(dbname or self.dbname), autocommit=True)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn_for("postgres"), autocommit=True)

    def ctx(self, **params: Any) -> dict[str, Any]:
        """The JSON context a step function receives (in the worker process or in-process)."""
        return {"dsn": self.dsn, "dbname": self.dbname, "s3_endpoint": self.s3_server.endpoint,
                "bucket": self.bucket, **self.extra, **params}

    def s3(self) -> Any:
        return s3_client(self.s3_server.endpoint)

    # databases -------------------------------------------------------------------------------------------

    def create_database(self, template: str | None = None) -> str:
        name = f"f_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            if template:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                             (template,))
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def create_bucket(self) -> str:
        name = f"fault-{uuid.uuid4().hex[:12]}"
        self.s3().create_bucket(Bucket=name)
        return name


def s3_client(endpoint: str) -> Any:
    """A boto3 client with few retries, so a stopped S3 server is noticed in seconds."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2,
                                      read_timeout=20))


# --------------------------------------------------------------------------------------------- the worker


class Worker:
    """A step running in its own process (``python -m tests.faults.worker``), stopped at a chosen point."""

    def __init__(self, step: str, ctx: dict[str, Any], *, point: str = "", hold: bool = True,
                 env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "FAULT_POINT": point, "FAULT_HOLD": "1" if hold else "0",
                    "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.worker", json.dumps({"step": step, "ctx": ctx})],
            cwd=REPO, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.marker: str | None = None
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream: Any, sink: list[str], signal_lines: bool) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if signal_lines:
                self.lines.put(line)
        if signal_lines:
            self.lines.put(None)

    def wait_marker(self) -> bool:
        """Block until the worker reaches its fault point (True) or exits without reaching it (False)."""
        while True:
            line = self.lines.get()
            if line is None:
                return False
            if line.startswith(fault_points.MARK):
                self.marker = line.strip()
                return True

    def go(self) -> None:
        """Let a worker waiting at its point continue."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def kill(self) -> bool:
        """SIGKILL the worker; True if it was still running."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return alive

    def finish(self) -> int:
        code = self.proc.wait()
        for t in self._threads:
            t.join()
        return code

    def result(self) -> Any:
        for line in self.stdout:
            if line.startswith("FAULT:RESULT "):
                return json.loads(line[len("FAULT:RESULT "):])
        return None

    def log_tail(self, n: int = 25) -> str:
        return "\n".join(self.stderr[-n:])


def wait_workers_gone(env: Env, dbname: str) -> None:
    """After a SIGKILL: wait until the killed client's backends have ended (their open transactions rolled back)."""
    with env.admin() as conn:
        while conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name IN (%s, %s)",
                (dbname, APP_NAME, "pg_partition_archive")).fetchone()[0]:
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------- calibration

_CALIBRATION: dict[str, list[str]] = {}


def calibrate(env: Env, key: str, step: Callable[[dict[str, Any]], Any], ctx: dict[str, Any]) -> list[str]:
    """The points of a step ("phase|kind" each), measured once per session on a clone of the scenario."""
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    clone = env.create_database(template=env.dbname)
    try:
        cal = {**ctx, "dsn": env.dsn_for(clone), "dbname": clone}
        if ctx.get("fresh_bucket_for_calibration"):
            cal["bucket"] = env.create_bucket()
        pts = fault_points.Points()
        with fault_points.installed(pts):
            step(cal)
        _CALIBRATION[key] = pts.labels
    finally:
        env.drop_database(clone)
    log.info("calibrated %s: %d points", key, len(_CALIBRATION[key]))
    return _CALIBRATION[key]


def choose_point(rng: random.Random, labels: list[str], *, phases: tuple[str, ...] | None = None,
                 kinds: tuple[str, ...] = ("db", "s3")) -> str:
    """A seeded point among those of the wanted phases and kinds, as ``<kind>:<n>`` (the n-th of its kind)."""
    seen: dict[str, int] = {}
    candidates: list[str] = []
    for lab in labels:
        phase, kind = lab.split("|")
        seen[kind] = seen.get(kind, 0) + 1
        if kind in kinds and (phases is None or phase in phases):
            candidates.append(f"{kind}:{seen[kind]}")
    if not candidates:
        raise AssertionError(f"no fault point of kinds {kinds} in phases {phases}: {sorted(set(labels))}")
    return rng.choice(candidates)


# --------------------------------------------------------------------------------------------- faults


@dataclass
class FaultOutcome:
    landed: bool
    exit_code: int | None
    detail: str


def kill_at(env: Env, step: str, ctx: dict[str, Any], point: str, rng: random.Random) -> FaultOutcome:
    """SIGKILL the worker at ``point``: while it waits there, or 0-30 ms after it went on (mid-statement)."""
    hold = rng.random() < 0.5
    worker = Worker(step, ctx, point=point, hold=hold)
    try:
        landed = worker.wait_marker()
        if landed and not hold:
            time.sleep(rng.uniform(0, 0.03))
        alive = worker.kill()
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    worker.finish()
    wait_workers_gone(env, ctx["dbname"])
    how = "waiting at" if hold else "just after"
    return FaultOutcome(landed and alive, worker.proc.returncode,
                        f"SIGKILL {how} point {point}: {worker.marker}" + ("" if alive else " (already exited)"))


def restart_pg_at(env: Env, step: str, ctx: dict[str, Any], point: str) -> FaultOutcome:
    """Restart PostgreSQL (fast) while the worker waits at ``point``; the worker must then fail cleanly."""
    worker = Worker(step, ctx, point=point, hold=True)
    try:
        landed = worker.wait_marker()
        if landed:
            restart_primary(env)
            worker.go()
        code = worker.finish()
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    if landed:
        # "fails cleanly": an exception the task runner sees (exit 1 with a traceback), not a hang or a crash
        assert code == 1, f"after the restart the step exited with {code}, expected a clean failure:\n" \
                          f"{worker.log_tail()}"
        assert "Traceback" in "\n".join(worker.stderr), worker.log_tail()
    return FaultOutcome(landed, code, f"PostgreSQL restarted at point {point}: {worker.marker}; "
                                      f"step failed: {last_error(worker)}")


def last_error(worker: Worker) -> str:
    lines = [ln for ln in worker.stderr if ln and not ln.startswith((" ", "Traceback"))]
    return lines[-1][:200] if lines else ""


def restart_primary(env: Env) -> None:
    """Fast shutdown and start of the primary; returns once it accepts connections and the standby streams."""
    env.cluster.primary.restart("fast")
    while True:
        try:
            with env.admin() as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            time.sleep(0.1)
    if env.cluster.standby is not None:
        env.cluster.wait_for_standby(timeout=120)


def s3_outage_at(env: Env, step: str, ctx: dict[str, Any], point: str) -> FaultOutcome:
    """Stop S3 while the worker waits before S3 call ``point``; it must fail cleanly; S3 comes back with its data."""
    worker = Worker(step, ctx, point=point, hold=True)
    try:
        landed = worker.wait_marker()
        if landed:
            with s3_down(env):
                worker.go()
                code = worker.finish()
        else:
            code = worker.finish()
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    if landed:
        assert code == 1, f"with S3 down the step exited with {code}, expected a clean failure " \
                          f"(stopped at {worker.marker}):\n{worker.log_tail(60)}"
    wait_workers_gone(env, ctx["dbname"])
    return FaultOutcome(landed, code, f"S3 stopped at point {point}: {worker.marker}; step failed: "
                                      f"{last_error(worker)}")


@contextmanager
def s3_down(env: Env) -> Iterator[None]:
    """S3 stopped for the body; then started again with the trial's bucket and every completed object it held
    (other tests' buckets are gone after the restart, as moto forgets them; they are not used again)."""
    client = env.s3()
    objects: dict[str, tuple[bytes, str, int]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=env.bucket):
        for o in page.get("Contents", []) or []:
            etag = str(o["ETag"]).strip('"')
            first_part = 0
            if etag.count("-") and not etag.endswith("-1"):
                first_part = int(client.head_object(Bucket=env.bucket, Key=o["Key"], PartNumber=1)["ContentLength"])
            body = client.get_object(Bucket=env.bucket, Key=o["Key"])["Body"].read()
            objects[o["Key"]] = (body, etag, first_part)
    saved = {env.bucket: objects}
    env.s3_server.stop()
    try:
        yield
    finally:
        env.s3_server.start()
        client = env.s3()
        for name, objects in saved.items():
            client.create_bucket(Bucket=name)
            for key, (body, etag, first_part) in objects.items():
                _put_back(client, name, key, body, etag, first_part)


def _put_back(client: Any, bucket: str, key: str, body: bytes, etag: str, first_part: int) -> None:
    """Store an object again byte for byte *and* with the same ETag: a multipart object is re-uploaded in the
    same parts (its ETag is the md5 of the parts' md5s plus "-<parts>"), as the archive's verify compares it."""
    if "-" not in etag:
        client.put_object(Bucket=bucket, Key=key, Body=body)
        return
    size = first_part or len(body)
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, max(len(body), 1), size), start=1):
        out = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                 Body=body[start:start + size])
        parts.append({"PartNumber": number, "ETag": out["ETag"]})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    got = str(client.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')
    assert got == etag, f"could not put s3://{bucket}/{key} back with its ETag ({got} != {etag})"


# --------------------------------------------------------------------------------------------- lock contention


class LockHolder(threading.Thread):
    """Another session holding a lock (the statements run in one transaction) for ``hold`` seconds."""

    def __init__(self, dsn: str, statements: list[str], hold: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.statements, self.hold = dsn, statements, hold
        self.acquired = threading.Event()
        self.released_at = 0.0
        self.releasing_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn.replace(APP_NAME, "fault_holder")) as conn:
                for stmt in self.statements:
                    conn.execute(stmt)
                self.acquired.set()
                time.sleep(self.hold)
                self.releasing_at = time.monotonic()
                conn.rollback()
                self.released_at = time.monotonic()
        except BaseException as exc:
            self.error = exc
            self.acquired.set()


class AppProbe(threading.Thread):
    """The application: INSERT and SELECT on the table in a loop, each statement timed."""

    def __init__(self, dsn: str, insert: str, select: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.insert, self.select = dsn, insert, select
        self.stop_event = threading.Event()
        self.latencies: list[tuple[float, str]] = []
        self.ids: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn.replace(APP_NAME, "fault_app"), autocommit=True) as conn:
            while not self.stop_event.is_set():
                for stmt in (self.insert, self.select):
                    t0 = time.monotonic()
                    try:
                        row = conn.execute(stmt).fetchone()
                        if stmt is self.insert and row:
                            self.ids.append(int(row[0]))
                    except psycopg.Error as exc:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    self.latencies.append((time.monotonic() - t0, stmt.split()[0]))
                time.sleep(0.02)

    def worst(self) -> float:
        return max((lat for lat, _ in self.latencies), default=0.0)


class LogCapture(logging.Handler):
    """Collects the pg_partition log lines of a step run in-process (retry warnings, SQL with lock_timeout)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.getMessage()))

    @contextmanager
    def attached(self) -> Iterator[LogCapture]:
        logger = logging.getLogger("pg_partition")
        old = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(old)
