"""What partitioning and archiving saved: sizes before/after, bytes in S3, monthly cost, and a chart.

The users justified the archive by cost (RDS General Purpose storage $0.115 per GB-month, backups $0.095, S3
$0.025: "1 TB: RDS $115, S3 $25, 78% less"). After a conversion and after every archive run this module measures:

* the table in the database (heap + indexes + TOAST, partitions summed, via ``core.catalog.sizes``),
* what still sits in the database on its way out: the ``<table>_retired`` table left by a conversion and
  detached partitions queued for archive (the state schema's ``archive_queue``) that have not been dropped yet,
* the bytes already archived in S3 (object sizes under the table's archive prefix),

and prices them per month. Each measurement is recorded as a checkpoint of the job ``cost:<schema.table>`` in the
state schema, so the chart's "database vs S3 over time" is built from the database itself on any worker.

No Airflow imports: S3 is read through any boto3 client passed in (the operator gets one from S3Hook).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.advise.advisor import GB, human_bytes
from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import QualifiedName, Sizes
from pg_partition.core.db.names import derived_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SNAPSHOT_STEP = "snapshot"


@dataclass(frozen=True)
class Prices:
    """USD per GB-month (GB = 2**30 bytes, as AWS bills). Defaults: the talk's RDS gp2 / backup / S3 numbers."""

    database: float = 0.115
    backups: float = 0.095
    s3: float = 0.025


@dataclass(frozen=True)
class MonthlyCost:
    database: float
    backups: float
    s3: float

    @property
    def total(self) -> float:
        return self.database + self.backups + self.s3


def monthly_cost(database_bytes: int, s3_bytes: int, prices: Prices) -> MonthlyCost:
    """Backups are priced on the database bytes: every GB in the database is also in its snapshots."""
    db_gb, s3_gb = database_bytes / GB, s3_bytes / GB
    return MonthlyCost(database=db_gb * prices.database, backups=db_gb * prices.backups, s3=s3_gb * prices.s3)


@dataclass(frozen=True)
class RelationSize:
    name: str
    table: int
    indexes: int
    toast: int
    total: int
    rows_estimate: int
    bound: str = ""

    @classmethod
    def of(cls, name: QualifiedName, sizes: Sizes, rows: int, bound: str = "") -> RelationSize:
        return cls(str(name), sizes.table, sizes.indexes, sizes.toast, sizes.total, rows, bound)


@dataclass(frozen=True)
class S3Usage:
    bucket: str
    prefixes: tuple[str, ...]
    bytes: int
    objects: int

    @property
    def uris(self) -> list[str]:
        return [f"s3://{self.bucket}/{p}" for p in self.prefixes]


def archive_prefixes(prefix: str, database: str, table: QualifiedName) -> tuple[str, ...]:
    """Where the archive puts a table's objects: ``prefix/<db>/<schema>/<table>/`` (the layout of
    ``core.archive.object_key``: detached partitions and the retired table both go under their logical table,
    one ``period=<label>/`` folder each, manifests beside the objects)."""
    parts = [prefix.strip("/")] if prefix.strip("/") else []
    parts += [_segment(database), _segment(table.schema), _segment(table.name)]
    return ("/".join(parts) + "/",)


def _segment(text: str) -> str:
    """One key segment, escaped as the archive escapes it ('/' in a PostgreSQL name is not a folder)."""
    return text.replace("%", "%25").replace("/", "%2F")


def s3_usage(client: Any, bucket: str, prefixes: tuple[str, ...] | list[str]) -> S3Usage:
    """Sum of object sizes under each prefix (ListObjectsV2, paginated; manifests included: they are billed)."""
    total = count = 0
    seen: set[str] = set()
    paginator = client.get_paginator("list_objects_v2")
    for prefix in prefixes:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"] in seen:  # overlapping prefixes must not count an object twice
                    continue
                seen.add(obj["Key"])
                total += int(obj["Size"])
                count += 1
    return S3Usage(bucket, tuple(prefixes), total, count)


@dataclass
class Snapshot:
    """One measurement of a table's footprint. ``database_bytes`` is what the database bills for it now."""

    table: str
    taken_at: str
    live: RelationSize
    partitions: list[RelationSize]
    retired: RelationSize | None
    detached: list[RelationSize]
    s3_bytes: int = 0
    s3_objects: int = 0
    s3_uris: list[str] = field(default_factory=list)

    @property
    def in_database(self) -> list[RelationSize]:
        return [self.live] + ([self.retired] if self.retired else []) + self.detached

    @property
    def database_bytes(self) -> int:
        return sum(r.total for r in self.in_database)

    def breakdown(self) -> dict[str, int]:
        rels = self.in_database
        return {"table": sum(r.table for r in rels), "indexes": sum(r.indexes for r in rels),
                "toast": sum(r.toast for r in rels), "total": sum(r.total for r in rels)}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Snapshot:
        return cls(
            table=d["table"], taken_at=d["taken_at"], live=RelationSize(**d["live"]),
            partitions=[RelationSize(**p) for p in d.get("partitions", [])],
            retired=RelationSize(**d["retired"]) if d.get("retired") else None,
            detached=[RelationSize(**p) for p in d.get("detached", [])],
            s3_bytes=int(d.get("s3_bytes", 0)), s3_objects=int(d.get("s3_objects", 0)),
            s3_uris=list(d.get("s3_uris", [])),
        )


