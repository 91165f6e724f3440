"""The main job behind `make demo`: a teacher, CE and KD students over seeds (mean ± std), then a small
KD sweep (Optuna TPE + ASHA, packed trials) over temperature and KD weight."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy import stats

from orchestrator.display import print_sweep, wide_console
from orchestrator.runner import RunResult, run
from orchestrator.sweep import SweepResult, sweep


def summarize(results: Sequence[RunResult]) -> pd.DataFrame:
    """One row per method: runs, failures, val/test accuracy mean and std over seeds, seconds."""
    rows = [{"method": r.config.method.name, "seed": r.config.training.seed, "status": r.status,
             "val_acc": r.val_acc, "test_acc": r.test_acc, "seconds": r.seconds} for r in results]
    table = pd.DataFrame(rows)
    return table.groupby("method", sort=False).agg(
        runs=("seed", "size"), failed=("status", lambda s: int((s != "finished").sum())),
        val_mean=("val_acc", "mean"), val_std=("val_acc", "std"),
        test_mean=("test_acc", "mean"), test_std=("test_acc", "std"), seconds=("seconds", "mean"))


def verdict(results: Sequence[RunResult], a: str = "kd", b: str = "ce") -> str:
    """What the seeds say about method a vs b on test accuracy (Welch's t-test, no overclaiming)."""
    acc = {m: [r.test_acc for r in results if r.config.method.name == m] for m in (a, b)}
    if min(len(v) for v in acc.values()) < 2:
        return f"{a} vs {b}: need at least 2 seeds each to compare"
    diff = 100 * (sum(acc[a]) / len(acc[a]) - sum(acc[b]) / len(acc[b]))
    p = stats.ttest_ind(acc[a], acc[b], equal_var=False).pvalue
    n = min(len(v) for v in acc.values())
    if p != p or p >= 0.05:  # NaN when both have zero variance
        return (f"{a} - {b} test accuracy: {diff:+.2f} points over {n} seeds; Welch p={p:.2g}: "
                "not distinguishable from seed noise at this budget")
    better = a if diff > 0 else b
    return f"{a} - {b} test accuracy: {diff:+.2f} points over {n} seeds; Welch p={p:.2g}: {better} is better here"


SWEEP_EPOCHS = 10  # half the runs' budget: keeps `make demo` under 5 minutes on 2 cores, install included
DEMO_SPACE = {"method": "kd", "parameters": {
    "temperature": {"type": "float", "low": 1.0, "high": 20.0, "log": True},
    "kd_weight": {"type": "float", "low": 0.0, "high": 1.0},
}}


def run_demo(seeds: Sequence[int] = (0, 1, 2), configs: Sequence[str] = ("digits_ce", "digits_kd"),
             address: str | None = None, sweep_trials: int = 8,
             console: Console | None = None) -> tuple[list[RunResult], SweepResult | None]:
    console = console or wide_console()
    started = time.perf_counter()
    results = [run(name, [f"training.seed={seed}", f"name={name}-s{seed}"], address=address)
               for name in configs for seed in seeds]
    job_seconds = time.perf_counter() - started
    summary = summarize(results)
    table = Table(title=f"digits: student {results[0].config.student.architecture}, mean ± std over "
                        f"{len(seeds)} seeds (test = selected-on-val checkpoint, evaluated once)")
    for col in ("method", "runs", "failed", "val_acc", "test_acc", "s/run"):
        table.add_column(col, justify="left" if col == "method" else "right")
    first = results[0]
    if first.teacher_test_acc is not None:
        table.add_row(f"teacher ({first.config.teacher.architecture})", "-", "-",
                      f"{100 * first.teacher_val_acc:.2f}", f"{100 * first.teacher_test_acc:.2f}", "-")
    for method, row in summary.iterrows():
        table.add_row(str(method), str(int(row.runs)), str(int(row.failed)),
                      f"{100 * row.val_mean:.2f} ± {100 * row.val_std:.2f}",
                      f"{100 * row.test_mean:.2f} ± {100 * row.test_std:.2f}", f"{row.seconds:.1f}")
    console.print(table)
    console.print(verdict(results))
    console.print(f"MLflow: {first.ui_hint()}")
    found = None
    if sweep_trials > 0:
        console.rule(f"kd sweep: {sweep_trials} settings of temperature x kd_weight, {SWEEP_EPOCHS} epochs, "
                     "TPE + ASHA, 4 packed trials")
        found = sweep("digits_kd", DEMO_SPACE, trials=sweep_trials, sampler="tpe", concurrency=4,
                      overrides=["scaling.cpus_per_worker=0.5", f"training.epochs={SWEEP_EPOCHS}"],
                      name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", address=address)
        print_sweep(found, console=console)
    console.print(f"job time (without install): {time.perf_counter() - started:.1f} s "
                  f"(runs {job_seconds:.1f} s, sweep {time.perf_counter() - started - job_seconds:.1f} s)")
    return results, found
