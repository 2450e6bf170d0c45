"""Deployment settings of the provider: the ``[pg_partition]`` section of airflow.cfg.

Why through ``airflow.configuration.conf``: operators set them once for every DAG, worker and the DAG processor,
the way every other Airflow setting is set (airflow.cfg or ``AIRFLOW__PG_PARTITION__<OPTION>``), and
``airflow config list`` shows them with their descriptions (declared in :func:`pg_partition.get_provider_info`).
The older variables ``PG_PARTITION_CONFIG``, ``PG_PARTITION_S3_BUCKET`` and ``PG_PARTITION_AWS_CONN_ID`` still
override them (documented; kept so existing deployments keep working).

The engine (``pg_partition.core``) never imports this module: it stays free of Airflow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from airflow.configuration import conf

from pg_partition import CONFIG_OPTIONS

SECTION = "pg_partition"
DEFAULT_BUCKET = str(CONFIG_OPTIONS["default_bucket"]["default"])
DEFAULT_AWS_CONN_ID = str(CONFIG_OPTIONS["default_aws_conn_id"]["default"])
CONFIG_FILENAME = "pg_partition.yaml"
SQL_LOGGER = "pg_partition.sql"

OPTIONS = CONFIG_OPTIONS  # declared in get_provider_info()["config"]


def _get(option: str) -> str:
    default = OPTIONS[option]["default"] or ""
    return str(conf.get(SECTION, option, fallback=default) or "").strip()


def dags_folder() -> Path:
    """``[core] dags_folder`` (airflow.cfg or AIRFLOW__CORE__DAGS_FOLDER, resolved by Airflow)."""
    return Path(os.path.expanduser(conf.get("core", "dags_folder")))


def config_file() -> Path:
    """The fleet config: $PG_PARTITION_CONFIG, else [pg_partition] config_file, else pg_partition.yaml in the
    DAGs folder."""
    env = os.environ.get("PG_PARTITION_CONFIG", "").strip()
    if env:
        return Path(env)
    configured = _get("config_file")
    return Path(os.path.expanduser(configured)) if configured else dags_folder() / CONFIG_FILENAME


def default_bucket() -> str:
    return os.environ.get("PG_PARTITION_S3_BUCKET", "").strip() or _get("default_bucket") or DEFAULT_BUCKET


def default_aws_conn_id() -> str:
    return os.environ.get("PG_PARTITION_AWS_CONN_ID", "").strip() or _get("default_aws_conn_id") \
        or DEFAULT_AWS_CONN_ID


def sql_log_level() -> int:
    """The configured level of the SQL logger (an unknown name falls back to INFO rather than failing a task)."""
    name = _get("sql_log_level").upper() or "INFO"
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def sql_logger() -> logging.Logger:
    """The engine's ``pg_partition.sql`` logger (the Executor's executed SQL), set to the configured level."""
    logger = logging.getLogger(SQL_LOGGER)
    logger.setLevel(sql_log_level())
    return logger
