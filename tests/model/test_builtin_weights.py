"""The built-in `tiny` weights: shipped in the package, documented beside it, and they segment."""

from __future__ import annotations

import json

import pytest
import torch

from sam_train.config import load_config
from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch, sample_rng
from sam_train.data.shards import iter_raw_samples, resolve_shards
from sam_train.evaluation import evaluate_clicks
from sam_train.model import build_sam, builtin_weights
from sam_train.module import SamModule
from tests.conftest import make_synth


def box_miou(model, batch) -> float:
    module = SamModule.from_config(model, load_config("fit"))  # its normalize zeroes the padding, as training did
    with torch.no_grad():
        embeddings = model.encode_image(module.normalize(batch["images"], batch["content_sizes"]))
        result = evaluate_clicks(model, embeddings, batch["masks"], batch["image_index"], [1])
    return result.iou["miou_box"].mean().item()


def test_builtin_tiny_is_small_and_says_how_it_was_made():
    path = builtin_weights("tiny")
    assert path.stat().st_size <= 20 * 2**20
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["command"].startswith("sam-train fit experiment=pretrain_synth_tiny")
    assert record["config"]["model"]["name"] == "tiny" and record["data_seed"] is not None
    assert 0 < record["metrics"]["miou_1click_oracle"] <= 1


def test_builtin_tiny_segments_unseen_synthetic_scenes_far_better_than_random(tmp_path):
    # A seed the training data never used: new scenes of the same style.
    raws = [s for ref in resolve_shards([str(make_synth(tmp_path, 6, 6, seed=12345))]) for s in iter_raw_samples(ref.url)]
    cfg = SampleConfig(image_size=256, mask_stride=4, max_masks=8, min_mask_area=400, hflip_prob=0.0)
    batch = expand_batch(collate([decode_sample(r, cfg, sample_rng(0, 0, r.key)) for r in raws]), 256)
    trained, random = box_miou(build_sam("tiny", pretrained=True).eval(), batch), box_miou(build_sam("tiny").eval(), batch)
    assert trained > 0.3 and random < 0.1, (trained, random)


def test_models_without_builtin_weights_and_ambiguous_requests_are_refused():
    with pytest.raises(KeyError, match="no built-in weights for 'vit_b'; shipped: tiny"):
        build_sam("vit_b", pretrained=True)
    with pytest.raises(ValueError, match="either checkpoint or pretrained"):
        build_sam("tiny", checkpoint="x.pth", pretrained=True)
