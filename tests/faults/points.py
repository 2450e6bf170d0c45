"""Fault points: every database statement and every S3 API call a step makes is a numbered point.

The fault driver picks one point (seeded) and the process running the step stops there: it prints a marker and
waits, so the driver can SIGKILL it, restart PostgreSQL or stop S3 at that exact place (between two statements of
an open transaction, between two parts of an upload, ...). Counting happens by patching
``psycopg.Connection.execute``, ``psycopg.Cursor.copy`` and botocore's ``BaseClient._make_api_call`` in the
process running the step: the engine itself is untouched.

The same counter runs in-process (without stopping) to calibrate a step: how many points it has and which phase
each belongs to (the archive's upload / verify / drop stages are told apart by the queue status it writes).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MARK = "FAULT:AT"


class Points:
    """Counts points per kind; at point ``target`` (kind, n: the n-th point of that kind) prints the marker and
    (``hold``) waits for a line on stdin.

    Per kind, because S3 parts are uploaded from worker threads while the main thread talks to PostgreSQL: the
    interleaving of the two kinds varies from run to run, the order within each kind does not.
    """

    def __init__(self, target: tuple[str, int] = ("", 0), hold: bool = False) -> None:
        self.target = target
        self.hold = hold
        self.count = 0
        self.per_kind: dict[str, int] = {}
        self.phase = "main"
        self.labels: list[str] = []
        self.trace: list[str] = []
        self._lock = threading.Lock()

    def hit(self, kind: str, label: str) -> None:
        with self._lock:
            self.count += 1
            n = self.per_kind[kind] = self.per_kind.get(kind, 0) + 1
            self.labels.append(f"{self.phase}|{kind}")
            self.trace.append(f"{kind}#{n} {self.phase} {' '.join(label.split())[:100]}")
        if (kind, n) == self.target:
            print(f"{MARK} {kind}#{n} {self.phase} {' '.join(label.split())[:160]}", flush=True)
            if self.hold:
                sys.stdin.readline()  # the driver writes a line (or SIGKILLs us first)

    def after_db(self, text: str, params: Any) -> None:
        """Phase changes of the archive queue: a status written means the next stage starts."""
        if isinstance(params, dict) and "archive_queue" in text:
            status = params.get("status")
            if status == "uploading":
                self.phase = "upload"
            elif status == "uploaded":
                self.phase = "verify"
            elif status == "verified":
                self.phase = "drop"


def _text(conn: Any, query: Any) -> str:
    if isinstance(query, str):
        return query
    try:
        return str(query.as_string(conn))
    except Exception:  # pragma: no cover - a label only
        return repr(query)


@contextmanager
def installed(points: Points) -> Iterator[Points]:
    """Patch psycopg and botocore so every statement and S3 call goes through ``points``."""
    import psycopg
    from botocore.client import BaseClient

    orig_execute: Callable[..., Any] = psycopg.Connection.execute
    orig_copy: Callable[..., Any] = psycopg.Cursor.copy
    orig_api: Callable[..., Any] = BaseClient._make_api_call

    def execute(self: Any, query: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        text = _text(self, query)
        points.hit("db", text)
        cur = orig_execute(self, query, params, *args, **kwargs)
        points.after_db(text, params)
        return cur

    def copy(self: Any, statement: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        points.hit("db", _text(self.connection, statement))
        return orig_copy(self, statement, params, *args, **kwargs)

    def api(self: Any, operation_name: str, api_params: Any) -> Any:
        points.hit("s3", operation_name)
        return orig_api(self, operation_name, api_params)

    psycopg.Connection.execute = execute  # type: ignore[method-assign]
    psycopg.Cursor.copy = copy  # type: ignore[method-assign]
    BaseClient._make_api_call = api  # type: ignore[method-assign]
    try:
        yield points
    finally:
        psycopg.Connection.execute = orig_execute  # type: ignore[method-assign]
        psycopg.Cursor.copy = orig_copy  # type: ignore[method-assign]
        BaseClient._make_api_call = orig_api  # type: ignore[method-assign]


def from_env() -> Points:
    """FAULT_POINT=<kind>:<n> (e.g. ``s3:3``); empty: count only."""
    kind, _, n = (os.environ.get("FAULT_POINT") or ":0").partition(":")
    return Points((kind, int(n or 0)), os.environ.get("FAULT_HOLD", "1") == "1")
