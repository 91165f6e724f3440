"""The conformance kit: every built-in method passes it (so the kit's checks are satisfiable and exact), and a
deliberately broken method fails the check that names its fault (so each check can fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from methods import list_methods
from orchestrator.experiment.conformance import check_method

ROOT = Path(__file__).resolve().parents[3]
# The data-free methods' synthesis phases and EKD's DDNN student, sized for seconds (their defaults are CIFAR's).
SMALL = {
    "dafl": ["method.params.iterations_per_epoch=4", "method.params.base_channels=8", "method.params.latent_dim=8"],
    "deepinversion": ["method.params.iterations_per_epoch=4", "method.params.synthesis_iterations=4"],
    "rdskd": ["method.params.iterations_per_epoch=4", "method.params.generator_epochs=2", "method.params.latent_dim=8",
              "method.params.snapshot_interval=2", "method.params.base_channels=8"],
    "ekd": ["student.architecture=ddnn_resnet",
            "student.args={blocks: [2, 2], subnets: [[1, 1]], widths: [4, 8], stem: cifar}"],
}


@pytest.mark.parametrize("method", list_methods())
def test_every_builtin_method_passes_the_kit(method: str) -> None:
    checks = check_method(method, overrides=SMALL.get(method, []))
    assert [c.name for c in checks] == ["schema", "setup", "step", "gradients", "deterministic", "resume", "grouped"]
    assert [c for c in checks if c.passed is False] == []
    from methods import get_method

    assert (checks[-1].passed is None) == (not get_method(method).groupable)  # skipped exactly when not groupable


BROKEN = '''
import torch
from pydantic import Field
from orchestrator import Distiller, MethodParams, register_method


class P(MethodParams):
    weight: float = Field(1.0, ge=0.0, le=10.0, description="a weight")


class Loose(MethodParams):
    weight: float = Field(1.0, ge=0.0)
    mode: str = Field("a", description="a mode")


@register_method("nan_loss")
class NaNLoss(Distiller):
    Params = P

    def forward(self, x, y):
        return self.student(x).sum() * float("nan"), {}


@register_method("feeds_teacher")
class FeedsTeacher(Distiller):
    Params = P

    def __init__(self, student, teacher, params):
        super().__init__(student, teacher, params)
        teacher.requires_grad_(True)  # the fault: the teacher trains with the student

    def forward(self, x, y):
        loss = torch.nn.functional.cross_entropy(self.student(x) + self.teacher(x), y)
        return loss, {}


@register_method("drops_state")
class DropsState(Distiller):
    """Its own Adam steps a scale each epoch, but `method_state` forgets the optimizer: a resume restarts Adam."""
    Params = Loose

    def __init__(self, student, teacher, params):
        super().__init__(student, teacher, params)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.own = torch.optim.Adam([self.scale], lr=0.1)

    def optimized_parameters(self):
        return list(self.student.parameters())

    def start_epoch(self, epoch, ctx):
        self.own.zero_grad()
        ((self.scale - 3.0) ** 2).backward()
        self.own.step()

    def forward(self, x, y):
        loss = torch.nn.functional.cross_entropy(self.student(x) * self.scale.detach(), y)
        return loss, {}
'''

_RUN = """
import sys
from orchestrator.experiment.conformance import check_method
for name in ("nan_loss", "feeds_teacher", "drops_state"):
    failed = [c for c in check_method(name, plugins=[sys.argv[1]]) if c.passed is False]
    print(name, "|", "; ".join(f"{c.name}: {c.detail}" for c in failed))
"""


def test_a_broken_method_fails_the_check_that_names_its_fault(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(BROKEN)
    done = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "broken.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" | ", 1) for line in done.stdout.strip().splitlines())
    assert lines["nan_loss"].startswith("step: not a finite scalar: loss"), lines
    assert lines["feeds_teacher"].startswith("gradients: the teacher receives gradients"), lines
    drops = lines["drops_state"]
    assert drops.startswith("schema: ") and "weight: numeric without an upper bound" in drops, drops
    assert "weight: no description" in drops and "mode: a free string" in drops
    assert "resume: epoch " in drops, drops  # Adam's moments were lost: the resumed epochs differ
    assert "deterministic" not in drops and "grouped" not in drops  # the other checks hold for it


def test_kdo_check_method_exits_1_on_a_failed_check_and_2_on_an_unknown_method(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(BROKEN)
    kdo = str(Path(sys.executable).parent / "kdo")
    failed = subprocess.run([kdo, "check-method", "nan_loss", "--plugin", "broken.py"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert [line.split()[0] for line in failed.stdout.splitlines()] == ["pass", "pass", "FAIL"]
    bad = subprocess.run([kdo, "check-method", "dist"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: METHOD: unknown method 'dist'; allowed: ce,")
    assert len(bad.stderr.strip().splitlines()) == 1
