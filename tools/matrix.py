"""The PostgreSQL version matrix: run the end-to-end scenarios (tests/matrix) on each major version as the
non-superuser owner, and turn what the runs found into the support table (docs/support-matrix.md, and the README
between its markers). The table is produced by the run, never written by hand.

    python -m tools.matrix run [--majors 13,14,15,16,17,18] [--jobs 2] [--results DIR]
    python -m tools.matrix render --results DIR      # the table again from an earlier run's results

``run`` installs the server builds first (once; tools/stack.py caches them), then runs one pytest process per
version, ``--jobs`` at a time (each starts its own primary + standby, S3 server and Airflow metadata DB), records
each version's wall time, writes the table, and exits non-zero if any version failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "support-matrix.md"
README = REPO / "README.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"

# columns of the table: (label, section, key in the results file)
SERVER_FEATURES = [
    ("LIKE ... INCLUDING COMPRESSION", "LIKE ... INCLUDING COMPRESSION"),
    ("DETACH ... CONCURRENTLY", "DETACH PARTITION ... CONCURRENTLY"),
    ("publication row filters / column lists", "publication row filter (prqual)"),
    ("ANALYZE ONLY", "ANALYZE ONLY"),
]
SCENARIOS = [
    ("non-superuser owner", "test_runs_as_a_non_superuser_owner"),
    ("advisor", "test_advisor_as_the_owner"),
    ("convert + capture + verify + swap + unswap", "test_convert_with_capture_under_a_writer_verify_swap_unswap"),
    ("rotate (DEFAULT move, detach)", "test_rotate_moves_default_rows_and_detaches"),
    ("Parquet archive + restore", "test_parquet_archive_and_restore"),
    ("pg_dump archive + restore", "test_pg_dump_archive_where_the_client_allows"),
    ("missing GRANT refused up front", "test_missing_privileges_are_refused_up_front_with_the_grant_to_run"),
]


def run(majors: list[int], jobs: int, results: Path, pytest_args: list[str]) -> int:
    from tools.stack import pg_bindir

    results.mkdir(parents=True, exist_ok=True)
    for major in majors:  # serially: one npm install at a time, before the clocks start
        t0 = time.monotonic()
        bindir = pg_bindir(major)
        print(f"== PostgreSQL {major}: {bindir} ({time.monotonic() - t0:.1f}s)", flush=True)

    def one(major: int) -> tuple[int, int, float]:
        log = results / f"pg{major}.log"
        (results / f"pg{major}.json").unlink(missing_ok=True)
        env = dict(os.environ, PG_MAJOR=str(major), MATRIX_RESULTS=str(results))
        t0 = time.monotonic()
        with log.open("w") as fh:
            rc = subprocess.run([sys.executable, "-m", "pytest", "tests/matrix", "-p", "no:cacheprovider", "-q",
                                 "-m", "matrix", *pytest_args], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, check=False).returncode
        wall = time.monotonic() - t0
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        print(f"== PostgreSQL {major}: {'ok' if rc == 0 else 'FAILED'} in {wall:.0f}s: {tail[0]} (log: {log})",
              flush=True)
        return major, rc, wall

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(one, majors))
    total = time.monotonic() - t0
    for major, rc, wall in outcomes:
        _merge(results / f"pg{major}.json", {"run": {"returncode": rc, "wall_seconds": round(wall, 1)}})
    (results / "run.json").write_text(json.dumps({"majors": majors, "jobs": jobs, "wall_seconds": round(total, 1),
                                                  "finished": datetime.now(timezone.utc).isoformat(),
                                                  "load_average": round(os.getloadavg()[1], 1)}))
    render(results)
    print(f"== matrix wall time {total:.0f}s with {jobs} parallel version(s); table in {DOC.relative_to(REPO)}")
    return 0 if all(rc == 0 for _, rc, _ in outcomes) else 1


def _merge(path: Path, extra: dict[str, Any]) -> None:
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _cell(value: dict[str, Any] | None) -> str:
    if value is None:
        return "not run"
    return "yes" if value.get("works") else "no"


def _scenario_cell(value: dict[str, Any] | None, note: dict[str, Any] | None = None) -> str:
    if value is None:
        return "not run"
    if value["outcome"] != "passed":
        return f"**FAIL** ({value['seconds']:.0f}s)"
    text = f"pass ({value['seconds']:.0f}s)"
    if note is not None and note.get("why"):
        text += f": {note['why']}"
    return text


def render(results: Path) -> str:
    rows: list[dict[str, Any]] = []
    for path in sorted(results.glob("pg*.json"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0)):
        data = json.loads(path.read_text())
        data["major"] = int(re.sub(r"\D", "", path.stem))
        rows.append(data)
    run_info = json.loads((results / "run.json").read_text()) if (results / "run.json").exists() else {}
    head = ["PostgreSQL", *(label for label, _ in SERVER_FEATURES), *(label for label, _ in SCENARIOS),
            "wall time"]
    lines = [
        "<!-- generated by `make test-matrix` (tools/matrix.py); do not edit by hand -->",
        "",
        "Server features are probed on the server itself (tests/matrix/test_features.py); scenarios are the "
        "end-to-end tests in tests/matrix/test_lifecycle.py, run through the DAGs as the non-superuser owner "
        "`app_owner` (LOGIN NOSUPERUSER NOREPLICATION, member of `pg_monitor`, owner of the database and tables), "
        "with a streaming standby. pg_dump is Debian's client; a pg_dump older than the server is refused up front "
        "(use `format: parquet` or `csv`, or install the matching `postgresql-client-N`).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    failures: list[str] = []
    for data in rows:
        server = data.get("server", {}).get("version") or str(data["major"])
        features, scenarios = data.get("features", {}), data.get("scenarios", {})
        cells = [server]
        cells += [_cell(features.get(key)) for _, key in SERVER_FEATURES]
        for label, key in SCENARIOS:
            note = {"rotate (DEFAULT move, detach)": features.get("rotation detach"),
                    "pg_dump archive + restore": features.get("pg_dump archive + restore")}.get(label)
            cells.append(_scenario_cell(scenarios.get(key), note))
        wall = data.get("run", {}).get("wall_seconds")
        cells.append(f"{wall:.0f}s" if wall is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
        for name, value in sorted(scenarios.items()):
            if value["outcome"] != "passed":
                failures.append(f"- PostgreSQL {server}, `{name}`: {value['message'] or value['outcome']}")
    lines.append("")
    if run_info:
        load = run_info.get("load_average")
        lines.append(f"Whole matrix: {run_info['wall_seconds']:.0f}s wall with {run_info['jobs']} version(s) in "
                     f"parallel on a {os.cpu_count()}-core machine"
                     + (f" (5-minute load average {load} at the end: times include other work)" if load else "")
                     + f", {run_info['finished'][:16].replace('T', ' ')} UTC.")
        lines.append("")
    if failures:
        lines += ["Failures in this run:", "", *failures, ""]
    table = "\n".join(lines)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("# PostgreSQL support matrix\n\n" + table)
    text = README.read_text()
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        README.write_text(before + START + "\n" + table + END + after)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the scenarios on each version and write the table")
    r.add_argument("--majors", default=os.environ.get("MATRIX_MAJORS", "13,14,15,16,17,18"))
    r.add_argument("--jobs", type=int, default=int(os.environ.get("MATRIX_JOBS", "2")))
    r.add_argument("--results", type=Path, default=None)
    r.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    g = sub.add_parser("render", help="write the table from an earlier run's results")
    g.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "render":
        print(render(args.results))
        return 0
    majors = [int(m) for m in re.split(r"[,\s]+", args.majors.strip()) if m]
    results = args.results or Path(tempfile.mkdtemp(prefix="pgp-matrix-"))
    return run(majors, args.jobs, results, args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
