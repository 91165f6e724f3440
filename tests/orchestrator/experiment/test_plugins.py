"""Plugins: user code named once, imported before anything is validated. The registries are process-global, so
every case runs in a subprocess of its own (a working directory holding only the user's files)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _python(code: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()


BAD = {
    "syntax.py": "x = (1,\n",
    "raises.py": "import numpy\nimport a_dependency_nobody_installed\n",
    "noparams.py": ("from orchestrator import Distiller, register_method\n\n@register_method('bare')\n"
                    "class Bare(Distiller):\n    pass\n"),
    "clash.py": ("from orchestrator import Distiller, MethodParams, register_method\n\n"
                 "class P(MethodParams):\n    pass\n\n@register_method('kd')\n"
                 "class Mine(Distiller):\n    Params = P\n"),
    "netclash.py": "from orchestrator import register_network\n\nregister_network('resnet8')(lambda *a: None)\n",
    "dataclash.py": ("from orchestrator import register_dataset\n\nregister_dataset('digits', channels=1, "
                     "image_size=8, num_classes=10, flip=False, loader=lambda cfg: None)\n"),
}

_CASES = """
import sys
from typer.testing import CliRunner
from orchestrator.cli import app
for plugin in sys.argv[1:]:
    result = CliRunner().invoke(app, ["run", "digits_kd", "--plugin", plugin])
    lines = result.output.strip().splitlines()
    print(result.exit_code, len(lines), lines[-1])
result = CliRunner().invoke(app, ["run", "sub/named.yaml"])  # a config naming a bad plugin beside it
print(result.exit_code, len(result.output.strip().splitlines()), result.output.strip().splitlines()[-1])
"""


def test_each_bad_plugin_is_one_line_exit_2_before_anything_is_written(tmp_path: Path) -> None:
    for name, text in BAD.items():
        (tmp_path / name).write_text(text)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "methods.py").write_text("X = 1\n")  # beside the user's script it would shadow kdo (below)
    (sub / "syntax.py").write_text("def f(:\n")
    (sub / "named.yaml").write_text("plugins: [syntax.py]\nstudent: {architecture: mlp}\nmethod: {name: ce}\n")
    plugins = ["not_a_module_anywhere", "missing.py", *BAD, "sub/methods.py"]
    out = _python(_CASES, tmp_path, *plugins)
    for (code, lines, _), plugin in zip((line.split(" ", 2) for line in out), [*plugins, "named"], strict=True):
        assert (code, lines) == ("2", "1"), (plugin, out)
    last = [line.split(" ", 2)[2] for line in out]
    assert last[0] == ("error: plugins: plugin not_a_module_anywhere: ModuleNotFoundError: No module named "
                       "'not_a_module_anywhere'")
    assert last[1].startswith("error: plugins: plugin missing.py: no such file or folder")
    assert last[2] == f"error: plugins: plugin {tmp_path / 'syntax.py'}: SyntaxError: '(' was never closed " \
                      "(syntax.py, line 1)"
    assert last[3].endswith("raises.py: ModuleNotFoundError: No module named 'a_dependency_nobody_installed'")
    assert last[4].endswith("noparams.py: ValueError: method 'bare': Bare must set Params to its own MethodParams "
                            "subclass (the method's hyperparameter schema, even an empty one)")
    assert last[5].endswith("clash.py: ValueError: method 'kd' is already registered (by "
                            "methods.kd.KnowledgeDistillation); pick another name")
    assert last[6].endswith("netclash.py: ValueError: network 'resnet8' is already registered (by methods.networks); "
                            "pick another name")
    assert last[7].endswith("dataclash.py: ValueError: dataset 'digits' is already registered; pick another name")
    assert last[8].endswith("methods.py: its module name 'methods' is one of kdo's own packages (methods, "
                            "orchestrator, search_spaces); rename it")
    assert last[9] == f"error: plugins: plugin {sub / 'syntax.py'}: SyntaxError: invalid syntax (syntax.py, line 1)"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*BAD, "sub"])  # no store, no runs, no cache
    assert sorted(p.name for p in sub.iterdir()) == ["methods.py", "named.yaml", "syntax.py"]
    shadowed = subprocess.run([sys.executable, "-c", "import orchestrator"], capture_output=True, text=True, cwd=sub,
                              timeout=60)
    assert shadowed.returncode == 1 and shadowed.stderr.strip().splitlines()[-1] == (
        f"ImportError: module 'methods' resolves to {sub / 'methods.py'}, not kdo's own {ROOT / 'methods'}: rename "
        "your module (kdo's packages are named orchestrator, methods and search_spaces)")


MINE = '''
import numpy as np
import torch
from torch import nn

from orchestrator import register_dataset, register_network


def stripes(cfg):
    """Three classes of 12x12 images: horizontal stripes, vertical stripes or a checkerboard, plus noise."""
    rng = np.random.default_rng(0)
    i, j = np.mgrid[:12, :12]
    patterns = np.stack([i % 2, j % 2, (i + j) % 2]) * 120.0

    def draw(n):
        y = rng.integers(0, 3, n)
        return np.clip(patterns[y] + rng.normal(60, 30, (n, 12, 12)), 0, 255).astype(np.uint8), y
    return (*draw(300), *draw(90))


register_dataset("stripes", channels=1, image_size=12, num_classes=3, flip=False, loader=stripes)


class Plain(nn.Module):
    def __init__(self, classes, width):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_network("plain")
def plain(num_classes, in_channels, image_size, *, width=8):
    return Plain(num_classes, width)
'''

_TRAIN = """
import sys
import torch
from orchestrator import ConfigError
from orchestrator.experiment.config import load_config, teacher_key
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import train_loop
from orchestrator.experiment.runner import check
from orchestrator.experiment.tracking import dataset_inputs
from methods import list_methods
import mine

