"""The study's plots (matplotlib PNG), each with a one-sentence caption that says how to read it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:
    from orchestrator.study.results import StudyResults

NOT_MEANINGFUL = "not meaningful"
UNCERTAIN = "uncertain"

CAPTIONS = {  # how to read each plot, by the start of its file name
    "distribution": "Each box is one method's spread of seed-mean validation accuracy over its settings (box: the "
                    "middle half; dots: the settings; red diamond: its defaults; dashed: references; dotted: the "
                    "teacher): a short box high up is an accurate, robust method.",
    "ecdf": "The share of each method's settings at or below an accuracy: a curve further right is better, a steeper "
            "one is more robust (its settings agree).",
    "expected_best": "The best validation accuracy to expect after trying n of the settings at random (Dodge et al.; "
                     "the unbiased estimator of Tang et al.; band: 95% bootstrap CI over settings): where the curves "
                     "cross is the budget at which the ranking changes. It treats the settings as a random sample: "
                     "a Sobol design is more even than one.",
    "importance": "How much of each method's spread each hyperparameter explains (fANOVA and PED-ANOVA); grey, "
                  "hatched bars rank seed noise, not hyperparameters.",
    "params": "Accuracy against each hyperparameter, one point per setting (error bars: std over seeds; red line: "
              "the default): a flat cloud means the parameter hardly matters.",
    "heatmap": "Mean validation accuracy over the two most important parameters, binned: where the good region lies, "
               "and whether it is a narrow ridge or a plateau.",
}


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


def caption(path: Path) -> str:
    """The one-sentence reading guide of a plot file `draw_plots` wrote."""
    return next((text for key, text in CAPTIONS.items() if path.stem.startswith(key)), path.stem)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def short(path: str) -> str:
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
        ax.fill_between(group["budget"], group["ci_low"], group["ci_high"], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("settings tried at random (n)")
    ax.set_ylabel("expected best val accuracy (points)")
    ax.set_title("Expected best vs budget (band: 95% bootstrap CI)")
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
        sub.index = [short(p) for p in sub.index]
        meaningful = bool(rows["meaningful"].iloc[0]) if "meaningful" in rows else True
        if meaningful:
            sub.plot.barh(ax=ax, legend=not coloured_legend)
            coloured_legend = True
            ax.set_title(method)
        else:  # its own legend: the grey bars do not match the other panels' colours
            sub.plot.barh(ax=ax, legend=True, color=["0.6", "0.8"][:len(columns)], hatch="//")
            share, low, high = (rows[c].iloc[0] for c in ("hparam_share", "hparam_share_low", "hparam_share_high"))
            reading = (f"{NOT_MEANINGFUL}\n(hparam share {share:.2f} < {IMPORTANCE_MIN_SHARE:g})"
                       if rows["seed_noise"].iloc[0] else
                       f"{UNCERTAIN}\n(hparam share CI [{low:.2f}, {high:.2f}] spans {IMPORTANCE_MIN_SHARE:g})")
            ax.set_title(f"{method}: {reading}", color="tab:red", fontsize=9)
        ax.set_xlabel("importance")
    fig.suptitle("Hyperparameter importance (Optuna fANOVA, PED-ANOVA)\n"
                 f"{NOT_MEANINGFUL} where hparam share < {IMPORTANCE_MIN_SHARE:g} (its whole 95% CI)", fontsize=10)
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
        ax.set_xlabel(short(param))
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
    ax.set_xlabel(short(px))
    ax.set_ylabel(short(py))
    ax.set_title(f"{method}: the two most important parameters")
    return _save(fig, path)


def _edge(interval: Any, study: StudyResults, method: str, param: str) -> str:
    mid = float(interval.mid)
    return f"{10 ** mid:.3g}" if study.spaces[method].parameters[param].log else f"{mid:.3g}"


# -------------------------------------------------------------------------------------------- report
