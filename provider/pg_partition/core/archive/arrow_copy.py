"""Parquet from PostgreSQL's binary COPY: Arrow record batches read by ADBC, streamed into a ParquetWriter.

Why: parsing CSV COPY text into Arrow cost the Parquet export ~5x the time of reading the stream; the ADBC
PostgreSQL driver decodes ``COPY ... TO STDOUT (FORMAT binary)`` straight into Arrow buffers in C.

Correctness rules kept here:

* **Same snapshot.** ADBC opens its own session; it runs ``BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY``
  then ``SET TRANSACTION SNAPSHOT`` with the id :func:`export.snapshot` exported, so it reads exactly the rows the
  row count (and any pg_dump) saw. Both sessions' ``txid_current_snapshot()`` are compared before any byte is
  written.
* **No secret in a string.** ADBC takes one connection string: it carries no password. A password travels in a
  private passfile (mode 0600 in a 0700 directory, removed once connected), named by ``passfile=``. A connection
  with ``sslpassword`` (no libpq file or option can carry it without the process environment) uses the CSV path.
* **Exact types.** Columns the archive stores as text are cast to text by the server (the same text the CSV path
  wrote); native columns must arrive as exactly the archive schema's Arrow type, except constrained numerics,
  which ADBC hands over as their exact decimal text and Arrow casts to ``decimal128(p, s)`` (a value that does not
  fit fails loudly). Any other mismatch is found from the result schema before a byte is written, and the table
  goes through the CSV path (logged). Dates and timestamps outside Arrow's range (``infinity``) would wrap
  silently in the driver: every batch is checked and such a value stops the export with a clear error.
* **Bounded memory.** Batches of about ``batch_bytes`` (1 MiB: the driver holds 2-3x a batch while decoding it;
  measured peak RSS of a whole export 197 MB against 217 MB with 4 MiB batches, 2 queued, no slower); one reader
  thread decodes the next batch while this thread encodes Parquet, with at most ``queue_depth`` batches between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Generator, Iterator
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.archive.policy import MiB
from pg_partition.core.archive.tools import libpq_params, private_file, remove_private_file
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import PartitionError

log = logging.getLogger("pg_partition")

# days since 1970 of 4713-11-24 BC, PostgreSQL's first date; the driver wraps infinity below it
_MIN_DATE_DAYS = -2_440_588
_MIN_TIMESTAMP_US = _MIN_DATE_DAYS * 86_400_000_000


ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
_pool_checked = False


def load_pyarrow() -> Any:
    """Import pyarrow with jemalloc as Arrow's C++ default allocator, releasing freed memory at once.

    Why: Arrow's C++ code (the Parquet writer's pages and compression buffers, compute kernels) allocates from
    ``arrow::default_memory_pool()``, which is chosen once, from ``ARROW_DEFAULT_MEMORY_POOL``, when pyarrow is
    first imported; ``pyarrow.set_memory_pool`` later changes only pyarrow's own calls. The wheel's default,
    mimalloc, kept about 25-30 MB of freed pages resident during a Parquet export whose Arrow allocations peak at
    about 5 MB (measured: peak RSS 191 MB with mimalloc, 167-170 MB with jemalloc and decay 0, same 2M-row
    export). So the environment variable is set, unless the user chose a pool, before the process's first
    ``import pyarrow``; every pyarrow import in the archive code goes through here. When pyarrow was already
    loaded with another allocator, the export still works and says once how to get the lower peak.
    """
    global _pool_checked
    if _pool_checked:  # called per record batch: the pool is looked at once per process
        import pyarrow as pa

        return pa
    if "pyarrow" not in sys.modules:
        os.environ.setdefault(ARROW_POOL_ENV, "jemalloc")
    import pyarrow as pa

    _pool_checked = True
    backend = pa.default_memory_pool().backend_name
    if backend == "jemalloc":
        pa.jemalloc_set_decay_ms(0)  # freed pages go back to the OS at once instead of after a second
    elif os.environ.get(ARROW_POOL_ENV) is None:
        log.info("pyarrow was loaded before pg-partition with the %s allocator, which keeps freed memory "
                 "resident (about 25 MB more peak RSS in a Parquet export); set %s=jemalloc in the worker's "
                 "environment to avoid it", backend, ARROW_POOL_ENV)
    return pa


class AdbcUnavailable(Exception):
    """ADBC cannot export this table exactly; the message says why (the CSV path is used instead)."""


def driver_missing() -> str | None:
    """Why the ADBC PostgreSQL driver cannot be used here, or None when it can."""
    try:
        import adbc_driver_manager  # noqa: F401
        import adbc_driver_postgresql  # noqa: F401
    except ImportError as exc:
        return f"adbc-driver-postgresql is not installed ({exc})"
    return None


def _passfile_line(password: str) -> str:
    r"""A ``.pgpass`` line matching any host, port, database and user (``\`` and ``:`` escaped)."""
    return "*:*:*:*:" + password.replace("\\", "\\\\").replace(":", "\\:") + "\n"


@contextlib.contextmanager
def adbc_conninfo(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A libpq connection string for ADBC reaching ``conn``'s database as ``conn``'s role, with no secret in it.

    The password (if any) is written to a private passfile named by ``passfile=``; the file and its directory are
    removed when the block ends (the caller connects inside it).
    """
    secrets = conn.info.get_parameters()
    if secrets.get("sslpassword"):
        raise AdbcUnavailable("the connection uses sslpassword, which only pg_dump's environment can carry")
    params = libpq_params(conn)
    path = None
    password = conn.info.password
    if password:
        if "\n" in password or "\r" in password:
            raise AdbcUnavailable("the password contains a line break (a passfile cannot hold it)")
        path = params["passfile"] = private_file("pgpass", _passfile_line(password))
    try:
        yield psycopg.conninfo.make_conninfo(**params)
    finally:
        remove_private_file(path)


