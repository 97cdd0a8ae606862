"""BatchNorm recalibration: give an untrained or transferred backbone sane activation scales.

Radial SRE kernels have a large DC gain, so with default BatchNorm statistics (mean 0, var 1) an
untrained SRENet's activations grow by orders of magnitude per stage (~1e7 by layer 4 on real
H&E) and overflow float16 feature stores. Re-estimating each BatchNorm's running statistics on a
few images of the cohort fixes the scale without touching learned weights; it keeps equivariance,
because per-channel means and variances over whole maps are invariant to rotating the images.

What the statistics mean: BatchNorm ``k``'s running mean and (unbiased) variance are the per-channel
mean and variance of its input over every pixel of every calibration image, computed with every
BatchNorm before ``k`` already fixed at its recalibrated statistics, i.e. exactly the statistics the
network in eval mode meets on those images. They do not depend on how the images are split into
batches (up to float rounding): sums are combined exactly over micro-batches (Chan's pairwise
update of per-batch means and centred sums of squares, in float64), so memory is set by the
micro-batch, not by the number of calibration images. (Before 2026-12 each batch of 8 images was
normalised by its own statistics in training mode and the per-batch statistics were averaged: the
same thing for one batch of everything, in memory proportional to the batch.)

To compute them in one pass per layer rather than one pass of the network's prefix per BatchNorm,
the network is walked step by step and the input of every BatchNorm is kept (in memory while small,
else spilled to ``.npy`` files in a scratch folder) until its statistics are known: every
convolution runs once per image, as in one forward pass. Residual blocks of the ResNet-shaped
backbones and ``nn.Sequential`` chains are walked this way; any other module holding BatchNorms is
calibrated exactly too, by rerunning it once per BatchNorm inside it on its cached input (slower).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_batchnorm"]

#: Bytes of activations one cache keeps in memory before spilling the rest to disk.
MEMORY_BUDGET = 96 * 2**20

Source = Callable[[], Iterator[Tensor]]


class _Stop(Exception):
    """Raised by a hook to end a micro-batch's pass at the BatchNorm being calibrated."""


