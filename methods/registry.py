"""The method registry and the `Distiller` interface every KD method implements."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from methods.plugins import load_entry_points

Batches = Iterable[tuple[Tensor, Tensor | None]]


def batch_order_seed(seed: int, epoch: int, phase: str = "student") -> int:
    """The one rule of batch orders: the seed of the permutation (and augmentation) of one epoch's batches.

    Runs with the same `training.seed` see the same batches in the same order in each (phase, epoch), so
    results repeat and runs of one seed can share teacher passes. Student epochs are 1..E; epoch 0 is a draw
    before the first student epoch (EKD's BN recalibration); a pre-phase has its own range, so its batches
    never repeat a student epoch's (FitNets' hint stage, `phase="hint"`).
    """
    return seed * 100_003 + _PHASE_START[phase] + epoch


_PHASE_START = {"student": 0, "hint": 10_000}


class TeacherPass:
    """The frozen teacher's outputs for the batch at hand, computed once for every student that asks: students
    trained as one group (`orchestrator.experiment.group`) share one, so a batch costs one teacher forward."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self._key: tuple[Tensor, int] | None = None
        self._out: tuple[Tensor, dict[str, Tensor]] | None = None

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self._out is None or self._key is None or self._key[0] is not x or self._key[1] != x._version:
            self._key, self._out = (x, x._version), self.teacher(x, features=True)
        return self._out


# A params field that names a layer of the networks (a stage name, or a relative depth): `Field(...,
# json_schema_extra=LAYER)`. The method's `check_setup` checks it against the networks it is given, so the
# conformance kit does not ask it for bounds or a list of values.
LAYER = {"kdo_layer": True}


class MethodParams(BaseModel):
    """Base of every method's hyperparameter schema: typed, bounded, documented, no unknown keys."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class LoopContext:
    """What the training loop lends a method's hooks; plain callables, so `methods/` needs no Ray or MLflow.

    `train_batches(epoch, phase="student")`: this rank's augmented share of one epoch of real training data,
    ordered by `batch_order_seed(seed, epoch, phase)`.
    `clean_batches(batch_size)`: every training image once, un-augmented, in a fixed order (teacher passes).
    `log(metrics, step)`, `log_images(x, file)`, `set_tags(tags)`: write to the run's tracker only, never to
    Ray Tune, so pre-phases do not count as Tune iterations. `make_optimizer(params)`: the configured
    optimizer. `accuracy(model, split)`: a model on "val" or "test". `fingerprint()`: names the teacher and
    the data, the key of results cached across the trials of a sweep in `cache_dir`.
    """

    device: torch.device
    num_classes: int
    image_shape: tuple[int, int, int]  # channels, height, width
    batch_size: int
    epochs: int
    precision: str
    train_batches: Callable[..., Iterator[tuple[Tensor, Tensor]]]
    clean_batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]]
    log: Callable[[dict[str, float], int], None]
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    accuracy: Callable[[nn.Module, str], float]
    fingerprint: Callable[[], str]
    log_images: Callable[[Tensor, str], None]  # (a batch of normalized images, artifact file): a PNG grid
    set_tags: Callable[[dict[str, str]], None]
    cache_dir: Path | None = None
    # The same batches as `train_batches(epoch)` plus each image's training-set index (x, y, index), and
    # `train_images(index)`: those images un-augmented and normalized (methods with per-image cached targets).
    indexed_train_batches: Callable[[int], Iterator[tuple[Tensor, Tensor, Tensor]]] | None = None
    train_images: Callable[[Tensor], Tensor] | None = None
    # Per-channel mean/std of the training pixels in [0, 1]: inputs are (pixel - mean) / std. Data-free methods
    # use them to keep synthesized images in the valid pixel range (DeepInversion clips every step).
    data_mean: tuple[float, ...] = ()
    data_std: tuple[float, ...] = ()


class Distiller(nn.Module):
    """Holds the student, the frozen teacher (if any) and the method's extra modules.

    `forward(x, y)` is one training step's loss: it returns the total loss and every named part
    (detached) for logging. Wrapping the whole distiller in DDP syncs the student and any extra
    trainable module; the teacher's parameters do not require grad, so DDP leaves them alone.
    Evaluation always uses `self.student` alone (`inference_student()` when a method folds extra parts in).

    Multi-phase methods override the hooks, all optional: `setup` runs once before the first student
    epoch (FitNets' hint stage, a generator phase, TCS's teacher pass), `start_epoch`/`epoch_metrics`
    bracket each student epoch (an annealed weight, generator losses), `batches` feeds the student steps
    (data-free methods synthesize them and never read real training images), `optimized_parameters`
    is what the loop's optimizer steps, and `extra_accuracies` adds named accuracies (EKD's sub-nets).
    """

    Params: type[MethodParams] = MethodParams
    needs_teacher: bool = True
    data_free: bool = False  # True: the student never sees a real training image
    # True: the student steps on `ctx.train_batches` and reads the teacher only through `teacher_logits` or
    # `teacher_features`, so students of one seed can train as a group on shared batches and teacher passes.
    groupable: bool = True
    teacher_pass: TeacherPass | None = None  # set by a group: the pass its members share

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: MethodParams) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.params = params
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        # The teacher stays in eval mode: its BN statistics and dropout must not move.
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        assert self.teacher is not None
        return self.teacher_pass(x)[0] if self.teacher_pass is not None else self.teacher(x)

    @torch.no_grad()
    def teacher_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The teacher's logits and named features (`FeatureNet.forward(x, features=True)`)."""
        assert self.teacher is not None
        return self.teacher_pass(x) if self.teacher_pass is not None else self.teacher(x, features=True)

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    @classmethod
    def check_setup(cls, params: MethodParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        """Reject a setup the method cannot run with one `ValueError` line naming the field (e.g. a teacher
        without BatchNorm for DeepInversion); called when the config is validated, before any work starts."""

    def setup(self, ctx: LoopContext) -> None:
        """One-off work before the first student epoch; log it with `ctx.log`, report nothing to Tune."""

    def start_epoch(self, epoch: int, ctx: LoopContext) -> None:
        """Called before student epoch `epoch` (1-based)."""

    def batches(self, epoch: int, ctx: LoopContext) -> Batches:
        """The student steps of one epoch: real training batches unless the method is data-free."""
        return ctx.train_batches(epoch)

    def epoch_metrics(self) -> dict[str, float]:
        """Scalars logged with the epoch's metrics (a weight's value this epoch, a generator loss mean)."""
        return {}

    def optimized_parameters(self) -> list[nn.Parameter]:
        """What the loop's optimizer trains: every trainable parameter unless the method steps some itself."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_accuracies(self, split: str, ctx: LoopContext) -> dict[str, float]:
        """Named accuracies beside the headline one, logged as `<split>_acc/<name>`."""
        return {}

    def inference_student(self) -> nn.Module:
        """The network evaluated, selected and checkpointed."""
        return self.student

    def method_state(self) -> dict[str, Any]:
        """What a trial checkpoint needs beyond the modules' weights and buffers (a synthesizer's optimizer, an
        image pool, scores kept in plain tensors); restored by `load_method_state` after `setup`."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what `method_state` returned."""


