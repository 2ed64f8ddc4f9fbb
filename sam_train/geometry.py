"""SAM's input geometry: resize so the longest side equals the model's input size, pad bottom/right.

Kept in one place because the predictor, the data pipeline and the data engine must agree on it
to the pixel: a point or box in original-image pixels maps to model-input pixels by the same scale.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after scaling so that max(h, w) == long_side, rounded as Meta's SAM does."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an H x W x C uint8 image with PIL bilinear (antialiased), as SAM was trained."""
    h, w = longest_side_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Map (..., 2) x/y pixel coordinates of an original_size=(H, W) image into model-input pixels."""
    new_h, new_w = longest_side_shape(original_size[0], original_size[1], long_side)
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] *= new_w / original_size[1]
    coords[..., 1] *= new_h / original_size[0]
    return coords


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Map N x 4 XYXY boxes of an original_size=(H, W) image into model-input pixels."""
    return scale_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, long_side).reshape(-1, 4)
