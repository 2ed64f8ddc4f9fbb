"""Click-based evaluation (the RITM / SAM protocol): mIoU after k clicks and with a box, and IoU-head calibration.

Every click goes to the centre of the largest error region of the current prediction (its point
farthest from the region's boundary): a missed region gets a positive click, a spurious one a
negative click; the first click, from an empty prediction, is therefore the centre of the
object. As SAM's predictor is used interactively, each later click also feeds the previously
chosen mask's low-res logits back as the mask prompt. Masks are compared on the loss grid,
whose cells are `stride` input pixels wide; clicks are (x, y) input pixels at cell centres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam_train.losses import actual_iou
from sam_train.model import Sam
from sam_train.prompts.protocol import next_click
from sam_train.prompts.simulate import mask_boxes


@dataclass(frozen=True)
class ClickEvaluation:
    """Per-mask results of one batch: `batch_metrics` averages them, `visualize.draw_session` draws them."""

    iou: dict[str, torch.Tensor]  # metric name (miou_1click, miou_1click_oracle, ..., miou_box) -> N real IoUs
    predicted_iou: torch.Tensor  # P: the IoU head's score of each reported chosen mask (every click count, and the box)
    real_iou: torch.Tensor  # P: the real IoU of those masks
    clicks: torch.Tensor  # N x K x 2 input pixels, K the largest click count
    click_labels: torch.Tensor  # N x K: 1 positive, 0 negative
    masks: torch.Tensor  # N x H x W bool: the chosen mask after the last click


@torch.no_grad()
def evaluate_clicks(
    model: Sam, embeddings: torch.Tensor, targets: torch.Tensor, image_index: torch.Tensor, clicks: Sequence[int]
) -> ClickEvaluation:
    """Run the click protocol (reporting after each count in `clicks`) and the tight box over all N masks at once.

    `embeddings` B x C x h x w, `targets` N x H x W bool on the loss grid, `image_index` N. After
    one click the model's answer is the highest-scored of its 3 masks and the oracle the best of
    those 3; after more clicks the answer is the single-mask output (what training supervises
    with several points) and the oracle the best of all 4 outputs. The box uses the single output.
    """
    n, grid = len(targets), targets.shape[-2:]
    stride = model.image_size // targets.shape[-1]
    encoder, decoder = model.prompt_encoder, model.mask_decoder
    image_pe = encoder.get_dense_pe()
    rows = torch.arange(n, device=targets.device)
    truth = targets[:, None].float()  # N x 1 x H x W
    points = torch.zeros(n, 0, 2, device=targets.device)
    point_labels = torch.zeros(n, 0, dtype=torch.long, device=targets.device)
    predicted = torch.zeros_like(targets)
    mask_prompt = None
    iou: dict[str, torch.Tensor] = {}
    scores_chosen, real_chosen = [], []
    for k in range(1, max(clicks, default=0) + 1):
        point, label = next_click(predicted, targets, stride)
        points = torch.cat([points, point[:, None]], dim=1)
        point_labels = torch.cat([point_labels, label[:, None]], dim=1)
        sparse = encoder.embed_points(points, point_labels, pad=True)  # points only: SAM appends a padding point
        dense = encoder.no_mask_dense(n) if mask_prompt is None else encoder.embed_masks(mask_prompt)
        # All 4 outputs: N x 4 x h x w logits, N x 4 scores.
        logits, scores = decoder.predict_all_masks(embeddings, image_pe, sparse, dense, image_index)
        on_grid = _resize(logits, grid)
        real = actual_iou(on_grid, truth)  # N x 4
        if k == 1:
            chosen, oracle = scores[:, 1:].argmax(1) + 1, real[:, 1:].max(1).values
        else:
            chosen, oracle = torch.zeros_like(rows), real.max(1).values
        if k in clicks:
            iou[f"miou_{k}click"], iou[f"miou_{k}click_oracle"] = real[rows, chosen], oracle
            scores_chosen.append(scores[rows, chosen])
            real_chosen.append(real[rows, chosen])
        predicted = on_grid[rows, chosen] > model.mask_threshold
        mask_prompt = _resize(logits[rows, chosen][:, None], encoder.mask_input_size)

    sparse = encoder.embed_boxes(mask_boxes(targets, stride))
    logits, scores = decoder(embeddings, image_pe, sparse, encoder.no_mask_dense(n), False, image_index)  # N x 1 x h x w
    iou["miou_box"] = actual_iou(_resize(logits, grid), truth)[:, 0]
    scores_chosen.append(scores[:, 0])
    real_chosen.append(iou["miou_box"])
    return ClickEvaluation(iou, torch.cat(scores_chosen), torch.cat(real_chosen), points, point_labels, predicted)


def batch_metrics(result: ClickEvaluation) -> dict[str, torch.Tensor]:
    """Means over the batch: every mIoU, and `iou_mae`, the IoU head's mean absolute error on the chosen masks.

    The IoU head's correlation with the real IoU is not a mean over batches: the caller
    accumulates (`predicted_iou`, `real_iou`) pairs over the whole set for it.
    """
    metrics = {name: values.mean() for name, values in result.iou.items()}
    metrics["iou_mae"] = (result.predicted_iou - result.real_iou).abs().mean()
    return metrics


def _resize(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
