"""Self-describing network checkpoints: a state_dict plus what rebuilds the network, loaded safely; the
loop-state checkpoints Tune keeps for a trial (one `seed-N.pt` per run it trains, `<setting>-seed-N.pt` in a
group); the fingerprint of a teacher and its data."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from methods.hooked import HookedNet
from methods.networks import FeatureNet, build_network
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.experiment.config import ExperimentConfig

_REQUIRED = ("architecture", "args", "num_classes", "in_channels", "image_size", "state_dict")


def save_network(path: str | Path, model: nn.Module, *, architecture: str, args: dict[str, Any],
                 num_classes: int, in_channels: int, image_size: int, features: list[str] | None = None,
                 **metrics: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"architecture": architecture, "args": dict(args), "features": features, "num_classes": num_classes,
                "in_channels": in_channels, "image_size": image_size, "state_dict": state,
                "metrics": {k: float(v) for k, v in metrics.items()}}, path)
    return path


def load_checkpoint(path: str | Path, field: str = "teacher.checkpoint") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; any problem is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol warning: the one line below says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ConfigError(f"{field}: not a readable kdo checkpoint ({path}): {_load_failure(err)}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise ConfigError(f"{field}: {path} is not a kdo checkpoint (needs keys {', '.join(_REQUIRED)})")
    return ckpt


def _load_failure(err: Exception) -> str:
    """torch's reason in one short line: for a file weights-only loading refuses, the unpickler's own error (torch's
    advice to load it unsafely, with its terminal colours, is left out)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    _, marker, detail = text.partition("WeightsUnpickler error:")
    if marker and detail.strip():
        reason = " ".join(detail.strip().split("\n\n")[0].split()).split(". ")[0]
        return f"loading it with weights_only=True failed: {reason[:200]}"
    return text.splitlines()[0][:200] if text else type(err).__name__


def check_compatible(ckpt: dict[str, Any], *, num_classes: int, in_channels: int, image_size: int,
                     field: str = "teacher.checkpoint") -> None:
    """The checkpoint must fit this experiment's data: class count, channels and image size."""
    for key, want in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if int(ckpt[key]) != want:
            raise ConfigError(f"{field}: checkpoint has {key}={ckpt[key]} but the data has {key}={want}")


def build_from_checkpoint(ckpt: dict[str, Any], field: str = "teacher.checkpoint") -> FeatureNet:
    try:
        model = build_network(ckpt["architecture"], num_classes=int(ckpt["num_classes"]),
                              in_channels=int(ckpt["in_channels"]), image_size=int(ckpt["image_size"]),
                              features=ckpt.get("features"), **ckpt["args"])
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"{field}: weights do not match architecture '{ckpt['architecture']}': "
                          f"{str(err).splitlines()[0][:200]}") from None
    return model


def weights_checkpoint(weights: Any, *, num_classes: int, in_channels: int, image_size: int) -> dict[str, Any]:
    """A user's plain `state_dict` file (`teacher.weights`: path, architecture, args, features) as a kdo checkpoint;
    the architecture is built for the data's shape and must take every tensor (one line otherwise)."""
    field, path = "teacher.weights.path", Path(weights.path)
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ConfigError(f"{field}: not a readable state_dict ({path}): {_load_failure(err)}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{field}: {path} is not a state_dict (a mapping of tensor names to tensors; save it with "
                          "torch.save(model.state_dict(), path))")
    try:
        model = build_network(weights.architecture, num_classes=num_classes, in_channels=in_channels,
                              image_size=image_size, features=weights.features, **weights.args)
        target = model.net if isinstance(model, HookedNet) else model
        target.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"teacher.weights: {path} does not fit architecture '{weights.architecture}': "
                          f"{str(err).strip().splitlines()[0][:200]}") from None
    return {"architecture": weights.architecture, "args": dict(weights.args), "features": weights.features,
            "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "metrics": {}}


def newest_checkpoints(folder: str | Path | None) -> list[Path]:
    """The checkpoint folders (`checkpoint_*`) a trial or a data-parallel run keeps in `folder`, newest first.
    A trial's tag may name one Tune has already replaced: the worker can die between Tune keeping a newer
    checkpoint and the tag naming it, so a resume looks at every folder beside it."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(Path(folder).glob("checkpoint_*"), reverse=True)


def load_states(folder: Path, names: list[str]) -> dict[str, dict[str, Any]] | None:
    """The loop state of every run `names` names (`seed-N`) in one checkpoint folder, or None if any is missing
    or cut short."""
    try:
        return {name: torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=False) for name in names}
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None


def fingerprint(cfg: ExperimentConfig, teacher_ckpt: dict[str, Any] | None) -> str:
    """Names the training images and the teacher's weights: what a cached teacher pass depends on."""
    digest = hashlib.sha256()
    data = cfg.data.model_dump(mode="json", include={"name", "val_fraction", "train_fraction", "image_size",
                                                     "split_seed", "synthetic"})
    digest.update(json.dumps(data, sort_keys=True).encode())
    if teacher_ckpt is not None:
        digest.update(json.dumps({k: teacher_ckpt[k] for k in ("architecture", "args")}, sort_keys=True).encode())
        for name, tensor in sorted(teacher_ckpt["state_dict"].items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
