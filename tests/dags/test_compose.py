"""docker-compose.yml must wire what the DAGs expect: services, ports and connection ids.

No Docker engine runs here, so the stack itself cannot be started; `docker-compose config -q` (run by .ci/run)
validates the syntax and this test validates the content against the DAGs in dags/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _conn_ids_expected_by_dags() -> set[str]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    ids: set[str] = set()
    for dag in bag.dags.values():
        for name, param in dag.params.items():
            if name.endswith("conn_id") and isinstance(param.value, str) and param.value:
                ids.add(param.value)
    config = REPO / "dags" / "pg_partition.yaml"
    if config.exists():
        text = yaml.safe_load(config.read_text()) or {}
        for entry in [text.get("defaults") or {}, *text.get("tables", [])]:
            if "conn_id" in entry:
                ids.add(entry["conn_id"])
            if (entry.get("archive") or {}).get("aws_conn_id"):
                ids.add(entry["archive"]["aws_conn_id"])
    return ids


def test_compose_services_and_ports(airflow_db: Path) -> None:
    services = _compose()["services"]
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-db", "pg-primary", "pg-replica", "minio", "minio-bucket"):
        assert name in services, name
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-triggerer"]["command"] == "triggerer"
    assert "wal_level=logical" in services["pg-primary"]["command"]
    assert "pg_basebackup" in services["pg-replica"]["command"][-1]
    assert "./dags:/opt/airflow/dags" in services["airflow-scheduler"]["volumes"]


def test_compose_defines_every_connection_the_dags_use(airflow_db: Path) -> None:
    services = _compose()["services"]
    env = services["airflow-scheduler"]["environment"]
    defined = {k[len("AIRFLOW_CONN_"):].lower(): json.loads(v) for k, v in env.items()
               if k.startswith("AIRFLOW_CONN_")}
    expected = _conn_ids_expected_by_dags()
    assert {"pg_demo", "aws_default"} <= expected
    assert expected <= set(defined), f"missing in docker-compose.yml: {expected - set(defined)}"
    for conn in defined.values():
        if conn["conn_type"] == "postgres":
            assert conn["host"] in services and conn["port"] == 5432
        if conn["conn_type"] == "aws":
            host = conn["extra"]["endpoint_url"].split("//")[1].split(":")[0]
            assert host in services
