"""Archive detached partitions to S3, verify them, drop them, and bring them back on demand.

Why it is built this way:

* **Streaming, bounded memory.** A partition can be hundreds of GB, and an Airflow worker has a few hundred MB.
  ``pg_dump --format=custom`` (or ``COPY ... TO STDOUT`` for Parquet/CSV) is read from a pipe in small chunks and
  pushed into an S3 multipart upload part by part; at most ``part_size * (max_inflight + 1)`` bytes are held,
  whatever the table size. The sha256 is computed on the same bytes while they stream, so there is never a local
  copy to hash afterwards (and never a local file an executor could lose).
* **One snapshot.** The row count recorded in the manifest is taken in the exported snapshot that ``pg_dump
  --snapshot`` (or our own ``COPY``) reads, so the manifest describes exactly the bytes in the object.
* **Verify, then drop.** An archive is only trusted after HEAD (size, ETag), a full streaming re-read (sha256),
  ``pg_restore --list`` (the dump is a readable archive with this table's data) and a row count (decoded from
  the object itself, compared with the manifest and with the live table). The DROP happens in its own short
  transaction, under ``lock_timeout``, after the live row count is checked once more under the lock.
* **Nothing orphaned, nothing lost.** A failed multipart upload is aborted (with retries); its id is also kept
  in the queue row so the next attempt aborts it if the worker was killed first. Any failure leaves the table in
  place and the queue row ``failed`` with ``last_error``: the next run retries it.
* **Restore is the same streams in reverse**: checksum first, then ``COPY`` into a standalone table holding a
  CHECK constraint that matches the partition bounds (so ``ATTACH PARTITION`` skips its validation scan), indexes
  built before the attach, and the attach itself under ``lock_timeout`` with retries.

Key layout (Hive style, queryable in place by Athena/Spark)::

    <prefix>/<database>/<schema>/<table>/period=<label>/<partition>.{dump|parquet|csv.gz}
    <prefix>/<database>/<schema>/<table>/period=<label>/_<partition>.<ext>.manifest.json

The manifest starts with ``_`` because Hive, Athena and Spark skip files whose names start with ``_`` or ``.``:
the manifest sits beside its object without being read as data.

No Airflow imports here: the S3 client is any object with boto3's S3 client methods (:class:`S3Client`).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from tenacity import Retrying, stop_after_attempt, wait_exponential

from pg_partition.core import catalog, state
from pg_partition.core.catalog import QualifiedName, TableInfo
from pg_partition.core.errors import (
    InvalidInputError,
    PartitionError,
    PreflightError,
    StateError,
    VerificationError,
)
from pg_partition.core.execute import Executor, Progress
from pg_partition.core.names import Period, Range, derived_name, parse_bound_day
from pg_partition.core.partitions import (
    bounds_condition,
    check_constraint_name,
    column_kind,
    copy_grants,
    partition_column,
    per_partition_key,
)

log = logging.getLogger("pg_partition")

MiB = 1024 * 1024
S3_MIN_PART = 5 * MiB
S3_MAX_PARTS = 10_000
MANIFEST_VERSION = 1
FORMATS = ("pg_dump", "parquet", "csv")
MODES = ("stream", "rds")
EXTENSIONS = {"pg_dump": ".dump", "parquet": ".parquet", "csv": ".csv.gz", "rds_csv": ".csv"}
CONTENT_TYPES = {"pg_dump": "application/octet-stream", "parquet": "application/vnd.apache.parquet",
                 "csv": "application/gzip", "rds_csv": "text/csv"}
DONE = ("dropped", "kept", "restored")
RESTORE_SCHEMA = "pgpartition_restore"  # not "pg_...": PostgreSQL reserves that prefix
QUEUE = sql.Identifier(state.SCHEMA, "archive_queue")
DEFAULT_PREFIX = "pg-partition"
MARKER = "pg_partition restore of "


class S3Client(Protocol):
    """The subset of boto3's S3 client the engine uses (a boto3 ``client("s3")`` satisfies it).

    Taking a client rather than building one keeps credentials and the endpoint where the caller keeps them
    (an Airflow connection, an instance profile, a test server).
    """

    def create_multipart_upload(self, **kwargs: Any) -> Any: ...
    def upload_part(self, **kwargs: Any) -> Any: ...
    def complete_multipart_upload(self, **kwargs: Any) -> Any: ...
    def abort_multipart_upload(self, **kwargs: Any) -> Any: ...
    def list_multipart_uploads(self, **kwargs: Any) -> Any: ...
    def put_object(self, **kwargs: Any) -> Any: ...
    def get_object(self, **kwargs: Any) -> Any: ...
    def head_object(self, **kwargs: Any) -> Any: ...
    def list_objects_v2(self, **kwargs: Any) -> Any: ...


# --------------------------------------------------------------------------------------------------- policy


_SSE_ALIASES = {"aes256": "AES256", "sse-s3": "AES256", "s3": "AES256", "aws:kms": "aws:kms", "kms": "aws:kms",
                "sse-kms": "aws:kms"}


@dataclass(frozen=True)
class ArchivePolicy:
    """Where and how one table is archived. Built from layers: DAG defaults, then the queue row's ``policy``.

    ``sse``: ``AES256`` (SSE-S3) or ``aws:kms`` (SSE-KMS, with ``kms_key_id`` or the bucket's default key).
    ``mode``: ``stream`` (pg_dump/COPY through this worker) or ``rds`` (``aws_s3.query_export_to_s3`` run by
    the RDS/Aurora server itself: CSV only, no pg_dump).
    """

    bucket: str
    prefix: str = DEFAULT_PREFIX
    format: str = "pg_dump"
    drop: bool = True
    sse: str | None = None
    kms_key_id: str | None = None
    aws_conn_id: str | None = None
    storage_class: str | None = None
    compress: int | None = None
    part_size: int = 8 * MiB
    max_inflight: int = 2
    parquet_compression: str = "snappy"
    mode: str = "stream"
    region: str | None = None

    @classmethod
    def build(cls, *layers: Mapping[str, Any] | None) -> ArchivePolicy:
        """Merge layers (later wins, ``None`` values never override) and validate the result."""
        names = {f.name for f in fields(cls)}
        merged: dict[str, Any] = {}
        for layer in layers:
            for k, v in (layer or {}).items():
                if k not in names:
                    raise InvalidInputError(f"unknown archive policy field {k!r}",
                                            fix="use only: " + ", ".join(sorted(names)))
                if v is not None and v != "":
                    merged[k] = v
        if not merged.get("bucket"):
            raise InvalidInputError(
                "no S3 bucket for the archive",
                fix="set archive.bucket in the rotation config for this table, or the DAG's bucket param",
            )
        for key in ("drop",):
            if key in merged and not isinstance(merged[key], bool):
                merged[key] = str(merged[key]).strip().lower() in {"1", "true", "yes", "on", "y", "t"}
        for key in ("compress", "part_size", "max_inflight"):
            if key in merged:
                try:
                    merged[key] = int(merged[key])
                except (TypeError, ValueError):
                    raise InvalidInputError(f"archive policy {key}={merged[key]!r} is not an integer",
                                            fix=f"give {key} as a whole number") from None
        policy = cls(**merged)
        return policy.validated()

    def validated(self) -> ArchivePolicy:
        fmt = str(self.format).lower().replace("-", "_")
        fmt = {"dump": "pg_dump", "custom": "pg_dump", "csv_gzip": "csv", "csv.gz": "csv"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise InvalidInputError(f"unknown archive format {self.format!r}", fix="use pg_dump, parquet or csv")
        mode = str(self.mode).lower()
        if mode not in MODES:
            raise InvalidInputError(f"unknown archive mode {self.mode!r}", fix="use stream or rds")
        if mode == "rds" and fmt != "csv":
            raise InvalidInputError(
                f"mode=rds cannot write {fmt}: aws_s3.query_export_to_s3 writes COPY text/CSV only",
                fix="use format=csv with mode=rds, or mode=stream for pg_dump/parquet")
        sse = None
        if self.sse:
            sse = _SSE_ALIASES.get(str(self.sse).lower())
            if sse is None:
                raise InvalidInputError(f"unknown server-side encryption {self.sse!r}",
                                        fix="use AES256 (SSE-S3) or aws:kms (SSE-KMS)")
        if self.kms_key_id and sse != "aws:kms":
            raise InvalidInputError("kms_key_id is set but sse is not aws:kms",
                                    fix="set sse=aws:kms to encrypt with that KMS key, or remove kms_key_id")
        if self.part_size < S3_MIN_PART:
            raise InvalidInputError(f"part_size {self.part_size} is below S3's 5 MiB minimum",
                                    fix="use part_size >= 5242880")
        if self.compress is not None and not 0 <= self.compress <= 9:
            raise InvalidInputError(f"compress={self.compress} is out of range", fix="use 0..9")
        if self.max_inflight < 1:
            raise InvalidInputError("max_inflight must be >= 1", fix="use 1..4")
        return replace(self, format=fmt, mode=mode, sse=sse, prefix=str(self.prefix).strip("/"))

    def put_args(self) -> dict[str, Any]:
        """Encryption/storage arguments for CreateMultipartUpload and PutObject."""
        args: dict[str, Any] = {}
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        return args

    @property
    def object_format(self) -> str:
        return "rds_csv" if self.mode == "rds" else self.format

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --------------------------------------------------------------------------------------------------- pg tools


@dataclass(frozen=True)
class PgTool:
    """A PostgreSQL client program and its version (``pg_dump (PostgreSQL) 15.18`` -> major 15)."""

    path: str
    version: str
    major: int


_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def tool_version(path: str) -> PgTool:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise PreflightError(f"cannot run {path}: {exc}", fix="install the PostgreSQL client programs "
                             "(Debian: apt-get install postgresql-client) or pass the full path") from exc
    m = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or not m:
        raise PreflightError(f"{path} --version did not report a PostgreSQL version: {out.stdout or out.stderr!r}",
                             fix="pass the path of a real pg_dump/pg_restore")
    version = m.group(1) + (f".{m.group(2)}" if m.group(2) else "")
    return PgTool(path, version, int(m.group(1)))


def _candidates(name: str) -> list[str]:
    paths: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        paths.append(Path(os.environ["PG_BINDIR"]) / name)
    paths += sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    found = shutil.which(name)
    if found:
        paths.append(Path(found))
    out: list[str] = []
    for p in paths:
        if p.exists() and str(p) not in out:
            out.append(str(p))
    return out


def find_pg_tool(name: str, min_major: int, explicit: str | None = None, *, server: str = "") -> PgTool:
    """The ``pg_dump``/``pg_restore`` to use: ``explicit`` if given, else the newest installed one.

    Why the check: a pg_dump older than the server refuses to run ("server version mismatch") or, worse, a
    hand-patched one silently misses newer catalog features; a pg_restore older than the pg_dump that wrote an
    archive cannot read it. We check before anything is uploaded and say which version to install.
    """
    if explicit:
        tools = [tool_version(explicit)]
    else:
        tools = []
        for cand in _candidates(name):
            with contextlib.suppress(PreflightError):
                tools.append(tool_version(cand))
        if not tools:
            raise PreflightError(
                f"{name} was not found (looked in $PG_BINDIR, /usr/lib/postgresql/*/bin and PATH)",
                fix=f"install the PostgreSQL {min_major} client programs (Debian: apt-get install "
                f"postgresql-client-{min_major}) or pass the path of {name}")
    best = max(tools, key=lambda t: t.major)
    if best.major < min_major:
        what = server or f"PostgreSQL {min_major}"
        raise PreflightError(
            f"{name} {best.version} ({best.path}) is older than {what}: {name} must be at least the "
            f"server's major version ({min_major})",
            where=name,
            fix=f"install the PostgreSQL {min_major} (or newer) client programs (Debian: apt-get install "
            f"postgresql-client-{min_major}) and pass its path, e.g. /usr/lib/postgresql/{min_major}/bin/{name}, "
            "or set PG_BINDIR",
        )
    return best


def server_version(conn: psycopg.Connection[Any]) -> tuple[int, str]:
    """(major, full text) of the server, e.g. (15, '15.18 (Debian 15.18-0+deb12u1)')."""
    num = catalog.server_version_num(conn)
    text = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    return num // 10000, text


def check_pg_dump(conn: psycopg.Connection[Any], pg_dump: str | None = None) -> PgTool:
    major, text = server_version(conn)
    return find_pg_tool("pg_dump", major, pg_dump, server=f"the server (PostgreSQL {text})")


def pg_restore_for(dump_major: int, pg_restore: str | None = None, pg_dump: str | None = None) -> PgTool:
    """A pg_restore able to read archives written by pg_dump ``dump_major`` (prefers pg_dump's sibling)."""
    if pg_restore is None and pg_dump:
        sibling = Path(pg_dump).with_name("pg_restore")
        if sibling.exists():
            tool = tool_version(str(sibling))
            if tool.major >= dump_major:
                return tool
    return find_pg_tool("pg_restore", dump_major, pg_restore, server=f"the pg_dump {dump_major} that wrote it")


_LIBPQ_PORTABLE = {"host", "hostaddr", "port", "dbname", "user", "passfile", "connect_timeout", "options",
                   "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "service",
                   "target_session_attrs", "gssencmode", "krbsrvname", "channel_binding", "keepalives",
                   "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"}


def libpq_target(conn: psycopg.Connection[Any]) -> tuple[str, dict[str, str]]:
    """A conninfo for client programs reaching the same database, and an environment carrying the password.

    The password goes in ``PGPASSWORD`` rather than the command line, where ``ps`` would show it.
    """
    # Only options every libpq since PG 12 knows: psycopg's bundled (newer) libpq reports options such as
    # sslcertmode that an older pg_dump's libpq rejects as "invalid connection option".
    params = {k: v for k, v in conn.info.get_parameters().items() if k in _LIBPQ_PORTABLE}
    params["application_name"] = "pg_partition_archive"
    env = dict(os.environ)
    if conn.info.password:
        env["PGPASSWORD"] = conn.info.password
    return psycopg.conninfo.make_conninfo(**params), env


def dump_pattern(table: QualifiedName) -> str:
    """A pg_dump ``--table`` pattern that matches exactly this table (quotes make ``* ? .`` literal)."""
    def q(part: str) -> str:
        return '"' + part.replace('"', '""') + '"'

    return f"{q(table.schema)}.{q(table.name)}"


class _TailReader(threading.Thread):
    """Drains a child's stderr (so it can never block on a full pipe) and keeps the last bytes for errors."""

    def __init__(self, stream: IO[bytes], limit: int = 16_384) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.limit = limit
        self.data = b""

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read(65_536), b""):
            self.data = (self.data + chunk)[-self.limit:]

    def text(self) -> str:
        self.join(10)
        return self.data.decode("utf-8", "replace").strip()


def _grow_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe (F_SETPIPE_SZ): fewer wake-ups per GB; harmless where unsupported."""
    with contextlib.suppress(Exception):
        import fcntl

        fcntl.fcntl(fd, 1031, MiB)


# --------------------------------------------------------------------------------------------------- upload


@dataclass
class UploadResult:
    bucket: str
    key: str
    bytes: int
    sha256: str
    etag: str
    parts: int


class MultipartUpload:
    """A write-only stream into one S3 multipart upload, hashing as it goes. Aborted on any error.

    Memory: one part being filled plus at most ``max_inflight`` parts uploading in background threads. Parts
    grow (x2 every 1000 parts) so the 10,000-part limit is never hit whatever the object size. Use as a context
    manager; call :meth:`complete` before leaving it, or the upload is aborted.
    """

    def __init__(self, s3: S3Client, bucket: str, key: str, *, part_size: int = 8 * MiB, max_inflight: int = 2,
                 put_args: dict[str, Any] | None = None, content_type: str | None = None,
                 on_start: Callable[[str], None] | None = None, logger: logging.Logger | None = None) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.base_part_size = max(part_size, S3_MIN_PART)
        self.max_inflight = max_inflight
        self.put_args = dict(put_args or {})
        if content_type:
            self.put_args["ContentType"] = content_type
        self.on_start = on_start
        self.logger = logger or log
        self.upload_id: str | None = None
        self.sha = hashlib.sha256()
        self.size = 0
        self._chunks: list[bytes] = []
        self._pending = 0
        self._parts: list[dict[str, Any]] = []
        self._futures: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._next = 1
        self._done = False
        self.progress = Progress(f"upload s3://{bucket}/{key}", None, unit="bytes", logger=self.logger)

    # context manager -------------------------------------------------------------------------------
    def __enter__(self) -> MultipartUpload:
        resp = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.put_args)
        self.upload_id = str(resp["UploadId"])
        self.logger.info("started multipart upload of s3://%s/%s (upload id %s)", self.bucket, self.key,
                         self.upload_id)
        if self.on_start:
            self.on_start(self.upload_id)
        self._pool = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="s3-part")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if not self._done:
                if exc is None:
                    self.abort()  # left without complete(): never leave the upload open
                else:
                    try:
                        self.abort()
                    except Exception as abort_exc:  # keep the original error; the next attempt aborts it
                        self.logger.error("could not abort multipart upload %s of s3://%s/%s (%s); the next "
                                          "attempt aborts it", self.upload_id, self.bucket, self.key, abort_exc)
        finally:
            if self._pool:
                self._pool.shutdown(wait=True, cancel_futures=True)

    # file-like -------------------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """No-op: writers (pyarrow) close their sink; the upload is finished only by :meth:`complete`."""

    @property
    def closed(self) -> bool:
        return self._done

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if not n:
            return 0
        self.sha.update(data)
        self.size += n
        # Keep the chunks and join them once per part: one allocation of about part_size per part, instead of a
        # growing buffer plus slice copies. Parts need not be equal (only >= 5 MiB except the last).
        self._chunks.append(data if isinstance(data, bytes) else bytes(data))
        self._pending += n
        if self._pending >= self._part_size():
            self._submit(self._take())
        self.progress.add(n)
        return n

    def _take(self) -> bytes:
        part = b"".join(self._chunks)
        self._chunks.clear()
        self._pending = 0
        return part

    def _part_size(self) -> int:
        return int(self.base_part_size * 2 ** ((self._next - 1) // 1000))

    def _submit(self, body: bytes) -> None:
        assert self._pool is not None and self.upload_id is not None, "use MultipartUpload as a context manager"
        if self._next > S3_MAX_PARTS:
            raise PartitionError("the object needs more than 10,000 multipart parts", fix="raise part_size")
        self._reap(block=len(self._futures) >= self.max_inflight)
        number = self._next
        self._next += 1
        self._futures.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        resp = self.s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number,
                                   Body=body)
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _reap(self, *, block: bool) -> None:
        """Collect finished parts (re-raising the first failure); with ``block`` wait for at least one."""
        if not self._futures:
            return
        if block:
            wait(self._futures, return_when=FIRST_COMPLETED)
        still: list[Future[dict[str, Any]]] = []
        for fut in self._futures:
            if fut.done():
                self._parts.append(fut.result())
            else:
                still.append(fut)
        self._futures = still

    def complete(self) -> UploadResult:
        """Upload the last part, wait for all, complete the upload. Only call once the source ended cleanly."""
        if self._pending or self._next == 1:
            self._submit(self._take())
        while self._futures:
            self._reap(block=True)
        parts = sorted(self._parts, key=lambda p: int(p["PartNumber"]))
        resp = self.s3.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                 MultipartUpload={"Parts": parts})
        self._done = True
        self.progress.add(0, force=True)
        etag = str(resp.get("ETag", "")).strip('"')
        return UploadResult(self.bucket, self.key, self.size, self.sha.hexdigest(), etag, len(parts))

    def abort(self) -> None:
        """Abort the upload (S3 would otherwise bill the parts forever). Retried; raises if S3 stays unreachable."""
        self._done = True
        for fut in self._futures:
            fut.cancel()
        with contextlib.suppress(Exception):
            wait(self._futures, timeout=120)
        if self.upload_id is None:
            return
        abort_upload(self.s3, self.bucket, self.key, self.upload_id, logger=self.logger)


def abort_upload(s3: S3Client, bucket: str, key: str, upload_id: str, *, attempts: int = 3,
                 logger: logging.Logger | None = None) -> None:
    """Abort one multipart upload, retrying; an upload or bucket that no longer exists counts as aborted."""
    logger = logger or log
    for attempt in Retrying(stop=stop_after_attempt(attempts), wait=wait_exponential(multiplier=0.5, max=5),
                            reraise=True):
        with attempt:
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception as exc:
                if _s3_code(exc) in {"NoSuchUpload", "NoSuchBucket", "404"}:
                    logger.info("multipart upload %s of s3://%s/%s is already gone", upload_id, bucket, key)
                    return
                logger.warning("aborting multipart upload %s of s3://%s/%s failed: %s", upload_id, bucket, key, exc)
                raise
    logger.info("aborted multipart upload %s of s3://%s/%s", upload_id, bucket, key)


def abort_stale_uploads(s3: S3Client, bucket: str, key: str, *, logger: logging.Logger | None = None) -> list[str]:
    """Abort every open multipart upload of ``key`` (left by a worker that was killed mid-upload)."""
    resp = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)
    aborted = []
    for up in resp.get("Uploads", []) or []:
        if up.get("Key") == key:
            abort_upload(s3, bucket, key, str(up["UploadId"]), logger=logger)
            aborted.append(str(up["UploadId"]))
    return aborted


def _s3_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


# --------------------------------------------------------------------------------------------------- keys


def _segment(text: str) -> str:
    """One key segment: PostgreSQL names may contain '/', which S3 would read as a folder."""
    return text.replace("%", "%25").replace("/", "%2F")


def object_key(policy: ArchivePolicy, database: str, schema: str, table: str, label: str, name: str) -> str:
    parts = [policy.prefix] if policy.prefix else []
    parts += [_segment(database), _segment(schema), _segment(table), f"period={_segment(label)}",
              _segment(name) + EXTENSIONS[policy.object_format]]
    return "/".join(parts)


def manifest_key_for(key: str) -> str:
    folder, _, base = key.rpartition("/")
    return f"{folder}/_{base}.manifest.json" if folder else f"_{base}.manifest.json"


# --------------------------------------------------------------------------------------------------- snapshot


@contextlib.contextmanager
def _snapshot(conn: psycopg.Connection[Any], table: QualifiedName) -> Iterator[tuple[str, int]]:
    """A read-only REPEATABLE READ transaction: its exported snapshot id and the table's row count in it.

    pg_dump ``--snapshot`` and our own COPY read that very snapshot, so the count is the dump's count.
    """
    if not conn.autocommit:
        raise InvalidInputError("the archive engine needs an autocommit connection",
                                fix="open it with autocommit=True (PartitionHook.open() does)")
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        conn.execute("SET LOCAL IntervalStyle = 'postgres'")
        conn.execute("SET LOCAL extra_float_digits = 3")
        row = conn.execute(sql.SQL("SELECT pg_export_snapshot(), (SELECT count(*) FROM {})").format(table.ident)
                           ).fetchone()
        assert row is not None
        yield str(row[0]), int(row[1])


# --------------------------------------------------------------------------------------------------- exporters


@dataclass(frozen=True)
class ExportColumn:
    """One exported column: how it is selected, read back by psycopg, and typed in Arrow."""

    name: str
    pg_type: str  # format_type(), e.g. 'numeric(12,2)', 'timestamp with time zone'
    typname: str
    as_text: bool  # exported as its PostgreSQL text form (types with no faithful Arrow equivalent)
    not_null: bool
    precision: int | None = None
    scale: int | None = None


_ARROW_NATIVE = {"int2", "int4", "int8", "float4", "float8", "bool", "text", "varchar", "bpchar", "date",
                 "timestamp", "timestamptz", "time", "bytea", "numeric"}
def export_columns(conn: psycopg.Connection[Any], table: QualifiedName) -> list[ExportColumn]:
    """Columns that an export carries (generated columns are left out: restore recomputes them)."""
    oid = catalog.table_oid(conn, table)
    if oid is None:
        raise InvalidInputError(f"table {table} does not exist", fix="check the archive queue row / table name")
    rows = conn.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, a.atttypmod, a.attnotnull,
                  t.typtype
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
           ORDER BY a.attnum""",
        (oid,),
    ).fetchall()
    out = []
    for name, pg_type, typname, typmod, not_null, typtype in rows:
        precision = scale = None
        native = typtype == "b" and typname in _ARROW_NATIVE
        if typname == "numeric":
            if typmod >= 4 and ((typmod - 4) >> 16) & 0xFFFF <= 38:
                precision, scale = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
            else:
                native = False  # unconstrained or > 38 digits: no lossless Arrow decimal
        out.append(ExportColumn(name, pg_type, typname, not native, not_null, precision, scale))
    return out


