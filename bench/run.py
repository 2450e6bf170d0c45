"""`make bench`: every benchmark in one run against one real stack; writes bench/results/<date>.md and a PNG.

Sizes scale with BENCH_ROWS (default 1,000,000: about 10-15 minutes on 2 cores). BENCH_ONLY=fill,impact,...
runs a subset (pgslice: the side-by-side conversion with pgslice, bench/peers.py).
Each figure is printed with its baseline and ratio as it is measured.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from bench import archive as archive_bench
from bench import capture as capture_bench
from bench import convert as convert_bench
from bench import impact, peers, scaling
from bench.common import bench_env, write_report

# name -> (heading, entry point); each entry point is run(env, rows) and adds its figures to env.
SUITES = {
    "pgslice": ("pgslice beside us: whole conversion and steps", peers.run),
    "fill": ("fill and whole conversion", convert_bench.run),
    "impact": ("application impact", impact.run),
    "capture": ("change capture", capture_bench.run),
    "archive": ("archive", archive_bench.run),
    "scaling": ("scaling", scaling.run),
}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = int(os.environ.get("BENCH_ROWS", "1000000"))
    only = [s for s in os.environ.get("BENCH_ONLY", ",".join(SUITES)).split(",") if s]
    unknown = set(only) - set(SUITES)
    if unknown:
        print(f"unknown BENCH_ONLY entries {sorted(unknown)}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    # Small runs (CI's BENCH_ROWS=20000) shorten the timed workloads too.
    os.environ.setdefault("BENCH_CAPTURE_SECONDS", str(max(3, min(15, rows // 70_000))))
    os.environ.setdefault("BENCH_CAPTURE_ROUNDS", "3" if rows >= 200_000 else "1")
    os.environ.setdefault("BENCH_ARCHIVE_ROUNDS", "3" if rows >= 200_000 else "1")
    os.environ.setdefault("BENCH_REPEAT", "2" if rows >= 200_000 else "1")
    series: dict[str, list[tuple[float, float]]] = {}
    started = time.monotonic()
    with bench_env() as env:
        print(f"== pg-partition benchmarks, BENCH_ROWS={rows:,}", flush=True)
        for name, (heading, run) in SUITES.items():
            if name in only:
                print(f"== {heading}", flush=True)
                out = run(env, rows)
                if name == "scaling":
                    _, series = out  # the scaling suite also returns its time-per-row series for the chart
        facts = env.machine()
        facts["total benchmark time"] = f"{time.monotonic() - started:.0f} s"
        report = write_report(facts, env.figures, rows, series)
    print("\n== summary")
    for f in env.figures:
        print(f.line())
    print(f"\nreport: {report} (chart {report.with_suffix('.png').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
