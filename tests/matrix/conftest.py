"""The version matrix: every test here runs on the server ``PG_MAJOR`` names (``make test-matrix`` loops over 13..18,
``make test`` runs them on the default version), as the non-superuser owner ``app_owner``.

Each test's outcome, wall time and failure message go to this version's results file (tests/support/matrix.py)
for the support table; nothing is written outside a matrix run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.support import matrix

ERROR_LINE = re.compile(r"(psycopg\.errors\.\w+|pg_partition\.[\w.]*\w+Error|\b\w+(?:Error|Exhausted)): .*")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    setattr(item, f"matrix_report_{report.when}", report)
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/matrix/" in item.nodeid:
            item.add_marker(pytest.mark.matrix)


@pytest.fixture(autouse=True)
def _record_outcome(request: pytest.FixtureRequest, cluster: Any) -> Iterator[None]:
    started = time.monotonic()
    yield
    item = request.node
    setup = getattr(item, "matrix_report_setup", None)
    call = getattr(item, "matrix_report_call", None)
    report = call if call is not None else setup
    outcome = report.outcome if report is not None else "error"
    message = ""
    if report is not None and report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash is not None else str(report.longrepr)).strip().splitlines()[0][:300]
        # a failed DAG run only says which task failed: add the first error its log recorded
        logged = ERROR_LINE.search("\n".join([report.caplog, report.capstderr, report.capstdout]))
        if logged and logged.group(0) not in message:
            message += f" -- {logged.group(0)[:300]}"
    matrix.record(cluster.primary.major, "scenarios", item.name,
                  {"outcome": outcome, "seconds": round(time.monotonic() - started, 1), "message": message})
