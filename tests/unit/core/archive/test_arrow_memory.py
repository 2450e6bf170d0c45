"""Which allocator Arrow's C++ code uses in a process that exports Parquet (each case in a fresh interpreter).

Why a fresh process: Arrow picks its C++ default pool once, when pyarrow is first imported; this test process
imported pyarrow long ago. ``pyarrow.set_memory_pool`` (what the export used to call) only changes pyarrow's own
calls: the Parquet writer's pages then still came from mimalloc, which kept ~25-30 MB of freed memory resident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Writes ~3 MB of Parquet and reports each pool's peak: shows where the writer's buffers really came from.
WRITE_AND_REPORT = """
import io, json, logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
{prelude}
from pg_partition.core.archive import arrow_copy
pa = arrow_copy.load_pyarrow()
import pyarrow.parquet as pq
arrow_copy.load_pyarrow()  # a second export in the same process
table = pa.table({{"id": pa.array(range(300_000), pa.int64()), "s": pa.array([str(i) for i in range(300_000)])}})
pq.write_table(table, io.BytesIO(), compression="zstd")
peaks = {{name: getattr(pa, name + "_memory_pool")().max_memory() for name in ("jemalloc", "mimalloc", "system")}}
print(json.dumps({{"backend": pa.default_memory_pool().backend_name, "peaks": peaks}}))
"""


def _run(prelude: str = "", **env: str) -> tuple[dict[str, object], str]:
    environ = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"} | env
    res = subprocess.run([sys.executable, "-c", WRITE_AND_REPORT.format(prelude=prelude)], capture_output=True,
                         text=True, env=environ, check=True, timeout=120)
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def test_the_parquet_writer_allocates_from_jemalloc_when_the_archive_code_loads_pyarrow() -> None:
    report, err = _run()
    assert report["backend"] == "jemalloc"
    peaks = report["peaks"]
    assert isinstance(peaks, dict)
    assert peaks["jemalloc"] > 1_000_000  # the writer's pages and compression buffers
    assert peaks["mimalloc"] == 0 and peaks["system"] == 0
    assert "allocator" not in err  # nothing to warn about


def test_a_pool_the_user_chose_is_kept() -> None:
    report, _ = _run(ARROW_DEFAULT_MEMORY_POOL="system")
    assert report["backend"] == "system"
    peaks = report["peaks"]
    assert isinstance(peaks, dict)
    assert peaks["system"] > 1_000_000 and peaks["jemalloc"] == 0


def test_pyarrow_loaded_earlier_keeps_its_pool_and_the_log_says_how_to_change_it() -> None:
    report, err = _run(prelude="import pyarrow")
    assert report["backend"] == "mimalloc"  # the wheel's default; the export still works
    assert "ARROW_DEFAULT_MEMORY_POOL=jemalloc" in err
    assert err.count("keeps freed memory") == 1  # once per process, not per call
