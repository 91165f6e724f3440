"""Plots (matplotlib PNG) and the Markdown + self-contained HTML report of a robustness study."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.study import analysis  # noqa: E402

if TYPE_CHECKING:
    from orchestrator.study.results import StudyResults

NOT_MEANINGFUL = "not meaningful"

RULE = ("Verdict rule: \"A is more robust than B\" holds when the 95% bootstrap CI of (median A - median B) lies "
        "above -delta and the CI of (IQR A - IQR B) lies below 0; it does not hold when either CI lies wholly on "
        "the wrong side; otherwise it is inconclusive. Medians and IQRs are over the design's settings, each "
        "setting scored by its seed-mean validation accuracy.")


BUDGET_RULE = ("'To decide it': for an inconclusive verdict, the settings per method (at the study's seeds, and at "
               "twice them) at which the CIs would clear their bounds (both, where both estimates say 'holds'; else "
               "the one on the wrong side) if the measured differences are the true ones: "
               "each CI's width shrinks as the square root of var(setting mean) / settings, where var(setting mean) "
               "= hyperparameter variance + seed variance / seeds, from the variance split of the two methods. An "
               "estimate to size the next study, not a promise: the differences themselves will move.")


def draw_plots(study: StudyResults, folder: Path) -> list[Path]:
    """Every plot of the study as a PNG in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    means = study.setting_means()
    studied = [m for m in study.methods if m in study.spec.methods]
    design = means[~means["defaults"] & means["method"].isin(studied)]
    files = [_distribution(study, means, studied, folder / "distribution.png")]
    if design.empty:  # a defaults-only study (n_settings 0): nothing varies but the seeds
        return files
    files += [_ecdf(design, studied, folder / "ecdf.png"),
             _expected_best(study, folder / "expected_best.png")]
    importance = study.sensitivity()
    files.append(_importance(importance, folder / "importance.png"))
    for method in studied:
        params = study.parameters()[method]
        files.append(_parameter_effects(study, means, method, params, folder / f"params_{method}.png"))
        numeric = [p for p in params if pd.api.types.is_numeric_dtype(design[p])]
        if len(numeric) >= 2:
            ranked = _ranked(importance, method, numeric)
            files.append(_heatmap(study, design[design["method"] == method], method, ranked[0], ranked[1],
                                  folder / f"heatmap_{method}.png"))
    return [f for f in files if f is not None]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(path: str) -> str:
    return path.removeprefix("method.params.")


def _distribution(study: StudyResults, means: pd.DataFrame, studied: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5.5, 1.8 + 1.4 * len(studied)), 4.2))
    data = [means[(means["method"] == m) & ~means["defaults"]]["score"].dropna().to_numpy() for m in studied]
    ax.boxplot(data, tick_labels=studied, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.6, color="tab:blue")
        default = means[(means["method"] == studied[i - 1]) & means["defaults"]]["score"]
        if not default.empty:
            ax.scatter([i], [default.iloc[0]], marker="D", s=60, color="tab:red", zorder=3,
                       label="defaults" if i == 1 else None)
    for ref in (m for m in study.methods if m not in studied):
        row = means[means["method"] == ref]
        if not row.empty:
            ax.axhline(row["score"].iloc[0], ls="--", color="gray", lw=1, label=f"{ref} (defaults)")
    teacher = study.teacher()
    if teacher:
        ax.axhline(teacher["val"], ls=":", color="black", lw=1, label="teacher")
    ax.set_ylabel("val accuracy (points), seed mean per setting")
    ax.set_title(f"{study.name}: accuracy over each method's settings")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def _ecdf(design: pd.DataFrame, studied: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in studied:
        values = np.sort(design[design["method"] == method]["score"].dropna().to_numpy())
        if len(values):
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=method)
    ax.set_xlabel("val accuracy (points), seed mean per setting")
    ax.set_ylabel("share of settings at or below")
    ax.set_title("Empirical CDF of settings")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _expected_best(study: StudyResults, path: Path) -> Path:
    curve = study.expected_best()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, group in curve.groupby("method", sort=False):
        ax.plot(group["budget"], group["expected_best"], marker="o", ms=3, label=method)
        ax.fill_between(group["budget"], group["expected_best"] - group["std"],
                        group["expected_best"] + group["std"], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("settings tried at random (n)")
    ax.set_ylabel("expected best val accuracy (points)")
    ax.set_title("Expected best vs budget (Dodge et al.)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def importance_figure(table: pd.DataFrame) -> Any:
    """The importance bars of `StudyResults.sensitivity()`, one panel per method; a method whose importances are
    not meaningful (hparam share below the threshold) gets grey, hatched bars and says so in its title."""
    from orchestrator.study.results import IMPORTANCE_MIN_SHARE

    columns = [c for c in ("fanova", "ped_anova") if c in table.columns]
    if table.empty or not columns:
        return None
    methods = list(dict.fromkeys(table.index.get_level_values(0)))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.6), squeeze=False)
    coloured_legend = False
    for ax, method in zip(axes[0], methods, strict=True):
        rows = table.loc[method]
        sub = rows[columns].fillna(0.0)
        sub.index = [_short(p) for p in sub.index]
        meaningful = bool(rows["meaningful"].iloc[0]) if "meaningful" in rows else True
        if meaningful:
            sub.plot.barh(ax=ax, legend=not coloured_legend)
            coloured_legend = True
            ax.set_title(method)
        else:  # its own legend: the grey bars do not match the other panels' colours
            sub.plot.barh(ax=ax, legend=True, color=["0.6", "0.8"][:len(columns)], hatch="//")
            ax.set_title(f"{method}: {NOT_MEANINGFUL}\n(hparam share {rows['hparam_share'].iloc[0]:.2f} < "
                         f"{IMPORTANCE_MIN_SHARE:g})", color="tab:red", fontsize=9)
        ax.set_xlabel("importance")
    fig.suptitle("Hyperparameter importance (Optuna fANOVA, PED-ANOVA); "
                 f"{NOT_MEANINGFUL} where hparam share < {IMPORTANCE_MIN_SHARE:g}", fontsize=10)
    return fig


