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


def child_label(tags: dict[str, str]) -> str:
    """What a child is, in words: its entry (or method), the values its setting varies (or its role), its seed, e.g.
    `kd temperature=4.1 kd_weight=0.5 seed 1`. Its MLflow run name (a study's children read apart in the UI's
    narrow name column) and its progress line; `cfg.name` stays the run's id-like name (checkpoint folders, models)."""
    label = tags.get("kdo.entry") or tags.get("kdo.method", "?")
    setting = json.loads(tags.get("kdo.setting") or "{}")
    knobs = " ".join(f"{k.removeprefix('method.params.')}={v:.3g}" if isinstance(v, float)
                     else f"{k.removeprefix('method.params.')}={v}" for k, v in setting.items())
    if not setting and tags.get("kdo.role") in ("defaults", "reference"):
        knobs = tags["kdo.role"]
    return f"{label}{' ' + knobs if knobs else ''} seed {tags.get('kdo.seed', '?')}"