def arrow_schema(columns: list[ExportColumn]) -> Any:
    import pyarrow as pa

    def arrow_type(c: ExportColumn) -> Any:
        if c.as_text:
            return pa.string()
        return {
            "int2": pa.int16(), "int4": pa.int32(), "int8": pa.int64(), "float4": pa.float32(),
            "float8": pa.float64(), "bool": pa.bool_(), "text": pa.string(), "varchar": pa.string(),
            "bpchar": pa.string(), "date": pa.date32(), "timestamp": pa.timestamp("us"),
            "timestamptz": pa.timestamp("us", tz="UTC"), "time": pa.time64("us"), "bytea": pa.binary(),
        }.get(c.typname) or pa.decimal128(c.precision or 38, c.scale or 0)

    meta = {"pg_partition.columns": json.dumps([{"name": c.name, "type": c.pg_type, "as_text": c.as_text}
                                                 for c in columns])}
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=not c.not_null) for c in columns], metadata=meta)


def _select_list(columns: list[ExportColumn], *, text_casts: bool) -> sql.Composable:
    items = [sql.SQL("{}::text").format(sql.Identifier(c.name)) if (c.as_text and text_casts)
             else sql.Identifier(c.name) for c in columns]
    return sql.SQL(", ").join(items)


def write_pg_dump(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload, pg_dump: PgTool, *,
                  snapshot: str, compress: int | None = None, lock_timeout: str = "2s",
                  chunk: int = MiB) -> None:
    """Run pg_dump into ``sink`` chunk by chunk. Raises (and kills pg_dump) on any failure."""
    conninfo, env = libpq_target(conn)
    cmd = [pg_dump.path, "--format=custom", f"--table={dump_pattern(table)}", "--strict-names",
           f"--snapshot={snapshot}", f"--lock-wait-timeout={lock_timeout}", "--no-password",
           f"--dbname={conninfo}"]
    if compress is not None:
        cmd.append(f"--compress={compress}")
    log.info("running: %s", " ".join(c if not c.startswith("--dbname=") else "--dbname=<conninfo>" for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    assert proc.stdout is not None and proc.stderr is not None
    _grow_pipe(proc.stdout.fileno())
    err = _TailReader(proc.stderr)
    err.start()
    try:
        read = proc.stdout.read
        while data := read(chunk):
            sink.write(data)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if rc != 0:
        raise PartitionError(f"pg_dump of {table} failed (exit {rc}): {err.text()}", where=str(table),
                             fix="see the pg_dump message above; the table was left in place and will be retried")


def _csv_read_plan(columns: list[ExportColumn]) -> tuple[sql.Composable, dict[str, Any]]:
    """How each column travels from PostgreSQL to Arrow's C++ CSV parser, and the type it is parsed as.

    Text CSV is the one stream both sides agree on exactly: NULL is an unquoted empty field and '' a quoted one,
    numerics keep every digit, floats print shortest-exact. Where Arrow's parser needs help the server reshapes
    the value: timestamptz AT TIME ZONE 'UTC' (then tagged UTC), time as microseconds, bytea as hex.
    """
    import pyarrow as pa

    items: list[sql.Composable] = []
    types: dict[str, Any] = {}
    target = arrow_schema(columns)
    for c in columns:
        ident = sql.Identifier(c.name)
        if c.as_text:
            items.append(sql.SQL("{}::text").format(ident))
            types[c.name] = pa.string()
        elif c.typname == "timestamptz":
            items.append(sql.SQL("({} AT TIME ZONE 'UTC')").format(ident))
            types[c.name] = pa.timestamp("us")
        elif c.typname == "time":
            items.append(sql.SQL("(extract(epoch FROM {}) * 1000000)::int8").format(ident))
            types[c.name] = pa.int64()
        elif c.typname == "bytea":
            items.append(sql.SQL("encode({}, 'hex')").format(ident))
            types[c.name] = pa.string()
        else:
            items.append(ident)
            types[c.name] = target.field(c.name).type
    return sql.SQL(", ").join(items), types


def _to_target(batch: Any, schema: Any) -> Any:
    """A parsed CSV batch -> the archive's Arrow schema (UTC tag, time64, binary from hex, nullability)."""
    import pyarrow as pa

    arrays = []
    for i, f in enumerate(schema):
        col = batch.column(i)
        if pa.types.is_binary(f.type):
            col = pa.array([None if v is None else bytes.fromhex(v) for v in col.to_pylist()], pa.binary())
        elif not col.type.equals(f.type):
            col = col.cast(f.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@contextlib.contextmanager
def _arrow_pool() -> Iterator[Any]:
    """Arrow allocations from jemalloc with immediate decay for the export, when this pyarrow has jemalloc.

    Why: the default allocators keep freed blocks cached, so a long export's RSS creeps far above what it
    actually holds (measured: ~200-340 MB vs ~170 MB for the same export); the previous default is restored.
    """
    import pyarrow as pa

    previous = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
        pa.jemalloc_set_decay_ms(0)
    except (NotImplementedError, pa.ArrowNotImplementedError):
        yield previous
        return
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(previous)


def write_parquet(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                  columns: list[ExportColumn], *, compression: str = "snappy",
                  block_size: int = MiB, group_bytes: int = 8 * MiB) -> int:
    """Stream the table as Parquet into ``sink``; returns rows written.

    ``COPY ... TO STDOUT (FORMAT csv)`` is cut into blocks of about ``block_size`` whole rows, each parsed by
    Arrow's C++ CSV parser (no Python object per value), converted to the archive schema and written as row
    groups of about ``group_bytes`` of Arrow data. Must run inside :func:`_snapshot`'s transaction.
    """
    with _arrow_pool():
        return _write_parquet(conn, table, sink, columns, compression=compression, block_size=block_size,
                              group_bytes=group_bytes)


def _write_parquet(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                   columns: list[ExportColumn], *, compression: str, block_size: int, group_bytes: int) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = arrow_schema(columns)
    select, read_types = _csv_read_plan(columns)
    query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(select, table.ident)
    read_options = pacsv.ReadOptions(column_names=[c.name for c in columns], use_threads=False)
    parse_options = pacsv.ParseOptions(newlines_in_values=True)
    convert_options = pacsv.ConvertOptions(column_types=read_types, true_values=["t"], false_values=["f"],
                                           null_values=[""], strings_can_be_null=True,
                                           quoted_strings_can_be_null=False)
    total = 0
    progress = Progress(f"parquet export of {table}", None, logger=log)
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression=compression,
                              write_statistics=True, use_dictionary=True, version="2.6")
    pending: list[Any] = []
    pending_bytes = 0

    def parse(rows: list[bytes]) -> None:
        nonlocal pending_bytes, total
        block = pacsv.read_csv(pa.py_buffer(b"".join(rows)), read_options=read_options,
                               parse_options=parse_options, convert_options=convert_options)
        for batch in block.to_batches():
            pending.append(_to_target(batch, schema))
            pending_bytes += batch.nbytes
        if pending_bytes >= group_bytes:
            written = _write_group(writer, pending)
            total += written
            progress.add(written)
            pending.clear()
            pending_bytes = 0

    try:
        # PostgreSQL sends each row of COPY TO as its own CopyData message, so every chunk psycopg yields is
        # whole rows (quoted newlines included): blocks can be cut between any two chunks and parsed on their
        # own, in this thread, with no Python object per value.
        with conn.cursor() as cur, cur.copy(query) as copy:
            rows: list[bytes] = []
            size = 0
            for chunk in copy:
                data = bytes(chunk)
                rows.append(data)
                size += len(data)
                if size >= block_size:
                    parse(rows)
                    rows, size = [], 0
            if rows:
                parse(rows)
        if pending:
            written = _write_group(writer, pending)
            total += written
            progress.add(written)
    finally:
        writer.close()
    progress.add(0, force=True)
    return total


def _write_group(writer: Any, batches: list[Any]) -> int:
    import pyarrow as pa

    tbl = pa.Table.from_batches(batches)
    writer.write_table(tbl, row_group_size=max(tbl.num_rows, 1))
    return int(tbl.num_rows)


def write_csv_gzip(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                   columns: list[ExportColumn]) -> int:
    """Stream ``COPY ... TO STDOUT (FORMAT csv, HEADER)`` gzip-compressed into ``sink``. Returns the row count."""
    query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv, HEADER true)").format(
        _select_list(columns, text_casts=False), table.ident)
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    with conn.cursor() as cur:
        with cur.copy(query) as copy:
            for data in copy:
                out = gz.compress(data)
                if out:
                    sink.write(out)
        sink.write(gz.flush())
        return int(cur.rowcount)


