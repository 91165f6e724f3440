"""Many runs of one method: spaces, designs, the ledger (every MLflow query and write about a parent's
children), the trial function, the Tune driver, and `sweep()` / `resume()` -> `SweepResult`.

Imports `experiment/`, `methods/` and `orchestrator.errors`; never `study/` or the CLI.
"""
