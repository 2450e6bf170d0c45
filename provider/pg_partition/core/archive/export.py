"""Exporters: one snapshot, then pg_dump custom format, Parquet or CSV-gzip streamed into an upload."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.archive import arrow_copy
from pg_partition.core.archive.policy import MiB
from pg_partition.core.archive.s3 import MultipartUpload
from pg_partition.core.archive.tools import (
    PgTool,
    TailReader,
    dump_pattern,
    grow_pipe,
    libpq_target,
    release_target,
)
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    InvalidInputError,
    PartitionError,
)
from pg_partition.core.db.execute import Progress

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- snapshot


@contextlib.contextmanager
def snapshot(conn: psycopg.Connection[Any], table: QualifiedName) -> Iterator[tuple[str, int]]:
    """A read-only REPEATABLE READ transaction: its exported snapshot id and the table's row count in it.

    pg_dump ``--snapshot`` and our own COPY read that very snapshot, so the count is the dump's count.
    """
    if not conn.autocommit:
        raise InvalidInputError("the archive engine needs an autocommit connection",
                                fix="open it with autocommit=True (PartitionHook.open() does)")
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        conn.execute("SET LOCAL IntervalStyle = 'postgres'")
        conn.execute("SET LOCAL extra_float_digits = 3")
        # the same rows in the same order on every attempt (no scan joining another one mid-table), so a resumed
        # upload regenerates byte-identical parts for what S3 already holds
        conn.execute("SET LOCAL synchronize_seqscans = off")
        row = conn.execute(sql.SQL("SELECT pg_export_snapshot(), (SELECT count(*) FROM {})").format(table.ident)
                           ).fetchone()
        assert row is not None
        yield str(row[0]), int(row[1])


# --------------------------------------------------------------------------------------------------- exporters


@dataclass(frozen=True)
class ExportColumn:
    """One exported column: how it is selected, read back by psycopg, and typed in Arrow."""

    name: str
    pg_type: str  # format_type(), e.g. 'numeric(12,2)', 'timestamp with time zone'
    typname: str
    as_text: bool  # exported as its PostgreSQL text form (types with no faithful Arrow equivalent)
    not_null: bool
    precision: int | None = None
    scale: int | None = None


_ARROW_NATIVE = {"int2", "int4", "int8", "float4", "float8", "bool", "text", "varchar", "bpchar", "date",
                 "timestamp", "timestamptz", "time", "bytea", "numeric"}
def export_columns(conn: psycopg.Connection[Any], table: QualifiedName) -> list[ExportColumn]:
    """Columns that an export carries (generated columns are left out: restore recomputes them)."""
    oid = catalog.table_oid(conn, table)
    if oid is None:
        raise InvalidInputError(f"table {table} does not exist", fix="check the archive queue row / table name")
    rows = conn.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, a.atttypmod, a.attnotnull,
                  t.typtype
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
           ORDER BY a.attnum""",
        (oid,),
    ).fetchall()
    out = []
    for name, pg_type, typname, typmod, not_null, typtype in rows:
        precision = scale = None
        native = typtype == "b" and typname in _ARROW_NATIVE
        if typname == "numeric":
            if typmod >= 4 and ((typmod - 4) >> 16) & 0xFFFF <= 38:
                precision, scale = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
            else:
                native = False  # unconstrained or > 38 digits: no lossless Arrow decimal
        out.append(ExportColumn(name, pg_type, typname, not native, not_null, precision, scale))
    return out


def arrow_schema(columns: list[ExportColumn]) -> Any:
    pa = arrow_copy.load_pyarrow()

    def arrow_type(c: ExportColumn) -> Any:
        if c.as_text:
            return pa.string()
        return {
            "int2": pa.int16(), "int4": pa.int32(), "int8": pa.int64(), "float4": pa.float32(),
            "float8": pa.float64(), "bool": pa.bool_(), "text": pa.string(), "varchar": pa.string(),
            "bpchar": pa.string(), "date": pa.date32(), "timestamp": pa.timestamp("us"),
            "timestamptz": pa.timestamp("us", tz="UTC"), "time": pa.time64("us"), "bytea": pa.binary(),
        }.get(c.typname) or pa.decimal128(c.precision or 38, c.scale or 0)

    meta = {"pg_partition.columns": json.dumps([{"name": c.name, "type": c.pg_type, "as_text": c.as_text}
                                                 for c in columns])}
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=not c.not_null) for c in columns], metadata=meta)


def _select_list(columns: list[ExportColumn], *, text_casts: bool) -> sql.Composable:
    items = [sql.SQL("{}::text").format(sql.Identifier(c.name)) if (c.as_text and text_casts)
             else sql.Identifier(c.name) for c in columns]
    return sql.SQL(", ").join(items)