# --------------------------------------------------------------------------------------------------- manifest


def table_ddl(conn: psycopg.Connection[Any], info: TableInfo) -> str:
    """Readable DDL of the archived table for the manifest (columns, checks, indexes), from the catalog."""
    lines = []
    for c in info.columns:
        col = sql.SQL("    {} ").format(sql.Identifier(c.name)).as_string(conn) + c.type
        if c.collation:
            col += " COLLATE " + sql.Identifier(c.collation).as_string(conn)
        if c.generated == "s" and c.default:
            col += f" GENERATED ALWAYS AS ({c.default}) STORED"
        elif c.identity:
            col += " GENERATED " + ("ALWAYS" if c.identity == "a" else "BY DEFAULT") + " AS IDENTITY"
        elif c.default:
            col += " DEFAULT " + c.default
        if c.not_null:
            col += " NOT NULL"
        lines.append(col)
    for name, definition in info.checks:
        lines.append(sql.SQL("    CONSTRAINT {} ").format(sql.Identifier(name)).as_string(conn) + definition)
    text = f"CREATE TABLE {info.name.ident.as_string(conn)} (\n" + ",\n".join(lines) + "\n);\n"
    for idx in info.indexes:
        text += idx.definition + ";\n"
    return text


def put_manifest(s3: S3Client, manifest: dict[str, Any], policy: ArchivePolicy) -> None:
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    s3.put_object(Bucket=manifest["bucket"], Key=manifest["manifest_key"], Body=body,
                  ContentType="application/json", **policy.put_args())