def _importance(table: pd.DataFrame, path: Path) -> Path | None:
    fig = importance_figure(table)
    return None if fig is None else _save(fig, path)


def _parameter_effects(study: StudyResults, means: pd.DataFrame, method: str, params: list[str],
                       path: Path) -> Path:
    rows = means[(means["method"] == method) & ~means["defaults"]]
    default = means[(means["method"] == method) & means["defaults"]]
    space = study.spaces[method]
    fig, axes = plt.subplots(1, len(params), figsize=(3.4 * len(params), 3.2), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        x = rows[param]
        if not pd.api.types.is_numeric_dtype(x):
            labels = sorted(x.astype(str).unique())
            x = x.astype(str).map({v: i for i, v in enumerate(labels)})
            ax.set_xticks(range(len(labels)), labels)
        ax.errorbar(x, rows["score"], yerr=rows["seed_std"].fillna(0.0), fmt="o", ms=4, capsize=2, alpha=0.8)
        if not default.empty and pd.api.types.is_numeric_dtype(rows[param]):
            ax.axvline(float(default[param].iloc[0]), color="tab:red", ls="--", lw=1)
        if space.parameters[param].log:
            ax.set_xscale("log")
        ax.set_xlabel(_short(param))
    axes[0][0].set_ylabel("val accuracy (points)")
    fig.suptitle(f"{method}: accuracy vs each hyperparameter (error bars: std over seeds; red: default)")
    return _save(fig, path)


def _ranked(importance: pd.DataFrame, method: str, numeric: list[str]) -> list[str]:
    if "fanova" in importance.columns and method in importance.index.get_level_values(0):
        scores = importance.loc[method, "fanova"].to_dict()
        return sorted(numeric, key=lambda p: -float(scores.get(p, 0.0) or 0.0))
    return numeric


def _heatmap(study: StudyResults, rows: pd.DataFrame, method: str, px: str, py: str, path: Path) -> Path:
    bins = max(2, min(4, int(math.sqrt(len(rows)))))
    frame = rows[[px, py, "score"]].copy()
    for p in (px, py):
        values = np.log10(frame[p]) if study.spaces[method].parameters[p].log else frame[p]
        frame[f"{p}_bin"] = pd.cut(values, bins=bins)
    grid = frame.pivot_table(index=f"{py}_bin", columns=f"{px}_bin", values="score", aggfunc="mean", observed=False)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    image = ax.imshow(grid.to_numpy(dtype=float), origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="mean val accuracy (points)")
    ax.set_xticks(range(len(grid.columns)), [_edge(c, study, method, px) for c in grid.columns], rotation=30)
    ax.set_yticks(range(len(grid.index)), [_edge(c, study, method, py) for c in grid.index])
    ax.set_xlabel(_short(px))
    ax.set_ylabel(_short(py))
    ax.set_title(f"{method}: the two most important parameters")
    return _save(fig, path)


def _edge(interval: Any, study: StudyResults, method: str, param: str) -> str:
    mid = float(interval.mid)
    return f"{10 ** mid:.3g}" if study.spaces[method].parameters[param].log else f"{mid:.3g}"


# -------------------------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    def pm(mean: str, std: str) -> pd.Series:
        if mean not in summary:
            return pd.Series("", index=summary.index)
        text = summary[mean].map(_fmt) + " ± " + summary[std].map(_fmt)
        return text.where(summary[mean].notna(), "")

    out = pd.DataFrame(index=summary.index)
    out["default val"] = pm("default_val", "default_val_std")
    out["default test"] = pm("default_test", "default_test_std")
    out["tuned val"] = pm("tuned_val", "tuned_val_std")
    out["tuned test"] = pm("tuned_test", "tuned_test_std")
    for col, name in (("best", "best"), ("median", "median"), ("mean", "mean"), ("std", "std"), ("iqr", "IQR"),
                      ("p10", "P10"), ("worst", "worst"), ("within_delta", "within δ"),
                      ("seed_std", "seed std"), ("hparam_share", "hparam share"), ("tunability", "tunability")):
        if col in summary:
            out[name] = summary[col].map(_fmt)
    out = out.loc[:, (out != "").any()]  # a defaults-only study has no tuned columns
    out["failed"] = summary["failed_runs"].astype(int).astype(str) + "/" + summary["runs"].astype(int).astype(str)
    return out


def _blocks(study: StudyResults, plots: list[Path]) -> list[tuple[str, Any]]:
    spec = study.spec
    val_size = study.val_set_size()
    teacher = study.teacher()
    blocks: list[tuple[str, Any]] = [("h1", f"Robustness study: {study.name}")]
    design = (f"Design: {spec.design}, {spec.n_settings} settings per method" if spec.has_design else
              "Design: none, each entry at its defaults (its own config where it names one)")
    blocks.append(("p", f"{design}, seeds {spec.seeds}, "
                        f"defaults {'included' if spec.include_defaults else 'not included'}, references "
                        f"{', '.join(spec.references) or 'none'}. Base: {study.base.data.name} data, student "
                        f"{study.base.student.architecture}, {study.base.training.epochs} epochs. "
                        f"{len(study.results())} runs (one MLflow child each). Selection on validation accuracy; "
                        "test accuracy is reported beside it, never used to choose."))
    blocks.append(("p", f"Accuracies in points. δ = {spec.delta:g} point(s); the validation set has {val_size} "
                        f"images, so one image is {100 / max(1, val_size):.2f} points. Chance level "
                        f"{study.chance:.1f}: failed (diverged or errored) runs count at chance in the first "
                        "table and are left out of the second; both tables count them in 'failed'."
                        + (f" Teacher: val {teacher['val']:.2f}, test {teacher['test']:.2f}." if teacher else "")))
    blocks.append(("h2", "Per method (failures at chance level)"))
    blocks.append(("table", _summary_table(study.summary("chance"))))
    blocks.append(("h2", "Per method (failures left out)"))
    blocks.append(("table", _summary_table(study.summary("drop"))))
    if not spec.has_design:
        blocks.append(("h2", "Plots"))
        blocks.extend(("img", p) for p in plots)
        return blocks
    blocks.append(("h2", "Comparisons"))
    blocks.append(("p", RULE))
    rows, comparisons = [], study.comparisons()
    for c in comparisons:
        rows.append({"A": c["a"], "B": c["b"], "P(A beats B)": _ci(c["p_a_beats_b"], c["p_a_beats_b_ci"]),
                     "median A - B": _ci(c["median_diff"], c["median_diff_ci"]),
                     "IQR A - B": _ci(c["iqr_diff"], c["iqr_diff_ci"]),
                     "A more robust than B": c["verdict"],
                     "to decide it": analysis.budget_text(c["deciding_budget"]) if c["deciding_budget"] else ""})
    if rows:
        blocks.append(("table", pd.DataFrame(rows).set_index("A")))
    if any(c["deciding_budget"] for c in comparisons):
        blocks.append(("p", BUDGET_RULE))
    blocks.extend(sensitivity_blocks(study))
    curve = study.expected_best()
    if not curve.empty:
        blocks.append(("h2", "Expected best validation accuracy after n random settings"))
        shown = curve[curve["budget"].isin([1, 2, 4, 8, 16, 32, 64, 128])]
        table = shown.assign(value=shown["expected_best"].map(_fmt) + " ± " + shown["std"].map(_fmt)).pivot(
            index="method", columns="budget", values="value")
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
                        f"{IMPORTANCE_MIN_SHARE:g}; the rest is seed noise), they rank noise: such a method's "
                        f"importances are marked '{NOT_MEANINGFUL}' in the table and on the importance plot."))
    sens = study.sensitivity()
    if sens.empty:
        return blocks
    meaningful = sens.pop("meaningful")
    shown = sens.rename(columns={"hparam_share": "hparam share"}).map(_fmt)
    shown["importances"] = np.where(meaningful.to_numpy(dtype=bool), "",
                                    f"{NOT_MEANINGFUL} (hparam share < {IMPORTANCE_MIN_SHARE:g})")
    blocks.append(("table", shown.rename(index=_short, level=1).reset_index().set_index("method")))
    return blocks


def _ci(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def write_report(study: StudyResults, path: Path) -> Path:
    """`path.md` (plots beside it) and `path.html` (plots inline); returns the HTML file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(study, path.parent / f"{path.name}_plots")
    blocks = _blocks(study, plots)
    md, page = [], []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            md.append(f"{'#' if kind == 'h1' else '##'} {content}\n")
            page.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            md.append(f"{content}\n")
            page.append(f"<p>{html.escape(content)}</p>")
        elif kind == "table":
            md.append(content.to_markdown() + "\n")
            page.append(content.to_html(border=0, classes="t"))
        else:
            md.append(f"![{content.stem}]({content.parent.name}/{content.name})\n")
            data = base64.b64encode(content.read_bytes()).decode()
            page.append(f'<figure><img alt="{content.stem}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(content.stem)}</figcaption></figure>")
    path.with_suffix(".md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "table.t td,table.t th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%}")
    out = path.with_suffix(".html")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>"
                   f"<style>{style}</style></head><body>{''.join(page)}</body></html>")
    return out
