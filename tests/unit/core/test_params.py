"""core.params: the one parser of user-supplied values (form JSON, rendered templates, YAML)."""

from __future__ import annotations

from typing import Any

import pytest

from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.params import (
    is_none,
    parse_bool,
    parse_bytes,
    parse_float,
    parse_int,
    parse_seconds,
    parse_switch,
    parse_text,
)


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), ("True", True), ("false", False), (" on ", True), ("0", False), ("y", True),
    (None, False), ("", False), ("None", False),
])
def test_parse_bool_accepts_rendered_spellings(value: Any, expected: bool) -> None:
    assert parse_bool(value, what="flag") is expected


def test_parse_bool_default_and_refusal_names_the_field() -> None:
    assert parse_bool(None, default=True) is True
    with pytest.raises(InvalidInputError, match=r"defer_indexes='maybe' is not a boolean"):
        parse_bool("maybe", what="defer_indexes")


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", None), (None, None), ("", None), ("on", True), (True, True), ("off", False), ("false", False),
])
def test_parse_switch_is_tri_state(value: Any, expected: bool | None) -> None:
    assert parse_switch(value, what="capture_changes") is expected


def test_parse_switch_refuses_garbage_with_the_choices() -> None:
    with pytest.raises(InvalidInputError, match="is not auto, on or off") as err:
        parse_switch("sometimes", what="capture_changes", auto_help="on when updated")
    assert "on when updated" in str(err.value)


def test_quantities_with_units_and_refusals() -> None:
    assert parse_bytes("100MB") == 100 * 1024**2
    assert parse_bytes("1.5 GB") == int(1.5 * 1024**3)
    assert parse_seconds("5min") == 300.0
    assert parse_seconds("500ms") == 0.5
    assert parse_seconds("2d") == 172800.0
    assert parse_bytes("None") is None
    with pytest.raises(InvalidInputError, match="is not a size"):
        parse_bytes("lots")
    with pytest.raises(InvalidInputError, match="is not a duration"):
        parse_seconds(True)


def test_numbers_and_text_from_templates() -> None:
    assert parse_int(" 42 ", what="batch_size") == 42
    assert parse_int("None", 7) == 7
    assert parse_float("0.25") == 0.25
    assert parse_text("null") is None and parse_text("x") == "x"
    assert is_none(" NULL ") and not is_none("0")
    with pytest.raises(InvalidInputError, match=r"batch_size='1e3' is not a whole number"):
        parse_int("1e3", what="batch_size")
    with pytest.raises(InvalidInputError, match="is not a finite number"):
        parse_float("inf", what="sleep_seconds")
