# Airflow 3.3 with the pg-partition provider installed (used by docker-compose.yml).
FROM apache/airflow:3.3.2-python3.11
# The target servers' major version: pg_dump/pg_restore of exactly this version are installed and no other, so
# the archive DAG (which takes the newest pg_dump it finds) never writes an archive that the servers' own
# pg_restore cannot read. docker-compose.yml passes the same number it uses for the postgres image tag.
ARG PG_MAJOR=15
USER root
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl; \
    install -d /usr/share/postgresql-common/pgdg; \
    curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
        https://www.postgresql.org/media/keys/ACCC4CF8.asc; \
    echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt $(. /etc/os-release; echo "$VERSION_CODENAME")-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list; \
    apt-get update; \
    apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}"; \
    for v in $(ls /usr/lib/postgresql); do \
        if [ "$v" != "${PG_MAJOR}" ]; then apt-get purge -y "postgresql-client-$v"; fi; \
    done; \
    test "$(ls /usr/lib/postgresql)" = "${PG_MAJOR}"; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" --version; \
    rm -rf /var/lib/apt/lists/*
ENV PG_BINDIR=/usr/lib/postgresql/${PG_MAJOR}/bin
USER airflow
# the wheel ships dags/ and LICENSE (pyproject.toml force-include), so they are part of the build context
COPY --chown=airflow:root pyproject.toml README.md LICENSE /opt/pg-partition/
COPY --chown=airflow:root provider /opt/pg-partition/provider
COPY --chown=airflow:root dags /opt/pg-partition/dags
RUN pip install --no-cache-dir /opt/pg-partition
