"""The click of the interactive-segmentation evaluation protocol (RITM / SAM): the centre of the largest error.

It lives with the prompts because three places click this way: the evaluation (every click),
the simulated annotator of the data engine, and, as an option (`prompts.centre_click_prob`),
training, whose clicks otherwise fall uniformly in the error region as in the SAM paper.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from sam_train.model.prompt_encoder import NEGATIVE_LABEL, POSITIVE_LABEL

# 4-connected regions within each mask of an N x H x W stack, never across masks.
_WITHIN_MASK = np.zeros((3, 3, 3), dtype=bool)
_WITHIN_MASK[1] = ndimage.generate_binary_structure(2, 1)


def next_click(predicted: torch.Tensor, targets: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's next click for each of N masks: (N x 2 input pixels, N labels: 1 positive, 0 negative).

    `predicted` and `targets` are N x H x W bool. The click lands on the cell of the largest (by
    area) 4-connected error region that is farthest from the region's boundary, the grid border
    counting as boundary; ties go to the first cell in raster order. A perfect prediction gets a
    positive click at the centre of the target (confirming the mask asks the model to keep it);
    an empty target predicted empty gets a negative click at the centre of the grid.
    """
    target = targets.cpu().numpy()
    pred = predicted.cpu().numpy()
    missed, spurious = target & ~pred, pred & ~target  # N x H x W each
    perfect = ~(missed | spurious).any(axis=(1, 2))
    missed[perfect] = target[perfect]
    spurious[perfect & ~target.any(axis=(1, 2))] = True
    missed_ids, num_missed = ndimage.label(missed, _WITHIN_MASK)
    spurious_ids, num_spurious = ndimage.label(spurious, _WITHIN_MASK)
    regions = np.where(spurious, spurious_ids + num_missed, missed_ids)  # N x H x W: 0, missed ids, spurious ids
    count = num_missed + num_spurious
    area = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[regions] = np.arange(len(target))[:, None, None]  # each region lies in one mask: every write agrees
    owner = owner[1:]
    # Per mask, the largest region (the smallest id among equals): the last of each mask's run once sorted.
    order = np.lexsort((-np.arange(count), area, owner))
    largest = order[np.append(owner[order][1:] != owner[order][:-1], True)] + 1  # N region ids, in mask order
    cells = np.empty((len(target), 2), dtype=np.int64)  # (x, y) grid cells
    for i, region in enumerate(largest):
        inside = regions[i] == region
        y0, x0 = inside.any(1).argmax(), inside.any(0).argmax()  # the region's top-left corner
        y1, x1 = len(inside) - inside.any(1)[::-1].argmax(), inside.shape[1] - inside.any(0)[::-1].argmax()
        crop = np.pad(inside[y0:y1, x0:x1], 1)  # the zero rim: the box, hence the grid border, is a boundary
        y, x = np.unravel_index(ndimage.distance_transform_edt(crop).argmax(), crop.shape)
        cells[i] = (x0 + x - 1, y0 + y - 1)
    labels = np.where(largest <= num_missed, POSITIVE_LABEL, NEGATIVE_LABEL)
    points = (torch.from_numpy(cells).float() + 0.5) * stride
    return points.to(targets.device), torch.from_numpy(labels).to(targets.device)