def get_manifest(s3: S3Client, bucket: str, key: str) -> dict[str, Any]:
    """Read a manifest (``key`` may be the manifest's key or its object's key)."""
    mkey = key if key.endswith(".manifest.json") else manifest_key_for(key)
    try:
        body = s3.get_object(Bucket=bucket, Key=mkey)["Body"].read()
    except Exception as exc:
        raise InvalidInputError(f"cannot read the archive manifest s3://{bucket}/{mkey}: {exc}",
                                fix="check the bucket and key (list the archive prefix with find_archives)") from exc
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise VerificationError(f"the manifest s3://{bucket}/{mkey} is not valid JSON",
                                fix="the manifest was damaged; re-archive the table if it still exists") from exc
    missing = {"format", "key", "bytes", "sha256", "rows", "table"} - set(manifest)
    if missing or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise VerificationError(f"s3://{bucket}/{mkey} is not a pg-partition manifest (missing {sorted(missing)})",
                                fix="point at a *.manifest.json written by pg-partition")
    return dict(manifest)


# --------------------------------------------------------------------------------------------------- archive


@dataclass(frozen=True)
class ArchiveTarget:
    """What is being archived and where it belongs in the key layout."""

    table: QualifiedName  # the table to dump (a detached partition or a retired table)
    parent: QualifiedName | None = None  # the logical table it belonged to (names the key folder)
    range_from: str | None = None
    range_to: str | None = None
    period: str | None = None
    label: str | None = None

    @property
    def logical(self) -> QualifiedName:
        return self.parent or self.table

    def period_label(self) -> str:
        if self.label:
            return self.label
        if self.range_from and self.range_to and self.period:
            start = parse_bound_day(self.range_from)
            end = parse_bound_day(self.range_to)
            return Range(start, end).label(Period.parse(self.period))
        if self.range_from:
            return parse_bound_day(self.range_from).isoformat()
        return "all"


def plan_keys(conn: psycopg.Connection[Any], target: ArchiveTarget, policy: ArchivePolicy) -> tuple[str, str]:
    db = str(conn.info.dbname)
    key = object_key(policy, db, target.logical.schema, target.logical.name, target.period_label(),
                     target.table.name)
    return key, manifest_key_for(key)


