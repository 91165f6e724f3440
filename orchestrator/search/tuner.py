"""The Tune driver of sweeps and studies: fixed points (a design's or a study's) minus those the ledger holds,
or an Optuna search; trial resources and concurrency budgeted against the cluster; ASHA for adaptive sweeps."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.runner import Prepared
from orchestrator.search import ledger
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.spaces import SearchSpace
from orchestrator.search.trial import AdaptiveSearch, Point, TrialOptions, run_point, run_setting

TRIAL_DRIVER_CPU = 0.25  # a data-parallel trial only waits on its TorchTrainer (Tune needs a CPU share > 0)


def run_points(ref: LedgerRef, prepared: Prepared, points: list[Point], options: TrialOptions, *,
               use_gpu: bool) -> None:
    """One trial per point the ledger does not hold as done; no scheduler (every point runs in full)."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    done = ledger.done_points(MlflowClient(ref.tracking_uri), ref.experiment_id, ref.parent_run_id)
    todo = [p for p in points if (p.setting_id, p.seed) not in done]
    if not todo:
        return
    trainable = tune.with_parameters(run_point, splits=prepared.splits, teacher=prepared.teacher, ref=ref,
                                     use_gpu=use_gpu, points=todo)
    _fit(ref, prepared.config, trainable, {"point": tune.grid_search(list(range(len(todo))))}, options,
         use_gpu=use_gpu, search_alg=None, num_samples=1, scheduler=None)


def run_search(ref: LedgerRef, prepared: Prepared, space: SearchSpace, options: TrialOptions,
               previous: list[dict[str, Any]], *, use_gpu: bool) -> None:
    """An Optuna search (TPE or random) inside Tune, ASHA on the seed mean; `previous` settings (resume) are
    enqueued first: their finished seeds replay from the ledger."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    cfg = prepared.config
    # On resume the sampler restarts: a fresh seed keeps it from drawing the settings it drew before.
    seed = options.design_seed + 7919 * len(previous)
    sampler = (optuna.samplers.TPESampler(seed=seed) if options.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    replays = [{AdaptiveSearch.tune_key(k): v for k, v in s.items()} for s in previous]
    search = AdaptiveSearch(space, cfg.model_dump(mode="json"), list(options.seeds))
    trainable = tune.with_parameters(run_setting, splits=prepared.splits, teacher=prepared.teacher, ref=ref,
                                     use_gpu=use_gpu, search=search)
    epochs_spec = space.parameters.get("training.epochs")
    epochs = int(epochs_spec.high or 1) if epochs_spec is not None else cfg.training.epochs
    # The first epochs of a short run are noisy: no setting is judged before a quarter of its budget.
    asha = (ASHAScheduler(max_t=epochs, grace_period=max(1, epochs // 4), reduction_factor=2)
            if options.scheduler == "asha" else None)
    _fit(ref, cfg, trainable, _tune_space(space), options, use_gpu=use_gpu,
         search_alg=OptunaSearch(sampler=sampler, points_to_evaluate=replays or None),
         num_samples=max(options.trials, len(replays)), scheduler=asha)


def _fit(ref: LedgerRef, cfg: ExperimentConfig, trainable: Any, param_space: dict[str, Any], options: TrialOptions,
         *, use_gpu: bool, search_alg: Any, num_samples: int, scheduler: Any) -> None:
    from ray import tune

    resources, concurrency = trial_resources(cfg, use_gpu, options.concurrency)
    tune.Tuner(
        tune.with_resources(trainable, resources), param_space=param_space,
        tune_config=tune.TuneConfig(metric=options.metric, mode="max", search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=concurrency,
                                    scheduler=scheduler, reuse_actors=True),  # no re-import per trial
        run_config=tune.RunConfig(name=ref.name, storage_path=cfg.tracking.storage_path, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=options.max_failures)),
    ).fit()


def trial_resources(cfg: ExperimentConfig, use_gpu: bool, concurrency: int) -> tuple[dict[str, float], int]:
    """What Tune reserves per trial, and how many trials fit at once.

    A one-worker trial trains in its own process. A data-parallel trial starts a TorchTrainer whose
    workers Tune does not count, so concurrency is capped so trial + workers fit the cluster's CPUs.
    """
    import ray

    sc = cfg.scaling
    gpu = sc.gpus_per_worker if use_gpu else 0.0
    if sc.num_workers == 1:
        return {"cpu": sc.cpus_per_worker, "gpu": gpu}, concurrency
    per_trial = TRIAL_DRIVER_CPU + sc.num_workers * sc.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0.0)
    fits = int(cpus // per_trial)
    if fits < 1:
        raise ConfigError(f"scaling: one data-parallel trial needs {per_trial:g} CPUs ({sc.num_workers} workers x "
                          f"{sc.cpus_per_worker:g} + {TRIAL_DRIVER_CPU:g}); the cluster has {cpus:g}")
    return {"cpu": TRIAL_DRIVER_CPU, "gpu": 0.0}, min(concurrency, fits)


def _tune_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    out = {}
    for path, spec in space.parameters.items():
        key = AdaptiveSearch.tune_key(path)
        if spec.type == "choice":
            out[key] = tune.choice(spec.values)
        elif spec.type == "int":
            out[key] = (tune.lograndint if spec.log else tune.randint)(int(spec.low), int(spec.high) + 1)
        else:
            out[key] = (tune.loguniform if spec.log else tune.uniform)(spec.low, spec.high)
    return out
