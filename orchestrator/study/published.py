"""Published numbers beside kdo's: a study file's `published:` block names, per row (an entry's label, a reference
method or `teacher`), the test accuracy a paper or codebase reports, its source and the protocol it was measured
under; the report and the console set kdo's own number under that same protocol beside it (and kdo's, selected on
validation), so a reader compares like with like."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from orchestrator.formatting import mean_std

if TYPE_CHECKING:
    from orchestrator.study.results import StudyResults

# Which of kdo's protocol columns (`StudyResults.protocols`) measures what a published protocol (`spec.Published`)
# measured.
COLUMN = {"best test epoch": "peak", "last epoch": "last_epoch"}


def published_table(study: StudyResults) -> pd.DataFrame:
    """Per published row: the published accuracy, kdo's under the same protocol and kdo's selected on validation
    (mean and std over seeds, points), the difference (kdo's same-protocol minus the published), protocol, source."""
    protocols, teacher, rows = study.protocols(), study.teacher(), []
    for label, ref in study.spec.published.items():
        row = {"row": label, "published": ref.accuracy, "protocol": ref.protocol, "source": ref.source}
        if label == "teacher":  # one trained teacher: its selected epoch's test accuracy, whatever the protocol
            row.update(kdo=teacher.get("test", float("nan")), kdo_std=float("nan"),
                       selected=teacher.get("test", float("nan")), selected_std=float("nan"))
        elif label in protocols.index:
            mine, column = protocols.loc[label], COLUMN[ref.protocol]
            row.update(kdo=mine[column], kdo_std=mine[f"{column}_std"], selected=mine["selected"],
                       selected_std=mine["selected_std"])
        else:  # no finished run yet
            row.update(kdo=float("nan"), kdo_std=float("nan"), selected=float("nan"), selected_std=float("nan"))
        row["difference"] = row["kdo"] - ref.accuracy
        rows.append(row)
    return pd.DataFrame(rows).set_index("row") if rows else pd.DataFrame()


def published_display(study: StudyResults) -> pd.DataFrame:
    """`published_table` as a person reads it (points, `n/a` where kdo has no finished run): the report's table and
    the console's lines."""
    table = published_table(study)
    if table.empty:
        return table

    def pm(mean: str) -> list[str]:
        return [mean_std(m, s) or "n/a" for m, s in zip(table[mean], table[f"{mean}_std"], strict=True)]

    return pd.DataFrame({"published": [f"{v:.2f}" for v in table["published"]], "protocol": table["protocol"],
                         "kdo, same protocol": pm("kdo"), "kdo, selected on val": pm("selected"),
                         "difference": [f"{d:+.2f}" if d == d else "n/a" for d in table["difference"]],
                         "source": table["source"]}, index=table.index)
