"""One run: the config schema, data, the training loop, checkpoints, the teacher cache, MLflow tracking,
launching one run on Ray (a direct task or a TorchTrainer), and `run()` -> `RunResult`.

Imports `methods/` and `orchestrator.errors` only; never `search/`, `study/` or the CLI, and nothing of Tune.
"""