class _Stats:
    """Per-channel mean and centred sum of squares, combined exactly over micro-batches."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: Tensor) -> None:
        dims = [d for d in range(x.ndim) if d != 1]
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        mean_b = mean.double().cpu().numpy()
        m2_b = var.double().cpu().numpy() * count
        if self.mean is None:
            self.n, self.mean, self.m2 = count, mean_b, m2_b
            return
        total = self.n + count
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * count / total)
        self.n = total

    def fix(self, bn: _BatchNorm, batches: int) -> None:
        if self.mean is None or self.m2 is None:
            raise ValueError("recalibrate_batchnorm needs at least one batch of images")
        assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats
        # Unbiased, as training-mode BatchNorm records it.
        var = self.m2 / max(self.n - 1, 1)
        bn.running_mean.copy_(torch.from_numpy(self.mean))
        bn.running_var.copy_(torch.from_numpy(var))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(batches)
        bn.eval()


class _Cache:
    """Activations of every micro-batch, in memory up to a budget, then as ``.npy`` files.

    Files are read back with ``np.load`` (no memory map), so spilled activations sit in the page
    cache, not in this process's resident set.
    """

    def __init__(self, folder: Path, budget: int) -> None:
        self.folder, self.budget, self.held = folder, budget, 0
        self.items: list[tuple[Tensor | Path, bool, torch.device, torch.dtype]] = []

    def add(self, t: Tensor) -> None:
        nhwc = t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        if self.held + t.numel() * t.element_size() <= self.budget:
            self.held += t.numel() * t.element_size()
            self.items.append((t, nhwc, t.device, t.dtype))
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{uuid.uuid4().hex}.npy"
        # Saved in its own memory layout so that reading it back gives the very same tensor.
        u = (t.permute(0, 2, 3, 1) if nhwc else t.contiguous()).cpu()
        # numpy has no bfloat16 (autocast's dtype): its bits travel as int16.
        np.save(path, (u.view(torch.int16) if u.dtype == torch.bfloat16 else u).numpy())
        self.items.append((path, nhwc, t.device, t.dtype))

    def source(self) -> Source:
        def read() -> Iterator[Tensor]:
            for item, nhwc, device, dtype in self.items:
                if isinstance(item, Tensor):
                    yield item.clone(memory_format=torch.preserve_format)  # a step may work in place
                    continue
                t = torch.from_numpy(np.load(item))
                t = (t.view(dtype) if dtype == torch.bfloat16 else t).to(device)
                yield t.permute(0, 3, 1, 2) if nhwc else t

        return read

    def drop(self) -> None:
        for item, *_ in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.items.clear()


class _Walker:
    """Calibrates the BatchNorms of a network step by step over cached activations."""

    def __init__(self, folder: Path, budget: int) -> None:
        self.folder, self.budget = folder, budget
        self.caches: list[_Cache] = []
        self.batches = 0

    def _keep(self, source: Source, stats: _Stats | None = None, *, barrier: bool = False) -> Source:
        """Run ``source`` once and cache it; a ``barrier`` (a unit's input) frees every older cache."""
        cache = _Cache(self.folder, self.budget)
        count = 0
        for t in source():
            if stats is not None:
                stats.add(t)
            cache.add(t)
            count += 1
        if barrier:
            self.close()
        self.caches.append(cache)
        self.batches = count
        return cache.source()

    def bn(self, bn: _BatchNorm, source: Source) -> Source:
        stats = _Stats()
        pre = self._keep(source, stats)
        stats.fix(bn, self.batches)
        return _map(pre, bn)

    def module(self, m: nn.Module, source: Source) -> Source:
        if isinstance(m, _BatchNorm):
            return self.bn(m, source)
        if not any(isinstance(b, _BatchNorm) for b in m.modules()):
            return _map(source, m)
        from equislide.models.resnet import BasicBlock
        from equislide.models.srenet import SREBasicBlock, SREStem

        if type(m) in (nn.Sequential, SREStem):  # SREStem computes exactly its children in turn
            for child in m:
                source = self.module(child, source)
            return source

        if type(m) in (BasicBlock, SREBasicBlock):
            return self._block(m, source)
        return self.opaque(m, source)

    def _block(self, m: nn.Module, source: Source) -> Source:
        # The blocks' forward, step by step: relu(bn2(conv2(relu(bn1(conv1(pool(x)))))) + shortcut(x)).
        x = self._keep(source, barrier=True)
        main = self.module(m.bn1, _map(_map(x, getattr(m, "pool", nn.Identity())), m.conv1))
        main = self.module(m.bn2, _map(_map(main, m.relu), m.conv2))
        short = self.module(m.shortcut, x)

        def out() -> Iterator[Tensor]:
            for a, b in zip(main(), short(), strict=True):
                yield m.relu(a + b)

        return out  # left lazy: the next unit caches it, and the last one's is never needed

    def opaque(self, m: Callable[[Tensor], Tensor], source: Source, owner: nn.Module | None = None) -> Source:
        """Any module (or call into ``owner``): one pass per BatchNorm inside, each stopped at it."""
        x = self._keep(source, barrier=True)
        owner = owner if owner is not None else m  # type: ignore[assignment]
        bns = [b for b in owner.modules() if isinstance(b, _BatchNorm)]  # type: ignore[union-attr]
        pending = set(map(id, bns))
        while True:
            hit: list[_BatchNorm] = []
            stats = _Stats()

            def stop(bn: nn.Module, args: tuple, hit: list = hit, stats: _Stats = stats) -> None:
                if id(bn) in pending:
                    if hit and hit[0] is not bn:
                        raise RuntimeError("micro-batches reached different BatchNorms first")
                    hit[:1] = [bn]
                    stats.add(args[0])
                    raise _Stop

            handles = [b.register_forward_pre_hook(stop) for b in bns]
            outs = _Cache(self.folder, self.budget)
            self.caches.append(outs)
            count = 0
            try:
                for t in x():
                    count += 1
                    with contextlib.suppress(_Stop):
                        outs.add(m(t))
            finally:
                for h in handles:
                    h.remove()
            if not hit:
                self.batches = count
                return outs.source()
            if outs.items:
                raise RuntimeError("some micro-batches passed a BatchNorm that others stopped at")
            stats.fix(hit[0], count)
            pending.discard(id(hit[0]))

    def close(self) -> None:
        for cache in self.caches:
            cache.drop()


def _map(source: Source, fn: Callable[[Tensor], Tensor]) -> Source:
    def run() -> Iterator[Tensor]:
        for t in source():
            yield fn(t)

    return run


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    layer: int | None = None,
    scratch: str | Path | None = None,
    memory_budget: int = MEMORY_BUDGET,
) -> nn.Module:
    """Set every BatchNorm's running statistics to their exact value over all of ``batches``.

    Args:
        model: A backbone (anything with ``features(x, layer)``, or a plain module).
        batches: Image micro-batches ``(N, 3, H, W)`` as the model will see them (same
            normalisation); their split does not change the result beyond float rounding, only the
            memory used (set by the largest micro-batch).
        layer: If given, run only ``model.features(x, layer)``: BatchNorms after that stage keep
            their default statistics.
        scratch: Folder for activations that do not fit ``memory_budget`` (a private subfolder is
            made and removed); default the system's temporary folder.
        memory_budget: Bytes of activations each cached step keeps in memory.

    Returns:
        ``model``, in eval mode.
    """
    from equislide.models._backbone import Backbone

    inputs = list(batches)
    if not inputs:
        raise ValueError("recalibrate_batchnorm needs at least one batch of images")
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.reset_running_stats()
    model.eval()
    stages = ("layer1", "layer2", "layer3", "layer4")
    walkable = isinstance(model, Backbone) and type(model).features is Backbone.features
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".bn-calibration-") as tmp:
        walker = _Walker(Path(tmp), memory_budget)
        try:
            source: Source = lambda: iter(inputs)  # noqa: E731
            if walkable:
                source = _map(source, model._prepare)
                for part in (model.stem, *(getattr(model, s) for s in stages[: layer or 4])):
                    for unit in part if type(part) is nn.Sequential else (part,):
                        source = walker.module(unit, source)
            elif layer is not None:
                walker.opaque(lambda x: model.features(x, layer), source, model)  # type: ignore[operator]
            else:
                walker.opaque(model, source)
        finally:
            walker.close()
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    return model
