"""The process that runs one step under the fault driver: ``python -m tests.faults.worker '<json>'``.

The JSON names the step (``module:function`` in tests/faults) and its context (DSN, S3 endpoint, bucket,
parameters). The step's function is the same one the driver calls in-process to re-run the step after the fault,
so "the task is run again" means exactly the same call. Environment: ``FAULT_POINT`` / ``FAULT_HOLD`` (see
points.py) and ``FAULT_DISKFULL=1``, which makes every local file write of this process fail with ENOSPC (the
archive must stream: it has no local dump path).
"""

from __future__ import annotations

import builtins
import errno
import importlib
import json
import logging
import os
import sys
import tempfile
from typing import Any

from tests.faults import points as fault_points


def _disk_full() -> None:
    """Every write to a local file raises ENOSPC, as on a full disk (reads, pipes, sockets, /dev are fine)."""

    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device (fault driver: disk full)")

    real_open = builtins.open
    real_os_open = os.open

    def is_device(path: Any) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(("/dev/", "/proc/"))

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+") and not isinstance(file, int) and not is_device(file):
            full()
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and not is_device(path):
            full()
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = guarded_open
    os.open = guarded_os_open  # type: ignore[assignment]
    for name in ("mkstemp", "mkdtemp", "TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile",
                 "TemporaryDirectory"):
        setattr(tempfile, name, full)


def resolve(name: str) -> Any:
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(f"tests.faults.{module}"), func)


def main() -> int:
    request = json.loads(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    step = resolve(request["step"])
    import boto3  # noqa: F401 - imported before the disk-full patch (it reads its data files)
    import psycopg  # noqa: F401

    if os.environ.get("FAULT_DISKFULL") == "1":
        _disk_full()
    pts = fault_points.from_env()
    with fault_points.installed(pts):
        result = step(request["ctx"])
    if os.environ.get("FAULT_TRACE") == "1":
        print("\n".join(f"POINT {t}" for t in pts.trace), file=sys.stderr, flush=True)
    print("FAULT:TOTAL", pts.count, flush=True)
    print("FAULT:RESULT", json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
