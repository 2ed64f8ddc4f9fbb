"""Fine-tuning switches: frozen parts stay put under real optimisation, config keys reach timm, and the
acceptance path official checkpoint -> fine-tune (frozen encoder + LoRA) -> export -> Meta's builder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf.errors import InterpolationToMissingValueError

from sam_train.config import load_config
from sam_train.model import MODEL_SPECS, FinetuneConfig, build_sam, prepare_finetune
from sam_train.model.lora import LoRALinear
from sam_train.optim import parameter_groups
from sam_train.train import build_model, fit
from tests.conftest import build_meta_sam_like, perturb_all_weights_

ENCODER_FROZEN_WITH_LORA = FinetuneConfig(
    freeze_image_encoder=True, freeze_prompt_encoder=True, freeze_mask_decoder=False,
    lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=("qkv",),
)


def decode_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A real SAM forward pass (encoder, one-point prompts, decoder) against fixed masks."""
    embeddings = model.encode_image(images)  # 1 x C x 16 x 16
    coords = torch.tensor([[[64.0, 64.0]], [[192.0, 128.0]]])  # N x 1 x 2
    logits, iou = model.decode(embeddings, coords, torch.ones(2, 1, dtype=torch.long), multimask_output=False)
    return F.binary_cross_entropy_with_logits(logits, targets) + (iou - 0.5).pow(2).mean()


def test_frozen_parts_stay_put_under_real_optimisation_while_lora_and_decoder_learn():
    torch.manual_seed(0)
    model = prepare_finetune(perturb_all_weights_(build_sam("tiny"), seed=2), ENCODER_FROZEN_WITH_LORA)
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.8)
    optimised = {n for g in groups for n in g["names"]}
    assert optimised == {n for n, p in model.named_parameters() if ".lora_" in n or n.startswith("mask_decoder.")}
    assert len([n for n in optimised if ".lora_" in n]) == 2 * 4  # A and B in each of the 4 blocks' qkv
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    images, targets = torch.randn(1, 3, 256, 256), (torch.rand(2, 1, 64, 64) > 0.5).float()
    for _ in range(3):
        optimizer.zero_grad()
        decode_loss(model, images, targets).backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in after.items():
        if key.startswith(("image_encoder.", "prompt_encoder.")) and ".lora_" not in key:
            assert torch.equal(value, before[key]), f"frozen {key} changed"
    lora_b = [k for k in after if k.endswith(".lora_b")]
    assert lora_b and all(after[k].abs().sum() > 0 for k in lora_b), "every LoRA B must have left zero"
    decoder = [k for k in after if k.startswith("mask_decoder.") and after[k].is_floating_point()]
    changed = [k for k in decoder if not torch.equal(after[k], before[k])]
    assert len(changed) > 0.9 * len(decoder), f"only {len(changed)} of {len(decoder)} decoder tensors learned"


def test_everything_frozen_is_refused():
    nothing = FinetuneConfig(True, True, True, lora_rank=0, lora_alpha=1, lora_dropout=0.0, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="nothing left to train"):
        prepare_finetune(build_sam("tiny"), nothing)


def test_model_configs_carry_the_papers_drop_path_and_reach_timm():
    assert {m: load_config("fit", [f"model={m}"]).model.drop_path for m in MODEL_SPECS} == {
        "tiny": 0.0, "vit_b": 0.6, "vit_l": 0.4, "vit_h": 0.4  # Kirillov et al. 2023, Appendix A
    }
    model = build_model(load_config("fit", ["model.drop_path=0.3"]).model)
    blocks = model.image_encoder.blocks
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)  # rises linearly from 0 at the first block
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.3) and blocks[-1].drop_path2.drop_prob == pytest.approx(0.3)


