"""The fleet config: defaults, validation, and error messages that name the file, the line and the field."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from pg_partition.config import ConfigError, is_due, load_config, parse_config, previous_tick

REPO = Path(__file__).resolve().parents[2]


def test_sample_config_beside_the_dags_loads() -> None:
    cfg = load_config(REPO / "dags" / "pg_partition.yaml")
    assert [(t.conn_id, t.table, t.period, t.premake, t.retention) for t in cfg.tables] == [
        ("pg_demo", "public.activities", "month", 3, 24)]
    assert cfg.dag.schedule == "@daily"
    assert cfg.tables[0].archive is not None and cfg.tables[0].archive.format == "pg_dump"


def test_path_comes_from_the_environment(tmp_path, monkeypatch) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text("tables:\n  - {conn_id: a, table: t}\n")
    monkeypatch.setenv("PG_PARTITION_CONFIG", str(f))
    assert load_config().tables[0].conn_id == "a"
    assert load_config().source == str(f)


def test_defaults_apply_and_archive_merges_key_by_key() -> None:
    cfg = parse_config("""
defaults:
  table: public.activities
  retention: 24
  archive: {bucket: acme, prefix: pg, sse: aws:kms, kms_key_id: k1}
tables:
  - conn_id: eu
  - conn_id: us
    retention: 36
    archive: {format: parquet}
  - conn_id: dev
    archive: null
    enabled: false
""")
    eu, us, dev = cfg.tables
    assert (eu.retention, us.retention) == (24, 36)
    assert eu.archive is not None and eu.archive.format == "pg_dump" and eu.archive.kms_key_id == "k1"
    assert us.archive is not None and (us.archive.bucket, us.archive.format) == ("acme", "parquet")
    assert dev.archive is None
    assert [t.conn_id for t in cfg.enabled()] == ["eu", "us"] and cfg.conn_ids() == ["eu", "us"]
    assert cfg.find("us", "activities") is us
    assert eu.archive_row()["policy"]["bucket"] == "acme"


def test_every_problem_is_reported_with_file_line_and_field() -> None:
    text = """\
dag:
  schedule: "every day"
defaults:
  period: fortnight
tables:
  - conn_id: pg_demo
    table: public.activities
    premake: -1
  - conn_id: pg_other
    table: public.activities
    archive: {bucket: acme, format: zip}
    lock_timout: 3s
  - conn_id: "bad id!"
    table: a.b.c
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="dags/pg_partition.yaml")
    msg = str(err.value)
    assert "dags/pg_partition.yaml, line 2, dag.schedule: 'every day' is not a cron expression" in msg
    # a bad default is reported once, at its own line, not once per entry
    assert msg.count("line 4, defaults.period: Input should be 'day', 'week', 'month', 'quarter' or 'year' "
                     "(got 'fortnight')") == 1
    assert "line 8, tables[0].premake: Input should be greater than or equal to 1 (got -1)" in msg
    assert "line 11, tables[1].archive.format: Input should be 'pg_dump', 'parquet' or 'csv' (got 'zip')" in msg
    assert "line 12, tables[1].lock_timout: unknown field" in msg and "lock_timeout" in msg
    assert "line 13, tables[2].conn_id: String should match pattern" in msg
    assert "line 14, tables[2].table: 'a.b.c' is not a table name" in msg
    assert "How to fix: edit dags/pg_partition.yaml" in msg


def test_missing_fields_point_at_the_entry() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("tables:\n  - conn_id: a\n  - table: t\n    archive: {prefix: x}\n", source="f.yaml")
    msg = str(err.value)
    assert "f.yaml, line 2, tables[0].table: required field is missing" in msg
    assert "f.yaml, line 3, tables[1].conn_id: required field is missing" in msg
    assert "f.yaml, line 4, tables[1].archive.bucket: required field is missing" in msg


def test_duplicates_yaml_errors_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"f.yaml, line 3, tables\[1\].table: public.t on a is already listed"):
        parse_config("tables:\n  - {conn_id: a, table: t}\n  - {conn_id: a, table: public.t}\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml, line 3, tables\[0\].premake: duplicate key"):
        parse_config("tables:\n  - {conn_id: a, table: t, premake: 2,\n     premake: 4}\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml, line 3: invalid YAML: .* \(while parsing a flow .* line 2"):
        parse_config("tables:\n  - conn_id: [a\n", source="f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml, line 1: the config must be a mapping"):
        parse_config("- a\n- b\n", source="f.yaml")
    with pytest.raises(ConfigError, match="cannot read the pg-partition config") as err:
        load_config(tmp_path / "nope.yaml")
    assert "PG_PARTITION_CONFIG" in str(err.value)


