"""Rotation of inputs and label maps: exact quarter turns, direction, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from equislide.tiling import rotate_image, rotate_labels, unrotate_labels


@pytest.fixture()
def image() -> np.ndarray:
    """A non-symmetric (96, 96, 3) image: smooth gradients plus a bright off-centre square."""
    rows, cols = np.mgrid[:96, :96]
    img = np.stack([cols * 2, rows * 2, (rows * cols) % 200], axis=-1).astype(np.uint8)
    img[10:30, 60:80] = 250
    return img


@pytest.fixture()
def labels() -> np.ndarray:
    """(120, 120) label map of large blocks (labels 0..5), not symmetric under any rotation."""
    rows, cols = np.mgrid[:120, :120]
    lab = (rows // 40) * 2 + (cols // 60)
    lab[(rows - 30) ** 2 + (cols - 85) ** 2 < 15**2] = 5
    return lab.astype(np.int32)


@pytest.mark.parametrize("k", [1, 2, 3, -1, 4])
def test_quarter_turns_are_exact(image: np.ndarray, labels: np.ndarray, k: int) -> None:
    assert np.array_equal(rotate_image(image, 90.0 * k), np.rot90(image, k))
    assert np.array_equal(rotate_labels(labels, 90.0 * k), np.rot90(labels, k))
    back, valid = unrotate_labels(np.rot90(labels, k), 90.0 * k)
    assert np.array_equal(back, labels) and valid.all()


def test_direction_matches_rot90(image: np.ndarray) -> None:
    """Counter-clockwise as displayed: the top-right square moves to the top-left."""
    near = rotate_image(image, 89.99).astype(int)
    exact = np.rot90(image).astype(int)
    assert np.abs(near - exact)[2:-2, 2:-2].mean() < 1.0
    assert np.abs(near - np.rot90(image, -1).astype(int)).mean() > 20
    assert rotate_image(image, 90.0)[96 - 80 : 96 - 60, 10:30].min() == 250


def test_interpolated_rotation_keeps_shape_and_fills(image: np.ndarray) -> None:
    out = rotate_image(image, 30.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[0, 0] == 255).all() and (out[-1, -1] == 255).all()
    assert (rotate_image(image, 30.0, fill=0)[0, 0] == 0).all()
    centre = out[40:56, 40:56].astype(int)  # the centre stays the centre
    assert np.abs(centre - rotate_image(image, 30.0, fill=0)[40:56, 40:56]).max() == 0
    assert rotate_image(image[..., 0], 45.0).shape == (96, 96)


def test_non_square_quarter_turn_keeps_size() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    out = rotate_image(img, 90.0)
    assert out.shape == (40, 60, 3)
    assert (out[:, :5] == 255).all()  # parts from outside the frame are filled


@pytest.mark.parametrize("degrees", [30.0, 60.0, 135.0, -20.0])
def test_label_round_trip(labels: np.ndarray, degrees: float) -> None:
    forward = rotate_labels(labels, degrees)
    assert forward.dtype == labels.dtype and (forward[0, 0] == -1)
    back, valid = unrotate_labels(forward, degrees)
    inside = valid & (back != -1)
    assert inside.mean() > 0.5
    agreement = (back[inside] == labels[inside]).mean()
    assert agreement >= 0.98
    assert (back[~valid] == -1).all()


def test_image_round_trip_at_30() -> None:
    rows, cols = np.mgrid[:96, :96]
    image = np.stack([cols * 2, rows * 2, 255 - rows - cols], axis=-1).astype(np.uint8)
    back = rotate_image(rotate_image(image, 30.0), -30.0).astype(int)
    centre = (rows - 47.5) ** 2 + (cols - 47.5) ** 2 < 30**2
    # Smooth gradients come back within rounding: nothing moved, flipped or turned the wrong way.
    assert np.abs(back - image)[centre].max() <= 2


def test_bad_arguments(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="integer"):
        rotate_labels(labels.astype(float), 30.0)
    with pytest.raises(ValueError, match="fill"):
        rotate_labels(labels.astype(np.uint8), 30.0)  # -1 does not fit uint8
    assert rotate_labels(labels.astype(np.uint8), 30.0, fill=255)[0, 0] == 255
    with pytest.raises(ValueError, match="finite"):
        rotate_image(np.zeros((4, 4, 3), np.uint8), float("nan"))
    with pytest.raises(ValueError, match="H, W"):
        unrotate_labels(np.zeros((4, 4, 2), np.int32), 30.0)
