"""pg-partition: online PostgreSQL partitioning, rotation and S3 archiving for Apache Airflow."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow's ProvidersManager through the entry point."""
    return {
        "package-name": "airflow-provider-pg-partition",
        "name": "PG Partition",
        "description": "Online conversion of PostgreSQL tables to declarative partitions, rotation and S3 archiving.",
        "versions": [__version__],
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
    }
