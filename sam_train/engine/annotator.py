"""A simulated person in an assisted labelling tool: reviews model masks, corrects them with clicks, adds missed objects.

It is the only part of the engine that sees ground truth, and it sees it as a person sees the
image: it compares masks with what it wants, never hands ground truth to the loop. Its tool is our
own model, used the way SAM's annotators used theirs: each click goes to the centre of the largest
error region (the evaluation protocol, `sam_train.prompts.protocol.next_click`), the previous answer's
logits are fed back, and after one click the person picks the best of the 3 answers.

Per image it
- keeps a model mask that already matches an object (IoU >= accept_iou),
- corrects a model mask that roughly matches one (IoU >= match_iou): the model's own grid point is
  the free first click, then corrective clicks until the tool's answer is accepted,
- deletes a model mask that matches nothing, and adds missed objects with clicks from scratch,
- paints (takes the exact object) after max_clicks without an acceptable answer,
within a click budget per image, largest objects first, as a person with limited time would.
The work is counted: clicks per corrected or added mask is what falls as the model improves.

In assisted-manual rounds (`label_with_tool`) there are no model masks to review: the person
clicks every object from scratch, and the tool is whatever answers clicks in the labelling UI (our
ML backend, through Label Studio or in-process), which returns its single best mask per click.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from sam_train.engine.records import Prompt
from sam_train.prompts.protocol import next_click
from sam_train.geometry import scale_coords
from sam_train.predictor import SamPredictor


Tool = Callable[[Prompt], np.ndarray]  # the labelling tool: one object's clicks so far -> its H x W bool mask
SESSIONS_PER_BATCH = 6  # objects clicked together: enough to batch the decoder, few enough to stop at the budget


@dataclass(frozen=True)
class AnnotatorConfig:
    """How demanding and how patient the simulated person is (values: configs/engine/*.yaml)."""

    accept_iou: float  # a mask at least this close to the object is accepted as is
    match_iou: float  # a model mask this close to an object is corrected rather than deleted and redrawn
    max_clicks: int  # clicks on one object before the person paints it instead
    clicks_per_image: int  # the person's time per image, in clicks
    min_area: int  # objects smaller than this (pixels) are not labelled
    name: str  # the annotator recorded in provenance


@dataclass
class Review:
    """One image's outcome: which model masks stay, change or go, what is new, and the work it took."""

    kept: list[int]  # model annotation ids accepted as they are
    corrected: dict[int, np.ndarray]  # model annotation id -> the person's H x W bool mask
    deleted: list[int]  # model annotation ids removed
    added: list[np.ndarray]  # new H x W bool masks
    clicks: int  # clicks spent on corrected and added masks
    painted: int  # masks the tool never got right, painted by hand


def review_image(
    predictor: SamPredictor, image: np.ndarray, model_masks: dict[int, np.ndarray],
    model_points: dict[int, tuple[float, float]], truth: list[np.ndarray], cfg: AnnotatorConfig,
) -> Review:
    """Review an image's model masks against the objects the person wants (`truth`, H x W bool each)."""
    truth = [t for t in truth if t.sum() >= cfg.min_area]
    truth.sort(key=lambda t: -int(t.sum()))  # largest first: what a person with limited time does
    ids = list(model_masks)
    match = _match(truth, [model_masks[k] for k in ids], cfg.match_iou)  # truth index -> (model index, IoU)
    kept = [ids[m] for t, (m, iou) in match.items() if iou >= cfg.accept_iou]
    work = [(t, ids[match[t][0]] if t in match else None) for t in range(len(truth))
            if t not in match or match[t][1] < cfg.accept_iou]
    if work:
        predictor.set_image(image)
    corrected, added, clicks, painted = {}, [], 0, 0
    # Objects in batches of a few sessions (one decoder pass per click for the batch), in the
    # person's order, until the click budget runs out: later objects are never clicked at all.
    for start in range(0, len(work), SESSIONS_PER_BATCH):
        batch = work[start : start + SESSIONS_PER_BATCH]
        results = _click_sessions(predictor, [truth[t] for t, _ in batch],
                                  [model_points.get(k) if k is not None else None for _, k in batch], cfg)
        for (_, model_id), (mask, used, was_painted) in zip(batch, results):
            if clicks + used > cfg.clicks_per_image:
                break  # out of time: this and later (smaller) objects stay unlabelled; their model masks go
            clicks += used
            painted += was_painted
            if model_id is None:
                added.append(mask)
            else:
                corrected[model_id] = mask
        else:
            continue
        break
    deleted = [k for k in ids if k not in kept and k not in corrected]
    return Review(kept, corrected, deleted, added, clicks, painted)


def label_with_tool(tool: Tool, truth: list[np.ndarray], cfg: AnnotatorConfig) -> Review:
    """Label an image from scratch, as in SAM's assisted-manual stage: every object is clicked with the
    tool (each click at the centre of the largest error region of the tool's last answer, all of the
    object's clicks sent each time, as a labelling UI does) until its answer is accepted, or painted
    after max_clicks; largest objects first, within the click budget."""
    truth = sorted((t for t in truth if t.sum() >= cfg.min_area), key=lambda t: -int(t.sum()))
    added, clicks, painted = [], 0, 0
    for goal in truth:
        target = torch.from_numpy(goal)[None]
        answer = np.zeros_like(goal)
        points: list[tuple[float, float]] = []
        labels: list[int] = []
        while len(points) < cfg.max_clicks:
            point, label = next_click(torch.from_numpy(answer)[None], target, stride=1)
            points.append((float(point[0, 0]), float(point[0, 1])))
            labels.append(int(label[0]))
            answer = tool(Prompt(points=tuple(points), labels=tuple(labels)))
            if _iou(torch.from_numpy(answer)[None], target)[0] >= cfg.accept_iou:
                break
        else:
            answer = goal  # the tool never got it right: the person paints it
            painted += 1
        if clicks + len(points) > cfg.clicks_per_image:
            break  # out of time: this and later (smaller) objects stay unlabelled
        clicks += len(points)
        added.append(answer.astype(bool))
    return Review([], {}, [], added, clicks, painted)


def _match(truth: list[np.ndarray], masks: list[np.ndarray], min_iou: float) -> dict[int, tuple[int, float]]:
    """Greedy one-to-one matching of objects to model masks by IoU (>= min_iou): truth index -> (mask index, IoU)."""
    if not truth or not masks:
        return {}
    encode = lambda ms: mask_utils.encode(np.asfortranarray(np.stack(ms, -1).astype(np.uint8)))  # noqa: E731
    iou = np.asarray(mask_utils.iou(encode(truth), encode(masks), [0] * len(masks))).reshape(len(truth), len(masks))
    out: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for flat in np.argsort(-iou, axis=None):
        t, m = divmod(int(flat), len(masks))
        if iou[t, m] < min_iou:
            break
        if t not in out and m not in used:
            out[t] = (m, float(iou[t, m]))
            used.add(m)
    return out


@torch.no_grad()
def _click_sessions(
    predictor: SamPredictor, targets: list[np.ndarray],
    first_points: list[tuple[float, float] | None], cfg: AnnotatorConfig,
) -> list[tuple[np.ndarray, int, bool]]:
    """Click each target until the tool's mask is accepted: (final full-size mask, clicks spent, painted) each.

    The targets run as one batch on the image's cached embedding; every unfinished session
    takes one click per step, so the active sessions always hold the same number of points. A
    target with a first point (the model's grid point of the mask being corrected) starts from
    it for free.
    """
    if not targets:
        return []
    model = predictor.model
    h, w = predictor.input_size
    goal = torch.from_numpy(np.stack(targets))[:, None].float()
    goal = F.interpolate(goal, (h, w), mode="nearest")[:, 0] > 0.5  # N x h x w on the input grid
    free = torch.tensor([p is not None for p in first_points])
    given = np.array([p if p is not None else (0.0, 0.0) for p in first_points], dtype=np.float64)
    first = torch.as_tensor(scale_coords(given, predictor.original_size, model.image_size), dtype=torch.float)
    protocol, protocol_label = next_click(torch.zeros_like(goal), goal, stride=1)
    points = torch.where(free[:, None], first, protocol)[:, None]  # N x clicks x 2 input pixels
    labels = torch.where(free, 1, protocol_label)[:, None]  # N x clicks
    clicks = (~free).long()
    answer, low_res = _answer(predictor, points, labels, None, goal)
    done = _iou(answer, goal) >= cfg.accept_iou
    while True:
        active = (~done & (clicks < cfg.max_clicks)).nonzero().flatten()
        if not len(active):
            break
        point, label = next_click(answer[active], goal[active], stride=1)
        points = torch.cat([points, points[:, -1:]], 1)  # finished sessions repeat a point they never use again
        labels = torch.cat([labels, labels[:, -1:]], 1)
        points[active, -1], labels[active, -1] = point, label
        answer[active], low_res[active] = _answer(predictor, points[active], labels[active], low_res[active], goal[active])
        clicks[active] += 1
        done = _iou(answer, goal) >= cfg.accept_iou
    full = model.postprocess_masks(low_res[:, None], (h, w), predictor.original_size)[:, 0] > model.mask_threshold
    return [
        (full[i].numpy(), int(clicks[i]), False) if done[i]
        else (targets[i].astype(bool), cfg.max_clicks, True)  # the tool never got it right: the person paints it
        for i in range(len(targets))
    ]


def _answer(
    predictor: SamPredictor, points: torch.Tensor, labels: torch.Tensor, mask_prompt: torch.Tensor | None,
    goal: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tool's answer to each session's clicks: (N x h x w mask on the input grid, N x 4e x 4e low-res logits).

    After one click the person takes the best of the 3 nested masks; after more, the single
    output (SAM's interactive behaviour). The chosen low-res logits are the next mask prompt.
    """
    model = predictor.model
    encoder = model.prompt_encoder
    sparse = encoder.embed_points(points, labels, pad=True)
    dense = encoder.no_mask_dense(len(points)) if mask_prompt is None else encoder.embed_masks(mask_prompt[:, None])
    low_res, _ = model.mask_decoder.predict_all_masks(predictor.features, encoder.get_dense_pe(), sparse, dense)
    h, w = goal.shape[-2:]
    size = model.image_size
    on_grid = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[..., :h, :w] > model.mask_threshold
    if points.shape[1] == 1:
        pick = torch.stack([_iou(on_grid[:, k], goal) for k in (1, 2, 3)], 1).argmax(1) + 1
    else:
        pick = torch.zeros(len(points), dtype=torch.long)
    rows = torch.arange(len(points))
    return on_grid[rows, pick], low_res[rows, pick]


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of N pairs of bool masks (an empty pair counts as 1)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
