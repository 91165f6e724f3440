"""The study report on a hand-built results table: importances are marked not meaningful where the
hyperparameters explain (almost) none of the variance."""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.experiment.config import load_config
from orchestrator.search.spaces import ParamSpec, SearchSpace
from orchestrator.study.plots import importance_figure
from orchestrator.study.report import sensitivity_blocks
from orchestrator.study.results import IMPORTANCE_MIN_SHARE, StudyResults
from orchestrator.study.spec import StudySpec
from tests.conftest import digits_config

T, W, B = "method.params.temperature", "method.params.kd_weight", "method.params.feature_weight"


def _study() -> StudyResults:
    """kd: its 8 settings differ only by seed noise (hparam share 0); lsh: accuracy follows feature_weight."""
    rng = np.random.default_rng(0)
    rows = []
    for sid in range(8):
        temperature, kd_weight, beta = 1 + sid, rng.uniform(0, 1), 0.5 + sid
        kd_jitter = 0.0005 * rng.standard_normal()  # setting means spread far less than seed noise predicts
        for seed in range(3):
            rows.append({"method": "kd", "setting_id": f"kd{sid}", "seed": seed, "status": "finished",
                         "val_acc": 0.80 + 0.01 * (seed - 1) + kd_jitter, "test_acc": 0.80, "defaults": False,
                         "role": "design",
                         T: float(temperature), W: float(kd_weight), B: np.nan})
            rows.append({"method": "lsh", "setting_id": f"lsh{sid}", "seed": seed, "status": "finished",
                         "val_acc": 0.60 + 0.04 * sid + 0.002 * (seed - 1), "test_acc": 0.7, "defaults": False,
                         "role": "design", T: np.nan, W: np.nan, B: float(beta)})
    spec = StudySpec(name="hand", config="digits_kd", methods={"kd": None, "lsh": None}, references=[],
                     seeds=[0, 1, 2], n_settings=8)
    spaces = {"kd": SearchSpace(parameters={"temperature": ParamSpec(type="float", low=1, high=10),
                                            "kd_weight": ParamSpec(type="float", low=0, high=1)}),
              "lsh": SearchSpace(parameters={"feature_weight": ParamSpec(type="float", low=0.5, high=8)})}
    return StudyResults(spec, load_config(digits_config()), spaces, pd.DataFrame(rows))


def test_importances_are_marked_not_meaningful_below_the_hparam_share_threshold() -> None:
    study = _study()
    sens = study.sensitivity()
    assert IMPORTANCE_MIN_SHARE == 0.1
    assert sens.loc["kd", "hparam_share"].eq(0.0).all() and not sens.loc["kd", "meaningful"].any()
    assert sens.loc["lsh", "hparam_share"].gt(0.9).all() and sens.loc["lsh", "meaningful"].all()

    blocks = sensitivity_blocks(study)  # what write_report puts under "Sensitivity", in Markdown and HTML
    [text] = [content for kind, content in blocks if kind == "p"]
    assert "less than 0.1 of the variance" in text and "hparam share < 0.1" in text
    [table] = [content for kind, content in blocks if kind == "table"]
    marks = table.reset_index().set_index(["method", "parameter"])["importances"]
    assert marks.to_dict() == {("kd", "kd_weight"): "not meaningful (hparam share < 0.1)",
                               ("kd", "temperature"): "not meaningful (hparam share < 0.1)",
                               ("lsh", "feature_weight"): ""}
    assert table.loc["kd", "fanova"].str.match(r"^\d\.\d\d$").all()  # the numbers stay, beside the mark

    fig = importance_figure(sens)
    titles = {ax.get_title().split(":")[0]: ax.get_title() for ax in fig.axes}
    assert "not meaningful" in titles["kd"] and "0.00 < 0.1" in titles["kd"]
    assert titles["lsh"] == "lsh"
    assert "not meaningful where hparam share < 0.1" in fig._suptitle.get_text()


def test_the_protocol_table_shows_each_codebases_number_for_the_chosen_setting() -> None:
    study = _study()
    assert study.protocols()["peak"].isna().all(), "a ledger from before the protocol metrics: n/a"
    frame = study.results()
    frame["last_epoch_test_acc"] = frame["test_acc"] - 0.01
    frame["peak_test_acc"] = frame["test_acc"] + 0.02 + 0.01 * frame["seed"]  # the best test epoch, per run
    recorded = StudyResults(study.spec, study.base, study.spaces, frame)
    table = recorded.protocols()
    assert list(table.index) == ["kd", "lsh"] and set(table["setting"]) == {"tuned"}
    assert table.loc["lsh", "selected"] == 70.0 and table.loc["lsh", "last_epoch"] == 69.0
    assert table.loc["lsh", "peak"] == 73.0 and abs(table.loc["lsh", "gap"] - 3.0) < 1e-9
    from orchestrator.study.report import _protocol_table

    shown = _protocol_table(table)
    assert shown.loc["lsh", "best test epoch (mdistiller, LS)"] == "73.00 ± 1.00"
