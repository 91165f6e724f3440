"""A study's outputs: its plots and report written to files, and everything logged on its parent run when it
finishes (results and summary tables, each entry's best student in the model registry, the report and plots),
so they open in the MLflow UI."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.experiment.tracking import Tracker
    from orchestrator.study.results import StudyResults


def draw(results: StudyResults, folder: str | Path | None = None) -> list[Path]:
    """Every plot as PNG into `folder` (a temporary one by default); returns the files."""
    from orchestrator.study.plots import draw_plots

    return draw_plots(results, Path(folder or tempfile.mkdtemp(prefix=f"kdo-{results.spec.name}-plots-")))


def report(results: StudyResults, path: str | Path | None = None) -> Path:
    """`<name>.md` and a self-contained `<name>.html` (tables and plots inline); returns the HTML."""
    from orchestrator.study.report import write_report

    return write_report(results, Path(path or f"{results.spec.name}-report"))


def log_outputs(parent: Tracker, results: StudyResults) -> None:
    """Results table, summary, each entry's best student (model registry), plots and report, on the parent run."""
    parent.log_text(results.results().to_csv(index=False), "results.csv")
    summary = results.summary()
    parent.log_text(summary.to_csv(), "summary.csv")
    parent.set_tags(results.register_best())
    for method, row in summary.iterrows():
        parent.log_metrics({f"{method}.{k}": v for k, v in row.items() if isinstance(v, float | int)}, step=0)
    with tempfile.TemporaryDirectory(prefix=f"kdo-{results.spec.name}-") as folder:  # the copies are in MLflow
        html = report(results, Path(folder) / "report")
        for file in sorted(html.parent.rglob("*")):
            if file.is_file():
                parent.log_artifact(file, "report" if file.suffix in (".md", ".html") else "plots")
