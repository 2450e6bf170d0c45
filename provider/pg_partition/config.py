"""The fleet config: which tables, in which databases, are rotated, and how.

A YAML file beside the DAGs (``dags/pg_partition.yaml``, or the path in ``PG_PARTITION_CONFIG``) lists every
managed table across many Airflow connections. The users run about ten databases with the same ``activities``
table, so a ``defaults`` section holds what they share and each table entry is one line::

    dag:
      schedule: "@daily"
    defaults:
      table: public.activities
      column: created_at
      period: month
      premake: 3
      retention: 24
      archive: {bucket: acme-archive, prefix: pg, format: pg_dump}
    tables:
      - conn_id: pg_customers_eu
      - conn_id: pg_customers_us
        retention: 36

Why pydantic and YAML marks: a config error is found by the DAG processor, far from the person who edited
the file, so every message names the file, the line and the field (``tables[1].premake``) and what is allowed.
A value inherited from ``defaults`` is reported at its line in ``defaults``.

This module has no Airflow imports: the engine, the operators and the tests all read the same models.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pg_partition.core.archive.policy import ArchivePolicy
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.names import Period
from pg_partition.core.rotate import RotationSpec

ENV_VAR = "PG_PARTITION_CONFIG"
DEFAULT_FILENAME = "pg_partition.yaml"
ARCHIVE_SCHEMA = "pgpartition_archive"  # "pg_" schema names are reserved by PostgreSQL

PeriodName = Literal["day", "week", "month", "quarter", "year"]
DefaultPolicy = Literal["none", "keep_empty", "move_rows"]
Duration = Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)?\s*$")]
ConnId = Annotated[str, Field(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.\-]+$")]
CRON_PRESETS = {"@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@annually", "@midnight"}


class ConfigError(InvalidInputError):
    """The fleet config file is unreadable or invalid. The message lists every problem as file:line field."""


def _check_schedule(value: str | None) -> str | None:
    if value is None:
        return None
    from croniter import croniter

    text = value.strip()
    if text in CRON_PRESETS or croniter.is_valid(text):
        return text
    raise ValueError(f"{value!r} is not a cron expression (e.g. '0 3 * * *') nor one of "
                     f"{sorted(CRON_PRESETS)}")


class TableConfig(BaseModel):
    """One managed table in one database. Every field but ``conn_id`` and ``table`` has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conn_id: ConnId = Field(description="Airflow Postgres connection id of the database.")
    table: str = Field(min_length=1, description="The partitioned table, schema.table.")
    column: str = Field("created_at", min_length=1, description="The partition key column (timestamp/date).")
    period: PeriodName = Field("month", description="Partition period.")
    premake: int = Field(3, ge=1, le=1000, description="Future partitions to keep ahead of the current one.")
    retention: int | None = Field(
        None, ge=1, le=100_000,
        description="Complete past periods kept besides the current one; older partitions are detached. "
        "null keeps everything.")
    default_partition: DefaultPolicy = Field(
        "move_rows",
        description="move_rows: rows in the DEFAULT partition that belong to a partition being created are "
        "moved into it first; keep_empty: never move, refuse to create over them; none: the table should "
        "have no DEFAULT partition.")
    archive: ArchivePolicy | None = Field(None, description="Archive policy for detached partitions.")
    archive_schema: str = Field(ARCHIVE_SCHEMA, min_length=1, max_length=63,
                                description="Schema that detached partitions are moved to (not pg_*).")
    schedule: str | None = Field(
        None, description="Cron expression: the entry only runs in DAG runs whose interval contains a tick "
        "(manual runs run every entry). null: every run.")
    lock_timeout: Duration = Field("2s", description="lock_timeout for DDL on the live table.")
    lock_retries: int = Field(5, ge=1, le=100, description="Attempts when the lock is not granted in time.")
    detach_timeout: Duration = Field(
        "10min", description="How long DETACH ... CONCURRENTLY/FINALIZE may wait for older transactions; "
        "the wait blocks no one.")
    batch_size: int = Field(10_000, ge=1, le=10_000_000,
                            description="Rows per transaction when moving rows out of the DEFAULT partition.")
    enabled: bool = Field(True, description="false keeps the entry in the file but skips it.")

    @field_validator("table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        try:
            QualifiedName.parse(value)
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return _check_schedule(value)

    @field_validator("archive_schema")
    @classmethod
    def _archive_schema(cls, value: str) -> str:
        if value.lower().startswith("pg_"):
            raise ValueError(f"{value!r}: PostgreSQL reserves schema names starting with pg_")
        return value

    @property
    def qualified(self) -> QualifiedName:
        return QualifiedName.parse(self.table)

    @property
    def period_enum(self) -> Period:
        return Period(self.period)

    @property
    def key(self) -> str:
        """A readable id for logs and map indexes: ``conn_id:schema.table``."""
        return f"{self.conn_id}:{self.qualified}"

    def rotation(self) -> RotationSpec:
        """The engine's view of this entry (the engine never imports this config module)."""
        return RotationSpec(
            conn_id=self.conn_id, table=self.qualified, column=self.column, period=self.period,
            premake=self.premake, retention=self.retention, default_partition=self.default_partition,
            archive_schema=self.archive_schema, lock_timeout=self.lock_timeout, lock_retries=self.lock_retries,
            detach_timeout=self.detach_timeout, batch_size=self.batch_size,
            archive_policy=self.archive.model_dump(exclude_unset=True) if self.archive else None)

    def archive_row(self) -> dict[str, Any]:
        """What goes into ``archive_queue.archive`` for a partition detached from this table."""
        return self.rotation().archive_row()


class DagSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: str | None = Field("@daily", description="The pg_partition_rotate DAG's schedule.")
    on_failure_callback: str | None = Field(
        None, description="Dotted path of a callable (or Airflow notifier instance) called when a task "
        "fails, e.g. mycompany.alerts.page_dba.")
    dry_run: bool = Field(False, description="Default of the DAG's dry_run param.")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return _check_schedule(value)

    @field_validator("on_failure_callback")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and ("." not in value or not all(p.isidentifier() for p in value.split("."))):
            raise ValueError(f"{value!r} is not a dotted path like package.module.function")
        return value


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    dag: DagSettings = Field(default_factory=lambda: DagSettings.model_validate({}))
    tables: list[TableConfig] = Field(default_factory=list)
    source: str = Field("", exclude=True, description="The file it was read from (for messages).")

    def enabled(self) -> list[TableConfig]:
        return [t for t in self.tables if t.enabled]

    def conn_ids(self) -> list[str]:
        return sorted({t.conn_id for t in self.enabled()})

    def find(self, conn_id: str, table: str) -> TableConfig | None:
        name = QualifiedName.parse(table)
        return next((t for t in self.tables if t.conn_id == conn_id and t.qualified == name), None)


# ---------------------------------------------------------------------------------------------------- loading


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The config file: ``path``, else ``$PG_PARTITION_CONFIG``, else pg_partition.yaml in the DAGs folder."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    dags = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    if not dags:
        home = os.environ.get("AIRFLOW_HOME", str(Path.home() / "airflow"))
        dags = str(Path(home) / "dags")
    return Path(dags) / DEFAULT_FILENAME


def load_config(path: str | os.PathLike[str] | None = None) -> FleetConfig:
    """Read and validate the fleet config. Raises :class:`ConfigError` naming file, line and field."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the pg-partition config: {exc.strerror or exc}", where=str(file),
            fix=f"create the file (see dags/{DEFAULT_FILENAME} in the provider repository) or point "
            f"{ENV_VAR} at it",
        ) from None
    return parse_config(text, source=str(file))


def parse_config(text: str, *, source: str = "<string>") -> FleetConfig:
    """Validate config text. All problems are reported at once, each as ``source, line N, field: message``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark else ""
        context = ""
        if exc.context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            context = f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(f"{source}{line}: invalid YAML: {exc.problem or exc}{context}",
                          fix="fix the YAML syntax at that line (indentation, quotes, colons)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}", fix="fix the YAML syntax") from None

    problems: list[str] = []
    problems += _duplicate_keys(root, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}, line 1: the config must be a mapping with dag, defaults and tables",
                          fix="start the file with 'tables:' (see the sample pg_partition.yaml)")

    defaults = data.get("defaults") or {}
    defaults_node = _child(root, "defaults")
    if not isinstance(defaults, dict):
        problems.append(_where(source, defaults_node, "defaults") + ": must be a mapping of table settings")
        defaults = {}
    tables_raw = data.get("tables") or []
    tables_node = _child(root, "tables")
    if not isinstance(tables_raw, list):
        problems.append(_where(source, tables_node, "tables") + ": must be a list of table entries")
        tables_raw = []

    top = {k: v for k, v in data.items() if k not in ("defaults", "tables")}
    try:
        top_model = FleetConfig.model_validate({**top, "source": source})
    except ValidationError as exc:
        top_model = FleetConfig(source=source)
        problems += _messages(exc, source, [(root, ())], top=True)

    tables: list[TableConfig] = []
    seen: dict[tuple[str, QualifiedName], int] = {}
    for i, entry in enumerate(tables_raw):
        entry_node = _child(tables_node, i)
        loc = f"tables[{i}]"
        if not isinstance(entry, dict):
            problems.append(_where(source, entry_node, loc) + ": each entry must be a mapping (conn_id: ...)")
            continue
        merged = merge_defaults(defaults, entry)
        try:
            table = TableConfig.model_validate(merged)
        except ValidationError as exc:
            problems += _messages(exc, source, [(entry_node, (loc,)), (defaults_node, ("defaults",))],
                                  fallback=(entry_node, loc))
            continue
        ident = (table.conn_id, table.qualified)
        if ident in seen:
            node = _child(entry_node, "table") or _child(entry_node, "conn_id") or entry_node
            problems.append(f"{_where(source, node, loc + '.table')}: {table.qualified} on {table.conn_id} "
                            f"is already listed as tables[{seen[ident]}]")
        else:
            seen[ident] = i
        tables.append(table)

    if problems:
        unique = list(dict.fromkeys(problems))
        plural = "s" if len(unique) > 1 else ""
        raise ConfigError(
            f"invalid pg-partition config {source} ({len(unique)} problem{plural}):\n  "
            + "\n  ".join(unique),
            fix=f"edit {source} at the lines above; the fields are documented in pg_partition.config",
        )
    return top_model.model_copy(update={"tables": tables})


