"""Shared benchmark machinery: a real stack (durable settings), figures with their baseline, the report.

Every figure is a measurement paired with a baseline measured in the same run on the same machine, so the
ratio means something on any hardware; absolute numbers are printed but never asserted.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from tools.stack import PgCluster, S3Server, free_port, pg_bindir

# BENCH_RESULTS redirects the report (CI's tiny run must not overwrite a committed one).
RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


@dataclass
class Figure:
    """One measured value and, when it has one, the baseline it is judged against."""

    group: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    goal: str = ""  # e.g. ">= 0.9x", "<= 100 ms"
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / float(self.baseline)  # type: ignore[arg-type]

    def line(self) -> str:
        base = f" vs {self.baseline_name} {self.baseline:,.2f} {self.unit}" if self.baseline is not None else ""
        ratio = f" -> ratio {self.ratio:.2f}x" if self.ratio is not None else ""
        goal = f" [goal {self.goal}: {'met' if self.met else 'MISSED'}]" if self.goal and self.met is not None else ""
        return f"{self.group} / {self.name}: {self.value:,.2f} {self.unit}{base}{ratio}{goal}"


@dataclass
class BenchEnv:
    """A PostgreSQL primary + standby with durable settings (fsync on) and an S3 server, in a temp dir."""

    root: Path
    cluster: PgCluster
    s3: S3Server
    figures: list[Figure] = field(default_factory=list)

    def new_database(self) -> str:
        name = f"b_{uuid.uuid4().hex[:10]}"
        with self.cluster.primary.connect(autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.cluster.primary.port} user=postgres dbname={dbname}"

    def connect(self, dbname: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        print(fig.line(), flush=True)
        return fig

    def pgbench(self) -> str:
        return str(pg_bindir() / "pgbench")

    def machine(self) -> dict[str, str]:
        facts = {"cpu cores": str(os.cpu_count()), "platform": platform.platform(),
                 "python": platform.python_version()}
        with contextlib.suppress(OSError):
            mem = next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
            facts["memory"] = f"{int(mem.split()[1]) / 1024**2:.1f} GiB"
        with psycopg.connect(self.dsn("postgres")) as conn:
            facts["postgresql"] = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
            for name in ("shared_buffers", "max_wal_size", "fsync", "synchronous_commit", "wal_level",
                         "maintenance_work_mem", "work_mem"):
                facts[name] = conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
        return facts


@contextlib.contextmanager
def bench_env(prefix: str = "pgp-bench-") -> Iterator[BenchEnv]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    cluster = PgCluster.create(root / "pg", fast_unsafe=False)
    s3 = S3Server(free_port(), root / "moto.log")
    try:
        s3.start()
        yield BenchEnv(root, cluster, s3)
    finally:
        s3.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def child_peak_rss_mb() -> float:
    """Peak RSS of the largest finished child process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run a command in a fresh process; returns (seconds, peak RSS in MB of that process, stdout)."""
    wrapper = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    res = subprocess.run([*wrapper, *cmd], capture_output=True, text=True, env=env, check=True)
    seconds = time.perf_counter() - start
    rss = float(res.stderr.strip().splitlines()[-1]) / 1024 if wrapper else child_peak_rss_mb()
    return seconds, rss, res.stdout


def write_report(env_facts: dict[str, str], figures: list[Figure], rows: int,
                 series: dict[str, list[tuple[float, float]]] | None = None) -> Path:
    """bench/results/<date>.md plus a PNG chart (ratios, and time per row across sizes when measured)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    md = RESULTS / f"{stamp}.md"
    png = RESULTS / f"{stamp}.png"
    lines = [f"# pg-partition benchmarks, {stamp}", "", f"BENCH_ROWS = {rows:,}", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in env_facts.items()]
    lines += ["", "## Results", "", "| group | figure | value | baseline | ratio | goal | met |",
              "|---|---|---|---|---|---|---|"]
    for f in figures:
        base = f"{f.baseline:,.2f} {f.unit} ({f.baseline_name})" if f.baseline is not None else ""
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        met = "" if f.met is None else ("yes" if f.met else "**no**")
        lines.append(f"| {f.group} | {f.name} | {f.value:,.2f} {f.unit} | {base} | {ratio} | {f.goal} | {met} |")
    notes = [f for f in figures if f.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {f.group} / {f.name}: {f.note}" for f in notes]
    lines += ["", f"![chart]({png.name})", ""]
    md.write_text("\n".join(lines))
    _chart(figures, series or {}, png)
    return md


def _chart(figures: list[Figure], series: dict[str, list[tuple[float, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Scaling figures have their own panel (time per row, lower is better); the bars are "ours vs baseline".
    ratios = [(f"{f.group}: {f.name}", f.ratio) for f in figures if f.ratio is not None and f.group != "scaling"]
    ncols = 2 if series else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, max(3.0, 0.45 * len(ratios) + 1.5)))
    ax = axes[0] if ncols == 2 else axes
    if ratios:
        ax.barh([r[0] for r in ratios], [r[1] for r in ratios], color="#4c72b0")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("ratio to the baseline measured in the same run")
        ax.invert_yaxis()
    ax.set_title("pg-partition vs baselines")
    if series:
        ax2 = axes[1]
        for label, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax2.plot(xs, ys, marker="o", label=label)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("rows")
        ax2.set_ylabel("microseconds per row")
        ax2.set_ylim(bottom=0)
        ax2.legend()
        ax2.set_title("scaling: time per row should stay flat")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
