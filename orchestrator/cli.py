"""`kdo`: a thin command line over the Python API; user errors print one line and exit 2."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any

import typer

from orchestrator.errors import ConfigError, Interrupted, StoreUnreachable, check_name
from orchestrator.formatting import metric_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kd-orchestrator: knowledge-distillation experiments on Ray, tracked in MLflow.")
teacher_app = typer.Typer(no_args_is_help=True, help="Train and cache teachers.")
app.add_typer(teacher_app, name="teacher")
export_app = typer.Typer(no_args_is_help=True, help="Export a study to other tools.")
app.add_typer(export_app, name="export")

Overrides = Annotated[list[str] | None, typer.Option("--set", help="override a field: a.b=value (repeatable)")]
Address = Annotated[str | None, typer.Option(help="Ray cluster address ('auto' for `ray start`); default local")]
Verbose = Annotated[bool, typer.Option("--verbose", help="also Tune's status tables and the Ray workers' output")]
GROUP_HELP = "runs of one seed trained as one group on shared batches and teacher passes (0: auto, 1: alone)"
GroupSize = Annotated[int, typer.Option(help=GROUP_HELP)]
Plugins = Annotated[list[str] | None, typer.Option("--plugin", help="user code to import first: a module name, a .py "
                                                   "file or a package folder (repeatable)")]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors: one line, exit 2. Ctrl-C / SIGTERM of a sweep or study: the resume command, exit 130 / 143. A
    tracking store that stopped answering: one line with the command that finishes the work, exit 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as stop:
            typer.echo(f"interrupted ({stop}): running runs are closed as 'interrupted'; finish with: "
                       f"{stop.resume_hint or 'kdo resume NAME'}", err=True)
            raise typer.Exit(stop.exit_code) from None
        except StoreUnreachable as lost:
            then = (f"; once it answers, `{lost.resume_hint}` settles the runs left open and finishes the work"
                    if lost.resume_hint else "")
            typer.echo(f"error: {lost}{then}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command("run")
@user_errors
def run_cmd(config: Annotated[str, typer.Argument(help="YAML path or shipped config name")],
            set_: Overrides = None, address: Address = None, plugin: Plugins = None) -> None:
    """Run one distillation experiment and log it to MLflow."""
    from orchestrator.experiment.runner import run

    result = run(config, set_ or [], address=address, plugins=plugin or [])
    if result.status == "crashed":
        typer.echo(f"{result.name}: status=crashed ({result.reason}); MLflow run {result.run_id}", err=True)
        raise typer.Exit(1)
    val = (f"val_acc={metric_text('val_acc', result.val_acc)}" if result.config.data.val_fraction > 0
           else "no validation split")
    typer.echo(f"{result.name}: status={result.status} {val} "
               f"test_acc={metric_text('test_acc', result.test_acc)} (epoch {result.best_epoch}) in "
               f"{result.seconds:.1f} s")
    typer.echo(f"MLflow run {result.run_id}: {result.ui_hint()}")
    if result.status != "finished":
        raise typer.Exit(1)


@teacher_app.command("train")
@user_errors
def teacher_train(config: Annotated[str, typer.Argument(help="experiment config that describes its teacher")],
                  set_: Overrides = None, address: Address = None, plugin: Plugins = None,
                  force: Annotated[bool, typer.Option(help="retrain even if cached")] = False) -> None:
    """Train the teacher a config describes, cache it and log it to MLflow (artifact `teacher`)."""
    from orchestrator.experiment.config import load_config, resolve_paths, teacher_key
    from orchestrator.experiment.data import load_splits
    from orchestrator.experiment.launch import init_ray
    from orchestrator.experiment.teachers import ensure_teacher, registered_teacher

    cfg = resolve_paths(load_config(config, set_ or [], plugin or []))
    if cfg.teacher is None or cfg.teacher.architecture is None:
        raise ConfigError("teacher.architecture: this config gives no teacher description to train")
    splits = load_splits(cfg.data)
    init_ray(address, plugins=cfg.plugins)
    ckpt, path = ensure_teacher(cfg, splits, force=force)
    metrics = ckpt.get("metrics", {})
    val = f"val_acc={metric_text('val_acc', metrics['val_acc'])}" if "val_acc" in metrics else "no validation split"
    test = metric_text("test_acc", metrics.get("test_acc", float("nan")))
    typer.echo(f"teacher {ckpt['architecture']}: {val} test_acc={test}")
    typer.echo(f"checkpoint: {path}   (use it as teacher.checkpoint)")
    registered = registered_teacher(cfg.tracking.uri or "", teacher_key(cfg))
    if registered:
        typer.echo(f"registered: {registered}   (as teacher.checkpoint too, wherever the store is reachable)")


@app.command("demo")
@user_errors
def demo_cmd(seeds: Annotated[str, typer.Option(help="comma-separated seeds per setting")] = "0,1",
             settings: Annotated[int, typer.Option(help="Sobol settings per method (a power of 2)")] = 8,
             address: Address = None, verbose: Verbose = False) -> None:
    """The main job on the embedded digits data: a small robustness study of KD next to CE and the teacher."""
    from orchestrator.demo import run_demo

    run_demo(_seed_list(seeds), settings, address=address, verbose=verbose)


@app.command("sweep")
@user_errors
def sweep_cmd(config: Annotated[str, typer.Argument(help="YAML path or shipped config name")],
              space: Annotated[str | None, typer.Option(help="space: method name or YAML path")] = None,
              trials: Annotated[int, typer.Option(help="settings to try (Sobol: a power of 2)")] = 8,
              sampler: Annotated[str, typer.Option(help="tpe | random | sobol | grid")] = "tpe",
              scheduler: Annotated[str | None, typer.Option(help="asha | none (default: asha if adaptive)")] = None,
              concurrency: Annotated[int, typer.Option(help="trials running at once")] = 2,
              seeds: Annotated[str, typer.Option(help="comma-separated seeds per setting")] = "0",
              name: Annotated[str | None, typer.Option(help="sweep name (default: config-method-time)")] = None,
              max_failures: Annotated[int, typer.Option(help="retries of a crashed trial, from its checkpoint")] = 0,
              checkpoint_seconds: Annotated[float, typer.Option(help="seconds between trial checkpoints")] = 30.0,
              group_size: GroupSize = 0, set_: Overrides = None, address: Address = None,
              verbose: Verbose = False, plugin: Plugins = None) -> None:
    """Search a method's hyperparameters with Ray Tune + Optuna; every run an MLflow child of the sweep."""
    if name is not None:
        check_name(name, "--name")  # before importing Ray: a typo fails at once (`sweep` checks it too)
    from orchestrator.search.sweep import sweep

    result = sweep(config, space, trials=trials, sampler=sampler, scheduler=scheduler,  # type: ignore[arg-type]
                   concurrency=concurrency, seeds=_seed_list(seeds), name=name, address=address,
                   max_failures=max_failures, overrides=set_ or [], checkpoint_seconds=checkpoint_seconds,
                   group_size=group_size, verbose=verbose, plugins=plugin or [])
    from orchestrator.search.display import print_sweep

    print_sweep(result)


