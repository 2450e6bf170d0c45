"""pg-partition: online PostgreSQL partitioning, rotation and S3 archiving for Apache Airflow."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The [pg_partition] section of airflow.cfg, read by pg_partition.settings. Plain data here: provider discovery
# must not import airflow.configuration (it runs while airflow.configuration initialises).
CONFIG_OPTIONS: dict[str, dict[str, str | None]] = {
    "config_file": {
        "description": "Path of the fleet config read by pg_partition_rotate and the cost report. Empty: "
        "pg_partition.yaml in [core] dags_folder. The environment variable PG_PARTITION_CONFIG overrides it.",
        "type": "string", "example": "/opt/airflow/config/pg_partition.yaml", "default": "",
    },
    "default_bucket": {
        "description": "S3 bucket the archive, restore and cost-report DAGs offer by default (a table's archive "
        "policy in the fleet config wins). PG_PARTITION_S3_BUCKET overrides it.",
        "type": "string", "example": "my-company-pg-archive", "default": "pg-partition-archive",
    },
    "default_aws_conn_id": {
        "description": "Airflow AWS connection the archive and restore DAGs offer by default. "
        "PG_PARTITION_AWS_CONN_ID overrides it.",
        "type": "string", "example": "aws_archive", "default": "aws_default",
    },
    "sql_log_level": {
        "description": "Level of the pg_partition.sql logger: the exact SQL of every statement is logged at INFO, "
        "per-batch statements of long loops at DEBUG. DEBUG shows both; WARNING hides the SQL.",
        "type": "string", "example": "DEBUG", "default": "INFO",
    },
}
# Where the README (installation, UI, rollback) is published.
DOCS_URL = "https://github.com/pg-partition/airflow-provider-pg-partition#readme"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow's ProvidersManager through the entry point."""
    return {
        "package-name": "airflow-provider-pg-partition",
        "name": "PG Partition",
        "description": "Online conversion of PostgreSQL tables to declarative partitions, rotation and S3 archiving.",
        "versions": [__version__],
        "documentation-url": DOCS_URL,
        "integrations": [
            {
                "integration-name": "PG Partition",
                "external-doc-url": "https://www.postgresql.org/docs/current/ddl-partitioning.html",
                "tags": ["software"],
            },
        ],
        "hooks": [
            {"integration-name": "PG Partition", "python-modules": ["pg_partition.hooks.partition"]},
        ],
        "operators": [
            {
                "integration-name": "PG Partition",
                "python-modules": [
                    "pg_partition.operators.advisor",
                    "pg_partition.operators.archive",
                    "pg_partition.operators.capture",
                    "pg_partition.operators.convert",
                    "pg_partition.operators.cost",
                    "pg_partition.operators.rotate",
                ],
            },
        ],
        "sensors": [
            {"integration-name": "PG Partition", "python-modules": ["pg_partition.sensors.lag"]},
        ],
        "triggers": [
            {"integration-name": "PG Partition", "python-modules": ["pg_partition.triggers.lag"]},
        ],
        "config": {
            "pg_partition": {
                "description": "pg-partition: where the fleet config lives, archive defaults, SQL log level.",
                "options": {name: {**option, "version_added": "0.1.0"} for name, option in CONFIG_OPTIONS.items()},
            },
        },
    }

