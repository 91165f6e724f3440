"""The Markdown and self-contained HTML report of a robustness study: the answer first (the question and the
verdicts), then the design and budget, the per-method tables, the details and the captioned plots."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from orchestrator.experiment.store import mask_uri, run_link
from orchestrator.formatting import mean_std
from orchestrator.study import verdicts
from orchestrator.study.display import DEFAULTS_NOTE
from orchestrator.study.plots import NOT_MEANINGFUL, UNCERTAIN, caption, draw_plots, short
from orchestrator.study.published import published_display

if TYPE_CHECKING:
    from orchestrator.study.results import StudyResults

RULE = ("Verdict rule: \"A is more robust than B\" holds when the 95% bootstrap CI of (median A - median B) lies "
        "above -delta and the CI of (IQR A - IQR B) lies below 0; it does not hold when either CI lies wholly on "
        "the wrong side; otherwise it is inconclusive. Medians and IQRs are over the design's settings, each "
        "setting scored by its seed-mean validation accuracy.")


BUDGET_RULE = ("'To decide it': for an inconclusive verdict, the smallest power-of-two number of settings per method "
               "(at the study's seeds, and at twice them) at which a fresh study reaches the verdict the point "
               "estimates lean to with probability at least 0.8 (P: that probability), simulated: each method's "
               "settings are drawn from its own settings here, their spread shrunk to the hyperparameter variance "
               "of the variance split, plus seed noise, and judged by the same bootstrap rule. 'More than 1024': "
               "none up to 1024 settings does. An estimate to size the next study, not a promise: the differences "
               "themselves will move.")


PROTOCOL_RULE = ("Test accuracy of each method's chosen setting (tuned on validation, or its defaults), mean ± std "
                 "over seeds, as each codebase would report it. kdo selects the epoch on a validation split and tests "
                 "once. RepDistiller reports the last epoch's test accuracy. mdistiller (DKD) and the logit-"
                 "standardisation code report the best test accuracy over epochs: the test set chooses the epoch, "
                 "which inflates the number by the gap shown (none of these codebases has a validation split). "
                 "Only kdo's column is used to choose anything; n/a: runs logged before kdo recorded the others.")
CROSS_RULE = ("'best tried' is the best of the settings tried, optimistic by the winner's curse; 'cross-fit' chooses "
              "the setting on all seeds but one and scores it on the one left out, averaged over seeds (unbiased; n/a "
              "with one seed); 'tuned test', the chosen setting's test accuracy, never chose anything.")
EXPECTED_BEST_RULE = ("The best seed-mean validation accuracy to expect from n distinct settings drawn at random "
                      "from those tried (unbiased, Tang et al. 2020; n = all is the best setting), and in brackets "
                      "its 95% bootstrap CI over settings.")
SOBOL_NOTE = (" The settings are treated as a random sample; a Sobol design covers the space more evenly than "
              "one, so the curve reads the design's settings, not i.i.d. draws.")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _protocol_table(protocols: pd.DataFrame) -> pd.DataFrame:
    def pm(name: str) -> pd.Series:
        text = pd.Series([mean_std(m, s) for m, s in zip(protocols[name], protocols[f"{name}_std"], strict=True)],
                         index=protocols.index)
        return text.where(protocols[name].notna(), "n/a")

    return pd.DataFrame({"setting": protocols["setting"], "selected on val (kdo)": pm("selected"),
                         "last epoch (RepDistiller)": pm("last_epoch"),
                         "best test epoch (mdistiller, LS)": pm("peak"),
                         "gap (best test - selected)": protocols["gap"].map(_fmt).replace("", "n/a")})


def _summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    def pm(mean: str, std: str) -> pd.Series:
        if mean not in summary:
            return pd.Series("", index=summary.index)
        return pd.Series([mean_std(m, s) for m, s in zip(summary[mean], summary[std], strict=True)],
                         index=summary.index)

    out = pd.DataFrame(index=summary.index)
    out["default val"] = pm("default_val", "default_val_std")
    out["default test"] = pm("default_test", "default_test_std")
    out["tuned val (best tried)"] = pm("tuned_val", "tuned_val_std")
    if "tuned_val_cross" in summary:
        out["tuned val (cross-fit)"] = summary["tuned_val_cross"].map(_fmt).where(
            summary["tuned_val_cross"].notna() | summary["tuned_val"].isna(), "n/a")
    out["tuned test"] = pm("tuned_test", "tuned_test_std")
    for col, name in (("best", "best"), ("median", "median"), ("mean", "mean"), ("std", "std"), ("iqr", "IQR"),
                      ("p10", "P10"), ("worst", "worst"), ("within_delta", "within δ (best tried)"),
                      ("within_delta_cross", "within δ (cross-fit)"), ("seed_std", "seed std"),
                      ("hparam_share", "hparam share"), ("tunability", "tunability (cross-fit)")):
        if col in summary:
            out[name] = summary[col].map(_fmt)
    out = out.loc[:, (out != "").any()]  # a defaults-only study has no tuned columns
    out["failed"] = summary["failed_runs"].astype(int).astype(str) + "/" + summary["runs"].astype(int).astype(str)
    return out


def _verdict_line(c: dict[str, Any]) -> str:
    line = (f"{c['a']} more robust than {c['b']}: {c['verdict']}; {c['b']} more robust than {c['a']}: "
            f"{c['reverse_verdict']} (median A - B "
            f"{_ci(c['median_diff'], c['median_diff_ci'])}, IQR A - B {_ci(c['iqr_diff'], c['iqr_diff_ci'])}, "
            f"P(A beats B) {_ci(c['p_a_beats_b'], c['p_a_beats_b_ci'])})")
    if c["deciding_budget"]:
        line += f"; deciding it would take about {verdicts.budget_text(c['deciding_budget'])}"
    return line + "."


def _question(study: StudyResults) -> str:
    spec = study.spec
    if not spec.has_design:
        return (f"How accurate is each method at its defaults? {', '.join(study.methods)}, each over seeds "
                f"{spec.seeds}: mean ± std of the accuracy selected on validation, test reported once.")
    pairs = ", ".join(f"{c['a']} vs {c['b']}" for c in study.comparisons())
    return (f"Which method keeps its accuracy across its hyperparameters? {len(spec.methods)} method(s) over "
            f"{spec.n_settings if spec.design != 'grid' else 'a grid of'} settings each, seeds {spec.seeds}; "
            f"compared: {pairs or 'none'}.")


def _blocks(study: StudyResults, plots: list[Path]) -> list[tuple[str, Any]]:
    """The report, answers first: the question and the verdicts, the design and budget, the per-method table,
    then the details and the plots (each with its caption)."""
    spec = study.spec
    val_size = study.val_set_size()
    teacher = study.teacher()
    comparisons = study.comparisons()
    frame = study.results()
    blocks: list[tuple[str, Any]] = [("h1", f"Robustness study: {study.name}"), ("lead", _question(study))]
    blocks.extend(("verdict", _verdict_line(c)) for c in comparisons)
    design = (f"{spec.design} design, {spec.n_settings} settings per method" if spec.has_design else
              "no design: each entry at its defaults (its own config where it names one)")
    blocks.append(("p", f"Design and budget: {design}, seeds {spec.seeds}, defaults "
                        f"{'included' if spec.include_defaults else 'not included'}, references "
                        f"{', '.join(spec.references) or 'none'}; {len(frame)} runs (one MLflow child each), "
                        f"{int((frame['status'] == 'finished').sum())} finished. Base: {study.base.data.name} data, "
                        f"student {study.base.student.architecture}, {study.base.training.epochs} epochs. Selection "
                        "on validation accuracy; test accuracy is reported beside it, never used to choose."))
    served = study.tracking_uri.startswith(("http:", "https:", "databricks"))
    start = f" (start the UI with `mlflow ui --backend-store-uri {mask_uri(study.tracking_uri)} --port 5000`)"
    blocks.append(("link", ("The study's parent run in MLflow" + ("" if served else start),
                            run_link(study.tracking_uri, study.experiment_id, study.parent_run_id))))
    blocks.append(("h2", "Per method (failures at chance level)"))
    blocks.append(("table", _summary_table(study.summary("chance"))))
    blocks.append(("p", f"Accuracies in points, mean ± std over seeds. {DEFAULTS_NOTE} {CROSS_RULE} "
                        f"δ = {spec.delta:g} point(s); "
                        "the validation "
                        f"set has {val_size} images, so one image is {100 / max(1, val_size):.2f} points. Chance "
                        f"level {study.chance:.1f}: failed (diverged or errored) runs count at chance in this table "
                        "and are left out of the next; both count them in 'failed'."
                        + (f" Teacher: val {teacher['val']:.2f}, test {teacher['test']:.2f}." if teacher else "")))
    blocks.append(("h2", "Per method (failures left out)"))
    blocks.append(("table", _summary_table(study.summary("drop"))))
    protocols = study.protocols()
    if not protocols.empty:
        blocks.append(("h2", "The same runs under the protocols papers use"))
        blocks.append(("p", PROTOCOL_RULE))
        blocks.append(("table", _protocol_table(protocols)))
    if spec.published:
        blocks.append(("h2", "Beside the published numbers"))
        blocks.append(("table", published_display(study)))
    if spec.has_design:
        blocks.append(("h2", "Comparisons"))
        blocks.append(("p", RULE))
        rows = [{"A": c["a"], "B": c["b"], "P(A beats B)": _ci(c["p_a_beats_b"], c["p_a_beats_b_ci"]),
                 "median A - B": _ci(c["median_diff"], c["median_diff_ci"]),
                 "IQR A - B": _ci(c["iqr_diff"], c["iqr_diff_ci"]), "A more robust than B": c["verdict"],
                 "B more robust than A": c["reverse_verdict"],
                 "to decide it": verdicts.budget_text(c["deciding_budget"]) if c["deciding_budget"] else ""}
                for c in comparisons]
        if rows:
            blocks.append(("table", pd.DataFrame(rows).set_index("A")))
        if any(c["deciding_budget"] for c in comparisons):
            blocks.append(("p", BUDGET_RULE))
        blocks.extend(sensitivity_blocks(study))
        curve = study.expected_best()
        if not curve.empty:
            blocks.append(("h2", "Expected best validation accuracy after n random settings"))
            blocks.append(("p", EXPECTED_BEST_RULE + (SOBOL_NOTE if study.spec.design == "sobol" else "")))
            shown = curve[curve["budget"].isin([1, 2, 4, 8, 16, 32, 64, 128])]
            table = shown.assign(value=shown["expected_best"].map(_fmt) + " [" + shown["ci_low"].map(_fmt) + ", "
                                 + shown["ci_high"].map(_fmt) + "]").pivot(index="method", columns="budget",
                                                                          values="value")
            blocks.append(("table", table))
    blocks.append(("h2", "Plots"))
    blocks.extend(("img", p) for p in plots)
    return blocks


def sensitivity_blocks(study: StudyResults) -> list[tuple[str, Any]]:
    """The report's sensitivity section: heading, the not-meaningful rule, the table (importances marked)."""
    from orchestrator.study.results import IMPORTANCE_MIN_SHARE

    blocks: list[tuple[str, Any]] = [("h2", "Sensitivity (importance per parameter; tunability in points)")]
    blocks.append(("p", f"Importances (fANOVA, PED-ANOVA) rank a method's hyperparameters by how much of the spread "
                        f"of its accuracy over settings they explain. Where the hyperparameters explain less than "
                        f"{IMPORTANCE_MIN_SHARE:g} of the variance of its val accuracy (hparam share < "
                        f"{IMPORTANCE_MIN_SHARE:g}, its whole 95% bootstrap CI over settings; the rest is seed "
                        f"noise), they rank noise: such a method's importances are marked '{NOT_MEANINGFUL}' in the "
                        f"table and on the importance plot. Where the CI spans {IMPORTANCE_MIN_SHARE:g}, they are "
                        f"marked '{UNCERTAIN}': the study cannot tell. Tunability per parameter, in points: the "
                        "surrogate's best probe (a maximum: optimistic), and cross-fitted over seeds (one surrogate "
                        "chooses on all seeds but one, another scores on the one left out) with a bootstrap CI over "
                        "settings; n/a with one seed."))
    sens = study.sensitivity()
    if sens.empty:
        return blocks
    meaningful, noise = sens.pop("meaningful").to_numpy(dtype=bool), sens.pop("seed_noise").to_numpy(dtype=bool)
    low, high = sens.pop("hparam_share_low"), sens.pop("hparam_share_high")
    crossed = [sens.pop(c) if c in sens else None for c in ("tunability_cross", "tunability_low", "tunability_high")]
    shown = sens.rename(columns={"hparam_share": "hparam share",
                                 "tunability": "tunability (surrogate's best probe: optimistic)"}).map(_fmt)
    shown["hparam share"] += " [" + low.map(_fmt) + ", " + high.map(_fmt) + "]"
    if crossed[0] is not None:
        text = crossed[0].map(_fmt) + " [" + crossed[1].map(_fmt) + ", " + crossed[2].map(_fmt) + "]"
        shown["tunability (cross-fit) [95% CI]"] = text.where(crossed[0].notna(), "n/a")
    shown["importances"] = np.where(meaningful, "", np.where(
        noise, f"{NOT_MEANINGFUL} (hparam share < {IMPORTANCE_MIN_SHARE:g})",
        f"{UNCERTAIN} (hparam share CI spans {IMPORTANCE_MIN_SHARE:g})"))
    blocks.append(("table", shown.rename(index=short, level=1).reset_index().set_index("method")))
    return blocks


