"""Supervised and self-supervised (BYOL) training of a backbone, resumable bit for bit.

:class:`Trainer` owns the network, the optimiser and (self-supervised) the :class:`~.byol.BYOL` heads.
Nothing it draws depends on hidden generator state: each epoch's data order comes from
``(seed, epoch)`` and each step's augmentations from ``(seed, epoch, step)`` (:func:`.augment.derive_seed`),
and the learning rate is a function of the step. So the training state at an epoch boundary (weights,
BatchNorm statistics, SGD momentum, EMA target, counters: :meth:`Trainer.state_tensors`) is all a
resumed run needs to continue exactly as the uninterrupted one would (bit-identical on CPU).

The recipe defaults are the SRE-Conv authors' NCT-CRC runs: SGD momentum 0.9, lr 2e-2 on a cosine,
weight decay 1e-3, 50 epochs, 224 px.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equislide.models._errors import ModelConfigError
from equislide.models._registry import create_model
from equislide.models.augment import derive_seed, normalise, seeded, ssl_augment, supervised_augment, to_unit
from equislide.models.byol import BYOL

__all__ = [
    "PRECISIONS",
    "Recipe",
    "StepInfo",
    "Trainer",
    "knn_accuracy",
    "pooled_features",
    "rotated_accuracy",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Angles of the rotated validation: 90 must not cost an equivariant network anything; 30 may.
VAL_ANGLES = (0, 90, 30)
_STREAM_AUG, _STREAM_VIEW2 = 1, 2
#: Training images BatchNorm's running statistics are re-estimated on after every epoch.
BN_IMAGES = 64


@dataclass(frozen=True)
class Recipe:
    """How a backbone is trained (recorded in full in the weights' provenance).

    Attributes:
        arch: Registered backbone (``srenet18``, ``resnet18``, ``e2cnn_resnet18``).
        model_kwargs: Builder arguments (``rings``, ``width``...; ``num_classes`` is set from the data).
        self_supervised: BYOL on unlabelled tiles instead of cross-entropy on class folders.
        epochs: Passes over the data.
        batch_size: Images per step (per process under DDP).
        lr: Peak learning rate (cosine to 0 over all steps).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        input_size: Side of the training images, px.
        rotation_augment: Add rotations by any angle to the supervised augmentations.
        seed: Seeds the initialisation, the data order and every augmentation.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
        train_impl: SRE-Conv implementation used while training (``ring``: measured 1.5x faster than
            ``dense`` for forward+backward on CPU); the saved weights are the same either way.
        ema: BYOL's base EMA momentum.
    """

    arch: str = "srenet18"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    self_supervised: bool = False
    epochs: int = 50
    batch_size: int = 64
    lr: float = 2e-2
    momentum: float = 0.9
    weight_decay: float = 1e-3
    input_size: int = 224
    rotation_augment: bool = False
    seed: int = 0
    precision: Precision = "auto"
    train_impl: str = "ring"
    ema: float = 0.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs or {}))
        if self.epochs < 1:
            raise ModelConfigError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 2:
            raise ModelConfigError(f"batch_size={self.batch_size} must be >= 2 (BatchNorm needs two images)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ModelConfigError(f"lr={self.lr!r} must be a positive number")
        if self.input_size < 16 or self.input_size % 8:
            raise ModelConfigError(f"input_size={self.input_size} must be a multiple of 8, >= 16")
        if self.precision not in PRECISIONS:
            raise ModelConfigError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_kwargs": dict(self.model_kwargs)}


@dataclass(frozen=True)
class StepInfo:
    """What one training step reports (the progress bar's fields)."""

    epoch: int
    step: int
    steps: int
    loss: float
    images_per_s: float


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """A backbone being trained, its optimiser and (self-supervised) BYOL heads.

    Args:
        recipe: The recipe.
        num_classes: Classes of a supervised run (the classifier's outputs); self-supervised runs
            keep the builder's default head, which is never trained.
        steps_per_epoch: Optimiser steps in an epoch (fixes the cosine schedule).
        device: Training device.
        rank, world_size: This process's place under ``torchrun`` (DDP); 0 and 1 alone.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        num_classes: int | None,
        steps_per_epoch: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.recipe = recipe
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = int(steps_per_epoch)
        kwargs = dict(recipe.model_kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)
        self.model_kwargs = kwargs
        train_kwargs = dict(kwargs)
        if recipe.arch == "srenet18":
            train_kwargs["impl"] = recipe.train_impl
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            self.model = create_model(recipe.arch, **train_kwargs)
            self.byol = (
                BYOL(self.model, int(self.model.feature_channels[-1]), base_momentum=recipe.ema)
                if recipe.self_supervised
                else None
            )
        self.model.to(device)
        if self.byol is not None:
            self.byol.to(device)
        if device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        params = [p for m in self._trained_modules() for p in m.parameters()]
        self.optimizer = torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
        self.autocast = _autocast_dtype(recipe.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast is torch.float16 else None
        net: nn.Module = self.byol.online() if self.byol is not None else self.model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = net
        self.augment = (
            ssl_augment(recipe.input_size)
            if recipe.self_supervised
            else supervised_augment(recipe.input_size, rotation=recipe.rotation_augment)
        )
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps completed
        self.history: list[dict[str, Any]] = []

    def _trained_modules(self) -> list[nn.Module]:
        return self.byol.online_modules() if self.byol is not None else [self.model]

    @staticmethod
    def steps_for(n_images: int, batch_size: int, world_size: int = 1) -> int:
        """Optimiser steps per epoch over ``n_images`` (full global batches; at least one)."""
        return max(1, n_images // (batch_size * world_size))

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        """Cosine from ``lr`` to 0 over every step of training (a function of the step alone)."""
        return self.recipe.lr * 0.5 * (1 + math.cos(math.pi * step / max(self.total_steps, 1)))

    def epoch_order(self, n: int, epoch: int) -> np.ndarray:
        """This process's image indices of each step of ``epoch``: ``(steps_per_epoch, batch_size)``.

        One permutation from ``(seed, epoch)``; the last incomplete batch is dropped (BatchNorm and
        the fixed schedule want full batches), except that a dataset smaller than one global batch is
        drawn with repetition to fill it.
        """
        rng = np.random.default_rng([self.recipe.seed, epoch])
        global_batch = self.recipe.batch_size * self.world_size
        need = self.steps_per_epoch * global_batch
        order = rng.permutation(n)
        if n < need:
            order = np.concatenate([order, rng.integers(0, n, need - n)]) if n < global_batch else order
        order = order[:need].reshape(self.steps_per_epoch, self.world_size, self.recipe.batch_size)
        return order[:, self.rank]

    def _views(self, tiles: np.ndarray, epoch: int, step: int) -> tuple[Tensor, Tensor | None]:
        x = to_unit(torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device))
        seed = self.recipe.seed
        with seeded(derive_seed(seed, epoch, step, _STREAM_AUG, self.rank), self.device):
            v1 = normalise(self.augment(x))
        if self.byol is None:
            return v1, None
        with seeded(derive_seed(seed, epoch, step, _STREAM_VIEW2, self.rank), self.device):
            v2 = normalise(self.augment(x))
        return v1, v2

    def _memory(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def train_epoch(self, dataset, *, on_step: Callable[[StepInfo], None] | None = None) -> dict[str, Any]:
        """One epoch (the next one: ``self.epoch + 1``); returns its metrics and appends them to history.

        ``dataset`` has ``len()`` and ``load(indices) -> (uint8 tiles, labels or None)``.
        """
        epoch = self.epoch + 1
        order = self.epoch_order(len(dataset), epoch)
        for m in self._trained_modules():
            m.train()
        if self.byol is not None:
            self.byol.target_backbone.train()
            self.byol.target_projector.train()
        losses, correct, seen, start = [], 0, 0, time.perf_counter()
        for i, idx in enumerate(order):
            t0 = time.perf_counter()
            tiles, labels = dataset.load(idx)
            v1, v2 = self._views(tiles, epoch, i)
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ):
                if self.byol is None:
                    y = torch.from_numpy(labels).to(self.device)
                    logits = self.net(self._memory(v1))
                    loss = F.cross_entropy(logits.float(), y)
                    correct += int((logits.argmax(1) == y).sum())
                else:
                    loss = self.byol.loss(self._memory(v1), self._memory(v2), self.net)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.step += 1
            if self.byol is not None:
                self.byol.update_target(self.step / max(self.total_steps, 1))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at epoch {epoch} step {i + 1}; lower --lr or use --precision fp32"
                )
            losses.append(value)
            seen += len(idx)
            if on_step is not None:
                rate = len(idx) * self.world_size / max(time.perf_counter() - t0, 1e-9)
                on_step(StepInfo(epoch, i + 1, len(order), value, rate))
        seconds = time.perf_counter() - start
        self.epoch = epoch
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "loss_first_step": losses[0] if losses else None,
            "loss_last_step": losses[-1] if losses else None,
            "steps": len(order),
            "lr_end": self.lr_at(self.step),
            "seconds": round(seconds, 3),
            "images_per_s": round(seen * self.world_size / max(seconds, 1e-9), 3),
        }
        if self.byol is None:
            metrics["train_accuracy"] = correct / max(seen, 1)
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def precise_batchnorm(self, dataset, *, max_images: int = BN_IMAGES) -> int:
        """Re-estimate every BatchNorm's running statistics of the backbone on clean (unaugmented)
        training images, evenly spaced over the dataset; returns how many were used.

        Training only ever normalises with batch statistics; the running averages (momentum 0.1) are
        what evaluation and ``segment`` use, and after a few steps they are still near their defaults,
        which lets SRENet's activations reach ~1e9 by layer 4 (measured: a 1-epoch run's features
        overflowed segment's float16 store). Running statistics never enter a training step, so this
        leaves the optimisation, and resumed runs, exactly as they were.
        """
        from equislide.models.calibration import recalibrate_batchnorm

        n = len(dataset)
        picks = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(np.int64))
        batch = self.recipe.batch_size
        batches = (
            self._memory(
                normalise(to_unit(torch.from_numpy(dataset.load(picks[s : s + batch])[0]).to(self.device)))
            )
            for s in range(0, len(picks), batch)
        )
        with torch.autocast(
            self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
        ):
            recalibrate_batchnorm(self.model, batches)
        return len(picks)

    # --- state --------------------------------------------------------------------------------

    def _named_modules_for_state(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"model": self.model}
        if self.byol is not None:
            mods.update(
                projector=self.byol.projector,
                predictor=self.byol.predictor,
                target_backbone=self.byol.target_backbone,
                target_projector=self.byol.target_projector,
            )
        return mods

    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor a resumed run needs: weights and buffers of each module, SGD momentum."""
        out: dict[str, Tensor] = {}
        for prefix, mod in self._named_modules_for_state().items():
            for k, t in mod.state_dict().items():
                out[f"{prefix}/{k}"] = t.detach().to("cpu", copy=True).contiguous()
        for i, p in enumerate(self.optimizer.param_groups[0]["params"]):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"optim/{i}"] = buf.detach().to("cpu", copy=True).contiguous()
        return out

    def load_state_tensors(
        self, tensors: Mapping[str, Tensor], *, epoch: int, step: int, history: list
    ) -> None:
        """Restore :meth:`state_tensors` (strict: every module's tensors must match exactly).

        Raises:
            KeyError, RuntimeError: the tensors belong to another network (the caller words it).
        """
        for prefix, mod in self._named_modules_for_state().items():
            own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
            mod.load_state_dict(own, strict=True)
        params = self.optimizer.param_groups[0]["params"]
        for i, p in enumerate(params):
            buf = tensors.get(f"optim/{i}")
            if buf is not None:
                if buf.shape != p.shape:
                    raise RuntimeError(
                        f"momentum buffer {i} has shape {list(buf.shape)}, parameter {list(p.shape)}"
                    )
                self.optimizer.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype).clone()
        extra = sorted(k for k in tensors if k.startswith("optim/") and int(k.split("/")[1]) >= len(params))
        if extra:
            raise RuntimeError(f"momentum buffers {extra[:3]} have no parameter")
        self.epoch, self.step, self.history = int(epoch), int(step), list(history)

    def backbone_for_saving(self) -> nn.Module:
        """The trained backbone rebuilt from its config (``impl="auto"``, as ``segment`` builds it) on
        the CPU, holding exactly the trained tensors: no BYOL head, no DDP wrapper."""
        model = create_model(self.recipe.arch, **self.model_kwargs)
        model.load_state_dict({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, strict=True)
        return model.eval()


# --- evaluation -----------------------------------------------------------------------------------


def _batches(dataset, batch: int):
    for s in range(0, len(dataset), batch):
        yield dataset.load(range(s, min(len(dataset), s + batch)))


def _rotate(x: Tensor, degrees: int) -> Tensor:
    if degrees % 90 == 0:
        return torch.rot90(x, (degrees // 90) % 4, dims=(2, 3))
    from kornia.geometry.transform import rotate

    angle = torch.full((x.shape[0],), float(degrees), device=x.device, dtype=x.dtype)
    return rotate(x, angle, padding_mode="reflection")


@torch.no_grad()
def rotated_accuracy(
    model: nn.Module, dataset, *, device: torch.device, angles=VAL_ANGLES, batch: int = 32
) -> dict[str, float]:
    """Classification accuracy on ``dataset`` rotated by each angle (``val_accuracy_<angle>``).

    Rotations by multiples of 90 degrees are exact pixel permutations; others are bilinear with
    reflected borders, so no black corners tell the network how the image was turned.
    """
    model.eval()
    right = dict.fromkeys(angles, 0)
    total = 0
    for tiles, labels in _batches(dataset, batch):
        x = normalise(to_unit(torch.from_numpy(tiles).to(device)))
        y = torch.from_numpy(labels).to(device)
        for a in angles:
            right[a] += int((model(_rotate(x, a)).argmax(1) == y).sum())
        total += len(y)
    return {f"val_accuracy_{a}": right[a] / max(total, 1) for a in angles}


@torch.no_grad()
def pooled_features(
    model: nn.Module, dataset, *, device: torch.device, batch: int = 32
) -> tuple[Tensor, Tensor]:
    """L2-normalised pooled layer-4 features of every image and their labels."""
    model.eval()
    feats, labels = [], []
    for tiles, y in _batches(dataset, batch):
        x = normalise(to_unit(torch.from_numpy(tiles).to(device)))
        f = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(torch.from_numpy(y))
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(features: Tensor, labels: Tensor, *, k: int = 20) -> float:
    """Leave-one-out k-NN accuracy (cosine similarity, similarity-weighted votes) of labelled features:
    how well the learned representation separates the classes without training a classifier."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    sim = features @ features.T
    sim.fill_diagonal_(-float("inf"))
    top, idx = sim.topk(k, dim=1)
    n_classes = int(labels.max()) + 1
    votes = torch.zeros(n, n_classes).scatter_add_(1, labels[idx], top.clamp_min(0) + 1e-6)
    return float((votes.argmax(1) == labels).float().mean())
