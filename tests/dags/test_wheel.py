"""pip alone gives working DAGs: build the wheel, install it into a FRESH venv in an empty directory (no
repository beside it, nothing of tests/ or dags/ importable), copy the shipped DAGs with
``python -m pg_partition.install_dags`` and load them with a DagBag there: zero import errors, every DAG.

Uses uv (already the repo's installer, see Makefile) with its warm cache, so the install takes seconds, not a
download of Airflow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.test_params_forms import EXPECTED_DAGS

pytestmark = pytest.mark.wheel

CHECK = """
import json, os, sys
from pathlib import Path
import pg_partition
assert "site-packages" in pg_partition.__file__, pg_partition.__file__
from pg_partition.install_dags import main
dags = Path(sys.argv[1])
main([str(dags)])
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=str(dags))
from pg_partition import settings
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
pm.initialize_providers_configuration()
info = pm.providers["airflow-provider-pg-partition"].data
from airflow.configuration import conf
result = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dags),
          "config_file": str(settings.config_file()),
          "files": sorted(p.name for p in dags.iterdir() if p.is_file()),
          "docs": info.get("documentation-url"), "config": sorted(info["config"]["pg_partition"]["options"]),
          "bucket_conf": conf.get("pg_partition", "default_bucket")}
Path(sys.argv[2]).write_text(json.dumps(result))
"""


def test_wheel_in_a_fresh_venv_provides_working_dags(tmp_path: Path) -> None:
    uv = shutil.which("uv") or shutil.which("uv", path=str(REPO / ".venv" / "bin"))
    assert uv, "uv is needed to build and install the wheel (make venv installs it)"
    dist = tmp_path / "dist"
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(dist), str(REPO)], check=True, capture_output=True,
                   text=True, timeout=300)
    wheel, = dist.glob("*.whl")
    names = set(subprocess.run(["unzip", "-Z1", str(wheel)], capture_output=True, text=True, check=True
                               ).stdout.split())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("pg_partition/example_dags/")}
    in_repo = {p.name for p in (REPO / "dags").iterdir() if p.suffix in (".py", ".yaml")}
    assert shipped == in_repo, "every dags/ file must be force-included in pyproject.toml"
    assert any(n.endswith("licenses/LICENSE") for n in names)

    work = tmp_path / "elsewhere"  # nothing of the repository here or on sys.path
    work.mkdir()
    venv = work / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PG_PARTITION", "PYTHON"))}
    subprocess.run([uv, "venv", "--quiet", "--python", "3.11", str(venv)], check=True, cwd=work, env=env,
                   timeout=120)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(wheel)],
                   check=True, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    home = work / "airflow-home"
    dags = work / "my-dags"
    env |= {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
    report = work / "report.json"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(dags), str(report)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["errors"] == {}
    assert set(result["dags"]) == EXPECTED_DAGS
    assert result["config_file"] == str(dags / "pg_partition.yaml")  # found through [core] dags_folder
    assert set(result["files"]) == in_repo
    assert result["docs"] and result["docs"].startswith("https://")
    assert result["config"] == ["config_file", "default_aws_conn_id", "default_bucket", "sql_log_level"]
    assert result["bucket_conf"] == "pg-partition-archive"  # the provider's declared default, via conf


def test_install_dags_never_overwrites_the_users_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pg_partition import install_dags

    shipped = [p for p in (REPO / "dags").iterdir() if p.suffix in (".py", ".yaml")]
    monkeypatch.setattr(install_dags, "shipped", lambda: sorted(shipped))
    target = tmp_path / "dags"
    assert set(install_dags.install(target).values()) == {"copied"}
    assert install_dags.install(target) == {p.name: "unchanged" for p in sorted(shipped)}
    (target / "pg_partition.yaml").write_text("version: 1\ntables: []\n")
    (target / "pg_partition_convert.py").write_text("# edited\n")
    again = install_dags.install(target, force=True)
    assert again["pg_partition.yaml"] == "kept" and again["pg_partition_convert.py"] == "copied"
    assert (target / "pg_partition.yaml").read_text() == "version: 1\ntables: []\n"
