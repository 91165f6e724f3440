"""TCS, "Tailored Coordinate System": Zhou, Zhu, Wu, "All You Need in Knowledge Distillation Is a Tailored
Coordinate System" (arXiv 2412.09388, AAAI 2025). No public code; the procedure follows docs/METHODS.md section 4, whose
[recon] parts are our reconstruction from the abstract and a paper summary.

1. `setup`: ONE frozen-teacher pass over the un-augmented training set gives F_t in R^{N x D}; PCA in float64
   (`torch.linalg.eigh` of the D x D covariance): mu, V sorted by variance; cached coordinates C_t = (F_t - mu) V
   (all D, or the top `pca_components`; divided by sqrt(eigenvalue) when `whiten`). The cache lives in
   `cache_dir/tcs/<fingerprint>-....pt` under a file lock, so every trial of a sweep reuses it.
2. Student: backbone f_s in R^d -> linear A (d -> K) -> c_s = A f_s -> trainable mask m (init 1) -> classifier g.
3. L = ce_weight * CE(g(m * c_s), y) + feature_weight * [MSE(m * c_s, m * c_t) (+ eLSH(m * c_s, codes of m * c_t))];
   the MSE is averaged over the batch and the coordinates still selected. eLSH (switch `elsh`) is LSHFM's BCE on the
   signs of a frozen Gaussian projection of the (centred) coordinates, bias 0, `elsh_bits_per_dim` * K bits.
4. Selection: |dL/dm_j| is accumulated over `select_interval` epochs; each of `select_rounds` rounds permanently zeros
   an even share of the remaining coordinates (lowest scores first) until k = round(keep_fraction * K) remain.
5. Inference: A, the mask and g are linear: `inference_student()` folds them into the student's own classifier.
The teacher never runs during student training. c_t is the cached entry of the SAME image (batches carry each
image's training-set index). [recon] `target_pairing`: "augmented" pairs the augmented student input with the
un-augmented teacher target; "clean_forward" adds a student forward on the clean image for the mimic loss (CE stays
on the augmented one). [recon] `mask_in_mimic`: "trained" lets the mimic loss move m, which it minimizes by
shrinking m (MSE(m c_s, m c_t) -> 0 as m -> 0; on digits the student then barely learns), so the default
"detached" treats m as a constant there: m, and the |dL/dm| selection scores, follow the task loss.
[choice] params: keep_fraction, select_rounds, select_interval, feature_weight, elsh, elsh_bits_per_dim, whiten,
pca_components.
Deviation: the paper's teachers are self-supervised (MoCo-v3, DINOv2); any frozen checkpoint is accepted here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from filelock import FileLock
from pydantic import Field
from torch import Tensor, nn

from methods.feature_utils import fold_linear, write_classifier
from methods.networks import FeatureNet
from methods.registry import Batches, Distiller, LoopContext, MethodParams, register

TEACHER_TAG = "any frozen supervised/zoo checkpoint, not an SSL teacher (no SSL weights downloadable here)"


class TCSParams(MethodParams):
    feature_weight: float = Field(5.0, ge=0.0, le=1000.0, description="beta on the coordinate mimic loss (5)")
    ce_weight: float = Field(1.0, ge=0.0, le=10.0, description="weight of CE(g(m * c_s), y)")
    keep_fraction: float = Field(0.5, gt=0.0, le=1.0, description="k / K coordinates kept by selection [choice]")
    select_rounds: int = Field(4, ge=1, le=64, description="selection rounds, an even share removed each [choice]")
    select_interval: int = Field(2, ge=1, le=100, description="epochs of |dL/dm| accumulation per round [choice]")
    pca_components: int | None = Field(
        None, ge=1, le=1 << 16, description="K: cache only the top-K PCA coordinates (default all D)")
    whiten: bool = Field(False, description="divide each PCA coordinate by its std [choice]")
    elsh: bool = Field(False, description="add the eLSH loss on the coordinates [choice]")
    elsh_bits_per_dim: float = Field(4.0, gt=0.0, le=64.0, description="eLSH bits as a multiple of K (4)")
    mask_in_mimic: Literal["detached", "trained"] = Field(
        "detached", description="[recon] m inside the mimic loss: a constant (m learns from CE only) or trained "
                                "through it too (lets the loss shrink m towards 0)")
    target_pairing: Literal["augmented", "clean_forward"] = Field(
        "augmented", description="[recon] augmented input vs clean teacher target, or an extra clean student "
                                 "forward for the mimic loss")


def pca_coordinates(features: Tensor, components: int | None, whiten: bool) -> dict[str, Tensor]:
    """PCA of N x D features in float64 (eigh of the covariance): mean, basis V (D x K, by variance, descending),
    eigenvalues and the coordinates (F - mu) V (whitened on request)."""
    feats = features.double()
    mean = feats.mean(0)
    centred = feats - mean
    cov = centred.t() @ centred / max(1, feats.shape[0] - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, basis = eigenvalues[order].clamp_min(0.0), eigenvectors[:, order]
    if components is not None:
        eigenvalues, basis = eigenvalues[:components], basis[:, :components]
    coords = centred @ basis
    if whiten:
        coords = coords / (eigenvalues.sqrt() + 1e-6)
    explained = float(eigenvalues.sum() / torch.linalg.eigvalsh(cov).clamp_min(0).sum().clamp_min(1e-12))
    return {"mean": mean, "basis": basis, "eigenvalues": eigenvalues, "coords": coords.float(),
            "explained": torch.tensor(explained)}


@register("tcs")
class TailoredCoordinateSystem(Distiller):
    Params = TCSParams
    groupable = False  # its batches carry image indices into its cached teacher coordinates

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: TCSParams) -> None:
        super().__init__(student, teacher, params)
        assert isinstance(student, FeatureNet) and isinstance(teacher, FeatureNet)
        dim = teacher.feature_dim if params.pca_components is None else min(params.pca_components,
                                                                            teacher.feature_dim)
        self.dim = dim
        self.keep = max(1, round(params.keep_fraction * dim))
        self.project = nn.Linear(student.feature_dim, dim)  # A
        self.mask = nn.Parameter(torch.ones(dim))  # m
        self.head = nn.Linear(dim, student.classifier.out_features)  # g
        self.register_buffer("alive", torch.ones(dim))
        # |dL/dm| accumulated by a hook; a plain tensor, since DDP would overwrite a buffer from rank 0 each step.
        self.score = torch.zeros(dim)
        bits = max(1, round(params.elsh_bits_per_dim * dim)) if params.elsh else 0
        self.register_buffer("elsh_projection", torch.randn(bits, dim))
        student.classifier.requires_grad_(False)  # rewritten with the folded A, m, g at inference
        self.mask.register_hook(self._accumulate)
        self.coords: Tensor | None = None  # the cached C_t (a plain tensor: DDP must not broadcast it per step)
        self.rounds_done = 0
        self.cache_hit = False
        self.channels = 0

    def _accumulate(self, grad: Tensor) -> None:
        self.score.add_(grad.detach().abs())

    @classmethod
    def check_setup(cls, params: TCSParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        if not isinstance(teacher, FeatureNet) or not isinstance(student, FeatureNet):
            raise ValueError("method.params: tcs needs zoo networks with a penultimate feature")
        if params.pca_components is not None and params.pca_components > teacher.feature_dim:
            raise ValueError(f"method.params.pca_components: {params.pca_components} exceeds the teacher's feature "
                             f"width D={teacher.feature_dim}")

    def cache_path(self, ctx: LoopContext) -> Path | None:
        if ctx.cache_dir is None:
            return None
        p = self.params
        name = f"{ctx.fingerprint()}-k{p.pca_components or 'all'}-{'white' if p.whiten else 'raw'}.pt"
        return Path(ctx.cache_dir) / "tcs" / name

    @torch.no_grad()
    def teacher_pass(self, ctx: LoopContext) -> dict[str, Tensor]:
        feats = torch.cat([self.teacher(x, features=True)[1]["penultimate"].float()
                           for x, _ in ctx.clean_batches(1024)])
        return pca_coordinates(feats, self.params.pca_components, self.params.whiten)

    def load_or_compute(self, ctx: LoopContext) -> dict[str, Any]:
        path = self.cache_path(ctx)
        if path is None:
            self.cache_hit = False
            return self.teacher_pass(ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                self.cache_hit = True
                return torch.load(path, map_location="cpu", weights_only=True)
            self.cache_hit = False
            cached = {k: v.cpu() for k, v in self.teacher_pass(ctx).items()}
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(cached, partial)
            partial.replace(path)
            return cached

    def setup(self, ctx: LoopContext) -> None:
        if ctx.indexed_train_batches is None or ctx.train_images is None:
            raise ValueError("tcs needs a loop context with indexed_train_batches and train_images")
        self.channels = ctx.image_shape[0]
        self.score = self.score.to(ctx.device)
        cached = self.load_or_compute(ctx)
        self.coords = cached["coords"].to(ctx.device)
        ctx.set_tags({"kdo.tcs.teacher": TEACHER_TAG, "kdo.tcs.cache": "hit" if self.cache_hit else "computed"})
        ctx.log({"tcs/cache_hit": float(self.cache_hit), "tcs/explained_variance": float(cached["explained"]),
                 "tcs/coordinates": float(self.dim), "tcs/keep": float(self.keep)}, 0)

    def batches(self, epoch: int, ctx: LoopContext) -> Batches:
        """(x, [label, index]): the index finds each image's cached coordinate; with clean_forward the clean image
        rides along as extra channels (so the loop still counts one image per sample)."""
        assert ctx.indexed_train_batches is not None and ctx.train_images is not None
        for x, y, index in ctx.indexed_train_batches(epoch):
            if self.params.target_pairing == "clean_forward":
                x = torch.cat([x, ctx.train_images(index).to(x.dtype)], dim=1)
            yield x, torch.stack([y, index], dim=1)

    def start_epoch(self, epoch: int, ctx: LoopContext) -> None:
        p = self.params
        if epoch > 1 and (epoch - 1) % p.select_interval == 0 and self.rounds_done < p.select_rounds:
            self.select_round()

    @torch.no_grad()
    def select_round(self) -> None:
        """Zero this round's share of the lowest-scoring coordinates still alive, then reset the scores."""
        p = self.params
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.score)
        total = self.dim - self.keep
        remove = total * (self.rounds_done + 1) // p.select_rounds - total * self.rounds_done // p.select_rounds
        if remove > 0:
            score = torch.where(self.alive > 0, self.score, torch.full_like(self.score, float("inf")))
            self.alive[torch.argsort(score, stable=True)[:remove]] = 0.0
        self.score.zero_()
        self.rounds_done += 1

    def method_state(self) -> dict[str, Any]:
        return {"score": self.score.detach().cpu().clone(), "rounds_done": self.rounds_done}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.score = state["score"].to(self.score.device)
        self.rounds_done = int(state["rounds_done"])

    def effective_mask(self) -> Tensor:
        return self.mask * self.alive

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        assert self.coords is not None, "setup() loads the coordinates"
        labels, index = y[:, 0], y[:, 1]
        clean = None
        if p.target_pairing == "clean_forward":
            x, clean = x[:, :self.channels], x[:, self.channels:]
        mask = self.effective_mask()
        coords = self.project(self.student(x, features=True)[1]["penultimate"])
        logits = self.head(mask * coords)
        mimic_mask = mask.detach() if p.mask_in_mimic == "detached" else mask
        student_coords = coords if clean is None else self.project(self.student(clean, features=True)[1]["penultimate"])
        mimic = mimic_mask * student_coords
        target = mimic_mask * self.coords[index]
        alive = self.alive.sum().clamp_min(1.0)
        mse = (mimic.float() - target.float()).pow(2).sum(1).mean() / alive
        ce = F.cross_entropy(logits.float(), labels)
        feature = mse
        parts = {"ce": ce.detach(), "mse": mse.detach()}
        if p.elsh:
            codes = (target.float() @ self.elsh_projection.t() > 0).float()
            elsh = F.binary_cross_entropy_with_logits(mimic.float() @ self.elsh_projection.t(), codes)
            feature = feature + elsh
            parts["elsh"] = elsh.detach()
        return p.ce_weight * ce + p.feature_weight * feature, parts

    def epoch_metrics(self) -> dict[str, float]:
        return {"tcs/coordinates_kept": float(self.alive.sum()), "tcs/mask_abs_mean":
                float((self.effective_mask().abs().sum() / self.alive.sum().clamp_min(1)).detach())}

    def inference_student(self) -> nn.Module:
        return write_classifier(self.student, *fold_linear(self.project, self.effective_mask(), self.head))
