"""The provider's [pg_partition] settings, read through airflow.configuration (env AIRFLOW__... included)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pg_partition import CONFIG_OPTIONS, get_provider_info, settings


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PG_PARTITION_CONFIG", "PG_PARTITION_S3_BUCKET", "PG_PARTITION_AWS_CONN_ID",
                "AIRFLOW__PG_PARTITION__CONFIG_FILE", "AIRFLOW__PG_PARTITION__DEFAULT_BUCKET",
                "AIRFLOW__PG_PARTITION__SQL_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)


def test_config_file_follows_core_dags_folder_then_the_option_then_the_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(tmp_path / "dags"))
    assert settings.config_file() == tmp_path / "dags" / "pg_partition.yaml"
    monkeypatch.setenv("AIRFLOW__PG_PARTITION__CONFIG_FILE", str(tmp_path / "fleet.yaml"))
    assert settings.config_file() == tmp_path / "fleet.yaml"
    monkeypatch.setenv("PG_PARTITION_CONFIG", str(tmp_path / "override.yaml"))
    assert settings.config_file() == tmp_path / "override.yaml"


def test_bucket_and_sql_level(monkeypatch) -> None:
    assert settings.default_bucket() == "pg-partition-archive" == CONFIG_OPTIONS["default_bucket"]["default"]
    monkeypatch.setenv("AIRFLOW__PG_PARTITION__DEFAULT_BUCKET", "corp-archive")
    assert settings.default_bucket() == "corp-archive"
    monkeypatch.setenv("PG_PARTITION_S3_BUCKET", "legacy")
    assert settings.default_bucket() == "legacy"
    assert settings.sql_log_level() == logging.INFO
    monkeypatch.setenv("AIRFLOW__PG_PARTITION__SQL_LOG_LEVEL", "debug")
    assert settings.sql_logger().level == logging.DEBUG and settings.sql_logger().name == "pg_partition.sql"
    monkeypatch.setenv("AIRFLOW__PG_PARTITION__SQL_LOG_LEVEL", "loud")
    assert settings.sql_log_level() == logging.INFO  # unknown: INFO, not a failed task


def test_provider_info_declares_the_section() -> None:
    info = get_provider_info()
    options = info["config"]["pg_partition"]["options"]
    assert set(options) == {"config_file", "default_bucket", "default_aws_conn_id", "sql_log_level"}
    assert all(o["description"] and o["version_added"] and "default" in o for o in options.values())
    assert info["documentation-url"].startswith("https://")
