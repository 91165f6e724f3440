"""The main job behind `make demo`: a small robustness study on the embedded digits data.

The shipped study `demo` (search_spaces/studies/demo.yaml): each method's space covered by 8 Sobol
settings x 2 seeds plus its defaults, CE and the teacher as reference rows, then the per-method table,
the robustness verdict and the MLflow link.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape

from orchestrator.search.display import wide_console
from orchestrator.study.display import print_study
from orchestrator.study.optuna_export import export_line
from orchestrator.study.robustness import RobustnessStudy


def run_demo(seeds: list[int] | None = None, settings: int | None = None, address: str | None = None,
             console: Console | None = None, verbose: bool = False) -> RobustnessStudy:
    """Run the demo study (`verbose`: with Tune's status output and the Ray workers' own) and print its outcome."""
    console = console or wide_console()
    started = time.perf_counter()
    study = RobustnessStudy.from_yaml("demo").replace(
        name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", **({"seeds": seeds} if seeds else {}),
        **({"n_settings": settings} if settings else {}))
    console.rule(f"robustness study {escape(study.name)}: {escape(', '.join(study.methods))} on digits, "
                 f"{len(study.points)} runs")
    study.run(address=address, verbose=verbose)
    report = study.report(f"{study.name}-report")
    print_study(study.outcome(), report, console=console)
    exported = export_line(study.outcome())  # like any `kdo study`: optuna-dashboard shows the demo too
    if exported:
        console.print(escape(exported))
    console.print(f"job time (without install): {time.perf_counter() - started:.1f} s")
    return study
