"""Operators that fold two conversion steps into one task, so the convert graph has fewer nodes that are always
skipped (every task is a process that parses the DAG file again: fewer tasks also make a run faster).

* :class:`ConvertPartitionsAndCaptureOperator`: add the partitions, then decide change capture and install it
  (before ``plan_fill``, as before). When capture is off the task still succeeds and says why, instead of a
  separate ``install_capture`` task that is skipped in every append-only run.
* :class:`ConvertAfterSwapOperator`: one task after the swap for both modes. Without capture it copies the rows
  written since the fill (catch-up); with capture, where the swap applied every captured change under its lock,
  it compares the retired table with the live one when ``verify_after_swap`` is on (logged, not a gate: rows the
  application changed after the swap differ legitimately). It replaces the ``verify_after_swap`` /
  ``catch_up`` task pair, one of which was always skipped.

Both steps keep their idempotence: each half is safe to repeat, so a retried task simply runs both again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from pg_partition.core import convert
from pg_partition.core.convert import capture, verify
from pg_partition.core.db import catalog
from pg_partition.core.db.names import derived_name
from pg_partition.core.params import parse_bool, parse_text
from pg_partition.operators.convert import ConvertAddPartitionsOperator, ConvertCatchUpOperator


class ConvertPartitionsAndCaptureOperator(ConvertAddPartitionsOperator):
    """:class:`ConvertAddPartitionsOperator`, then ``capture_changes`` (auto: on when pg_stat_user_tables shows
    UPDATE/DELETE) decided, recorded and installed. Returns the partitions result with a ``capture`` key."""

    template_fields: Sequence[str] = (*ConvertAddPartitionsOperator.template_fields, "capture_changes")
    ui_color = "#f3e2c7"

    def __init__(self, *, capture_changes: bool | str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capture_changes = capture_changes

    def execute(self, context: Context) -> dict[str, Any]:
        result = super().execute(context)
        with self.run_step() as (ex, spec):
            installed = convert.install_capture(ex, spec, self.capture_changes, where=parse_text(self.where),
                                                **self.lock_kwargs())
            installed.update(capture.status(ex.conn, spec.table), dry_run=ex.dry_run)
        self.log.info("change capture: %s (%s)", "installed" if installed["capture"] else "off",
                      installed["reason"])
        return {**result, "capture": installed}


class ConvertAfterSwapOperator(ConvertCatchUpOperator):
    """After the swap: catch-up (append-only) or, with ``verify_after_swap``, the retired-vs-live comparison
    (change capture). The comparison reads both tables once more and cannot fail the run (rows the application
    changed since the swap differ legitimately; the gate is the verify before the swap), so the convert DAG
    leaves it off unless asked: at 2M rows it was a sixth of the run."""

    template_fields: Sequence[str] = (*ConvertCatchUpOperator.template_fields, "verify_after_swap")

    def __init__(self, *, verify_after_swap: bool | str = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verify_after_swap = verify_after_swap

    def execute(self, context: Context) -> dict[str, Any]:
        table = self.qualified_table
        wanted = parse_bool(self.verify_after_swap, what="verify_after_swap")
        with self.connection() as conn:
            captured = convert.capture_on(conn, table)
        if not captured:
            return {"mode": "catch_up", "catch_up": super().execute(context)}
        if not wanted:
            self.log.info("change capture: the swap applied every captured change under its lock and the verify "
                          "before it passed; verify_after_swap is off, so %s is not compared with the live table "
                          "again", table.sibling(derived_name(table.name, "retired")))
            return {"mode": "none", "verify_after_swap": False}
        retired = table.sibling(derived_name(table.name, "retired"))
        with self.connection() as conn:
            if self.is_dry_run and not (catalog.exists(conn, retired) and catalog.exists(conn, table)):
                self.log.info("[dry run] would verify %s against %s", table, retired)
                return {"mode": "verify", "verify": {"dry_run": True, "source": str(retired), "dest": str(table)}}
            report = verify.verify(conn, retired, table)
        if not report.ok:
            self.log.warning("verification found differences (not failing: after the swap, rows the application "
                             "changed or deleted since then legitimately differ from %s):\n%s", retired,
                             report.summary())
        else:
            self.log.info("the live partitioned table matches %s partition by partition", retired)
        return {"mode": "verify", "verify": report.as_dict()}
