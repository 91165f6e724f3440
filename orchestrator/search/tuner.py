"""The Tune driver of sweeps and studies: fixed points (a design's or a study's) minus those the ledger holds
as final, or an Optuna search; trial resources and concurrency budgeted against the cluster; ASHA for adaptive
sweeps; trial checkpoints kept by Tune (the newest per trial); Ctrl-C and SIGTERM turned into `Interrupted`.

Each entry returns the ids of the trials that ended without an error (what the finisher needs to tell a run
the scheduler stopped from one whose process died)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.errors import ConfigError, Interrupted, reason
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.runner import Prepared
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import optuna_storage
from orchestrator.search import ledger
from orchestrator.search.grouped import plan_groups
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import Point, TrialOptions
from orchestrator.search.spaces import SearchSpace, max_epochs
from orchestrator.search.trial import AdaptiveSearch, run_group, run_setting

TRIAL_DRIVER_CPU = 0.25  # a data-parallel trial only waits on its TorchTrainer (Tune needs a CPU share > 0)


@contextmanager
def interruptible(on_signal: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM end the Tune run early and then raise `Interrupted` in the driver.

    The handler only notes the signal, calls `on_signal` (the driver tags its parent, so stopped trials know
    they were interrupted, not stopped by a scheduler) and asks Tune to stop through SIGUSR1, Tune's own stop
    signal: raising inside Ray's C calls would surface as a SystemError. Tune's SIGINT handling, which ends
    the run as if it had finished and prints a `Tuner.restore` hint, is switched off.
    """
    import logging
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:
            return
        received.append(signum)
        on_signal()
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise Interrupted(signum)  # Tune is not running yet: stop here
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tune_logger = logging.getLogger("ray.tune.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.ERROR)  # its "Resume experiment with: Tuner.restore(...)" is not ours
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception:
        if received:  # the signal reached Ray's own processes too (a process group's SIGTERM) and Tune broke off
            raise Interrupted(received[0]) from None
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        tune_logger.setLevel(level)
    if received:
        raise Interrupted(received[0])


def run_points(ref: LedgerRef, prepared: Prepared, points: list[Point], options: TrialOptions, *,
               use_gpu: bool, verbose: bool = False) -> frozenset[str]:
    """The points the ledger does not hold as done, one trial per group of them (`grouped.plan_groups`); no
    scheduler (every point runs in full).
    `verbose`: Tune's own status output, beside the plain progress lines (`_fit`)."""
    from ray import tune

    done = ledger.final_points(mlflow_client(ref.tracking_uri), ref.experiment_id, ref.parent_run_id)
    todo = [p for p in points if (p.setting_id, p.seed) not in done]
    if not todo:
        return frozenset()
    slots = trial_resources(prepared.config, use_gpu, options.concurrency)
    groups = plan_groups(todo, prepared.splits, options.group_size, slots[1])
    trainable = tune.with_parameters(run_group, splits=prepared.splits, teacher=prepared.teacher, ref=ref,
                                     use_gpu=use_gpu, points=todo, groups=groups, options=options)
    return _fit(ref, prepared.config, trainable, {"group": tune.grid_search(list(range(len(groups))))}, options,
                slots=slots, search_alg=None, num_samples=1, scheduler=None,
                runs=(len(todo), [len(g) for g in groups]), verbose=verbose)


def run_search(ref: LedgerRef, prepared: Prepared, space: SearchSpace, options: TrialOptions,
               previous: list[dict[str, Any]], *, use_gpu: bool, verbose: bool = False) -> frozenset[str]:
    """An Optuna search (TPE or random) inside Tune, ASHA on the seed mean, its study kept in `optuna_storage`
    under the sweep's name (`optuna-dashboard` opens it live). On resume (`previous`: the settings the ledger has
    seen) the same study continues: `sync_study` makes it agree with the ledger first, and the settings with seeds
    still to run are enqueued (their finished seeds replay from the ledger)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    cfg = prepared.config
    # On resume the sampler restarts: a fresh seed keeps it from drawing the settings it drew before.
    seed = options.design_seed + 7919 * len(previous)
    sampler = (optuna.samplers.TPESampler(seed=seed) if options.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    tune_space = _tune_space(space)
    storage = optuna_storage(cfg.tracking.uri or "", cfg.tracking.storage_path)
    replays = sync_study(storage, ref, OptunaSearch.convert_search_space(tune_space), previous, options.seeds)
    search = AdaptiveSearch(space, cfg, list(options.seeds))
    trainable = tune.with_parameters(run_setting, splits=prepared.splits, teacher=prepared.teacher, ref=ref,
                                     use_gpu=use_gpu, search=search, options=options)
    epochs = max_epochs(space, cfg)
    # The first epochs of a short run are noisy: no setting is judged before a quarter of its budget.
    asha = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=max(1, epochs // 4), reduction_factor=2)
            if options.scheduler == "asha" else None)
    samples = max(options.trials - (len(previous) - len(replays)), len(replays))
    return _fit(ref, cfg, trainable, tune_space, options, slots=trial_resources(cfg, use_gpu, options.concurrency),
                search_alg=OptunaSearch(sampler=sampler, points_to_evaluate=replays or None, study_name=ref.name,
                                        storage=optuna.storages.RDBStorage(storage)),
                num_samples=samples, scheduler=asha, runs=(samples * len(options.seeds), len(options.seeds)),
                verbose=verbose)


def sync_study(storage: str, ref: LedgerRef, distributions: dict[str, Any], previous: list[dict[str, Any]],
               seeds: list[int]) -> list[dict[str, Any]]:
    """Make the sweep's Optuna study agree with the MLflow ledger, the only record of what is done: a new sweep
    starts a fresh study; on resume, trials left RUNNING or WAITING end FAIL, and each setting whose seeds are
    all final in MLflow is a finished trial (added with `add_trial` when missing: COMPLETE at its seed-mean
    val_acc, PRUNED if ASHA stopped it, FAIL if a seed diverged). Returns the other settings (Tune keys), to be
    enqueued."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not previous and ref.name in optuna.get_all_study_names(storage):
        optuna.delete_study(study_name=ref.name, storage=storage)  # a stale study of that name (a removed store)
    study = optuna.create_study(study_name=ref.name, storage=storage, direction="maximize", load_if_exists=True)
    # Settings the study had already closed; a trial still open (its driver died) is not one, even if MLflow
    # finished its runs before Tune told Optuna.
    known = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL,
                                                                         TrialState.PRUNED))]
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    client, replays = mlflow_client(ref.tracking_uri), []
    for setting in previous:
        params = {AdaptiveSearch.tune_key(k): v for k, v in setting.items()}
        final = ledger.final_seeds(client, ref.experiment_id, ref.parent_run_id, ledger.setting_id(setting))
        if set(seeds) - set(final):
            replays.append(params)
        elif params not in known:
            statuses = {ledger.status_of(r) for r in final.values()}
            state = (TrialState.COMPLETE if statuses == {"finished"} else
                     TrialState.PRUNED if "early_stopped" in statuses else TrialState.FAIL)
            values = [r.data.metrics["selected_val_acc"] for r in final.values() if state == TrialState.COMPLETE]
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: distributions[k] for k in params}, state=state,
                value=sum(values) / len(values) if values else None))
    return replays


