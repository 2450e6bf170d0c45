"""The ADBC Parquet path's type plan and per-batch checks (no database: Arrow values built by hand)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pyarrow as pa
import pytest

from pg_partition.core.archive import arrow_copy
from pg_partition.core.archive.export import ExportColumn, arrow_schema
from pg_partition.core.db.errors import PartitionError

NUMERIC = pa.opaque(pa.string(), type_name="numeric", vendor_name="PostgreSQL")  # what the driver hands over


def _schema() -> pa.Schema:
    return arrow_schema([ExportColumn("id", "bigint", "int8", False, True),
                         ExportColumn("price", "numeric(12,2)", "numeric", False, False, 12, 2),
                         ExportColumn("day", "date", "date", False, False),
                         ExportColumn("at", "timestamp with time zone", "timestamptz", False, False),
                         ExportColumn("doc", "jsonb", "jsonb", True, False)])


def _source(ids: list[int | None], prices: list[str | None], days: list[int | None], ats: list[int | None],
            docs: list[str | None]) -> pa.RecordBatch:
    price = pa.ExtensionArray.from_storage(NUMERIC, pa.array(prices, pa.string()))
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.int64()), price, pa.array(days, pa.int32()).view(pa.date32()),
         pa.array(ats, pa.int64()).view(pa.timestamp("us", tz="UTC")), pa.array(docs, pa.string())],
        names=["id", "price", "day", "at", "doc"])


def test_the_plan_keeps_equal_types_and_casts_numeric_text_to_decimal() -> None:
    source = _source([1], ["1.50"], [0], [0], ["{}"])
    assert arrow_copy.plan_casts(source.schema, _schema()) == ["keep", "decimal", "keep", "keep", "keep"]


def test_a_column_arriving_as_another_type_is_refused_before_any_row() -> None:
    source = _source([1], ["1.50"], [0], [0], ["{}"]).schema.set(0, pa.field("id", pa.int32()))
    with pytest.raises(arrow_copy.AdbcUnavailable, match="column 'id' arrives from ADBC as int32"):
        arrow_copy.plan_casts(source, _schema())


def test_convert_gives_the_archive_schema_exactly() -> None:
    target = _schema()
    batch = _source([1, 2], ["-9999999999.99", None], [19723, None], [1_704_067_200_000_000, None],
                    ['{"a": 1}', None])
    out = arrow_copy.convert(batch, target, arrow_copy.plan_casts(batch.schema, target))
    assert out.schema.equals(target, check_metadata=True)
    assert out.to_pylist()[0] == {"id": 1, "price": Decimal("-9999999999.99"), "day": dt.date(2024, 1, 1),
                                  "at": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "doc": '{"a": 1}'}
    assert out.to_pylist()[1] == {"id": 2, "price": None, "day": None, "at": None, "doc": None}


def test_a_numeric_nan_cannot_become_a_decimal() -> None:
    target = _schema()
    batch = _source([1], ["NaN"], [0], [0], [None])
    with pytest.raises(PartitionError, match="'price' holds a value"):
        arrow_copy.convert(batch, target, arrow_copy.plan_casts(batch.schema, target))


@pytest.mark.parametrize(("column", "days", "ats"), [
    ("day", -2_147_472_692, 0),  # the driver's date 'infinity' (wrapped around int32)
    ("day", -2_147_472_691, 0),  # '-infinity'
    ("at", 0, -9_222_425_352_054_775_809),  # timestamp 'infinity' (wrapped around int64)
])
def test_wrapped_infinities_are_caught(column: str, days: int, ats: int) -> None:
    target = _schema()
    batch = _source([1, 2], ["1.00", "2.00"], [0, days], [0, ats], [None, None])
    with pytest.raises(PartitionError, match=f"'{column}' holds infinity"):
        arrow_copy.convert(batch, target, arrow_copy.plan_casts(batch.schema, target))


def test_the_oldest_postgresql_date_passes() -> None:
    target = _schema()
    oldest_day = -2_440_588  # 4713-11-24 BC
    batch = _source([1], ["1.00"], [oldest_day], [oldest_day * 86_400_000_000], [None])
    out = arrow_copy.convert(batch, target, arrow_copy.plan_casts(batch.schema, target))
    assert out.column(2).view(pa.int32()).to_pylist() == [oldest_day]


def test_the_passfile_line_escapes_separators() -> None:
    assert arrow_copy._passfile_line("a:b\\c") == "*:*:*:*:a\\:b\\\\c\n"


def test_text_columns_are_cast_by_the_server() -> None:
    cols = [ExportColumn("id", "bigint", "int8", False, True), ExportColumn("Doc", "jsonb", "jsonb", True, False)]
    assert arrow_copy.select_list(cols).as_string(None) == '"id", "Doc"::text'
