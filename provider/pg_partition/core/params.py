"""The one parser of user-supplied values: booleans, on/off/auto switches, sizes, durations and name lists.

Why one module: values reach the engine from the Trigger form (JSON types), from Jinja-rendered templated fields
(always strings: ``"False"``, ``"100MB"``, ``"['a', 'b']"``) and from the YAML fleet config. Parsing them in one
place means one set of spellings, one set of bounds and one kind of error message everywhere: the message names the
field, the value and what would be accepted.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from pg_partition.core.db.errors import InvalidInputError

TRUE_TEXT = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE_TEXT = frozenset({"0", "false", "no", "off", "n", "f"})
NONE_TEXT = frozenset({"", "none", "null"})

SIZE_UNITS: Mapping[str, float] = {
    "": 1, "b": 1, "bytes": 1, "kb": 1024, "kib": 1024, "k": 1024, "mb": 1024**2, "mib": 1024**2, "m": 1024**2,
    "gb": 1024**3, "gib": 1024**3, "g": 1024**3, "tb": 1024**4, "tib": 1024**4,
}
TIME_UNITS: Mapping[str, float] = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "ms": 0.001, "us": 0.000001,
    "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


def is_none(value: Any) -> bool:
    """``None`` and the texts a rendered template or a form gives for "not set" ("", "None", "null")."""
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_TEXT)


def parse_bool(value: Any, *, what: str = "value", default: bool = False) -> bool:
    """A real boolean or the usual spellings ('true', 'False', 'on', '0', ...); not set -> ``default``."""
    if isinstance(value, bool):
        return value
    if is_none(value):
        return default
    text = str(value).strip().lower()
    if text in TRUE_TEXT:
        return True
    if text in FALSE_TEXT:
        return False
    raise InvalidInputError(f"{what}={value!r} is not a boolean", fix="use true or false")


def parse_switch(value: Any, *, what: str, auto_help: str = "") -> bool | None:
    """A tri-state setting: true/on, false/off, or auto (returned as ``None``); not set means auto."""
    if isinstance(value, bool):
        return value
    if is_none(value) or str(value).strip().lower() == "auto":
        return None
    text = str(value).strip().lower()
    if text in TRUE_TEXT:
        return True
    if text in FALSE_TEXT:
        return False
    raise InvalidInputError(f"{what}={value!r} is not auto, on or off",
                            fix="use auto" + (f" ({auto_help})" if auto_help else "") + ", on/true or off/false")


def parse_quantity(value: Any, units: Mapping[str, float], *, what: str, kind: str, example: str) -> float | None:
    """A non-negative number with an optional unit from ``units``; not set -> ``None``."""
    if is_none(value):
        return None
    if isinstance(value, bool):
        raise InvalidInputError(f"{what}={value!r} is not a {kind}", fix=f"give a number or {example}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in units:
            raise InvalidInputError(f"{what}={value!r} is not a {kind}",
                                    fix=f"give a number or a number with a unit: {example}")
        number, unit = float(m.group(1)), m.group(2).lower()
    result = number * units[unit]
    if not math.isfinite(result) or result < 0:
        raise InvalidInputError(f"{what}={value!r} must be a non-negative {kind}", fix=f"use e.g. {example}")
    return result


def parse_bytes(value: Any, *, what: str = "max_lag_bytes") -> int | None:
    """``None``/"None" -> None; ``104857600``, ``"100MB"``, ``"1.5 GB"`` -> bytes (1 kB = 1024)."""
    result = parse_quantity(value, SIZE_UNITS, what=what, kind="size", example="104857600, '100MB', '2GB'")
    return None if result is None else int(result)


def parse_seconds(value: Any, *, what: str = "max_lag_seconds") -> float | None:
    """``None``/"None" -> None; ``30``, ``"30s"``, ``"5min"``, ``"500ms"`` -> seconds."""
    return parse_quantity(value, TIME_UNITS, what=what, kind="duration", example="30, '30s', '5min', '1h'")


def parse_names(value: Any, *, what: str = "watch_slots") -> tuple[str, ...] | None:
    """Which standbys/slots to watch. ``None``, "None", "", "all", "*" -> None (all of them); ``[]``/"[]" -> none;
    a list, a JSON/Python list literal (how templated params render) or "a, b" -> those names."""
    if is_none(value) or (isinstance(value, str) and value.strip().lower() in {"all", "*"}):
        return None
    items: Any = value
    fix = 'write ["a", "b"], "a, b", [] for none, or leave empty for all'
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                items = json.loads(text)
            except ValueError:
                try:
                    items = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise InvalidInputError(f"{what}={value!r} is not a list of names", fix=fix) from None
        else:
            items = [p for p in (s.strip() for s in text.split(",")) if p]
    if not isinstance(items, list | tuple | set | frozenset):
        raise InvalidInputError(f"{what}={value!r} is not a list of names", fix=fix)
    names = tuple(str(x).strip() for x in items)
    if any(not n for n in names):
        raise InvalidInputError(f"{what}={value!r} contains an empty name", fix="remove the empty entry")
    return names


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def format_seconds(s: float | None) -> str:
    return "unknown" if s is None else f"{s:.1f}s"


def parse_int(value: Any, default: int | None = None, *, what: str = "value") -> int | None:
    """A whole number (templated params arrive as text); not set -> ``default``."""
    if is_none(value):
        return default
    if isinstance(value, bool):
        raise InvalidInputError(f"{what}={value!r} is not a whole number", fix="give a whole number")
    try:
        return int(str(value).strip())
    except ValueError:
        raise InvalidInputError(f"{what}={value!r} is not a whole number", fix="give a whole number") from None


def parse_float(value: Any, default: float = 0.0, *, what: str = "value") -> float:
    """A number (templated params arrive as text); not set -> ``default``."""
    if is_none(value):
        return default
    try:
        result = float(str(value).strip())
    except ValueError:
        raise InvalidInputError(f"{what}={value!r} is not a number", fix="give a number") from None
    if not math.isfinite(result):
        raise InvalidInputError(f"{what}={value!r} is not a finite number", fix="give a number")
    return result


def parse_text(value: Any) -> str | None:
    """Text, or ``None`` when not set ("", "None", "null" are what an empty form field renders to)."""
    return None if is_none(value) else str(value)