class Session:
    """One ADBC PostgreSQL connection through the driver manager's low-level API.

    Why not ``adbc_driver_manager.dbapi``: it imports ``pyarrow.dataset`` (about 14 MB of resident memory in a
    process that must stay under 200 MB) for nothing this export uses.
    """

    def __init__(self, conninfo: str) -> None:
        import adbc_driver_manager
        import adbc_driver_postgresql

        self._statements: list[Any] = []
        self._db = adbc_driver_postgresql.connect(conninfo)
        try:
            self._conn = adbc_driver_manager.AdbcConnection(self._db)  # autocommit: we send BEGIN ourselves
        except BaseException:
            self._db.close()
            raise

    def run(self, statement: str) -> None:
        """A statement with no result set (result queries travel as COPY, which BEGIN/SET cannot be)."""
        import adbc_driver_manager

        with adbc_driver_manager.AdbcStatement(self._conn) as stmt:
            stmt.set_sql_query(statement)
            stmt.execute_update()

    def query(self, statement: str, options: dict[str, str] | None = None) -> Any:
        """A ``pyarrow.RecordBatchReader`` over the statement's rows (read from the binary COPY stream)."""
        import adbc_driver_manager

        pa = load_pyarrow()
        stmt = adbc_driver_manager.AdbcStatement(self._conn)
        self._statements.append(stmt)  # closing it would invalidate the reader: closed with the session
        if options:
            stmt.set_options(**options)
        stmt.set_sql_query(statement)
        handle, _ = stmt.execute_query()
        return pa.RecordBatchReader._import_from_c(handle.address)

    def close(self) -> None:
        try:
            for stmt in self._statements:
                with contextlib.suppress(Exception):
                    stmt.close()
            self._conn.close()
        finally:
            self._db.close()


