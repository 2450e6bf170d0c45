# Airflow 3.3 with the pg-partition provider installed (used by docker-compose.yml).
FROM apache/airflow:3.3.2-python3.11
USER root
# pg_dump/pg_restore for the archive DAGs: must be at least the target server's major version.
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client-15 \
    && rm -rf /var/lib/apt/lists/*
USER airflow
COPY --chown=airflow:root pyproject.toml README.md /opt/pg-partition/
COPY --chown=airflow:root provider /opt/pg-partition/provider
RUN pip install --no-cache-dir /opt/pg-partition
