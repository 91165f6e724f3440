"""The one name rule (sweeps, studies, MLflow experiments) at every door a name comes in by: one line, exit 2,
nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError, check_name

RULE = "is not a valid name: letters, digits, '_', '.', '-' (up to 100, starting with a letter or digit, no '..')"


@pytest.mark.parametrize("name", ["kd-tpe", "a", "Sweep_1.v2", "0", "x" * 100])
def test_good_names_pass(name: str) -> None:
    assert check_name(name, "--name") == name


@pytest.mark.parametrize("name", ["x/y", "", "-x", ".hidden", "a..b", "x" * 101, "a b", "x[/]", "it's", "ü"])
def test_bad_names_are_one_line_naming_the_field(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_name(name, "--name")
    assert str(err.value) == f"--name: {name!r} {RULE}"


@pytest.mark.parametrize(("args", "field"), [
    (["sweep", "digits_kd", "--name", "x/y"], "--name: 'x/y'"),
    (["sweep", "digits_kd", "--set", "tracking.experiment=../up"], "tracking.experiment: '../up'"),
    (["run", "digits_kd", "--set", "tracking.experiment=a b"], "tracking.experiment: 'a b'"),
    (["study", "demo", "--name", "x[/]"], "--name: 'x[/]'"),
    (["report", "x/y"], "NAME: 'x/y'"),
    (["resume", "a..b"], "NAME: 'a..b'"),
    (["report", "fine", "--experiment", "e/x"], "--experiment: 'e/x'"),
    (["resume", "fine", "--experiment", ""], "--experiment: ''"),
])
def test_every_door_refuses_a_bad_name(workdir: Path, args: list[str], field: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [f"error: {field} {RULE}"]
    assert list(workdir.iterdir()) == [], "no MLflow store, no Ray storage, no cache"


def test_the_python_api_refuses_a_bad_name_before_any_work(workdir: Path) -> None:
    from orchestrator.search.sweep import sweep
    from orchestrator.study.robustness import RobustnessStudy

    with pytest.raises(ConfigError, match=r"^--name: 'a\.\.b' is not a valid name"):
        sweep("digits_kd", name="a..b")
    with pytest.raises(ConfigError, match=r"^study\.name: 'x/y' is not a valid name"):
        RobustnessStudy("x/y", "digits_kd", methods={"kd": None})
    assert list(workdir.iterdir()) == []


def test_report_and_resume_of_an_unknown_name_say_neither_a_sweep_nor_a_study_has_it(workdir: Path) -> None:
    from orchestrator.experiment.tracking import start_run

    start_run(f"sqlite:///{workdir / 'mlflow.db'}", "kdo", "other", tags={"kdo.kind": "sweep", "kdo.sweep": "other"})
    for command in ("report", "resume"):
        result = CliRunner().invoke(app, [command, "ghost"])
        assert result.exit_code == 2, result.output
        assert result.output.splitlines() == [
            "error: NAME: no sweep or study named 'ghost' in experiment 'kdo' of that store"], result.output


def test_an_errors_one_line_keeps_what_was_wrong() -> None:
    """A crashed run's reason: a pydantic error's field and message (not its documentation link), the exception a
    Ray task raised (not Ray's wrapper), the last line that is not a traceback frame."""
    import ray.exceptions
    from pydantic import BaseModel, ValidationError

    from orchestrator.errors import reason

    class M(BaseModel):
        lr: float

    try:
        M(lr="fast")
    except ValidationError as err:
        invalid = err
    assert reason(invalid) == ("ValidationError: lr: Input should be a valid number, unable to parse string as a "
                               "number (got 'fast')")
    wrapped = ray.exceptions.RayTaskError("run_group", "Traceback (most recent call last):\n  File \"x\"", invalid)
    assert reason(wrapped) == reason(invalid)
    assert reason(RuntimeError("setup failed\nTraceback (most recent call last):\n  File \"a.py\", line 1\n"
                               "ValueError: the real cause\nFor further information visit https://x")) == \
        "RuntimeError: ValueError: the real cause"
    assert reason(KeyError()) == "KeyError"


def test_one_value_reads_n_1_not_plus_minus_0_or_nan() -> None:
    from orchestrator.formatting import mean_std

    assert mean_std(93.456, 1.234) == "93.46 ± 1.23"
    assert mean_std(93.456, float("nan")) == mean_std(93.456, 0.0, n=1) == "93.46 (n=1)"
    assert mean_std(float("nan"), 1.0) == ""


def test_kdo_study_resizes_from_the_command_line_before_anything_runs(workdir: Path) -> None:
    bad = CliRunner().invoke(app, ["study", "demo", "--settings", "3"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1].startswith("error: study.n_settings:"), \
        bad.output
    seeds = CliRunner().invoke(app, ["study", "demo", "--seeds", "0,0"])
    assert seeds.exit_code == 2 and "study.seeds: distinct integers" in seeds.output, seeds.output
    from orchestrator.study.robustness import RobustnessStudy

    small = RobustnessStudy.from_yaml("demo").replace(n_settings=2, seeds=[0])  # the README's Python resize
    assert len(small.points) == 2 * (2 + 1) + 1  # kd and lsh: 2 settings and the defaults, one seed; ce once


_RESOURCES = """
from typer.testing import CliRunner
from orchestrator.cli import app
for override in ("scaling.use_gpu=true", "scaling.cpus_per_worker=64"):
    result = CliRunner().invoke(app, ["run", "digits_ce", "--set", override])
    print(result.exit_code, repr(result.output))
"""


@pytest.mark.timeout(180)
def test_what_the_cluster_can_never_grant_is_one_line_with_ray_really_started(workdir: Path) -> None:
    """No Ray notice beside the one line: the token-auth warning is off unless --verbose."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RESOURCES], capture_output=True, text=True, cwd=workdir,
                          timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "2 'error: scaling.use_gpu: true, but the Ray cluster has no GPU (use auto or false)\\n'",
        "2 'error: scaling.cpus_per_worker: 64, but no node has more than 2 CPUs\\n'"], done.stdout
    assert "WARNING" not in done.stderr and "Token authentication" not in done.stderr, done.stderr[-2000:]
