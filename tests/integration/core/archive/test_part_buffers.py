"""The multipart upload's part buffers, through the real S3 endpoint (moto on loopback).

Why: every part but the last must have exactly the part size (a write that crosses a part boundary is split),
so a part's buffer never grows by reallocation and the same few buffers serve the whole upload; the object
must still be byte-for-byte what was written.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pg_partition.core.archive.policy import MiB
from pg_partition.core.archive.s3 import MultipartUpload


def test_parts_have_the_exact_part_size_and_reuse_their_buffers(bucket: Any) -> None:
    client = bucket.client()
    bodies: list[tuple[int, int]] = []  # (id of the body object, its length) per upload_part call

    class Recording:
        """The real client; records which buffer object each part was sent from."""

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def upload_part(self, **kw: Any) -> Any:
            bodies.append((id(kw["Body"]), len(kw["Body"])))
            return client.upload_part(**kw)

    chunk = os.urandom(3 * MiB + 7)  # writes straddle every 5 MiB part boundary
    sent = hashlib.sha256()
    with MultipartUpload(Recording(), bucket.name, "parts/exact", part_size=5 * MiB, max_inflight=1,
                         expected_size=40 * MiB) as up:
        for i in range(11):
            data = memoryview(chunk)[i:]  # a different length and offset every time
            up.write(data)
            sent.update(data)
        result = up.complete()
    total = sum(len(chunk) - i for i in range(11))
    assert result.bytes == total and result.sha256 == sent.hexdigest()
    sizes = [n for _, n in bodies]
    assert sizes[:-1] == [5 * MiB] * (len(sizes) - 1) and 0 < sizes[-1] <= 5 * MiB
    assert len(sizes) == -(-total // (5 * MiB))
    assert len({i for i, _ in bodies}) <= 2  # max_inflight + 1 buffers for 7 parts
    stored = client.get_object(Bucket=bucket.name, Key="parts/exact")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == sent.hexdigest()
