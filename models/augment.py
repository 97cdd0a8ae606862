"""Training augmentations (kornia), applied to whole batches on the training device.

kornia rather than torchvision: torchvision's wheels are built against one torch each, and the CPU
torch this project pins has none that imports (``operator torchvision::nms does not exist``); kornia is
pure Python on torch and runs the same ops batched on CPU or GPU.

Every random draw is made under :func:`seeded` from ``(seed, epoch, step)`` alone, so a run resumed
at an epoch boundary sees exactly the augmentations an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "derive_seed",
    "normalise",
    "seeded",
    "ssl_augment",
    "supervised_augment",
    "to_unit",
]

#: The SRE-Conv authors' NCT-CRC recipe: colour jitter, grayscale, blur, translation up to 10 %.
JITTER = (0.4, 0.4, 0.4, 0.1)
GRAYSCALE_P = 0.2
BLUR_P = 0.2
TRANSLATE = 0.1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``seed, epoch, step, stream``) through numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG (and the device's) seeded with ``seed`` for the block, restored after it:
    kornia draws its parameters from the global generator."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if (device.type == "cuda")
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def to_unit(tiles: Tensor) -> Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` in [0, 1] (kornia's range)."""
    return tiles.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: Tensor) -> Tensor:
    """[0, 1] images -> the network's input (:data:`equislide.models.NORMALISATION`: mean 0.5, std 0.25)."""
    from equislide.models.extract import NORMALISATION

    return (x - NORMALISATION["mean"][0]) / NORMALISATION["std"][0]


def _blur(size: int):
    import kornia.augmentation as K

    k = max(3, (size // 20) | 1)  # about 10 % of the side, odd, as the SSL recipes size it
    return K.RandomGaussianBlur((k, k), (0.1, 2.0), p=BLUR_P)


def supervised_augment(size: int, *, rotation: bool = False) -> nn.Module:
    """Colour jitter (0.4, 0.4, 0.4, 0.1), grayscale 0.2, blur 0.2, translation up to 10 % (reflected
    borders); with ``rotation``, a rotation by any angle as well (the baseline asking whether
    augmentation alone gives rotation invariance). Input and output: [0, 1] ``(N, 3, size, size)``."""
    import kornia.augmentation as K

    return nn.Sequential(
        K.ColorJitter(*JITTER, p=0.8),
        K.RandomGrayscale(p=GRAYSCALE_P),
        _blur(size),
        K.RandomAffine(
            degrees=180.0 if rotation else 0.0,
            translate=(TRANSLATE, TRANSLATE),
            padding_mode="reflection",
            p=1.0,
        ),
    )


def ssl_augment(size: int) -> nn.Module:
    """One self-supervised view: a random resized crop (20-100 % of the tile, back to ``size``), the
    supervised colour recipe and translation. No rotation: an equivariant network needs none, and a
    baseline trained this way is not given rotation invariance it did not earn."""
    import kornia.augmentation as K

    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),
        K.ColorJitter(*JITTER, p=0.8),
        K.RandomGrayscale(p=GRAYSCALE_P),
        _blur(size),
    )
