"""Bad input to the local stack and the demo: a clear message, and nothing left running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools.stack import PgCluster, StackError, pg_bindir


def _postgres_processes_under(path: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "postgres" in line]


def test_port_taken_is_reported_and_nothing_is_left_running(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(StackError, match=rf"port {port} .* already in use"):
            PgCluster.create(tmp_path / "pg", primary_port=port)
    assert _postgres_processes_under(tmp_path) == []


def test_standby_port_taken_stops_the_primary_it_started(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(StackError, match="already in use"):
            PgCluster.create(tmp_path / "pg", standby_port=port)
    assert _postgres_processes_under(tmp_path) == []
    assert not (tmp_path / "pg" / "primary" / "postmaster.pid").exists()


def test_bad_pg_bindir_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(StackError, match=r"(?s)PG_BINDIR=.*How to fix"):
        pg_bindir()


def test_demo_with_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = dict(os.environ, DEMO_DIR=str(tmp_path / "demo"), DEMO_S3_PORT=str(port), DEMO_ROWS="1000")
        res = subprocess.run([sys.executable, "-m", "tools.demo", "run"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert f"port {port} for the S3 server is already in use" in res.stderr
    assert "How to fix" in res.stderr
    assert _postgres_processes_under(tmp_path) == []