def _fit(ref: LedgerRef, cfg: ExperimentConfig, trainable: Any, param_space: dict[str, Any], options: TrialOptions,
         *, slots: tuple[dict[str, float], int], search_alg: Any, num_samples: int, scheduler: Any,
         runs: tuple[int, int | list[int]], verbose: bool) -> frozenset[str]:
    """Run the trials with Tune; `runs` = (runs expected, runs per trial or per group) for the progress view: a
    live panel on a terminal, else one line per run that ends; `verbose` adds Tune's own status tables and result
    boxes (and then the view prints lines, which interleave with them)."""
    from ray import tune

    from orchestrator.search.progress import RunProgress

    resources, concurrency = slots  # `trial_resources`
    progress = RunProgress(ref, *runs, live=not verbose)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources), param_space=param_space,
        tune_config=tune.TuneConfig(metric=options.metric, mode="max", search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=concurrency,
                                    scheduler=scheduler, reuse_actors=True),  # no re-import per trial
        run_config=tune.RunConfig(name=ref.name, storage_path=cfg.tracking.storage_path, verbose=int(verbose),
                                  failure_config=tune.FailureConfig(max_failures=options.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=[progress]),
    )
    with progress.shown(), _tune_console(verbose):
        grid = tuner.fit()
    return frozenset(str(r.metrics.get("trial_id")) for r in grid if r.error is None and r.metrics)


