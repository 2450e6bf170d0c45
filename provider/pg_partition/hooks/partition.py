"""PartitionHook: hands the engine a plain psycopg 3 connection built from an Airflow Postgres connection."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from psycopg.rows import tuple_row

APPLICATION_NAME = "pg_partition"
SESSION_SETTINGS = ("SELECT set_config('application_name', %s, false), "
                    "set_config('standard_conforming_strings', 'on', false), set_config('row_security', 'off', false)")

# botocore at DEBUG logs every request's headers and the string it signs: the access key id (Credential=...), the
# signature and, with temporary credentials, the session token itself. A deployment that turns DEBUG on to see our
# per-batch SQL must not get those in its task logs, so these loggers' records are redacted.
_AWS_SECRETS = (
    re.compile(r"(Credential=)[^/\s,'\"]+"),
    re.compile(r"(Signature=)[0-9a-fA-F]+"),
    re.compile(r"((?:X-Amz-Security-Token|x-amz-security-token)['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+"),
)
_BOTOCORE_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.awsrequest", "botocore.httpsession",
                     "botocore.hooks", "botocore.retryhandler")


class RedactAwsCredentials(logging.Filter):
    """Replaces access key ids, signatures and session tokens in botocore's DEBUG records by ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is botocore's to report, not ours
            return True
        redacted = message
        for pattern in _AWS_SECRETS:
            redacted = pattern.sub(r"\1[redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_aws_debug_logs() -> None:
    """Install :class:`RedactAwsCredentials` on botocore's request loggers (idempotent)."""
    for name in _BOTOCORE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactAwsCredentials) for f in logger.filters):
            logger.addFilter(RedactAwsCredentials())


redact_aws_debug_logs()  # every pg-partition task imports this module (operators/base.py)


class PartitionHook(PostgresHook):
    """A PostgresHook whose connections are what ``pg_partition.core`` expects.

    The engine reads rows as tuples and manages its own transactions, so a ``cursor`` extra on the Airflow
    connection (dict rows) is overridden, and the session is tagged ``application_name = pg_partition`` so
    DBAs can tell our sessions apart in ``pg_stat_activity`` and lock reports.
    """

    hook_name = "PG Partition"

    @contextmanager
    def open(self, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
        conn = self.get_conn()
        if not isinstance(conn, psycopg.Connection):  # pragma: no cover - psycopg2 is never used on Airflow 3.3
            raise TypeError("pg-partition needs psycopg 3 (install psycopg[binary] and SQLAlchemy 2)")
        try:
            conn.row_factory = tuple_row  # type: ignore[assignment]
            conn.autocommit = autocommit
            # One round trip for the three session settings (every task opens at least one connection):
            # - application_name: DBAs tell our sessions apart in pg_stat_activity and lock reports;
            # - standard_conforming_strings on: literals we print (validated filters, bounds) are meant to be read
            #   the standard way;
            # - row_security off: a table with FORCE ROW LEVEL SECURITY would silently hide rows from its owner's
            #   fill, verify or copy-back; with it off such a query fails instead of returning fewer rows.
            conn.execute(SESSION_SETTINGS, (APPLICATION_NAME,))
            if not autocommit:
                conn.commit()
            yield conn
        finally:
            conn.close()

    def conninfo(self) -> str:
        """A libpq connection string for the same connection, without the password (it would end up in logs,
        XCom or a child's command line); libpq finds it in ``PGPASSWORD`` or a passfile, see :meth:`secret_env`."""
        c = self.connection  # the Airflow Connection (DbApiHook's cached property)
        parts = {
            "host": c.host or "localhost", "port": c.port or 5432, "user": c.login,
            "dbname": self.database or c.schema, "application_name": APPLICATION_NAME,
        }
        return psycopg.conninfo.make_conninfo(**{k: v for k, v in parts.items() if v not in (None, "")})

    def secret_env(self) -> dict[str, str]:
        """The environment entries carrying the connection's password for a child process or a connection made
        from :meth:`conninfo` (``PGPASSWORD``; empty when the connection has none)."""
        password = self.connection.password
        return {"PGPASSWORD": password} if password else {}