def block_calls_and_lora_grads(grad_checkpointing: bool) -> tuple[int, torch.Tensor]:
    """Block forward calls over one forward + backward, and the LoRA gradients, of a frozen encoder with LoRA."""
    cfg = load_config("fit", [
        f"model.grad_checkpointing={str(grad_checkpointing).lower()}", "model.finetune.freeze_image_encoder=true",
        "model.finetune.lora_rank=4",
    ]).model
    torch.manual_seed(0)  # the same LoRA A in both models
    model = build_model(cfg).train()
    assert model.image_encoder.grad_checkpointing is grad_checkpointing
    calls = []
    for block in model.image_encoder.blocks:  # module hooks do not fire in the recomputation: count forward itself
        block.forward = lambda x, forward=block.forward: calls.append(1) or forward(x)
    with torch.no_grad():
        model.image_encoder.blocks[0].attn.qkv.lora_b.fill_(0.01)  # nonzero B: gradients reach A too
    model.encode_image(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    lora = model.image_encoder.blocks[0].attn.qkv
    assert isinstance(lora, LoRALinear)
    return len(calls), torch.cat([lora.lora_a.grad.flatten(), lora.lora_b.grad.flatten()])


def test_grad_checkpointing_recomputes_the_encoder_blocks_and_keeps_lora_gradients():
    plain_calls, plain_grads = block_calls_and_lora_grads(False)
    checkpointed_calls, checkpointed_grads = block_calls_and_lora_grads(True)
    assert plain_calls == 4 and checkpointed_calls == 8  # each block runs again in the backward pass
    assert plain_grads.abs().sum() > 0
    torch.testing.assert_close(checkpointed_grads, plain_grads, atol=1e-6, rtol=1e-5)


def test_finetune_experiment_demands_a_checkpoint_and_shards():
    cfg = load_config("fit", ["experiment=finetune_domain"])
    assert cfg.model.name == "vit_b" and cfg.model.finetune.freeze_image_encoder and cfg.model.finetune.lora_rank == 8
    with pytest.raises(InterpolationToMissingValueError, match="Missing mandatory value: required.checkpoint"):
        cfg.model.checkpoint
    with pytest.raises(InterpolationToMissingValueError, match="Missing mandatory value: required.train"):
        cfg.data.train


@pytest.mark.slow
def test_official_checkpoint_finetuned_with_frozen_encoder_and_lora_exports_what_metas_builder_loads(tmp_path, synth_24):
    torch.manual_seed(0)
    spec = MODEL_SPECS["tiny"]
    official_state = perturb_all_weights_(build_meta_sam_like(spec), seed=11).state_dict()
    official = tmp_path / "sam_tiny_official.pth"
    torch.save(official_state, official)
    cfg = load_config("fit", [
        "experiment=finetune_domain", "model=tiny", f"model.checkpoint={official}", f"data.train=[{synth_24}]",
        f"data.val=[{synth_24}]", f"output_root={tmp_path}", "run_id=test", "total_steps=2", "checkpoint_every=2",
        "optim.warmup_steps=1", "data.num_workers=0", "data.batch_size=2", "data.sample.max_masks=4",
        "trainer.limit_val_batches=0",  # no validation: the export is what this test is about
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    ])
    run = fit(cfg)

    exported = torch.load(run / "sam_tiny.pth", weights_only=True)
    meta = build_meta_sam_like(spec)
    meta.load_state_dict(exported, strict=True)
    for key, value in official_state.items():
        if key.endswith(".attn.qkv.weight") or key.startswith("mask_decoder."):
            continue
        assert torch.equal(exported[key], value), f"frozen {key} changed"
    assert all(not torch.equal(exported[k], official_state[k]) for k in official_state if k.endswith(".attn.qkv.weight"))
    assert not torch.equal(exported["mask_decoder.iou_token.weight"], official_state["mask_decoder.iou_token.weight"])

    # The trained, still unmerged model from Lightning's checkpoint computes what Meta's model computes from the export.
    trained = build_model(cfg.model).eval()
    state = torch.load(run / "checkpoints" / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    trained.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    assert any(".lora_b" in k for k in state)
    images = torch.randn(1, 3, 256, 256)
    coords, labels = torch.tensor([[[40.0, 50.0], [200.0, 120.0]]]).expand(3, 2, 2), torch.tensor([[1, 0]]).expand(3, 2)
    with torch.no_grad():
        embeddings = trained.encode_image(images)
        torch.testing.assert_close(embeddings, meta.image_encoder(images), atol=1e-4, rtol=0)
        ours = trained.decode(embeddings, coords, labels, multimask_output=True)
        sparse, dense = meta.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        theirs = meta.mask_decoder(embeddings, meta.prompt_encoder.get_dense_pe(), sparse, dense, True)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
