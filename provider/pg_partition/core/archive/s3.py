"""S3 multipart upload (streamed, sha256 while streaming), abort, and the Hive-style object keys."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from tenacity import Retrying, stop_after_attempt, wait_exponential

from pg_partition.core.archive.policy import EXTENSIONS, S3_MAX_PARTS, S3_MIN_PART, ArchivePolicy, MiB
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    PartitionError,
)
from pg_partition.core.db.execute import Progress
from pg_partition.core.db.names import Period, Range, parse_bound_day

log = logging.getLogger("pg_partition")


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


def segment(text: str) -> str:
    """One key segment: PostgreSQL names may contain '/', which S3 would read as a folder."""
    return text.replace("%", "%25").replace("/", "%2F")


def object_key(policy: ArchivePolicy, database: str, schema: str, table: str, label: str, name: str) -> str:
    parts = [policy.prefix] if policy.prefix else []
    parts += [segment(database), segment(schema), segment(table), f"period={segment(label)}",
              segment(name) + EXTENSIONS[policy.object_format]]
    return "/".join(parts)


def manifest_key_for(key: str) -> str:
    folder, _, base = key.rpartition("/")
    return f"{folder}/_{base}.manifest.json" if folder else f"_{base}.manifest.json"


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
