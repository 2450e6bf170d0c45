"""Parquet from binary COPY through ADBC: exact types, the export's snapshot, no secret, clear refusals.

Real PostgreSQL, the real ADBC PostgreSQL driver and the moto S3 server over HTTP.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from pg_partition.core import archive
from pg_partition.core.archive import arrow_copy, export
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import PartitionError
from pg_partition.core.db.execute import Executor
from tests.support.archive import open_uploads, row_hash

ADBC_LINE = "reads binary COPY as Arrow record batches (ADBC)"
CSV_LINE = "parses CSV COPY instead of ADBC"

ZOO = """
CREATE TYPE public.mood AS ENUM ('ok', 'sad', 'it''s "odd"');
CREATE DOMAIN public.positive AS integer CHECK (VALUE > 0);
CREATE TABLE public.zoo (
    id bigint PRIMARY KEY, i2 smallint, i4 integer, f4 real, f8 double precision, flag boolean,
    body text, label varchar(12), code char(4), raw bytea, day date, at timestamptz, local_at timestamp,
    t time, tz_t timetz, price numeric(12, 2), wide numeric(38, 10), exact numeric, u uuid, doc json,
    docb jsonb, m public.mood, tags text[], nums integer[], stamps timestamptz[], span interval, addr inet,
    p public.positive, r int4range, bits bit varying(8), money_col money,
    total numeric GENERATED ALWAYS AS (price * 2) STORED)
"""
ZOO_ROWS = """
INSERT INTO public.zoo (id, i2, i4, f4, f8, flag, body, label, code, raw, day, at, local_at, t, tz_t, price, wide,
                        exact, u, doc, docb, m, tags, nums, stamps, span, addr, p, r, bits, money_col)
SELECT g, (g % 30000 - 15000)::smallint, g * 7919 - 40000000, (g / 7.0)::real, g / 3.0 - 1e300 * (g % 2),
       g % 3 = 0, E'quote " comma , tab \\t newline \\n back \\\\ é ' || g, 'v' || g, lpad((g % 100)::text, 2),
       decode(md5(g::text), 'hex'), date '1969-12-31' + (g % 9000 - 4500),
       timestamptz '1900-03-10 06:30:00.123456+05:30' + g * interval '17 hours 3 microseconds',
       timestamp '2024-11-03 01:30:00' + g * interval '1 second', time '00:00:00' + g * interval '13 seconds',
       timetz '10:00:00+03' + g * interval '1 minute', (g * 1.25 - 900)::numeric(12, 2),
       ('12345678901234567890.' || lpad(g::text, 10, '0'))::numeric(38, 10),
       ('1234567890123456789012345678901234567890.' || g)::numeric, md5(g::text)::uuid,
       json_build_object('g', g, 'x', 'a"b'), jsonb_build_object('g', g, 'nested', jsonb_build_array(1, 'x', null)),
       (ARRAY['ok', 'sad', 'it''s "odd"'])[g % 3 + 1]::public.mood, ARRAY['a,b', 'c"d', NULL, ''], ARRAY[g, NULL],
       ARRAY[timestamptz '2024-01-01 00:00+00' + g * interval '1 day'], make_interval(months => g % 13,
       days => g % 40, secs => g % 100), '10.0.0.1'::inet + g, g, int4range(g, g + 10), (g % 256)::bit(8)::varbit,
       (g * 1.5)::money
FROM generate_series(1, 2500) g;
INSERT INTO public.zoo (id) VALUES (0);  -- a row of NULLs
INSERT INTO public.zoo (id, f4, f8, body, raw, code, price, exact, tags)
VALUES (-1, 'NaN', '-Infinity', '', '\\x', '', -9999999999.99, 'NaN', '{}'),
       (-2, 'Infinity', 'NaN', ' ', '\\x00', 'a', 9999999999.99, '-0.000000000000000000001', ARRAY[NULL]::text[]);