def merge_defaults(defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry over the defaults; ``archive`` mappings merge key by key (``archive: null`` turns it off)."""
    merged = {**defaults, **entry}
    d_arch, e_arch = defaults.get("archive"), entry.get("archive")
    if isinstance(d_arch, dict) and isinstance(e_arch, dict):
        merged["archive"] = {**d_arch, **e_arch}
    return merged


# --------------------------------------------------------------------------------------- error -> file:line

Loc = tuple[str | int, ...]


def _child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(key, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v if isinstance(v, yaml.Node) else None
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        child = node.value[key]
        return child if isinstance(child, yaml.Node) else None
    return None


def _key_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k
    return None


def _where(source: str, node: yaml.Node | None, field: str) -> str:
    line = f", line {node.start_mark.line + 1}" if node is not None else ""
    return f"{source}{line}, {field}"


def _field_path(prefix: Sequence[str], loc: Loc) -> str:
    out = ".".join(prefix)
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _locate(node: yaml.Node | None, loc: Loc) -> tuple[yaml.Node | None, int]:
    """The deepest node along ``loc`` and how many parts of it were found."""
    found = 0
    for i, part in enumerate(loc):
        nxt = _child(node, part)
        if nxt is None:
            if i == len(loc) - 1 and isinstance(part, str) and _key_node(node, part) is not None:
                return _key_node(node, part), found + 1  # a null value: point at its key
            break
        node, found = nxt, found + 1
    return node, found


def _messages(exc: ValidationError, source: str, roots: Iterable[tuple[yaml.Node | None, tuple[str, ...]]],
              fallback: tuple[yaml.Node | None, str] | None = None, *, top: bool = False) -> list[str]:
    """pydantic errors -> ``file, line N, field: message (got X)``; the line of the value where it exists."""
    out = []
    roots = list(roots)
    for err in exc.errors():
        loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        best: tuple[yaml.Node | None, int, tuple[str, ...]] = (None, -1, ())
        for root, prefix in roots:
            if root is None:
                continue
            node, depth = _locate(root, loc)
            if depth > best[1] and (depth > 0 or best[0] is None):
                best = (node, depth, prefix)
        node, depth, prefix = best
        if depth <= 0 and fallback is not None:
            node, prefix = fallback[0], (fallback[1],)
        msg = str(err["msg"])
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; allowed: " + _allowed(loc, top) + ")"
        elif err["type"] != "value_error" and "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append(f"{_where(source, node, _field_path(prefix, loc))}: {msg}")
    return out


def _allowed(loc: Loc, top: bool) -> str:
    if top and len(loc) == 1:
        return "version, dag, defaults, tables"
    model: type[BaseModel] = TableConfig
    if loc and loc[0] == "archive":
        model = ArchivePolicy
    elif loc and loc[0] == "dag":
        model = DagSettings
    return ", ".join(model.model_fields)


def _duplicate_keys(node: yaml.Node | None, source: str, path: str = "") -> list[str]:
    """PyYAML silently keeps the last of two equal keys; a config must not hide an edit that way."""
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = str(k.value)
            sub = f"{path}.{key}" if path else key
            if key in seen:
                out.append(f"{_where(source, k, sub)}: duplicate key (the earlier value would be ignored)")
            seen.add(key)
            out += _duplicate_keys(v, source, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, source, f"{path}[{i}]")
    return out


# ------------------------------------------------------------------------------------------------- scheduling


def is_due(schedule: str | None, start: datetime | None, end: datetime | None) -> bool:
    """Whether an entry with cron ``schedule`` runs in a DAG run covering ``(start, end]``.

    The DAG passes the previous tick of its own schedule as ``start`` and the run's logical date as ``end``, so
    an entry runs on the first DAG run at or after each of its own ticks. ``None`` schedule, or no window (a
    manual trigger), means every run: a person who triggers the DAG by hand expects every table looked at.
    """
    if schedule is None or start is None or end is None or end <= start:
        return True
    from croniter import croniter

    nxt: datetime = croniter(cron_expression(schedule), start).get_next(datetime)  # strictly after start
    return nxt <= end


def cron_expression(schedule: str) -> str:
    """A cron preset (``@daily``) as the five-field expression croniter understands everywhere."""
    return {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
            "@monthly": "0 0 1 * *", "@quarterly": "0 0 1 */3 *", "@yearly": "0 0 1 1 *",
            "@annually": "0 0 1 1 *"}.get(schedule.strip(), schedule.strip())


def previous_tick(schedule: str | None, moment: datetime) -> datetime | None:
    """The tick of ``schedule`` strictly before ``moment`` (None for an unscheduled DAG)."""
    if schedule is None:
        return None
    from croniter import croniter

    prev: datetime = croniter(cron_expression(schedule), moment).get_prev(datetime)
    return prev
