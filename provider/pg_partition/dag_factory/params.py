"""Param builders shared by every DAG, so each Trigger form behaves the same way.

Why this module: Airflow's Trigger form marks a param *required* when its JSON-schema ``type`` does not allow
``null``, and then shows an error badge and disables the Trigger button when the value is empty (``""`` or
``[]``). Optional params must therefore be ``Param(None, type=["null", ...])``; :func:`optional` builds them.
Every param names its form ``section`` (one accordion per section, in a fixed order) and optional strings carry
``examples`` (the form offers them as suggestions: the expected format at a glance).

Operators read template-rendered params, where ``None`` arrives as the string ``"None"``: every operator treats
``None``, ``""`` and ``"None"`` as "not given".
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

# Form sections, in the order users need them.
WHAT = "What to convert"
TARGET = "What to act on"
HOW_FAST = "How fast"
SAFETY = "Safety"
CAPTURE = "Change capture"
LAG = "Replication lag"
ARCHIVE = "Archive"
ADVANCED = "Advanced"

SECTIONS = (WHAT, TARGET, HOW_FAST, SAFETY, CAPTURE, LAG, ARCHIVE, ADVANCED)


def required(default: Any, type: str | list[str], description: str, section: str, **schema: Any) -> Param:
    """A param that always has a value (its default is a valid, non-empty value)."""
    return Param(default, type=type, description=description, section=section, **schema)


def optional(type: str | list[str], description: str, section: str, *, default: Any = None,
             examples: list[Any] | None = None, **schema: Any) -> Param:
    """A param the user may leave empty: null allowed, null by default, so the form never calls it required.

    ``enum`` values get ``None`` added (a JSON-schema enum must list every allowed value, null included).
    """
    types = [type] if isinstance(type, str) else list(type)
    if "null" not in types:
        types.insert(0, "null")
    if "enum" in schema and None not in schema["enum"]:
        schema["enum"] = [None, *schema["enum"]]
    if examples:
        schema["examples"] = examples
    return Param(default, type=types, description=description, section=section, **schema)


def is_blank(value: Any) -> bool:
    """``None``, empty, or a template-rendered ``None``: the user did not give this param."""
    return value is None or str(value).strip() in ("", "None", "null", "[]")
