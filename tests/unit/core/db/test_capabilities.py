"""What each PostgreSQL major can do, decided in one place."""

from __future__ import annotations

import pytest

from pg_partition.core.db.capabilities import Capabilities
from pg_partition.core.db.errors import PreflightError


@pytest.mark.parametrize(("num", "compression", "concurrently", "row_filters", "analyze_only"), [
    (130023, False, False, False, False),
    (140023, True, True, False, False),
    (150018, True, True, True, False),
    (160013, True, True, True, False),
    (170010, True, True, True, False),
    (180004, True, True, True, True),
])
def test_feature_table(num: int, compression: bool, concurrently: bool, row_filters: bool,
                       analyze_only: bool) -> None:
    caps = Capabilities(num)
    assert (caps.column_compression, caps.detach_concurrently, caps.publication_row_filters,
            caps.analyze_only) == (compression, concurrently, row_filters, analyze_only)
    assert caps.supported and caps.major == num // 10000
    caps.require_supported()


def test_older_than_13_is_refused_naming_the_version() -> None:
    with pytest.raises(PreflightError, match="PostgreSQL 12 is older than the oldest supported version"):
        Capabilities(120017).require_supported()