@app.command("study")
@user_errors
def study_cmd(study: Annotated[str, typer.Argument(help="STUDY.yaml path or shipped study name")],
              set_: Overrides = None, address: Address = None,
              name: Annotated[str | None, typer.Option(help="study name (default: the file's)")] = None,
              report: Annotated[str | None, typer.Option(help="report path (default ./<name>-report)")] = None,
              group_size: Annotated[int | None, typer.Option(help=GROUP_HELP + " (default: the study's)")] = None,
              settings: Annotated[int | None, typer.Option(help="settings per method (default: the study's)")] = None,
              seeds: Annotated[str | None, typer.Option(help="comma-separated seeds (default: the study's)")] = None,
              verbose: Verbose = False, plugin: Plugins = None) -> None:
    """A robustness study: each method's space covered evenly × seeds, analysed, plotted and reported."""
    from orchestrator.study.display import print_study
    from orchestrator.study.robustness import RobustnessStudy

    if name is not None:
        check_name(name, "--name")
    spec = RobustnessStudy.from_yaml(study, set_ or [], plugins=plugin or [])  # all validated before Ray starts
    changes = {k: v for k, v in (("name", name), ("group_size", group_size), ("n_settings", settings),
                                 ("seeds", _seed_list(seeds) if seeds is not None else None)) if v is not None}
    spec = (spec.replace(**changes) if changes else spec).claim_name()
    typer.echo(f"study {spec.name}: {len(spec.points)} runs ({', '.join(spec.methods)})")
    done = spec.run(address=address, verbose=verbose)
    print_study(done.outcome(), done.report(report or f"{done.name}-report"))
    _export_optuna(done.outcome())


def _export_optuna(results: Any) -> None:
    from orchestrator.study.optuna_export import export_line

    line = export_line(results)
    if line:
        typer.echo(line)


def _is_study(name: str, tracking_uri: str | None, experiment: str) -> bool:
    """Whether NAME is a study (else a sweep); neither is one line that says so for both."""
    from orchestrator.search.ledger import find_parent

    for kind in ("study", "sweep"):
        try:
            find_parent(kind, name, tracking_uri, experiment, say=False)
            return kind == "study"
        except ConfigError as err:
            if not str(err).startswith(f"NAME: no {kind} named"):
                raise  # the store or the experiment is missing: its own line
    raise ConfigError(f"NAME: no sweep or study named '{name}' in experiment '{experiment}' of that store")


