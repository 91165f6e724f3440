"""The training loop: a plain function, the same in a test, on one Ray worker, or on N DDP workers."""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from methods import get_method
from methods.registry import LoopContext, batch_order_seed
from orchestrator.experiment.checkpoints import build_from_checkpoint, fingerprint, save_network
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.device_data import DeviceData
from orchestrator.experiment.factories import autocast, build_student, make_optimizer, make_schedule
from orchestrator.experiment.progress import epoch_line
from orchestrator.experiment.tracking import RunLog

# report(metrics, checkpoint_dir): called by every rank once per epoch; checkpoint_dir only on rank 0.
Reporter = Callable[[dict[str, Any], str | None], None]


@dataclass
class LoopOutput:
    status: str  # "finished" or "diverged"
    history: list[dict[str, Any]]
    final: dict[str, Any]


@torch.inference_mode()
def accuracy(model: nn.Module, data: DeviceData, split: str, precision: str = "fp32") -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with autocast(data.device, precision):
        for x, y in data.eval_batches(split):
            correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / max(1, data.size(split))


def _named(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in values.items()}


def _mean_over_ranks(values: dict[str, float], device: torch.device, world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def train_loop(cfg: ExperimentConfig, splits: Splits, teacher_ckpt: dict[str, Any] | None = None, *,
               rank: int = 0, world: int = 1, device: torch.device | None = None,
               report: Reporter | None = None, tracker: RunLog | None = None,
               wrap: Callable[[nn.Module], nn.Module] | None = None, artifact_name: str = "student",
               log: Callable[[str], None] | None = print) -> LoopOutput:
    """Train `cfg.student` with `cfg.method`; select on val_acc; test the selected student once.

    Reports `train_loss`, `loss/<part>`, `val_acc`, `lr`, `epoch_seconds`, `images_per_s` and `epoch_test_acc`
    every epoch; the last epoch's report also carries `test_acc` (the selected student's), `best_epoch`,
    `selected_val_acc`, `status`, and the papers' protocols: `last_epoch_test_acc` (the last epoch's weights) and
    `peak_test_acc` (the best test accuracy over epochs). The test set never chooses anything.
    With no validation split (`data.val_fraction` 0, selection `last`) no `*val_acc` key is ever reported.
    `wrap` puts the distiller under DDP (Ray Train's `prepare_model`) when there are several ranks.
    """
    history = list(iterate_epochs(cfg, splits, teacher_ckpt, rank=rank, world=world, device=device,
                                  report=report, tracker=tracker, wrap=wrap, artifact_name=artifact_name,
                                  log=log))
    return LoopOutput(status=history[-1]["status"], history=history, final=history[-1])


def iterate_epochs(cfg: ExperimentConfig, splits: Splits, teacher_ckpt: dict[str, Any] | None = None, *,
                   rank: int = 0, world: int = 1, device: torch.device | None = None,
                   report: Reporter | None = None, tracker: RunLog | None = None,
                   wrap: Callable[[nn.Module], nn.Module] | None = None, artifact_name: str = "student",
                   log: Callable[[str], None] | None = print, snapshot_every: int = 0,
                   resume: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """`train_loop` one epoch at a time: yields each epoch's metrics after reporting and logging them,
    so a caller can advance several seeds in lockstep and report their mean.

    Every `snapshot_every` epochs (0: never; never on the last) the yielded metrics also hold `loop_state`:
    everything needed to continue the run after that epoch (the distiller's weights and method state, the
    optimizer, the schedule, the RNG, the selection so far), on the CPU. `resume` takes such a state and
    continues from the next epoch: the method's pre-phase runs again with its logging off (its result is
    then overwritten), so nothing is logged twice."""
    run = Training(cfg, splits, teacher_ckpt, rank=rank, world=world, device=device, report=report,
                   tracker=tracker, wrap=wrap, artifact_name=artifact_name, log=log, snapshot_every=snapshot_every,
                   resume=resume)
    for epoch in range(run.first, cfg.training.epochs + 1):
        run.start_epoch(epoch)
        for x, y in run.distiller.batches(epoch, run.ctx):
            run.step(x, y)
        metrics = run.end_epoch(epoch)
        yield metrics
        if run.ended:
            return


class Training:
    """One run of the loop, a step at a time: built (student, method, its pre-phase, optimizer, schedule; or all
    of it restored from a loop state), then `start_epoch`, `step` per batch, `end_epoch`. `iterate_epochs` drives
    one; a group (`orchestrator.experiment.group`) drives several on the same batches, handing each its `data` and
    one `teacher` module."""

    def __init__(self, cfg: ExperimentConfig, splits: Splits, teacher_ckpt: dict[str, Any] | None = None, *,
                 rank: int = 0, world: int = 1, device: torch.device | None = None,
                 report: Reporter | None = None, tracker: RunLog | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, artifact_name: str = "student",
                 log: Callable[[str], None] | None = print, snapshot_every: int = 0,
                 resume: dict[str, Any] | None = None, data: DeviceData | None = None,
                 teacher: nn.Module | None = None, teacher_scores: dict[str, float] | None = None) -> None:
        tc = cfg.training
        self.cfg, self.splits, self.rank, self.world, self.report = cfg, splits, rank, world, report
        self.tracker, self.artifact_name, self.log, self.snapshot_every = tracker, artifact_name, log, snapshot_every
        self.device = device = device or torch.device("cpu")
        if teacher is None and teacher_ckpt is not None:  # before the seed: a group hands its members a built one
            teacher = build_from_checkpoint(teacher_ckpt).to(device)
        torch.manual_seed(tc.seed)
        self.data = data = data or DeviceData(splits, device, channels_last=tc.channels_last)
        self.student = build_student(cfg, splits)
        method = get_method(cfg.method.name)
        self.distiller = distiller = method(self.student, teacher if method.needs_teacher else None,
                                            method.Params(**cfg.method.params))
        distiller.to(device)
        if tc.channels_last:
            distiller.to(memory_format=torch.channels_last)
        self.ctx = ctx = self._context(teacher_ckpt)
        if resume is not None:  # the pre-phase ran and was logged before: rerun it quietly, then overwrite its result
            ctx = dataclasses.replace(ctx, log=lambda metrics, step: None, log_images=lambda images, name: None,
                                      set_tags=lambda tags: None)
        distiller.setup(ctx)  # before DDP wraps it: every rank runs the same seeded pre-phase, DDP syncs from rank 0
        self.model: nn.Module = wrap(distiller) if wrap is not None else distiller
        if tc.compile:
            self.model = torch.compile(self.model)
        self.optimizer = make_optimizer(distiller.optimized_parameters(), tc)
        self.schedule = make_schedule(self.optimizer, tc)
        self.status, self.ended = "finished", False  # `ended` after the last epoch: the epochs done, or diverged
        self.validated = data.size("val") > 0  # else nothing is validated: no val_acc at all, never a 0 in its place
        self.static: dict[str, float] = dict(teacher_scores or {})  # a group's members share their teacher's
        if teacher is not None:
            self.static = self.static or {
                **({"teacher_val_acc": accuracy(teacher, data, "val", tc.precision)} if self.validated else {}),
                "teacher_test_acc": accuracy(teacher, data, "test", tc.precision)}
            if tracker is not None and resume is None:
                tracker.log_metrics(self.static, step=0)
        # No epoch is selected before the first finite one: a run that diverges at once tests nothing (NaN).
        self.best_val, self.best_epoch, self.best_state, self.first = float("nan"), 0, None, 1
        self.peak_test = float("nan")  # the best test accuracy over epochs so far (reported, never chooses)
        if resume is not None:
            distiller.load_state_dict(resume["distiller"], strict=False)
            distiller.load_method_state(resume["method"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.schedule.load_state_dict(resume["schedule"])
            torch.set_rng_state(resume["rng"])
            self.best_val, self.best_epoch, self.best_state, self.first = (
                resume["best_val"], resume["best_epoch"], resume["best_state"], resume["epoch"] + 1)
            self.peak_test = resume.get("peak_test", float("nan"))  # a state saved before it was kept: NaN

    def _context(self, teacher_ckpt: dict[str, Any] | None) -> LoopContext:
        cfg, tc, data, splits, tracker = self.cfg, self.cfg.training, self.data, self.splits, self.tracker
        rank = self.rank

        def log_images(images: torch.Tensor, artifact_file: str) -> None:
            if tracker is not None and rank == 0:
                import torchvision  # its ops pull in torch._dynamo: only methods that log images pay for it

                with tempfile.TemporaryDirectory(prefix="kdo-images-") as folder:
                    path = Path(folder) / Path(artifact_file).name
                    torchvision.utils.save_image(images.detach().float().cpu(), path, nrow=8, normalize=True)
                    tracker.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

        def train_batches(epoch: int, phase: str = "student", with_index: bool = False) -> Iterator[tuple[Any, ...]]:
            return data.train_batches(cfg.data.batch_size, seed=batch_order_seed(tc.seed, epoch, phase), rank=rank,
                                      world=self.world, augment=cfg.data.augment, with_index=with_index)

        return LoopContext(
            device=self.device, num_classes=splits.info.num_classes,
            image_shape=(splits.info.channels, splits.info.image_size, splits.info.image_size),
            batch_size=cfg.data.batch_size, epochs=tc.epochs, precision=tc.precision,
            log=lambda metrics, step: tracker.log_metrics(metrics, step=step) if tracker is not None else None,
            make_optimizer=lambda params: make_optimizer(params, tc), train_batches=train_batches,
            clean_batches=lambda batch_size: data.eval_batches("train", batch_size),
            accuracy=lambda net, split: accuracy(net, data, split, tc.precision),
            fingerprint=lambda: fingerprint(cfg, teacher_ckpt), log_images=log_images,
            set_tags=lambda tags: tracker.set_tags(tags) if tracker is not None else None,
            cache_dir=Path(cfg.teacher.cache_dir) if cfg.teacher is not None else None,
            indexed_train_batches=lambda epoch: train_batches(epoch, with_index=True),
            train_images=data.train_images, data_mean=tuple(splits.mean), data_std=tuple(splits.std))

    def start_epoch(self, epoch: int) -> None:
        self.distiller.train()
        self.distiller.start_epoch(epoch, self.ctx)
        self._start, self._sums, self._batches, self._seen = time.perf_counter(), {}, 0, 0
        self._lr = self.optimizer.param_groups[0]["lr"]

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """One optimizer step on one batch."""
        self._seen += x.shape[0]
        with autocast(self.device, self.cfg.training.precision):
            loss, parts = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._batches += 1
        sums = self._sums
        sums["train_loss"] = sums.get("train_loss", 0.0) + loss.detach()
        for name, value in parts.items():
            sums[f"loss/{name}"] = sums.get(f"loss/{name}", 0.0) + value

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Step the schedule, validate, select, log and report the epoch; on the last one (the epochs are done, or
        the run diverged) also test the selected student once and save it. The metrics carry `status` then."""
        tc, data, distiller, ctx, tracker = self.cfg.training, self.data, self.distiller, self.ctx, self.tracker
        self.schedule.step()
        means = _mean_over_ranks({k: float(v) / max(1, self._batches) for k, v in self._sums.items()}, self.device,
                                 self.world)
        seconds = time.perf_counter() - self._start
        method_metrics = distiller.epoch_metrics()
        student = distiller.inference_student()
        val_acc = accuracy(student, data, "val", tc.precision) if self.validated else None
        val = ({"val_acc": val_acc, **_named("val_acc", distiller.extra_accuracies("val", ctx))} if self.validated
               else {})
        # The papers' protocols, measured beside kdo's, never used to choose: every epoch's test accuracy (the best
        # over epochs is what mdistiller and the LS code report, the last epoch's what RepDistiller reports).
        epoch_test = accuracy(student, data, "test", tc.precision)
        self.peak_test = epoch_test if not epoch_test <= self.peak_test else self.peak_test  # NaN-safe max
        metrics: dict[str, Any] = {"epoch": epoch, **means, **method_metrics, **val, "lr": self._lr,
                                   "epoch_seconds": seconds, "images_per_s": self._seen * self.world / seconds,
                                   "epoch_test_acc": epoch_test}
        if not all(math.isfinite(v) for v in (*means.values(), *method_metrics.values())):
            self.status = "diverged"
        elif (tc.selection == "last" or self.best_state is None
              or (val_acc is not None and val_acc > self.best_val)):
            self.best_val, self.best_epoch = (val_acc if val_acc is not None else self.best_val), epoch
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in student.state_dict().items()})
        last = self.ended = epoch == tc.epochs or self.status == "diverged"
        if last:
            test_acc = float("nan")
            if self.best_state is not None:
                student.load_state_dict(self.best_state)
                test_acc = accuracy(student, data, "test", tc.precision)
                metrics.update(_named("test_acc", distiller.extra_accuracies("test", ctx)))
            metrics.update(test_acc=test_acc, best_epoch=self.best_epoch,
                           **({"selected_val_acc": self.best_val} if self.validated else {}), **self.static,
                           last_epoch_test_acc=epoch_test, peak_test_acc=self.peak_test)
            metrics["status"] = self.status
        if self.rank == 0 and self.log is not None:
            self.log(epoch_line(self.cfg.name, epoch, tc.epochs, metrics))
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        with tempfile.TemporaryDirectory(prefix="kdo-student-") as folder:  # removed once reported and logged
            checkpoint_dir = None
            if self.rank == 0 and last and (self.report is not None or tracker is not None):
                checkpoint_dir = folder
                self._save_student(Path(folder), student, metrics["test_acc"])
            if self.report is not None:
                self.report(metrics, checkpoint_dir)
        if self.snapshot_every and not last and epoch % self.snapshot_every == 0:
            metrics["loop_state"] = self.loop_state(epoch)
        return metrics

    def _save_student(self, folder: Path, student: nn.Module, test_acc: float) -> None:
        """The selected student (its weights loaded), with the epoch and metrics of those weights."""
        cfg, info, name = self.cfg, self.splits.info, self.artifact_name
        save_network(folder / f"{name}.pt", student, architecture=cfg.student.architecture, args=cfg.student.args,
                     features=cfg.student.features,
                     num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size,
                     **({"val_acc": self.best_val} if self.validated else {}), epoch=self.best_epoch,
                     test_acc=test_acc)
        if self.tracker is not None:
            self.tracker.log_artifact(folder / f"{name}.pt", name)
            # The outcome is on record before anyone hears of it: a trial process Tune tears down right
            # after its last report still leaves a run whose tag says how it ended.
            self.tracker.set_tags({"kdo.status": self.status})

    def loop_state(self, epoch: int) -> dict[str, Any]:
        """Everything needed to continue after `epoch`, on the CPU; a copy: training on mutates the live tensors."""
        return copy.deepcopy({
            "epoch": epoch, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "rng": torch.get_rng_state(), "best_val": self.best_val, "best_epoch": self.best_epoch,
            "peak_test": self.peak_test,
            "best_state": self.best_state, "method": self.distiller.method_state(),
            "distiller": {k: v.detach().cpu() for k, v in self.distiller.state_dict().items()
                          if not k.startswith("teacher.")}})
