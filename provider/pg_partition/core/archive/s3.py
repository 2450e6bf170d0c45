"""S3 multipart upload (streamed, sha256 while streaming), abort, and the Hive-style object keys."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import IO, Any, Protocol

import psycopg
from tenacity import Retrying, stop_after_attempt, wait_exponential

from pg_partition.core.archive.policy import EXTENSIONS, S3_MAX_PART, S3_MAX_PARTS, S3_MIN_PART, ArchivePolicy, MiB
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
    def list_parts(self, **kwargs: Any) -> Any: ...
    def put_object(self, **kwargs: Any) -> Any: ...
    def get_object(self, **kwargs: Any) -> Any: ...
    def head_object(self, **kwargs: Any) -> Any: ...
    def list_objects_v2(self, **kwargs: Any) -> Any: ...


# --------------------------------------------------------------------------------------------------- upload


S3_MAX_OBJECT = 5 * 1024 * 1024 * MiB  # 5 TiB: the largest object S3 stores
# Output may be larger than the relation it came from (text forms of timestamps and numbers in CSV/pg_dump): the
# part size leaves this much room before the 10,000-part limit.
SIZE_HEADROOM = 3
# Parts up to this size are held in memory; larger ones (relations beyond ~27 GB, where the part size grows past
# the 8 MiB default) are spooled to a temporary file (the page cache holds them, not the process), so the
# upload's share of the process's memory is at most (max_inflight + 1) x 8 MiB whatever the table size. It was
# 32 MiB: a 27-107 GB table then held up to 2-3 parts of 9-32 MiB, which would take a Parquet export (about
# 145 MB without its parts) past 200 MB.
MEMORY_PART_LIMIT = 8 * MiB


def part_size_for(expected_bytes: int | None, base: int = 8 * MiB) -> int:
    """The part size for an object of about ``expected_bytes``, chosen once before the upload starts.

    At least ``base`` (and S3's 5 MiB minimum), and large enough that ``SIZE_HEADROOM`` times the expected size
    (capped at S3's 5 TiB object limit) fits in 10,000 parts; a whole number of MiB. 1.5 TiB -> 472 MiB parts.
    """
    size = max(base, S3_MIN_PART)
    if expected_bytes:
        need = math.ceil(min(expected_bytes * SIZE_HEADROOM, S3_MAX_OBJECT) / S3_MAX_PARTS)
        size = max(size, need)
    return min(math.ceil(size / MiB) * MiB, S3_MAX_PART)


@dataclass
class UploadResult:
    bucket: str
    key: str
    bytes: int
    sha256: str
    etag: str
    parts: int


class _Buffers:
    """The in-memory part buffers, allocated once and reused: one per part in flight plus the one being filled.

    Why: a fresh ``bytearray(part size)`` per part zero-fills 8 MiB each time and, freed from the upload thread,
    lets glibc's heap grow and fragment (glibc raises its mmap threshold after the first large free, so later
    parts came from the main heap). Reusing the same few buffers keeps the upload's memory a fixed
    ``(max_inflight + 1) x part size``. A buffer goes back to the free list only at its full capacity (the short
    last part is trimmed and dropped).
    """

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, capacity: int) -> bytearray:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == capacity:
                    return buf
        return bytearray(capacity)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)


class _Part:
    """One part being filled: a reused buffer in memory (small parts) or a temporary file (large parts).

    The in-memory buffer has exactly the part's capacity and is handed to the upload as is (botocore takes a
    bytearray): no second copy of the part exists at any time. Writers never overfill it (``MultipartUpload.write``
    splits at the part boundary), so a full part's buffer is reused for a later part.
    """

    def __init__(self, spool: bool, capacity: int = 0, buffers: _Buffers | None = None) -> None:
        self.size = 0
        self.capacity = capacity
        self._buffers = buffers
        self.buf = bytearray(0) if spool else (buffers.take(capacity) if buffers else bytearray(capacity))
        # closed by close() once the part is uploaded (a part outlives any with-block here)
        self.file: IO[bytes] | None = tempfile.TemporaryFile(prefix="pgp-part-") if spool else None  # noqa: SIM115

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.file is not None:
            self.file.write(data)
        else:
            self.buf[self.size:self.size + len(data)] = data  # in place (never past the capacity)
        self.size += len(data)

    def body(self) -> bytearray | IO[bytes]:
        if self.file is not None:
            self.file.flush()
            self.file.seek(0)
            return self.file
        if self.size < len(self.buf):
            del self.buf[self.size:]  # shrinks in place (the last part is shorter than the capacity)
        return self.buf

    def md5(self) -> str:
        """MD5 of the part (S3's ETag of a part uploaded without KMS encryption): only computed on resume."""
        digest = hashlib.md5(usedforsecurity=False)
        if self.file is not None:
            self.file.flush()
            self.file.seek(0)
            while block := self.file.read(MiB):
                digest.update(block)
        else:
            digest.update(memoryview(self.buf)[:self.size])
        return digest.hexdigest()

    def close(self) -> None:
        buf, self.buf = self.buf, bytearray()
        if self._buffers is not None and self.capacity and len(buf) == self.capacity:
            self._buffers.give(buf)
        if self.file is not None:
            self.file.close()


class MultipartUpload:
    """A write-only stream into one S3 multipart upload, hashing as it goes. Aborted on any error.

    Part size: chosen once (:func:`part_size_for`) from ``expected_size`` (the relation's size) so that the
    10,000-part limit is not reached for any object up to S3's 5 TiB. Memory: a part in memory is at most
    ``MEMORY_PART_LIMIT``; at most ``max_inflight`` parts upload in background threads while the next fills, so
    the upload holds at most ``(max_inflight + 1) * min(part size, MEMORY_PART_LIMIT)`` bytes; larger parts go
    through temporary files (disk, not memory). Without ``expected_size`` the part size starts at ``part_size``
    and doubles every 1,000 parts (the only way to stay under the part limit with no size known). Use as a
    context manager; call :meth:`complete` before leaving it, or the upload is aborted.
    """

    def __init__(self, s3: S3Client, bucket: str, key: str, *, part_size: int = 8 * MiB, max_inflight: int = 2,
                 expected_size: int | None = None, resume_upload_id: str | None = None,
                 put_args: dict[str, Any] | None = None,
                 content_type: str | None = None, on_start: Callable[[str], None] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.expected_size = expected_size
        self.resume_upload_id = resume_upload_id
        self._held: dict[int, tuple[str, int]] = {}  # parts S3 already holds (resume): number -> (ETag, size)
        self.reused = 0
        self.base_part_size = part_size_for(expected_size, part_size)
        self.max_inflight = max(1, max_inflight)
        self.put_args = dict(put_args or {})
        if content_type:
            self.put_args["ContentType"] = content_type
        self.on_start = on_start
        self.logger = logger or log
        self.upload_id: str | None = None
        self.sha = hashlib.sha256()
        self.size = 0
        self._part: _Part | None = None
        self._buffers = _Buffers()
        self._parts: list[dict[str, Any]] = []
        self._futures: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._next = 1
        self._done = False
        self.progress = Progress(f"upload s3://{bucket}/{key}", None, unit="bytes", logger=self.logger)

    # context manager -------------------------------------------------------------------------------
    def __enter__(self) -> MultipartUpload:
        if self.resume_upload_id:
            held = list_parts(self.s3, self.bucket, self.key, self.resume_upload_id)
            if held is not None:
                self.upload_id, self._held = self.resume_upload_id, held
                self.logger.info("resuming multipart upload %s of s3://%s/%s: S3 holds %d part(s); each is kept "
                                 "if the regenerated bytes match its MD5", self.upload_id, self.bucket, self.key,
                                 len(held))
        if self.upload_id is None:
            resp = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.put_args)
            self.upload_id = str(resp["UploadId"])
        self.logger.info("started multipart upload of s3://%s/%s (upload id %s, parts of %d MiB%s)", self.bucket,
                         self.key, self.upload_id, self.base_part_size // MiB,
                         ", spooled to disk" if self.base_part_size > MEMORY_PART_LIMIT else "")
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
            if self._part is not None:
                self._part.close()

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
        # A write is split at the part boundary: every part but the last has exactly the part size, so its
        # buffer never grows (no reallocation copy) and is reused for a later part.
        view = memoryview(data).cast("B")
        while view.nbytes:
            if self._part is None:
                size = self._part_size()
                self._part = _Part(spool=size > MEMORY_PART_LIMIT, capacity=size, buffers=self._buffers)
            room = self._part.capacity - self._part.size
            self._part.write(view[:room])
            view = view[room:]
            if self._part.size >= self._part.capacity:
                self._submit(self._take())
        self.progress.add(n)
        return n

    def _take(self) -> _Part:
        part = self._part or _Part(spool=False)
        self._part = None
        return part

    def _part_size(self) -> int:
        if self.expected_size:
            return self.base_part_size
        return min(int(self.base_part_size * 2 ** ((self._next - 1) // 1000)), S3_MAX_PART)

    def _submit(self, part: _Part) -> None:
        assert self._pool is not None and self.upload_id is not None, "use MultipartUpload as a context manager"
        if self._next > S3_MAX_PARTS:
            part.close()
            raise PartitionError(
                f"the object needs more than 10,000 multipart parts of {self.base_part_size // MiB} MiB "
                f"(expected about {self.expected_size or 0:,} bytes, already {self.size:,})",
                fix="pass the relation's real size as expected_size (or raise part_size)")
        self._reap(block=len(self._futures) >= self.max_inflight)
        number = self._next
        self._next += 1
        self._futures.append(self._pool.submit(self._upload_part, number, part))

    def _upload_part(self, number: int, part: _Part) -> dict[str, Any]:
        held = self._held.get(number)
        if held is not None and held[1] == part.size and held[0].strip('"') == part.md5():
            part.close()  # S3 already holds exactly these bytes (an interrupted attempt uploaded them)
            self.reused += 1
            return {"PartNumber": number, "ETag": held[0]}
        try:
            resp = self.s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=part.body(), ContentLength=part.size)
        finally:
            part.close()
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
        if self._part is not None or self._next == 1:
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


def list_parts(s3: S3Client, bucket: str, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
    """The parts S3 holds for an open multipart upload (number -> (ETag, size)); None if the upload is gone."""
    held: dict[int, tuple[str, int]] = {}
    marker = 0
    while True:
        try:
            resp = s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
        except Exception as exc:
            if _s3_code(exc) in {"NoSuchUpload", "404"}:
                return None
            raise
        for p in resp.get("Parts", []) or []:
            held[int(p["PartNumber"])] = (str(p["ETag"]), int(p["Size"]))
        if not resp.get("IsTruncated"):
            return held
        marker = int(resp["NextPartNumberMarker"])


def abort_stale_uploads(s3: S3Client, bucket: str, key: str, *, keep: str | None = None,
                        logger: logging.Logger | None = None) -> list[str]:
    """Abort every open multipart upload of ``key`` (left by a worker that was killed mid-upload), except
    ``keep`` (the recorded one, which the next attempt resumes)."""
    resp = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)
    aborted = []
    for up in resp.get("Uploads", []) or []:
        if up.get("Key") == key and up.get("UploadId") != keep:
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
