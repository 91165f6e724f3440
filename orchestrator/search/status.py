"""The status words of the ledger, defined once: what a child's `kdo.status` may say, which MLflow status it
ends with, which outcomes are final and which count as failures (used by the ledger, tables and analysis)."""

from __future__ import annotations

# kdo.status of a child -> the MLflow status it ends with.
MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "stopped": "KILLED", "early_stopped": "KILLED",
                 "error": "FAILED", "running": "KILLED", "orphaned": "KILLED"}
DONE = ("finished", "diverged", "early_stopped")  # terminal outcomes of a (setting, seed): never rerun
FAILED = ("diverged", "error", "failed")  # count as failures in every table and statistic
HIDDEN = ("orphaned",)  # interrupted attempts, redone by `resume`: not part of any result