@app.command("report")
@user_errors
def report_cmd(name: Annotated[str, typer.Argument(help="sweep or study name")],
               tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default ./mlflow.db)")] = None,
               experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "kdo",
               report: Annotated[str | None, typer.Option(help="study report path (default ./<name>-report)")] = None,
               plugin: Plugins = None) -> None:
    """Rebuild a sweep's results table, or a study's analysis and report, from MLflow alone."""
    check_name(name, "NAME")  # before importing Ray and MLflow (`ledger.find_parent` checks them too)
    check_name(experiment, "--experiment")
    from orchestrator.experiment.config_files import import_plugins
    from orchestrator.search.display import print_sweep
    from orchestrator.search.sweep import load_sweep
    from orchestrator.study.display import print_study
    from orchestrator.study.robustness import RobustnessStudy

    import_plugins(plugin or [])  # a sweep's table needs none; a study loads its recorded ones
    if _is_study(name, tracking_uri, experiment):
        study = RobustnessStudy.load(name, tracking_uri=tracking_uri, experiment=experiment, plugins=plugin or [])
        print_study(study.outcome(), study.report(report or f"{name}-report"))
    else:
        print_sweep(load_sweep(name, tracking_uri, experiment))


@export_app.command("optuna")
@user_errors
def export_optuna_cmd(name: Annotated[str, typer.Argument(help="study name")],
                      tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default ./mlflow.db)")]
                      = None, experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "kdo") -> None:
    """A study's seed-mean table as one Optuna study per method (beside the MLflow store), for
    optuna-dashboard's importance, slice and contour plots."""
    check_name(name, "NAME")
    check_name(experiment, "--experiment")
    from orchestrator.study.robustness import RobustnessStudy

    _export_optuna(RobustnessStudy.load(name, tracking_uri=tracking_uri, experiment=experiment).outcome())


@app.command("resume")
@user_errors
def resume_cmd(name: Annotated[str, typer.Argument(help="sweep or study name")],
               tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default ./mlflow.db)")] = None,
               experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "kdo",
               address: Address = None, verbose: Verbose = False, plugin: Plugins = None,
               force: Annotated[bool, typer.Option(help="resume even if its driver seems alive")] = False) -> None:
    """Finish a sweep or study whose driver died: skip what is done, close and redo what was running."""
    check_name(name, "NAME")  # before importing Ray and MLflow (`ledger.find_parent` checks them too)
    check_name(experiment, "--experiment")
    from orchestrator.search.display import print_sweep
    from orchestrator.search.sweep import resume
    from orchestrator.study.display import print_study
    from orchestrator.study.robustness import RobustnessStudy

    if _is_study(name, tracking_uri, experiment):
        study = RobustnessStudy.resume(name, address=address, tracking_uri=tracking_uri, experiment=experiment,
                                       force=force, verbose=verbose, plugins=plugin or [])
        print_study(study.outcome(), study.report(f"{name}-report"))
    else:
        print_sweep(resume(name, address=address, tracking_uri=tracking_uri, experiment=experiment, force=force,
                           verbose=verbose, plugins=plugin or []))


def _seed_list(seeds: str) -> list[int]:
    try:
        return [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got '{seeds}'") from None


@app.command("check-method")
@user_errors
def check_method_cmd(method: Annotated[str, typer.Argument(help="the method's registered name")],
                     plugin: Plugins = None, set_: Overrides = None,
                     epochs: Annotated[int, typer.Option(help="epochs of each tiny run (>= 2)")] = 3) -> None:
    """Check that a method behaves (schema, finite step, gradients, determinism, resume, grouping) on tiny
    synthetic data in seconds; exit 1 if a check fails."""
    if epochs < 2:
        raise ConfigError(f"--epochs: at least 2, so a run can be stopped and resumed (got {epochs})")
    from orchestrator.experiment.conformance import check_method

    checks = check_method(method, overrides=set_ or [], plugins=plugin or [], epochs=epochs)
    for c in checks:
        word = {True: "pass", False: "FAIL", None: "skip"}[c.passed]
        typer.echo(f"{word}  {c.name:<13} {c.seconds:5.2f} s  {c.detail}")
    if any(c.passed is False for c in checks):
        raise typer.Exit(1)


@app.command("configs")
def configs_cmd() -> None:
    """List the example configs shipped with the package (run them by name)."""
    from orchestrator.experiment.config_files import shipped_configs

    for name in shipped_configs():
        typer.echo(name)


if __name__ == "__main__":
    app()
