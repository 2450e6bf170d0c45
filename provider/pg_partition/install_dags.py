"""Copy the shipped DAG files and the example fleet config into a DAGs folder.

    python -m pg_partition.install_dags [DIR] [--force]

DIR defaults to Airflow's ``[core] dags_folder``. The DAG files are two lines each (they call
:mod:`pg_partition.dag_factory`), so upgrading the package upgrades the DAGs; re-running this after an upgrade
refreshes them. An existing ``pg_partition.yaml`` is never overwritten (it is yours), even with ``--force``;
``--force`` only replaces DAG files that differ from the shipped ones.

Why a copy and not a DAG bundle pointing into site-packages: the config file must be edited, and DAG processors
of every deployment know how to read a DAGs folder.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from importlib import resources
from pathlib import Path

CONFIG = "pg_partition.yaml"


def shipped() -> list[Path]:
    """The files in ``pg_partition/example_dags`` (DAG files and the example config), sorted."""
    root = Path(str(resources.files("pg_partition") / "example_dags"))
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: this pg_partition is not an installed wheel (in a source "
                                "checkout the DAG files are in dags/)")
    return sorted(p for p in root.iterdir() if p.suffix in (".py", ".yaml") and p.name != "__init__.py")


def install(target: Path, *, force: bool = False) -> dict[str, str]:
    """Copy into ``target``; returns {file name: "copied" | "unchanged" | "kept"}."""
    target.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    for src in shipped():
        dst = target / src.name
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            done[src.name] = "unchanged"
        elif dst.exists() and (src.name == CONFIG or not force):
            done[src.name] = "kept"
        else:
            shutil.copyfile(src, dst)
            done[src.name] = "copied"
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pg_partition.install_dags", description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", help="DAGs folder (default: [core] dags_folder)")
    parser.add_argument("--force", action="store_true", help="replace DAG files that differ (never the config)")
    args = parser.parse_args(argv)
    if args.dir:
        target = Path(args.dir)
    else:
        from pg_partition.settings import dags_folder

        target = dags_folder()
    for name, what in install(target, force=args.force).items():
        print(f"{what:9} {target / name}")
    kept = [n for n, w in install(target, force=False).items() if w == "kept" and n != CONFIG]
    if kept:
        print(f"{len(kept)} DAG file(s) differ from this version's and were kept; --force replaces them",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
