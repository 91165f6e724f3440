"""The status words of the ledger, defined once: what a child's `kdo.status` may say, the MLflow status it ends
with, which outcomes are final, which `kdo resume` redoes, and how each counts in tables and statistics.

| status          | MLflow   | final | `kdo resume`                           | in the statistics                     |
|-----------------|----------|-------|----------------------------------------|---------------------------------------|
| `finished`      | FINISHED | yes   | kept                                   | its accuracy                          |
| `diverged`      | FAILED   | yes   | kept                                   | a failure (at chance, or dropped)     |
| `invalid`       | FAILED   | yes   | kept                                   | a failure                             |
| `early_stopped` | KILLED   | yes   | kept (only a scheduler stops a run)    | not an outcome: left out              |
| `crashed`       | FAILED   | no    | redone (from its checkpoint if any)    | a failure until redone                |
| `interrupted`   | KILLED   | no    | redone (from its checkpoint if any)    | not an outcome: left out              |
| `superseded`    | KILLED   | yes   | replaced by a later attempt            | hidden                                |

Ledgers written before these words: `error` reads as `crashed`, `orphaned` as `superseded`, `stopped` as
`early_stopped` (`normalize`).
"""

from __future__ import annotations

import json

MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "invalid": "FAILED", "early_stopped": "KILLED",
                 "crashed": "FAILED", "interrupted": "KILLED", "superseded": "KILLED"}
FINAL = ("finished", "diverged", "invalid", "early_stopped")  # a (setting, seed) with one of these is never rerun
REDO = ("crashed", "interrupted")  # resume runs these again, continuing from their checkpoint when there is one
FAILED = ("diverged", "invalid", "crashed")  # count as failures in every table and statistic
NOT_OUTCOMES = ("early_stopped", "interrupted", "running")  # partial runs: never enter a statistic
HIDDEN = ("superseded",)  # attempts replaced by later ones: in no table
LEGACY = {"error": "crashed", "orphaned": "superseded", "stopped": "early_stopped", "failed": "crashed",
          "killed": "interrupted"}


def normalize(status: str) -> str:
    """Today's word for a status read from a ledger (older ledgers used other words)."""
    return LEGACY.get(status, status)


def child_label(tags: dict[str, str], *, compact: bool = False) -> str:
    """What a child is, in words: its entry (or method), the values its setting varies (or its role), its seed: its
    progress line's `kd temperature=4.1 kd_weight=0.5 seed 1`, or `compact`, its MLflow run name `kd s1 temp=4.1
    kw=0.5`: what tells a study's children apart comes first, to be read in the UI's narrow name column.
    `cfg.name` stays the run's id-like name (checkpoint folders, registered models: tag `kdo.run_name`)."""
    label, seed = tags.get("kdo.entry") or tags.get("kdo.method", "?"), tags.get("kdo.seed", "?")
    setting = json.loads(tags.get("kdo.setting") or "{}")
    name = _short if compact else (lambda path: path.removeprefix("method.params."))
    knobs = " ".join(f"{name(k)}={v:.3g}" if isinstance(v, float) else f"{name(k)}={v}" for k, v in setting.items())
    if not setting and tags.get("kdo.role") in ("defaults", "reference"):
        knobs = tags["kdo.role"]
    if compact:
        return f"{label} s{seed}{' ' + knobs if knobs else ''}"
    return f"{label}{' ' + knobs if knobs else ''} seed {seed}"


def _short(path: str) -> str:
    """A parameter's short name: its last part if short (alpha, lr), the initials of a snake_case name (kd_weight:
    kw), else its first four letters (temperature: temp)."""
    last = path.rsplit(".", 1)[-1]
    if len(last) <= 5:
        return last
    return "".join(w[0] for w in last.split("_") if w) if "_" in last else last[:4]
