"""Reading archives back from S3: chunked and ranged readers, pg_restore's COPY stream."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pg_partition.core.archive.policy import MiB
from pg_partition.core.archive.s3 import S3Client
from pg_partition.core.archive.tools import PgTool, TailReader
from pg_partition.core.db import catalog
from pg_partition.core.db.errors import (
    VerificationError,
)

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- reading back


def s3_chunks(s3: S3Client, bucket: str, key: str, *, chunk: int = MiB, if_match: str | None = None
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


class Hashing:
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


class IterReader(io.RawIOBase):
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
    errs = [TailReader(p.stderr) for p in procs if p.stderr]
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
