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


LONG_RUNNING = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                "airflow-db", "pg-primary", "pg-replica", "minio")


def test_compose_is_production_shaped(airflow_db: Path) -> None:
    """Healthchecks and restart policies like Airflow's official compose, pinned tags, persistent volumes."""
    compose = _compose()
    services = compose["services"]
    for name in LONG_RUNNING:
        assert services[name].get("restart") == "always", name
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, svc in services.items():
        image = svc.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    assert "airflow-logs:/opt/airflow/logs" in services["airflow-scheduler"]["volumes"]
    assert {"airflow-logs", "pg-primary-data", "minio-data"} <= set(compose["volumes"])
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-apiserver"):
        assert services[name]["depends_on"]["pg-primary"]["condition"] == "service_healthy", name
    # the provider's own config section, not ad-hoc variables
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__PG_PARTITION__CONFIG_FILE"] == "/opt/airflow/dags/pg_partition.yaml"
    assert not [k for k in env if k.startswith("PG_PARTITION_")]


def test_image_ships_client_tools_of_the_target_major_only(airflow_db: Path) -> None:
    services = _compose()["services"]
    target_major = services["pg-primary"]["image"].split(":")[1].split(".")[0]
    assert services["pg-replica"]["image"] == services["pg-primary"]["image"]
    build = services["airflow-scheduler"]["build"]
    assert build["args"]["PG_MAJOR"] == target_major
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'postgresql-client-${PG_MAJOR}' in dockerfile and 'test "$(ls /usr/lib/postgresql)" = "${PG_MAJOR}"' \
        in dockerfile
    assert "COPY --chown=airflow:root dags " in dockerfile  # the wheel force-includes dags/
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored) and "dags" not in ignored and "provider" not in ignored


def test_compose_seed_creates_the_table_the_defaults_convert(conn) -> None:
    """The init SQL mounted into pg-primary, run on a real server: the DAGs' default table with rows spread over
    26 months, the shape convert's defaults (created_at, month) accept; re-running it adds nothing."""
    from pg_partition.core import convert
    from pg_partition.core.convert.spec import ConvertSpec
    from pg_partition.core.db import catalog
    from pg_partition.core.db.catalog import QualifiedName

    services = _compose()["services"]
    mounts = services["pg-primary"]["volumes"]
    assert "./tools/compose/seed-demo.sql:/docker-entrypoint-initdb.d/20-seed-demo.sql:ro" in mounts
    seed = (REPO / "tools" / "compose" / "seed-demo.sql").read_text()
    conn.execute(seed)
    conn.execute(seed)  # idempotent
    assert conn.execute("SELECT count(*) FROM public.activities").fetchone() == (200_000,)
    months = conn.execute("SELECT count(DISTINCT date_trunc('month', created_at)) FROM activities").fetchone()[0]
    assert 26 <= months <= 27
    info = catalog.describe(conn, QualifiedName("public", "activities"))
    assert len(info.indexes) == 5
    report = convert.preflight(conn, ConvertSpec.create("public.activities", "created_at", period="month"))
    assert report["rows"] == 200_000 and not report["resuming"]