def test_policy_checks() -> None:
    with pytest.raises(ConfigError, match="kms_key_id is only used with sse: aws:kms"):
        parse_config("tables:\n  - {conn_id: a, table: t, archive: {bucket: abc, kms_key_id: k}}\n")
    with pytest.raises(ConfigError, match="reserves schema names starting with pg_"):
        parse_config("tables:\n  - {conn_id: a, table: t, archive_schema: pg_archive}\n")
    with pytest.raises(ConfigError, match=r"tables\[0\].default_partition: Input should be 'none', 'keep_empty'"):
        parse_config("tables:\n  - {conn_id: a, table: t, default_partition: drop}\n")
    with pytest.raises(ConfigError, match=r"dag.on_failure_callback: 'alert' is not a dotted path"):
        parse_config("dag: {on_failure_callback: alert}\ntables: []\n")
    assert parse_config("").tables == []


def test_entry_schedule_decides_which_runs_include_it() -> None:
    utc = timezone.utc
    day = (datetime(2024, 11, 19, tzinfo=utc), datetime(2024, 11, 20, tzinfo=utc))  # (Tue, Wed 00:00]
    assert is_due(None, *day)
    assert is_due("0 3 * * *", *day)
    assert not is_due("0 3 * * 0", *day)  # Sundays only
    assert is_due("0 0 * * 3", *day)  # a tick exactly at the run's logical date counts
    assert not is_due("0 0 * * 2", *day)  # ... and one exactly at the window's start belongs to the run before
    assert not is_due("@monthly", *day)
    assert is_due("@monthly", datetime(2024, 11, 30, tzinfo=utc), datetime(2024, 12, 1, tzinfo=utc))
    assert is_due("0 3 * * 0", None, None)  # a manual run without a window runs every entry
    assert previous_tick("@daily", day[1]) == day[0]
    assert previous_tick(None, day[1]) is None


def test_rotate_dag_selects_due_entries() -> None:
    from pg_partition.dag_factory.rotate import select_due

    entries = [{"conn_id": "a", "schedule": None}, {"conn_id": "b", "schedule": "0 3 * * 0"},
               {"conn_id": "c", "schedule": "0 3 * * *"}]
    wednesday = datetime(2024, 11, 20, tzinfo=timezone.utc)
    monday = datetime(2024, 11, 18, tzinfo=timezone.utc)  # the run after Sunday 03:00
    pick = [e["conn_id"] for e in select_due(entries, dag_schedule="@daily", run_type="scheduled",
                                             logical_date=wednesday)]
    assert pick == ["a", "c"]
    assert [e["conn_id"] for e in select_due(entries, dag_schedule="@daily", run_type="scheduled",
                                             logical_date=monday)] == ["a", "b", "c"]
    assert [e["conn_id"] for e in select_due(entries, dag_schedule="@daily", run_type="manual",
                                             logical_date=wednesday)] == ["a", "b", "c"]
    assert [e["conn_id"] for e in select_due(entries, dag_schedule="@daily", run_type="manual",
                                             logical_date=wednesday, conn_ids=["b"])] == ["b"]


# --- issue 16: bounded parsing -----------------------------------------------------------------------------------

ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    + ["tables: []"]) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once() -> None:
    assert len(ALIAS_BOMB.encode()) < 700  # the was 644 bytes; this one expands to 9**9 strings
    with pytest.raises(ConfigError, match=r"anchors and aliases .* are not allowed") as err:
        parse_config(ALIAS_BOMB, source="bomb.yaml")
    assert "bomb.yaml, line 1" in str(err.value) and "defaults" in str(err.value)


def test_a_lone_anchor_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="anchors and aliases"):
        parse_config("defaults: &d {table: public.a}\ntables:\n  - conn_id: pg_a\n")


def test_a_10_mib_config_is_refused_by_size(tmp_path) -> None:
    line = "  - {conn_id: pg_x, table: public.activities}\n"
    path = tmp_path / "big.yaml"
    path.write_text("tables:\n" + line * (10 * 1024 * 1024 // len(line)))
    with pytest.raises(ConfigError, match=r"more than the 262,144-byte limit") as err:
        load_config(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="byte limit"):
        parse_config(path.read_text())
