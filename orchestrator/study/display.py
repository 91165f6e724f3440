"""Terminal tables for runs, sweeps and studies (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.formatting import mean_std
from orchestrator.search.display import wide_console
from orchestrator.study import verdicts
from orchestrator.study.published import published_display

if TYPE_CHECKING:
    from orchestrator.study.results import StudyResults


CROSS_NOTE = ("* the best of the settings tried: optimistic (the winner's curse). x-fit: chosen on all seeds but one, "
              "scored on the one left out, averaged over seeds (n/a with one seed); 'tuned test' never chose.")
DEFAULTS_NOTE = ("'default': the method at its own defaults, a point of its own, not one of the design's settings "
                 "(so 'tuned', the best of the design's settings, can lie below it).")


def print_study(study: StudyResults, report: Path | None = None, console: Console | None = None) -> None:
    """Per method: defaults and tuned accuracy (mean ± std over seeds), the spread over settings,
    failures; then each comparison's verdict, the report path and the MLflow link."""
    summary = study.summary()
    spec = study.spec
    over = f"over {spec.n_settings} settings" if spec.has_design else "at each entry's defaults"
    table = Table(title=f"study {escape(study.name)}: val accuracy (points) {over} × {len(spec.seeds)} seeds; "
                        "failed runs at chance")

    def pm(row: Any, mean: str, std: str) -> str:
        return mean_std(row[mean], row[std]) if mean in row else ""

    def num(row: Any, key: str) -> str:
        return f"{row[key]:.2f}" if key in row and row[key] == row[key] else ""

    def share(row: Any) -> str:
        """The hyperparameter share with its 95% CI: what its reading rests on."""
        point = num(row, "hparam_share")
        return f"{point} [{num(row, 'hparam_share_low')}, {num(row, 'hparam_share_high')}]" if point else ""

    columns = ["method", "default val", "default test", "tuned val*", "tuned val x-fit", "tuned test", "median",
               "IQR", "worst", f"within {spec.delta:g}*", "hparam share", "failed"]
    rows = [[escape(str(method)), pm(row, "default_val", "default_val_std"),
             pm(row, "default_test", "default_test_std"), pm(row, "tuned_val", "tuned_val_std"),
             num(row, "tuned_val_cross") or ("n/a" if num(row, "tuned_val") else ""),
             pm(row, "tuned_test", "tuned_test_std"), num(row, "median"), num(row, "iqr"), num(row, "worst"),
             num(row, "within_delta"), share(row), f"{int(row['failed_runs'])}/{int(row['runs'])}"]
            for method, row in summary.iterrows()]
    shown = [i for i in range(len(columns)) if any(r[i] for r in rows)]  # defaults only: no spread columns
    for i in shown:
        table.add_column(columns[i], justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(r[i] for i in shown))
    console = console or wide_console()
    console.print(table)
    if spec.has_design:
        console.print(escape(CROSS_NOTE + (" " + DEFAULTS_NOTE if spec.include_defaults else "")))
    for warning in study.warnings():
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    protocols = study.protocols()
    if not protocols.empty and protocols["peak"].notna().any():
        lines = [f"{escape(str(m))} {r['selected']:.2f} / {r['last_epoch']:.2f} / {r['peak']:.2f} (+{r['gap']:.2f})"
                 for m, r in protocols.iterrows() if r["peak"] == r["peak"]]
        console.print("test accuracy of the chosen setting, selected on val / last epoch (RepDistiller) / best test "
                      "epoch (mdistiller, LS; gap): " + "; ".join(lines))
    if study.spec.published:
        for label, r in published_display(study).iterrows():
            console.print(f"published {escape(str(label))}: {r['published']} ({escape(r['protocol'])}; "
                          f"{escape(r['source'])}); kdo, same protocol: {r['kdo, same protocol']} "
                          f"({r['difference']}), selected on val: {r['kdo, selected on val']}")
    teacher = study.teacher()
    if teacher:
        console.print(f"teacher: val {teacher['val']:.2f}, test {teacher['test']:.2f}")
    for c in study.comparisons():
        median, iqr = c["median_diff_ci"], c["iqr_diff_ci"]
        console.print(f"{escape(c['a'])} more robust than {escape(c['b'])}: [bold]{c['verdict']}[/bold]; "
                      f"{escape(c['b'])} more robust than {escape(c['a'])}: [bold]{c['reverse_verdict']}[/bold] "
                      f"(median diff {c['median_diff']:.2f} [{median[0]:.2f}, {median[1]:.2f}], "
                      f"IQR diff {c['iqr_diff']:.2f} [{iqr[0]:.2f}, {iqr[1]:.2f}], "
                      f"P(a beats b) {c['p_a_beats_b']:.2f}; delta {c['delta']:g})")
        if c["deciding_budget"]:
            console.print(f"  deciding it would take about {verdicts.budget_text(c['deciding_budget'])}")
    if report is not None:
        console.print(f"report: {escape(str(report))}")
    console.print(f"MLflow: {escape(study.ui_hint())}")