def archive_table(
    ex: Executor,
    s3: S3Client,
    target: ArchiveTarget,
    policy: ArchivePolicy,
    *,
    pg_dump: str | None = None,
    lock_timeout: str = "2s",
    on_upload_started: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Stream one table to S3 in ``policy.format`` and write its manifest; returns the manifest.

    Nothing is changed in the database. In dry-run mode only the plan is logged and returned.
    """
    conn = ex.conn
    table = target.table
    info = catalog.describe(conn, table)
    if info.is_partitioned:
        raise PreflightError(f"{table} is a partitioned table; archive its partitions one by one",
                             fix="archive the detached partitions (rotation queues them)")
    key, mkey = plan_keys(conn, target, policy)
    _, server_text = server_version(conn)
    tool = check_pg_dump(conn, pg_dump) if policy.object_format == "pg_dump" else None
    columns = export_columns(conn, table)
    bounds_column = None
    if target.parent is not None and catalog.exists(conn, target.parent):
        with contextlib.suppress(PartitionError):
            bounds_column = partition_column(catalog.describe(conn, target.parent))
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format": policy.object_format,
        "bucket": policy.bucket,
        "key": key,
        "manifest_key": mkey,
        "database": str(conn.info.dbname),
        "table": {"schema": table.schema, "name": table.name},
        "parent": None if target.parent is None else {"schema": target.parent.schema, "name": target.parent.name},
        "bounds": {"column": bounds_column, "from": target.range_from, "to": target.range_to,
                   "period": target.period, "label": target.period_label()},
        "columns": [{"name": c.name, "type": c.pg_type, "not_null": c.not_null, "as_text": c.as_text}
                    for c in columns],
        "ddl": table_ddl(conn, info),
        "server_version": server_text,
        "server_version_num": catalog.server_version_num(conn),
        "pg_dump_version": tool.version if tool else None,
        "pg_dump_major": tool.major if tool else None,
        "sse": {"algorithm": policy.sse, "kms_key_id": policy.kms_key_id} if policy.sse else None,
        "storage_class": policy.storage_class,
        "table_bytes": info.sizes.total,
    }
    where = f"s3://{policy.bucket}/{key}"
    if ex.dry_run:
        what = {"pg_dump": f"{tool.path if tool else 'pg_dump'} --format=custom --table={dump_pattern(table)}",
                "parquet": "COPY (SELECT ...) TO STDOUT (FORMAT csv) -> Arrow -> Parquet",
                "csv": "COPY (SELECT ...) TO STDOUT (FORMAT csv, HEADER) -> gzip",
                "rds_csv": "aws_s3.query_export_to_s3 (server side)"}[policy.object_format]
        ex.logger.info("[dry run] would stream %s to %s (manifest %s)", what, where, mkey)
        return manifest | {"dry_run": True}
    if policy.mode == "rds":
        return _archive_rds(ex, s3, target, policy, manifest)

    def started(upload_id: str) -> None:
        if on_upload_started:
            on_upload_started(key, upload_id)

    ex.logger.info("archiving %s (%s, about %s rows, %s bytes on disk) to %s", table, policy.format,
                   f"{info.row_estimate:,}", f"{info.sizes.total:,}", where)
    # pg_dump output can outrun one upload at a time; Parquet/CSV output is slower than S3, so one part in
    # flight keeps their memory (Arrow buffers already) lower at no cost in speed.
    inflight = policy.max_inflight if policy.format == "pg_dump" else 1
    with MultipartUpload(s3, policy.bucket, key, part_size=policy.part_size, max_inflight=inflight,
                         put_args=policy.put_args(), content_type=CONTENT_TYPES[policy.object_format],
                         on_start=started, logger=ex.logger) as sink, _snapshot(conn, table) as (snap, rows):
        if policy.format == "pg_dump":
            assert tool is not None
            write_pg_dump(conn, table, sink, tool, snapshot=snap, compress=policy.compress,
                          lock_timeout=lock_timeout)
        elif policy.format == "parquet":
            written = write_parquet(conn, table, sink, columns, compression=policy.parquet_compression)
            if written != rows:
                raise VerificationError(f"Parquet export wrote {written} rows but the snapshot has {rows}",
                                        where=str(table))
        else:
            written = write_csv_gzip(conn, table, sink, columns)
            if written != rows:
                raise VerificationError(f"CSV export wrote {written} rows but the snapshot has {rows}",
                                        where=str(table))
        result = sink.complete()
    manifest.update(rows=rows, bytes=result.bytes, sha256=result.sha256, etag=result.etag, parts=result.parts,
                    created_at=datetime.now(timezone.utc).isoformat())
    put_manifest(s3, manifest, policy)
    ex.logger.info("archived %s: %s rows, %s bytes, sha256 %s -> %s", table, f"{rows:,}", f"{result.bytes:,}",
                   result.sha256, where)
    return manifest


# --------------------------------------------------------------------------------------------------- RDS mode


def rds_export_sql(table: QualifiedName, bucket: str, key: str, region: str, *, columns: list[str] | None = None,
                   kms_key_id: str | None = None) -> sql.Composed:
    """``aws_s3.query_export_to_s3`` for a server-side CSV export on RDS/Aurora PostgreSQL.

    The server itself writes to S3 (the instance role needs s3:PutObject), so no bytes pass through the worker.
    It writes uncompressed CSV; objects above 6 GB are split by RDS into ``<key>_part2``, ``_part3``, ...
    Runs inside the same exported snapshot as our row count (the caller's REPEATABLE READ transaction).
    """
    cols = sql.SQL(", ").join(map(sql.Identifier, columns)) if columns else sql.SQL("*")
    inner = sql.SQL("SELECT {} FROM {}").format(cols, table.ident)
    args = [
        sql.SQL("aws_commons.create_s3_uri({}, {}, {})").format(sql.Literal(bucket), sql.Literal(key),
                                                                sql.Literal(region)),
        sql.SQL("options := {}").format(sql.Literal("format csv, header true")),
    ]
    if kms_key_id:
        args.append(sql.SQL("kms_key := {}").format(sql.Literal(kms_key_id)))
    # The query argument is a text literal; psycopg's Literal escapes it, so names cannot break out.
    return sql.SQL("SELECT rows_uploaded, files_uploaded, bytes_uploaded FROM aws_s3.query_export_to_s3({}, {})"
                   ).format(sql.Literal(inner.as_string()), sql.SQL(", ").join(args))


def _archive_rds(ex: Executor, s3: S3Client, target: ArchiveTarget, policy: ArchivePolicy,
                 manifest: dict[str, Any]) -> dict[str, Any]:
    """Server-side export (RDS/Aurora), then read the object back once to record its size and sha256.

    Not runnable outside RDS (the aws_s3 extension only exists there); covered here by tests of the SQL only.
    """
    region = policy.region or "us-east-1"
    cols = [c["name"] for c in manifest["columns"]]
    stmt = rds_export_sql(target.table, policy.bucket, manifest["key"], region, columns=cols,
                          kms_key_id=policy.kms_key_id)
    with _snapshot(ex.conn, target.table) as (_, rows):
        cur = ex.run(stmt)
        assert cur is not None
        uploaded, files, nbytes = cur.fetchone() or (0, 0, 0)
    if int(uploaded) != rows or int(files) != 1:
        raise VerificationError(
            f"aws_s3.query_export_to_s3 reported {uploaded} rows in {files} file(s); expected {rows} in 1",
            where=str(target.table), fix="objects above 6 GB are split by RDS; use mode=stream for those")
    sha = hashlib.sha256()
    size = 0
    for chunk in _s3_chunks(s3, policy.bucket, manifest["key"]):
        sha.update(chunk)
        size += len(chunk)
    head = s3.head_object(Bucket=policy.bucket, Key=manifest["key"])
    manifest.update(rows=rows, bytes=size, sha256=sha.hexdigest(), etag=str(head.get("ETag", "")).strip('"'),
                    parts=None, created_at=datetime.now(timezone.utc).isoformat(), rds_bytes_uploaded=nbytes)
    put_manifest(s3, manifest, policy)
    return manifest


# --------------------------------------------------------------------------------------------------- reading back


def _s3_chunks(s3: S3Client, bucket: str, key: str, *, chunk: int = MiB, if_match: str | None = None
               ) -> Iterator[bytes]:
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if if_match:
        args["IfMatch"] = f'"{if_match}"' if not if_match.startswith('"') else if_match
    body = s3.get_object(**args)["Body"]
    try:
        while data := body.read(chunk):
            yield data
    finally:
        with contextlib.suppress(Exception):
            body.close()


class _Hashing:
    """Pass-through of chunks that hashes and counts them."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for c in self.chunks:
            self.sha.update(c)
            self.size += len(c)
            yield c


class _IterReader(io.RawIOBase):
    """A readable raw stream over an iterator of byte chunks (for gzip/csv readers)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class S3RangeReader(io.RawIOBase):
    """A seekable reader over an S3 object through ranged GETs (pyarrow reads Parquet footers and row groups).

    Every GET carries ``IfMatch`` with the ETag checked at verification, so an object replaced between the
    checksum and the restore is refused rather than half-read.
    """

    def __init__(self, s3: S3Client, bucket: str, key: str, size: int, etag: str | None, block: int = 8 * MiB):
        self.s3, self.bucket, self.key, self.size, self.etag, self.block = s3, bucket, key, size, etag, block
        self.pos = 0
        self._cache_start = -1
        self._cache = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        if self.pos >= self.size:
            return 0
        want = min(len(b), self.size - self.pos)
        out = 0
        while out < want:
            if not (self._cache_start <= self.pos < self._cache_start + len(self._cache)):
                start = self.pos
                end = min(self.size, start + max(self.block, want - out)) - 1
                args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={start}-{end}"}
                if self.etag:
                    args["IfMatch"] = f'"{self.etag}"'
                self._cache = self.s3.get_object(**args)["Body"].read()
                self._cache_start = start
                if not self._cache:
                    break
            offset = self.pos - self._cache_start
            n = min(want - out, len(self._cache) - offset)
            b[out:out + n] = self._cache[offset:offset + n]
            out += n
            self.pos += n
        return out


def _feed(proc_stdins: list[tuple[IO[bytes], bool]], chunks: Iterable[bytes], errors: list[BaseException]) -> None:
    """Write every chunk to each stdin; optional ones may close early (``pg_restore --list`` stops after the TOC)."""
    live = list(proc_stdins)
    try:
        for chunk in chunks:
            for item in list(live):
                pipe, required = item
                try:
                    pipe.write(chunk)
                except (BrokenPipeError, ValueError):
                    live.remove(item)
                    if required:
                        raise
            if not any(req for _, req in live):
                break
        # drain the source even if every reader stopped, so the hash covers the whole object
        for _ in chunks:
            pass
    except BaseException as exc:
        errors.append(exc)
    finally:
        for pipe, _ in proc_stdins:
            with contextlib.suppress(Exception):
                pipe.close()


@dataclass
class CopyStream:
    """The COPY text data inside a custom-format dump, decoded by ``pg_restore --data-only --file=-``."""

    header: str = ""
    columns: list[str] = field(default_factory=list)
    rows: int = 0


_COPY_RE = re.compile(r"^COPY (.+?) \((.*)\) FROM stdin;\n?$")


def parse_ident_list(text: str) -> list[str]:
    """``id, "Created At", x`` -> ['id', 'Created At', 'x'] (pg_dump quotes names only when needed)."""
    return [p for p in catalog.split_quoted(text, ",") if p]


@contextlib.contextmanager
def dump_copy_data(chunks: Iterable[bytes], pg_restore: PgTool, *, list_toc: bool = False
                   ) -> Iterator[tuple[CopyStream, Iterator[bytes], list[str]]]:
    """Stream a custom-format dump through pg_restore and yield its single table's COPY data in batches.

    Yields ``(info, data, toc)``: ``data`` yields COPY text bytes (whole lines, about 1 MiB per batch) and
    fills ``info.columns``/``info.rows``; ``toc`` is filled with ``pg_restore --list`` lines when ``list_toc``.
    Memory stays bounded: both pg_restore processes read from pipes fed chunk by chunk.
    """
    restore = subprocess.Popen([pg_restore.path, "--data-only", "--file=-"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = [restore]
    lister = None
    if list_toc:
        lister = subprocess.Popen([pg_restore.path, "--list"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        procs.append(lister)
    assert restore.stdin and restore.stdout and restore.stderr
    errs = [_TailReader(p.stderr) for p in procs if p.stderr]
    for e in errs:
        e.start()
    toc: list[str] = []
    toc_reader = None
    if lister is not None:
        assert lister.stdout is not None
        lister_out = lister.stdout

        def read_toc() -> None:
            toc.extend(line.decode("utf-8", "replace").rstrip("\n") for line in lister_out)

        toc_reader = threading.Thread(target=read_toc, daemon=True)
        toc_reader.start()
    feed_errors: list[BaseException] = []
    stdins: list[tuple[IO[bytes], bool]] = [(restore.stdin, True)]
    if lister is not None and lister.stdin is not None:
        stdins.append((lister.stdin, False))
    feeder = threading.Thread(target=_feed, args=(stdins, chunks, feed_errors), daemon=True)
    feeder.start()
    info = CopyStream()
    out = restore.stdout

    def data() -> Iterator[bytes]:
        batch: list[bytes] = []
        size = 0
        state_ = "before"
        for line in out:
            if state_ == "before":
                if line.startswith(b"COPY "):
                    text = line.decode()
                    m = _COPY_RE.match(text)
                    if not m:
                        raise VerificationError(f"unexpected COPY header in the dump: {text.strip()!r}")
                    info.header = text.strip()
                    info.columns = parse_ident_list(m.group(2))
                    state_ = "data"
                continue
            if state_ == "data":
                if line == b"\\.\n":
                    state_ = "after"
                    continue
                info.rows += 1
                batch.append(line)
                size += len(line)
                if size >= MiB:
                    yield b"".join(batch)
                    batch, size = [], 0
                continue
            if line.startswith(b"COPY "):
                raise VerificationError("the dump holds data for more than one table",
                                        fix="pg-partition archives hold exactly one table")
        if batch:
            yield b"".join(batch)
        if state_ == "before":
            raise VerificationError("the dump holds no table data (no COPY section)",
                                    fix="the archive is not a pg-partition table dump")
        if state_ == "data":
            raise VerificationError("the dump's table data is truncated (no end-of-data marker)")

    try:
        yield info, data(), toc
        # consume whatever is left so pg_restore can exit
        for _ in out:
            pass
        feeder.join()
        rcs = [p.wait() for p in procs]
        if toc_reader:
            toc_reader.join(30)
        if feed_errors:
            raise feed_errors[0]
        if rcs[0] != 0:
            raise VerificationError(f"pg_restore could not read the dump (exit {rcs[0]}): {errs[0].text()}",
                                    fix="the archive is damaged or was written by a newer pg_dump")
        if lister is not None and rcs[1] != 0 and not toc:
            raise VerificationError(f"pg_restore --list could not read the dump: {errs[1].text()}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        feeder.join(60)  # it stops at its next write (broken pipe); then the caller may read on
        for p in procs:
            for s in (p.stdout, p.stdin):
                if s:
                    with contextlib.suppress(Exception):
                        s.close()


# --------------------------------------------------------------------------------------------------- verify


def verify_archive(conn: psycopg.Connection[Any] | None, s3: S3Client, manifest: dict[str, Any], *,
                   pg_restore: str | None = None, pg_dump: str | None = None,
                   check_table: bool = True) -> dict[str, Any]:
    """Check an archived object against its manifest; raise VerificationError on any mismatch.

    HEAD: size and ETag. Full streaming read: sha256, and the contents decoded (pg_restore --list and
    --data-only for dumps, the Parquet footer, gunzip+CSV) to count rows. With ``check_table`` the live table
    must still hold the manifest's row count.
    """
    bucket, key = manifest["bucket"], manifest["key"]
    where = f"s3://{bucket}/{key}"
    checks: dict[str, Any] = {}
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        raise VerificationError(f"the archived object is missing or unreadable: {exc}", where=where,
                                fix="the table was not dropped; the next archive run uploads it again") from exc
    size = int(head["ContentLength"])
    if size != int(manifest["bytes"]):
        raise VerificationError(f"object size {size} differs from the manifest's {manifest['bytes']}", where=where,
                                fix="the object was replaced or truncated; the table was kept and will be "
                                "archived again")
    checks["size"] = size
    etag = str(head.get("ETag", "")).strip('"')
    if manifest.get("etag") and etag and etag != manifest["etag"]:
        raise VerificationError(f"object ETag {etag} differs from the manifest's {manifest['etag']}",
                                where=where, fix="the object was overwritten; the table was kept for retry")
    if manifest.get("sse") and manifest["sse"].get("algorithm"):
        if head.get("ServerSideEncryption") != manifest["sse"]["algorithm"]:
            raise VerificationError(
                f"object encryption is {head.get('ServerSideEncryption')!r}, expected {manifest['sse']['algorithm']}",
                where=where, fix="check the bucket policy; the table was kept")
        checks["sse"] = head.get("ServerSideEncryption")
    hashing = _Hashing(_s3_chunks(s3, bucket, key, if_match=etag or None))
    fmt = manifest["format"]
    if fmt == "pg_dump":
        tool = pg_restore_for(int(manifest.get("pg_dump_major") or 0), pg_restore, pg_dump)
        try:
            with dump_copy_data(hashing, tool, list_toc=True) as (info, data, toc):
                for _ in data:
                    pass
        except Exception as exc:
            _raise_if_hash_differs(hashing, manifest, where, exc)
            raise
        rows = info.rows
        name = manifest["table"]
        if not any(f" TABLE DATA {name['schema']} {name['name']} " in f" {line} " for line in toc):
            raise VerificationError(f"pg_restore --list shows no TABLE DATA entry for {name['schema']}."
                                    f"{name['name']}", where=where, fix="the dump is not of this table")
        checks["pg_restore_list"] = [t for t in toc if t and not t.startswith(";")]
    elif fmt == "parquet":
        for _ in hashing:
            pass
        rows = _parquet_rows(s3, bucket, key, size, etag or None, manifest)
    else:
        try:
            rows = _csv_rows(hashing, gz=fmt == "csv")
        except Exception as exc:
            _raise_if_hash_differs(hashing, manifest, where, exc)
            raise VerificationError(f"the CSV archive cannot be decoded: {exc}", where=where) from exc
    if hashing.size != size:
        raise VerificationError(f"read {hashing.size} bytes, HEAD says {size}", where=where)
    if hashing.sha.hexdigest() != manifest["sha256"]:
        raise VerificationError(
            f"sha256 {hashing.sha.hexdigest()} differs from the manifest's {manifest['sha256']}", where=where,
            fix="the object is corrupt; nothing was dropped and the next run archives the table again")
    checks["sha256"] = manifest["sha256"]
    if rows != int(manifest["rows"]):
        raise VerificationError(f"the object holds {rows} rows, the manifest says {manifest['rows']}", where=where)
    checks["rows"] = rows
    if check_table and conn is not None:
        table = QualifiedName(manifest["table"]["schema"], manifest["table"]["name"])
        if catalog.exists(conn, table):
            live = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0])  # type: ignore[index]
            if live != rows:
                raise VerificationError(f"{table} now holds {live} rows but the archive has {rows}", where=where,
                                        fix="the table changed after it was archived; it was kept and will be "
                                        "archived again")
            checks["live_rows"] = live
    log.info("verified %s: %s", where, {k: v for k, v in checks.items() if k != "pg_restore_list"})
    return checks


def _raise_if_hash_differs(hashing: _Hashing, manifest: dict[str, Any], where: str, cause: BaseException) -> None:
    """A decode error on a corrupt object: finish hashing it and report the checksum, the root cause."""
    for _ in hashing:
        pass
    if hashing.sha.hexdigest() != manifest["sha256"]:
        raise VerificationError(
            f"sha256 {hashing.sha.hexdigest()} differs from the manifest's {manifest['sha256']} (and the object "
            f"cannot be decoded: {cause})", where=where,
            fix="the object is corrupt; nothing was dropped and the next run archives the table again") from cause


def _parquet_rows(s3: S3Client, bucket: str, key: str, size: int, etag: str | None,
                  manifest: dict[str, Any]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(pa.PythonFile(S3RangeReader(s3, bucket, key, size, etag), mode="r")).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    expected = [c["name"] for c in manifest["columns"]]
    if names != expected:
        raise VerificationError(f"Parquet columns {names} differ from the manifest's {expected}",
                                where=f"s3://{bucket}/{key}")
    return int(meta.num_rows)


def _csv_rows(chunks: Iterable[bytes], *, gz: bool) -> int:
    raw: IO[bytes] = io.BufferedReader(_IterReader(chunks), buffer_size=MiB)
    if gz:
        raw = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    n = sum(1 for _ in csv.reader(text))
    return max(n - 1, 0)  # minus the header line


# --------------------------------------------------------------------------------------------------- drop


def drop_archived(ex: Executor, table: QualifiedName, manifest: dict[str, Any], *, queue_id: int | None = None,
                  lock_timeout: str = "2s", retries: int = 5) -> None:
    """DROP the archived table once its archive is verified, re-counting its rows under the DROP's own lock.

    Why the re-count: between verification and the drop someone could have written to the table (it is only
    detached, not read-only); ACCESS EXCLUSIVE freezes it, and a changed count aborts the drop.
    """
    rows = int(manifest["rows"])

    def body() -> None:
        ex.run(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table.ident))
        if not ex.dry_run:
            attached = ex.scalar("SELECT c.relispartition FROM pg_class c WHERE c.oid = %s::regclass",
                                 (table.ident.as_string(ex.conn),))
            if attached:
                raise PreflightError(f"{table} is attached as a partition again; it will not be dropped",
                                     fix="detach it first (rotation does), then re-run the archive")
            live = int(ex.scalar(sql.SQL("SELECT count(*) FROM {}").format(table.ident)))
            if live != rows:
                raise VerificationError(f"{table} holds {live} rows, the verified archive {rows}: not dropping",
                                        fix="the table changed after archiving; it will be archived again")
        ex.run(sql.SQL("DROP TABLE {}").format(table.ident))
        if queue_id is not None and not ex.dry_run:
            _update(ex.conn, queue_id, status="dropped", patch={"dropped_at": _now()})

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"drop archived table {table}")


# --------------------------------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class QueueRow:
    id: int
    schema_name: str
    table_name: str
    parent_schema: str | None
    parent_table: str | None
    range_from: str | None
    range_to: str | None
    period: str | None
    label: str | None
    status: str
    attempts: int
    last_error: str | None
    archive: dict[str, Any]

    @property
    def table(self) -> QualifiedName:
        return QualifiedName(self.schema_name, self.table_name)

    @property
    def target(self) -> ArchiveTarget:
        parent = None
        if self.parent_schema and self.parent_table:
            parent = QualifiedName(self.parent_schema, self.parent_table)
        return ArchiveTarget(self.table, parent, self.range_from, self.range_to, self.period, self.label)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "archive"} | {"table": str(self.table)}


_QUEUE_COLS = sql.SQL(
    "id, schema_name, table_name, parent_schema, parent_table, range_from, range_to, period, label, status, "
    "attempts, last_error, archive")


def _queue_row(r: tuple[Any, ...]) -> QueueRow:
    return QueueRow(id=int(r[0]), schema_name=r[1], table_name=r[2], parent_schema=r[3], parent_table=r[4],
                    range_from=r[5], range_to=r[6], period=r[7], label=r[8], status=r[9], attempts=int(r[10]),
                    last_error=r[11], archive=dict(r[12] or {}))


def queue_row(conn: psycopg.Connection[Any], queue_id: int) -> QueueRow:
    row = conn.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(_QUEUE_COLS, QUEUE),
                       (queue_id,)).fetchone()
    if row is None:
        raise InvalidInputError(f"archive queue row {queue_id} does not exist",
                                fix="list pending rows with pending_queue()")
    return _queue_row(row)


def pending_queue(conn: psycopg.Connection[Any]) -> list[QueueRow]:
    """Rows that still need work: pending, failed (retried), or interrupted mid-way (uploading/uploaded/verified)."""
    state.ensure_schema(conn)
    rows = conn.execute(sql.SQL(
        "SELECT {} FROM {} WHERE status NOT IN ('dropped', 'kept', 'restored') ORDER BY id"
    ).format(_QUEUE_COLS, QUEUE)).fetchall()
    return [_queue_row(r) for r in rows]


def enqueue(conn: psycopg.Connection[Any], table: QualifiedName, *, parent: QualifiedName | None = None,
            range_from: str | None = None, range_to: str | None = None, period: str | None = None,
            label: str | None = None, policy: Mapping[str, Any] | None = None) -> int:
    """Queue a table for archiving (rotation does this for detached partitions). Idempotent per table.

    A row already ``dropped`` whose table exists again (a new table with the same name) is reset to pending.
    """
    state.ensure_schema(conn)
    archive = {"policy": dict(policy)} if policy else {}
    row = conn.execute(sql.SQL(
        """INSERT INTO {}
               (schema_name, table_name, parent_schema, parent_table, range_from, range_to, period, label, archive)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (schema_name, table_name) DO UPDATE SET updated_at = now()
           RETURNING id, status""").format(QUEUE),
        (table.schema, table.name, parent.schema if parent else None, parent.name if parent else None,
         range_from, range_to, period, label, Jsonb(archive)),
    ).fetchone()
    assert row is not None
    queue_id, status = int(row[0]), str(row[1])
    if status == "dropped" and catalog.exists(conn, table):
        conn.execute(sql.SQL("""UPDATE {} SET status = 'pending', attempts = 0, last_error = NULL,
                               label = coalesce(%s, label), archive = %s, updated_at = now() WHERE id = %s"""
                             ).format(QUEUE),
                     (label, Jsonb(archive), queue_id))
    return queue_id


def enqueue_retired(conn: psycopg.Connection[Any], table: QualifiedName | str,
                    policy: Mapping[str, Any] | None = None) -> int | None:
    """Queue ``<table>_retired`` (the original table a conversion swapped out) if it exists; its id or None."""
    name = QualifiedName.parse(table) if isinstance(table, str) else table
    retired = name.sibling(derived_name(name.name, "retired"))
    if not catalog.exists(conn, retired):
        return None
    label = "retired-" + datetime.now(timezone.utc).strftime("%Y%m%d")
    return enqueue(conn, retired, parent=name, label=label, policy=policy)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _update(conn: psycopg.Connection[Any], queue_id: int, *, status: str | None = None,
            patch: Mapping[str, Any] | None = None, remove: Iterable[str] = (), error: str | None = None,
            clear_error: bool = False, attempt: bool = False) -> None:
    conn.execute(sql.SQL(
        """UPDATE {} SET
               status = coalesce(%(status)s, status),
               archive = (archive - %(remove)s::text[]) || %(patch)s,
               last_error = CASE WHEN %(clear)s THEN NULL ELSE coalesce(%(error)s, last_error) END,
               attempts = attempts + %(inc)s,
               updated_at = now()
           WHERE id = %(id)s""").format(QUEUE),
        {"status": status, "remove": list(remove), "patch": Jsonb(dict(patch or {})), "error": error,
         "clear": clear_error, "inc": 1 if attempt else 0, "id": queue_id},
    )


@contextlib.contextmanager
def _claim(conn: psycopg.Connection[Any], queue_id: int) -> Iterator[None]:
    """A session advisory lock on the queue row: two workers never archive the same table at once.

    Session-level (not a row lock) so status updates can commit while it is held; released if the worker dies.
    """
    key = f"pg_partition.archive:{queue_id}"
    got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()
    if not got or not got[0]:
        raise StateError(f"archive queue row {queue_id} is being processed by another worker",
                         fix="wait for that task to finish; this one can be retried safely")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))


def archive_queued(
    ex: Executor,
    s3: S3Client,
    queue_id: int,
    *,
    defaults: Mapping[str, Any] | ArchivePolicy | None = None,
    pg_dump: str | None = None,
    pg_restore: str | None = None,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> dict[str, Any]:
    """Take one archive-queue row through upload -> verify -> drop (or keep). Resumable at every stage.

    The row's ``archive`` jsonb records ``stage`` (uploaded/verified), the manifest and any open upload id; a
    retried task continues where the last one stopped. Any exception marks the row ``failed`` with
    ``last_error`` (the table stays) and is re-raised so the Airflow task fails and is retried.
    """
    conn = ex.conn
    state.ensure_schema(conn)
    row = queue_row(conn, queue_id)
    base = asdict(defaults) if isinstance(defaults, ArchivePolicy) else (defaults or {})
    result: dict[str, Any] = {"queue_id": queue_id, "table": str(row.table)}
    if row.status in DONE:
        ex.logger.info("archive queue row %s (%s) is already %s; nothing to do", queue_id, row.table, row.status)
        return result | {"status": row.status, "skipped": True}
    policy = ArchivePolicy.build(base, row.archive.get("policy"))
    if ex.dry_run:
        plan = archive_table(ex, s3, row.target, policy, pg_dump=pg_dump, lock_timeout=lock_timeout)
        if policy.drop:
            ex.run(sql.SQL("DROP TABLE {}").format(row.table.ident))
        return result | {"status": row.status, "dry_run": True, "key": plan["key"],
                         "statements": list(ex.statements)}
    with _claim(conn, queue_id):
        row = queue_row(conn, queue_id)
        if row.status in DONE:
            return result | {"status": row.status, "skipped": True}
        stage = row.archive.get("stage")
        manifest: dict[str, Any] | None = row.archive.get("manifest")
        try:
            if not catalog.exists(conn, row.table):
                raise StateError(
                    f"{row.table} no longer exists but its archive queue row is {row.status!r}",
                    fix="if it was dropped by hand after a verified archive, set the row's status to 'dropped'; "
                    "if it was renamed, update schema_name/table_name")
            upload = manifest is None or row.status in ("pending", "uploading") or (
                row.status == "failed" and stage != "verified")
            if upload:
                key, _ = plan_keys(conn, row.target, policy)
                _cleanup_uploads(s3, policy.bucket, key, row.archive.get("upload"), ex.logger)
                _update(conn, queue_id, status="uploading", attempt=True, clear_error=True,
                        remove=["stage", "manifest", "verification"])

                def remember(key: str, upload_id: str) -> None:
                    _update(conn, queue_id, patch={"upload": {"bucket": policy.bucket, "key": key,
                                                              "upload_id": upload_id}})

                manifest = archive_table(ex, s3, row.target, policy, pg_dump=pg_dump, lock_timeout=lock_timeout,
                                         on_upload_started=remember)
                _update(conn, queue_id, status="uploaded", remove=["upload"],
                        patch={"stage": "uploaded", "manifest": manifest, "key": manifest["key"],
                               "bucket": policy.bucket, "manifest_key": manifest["manifest_key"]})
                stage = "uploaded"
            assert manifest is not None
            if stage != "verified":
                checks = verify_archive(conn, s3, manifest, pg_restore=pg_restore, pg_dump=pg_dump)
                checks.pop("pg_restore_list", None)
                _update(conn, queue_id, status="verified",
                        patch={"stage": "verified", "verification": checks | {"at": _now()}})
            if policy.drop:
                drop_archived(ex, row.table, manifest, queue_id=queue_id, lock_timeout=lock_timeout,
                              retries=retries)
                final = "dropped"
            else:
                _update(conn, queue_id, status="kept")
                final = "kept"
                ex.logger.info("archive policy drop=false: %s is kept in the database", row.table)
        except BaseException as exc:
            _mark_failed(conn, queue_id, exc, ex.logger)
            raise
    return result | {"status": final, "key": manifest["key"], "bucket": manifest["bucket"],
                     "manifest_key": manifest["manifest_key"], "rows": manifest["rows"],
                     "bytes": manifest["bytes"], "sha256": manifest["sha256"], "format": manifest["format"]}


def _cleanup_uploads(s3: S3Client, bucket: str, key: str, recorded: Mapping[str, Any] | None,
                     logger: logging.Logger) -> None:
    """Abort uploads a previous (killed or failed) attempt left open: the recorded one and any under the key."""
    if recorded and recorded.get("upload_id"):
        abort_upload(s3, str(recorded.get("bucket") or bucket), str(recorded.get("key") or key),
                     str(recorded["upload_id"]), logger=logger)
    aborted = abort_stale_uploads(s3, bucket, key, logger=logger)
    if aborted:
        logger.warning("aborted %d multipart upload(s) left open by an earlier attempt: %s", len(aborted), aborted)


def _mark_failed(conn: psycopg.Connection[Any], queue_id: int, exc: BaseException, logger: logging.Logger) -> None:
    message = f"{type(exc).__name__}: {exc}"[:4000]
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        _update(conn, queue_id, status="failed", error=message)
    except Exception as mark_exc:  # the connection itself may be what failed
        logger.error("could not mark archive queue row %s failed (%s); it stays as it was and is retried",
                     queue_id, mark_exc)


# --------------------------------------------------------------------------------------------------- restore


def find_archives(s3: S3Client, bucket: str, prefix: str, database: str, table: QualifiedName,
                  period: str | None = None) -> list[str]:
    """Manifest keys under ``prefix/<db>/<schema>/<table>/`` (one period, or all), sorted."""
    folder = "/".join(p for p in [prefix.strip("/"), _segment(database), _segment(table.schema),
                                  _segment(table.name)] if p) + "/"
    if period:
        folder += f"period={_segment(period)}/"
    keys: list[str] = []
    token: str | None = None
    while True:
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": folder}
        if token:
            args["ContinuationToken"] = token
        resp = s3.list_objects_v2(**args)
        keys += [o["Key"] for o in resp.get("Contents", []) or [] if str(o["Key"]).endswith(".manifest.json")]
        if not resp.get("IsTruncated"):
            break
        token = resp.get("NextContinuationToken")
    return sorted(keys)


def locate_manifest(s3: S3Client, bucket: str, *, key: str | None = None, prefix: str = DEFAULT_PREFIX,
                    database: str | None = None, table: QualifiedName | None = None, period: str | None = None,
                    format: str | None = None) -> dict[str, Any]:
    """The manifest to restore from: by object/manifest key, or by table + period (preferring ``format``)."""
    if key:
        return get_manifest(s3, bucket, key)
    if not (database and table and period):
        raise InvalidInputError("restore needs either an S3 key or a table and a period",
                                fix="pass s3_key, or table (schema.table of the partitioned parent) and period "
                                "(e.g. 2024-01)")
    keys = find_archives(s3, bucket, prefix, database, table, period)
    if not keys:
        raise InvalidInputError(
            f"no archive of {table} for period {period} under s3://{bucket}/{prefix}/{database}/",
            fix="check the period label (e.g. 2024-01), the bucket/prefix, or pass the S3 key")
    manifests = [get_manifest(s3, bucket, k) for k in keys]
    if format:
        manifests = [m for m in manifests if m["format"] == format] or []
        if not manifests:
            raise InvalidInputError(f"no {format} archive of {table} for period {period}",
                                    fix="omit format to use what exists: " + ", ".join(keys))
    order = {"pg_dump": 0, "parquet": 1, "csv": 2, "rds_csv": 3}
    manifests.sort(key=lambda m: order.get(m["format"], 9))
    return manifests[0]


def _verify_before_restore(s3: S3Client, manifest: dict[str, Any], pg_restore: str | None) -> dict[str, Any]:
    return verify_archive(None, s3, manifest, pg_restore=pg_restore, check_table=False)


def _load(ex: Executor, s3: S3Client, manifest: dict[str, Any], target: QualifiedName, *,
          pg_restore: str | None, allowed: set[str]) -> int:
    """COPY the archive's rows into ``target`` (inside the caller's transaction). Returns rows loaded.

    The object is re-hashed while it streams (dump/CSV) or read with IfMatch on the verified ETag (Parquet), so
    an object swapped after verification cannot be loaded.
    """
    conn = ex.conn
    bucket, key, fmt = manifest["bucket"], manifest["key"], manifest["format"]
    conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
    conn.execute("SET LOCAL IntervalStyle = 'postgres'")
    etag = manifest.get("etag") or None
    loaded = 0
    progress = Progress(f"restore of s3://{bucket}/{key} into {target}", int(manifest["rows"]), logger=ex.logger)

    def copy_stmt(cols: list[str], options: str) -> sql.Composed:
        unknown = [c for c in cols if c not in allowed]
        if unknown:
            raise PreflightError(f"the archive has columns {unknown} that {target} does not have",
                                 fix="restore into a separate schema (target=schema) instead")
        return sql.SQL("COPY {} ({}) FROM STDIN {}").format(
            target.ident, sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(options))

    if fmt == "pg_dump":
        tool = pg_restore_for(int(manifest.get("pg_dump_major") or 0), pg_restore)
        hashing = _Hashing(_s3_chunks(s3, bucket, key, if_match=etag))
        with dump_copy_data(hashing, tool) as (info, data, _):
            first = next(data, None)
            if first is not None or info.columns:
                with conn.cursor() as cur, cur.copy(copy_stmt(info.columns, "")) as copy:
                    if first is not None:
                        copy.write(first)
                        progress.add(first.count(b"\n"))
                    for chunk in data:
                        copy.write(chunk)
                        progress.add(chunk.count(b"\n"))
            loaded = info.rows
        _check_hash(hashing, manifest)
    elif fmt in ("csv", "rds_csv"):
        hashing = _Hashing(_s3_chunks(s3, bucket, key, if_match=etag))
        cols = [c["name"] for c in manifest["columns"]]
        gz = zlib.decompressobj(31) if fmt == "csv" else None
        with conn.cursor() as cur:
            with cur.copy(copy_stmt(cols, "(FORMAT csv, HEADER true)")) as copy:
                for chunk in hashing:
                    copy.write(gz.decompress(chunk) if gz else chunk)
                if gz:
                    copy.write(gz.flush())
            loaded = int(cur.rowcount)
        _check_hash(hashing, manifest)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        reader = S3RangeReader(s3, bucket, key, int(manifest["bytes"]), etag)
        pf = pq.ParquetFile(pa.PythonFile(reader, mode="r"))
        cols = list(pf.schema_arrow.names)
        with conn.cursor() as cur, cur.copy(copy_stmt(cols, "")) as copy:
            for batch in pf.iter_batches(batch_size=20_000):
                columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                for values in zip(*columns, strict=True):
                    copy.write_row(values)
                loaded += batch.num_rows
                progress.add(batch.num_rows)
    else:
        raise InvalidInputError(f"unknown archive format {fmt!r} in the manifest")
    progress.add(0, force=True)
    if loaded != int(manifest["rows"]):
        raise VerificationError(f"loaded {loaded} rows, the manifest says {manifest['rows']}",
                                where=f"s3://{bucket}/{key}", fix="nothing was restored (rolled back)")
    return loaded


def _check_hash(hashing: _Hashing, manifest: dict[str, Any]) -> None:
    if hashing.sha.hexdigest() != manifest["sha256"] or hashing.size != int(manifest["bytes"]):
        raise VerificationError(
            f"the object read during restore has sha256 {hashing.sha.hexdigest()} ({hashing.size} bytes), the "
            f"manifest {manifest['sha256']} ({manifest['bytes']} bytes)",
            where=f"s3://{manifest['bucket']}/{manifest['key']}", fix="nothing was restored (rolled back)")


def _marker(manifest: dict[str, Any]) -> str:
    return f"{MARKER}s3://{manifest['bucket']}/{manifest['key']} sha256={manifest['sha256']}"


def _comment(conn: psycopg.Connection[Any], table: QualifiedName) -> str | None:
    row = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", (table.ident.as_string(conn),)).fetchone()
    return None if row is None else row[0]


_INDEX_TAIL = re.compile(r'^CREATE (UNIQUE )?INDEX .+? ON (?:ONLY )?(?:"(?:[^"]|"")*"|[^\s"]+)'
                         r'(?:\.(?:"(?:[^"]|"")*"|[^\s"]+))? (USING .*)$', re.S)


def _child_indexes(conn: psycopg.Connection[Any], parent: TableInfo, child: QualifiedName) -> list[sql.Composed]:
    """Statements building the parent's (partitioned) indexes on a standalone child before ATTACH.

    ATTACH matches equivalent existing indexes instead of building them while it holds its lock. Primary key
    and unique constraints are added as constraints: ATTACH only matches a constraint index with a constraint.
    """
    stmts: list[sql.Composed] = []
    for idx in parent.indexes:
        cols = sql.SQL(", ").join(map(sql.Identifier, idx.columns))
        if idx.is_primary:
            stmts.append(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(child.ident, cols))
            continue
        m = _INDEX_TAIL.match(idx.definition)
        if idx.constraint and idx.is_unique and m and m.group(2).startswith("USING btree (") \
                and " WHERE " not in m.group(2) and all(idx.columns):
            stmts.append(sql.SQL("ALTER TABLE {} ADD UNIQUE ({})").format(child.ident, cols))
            continue
        if not m or idx.constraint:
            log.warning("not pre-building index %s (%s); ATTACH will build it", idx.name, idx.definition)
            continue
        stmts.append(sql.SQL("CREATE {}INDEX ON {} {}").format(
            sql.SQL("UNIQUE " if m.group(1) else ""), child.ident, sql.SQL(m.group(2))))
    if parent.primary_key is None:
        pk = per_partition_key(conn, parent)
        if pk:
            stmts.append(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                child.ident, sql.SQL(", ").join(map(sql.Identifier, pk))))
    return stmts


@dataclass(frozen=True)
class RestorePlan:
    manifest: dict[str, Any]
    target: str  # attach | schema
    table: QualifiedName  # where the rows go
    parent: QualifiedName | None
    range: Range | None


def restore(
    ex: Executor,
    s3: S3Client,
    manifest: dict[str, Any],
    *,
    target: str = "attach",
    parent: QualifiedName | None = None,
    schema: str | None = None,
    pg_restore: str | None = None,
    verify: bool = True,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> dict[str, Any]:
    """Bring an archive back: ``attach`` it as a partition of its parent again, or load it into ``schema``.

    The checksum is verified first (a full streaming read). ``attach`` refuses, changing nothing, when the
    bounds overlap an existing partition or rows of the DEFAULT partition. Resumable: a half-done restore
    (standalone table marked with a comment naming this archive) is reloaded or attached on the next run.
    """
    if target not in ("attach", "schema"):
        raise InvalidInputError(f"unknown restore target {target!r}", fix="use attach or schema")
    conn = ex.conn
    if not conn.autocommit:
        raise InvalidInputError("restore needs an autocommit connection", fix="open it with autocommit=True")
    name = manifest["table"]["name"]
    if target == "schema":
        table = QualifiedName(schema or RESTORE_SCHEMA, name)
        plan = RestorePlan(manifest, target, table, None, None)
        preflight = _restore_schema_preflight(ex, plan)
    else:
        plan = _attach_plan(ex, manifest, parent)
        preflight = _attach_preflight(ex, plan)
    result = {"target": target, "table": str(plan.table), "key": manifest["key"], "rows": manifest["rows"],
              "sha256": manifest["sha256"]}
    if preflight == "done":
        ex.logger.info("%s is already restored from s3://%s/%s", plan.table, manifest["bucket"], manifest["key"])
        return result | {"status": "already restored"}
    checks: dict[str, Any] = {}
    if verify and not ex.dry_run:
        checks = _verify_before_restore(s3, manifest, pg_restore)
        checks.pop("pg_restore_list", None)
    if target == "schema":
        _restore_into_schema(ex, s3, plan, preflight, pg_restore=pg_restore)
    else:
        _restore_attach(ex, s3, plan, preflight, pg_restore=pg_restore, lock_timeout=lock_timeout, retries=retries)
    return result | {"status": "dry run" if ex.dry_run else "restored", "verification": checks,
                     "statements": list(ex.statements) if ex.dry_run else []}


def _attach_plan(ex: Executor, manifest: dict[str, Any], parent: QualifiedName | None) -> RestorePlan:
    bounds = manifest.get("bounds") or {}
    if parent is None:
        if not manifest.get("parent"):
            raise InvalidInputError(
                f"the archive of {manifest['table']['name']} does not name a parent table",
                fix="pass the partitioned table to attach to, or restore with target=schema")
        parent = QualifiedName(manifest["parent"]["schema"], manifest["parent"]["name"])
    if not bounds.get("from") or not bounds.get("to"):
        raise InvalidInputError(
            f"the archive of {manifest['table']['name']} has no partition bounds (a retired table?)",
            fix="restore it with target=schema and query it there")
    rng = Range(parse_bound_day(str(bounds["from"])), parse_bound_day(str(bounds["to"])))
    return RestorePlan(manifest, "attach", parent.sibling(manifest["table"]["name"]), parent, rng)


def _attach_preflight(ex: Executor, plan: RestorePlan) -> str:
    """Refuse unsafe restores before changing anything. Returns 'new', 'resume-load', 'resume-attach' or 'done'."""
    conn, m = ex.conn, plan.manifest
    assert plan.parent is not None and plan.range is not None
    info = catalog.describe(conn, plan.parent)
    if not info.is_partitioned:
        raise PreflightError(f"{plan.parent} is not a partitioned table", where=str(plan.parent),
                             fix="attach to the partitioned parent, or restore with target=schema")
    column = partition_column(info)
    kind = column_kind(info, column)
    rng = plan.range
    for p in info.partitions:
        if p.is_default:
            continue
        if p.name == plan.table and (p.start_day, p.end_day) == (rng.start, rng.end):
            return "done"
        if p.start_day < rng.end and rng.start < p.end_day:
            raise PreflightError(
                f"the archived range [{rng.start}, {rng.end}) overlaps partition {p.name} "
                f"[{p.range_from}, {p.range_to})", where=str(plan.parent),
                fix="the period is already covered (perhaps re-created empty by premake): detach/drop that "
                "partition if it holds nothing you need, or restore with target=schema")
    default = info.default_partition
    if default is not None:
        in_default = ex.scalar(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            default.name.ident, bounds_condition(column, rng, kind)))
        if in_default:
            raise PreflightError(
                f"{in_default} rows in the DEFAULT partition {default.name} fall in [{rng.start}, {rng.end})",
                where=str(plan.parent), fix="move those rows out of the DEFAULT partition first (rotation does "
                "this before creating partitions), or restore with target=schema")
    if catalog.exists(conn, plan.table):
        comment = _comment(conn, plan.table) or ""
        if not comment.startswith(_marker(m)):
            raise PreflightError(
                f"a table named {plan.table} already exists and is not a restore of this archive",
                where=str(plan.table), fix="rename or drop it, or restore with target=schema")
        attached = ex.scalar("SELECT relispartition FROM pg_class WHERE oid = %s::regclass",
                             (plan.table.ident.as_string(conn),))
        if attached:
            raise PreflightError(f"{plan.table} is a partition of another table", where=str(plan.table),
                                 fix="detach it or restore with target=schema")
        return "resume-attach" if comment.endswith(" loaded") else "resume-load"
    return "new"


def _restore_attach(ex: Executor, s3: S3Client, plan: RestorePlan, preflight: str, *, pg_restore: str | None,
                    lock_timeout: str, retries: int) -> None:
    conn, m = ex.conn, plan.manifest
    assert plan.parent is not None and plan.range is not None
    parent = catalog.describe(conn, plan.parent)
    column = partition_column(parent)
    kind = column_kind(parent, column)
    child, rng = plan.table, plan.range
    low, high = rng.literal(kind)
    check = sql.Identifier(check_constraint_name(child))
    marker = _marker(m)

    if preflight == "new":
        def create() -> None:
            ex.run(sql.SQL(
                "CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
                "INCLUDING COMPRESSION INCLUDING GENERATED INCLUDING STATISTICS)"
            ).format(child=child.ident, parent=parent.name.ident))
            if parent.tablespace:
                ex.run(sql.SQL("ALTER TABLE {} SET TABLESPACE {}").format(child.ident,
                                                                       sql.Identifier(parent.tablespace)))
            ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
                child.ident, check, bounds_condition(column, rng, kind)))
            ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(child.ident, sql.Literal(marker)))
            copy_grants(ex, parent.grants, child)

        # LIKE reads the parent: a short transaction under lock_timeout, never held during the load.
        ex.with_lock_timeout(create, lock_timeout=lock_timeout, retries=retries, what=f"create {child}")
    if preflight in ("new", "resume-load"):
        allowed = {c.name for c in parent.columns if not c.generated}
        with ex.transaction():
            ex.run(sql.SQL("TRUNCATE {}").format(child.ident))
            if ex.dry_run:
                ex.logger.info("[dry run] would COPY %s rows from s3://%s/%s into %s", m["rows"], m["bucket"],
                               m["key"], child)
            else:
                _load(ex, s3, m, child, pg_restore=pg_restore, allowed=allowed)
            for stmt in _child_indexes(conn, parent, child):
                ex.run(stmt)
            ex.run(sql.SQL("ANALYZE {}").format(child.ident))
            ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(child.ident, sql.Literal(marker + " loaded")))

    def attach() -> None:
        ex.run(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            parent.name.ident, child.ident, sql.Literal(low), sql.Literal(high)))
        ex.run(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(child.ident, check))
        ex.run(sql.SQL("COMMENT ON TABLE {} IS NULL").format(child.ident))
        if not ex.dry_run:
            conn.execute(sql.SQL(
                """UPDATE {} SET status = 'restored', updated_at = now(),
                          archive = archive || jsonb_build_object('restored_at', now()::text,
                                                                  'restored_to', %s::text)
                   WHERE archive->>'key' = %s AND archive->>'bucket' = %s""").format(QUEUE),
                (str(child), m["key"], m["bucket"]))

    ex.with_lock_timeout(attach, lock_timeout=lock_timeout, retries=retries, what=f"attach restored {child}")
    ex.logger.info("restored %s rows from s3://%s/%s as partition %s of %s", m["rows"], m["bucket"], m["key"],
                   child, parent.name)


def _restore_schema_preflight(ex: Executor, plan: RestorePlan) -> str:
    if catalog.exists(ex.conn, plan.table):
        comment = _comment(ex.conn, plan.table) or ""
        if comment == _marker(plan.manifest) + " loaded":
            return "done"
        raise PreflightError(f"{plan.table} already exists", where=str(plan.table),
                             fix="drop it, or restore into another schema (param schema)")
    return "new"


def _restore_into_schema(ex: Executor, s3: S3Client, plan: RestorePlan, preflight: str, *,
                         pg_restore: str | None) -> None:
    """Create a plain table from the manifest's columns and load it: for ad-hoc queries, nothing else touched."""
    conn, m, table = ex.conn, plan.manifest, plan.table
    cols = []
    for c in m["columns"]:
        ok = conn.execute("SELECT to_regtype(%s) IS NOT NULL", (c["type"],)).fetchone()
        if not ok or not ok[0]:
            raise VerificationError(f"the manifest names an unknown type {c['type']!r} for column {c['name']!r}",
                                    fix="install the extension that defines it, or restore with pg_restore by hand")
        # The type text comes from format_type() and was just validated by to_regtype(): safe to splice.
        cols.append(sql.SQL("{} {}{}").format(sql.Identifier(c["name"]), sql.SQL(c["type"]),
                                              sql.SQL(" NOT NULL" if c.get("not_null") else "")))
    with ex.transaction():
        ex.run(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema)))
        ex.run(sql.SQL("CREATE TABLE {} ({})").format(table.ident, sql.SQL(", ").join(cols)))
        if not ex.dry_run:
            _load(ex, s3, m, table, pg_restore=pg_restore, allowed={c["name"] for c in m["columns"]})
        ex.run(sql.SQL("ANALYZE {}").format(table.ident))
        ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(table.ident, sql.Literal(_marker(m) + " loaded")))
    ex.logger.info("restored %s rows from s3://%s/%s into %s", m["rows"], m["bucket"], m["key"], table)
