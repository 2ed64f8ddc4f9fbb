"""Simulated interactive prompts, as in the SAM paper's training recipe (Appendix A).

A training "session" for each mask: a first prompt (a point drawn uniformly inside the mask, or
its box with noise), then corrective clicks drawn uniformly from the error region of the previous
prediction (a missed pixel gives a positive click, a spurious one a negative click), with the
previous low-res logits fed back as the mask prompt, plus rounds that add no click and only feed
the logits back. All functions work on whole batches of masks at once, on any device.

Off the paper's recipe, `centre_click_prob` puts a share of the points where the evaluation
protocol (and a person) clicks: the centre of the largest error region (`protocol.next_click`).

Coordinates are (x, y) in model-input pixels; masks are on the loss grid, whose cells are
`stride` input pixels wide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sam_train.prompts.protocol import next_click


@dataclass(frozen=True)
class PromptConfig:
    """The schedule of one simulated session (see `configs/prompts/`)."""

    point_prob: float  # first prompt: a point with this probability, else a noisy box
    box_noise_std: float  # box corner noise, as a fraction of the box side
    box_noise_max: float  # ... and at most this many input pixels
    corrective_rounds: int  # rounds that add one corrective click each
    empty_rounds: int  # rounds that add no click: one at a random place among the corrections, the rest at the end
    gt_click_prob: float  # sam2: a corrective click drawn from the ground truth instead of the error region
    centre_click_prob: float  # a point or click at the centre of the largest error region instead of uniform
    multimask_single_point: bool  # predict 3 masks where the prompt is a single point (ambiguous)
    checkpoint_rounds: bool  # recompute each round's decoder in the backward pass instead of storing it
    loss_rounds: int  # rounds that carry the loss: 0 all; else the first and this many - 1 drawn among the rest
    early_corrective_rounds: int  # a curriculum: sessions with this many corrective clicks instead ...
    early_until: float  # ... over this first fraction of training (0: none)

    def __post_init__(self) -> None:
        # One graded round would leave the mask-prompt encoder, used only from round 2 on, without a gradient.
        if self.loss_rounds and not 2 <= self.loss_rounds <= self.rounds:
            raise ValueError(f"prompts.loss_rounds must be 0 (all) or 2..{self.rounds}, got {self.loss_rounds}")
        if not 0.0 <= self.early_until < 1.0:
            raise ValueError(f"prompts.early_until is a fraction of training in [0, 1), got {self.early_until}")
        if self.early_until and self.early_corrective_rounds < 0:
            raise ValueError(f"prompts.early_corrective_rounds must be >= 0, got {self.early_corrective_rounds}")
        early_rounds = 1 + self.early_corrective_rounds + self.empty_rounds
        if self.early_until and self.loss_rounds and self.loss_rounds > early_rounds:
            raise ValueError(
                f"prompts.loss_rounds ({self.loss_rounds}) exceeds the early sessions' {early_rounds} rounds"
            )

    @property
    def rounds(self) -> int:
        return 1 + self.corrective_rounds + self.empty_rounds

    def at_progress(self, progress: float) -> PromptConfig:
        """The sessions of a step this far (0 to 1) into training: the early, shorter ones of a curriculum
        before `early_until`, then these. Short sessions cost a fraction of a step (the decoder's rounds are
        most of it), so a curriculum buys many more steps that train the first prompt, and keeps the full
        session, the one the click evaluation asks for, for the end."""
        if progress < self.early_until:
            return replace(self, corrective_rounds=self.early_corrective_rounds, early_until=0.0)
        return self


def round_schedule(cfg: PromptConfig, generator: torch.Generator | None = None) -> list[str]:
    """Kinds of the rounds after the first: "click" or "empty" (logits fed back, no new click)."""
    kinds = ["click"] * cfg.corrective_rounds
    if cfg.empty_rounds:
        device = generator.device if generator is not None else None
        position = int(torch.randint(0, cfg.corrective_rounds + 1, (1,), generator=generator, device=device))
        kinds.insert(position, "empty")
        kinds += ["empty"] * (cfg.empty_rounds - 1)
    return kinds


def loss_round_flags(cfg: PromptConfig, generator: torch.Generator | None = None) -> list[bool]:
    """Which of the session's rounds carry the loss: all, or (`loss_rounds` k) the first and k - 1 of the
    later ones drawn uniformly. The others run without a gradient, only to bring the later rounds their
    clicks and mask prompts: the session still reaches its last click at a fraction of the backward."""
    if not cfg.loss_rounds:
        return [True] * cfg.rounds
    device = generator.device if generator is not None else None
    later = torch.randperm(cfg.rounds - 1, generator=generator, device=device)[: cfg.loss_rounds - 1] + 1
    chosen = set(later.tolist())
    return [i == 0 or i in chosen for i in range(cfg.rounds)]


def sample_pixels(masks: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly from each N x H x W mask -> (N x 2 (x, y) cell indices, N bool: mask non-empty)."""
    scores = torch.rand(masks.shape, generator=generator, device=masks.device) * masks  # empty cells score 0
    flat = scores.flatten(1).argmax(1)
    width = masks.shape[-1]
    cells = torch.stack([flat % width, torch.div(flat, width, rounding_mode="floor")], dim=1)
    return cells, masks.flatten(1).any(1)