def _rel(conn: psycopg.Connection[Any], name: QualifiedName, bound: str = "") -> RelationSize | None:
    oid = catalog.table_oid(conn, name)
    if oid is None:
        return None
    kind = conn.execute("SELECT relkind::text FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    sizes = catalog.sizes(conn, oid, partitioned=bool(kind and kind[0] == "p"))
    return RelationSize.of(name, sizes, catalog.row_estimate(conn, oid), bound)


def _state_table_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                       (sql.Identifier(state.SCHEMA, name).as_string(conn),)).fetchone()
    return bool(row and row[0])


def detached_pending(conn: psycopg.Connection[Any], table: QualifiedName) -> list[QualifiedName]:
    """Tables queued for archive from ``table`` that still exist in the database (not dropped yet, or kept).

    (Not a catalog question: only the archive queue knows which standalone tables used to be partitions.)
    """
    if not _state_table_exists(conn, "archive_queue"):
        return []
    rows = conn.execute(
        sql.SQL("""SELECT schema_name, table_name FROM {}
                   WHERE parent_schema = %s AND parent_table = %s
                   ORDER BY range_from NULLS LAST, table_name""").format(
            sql.Identifier(state.SCHEMA, "archive_queue")),
        (table.schema, table.name),
    ).fetchall()
    retired = table.sibling(derived_name(table.name, "retired"))  # queued too, but measured on its own
    names = [QualifiedName(r[0], r[1]) for r in rows]
    return [n for n in names if n != retired and catalog.exists(conn, n)]


