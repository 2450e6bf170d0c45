"""Fault-matrix plumbing: the ``faults`` marker, per-cell results, and the step x fault table printed at the end.

``pytest tests`` runs every cell once (the reduced matrix CI runs inside ``make test``); ``make faults`` runs
``pytest tests/faults -m faults`` with FAULT_SEED and FAULT_TRIALS (trials per cell). FAULT_TRIAL_SEED=<seed>
replays one trial (the table prints the first failing trial's seed) and ``-k`` selects cells.
"""

from __future__ import annotations

from typing import Any

import pytest

RESULTS: dict[tuple[str, str], dict[str, Any]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: the fault matrix (tests/faults); FAULT_TRIALS sets trials per cell")


def table() -> list[str]:
    from tests.faults import matrix
    from tests.faults.driver import base_seed, trials

    width = 24
    head = f"{'step':<{width}}" + "".join(f"| {f:<28}" for f in matrix.FAULTS)
    lines = [f"fault matrix (FAULT_SEED={base_seed()}, FAULT_TRIALS={trials()}): trials/passed, first failing seed",
             head, "-" * len(head)]
    for step in matrix.STEPS:
        row = f"{step:<{width}}"
        for fault in matrix.FAULTS:
            cell = matrix.lookup(step, fault)
            res = RESULTS.get((step, fault))
            if cell is None:
                text = "N/A"
            elif res is None:
                text = "not run"
            else:
                text = f"{res['trials']}/{res['passed']}"
                if res["first_failure_seed"] is not None:
                    text += f" seed={res['first_failure_seed']}"
                if cell.xfail:
                    text += " (xfail)"
            row += f"| {text:<28}"
        lines.append(row)
    lines.append("N/A: " + "; ".join(f"{k}: {v}" for k, v in matrix.NOT_APPLICABLE.items()))
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.write_sep("=", "fault matrix")
    for line in table():
        terminalreporter.write_line(line)