_METHODS: dict[str, type[Distiller]] = {}
# Modules whose import registers the built-in methods; imported lazily to keep import cheap.
_BUILTIN_MODULES = ("methods.ce", "methods.kd", "methods.dkd", "methods.ddnn", "methods.ekd", "methods.rdskd",
                     "methods.dafl", "methods.deepinversion", "methods.fitnets", "methods.lsh", "methods.tcs")


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a `Distiller` subclass available under `name`. The same class registered again (its
    module imported anew) replaces itself; another class under a taken name is refused."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise ValueError(f"method '{name}': {cls!r} is not a Distiller subclass")
        if "Params" not in vars(cls) or not (isinstance(cls.Params, type) and issubclass(cls.Params, MethodParams)):
            raise ValueError(f"method '{name}': {cls.__name__} must set Params to its own MethodParams subclass (the "
                             "method's hyperparameter schema, even an empty one)")
        old = _METHODS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method '{name}' is already registered (by {old.__module__}.{old.__qualname__}); "
                             "pick another name")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return wrap


class _UnknownParams(MethodParams):
    model_config = ConfigDict(extra="allow")


def stand_in(name: str) -> None:
    """Register a placeholder for method `name` whose plugin cannot be imported: configs that name it validate (its
    params unchecked), so a study's ledger can still be read and reported; it refuses to train."""

    def forward(self: Distiller, x: Tensor, y: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        raise RuntimeError(f"method '{name}': its plugin could not be imported; this is only its name")

    register(name)(type(f"Unavailable[{name}]", (Distiller,), {"Params": _UnknownParams, "forward": forward,
                                                              "__module__": __name__}))


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    load_entry_points()


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> type[Distiller]:
    _load_builtins()
    if name not in _METHODS:
        raise KeyError(f"unknown method '{name}'; allowed: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