def write_pg_dump(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload, pg_dump: PgTool, *,
                  snapshot: str, compress: int | None = None, lock_timeout: str = "2s",
                  chunk: int = MiB) -> None:
    """Run pg_dump into ``sink`` chunk by chunk. Raises (and kills pg_dump) on any failure."""
    conninfo, env = libpq_target(conn)
    cmd = [pg_dump.path, "--format=custom", f"--table={dump_pattern(table)}", "--strict-names",
           f"--snapshot={snapshot}", f"--lock-wait-timeout={lock_timeout}", "--no-password",
           f"--dbname={conninfo}"]
    if compress is not None:
        cmd.append(f"--compress={compress}")
    log.info("running: %s", " ".join(c if not c.startswith("--dbname=") else "--dbname=<conninfo>" for c in cmd))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    except BaseException:
        release_target(env)
        raise
    assert proc.stdout is not None and proc.stderr is not None
    grow_pipe(proc.stdout.fileno())
    err = TailReader(proc.stderr)
    err.start()
    try:
        read = proc.stdout.read
        while data := read(chunk):
            sink.write(data)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        release_target(env)  # the private service file holding sslpassword, if any
    if rc != 0:
        raise PartitionError(f"pg_dump of {table} failed (exit {rc}): {err.text()}", where=str(table),
                             fix="see the pg_dump message above; the table was left in place and will be retried")


def _csv_read_plan(columns: list[ExportColumn]) -> tuple[sql.Composable, dict[str, Any]]:
    """How each column travels from PostgreSQL to Arrow's C++ CSV parser, and the type it is parsed as.

    Text CSV is the one stream both sides agree on exactly: NULL is an unquoted empty field and '' a quoted one,
    numerics keep every digit, floats print shortest-exact. Where Arrow's parser needs help the server reshapes
    the value: timestamptz AT TIME ZONE 'UTC' (then tagged UTC), time as microseconds, bytea as hex.
    """
    pa = arrow_copy.load_pyarrow()

    items: list[sql.Composable] = []
    types: dict[str, Any] = {}
    target = arrow_schema(columns)
    for c in columns:
        ident = sql.Identifier(c.name)
        if c.as_text:
            items.append(sql.SQL("{}::text").format(ident))
            types[c.name] = pa.string()
        elif c.typname == "timestamptz":
            items.append(sql.SQL("({} AT TIME ZONE 'UTC')").format(ident))
            types[c.name] = pa.timestamp("us")
        elif c.typname == "time":
            items.append(sql.SQL("(extract(epoch FROM {}) * 1000000)::int8").format(ident))
            types[c.name] = pa.int64()
        elif c.typname == "bytea":
            items.append(sql.SQL("encode({}, 'hex')").format(ident))
            types[c.name] = pa.string()
        else:
            items.append(ident)
            types[c.name] = target.field(c.name).type
    return sql.SQL(", ").join(items), types


def _to_target(batch: Any, schema: Any) -> Any:
    """A parsed CSV batch -> the archive's Arrow schema (UTC tag, time64, binary from hex, nullability)."""
    pa = arrow_copy.load_pyarrow()

    arrays = []
    for i, f in enumerate(schema):
        col = batch.column(i)
        if pa.types.is_binary(f.type):
            col = pa.array([None if v is None else bytes.fromhex(v) for v in col.to_pylist()], pa.binary())
        elif not col.type.equals(f.type):
            col = col.cast(f.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_parquet(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                  columns: list[ExportColumn], *, compression: str = "zstd", snapshot: str | None = None,
                  block_size: int = MiB, group_bytes: int = 4 * MiB) -> int:
    """Stream the table as Parquet into ``sink``; returns rows written. Must run inside :func:`snapshot`'s
    transaction, whose exported id is ``snapshot``.

    With ``snapshot`` and the ADBC PostgreSQL driver installed, rows come as Arrow record batches decoded from
    the binary COPY stream by a second session that imports the snapshot (:mod:`arrow_copy`). Otherwise, or
    when ADBC cannot deliver a column exactly (decided before any byte is written, and logged), ``COPY ... TO
    STDOUT (FORMAT csv)`` is cut into blocks of about ``block_size`` whole rows, each parsed by Arrow's C++ CSV
    parser. Either way rows are written as row groups of about ``group_bytes`` of Arrow data.
    """
    reason = "no exported snapshot id was given" if snapshot is None else arrow_copy.driver_missing()
    if snapshot is not None and reason is None:
        try:
            return _write_parquet_adbc(conn, table, sink, columns, snapshot, compression=compression,
                                       group_bytes=group_bytes)
        except arrow_copy.AdbcUnavailable as exc:
            reason = str(exc)
    log.info("Parquet export of %s parses CSV COPY instead of ADBC's binary COPY: %s", table, reason)
    return _write_parquet(conn, table, sink, columns, compression=compression, block_size=block_size,
                          group_bytes=group_bytes)


def _parquet_writer(sink: MultipartUpload, schema: Any, compression: str) -> Any:
    pa = arrow_copy.load_pyarrow()
    import pyarrow.parquet as pq

    return pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression=compression,
                            write_statistics=True, use_dictionary=True, version="2.6")