# Tune's console at verbose=0: its current reporter still prints its experiment box and result paths (the older
# one prints nothing), and it warns about the state snapshots `CheckpointConfig(num_to_keep=1)` forces by design.
QUIET_TUNE = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextmanager
def _tune_console(verbose: bool) -> Iterator[None]:
    """Tune's console output as asked: `QUIET_TUNE` while `fit` runs unless `verbose` (variables the user set
    are left as they are), and each failed trial in one line (`_OneLine`) instead of its whole traceback."""
    quiet = {} if verbose else {k: v for k, v in QUIET_TUNE.items() if k not in os.environ}
    os.environ.update(quiet)
    controller, one_line = logging.getLogger("ray.tune.execution.tune_controller"), _OneLine()
    if not verbose:
        controller.addFilter(one_line)
    try:
        yield
    finally:
        controller.removeFilter(one_line)
        for key in quiet:
            os.environ.pop(key, None)


class _OneLine(logging.Filter):
    """`Trial task failed for trial X: <the error's one line>` (`errors.reason`): what failed and why, without the
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = f"{record.getMessage()}: {reason(record.exc_info[1])}", ()
            record.exc_info = record.exc_text = None
        return True


def trial_resources(cfg: ExperimentConfig, use_gpu: bool, concurrency: int) -> tuple[dict[str, float], int]:
    """What Tune reserves per trial, and how many trials fit at once.

    A one-worker trial trains in its own process. A data-parallel trial starts a TorchTrainer whose
    workers Tune does not count, so concurrency is capped so trial + workers fit the cluster's CPUs.
    """
    import ray

    sc = cfg.scaling
    gpu = sc.gpus_per_worker if use_gpu else 0.0
    if sc.num_workers == 1:
        _warn_oversubscribed(sc.cpus_per_worker, concurrency)
        return {"cpu": sc.cpus_per_worker, "gpu": gpu}, concurrency
    per_trial = TRIAL_DRIVER_CPU + sc.num_workers * sc.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0.0)
    fits = int(cpus // per_trial)
    if fits < 1:
        raise ConfigError(f"scaling: one data-parallel trial needs {per_trial:g} CPUs ({sc.num_workers} workers x "
                          f"{sc.cpus_per_worker:g} + {TRIAL_DRIVER_CPU:g}); the cluster has {cpus:g}")
    return {"cpu": TRIAL_DRIVER_CPU, "gpu": 0.0}, min(concurrency, fits)


@functools.cache  # once per process: a sweep asks before its parent exists and again when it trains
def _warn_oversubscribed(cpus_per_trial: float, concurrency: int) -> None:
    """One line when packed trials run more torch threads than a node has cores: a trial trains on
    max(1, int(cpus_per_worker)) threads, so trials of 0.5 CPU each run two threads per core (8 trials on 2 cores
    measured 0.30x the trials/hour of one at a time). Tune grants the packing; the line says what it costs."""
    import ray

    threads = max(1, int(cpus_per_trial))
    for node in (n["Resources"] for n in ray.nodes() if n.get("Alive")):
        cores = node.get("CPU", 0.0)
        packed = min(concurrency, int(cores // cpus_per_trial)) if cpus_per_trial > 0 else concurrency
        if cores and packed * threads > cores:
            print(f"warning: up to {packed} trials at once on a node of {cores:g} CPUs, {threads} torch thread(s) "
                  f"each: oversubscribed, each runs slower; scaling.cpus_per_worker={threads} (or --concurrency "
                  f"{max(1, int(cores // threads))}) runs as many threads as cores", file=sys.stderr)
            return


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


def stop_trials() -> None:
    """Stop every trial of an interrupted driver now: its Ray connection (and the trial processes it owns) ends."""
    import ray

    ray.shutdown()


def forget_experiment(storage_path: str | None, name: str) -> None:
    """Remove Tune's state and checkpoints of a sweep or study once nothing is left to resume from them."""
    import shutil
    from pathlib import Path

    if storage_path and "://" not in storage_path:
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
