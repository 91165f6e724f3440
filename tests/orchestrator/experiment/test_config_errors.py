"""Bad input: one line naming the field and the allowed values, exit code 2, nothing written."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path, PurePosixPath

import pytest
import torch
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.experiment.checkpoints import save_network
from orchestrator.experiment.config import load_config
from orchestrator.experiment.tracking import start_run
from tests.conftest import TEACHER_NET, digits_config

KD = {"name": "kd", "params": {"temperature": 4.0}}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kd_with_checkpoint(workdir: Path, checkpoint: str) -> Path:
    """A kd config beside (not inside) the working directory, so the directory starts empty."""
    return _write(workdir.parent / f"{workdir.name}.yaml", digits_config(method=KD, teacher={"checkpoint": checkpoint}))


def _run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _assert_refused(workdir: Path, args: list[str], *needles: str) -> None:
    before = set(workdir.iterdir())
    code, output = _run_cli(args)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert set(workdir.iterdir()) == before, "a refused command must write nothing"


@pytest.mark.parametrize(
    ("sections", "overrides", "needles"),
    [
        ({"trainingg": {"epochs": 1}}, [], ["trainingg: unknown field", "allowed: name, data, student"]),
        ({}, ["training.lrr=0.1"], ["training.lrr: unknown field", "lr, momentum"]),
        ({}, ["method.name=kdd"], ["method.name", "unknown method 'kdd'", "allowed: ce, dafl, ", ", kd, lsh, "]),
        ({}, ["data.name=imagenet9"], ["data.name", "unknown dataset", "cifar10", "digits"]),
        ({}, ["student.architecture=resnet9000"], ["student.architecture", "unknown architecture", "resnet20"]),
        ({}, ["training.lr=-1"], ["training.lr", "greater than 0", "-1"]),
        ({}, ["training.optimizer=rmsprop"], ["training.optimizer", "'sgd' or 'adam'"]),
        ({}, ["data.val_fraction=0.9"], ["data.val_fraction", "less than 0.5"]),
        ({}, ["data.val_fraction=-0.1"], ["data.val_fraction", "greater than or equal to 0"]),
        ({}, ["data.val_fraction=0"], ["data.val_fraction: 0 leaves no validation split, so training.selection "
                                       "must be 'last' (got 'best'); allowed: val_fraction > 0, or selection last"]),
        ({"method": KD, "teacher": {"architecture": "cnn"}}, ["data.val_fraction=0", "training.selection=last"],
         ["data.val_fraction: 0 leaves no validation split, so teacher.training.selection must be 'last'"]),
        ({"method": KD, "teacher": {"architecture": "cnn"}}, ["teacher.data.augmnt=false"],
         ["teacher.data.augmnt: unknown field; allowed: augment"]),
        ({"method": KD, "teacher": {"architecture": "cnn"}}, ["teacher.data.augment=maybe"],
         ["teacher.data.augment: Input should be a valid boolean"]),
        ({"method": KD, "teacher": {"architecture": "cnn", "args": {}}},
         ["method.params.temperature=0"], ["method.params.temperature", "greater than 0"]),
        ({"method": KD, "teacher": {"architecture": "cnn"}},
         ["method.params.temprature=3"], ["method.params.temprature: unknown field", "temperature, kd_weight"]),
        ({"method": KD}, [], ["teacher: required by method 'kd'"]),
        ({"method": KD, "teacher": {"architecture": "cnn", "checkpoint": "t.pt"}}, [],
         ["teacher: give exactly one of teacher.checkpoint"]),
        ({"student": {"architecture": "lenet5"}}, [], ["student", "data.image_size=32"]),
        ({"student": {"architecture": "cnn", "args": {"depth": 3}}}, [], ["student", "depth"]),
        ({}, ["training.lr"], ["--set", "key=value"]),
        ({}, ["training.seed=2147483648"], ["training.seed: Input should be less than or equal to 2147483647"]),
        # 3M channels: a 324 TB weight no allocator grants, whatever the machine's overcommit policy
        ({}, ["student.args.width=3000000"], ["student.args: cannot build 'cnn' with {'width': 3000000}: ",
                                               "allocate"]),
    ],
)
def test_bad_config_is_one_line_exit_2_nothing_written(workdir: Path, sections: dict, overrides: list[str],
                                                        needles: list[str]) -> None:
    cfg = _write(workdir.parent / f"{workdir.name}.yaml", digits_config(**sections))
    args = ["run", str(cfg)]
    for item in overrides:
        args += ["--set", item]
    _assert_refused(workdir, args, *needles)


def test_malformed_yaml(workdir: Path) -> None:
    bad = workdir.parent / f"{workdir.name}-bad.yaml"
    bad.write_text("data:\n  name: digits\n student: [unclosed\n")
    _assert_refused(workdir, ["run", str(bad)], "malformed YAML at line")


def test_unknown_config_name(workdir: Path) -> None:
    _assert_refused(workdir, ["run", "no_such_config"], "neither a file nor a shipped config", "digits_kd")


def test_missing_teacher_checkpoint(workdir: Path) -> None:
    cfg = _kd_with_checkpoint(workdir, "/nonexistent/teacher.pt")
    _assert_refused(workdir, ["run", str(cfg)], "teacher.checkpoint: file not found")


def test_corrupt_teacher_checkpoint(workdir: Path) -> None:
    corrupt = workdir.parent / f"{workdir.name}-corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    cfg = _kd_with_checkpoint(workdir, str(corrupt))
    _assert_refused(workdir, ["run", str(cfg)], "teacher.checkpoint: not a readable kdo checkpoint")


def test_a_pickle_weights_only_loading_refuses_is_one_line_and_no_warning(workdir: Path) -> None:
    unsafe = workdir.parent / f"{workdir.name}-unsafe.pt"
    with unsafe.open("wb") as f:  # protocol 4: torch warns it is not its own, then refuses its FRAME opcode
        pickle.dump({"architecture": "cnn", "state_dict": PurePosixPath("x")}, f, protocol=4)
    cfg = _kd_with_checkpoint(workdir, str(unsafe))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        _assert_refused(workdir, ["run", str(cfg)], f"teacher.checkpoint: not a readable kdo checkpoint ({unsafe}): "
                        "loading it with weights_only=True failed: Unsupported operand 149")
    assert [str(w.message) for w in shown] == []


def test_foreign_teacher_checkpoint(workdir: Path) -> None:
    foreign = workdir.parent / f"{workdir.name}-foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    cfg = _kd_with_checkpoint(workdir, str(foreign))
    _assert_refused(workdir, ["run", str(cfg)], "is not a kdo checkpoint")


def test_class_count_mismatch(workdir: Path) -> None:
    from methods.networks import build_network

    path = workdir.parent / f"{workdir.name}-5cls.pt"
    model = build_network("cnn", num_classes=5, in_channels=1, image_size=8, **TEACHER_NET["args"])
    save_network(path, model, architecture="cnn", args=TEACHER_NET["args"], num_classes=5, in_channels=1,
                 image_size=8)
    cfg = _kd_with_checkpoint(workdir, str(path))
    _assert_refused(workdir, ["run", str(cfg)], "num_classes=5", "num_classes=10")


def test_mismatched_weights(workdir: Path) -> None:
    from methods.networks import build_network

    path = workdir.parent / f"{workdir.name}-wide.pt"
    model = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=16)
    save_network(path, model, architecture="cnn", args={"width": 8}, num_classes=10, in_channels=1, image_size=8)
    cfg = _kd_with_checkpoint(workdir, str(path))
    # The header fits the data, the tensors do not: still one line, before any cluster work.
    _assert_refused(workdir, ["run", str(cfg)], "weights do not match architecture 'cnn'")


def test_a_registered_teacher_that_is_not_there_is_one_line(workdir: Path) -> None:
    start_run(f"sqlite:///{workdir / 'mlflow.db'}", "kdo", "other", tags={})  # the store exists, the model not
    cfg = _kd_with_checkpoint(workdir, "models:/kdo-teacher-0123/1")
    _assert_refused(workdir, ["run", str(cfg)], "teacher.checkpoint: no model version models:/kdo-teacher-0123/1 in")


def test_mlflow_teacher_uri_without_store(workdir: Path) -> None:
    cfg = _kd_with_checkpoint(workdir, "runs:/0123abcd/teacher")
    _assert_refused(workdir, ["run", str(cfg)], "names an MLflow run but the store", "does not exist")


def test_missing_torchvision_dataset(workdir: Path) -> None:
    _assert_refused(workdir, ["run", "digits_ce", "--set", "data.name=mnist", "--set",
                              f"data.data_dir={workdir.parent / 'no-data'}"],
                    "data.name: dataset 'mnist' not found", "data.download=true")


def test_a_tracking_server_that_does_not_answer_is_refused_before_ray_starts(workdir: Path) -> None:
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    _assert_refused(workdir, ["run", "digits_ce", "--set", f"tracking.uri=http://me:secret@127.0.0.1:{port}"],
                    f"tracking.uri: no MLflow server answers at http://me:***@127.0.0.1:{port}")
    code, output = _run_cli(["sweep", "digits_ce", "--set", f"tracking.uri=http://127.0.0.1:{port}"])
    assert code == 2 and "secret" not in output and "no MLflow server answers" in output, output
    for command in ("report", "resume"):  # asked once, not retried for minutes before a traceback
        _assert_refused(workdir, [command, "x", "--tracking-uri", f"http://127.0.0.1:{port}"],
                        f"--tracking-uri: no MLflow server answers at http://127.0.0.1:{port}")


def test_load_config_api_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^training.epochs: Input should be greater than or equal to 1"):
        load_config(digits_config(), ["training.epochs=0"])