"""


def _archive(conn: psycopg.Connection[Any], bucket: Any, table: QualifiedName, fmt: str = "parquet"
             ) -> dict[str, Any]:
    policy = archive.ArchivePolicy.build({"bucket": bucket.name, "prefix": "pq", "format": fmt})
    return archive.archive_table(Executor(conn), bucket.client(), archive.ArchiveTarget(table, label="all"), policy)


def _body(bucket: Any, key: str) -> bytes:
    return bytes(bucket.client().get_object(Bucket=bucket.name, Key=key)["Body"].read())


def test_every_column_type_round_trips_through_adbc(db, conn, bucket, caplog) -> None:
    conn.execute("SET TimeZone = 'Asia/Kolkata'")  # the session's zone must not leak into the archive
    conn.execute(ZOO)
    conn.execute(ZOO_ROWS)
    zoo = QualifiedName("public", "zoo")
    before = row_hash(conn, zoo)
    caplog.set_level(logging.INFO, logger="pg_partition")
    manifest = _archive(conn, bucket, zoo)
    assert ADBC_LINE in caplog.text and CSV_LINE not in caplog.text
    assert manifest["rows"] == 2503
    schema = pq.read_schema(pa.BufferReader(_body(bucket, manifest["key"])))
    expected = {"id": pa.int64(), "i2": pa.int16(), "f4": pa.float32(), "flag": pa.bool_(), "code": pa.string(),
                "raw": pa.binary(), "day": pa.date32(), "at": pa.timestamp("us", tz="UTC"),
                "local_at": pa.timestamp("us"), "t": pa.time64("us"), "tz_t": pa.string(),
                "price": pa.decimal128(12, 2), "wide": pa.decimal128(38, 10), "exact": pa.string(),
                "u": pa.string(), "docb": pa.string(), "m": pa.string(), "tags": pa.string(), "p": pa.string()}
    for name, typ in expected.items():
        assert schema.field(name).type == typ, name
    assert "total" not in schema.names  # generated: restore recomputes it
    archive.restore(Executor(conn), bucket.client(), manifest, target="schema", schema="back")
    assert row_hash(conn, QualifiedName("back", "zoo")) == before


def test_adbc_file_holds_exactly_what_the_csv_path_wrote(db, conn, bucket, caplog) -> None:
    """The same rows through both readers: the Arrow tables (types, values, NULLs) are equal."""
    conn.execute(ZOO)
    conn.execute(ZOO_ROWS)
    zoo = QualifiedName("public", "zoo")
    columns = export.export_columns(conn, zoo)
    tables = {}
    for way in ("adbc", "csv"):
        sink = _Memory()
        with export.snapshot(conn, zoo) as (snap, rows):
            written = export.write_parquet(conn, zoo, sink, columns, snapshot=snap if way == "adbc" else None)
        assert written == rows == 2503
        tables[way] = pq.read_table(pa.BufferReader(sink.getvalue())).sort_by("id")
    assert tables["adbc"].schema.equals(tables["csv"].schema, check_metadata=True)
    # repr: NaN equals NaN there, and -0.0 differs from 0.0, Decimal('1.50') from Decimal('1.5')
    assert repr(tables["adbc"].to_pylist()) == repr(tables["csv"].to_pylist())


def test_the_adbc_session_reads_the_exports_snapshot(db, conn) -> None:
    """Rows committed after the snapshot was exported (before ADBC connects) are not in the file."""
    conn.execute("CREATE TABLE public.snap (id bigint PRIMARY KEY, v text)")
    conn.execute("INSERT INTO public.snap SELECT g, 'v' || g FROM generate_series(1, 1000) g")
    table = QualifiedName("public", "snap")
    columns = export.export_columns(conn, table)
    sink = _Memory()
    with export.snapshot(conn, table) as (snap, rows), db.connect() as other:
        other.execute("INSERT INTO public.snap SELECT g, 'late' FROM generate_series(1001, 1500) g")
        other.execute("DELETE FROM public.snap WHERE id <= 10")
        written = export.write_parquet(conn, table, sink, columns, snapshot=snap)
    assert rows == written == 1000
    ids = pq.read_table(pa.BufferReader(sink.getvalue())).column("id").to_pylist()
    assert sorted(ids) == list(range(1, 1001))


@pytest.mark.parametrize("value", ["infinity", "-infinity"])
def test_an_infinite_date_stops_the_export_and_uploads_nothing(db, conn, bucket, value) -> None:
    conn.execute("CREATE TABLE public.inf (id bigint PRIMARY KEY, day date, at timestamp)")
    conn.execute("INSERT INTO public.inf SELECT g, date '2024-01-01', timestamp '2024-01-01' "
                 "FROM generate_series(1, 100) g")
    conn.execute(sql.SQL("INSERT INTO public.inf VALUES (101, date '2024-01-01', {}::timestamp)").format(
        sql.Literal(value)))
    with pytest.raises(PartitionError, match="'at' holds infinity"):
        _archive(conn, bucket, QualifiedName("public", "inf"))
    conn.execute(sql.SQL("UPDATE public.inf SET at = '2024-01-01', day = {}::date WHERE id = 101").format(
        sql.Literal(value)))
    with pytest.raises(PartitionError, match="'day' holds infinity"):
        _archive(conn, bucket, QualifiedName("public", "inf"))
    assert open_uploads(bucket.client(), bucket.name) == []
    assert bucket.client().list_objects_v2(Bucket=bucket.name).get("KeyCount", 0) == 0


def test_a_numeric_nan_in_a_constrained_column_is_refused(db, conn, bucket) -> None:
    conn.execute("CREATE TABLE public.nan (id bigint PRIMARY KEY, price numeric(10, 2))")
    conn.execute("INSERT INTO public.nan VALUES (1, 1.5), (2, 'NaN')")
    with pytest.raises(PartitionError, match="'price' holds a value"):
        _archive(conn, bucket, QualifiedName("public", "nan"))
    assert open_uploads(bucket.client(), bucket.name) == []


def test_the_adbc_connection_string_carries_no_password(db) -> None:
    password = "Planted:Pw\\7d1f"
    with psycopg.connect(db.dsn + f" password='{password.replace(chr(92), chr(92) * 2)}'") as secret:
        assert secret.info.password == password
        with arrow_copy.adbc_conninfo(secret) as conninfo:
            assert "Planted" not in conninfo
            path = psycopg.conninfo.conninfo_to_dict(conninfo)["passfile"]
            assert isinstance(path, str)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            with psycopg.connect(conninfo) as via_file:  # libpq reads the password back from the file
                assert via_file.info.password == password
        assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_an_sslpassword_connection_falls_back_to_the_csv_path(db, conn, bucket, caplog) -> None:
    conn.execute("CREATE TABLE public.plain (id bigint PRIMARY KEY, at timestamptz, v numeric(8, 3))")
    conn.execute("INSERT INTO public.plain SELECT g, now(), g / 7.0 FROM generate_series(1, 500) g")
    before = row_hash(conn, "public.plain")
    caplog.set_level(logging.INFO, logger="pg_partition")
    with psycopg.connect(db.dsn + " sslpassword=PlantedSsl sslmode=disable", autocommit=True) as secret:
        manifest = _archive(secret, bucket, QualifiedName("public", "plain"))
    assert CSV_LINE in caplog.text and "sslpassword" in caplog.text and ADBC_LINE not in caplog.text
    assert "PlantedSsl" not in caplog.text
    archive.restore(Executor(conn), bucket.client(), manifest, target="schema", schema="back")
    assert row_hash(conn, "back.plain") == before


class _Memory:
    """A write-only in-memory sink with the file-like surface ParquetWriter uses (for tests comparing bytes)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        self.size += len(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)
