"""Optimiser recipe: the parameter groups (decay, layer-wise lr, Muon's matrices), the schedules, MuonAdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from sam_train.model import build_sam
from sam_train.optim import MuonAdamW, build_optimizer, lr_multiplier, orthogonalize, parameter_groups


def test_groups_cover_every_parameter_once_with_the_right_decay_and_lr():
    model = build_sam("tiny")
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by_name = {n: g for g in groups for n in g["names"]}
    for name in ("image_encoder.blocks.0.norm1.weight", "image_encoder.blocks.0.attn.qkv.bias",
                 "image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h", "mask_decoder.iou_token.weight"):
        expected = 0.0 if "iou_token" not in name else 0.1
        assert by_name[name]["weight_decay"] == expected, name
    assert by_name["image_encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1
    # 4 blocks: embeddings at 0.5^5, block i at 0.5^(4-i), neck and decoder at full lr.
    assert by_name["image_encoder.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5**5)
    assert by_name["image_encoder.blocks.3.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["image_encoder.neck.0.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["mask_decoder.iou_token.weight"]["lr"] == pytest.approx(1e-3)
    torch.optim.AdamW(groups)  # the groups are a valid AdamW configuration


def test_frozen_parameters_are_left_out():
    model = build_sam("tiny")
    model.image_encoder.requires_grad_(False)
    names = [n for g in parameter_groups(model, 1e-3, 0.1, 0.8) for n in g["names"]]
    assert names and not any(n.startswith("image_encoder.") for n in names)


def test_step_schedule_warms_up_then_divides_by_ten_at_two_thirds_and_26_27ths():
    f = lr_multiplier("step", total_steps=2700, warmup_steps=250, milestones=(0.666667, 0.962963), gamma=0.1)
    assert f(0) == pytest.approx(1 / 250) and f(249) == 1.0 and f(250) == 1.0
    assert f(1799) == 1.0 and f(1800) == pytest.approx(0.1)
    assert f(2599) == pytest.approx(0.1) and f(2600) == pytest.approx(0.01)


def test_cosine_schedule_and_bad_name():
    f = lr_multiplier("cosine", total_steps=1100, warmup_steps=100)
    assert f(100) == pytest.approx(1.0) and f(600) == pytest.approx(0.5) and f(1100) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="'step' or 'cosine'"):
        lr_multiplier("linear", 10, 1)


def test_a_time_cooldown_anneals_to_zero_inside_the_budget_and_leaves_the_steps_before_it_alone():
    spent = [0.0]
    cooled = lr_multiplier("cosine", total_steps=1100, warmup_steps=100, cooldown=0.2, budget_spent=lambda: spent[0])
    plain = lr_multiplier("cosine", total_steps=1100, warmup_steps=100)
    for value in (0.0, 0.5, 0.8):
        spent[0] = value
        assert cooled(50) == pytest.approx(plain(50)) and cooled(300) == pytest.approx(plain(300))
    spent[0] = 0.9  # half-way through the last fifth: half the step-driven lr
    assert cooled(300) == pytest.approx(0.5 * plain(300)) and cooled(50) == pytest.approx(0.5 * plain(50))
    spent[0] = 1.0
    assert cooled(300) == 0.0
    with pytest.raises(ValueError, match="cooldown"):
        lr_multiplier("cosine", 10, 1, cooldown=1.0)


def _linear_weight_names(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_split_matrices_gives_linear_weights_groups_of_their_own_with_the_same_lr_and_decay():
    model = build_sam("tiny")
    plain = {n: g for g in parameter_groups(model, 1e-3, 0.1, 0.5) for n in g["names"]}
    split = {n: g for g in parameter_groups(model, 1e-3, 0.1, 0.5, split_matrices=True) for n in g["names"]}
    assert split.keys() == plain.keys()
    assert {n for n, g in split.items() if g["muon"]} == _linear_weight_names(model)
    assert not any(g["muon"] for g in plain.values())
    for name in split:
        same = ("lr", "weight_decay")
        assert [split[name][k] for k in same] == [plain[name][k] for k in same], name


@pytest.mark.parametrize("shape", [(3, 64, 128), (2, 768, 192), (192, 192)])
def test_orthogonalize_approximates_u_v_transpose_of_ill_conditioned_matrices(shape):
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    spectrum = torch.logspace(-2, 0, u.shape[-1])  # singular values over two decades
    matrices = u @ torch.diag_embed(spectrum.expand(*u.shape[:-2], -1)) @ vh
    result = orthogonalize(matrices)
    assert result.shape == matrices.shape and result.dtype == matrices.dtype
    singular = torch.linalg.svdvals(result)
    # Small directions are lifted (5 iterations multiply a tiny one by ~3.4^5: those two decades
    # down reach ~0.7), none blows up.
    assert singular.min() > 0.6 and singular.max() < 1.3
    exact = u @ vh
    cosine = (result * exact).sum((-2, -1)) / (result.norm(dim=(-2, -1)) * exact.norm(dim=(-2, -1)))
    assert (cosine > 0.95).all()


def test_muon_matrix_update_has_adamw_rms_and_ignores_the_gradient_scale():
    changes = []
    for scale in (1.0, 2.0**14):  # a power of two: the rounding of every intermediate scales with it
        torch.manual_seed(0)
        layer = torch.nn.Linear(128, 64)
        before = layer.weight.detach().clone()
        opt = MuonAdamW([{"params": [layer.weight], "muon": True}], lr=1e-2, weight_decay=0.0)
        layer.weight.grad = scale * torch.randn(64, 128)
        opt.step()
        changes.append(layer.weight.detach() - before)
    rms = changes[0].pow(2).mean().sqrt().item()
    assert 0.7 * 0.2 * 1e-2 < rms < 1.3 * 0.2 * 1e-2  # 0.2 x lr: a typical AdamW step's RMS
    torch.testing.assert_close(changes[0], changes[1], atol=1e-7, rtol=0)


@pytest.mark.slow
def test_non_matrix_groups_step_exactly_as_torch_adamw_and_weight_decay_is_decoupled():
    torch.manual_seed(0)
    ours = build_sam("tiny")
    theirs = copy.deepcopy(ours)
    ours_groups = parameter_groups(ours, 1e-3, 0.1, 0.8, split_matrices=True)
    mine = MuonAdamW(ours_groups, lr=1e-3, betas=(0.9, 0.95))
    reference = torch.optim.AdamW(parameter_groups(theirs, 1e-3, 0.1, 0.8), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        mine.step()
        reference.step()
    muon_names = {n for g in ours_groups if g["muon"] for n in g["names"]}
    mine_params, reference_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name, param in mine_params.items():
        if name in muon_names:
            assert not torch.allclose(param, reference_params[name], atol=1e-6), name
        else:
            torch.testing.assert_close(param, reference_params[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_muon_state_round_trips_so_a_resumed_run_takes_the_same_next_step():
    torch.manual_seed(0)
    model = build_sam("tiny")
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]

    def step(opt: torch.optim.Optimizer, params, k: int) -> None:
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        opt.step()

    first = MuonAdamW(parameter_groups(model, 1e-3, 0.1, 0.8, split_matrices=True), lr=1e-3)
    step(first, model.parameters(), 0)
    step(first, model.parameters(), 1)
    resumed_model = copy.deepcopy(model)
    resumed = MuonAdamW(parameter_groups(resumed_model, 1e-3, 0.1, 0.8, split_matrices=True), lr=1e-3)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    step(first, model.parameters(), 2)
    step(resumed, resumed_model.parameters(), 2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_muon_refuses_flat_shards_and_build_optimizer_names_its_choices():
    with pytest.raises(ValueError, match="whole 2-D weight matrices"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(10))], "muon": True}])
    model = build_sam("tiny")
    optim = {"lr": 1e-3, "weight_decay": 0.1, "layer_decay": 0.8, "betas": [0.9, 0.95], "muon_momentum": 0.95}
    assert isinstance(build_optimizer(model, {**optim, "name": "adamw"}), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, {**optim, "name": "muon"}), MuonAdamW)
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        build_optimizer(model, {**optim, "name": "sgd"})