@contextlib.contextmanager
def snapshot_session(conn: psycopg.Connection[Any], snapshot: str) -> Iterator[Session]:
    """An ADBC session inside a read-only REPEATABLE READ transaction that imported ``snapshot``.

    ``conn`` must be inside :func:`export.snapshot`'s transaction (the exporter of ``snapshot``). The session
    settings match that transaction's (UTC, ISO dates, postgres intervals, exact floats, no synchronized scans),
    so text casts print exactly what the CSV path printed and a resumed upload reads rows in the same order.
    """
    if not snapshot.replace("-", "").isalnum():  # pg_export_snapshot() ids are hex and dashes
        raise PartitionError(f"unexpected snapshot id {snapshot!r}")
    import adbc_driver_manager

    with adbc_conninfo(conn) as conninfo:
        try:
            session = Session(conninfo)
        except adbc_driver_manager.Error as exc:  # psycopg reached this server with these parameters
            raise AdbcUnavailable(f"the ADBC driver could not connect ({exc})") from exc
    try:
        session.run("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        session.run(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        for setting in ("TimeZone = 'UTC'", "DateStyle = 'ISO, YMD'", "IntervalStyle = 'postgres'",
                        "extra_float_digits = 3", "synchronize_seqscans = off", "row_security = off"):
            session.run(f"SET LOCAL {setting}")
        theirs = session.query("SELECT txid_current_snapshot()::text AS s").read_all().column(0).to_pylist()
        ours = conn.execute("SELECT txid_current_snapshot()::text").fetchone()
        if ours is None or theirs != [ours[0]]:
            raise PartitionError(f"the ADBC session sees snapshot {theirs} but the export's is {ours}",
                                 fix="nothing was written; the next attempt starts over")
        yield session
    finally:
        with contextlib.suppress(Exception):
            session.run("ROLLBACK")
        session.close()


def select_list(columns: list[Any]) -> sql.Composable:
    """Columns stored as text are cast by the server (the CSV path's exact text); the rest travel natively."""
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c.name)) if c.as_text
                              else sql.Identifier(c.name) for c in columns)


def plan_casts(source: Any, target: Any) -> list[str]:
    """Per column: ``keep`` (same Arrow type) or ``decimal`` (exact decimal text -> decimal128).

    Raises :class:`AdbcUnavailable` naming the first column that ADBC would not deliver exactly.
    """
    pa = load_pyarrow()

    plan = []
    for src, dst in zip(source, target, strict=True):
        kind = src.type.storage_type if isinstance(src.type, pa.BaseExtensionType) else src.type
        if kind.equals(dst.type):
            plan.append("keep")
        elif pa.types.is_decimal(dst.type) and pa.types.is_string(kind):
            plan.append("decimal")
        else:
            raise AdbcUnavailable(f"column {dst.name!r} arrives from ADBC as {src.type}, the archive stores "
                                  f"{dst.type}")
    return plan


def convert(batch: Any, target: Any, plan: list[str]) -> Any:
    """One ADBC batch -> the archive schema (decimal casts, range checks); raises on a value Arrow cannot hold."""
    pa = load_pyarrow()
    import pyarrow.compute as pc

    arrays = []
    for i, (field, how) in enumerate(zip(target, plan, strict=True)):
        col = batch.column(i)
        if isinstance(col, pa.ExtensionArray):
            col = col.storage
        if how == "decimal":
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise PartitionError(f"column {field.name!r} holds a value that {field.type} cannot hold "
                                     f"exactly (NaN?): {exc}",
                                     fix="archive this table with format: pg_dump") from exc
        elif (pa.types.is_date32(field.type) or pa.types.is_timestamp(field.type)) and col.null_count < len(col):
            low = pc.min(col.view(pa.int32() if pa.types.is_date32(field.type) else pa.int64())).as_py()
            if low is not None and low < (_MIN_DATE_DAYS if pa.types.is_date32(field.type) else _MIN_TIMESTAMP_US):
                raise PartitionError(f"column {field.name!r} holds infinity or a value beyond Parquet's "
                                     "date/timestamp range", fix="archive this table with format: pg_dump")
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=target)


_END = object()


def stream_batches(session: Session, table: QualifiedName, columns: list[Any], target: Any, *,
                   batch_bytes: int = MiB, queue_depth: int = 1) -> Generator[Any, None, None]:
    """Yield the table's rows as record batches of the archive schema, read on a background thread.

    The query's result schema is checked before the first batch is read (:class:`AdbcUnavailable` then, with
    nothing read yet). Closing the generator early stops the reader thread.
    """
    query = sql.SQL("SELECT {} FROM {}").format(select_list(columns), table.ident).as_string(None)
    log.debug("ADBC query (binary COPY): %s", query)
    reader = session.query(query, {"adbc.postgresql.batch_size_hint_bytes": str(batch_bytes)})
    try:
        plan = plan_casts(reader.schema, target)
    except BaseException:
        reader.close()
        raise
    out: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in reader:
                if not put(convert(batch, target, plan)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=read, name="adbc-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            reader.close()