def measure(conn: psycopg.Connection[Any], table: QualifiedName, *, s3: S3Usage | None = None,
            taken_at: datetime | None = None) -> Snapshot:
    """The table's footprint now: live table (per partition), retired table, detached-but-not-dropped, S3."""
    info = catalog.describe(conn, table)
    live = RelationSize.of(table, info.sizes, info.row_estimate)
    parts = [r for r in (_rel(conn, p.name, p.bound) for p in info.partitions) if r is not None]
    retired = _rel(conn, table.sibling(derived_name(table.name, "retired")))
    attached = {p.name for p in info.partitions}  # a restored partition is attached again: count it once
    detached = [r for r in (_rel(conn, n) for n in detached_pending(conn, table) if n not in attached)
                if r is not None]
    when = (taken_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return Snapshot(
        table=str(table), taken_at=when.isoformat(), live=live, partitions=parts, retired=retired,
        detached=detached, s3_bytes=s3.bytes if s3 else 0, s3_objects=s3.objects if s3 else 0,
        s3_uris=s3.uris if s3 else [],
    )


# ----------------------------------------------------------------------------------------------- history


def job_id(table: QualifiedName) -> str:
    return f"cost:{table}"


def record(conn: psycopg.Connection[Any], snap: Snapshot, snapshot_id: str) -> None:
    """Store the snapshot; a retried task passes the same ``snapshot_id`` and overwrites its own entry."""
    name = QualifiedName.parse(snap.table)
    state.start_job(conn, job_id(name), "cost", str(name), {})
    state.put_checkpoint(conn, job_id(name), SNAPSHOT_STEP, snap.as_dict(), part=snapshot_id)


def history(conn: psycopg.Connection[Any], table: QualifiedName, *, exclude: str | None = None) -> list[Snapshot]:
    """Recorded snapshots of ``table``, oldest first (empty when none or the state schema does not exist);
    ``exclude`` leaves out one snapshot id (a retried task's own earlier attempt)."""
    if not _state_table_exists(conn, "checkpoints"):
        return []
    snaps = [Snapshot.from_dict(v) for k, v in state.checkpoints(conn, job_id(table), SNAPSHOT_STEP).items()
             if k != exclude]
    return sorted(snaps, key=lambda s: s.taken_at)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Baseline:
    """The "before" column: where it comes from, and its numbers (breakdown unknown for an explicit total)."""

    source: str
    database_bytes: int
    s3_bytes: int
    breakdown: dict[str, int] | None


@dataclass
class CostReport:
    table: str
    prices: Prices
    before: Baseline
    after: Snapshot
    history: list[Snapshot]

    @property
    def cost_before(self) -> MonthlyCost:
        return monthly_cost(self.before.database_bytes, self.before.s3_bytes, self.prices)

    @property
    def cost_after(self) -> MonthlyCost:
        return monthly_cost(self.after.database_bytes, self.after.s3_bytes, self.prices)

    @property
    def monthly_saving(self) -> float:
        return self.cost_before.total - self.cost_after.total

    def as_dict(self) -> dict[str, Any]:
        before, after = self.cost_before, self.cost_after
        return {
            "table": self.table,
            "prices": asdict(self.prices),
            "before": asdict(self.before),
            "after": {**self.after.as_dict(), "database_bytes": self.after.database_bytes,
                      "breakdown": self.after.breakdown()},
            "cost_before": {**asdict(before), "total": before.total},
            "cost_after": {**asdict(after), "total": after.total},
            "monthly_saving": self.monthly_saving,
            "history_points": len(self.history),
        }


def baseline(after: Snapshot, earlier: list[Snapshot], before_bytes: int | None = None) -> Baseline:
    """The "before": an explicit size, else the first recorded measurement, else the retired table (the
    original table as it was at the swap), else the current measurement (nothing to compare with yet)."""
    if before_bytes is not None:
        return Baseline("given", int(before_bytes), 0, None)
    if earlier and earlier[0].taken_at < after.taken_at:
        first = earlier[0]
        if first.retired is not None:  # measured right after a conversion: the retired table is the "before"
            r = first.retired
            return Baseline(f"the retired table at {first.taken_at}", r.total, 0,
                            {"table": r.table, "indexes": r.indexes, "toast": r.toast, "total": r.total})
        return Baseline(f"first measurement at {first.taken_at}", first.database_bytes, first.s3_bytes,
                        first.breakdown())
    if after.retired is not None:
        r = after.retired
        return Baseline(f"the retired table {r.name} (the table before conversion)", r.total, 0,
                        {"table": r.table, "indexes": r.indexes, "toast": r.toast, "total": r.total})
    return Baseline("this measurement (no earlier one recorded)", after.database_bytes, after.s3_bytes,
                    after.breakdown())


def build_report(conn: psycopg.Connection[Any], table: QualifiedName, *, s3: S3Usage | None = None,
                 prices: Prices | None = None, before_bytes: int | None = None,
                 snapshot_id: str | None = None, taken_at: datetime | None = None) -> CostReport:
    """Measure now, compare with the baseline, and (with ``snapshot_id``) record the measurement."""
    after = measure(conn, table, s3=s3, taken_at=taken_at)
    earlier = [s for s in history(conn, table, exclude=snapshot_id) if s.taken_at < after.taken_at]
    report = CostReport(str(table), prices or Prices(), baseline(after, earlier, before_bytes), after,
                        [*earlier, after])
    if snapshot_id:
        record(conn, after, snapshot_id)
    return report


def _usd(v: float, digits: int = 2) -> str:
    return f"${v:,.{digits}f}"


def _change(before: float, after: float, money: int | None = None) -> str:
    delta = after - before
    text = _usd(abs(delta), money) if money is not None else human_bytes(abs(delta))
    sign = "+" if delta > 0 else ("-" if delta < 0 else "±")
    pct = f" ({delta / before:+.0%})" if before else ""
    return f"{sign}{text}{pct}"


def _digits(*amounts: float) -> int:
    """Cents for real money; six decimals when a small table's whole bill is under a dollar (else every cell
    would read $0.00). One precision per report, so the columns compare."""
    return 2 if max(amounts, default=0) >= 1 else 6


def render_markdown(r: CostReport) -> str:
    """The before/after table for the task log (and the .md uploaded beside the chart)."""
    a, b = r.after, r.before
    ab = a.breakdown()
    bb = b.breakdown or {}
    cb, ca = r.cost_before, r.cost_after
    d = _digits(cb.total, ca.total)

    def row(label: str, before: int | None, after: int) -> str:
        bt = "-" if before is None else human_bytes(before)
        ch = "" if before is None else _change(before, after)
        return f"| {label} | {bt} | {human_bytes(after)} | {ch} |"

    lines = [
        f"### Cost report: {r.table} at {a.taken_at}",
        "",
        f"Before = {b.source}. Prices per GB-month: database {_usd(r.prices.database, 3)}, backups "
        f"{_usd(r.prices.backups, 3)}, S3 {_usd(r.prices.s3, 3)}.",
        "",
        "| | before | after | change |",
        "|---|---:|---:|---:|",
        row("heap (table)", bb.get("table"), ab["table"]),
        row("indexes", bb.get("indexes"), ab["indexes"]),
        row("toast", bb.get("toast"), ab["toast"]),
        row("**in the database**", b.database_bytes, a.database_bytes),
        f"| &nbsp;&nbsp;of which {r.table} | | {human_bytes(a.live.total)} | |",
    ]
    if a.retired:
        lines.append(f"| &nbsp;&nbsp;of which {a.retired.name} (retired, to archive) | | "
                     f"{human_bytes(a.retired.total)} | |")
    if a.detached:
        lines.append(f"| &nbsp;&nbsp;of which {len(a.detached)} detached partition(s) awaiting archive | | "
                     f"{human_bytes(sum(d.total for d in a.detached))} | |")
    lines += [
        row(f"**in S3** ({a.s3_objects} objects)", b.s3_bytes, a.s3_bytes),
        f"| database storage / month | {_usd(cb.database, d)} | {_usd(ca.database, d)} | "
        f"{_change(cb.database, ca.database, d)} |",
        f"| backups / month | {_usd(cb.backups, d)} | {_usd(ca.backups, d)} | {_change(cb.backups, ca.backups, d)} |",
        f"| S3 / month | {_usd(cb.s3, d)} | {_usd(ca.s3, d)} | {_change(cb.s3, ca.s3, d)} |",
        f"| **total / month** | **{_usd(cb.total, d)}** | **{_usd(ca.total, d)}** | "
        f"**{_change(cb.total, ca.total, d)}** |",
    ]
    if a.partitions:
        lines += ["", f"{len(a.partitions)} partitions:", "", "| partition | rows (est.) | size | bound |",
                  "|---|---:|---:|---|"]
        lines += [f"| {p.name} | {p.rows_estimate:,} | {human_bytes(p.total)} | {p.bound} |" for p in a.partitions]
    if a.s3_uris:
        lines += ["", "S3 measured under: " + ", ".join(a.s3_uris)]
    return "\n".join(lines)


def render_chart(r: CostReport) -> bytes:
    """PNG: sizes per partition (stacked heap/indexes/toast), and database vs S3 bytes over time.

    Uses matplotlib's object API on an Agg canvas (no pyplot, no global backend switch): safe in a worker
    that renders concurrently and on a machine without a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = r.after
    bars = list(a.partitions) or [a.live]
    if a.retired:
        bars.append(a.retired)
    bars += a.detached
    labels = [_short_label(b.name, a.table) for b in bars]
    mib = 1024**2

    fig = Figure(figsize=(max(8.0, 0.45 * len(bars) + 3), 8.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1)
    x = list(range(len(bars)))
    heap = [b.table / mib for b in bars]
    idx = [b.indexes / mib for b in bars]
    toast = [b.toast / mib for b in bars]
    ax1.bar(x, heap, label="heap", color="#4e79a7")
    ax1.bar(x, idx, bottom=heap, label="indexes", color="#f28e2b")
    ax1.bar(x, toast, bottom=[h + i for h, i in zip(heap, idx, strict=True)], label="toast", color="#59a14f")
    ax1.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("MiB")
    ax1.set_title(f"{a.table}: size per partition (in the database now)")
    ax1.legend(fontsize=8)

    points = r.history or [a]
    peak = max([s.database_bytes for s in points] + [s.s3_bytes for s in points] + [r.before.database_bytes])
    unit, scale = ("GiB", float(GB)) if peak >= 10 * GB else ("MiB", float(mib))
    times = [datetime.fromisoformat(s.taken_at) for s in points]
    ax2.plot(times, [s.database_bytes / scale for s in points], marker="o", label="database", color="#e15759")
    ax2.plot(times, [s.s3_bytes / scale for s in points], marker="s", label="S3 archive", color="#76b7b2")
    ax2.axhline(r.before.database_bytes / scale, linestyle="--", color="#bab0ac", label="database before")
    ax2.set_ylabel(unit)
    ax2.set_ylim(bottom=0)
    d = _digits(r.cost_before.total, r.cost_after.total)
    # "$" would start matplotlib mathtext: escape it
    now, before = (_usd(v, d).replace("$", r"\$") for v in (r.cost_after.total, r.cost_before.total))
    ax2.set_title(f"database vs S3 over time; monthly cost now {now} (before {before})")
    ax2.legend(fontsize=8)
    ax2.tick_params(axis="x", labelsize=8, rotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short_label(name: str, table: str) -> str:
    schema = table.split(".", 1)[0] + "."
    return name[len(schema):] if name.startswith(schema) else name


def report_key(prefix: str, table: QualifiedName, at: datetime, ext: str = "png") -> str:
    """``<prefix>/reports/<schema>.<table>/cost-<UTC timestamp>.<ext>``: beside the archive's manifests."""
    stamp = at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # two runs in one second: two charts
    base = "/".join(p for p in (prefix.strip("/"), "reports", f"{table.schema}.{table.name}") if p)
    return f"{base}/cost-{stamp}.{ext}"