def cell_to_pixel(cells: torch.Tensor, stride: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grid cells -> input-pixel coordinates, uniformly inside the cell (the cell's pixels are all in the mask)."""
    offset = torch.rand(cells.shape, generator=generator, device=cells.device) * stride
    return cells.float() * stride + offset


def first_point(
    masks: torch.Tensor, stride: int, centre_prob: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A positive point inside each mask, N x 2 input pixels: uniform, or with `centre_prob` at the
    centre of the mask's largest connected piece (the evaluation's first click)."""
    cells, _ = sample_pixels(masks, generator)
    points = cell_to_pixel(cells, stride, generator)
    positive = torch.ones(len(masks), dtype=torch.long, device=masks.device)
    return _centre_some(points, positive, torch.zeros_like(masks), masks, stride, centre_prob, generator)[0]


def mask_boxes(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """Tight XYXY box of each N x H x W mask, in input pixels (cell edges)."""
    rows, cols = masks.any(2), masks.any(1)  # N x H, N x W
    index_h = torch.arange(masks.shape[1], device=masks.device)
    index_w = torch.arange(masks.shape[2], device=masks.device)
    big = masks.shape[1] + masks.shape[2]
    y0 = torch.where(rows, index_h, big).min(1).values
    y1 = torch.where(rows, index_h, -1).max(1).values + 1
    x0 = torch.where(cols, index_w, big).min(1).values
    x1 = torch.where(cols, index_w, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float() * stride


def noisy_boxes(
    masks: torch.Tensor, stride: int, cfg: PromptConfig, image_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each mask's box with Gaussian corner noise of std `box_noise_std` x side, capped at `box_noise_max` px."""
    boxes = mask_boxes(masks, stride)
    sides = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # w, h, w, h
    noise = torch.randn(boxes.shape, generator=generator, device=masks.device) * cfg.box_noise_std * sides
    noisy = boxes + noise.clamp(-cfg.box_noise_max, cfg.box_noise_max)
    noisy = noisy.clamp(0, image_size)
    # Keep corners ordered: a box whose noise crossed its corners becomes degenerate, not inverted.
    return torch.cat([torch.minimum(noisy[:, :2], noisy[:, 2:]), torch.maximum(noisy[:, :2], noisy[:, 2:])], dim=1)


def corrective_clicks(
    predicted: torch.Tensor,
    targets: torch.Tensor,
    stride: int,
    gt_click_prob: float = 0.0,
    centre_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per mask from its error region: (N x 2 input pixels, N labels).

    A missed pixel (false negative) gives a positive click (label 1), a spurious one (false
    positive) a negative click (label 0). With `gt_click_prob` (sam2) a click is instead drawn
    from the target as a positive one. With `centre_prob` an error click goes to the centre of
    the largest error region instead. A perfect prediction gets a positive click inside the
    target, which changes nothing the model should undo.
    """
    errors = predicted ^ targets
    use_gt = torch.rand(targets.shape[0], generator=generator, device=targets.device) < gt_click_prob
    use_gt = use_gt | ~errors.flatten(1).any(1)
    region = torch.where(use_gt[:, None, None], targets, errors)
    cells, _ = sample_pixels(region, generator)
    inside_target = targets[torch.arange(len(targets), device=targets.device), cells[:, 1], cells[:, 0]]
    points, labels = cell_to_pixel(cells, stride, generator), inside_target.long()
    return _centre_some(points, labels, predicted, targets, stride, centre_prob, generator, keep=use_gt)


def _centre_some(
    points: torch.Tensor,
    labels: torch.Tensor,
    predicted: torch.Tensor,
    targets: torch.Tensor,
    stride: int,
    centre_prob: float,
    generator: torch.Generator | None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each (point, label) by the protocol's click with probability `centre_prob` (never where `keep`)."""
    if centre_prob <= 0.0:
        return points, labels
    centred = torch.rand(len(points), generator=generator, device=points.device) < centre_prob
    if keep is not None:
        centred &= ~keep
    if not centred.any():
        return points, labels
    protocol_points, protocol_labels = next_click(predicted[centred], targets[centred], stride)
    points, labels = points.clone(), labels.clone()
    points[centred], labels[centred] = protocol_points, protocol_labels
    return points, labels
