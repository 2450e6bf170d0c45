"""README.md's configuration reference is generated from the DAGs and the config models: it must be current."""

from __future__ import annotations

from pathlib import Path

from tools import docs


def test_readme_reference_matches_the_code(airflow_db: Path) -> None:
    assert docs.main(["docs", "--check"]) == 0, "README.md is stale: run `.venv/bin/python -m tools.docs`"