torch.manual_seed(0)
torch.save(mine.Plain(3, 16).state_dict(), "teacher_weights.pt")  # the user's own pretrained (here: random) teacher
features = ["conv1", "conv2", "pool"]
raw = {"plugins": ["mine.py"], "data": {"name": "stripes", "batch_size": 32},
       "student": {"architecture": "plain", "args": {"width": 4}, "features": features},
       "teacher": {"weights": {"path": "teacher_weights.pt", "architecture": "plain", "args": {"width": 16},
                               "features": features}},
       "method": {"name": "fitnets", "params": {"stages": 1, "guided_layer": "conv2", "hint_layer": "conv2"}},
       "training": {"epochs": 4, "lr": 0.1}}
cfg = check(raw)
splits = load_splits(cfg.data)
print("digest", dataset_inputs(cfg.data, splits)[0]["digest"])
teacher = check(raw, checkpoints=(ckpts := {})) and next(iter(ckpts.values()))
out = train_loop(cfg, splits, teacher, log=None)
print("fitnets", out.status, out.final["test_acc"] > 0.9, out.history[0]["loss/hint"] > 0)
described = load_config({**raw, "teacher": {"architecture": "plain", "args": {"width": 16}, "features": features}})
print("key", teacher_key(described) != teacher_key(load_config({**raw, "data": {"name": "digits"}, "teacher": {
    "architecture": "plain", "args": {"width": 16}, "features": features}})))
for broken in ({"features": None}, {"features": ["conv9"]}):
    try:
        check({**raw, "student": {**raw["student"], **broken}})
    except ConfigError as err:
        print("refused", err)
try:
    check({**raw, "teacher": {"weights": {**raw["teacher"]["weights"], "args": {"width": 8}}}})
except ConfigError as err:
    print("refused", err)
print("entry point", "ep_method" in list_methods())
import os, pickle
twice = load_config({**raw, "plugins": ["mine.py", os.path.abspath("mine.py"), "mine.py"]})  # named thrice: once
print("twice", twice.plugins == [os.path.abspath("mine.py")], pickle.loads(pickle.dumps(twice)) == twice)
"""


def test_a_user_dataset_a_plain_network_with_hooked_features_and_a_state_dict_teacher(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(MINE)
    site = tmp_path / "site"  # an installed package that declares a `kdo.plugins` entry point
    (site / "ep_pkg-0.1.dist-info").mkdir(parents=True)
    (site / "ep_pkg-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-pkg\nVersion: 0.1\n")
    (site / "ep_pkg-0.1.dist-info" / "entry_points.txt").write_text("[kdo.plugins]\nep = ep_plugin\n")
    (site / "ep_plugin.py").write_text(BAD["clash.py"].replace("'kd'", "'ep_method'"))
    lines = _python(_TRAIN, tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert lines[0].startswith("digest ") and len(lines[0]) > 12
    assert lines[1] == "fitnets finished True True"
    assert lines[2] == "key True"  # the teacher cache key tells a user dataset from a built-in one
    assert lines[3] == ("refused method.params.guided_layer: the network names no features; name its layers in "
                        "student.features or teacher.features")
    assert lines[4].startswith("refused student: features: 'conv9' is not a layer of Plain; its layers include conv1")
    assert lines[5].startswith("refused teacher.weights: ") and "does not fit architecture 'plain'" in lines[5]
    assert lines[6] == "entry point True"
    assert lines[7] == "twice True True"
