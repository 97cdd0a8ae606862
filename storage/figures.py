"""The rotation study's pictures: label maps side by side, and agreement against angle.

- :func:`write_label_strip`: one sample's cluster maps, one per angle, each rotated back into the
  0-degree frame, in a row (the picture that shows what equivariance buys); rows of several backbones
  stack into one figure with :func:`stack_strips`.
- :func:`write_angle_plot`: kappa and Dice against angle, one line per backbone (matplotlib, Agg).

Written atomically (:func:`equislide.files.atomic_path`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from equislide.files import atomic_path
from equislide.storage.labels import label_color

__all__ = ["colour_labels", "stack_strips", "write_angle_plot", "write_label_strip"]


def colour_labels(labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 of 0-based cluster labels (palette colour of label + 1); invalid pixels white."""
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    lut = np.asarray([label_color(v + 1) for v in range(max(top, 0) + 1)], np.uint8)
    out = lut[np.clip(labels, 0, None)]
    keep = labels >= 0 if valid is None else (np.asarray(valid) & (labels >= 0))
    out[~keep] = 255
    return out


def write_label_strip(
    path: str | Path,
    maps: Sequence[np.ndarray],
    *,
    valid: Sequence[np.ndarray] | None = None,
    titles: Sequence[str] = (),
    tile: int = 160,
    label: str = "",
) -> Path:
    """Save label maps side by side, each resized (nearest) to ``tile`` px, titles above, ``label`` left."""
    from PIL import Image, ImageDraw

    head, left, gap = 16, (110 if label else 0), 4
    width = left + len(maps) * (tile + gap)
    canvas = Image.new("RGB", (width, head + tile + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if label:
        draw.text((4, head + tile // 2 - 6), label, fill=(0, 0, 0))
    for i, m in enumerate(maps):
        rgb = colour_labels(m, None if valid is None else valid[i])
        picture = Image.fromarray(rgb).resize((tile, tile), Image.NEAREST)
        x = left + i * (tile + gap)
        canvas.paste(picture, (x, head))
        if i < len(titles):
            draw.text((x + 2, 2), titles[i], fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def stack_strips(path: str | Path, strips: Sequence[str | Path]) -> Path:
    """Stack strip PNGs (:func:`write_label_strip`) vertically into one picture."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in strips]
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images)), (255, 255, 255))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def write_angle_plot(
    path: str | Path, series: Mapping[str, Mapping[float, tuple[float, float]]], *, title: str = ""
) -> Path:
    """Kappa (left) and Dice (right) against angle, one line per backbone, mean ± std over samples.

    Args:
        path: The PNG.
        series: ``{backbone: {angle: (mean, std)}}`` for kappa under key ``"<backbone>"`` and for Dice
            under ``"<backbone> dice"``.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("kappa", "dice"), strict=True):
        for name, points in series.items():
            is_dice = name.endswith(" dice")
            if is_dice != (metric == "dice"):
                continue
            angles = sorted(points)
            mean = np.asarray([points[a][0] for a in angles])
            std = np.asarray([points[a][1] for a in angles])
            line = ax.plot(angles, mean, marker="o", label=name.removesuffix(" dice"))[0]
            ax.fill_between(angles, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("rotation (degrees)")
        ax.set_ylabel("Cohen's kappa" if metric == "kappa" else "mean Dice")
        ax.set_xticks(range(0, 361, 30))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