def _write_parquet_adbc(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                        columns: list[ExportColumn], snapshot: str, *, compression: str, group_bytes: int) -> int:
    """Parquet from ADBC record batches (binary COPY in the export's snapshot). Raises
    :class:`arrow_copy.AdbcUnavailable` only before anything was written to ``sink``."""
    schema = arrow_schema(columns)
    with arrow_copy.snapshot_session(conn, snapshot) as session:
        batches = arrow_copy.stream_batches(session, table, columns, schema)
        try:
            first = next(batches, None)  # the result schema is checked here, before the writer's first byte
            log.info("Parquet export of %s reads binary COPY as Arrow record batches (ADBC) in snapshot %s",
                     table, snapshot)
            progress = Progress(f"parquet export of {table}", None, logger=log)
            writer = _parquet_writer(sink, schema, compression)
            try:
                groups = _RowGroups(writer, group_bytes, progress)
                for batch in itertools.chain([] if first is None else [first], batches):
                    groups.add(batch)
                groups.flush()
            finally:
                writer.close()
        finally:
            batches.close()
    progress.add(0, force=True)
    return groups.rows


def _write_parquet(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                   columns: list[ExportColumn], *, compression: str, block_size: int, group_bytes: int) -> int:
    pa = arrow_copy.load_pyarrow()
    import pyarrow.csv as pacsv

    schema = arrow_schema(columns)
    select, read_types = _csv_read_plan(columns)
    query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv)").format(select, table.ident)
    read_options = pacsv.ReadOptions(column_names=[c.name for c in columns], use_threads=False)
    parse_options = pacsv.ParseOptions(newlines_in_values=True)
    convert_options = pacsv.ConvertOptions(column_types=read_types, true_values=["t"], false_values=["f"],
                                           null_values=[""], strings_can_be_null=True,
                                           quoted_strings_can_be_null=False)
    progress = Progress(f"parquet export of {table}", None, logger=log)
    writer = _parquet_writer(sink, schema, compression)
    groups = _RowGroups(writer, group_bytes, progress)

    def parse(rows: list[bytes]) -> None:
        block = pacsv.read_csv(pa.py_buffer(b"".join(rows)), read_options=read_options,
                               parse_options=parse_options, convert_options=convert_options)
        for batch in block.to_batches():
            groups.add(_to_target(batch, schema))

    try:
        # PostgreSQL sends each row of COPY TO as its own CopyData message, so every chunk psycopg yields is
        # whole rows (quoted newlines included): blocks can be cut between any two chunks and parsed on their
        # own, in this thread, with no Python object per value.
        with conn.cursor() as cur, cur.copy(query) as copy:
            rows: list[bytes] = []
            size = 0
            for chunk in copy:
                data = bytes(chunk)
                rows.append(data)
                size += len(data)
                if size >= block_size:
                    parse(rows)
                    rows, size = [], 0
            if rows:
                parse(rows)
        groups.flush()
    finally:
        writer.close()
    progress.add(0, force=True)
    return groups.rows


class _RowGroups:
    """Record batches gathered into row groups of about ``group_bytes`` (Arrow bytes) and written when full or
    flushed, so both Parquet paths (ADBC and CSV) cut row groups, count rows and report progress alike."""

    def __init__(self, writer: Any, group_bytes: int, progress: Progress) -> None:
        self.writer, self.group_bytes, self.progress = writer, group_bytes, progress
        self.pending: list[Any] = []
        self.pending_bytes = 0
        self.rows = 0

    def add(self, batch: Any) -> None:
        self.pending.append(batch)
        self.pending_bytes += batch.nbytes
        if self.pending_bytes >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pa = arrow_copy.load_pyarrow()
        tbl = pa.Table.from_batches(self.pending)
        self.writer.write_table(tbl, row_group_size=max(tbl.num_rows, 1))
        self.rows += int(tbl.num_rows)
        self.progress.add(int(tbl.num_rows))
        self.pending, self.pending_bytes = [], 0


def write_csv_gzip(conn: psycopg.Connection[Any], table: QualifiedName, sink: MultipartUpload,
                   columns: list[ExportColumn]) -> int:
    """Stream ``COPY ... TO STDOUT (FORMAT csv, HEADER)`` gzip-compressed into ``sink``. Returns the row count."""
    query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT csv, HEADER true)").format(
        _select_list(columns, text_casts=False), table.ident)
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    with conn.cursor() as cur:
        with cur.copy(query) as copy:
            for data in copy:
                out = gz.compress(data)
                if out:
                    sink.write(out)
        sink.write(gz.flush())
        return int(cur.rowcount)
