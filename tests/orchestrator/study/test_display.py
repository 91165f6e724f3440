"""Console tables show user text as it is: names, settings and URIs never act as rich markup."""

from __future__ import annotations

import io

import pandas as pd
from rich.console import Console

from orchestrator.search.display import print_sweep
from orchestrator.search.sweep import SweepResult


def test_markup_in_a_name_or_a_setting_is_printed_not_rendered() -> None:
    frame = pd.DataFrame({"setting_id": ["s[/]1"], "training.optimizer": ["[bold]sgd[/]"], "seed": [0],
                          "status": ["finished"], "val_acc": [0.5], "test_acc": [0.4]})
    result = SweepResult("x[/]", "run", "0", "http://[::1]:5000", ["training.optimizer"], frame)
    out = io.StringIO()
    print_sweep(result, console=Console(file=out, width=200))
    text = out.getvalue()
    assert "sweep x[/]:" in text and "[bold]sgd[/]" in text and "s[/]1" in text
    assert "open http://[::1]:5000/#/experiments/0/runs" in text
