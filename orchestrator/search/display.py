"""Terminal tables for sweeps (rich): the top settings and how to open them in MLflow."""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.formatting import mean_std
from orchestrator.search.sweep import SweepResult


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped to a file or CI log."""
    return Console(width=None if sys.stdout.isatty() else 160)


def print_sweep(result: SweepResult, top: int = 10, console: Console | None = None) -> None:
    """The top settings by seed-mean validation accuracy, then how to open them in MLflow."""
    settings = result.settings()
    table = Table(title=f"sweep {escape(result.name)}: top settings by mean val_acc ({len(result.frame)} runs)")
    for col in ("setting", *[p.removeprefix("method.params.") for p in result.parameters], "seeds", "failed",
                "stopped", "val_acc", "test_acc", "test last ep.", "test best ep."):
        table.add_column(escape(col), justify="left" if col == "setting" else "right")
    for sid, row in settings.head(top).iterrows():
        values = [f"{row[p]:.4g}" if isinstance(row[p], float) else escape(str(row[p])) for p in result.parameters]
        protocols = [f"{100 * row[c]:.2f}" if row.get(c, math.nan) == row.get(c, math.nan) else "n/a"
                     for c in ("last_epoch_test_acc_mean", "peak_test_acc_mean")]
        table.add_row(escape(str(sid)), *values, str(int(row["seeds"])), str(int(row["failed"])),
                      str(int(row["early_stopped"])),
                      mean_std(100 * row["val_acc_mean"], 100 * row["val_acc_std"], int(row["seeds"])),
                      f"{100 * row['test_acc_mean']:.2f}", *protocols)
    console = console or wide_console()
    console.print(table)
    console.print("test_acc: of the epoch chosen on val (kdo's); last ep.: the last epoch's (RepDistiller's protocol); "
                  "best ep.: the best over epochs (mdistiller's and LS's: the test set chooses, optimistic). Only val "
                  "chooses here.")
    console.print(f"MLflow: {escape(result.ui_hint())}")
