"""What each PostgreSQL major can do, decided in one place."""

from __future__ import annotations

import logging

import pytest
from psycopg import sql

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


def test_older_than_13_is_refused_naming_the_version_the_feature_and_the_way_out() -> None:
    with pytest.raises(PreflightError, match=r"(?s)PostgreSQL 12 is older than the oldest version conversion "
                                             r"supports \(13\).*How to fix: upgrade the server to PostgreSQL 13"):
        Capabilities(120017).require_supported("conversion")


@pytest.mark.parametrize(("num", "pending", "compression", "like"), [
    (130023, "false", 'NULL::"char"', ""),
    (140023, "i.inhdetachpending", "a.attcompression", "INCLUDING COMPRESSION "),
    (180004, "i.inhdetachpending", "a.attcompression", "INCLUDING COMPRESSION "),
])
def test_catalog_fragments_follow_the_version(num: int, pending: str, compression: str, like: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caps = Capabilities(num)
    assert caps.detach_pending_column == sql.SQL(pending)
    assert caps.compression_column == sql.SQL(compression)
    with caplog.at_level(logging.INFO, logger="pg_partition"):
        assert caps.like_compression() == sql.SQL(like)
    # the fallback is logged, the normal path is not
    assert ("without INCLUDING COMPRESSION" in caplog.text) == (like == "")