def _ci(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;max-width:1180px;
 margin:2em auto;padding:0 1.2em}
h1{font-size:1.6em;margin:.2em 0 .4em}h2{font-size:1.2em;margin:1.8em 0 .5em;border-bottom:1px solid #dde;
 padding-bottom:.2em}
p.lead{font-size:1.1em}
ul.verdicts{list-style:none;padding:0;margin:.8em 0}
ul.verdicts li{background:#f3f6fb;border-left:4px solid #4a6fa5;padding:.5em .8em;margin:.4em 0}
ul.verdicts li.holds{border-color:#2e7d32}ul.verdicts li.not{border-color:#c62828}
ul.verdicts li.open{border-color:#b8860b}
table.t{border-collapse:collapse;font-size:13px;margin:.6em 0 1em;font-variant-numeric:tabular-nums}
table.t th,table.t td{border-bottom:1px solid #e3e6ee;padding:4px 9px;text-align:right;white-space:nowrap}
table.t thead th{background:#eef1f7;border-bottom:2px solid #c9cfdc}
table.t tbody th,table.t td:first-child{text-align:left}
table.t tbody tr:nth-child(even){background:#fafbfd}
div.wide{overflow-x:auto}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #e3e6ee}
figcaption{font-size:.92em;color:#4a5366;margin-top:.3em}
a{color:#2f5aa8}
"""


def write_report(study: StudyResults, path: Path) -> Path:
    """`path.md` (plots beside it) and a self-contained `path.html` (plots inline, no external asset), in the
    same order: the question and the verdicts first; returns the HTML file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(study, path.parent / f"{path.name}_plots")
    md, page, verdicts = [], [], []
    for kind, content in [*_blocks(study, plots), ("end", None)]:
        if kind != "verdict" and verdicts:
            page.append(f"<ul class='verdicts'>{''.join(verdicts)}</ul>")
            md.append("")  # the list ends
            verdicts = []
        if kind in ("h1", "h2"):
            md.append(f"{'#' if kind == 'h1' else '##'} {content}\n")
            page.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind in ("p", "lead"):
            md.append(f"{content}\n")
            page.append(f"<p class='{kind}'>{html.escape(content)}</p>")
        elif kind == "verdict":
            md.append(f"- **{content}**")
            tone = {"holds": "holds", "does not hold": "not"}.get(content.split(": ", 1)[1].split(" (")[0], "open")
            verdicts.append(f"<li class='{tone}'>{html.escape(content)}</li>")
        elif kind == "link":
            label, url = content
            md.append(f"{label}: <{url}>\n")
            page.append(f"<p>{html.escape(label)}: <a href='{html.escape(url)}'>{html.escape(url)}</a></p>")
        elif kind == "table":
            md.append(content.to_markdown(colalign=["left", *["right"] * len(content.columns)],
                                          disable_numparse=True) + "\n")
            page.append(f"<div class='wide'>{content.to_html(border=0, classes='t', index_names=False)}</div>")
        elif kind == "img":
            md.append(f"![{content.stem}]({content.parent.name}/{content.name})\n\n*{caption(content)}*\n")
            data = base64.b64encode(content.read_bytes()).decode()
            page.append(f'<figure><img alt="{content.stem}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption(content))}</figcaption></figure>")
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    out = path.with_suffix(".html")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>"
                   f"<style>{STYLE}</style></head><body>{''.join(page)}</body></html>")
    return out
