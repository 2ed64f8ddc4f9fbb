"""`sam-train fit`: a real run folder from the Hydra config, checkpoints, resume=auto, official export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from sam_train.config import load_config
from sam_train.model import build_sam
from sam_train.report import read_log
from sam_train.strategies import trainer_arguments
from sam_train.train import fit


def overrides(tmp_path, synth_24, steps: int, resume: str | None = None) -> list[str]:
    return [
        "experiment=quickstart", f"output_root={tmp_path}", "run_dir=null", "run_id=test", f"total_steps={steps}", "checkpoint_every=2",
        f"data.train=[{synth_24}]", f"data.val=[{synth_24}]", "data.synthesize=null", "data.num_workers=0",
        "data.batch_size=2", "data.sample.max_masks=4", "trainer.limit_val_batches=1", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger.overlay_every_n_steps=2", f"resume={resume}" if resume else "resume=null",
    ]


@pytest.mark.slow
def test_fit_writes_a_complete_run_folder_and_resumes(tmp_path, synth_24):
    run = fit(load_config("fit", overrides(tmp_path, synth_24, steps=4)))
    assert run == tmp_path / "quickstart" / "test"
    assert "total_steps: 4" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    rows = read_log(run)
    assert any("val/miou_box" in r for r in rows) and any("train/loss" in r for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("miou_1click", "miou_1click_oracle", "miou_3click", "miou_5click_oracle", "miou_box", "iou_mae"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["steps"] == 4 and metrics["train_seconds"] > 0
    for png in ("loss_curve.png", "overlay.png"):
        assert Image.open(run / png).size[0] > 0
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    trained = build_sam("tiny", checkpoint=run / "sam_tiny.pth")  # official layout, strict load
    assert not torch.equal(trained.mask_decoder.iou_token.weight, build_sam("tiny").mask_decoder.iou_token.weight)

    fit(load_config("fit", overrides(tmp_path, synth_24, steps=6, resume="auto")))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "epoch=0-step=6.ckpt", names
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["launch_000", "launch_001"]
    assert sorted({int(r["step"]) for r in read_log(run) if "train/loss" in r}) == list(range(6)), "history kept"
    state = torch.load(run / "checkpoints" / "epoch=0-step=6.ckpt", weights_only=True)
    assert state["global_step"] == 6 and state["SA1BDataModule"]["batches"] == 6


def train_losses(run) -> dict[int, float]:
    return {int(r["step"]): r["train/loss"] for r in read_log(run) if "train/loss" in r}


@pytest.mark.slow
def test_resuming_from_a_checkpoint_repeats_the_uninterrupted_runs_next_losses(tmp_path, synth_24):
    # A curriculum of 1-round sessions for the first 3 of 5 steps, then the quick start's 5 rounds: the
    # resumed run crosses the switch as the whole one did.
    curriculum = ["prompts.early_corrective_rounds=0", "prompts.early_until=0.6"]
    whole = fit(load_config("fit", overrides(tmp_path / "whole", synth_24, steps=5) + curriculum))
    rounds = {int(r["step"]): r["train/rounds"] for r in read_log(whole) if "train/rounds" in r}
    assert rounds == {0: 1.0, 1: 1.0, 2: 1.0, 3: 5.0, 4: 5.0}
    resumed_dir = tmp_path / "resumed" / "quickstart" / "test"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "epoch=0-step=2.ckpt", resumed_dir / "checkpoints")  # as if killed after step 2
    resumed = fit(load_config("fit", overrides(tmp_path / "resumed", synth_24, steps=5, resume="auto") + curriculum))
    assert resumed == resumed_dir
    expected, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == [2, 3, 4] and sorted(expected) == [0, 1, 2, 3, 4]
    for step in got:  # same data, same prompts, same weights and optimiser state: the same losses
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)


@pytest.mark.slow
def test_wandb_logs_offline_without_an_api_key(tmp_path, synth_24, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no saved login
    run = fit(load_config("fit", overrides(tmp_path, synth_24, steps=2) + ["logger=wandb"]))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith("-test"), offline
    assert list(offline[0].glob("*.wandb")), "the offline run holds the logged history"


@pytest.mark.parametrize("bf16_units,want", [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_picks_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, bf16_units, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    trainer = load_config("fit", ["trainer=cpu"]).trainer
    assert trainer.precision == "auto"
    assert trainer_arguments(trainer)["precision"] == want
    assert trainer_arguments(load_config("fit", ["trainer.precision=32-true"]).trainer)["precision"] == "32-true"


# Run in a fresh interpreter: pytest resets warning filters around collection, where ours is installed.
_LEAFSPEC_PROBE = """
import warnings
from lightning.pytorch.utilities._pytree import _tree_flatten
with warnings.catch_warnings(record=True) as caught:
    _tree_flatten(1)
assert any("LeafSpec" in str(w.message) for w in caught), "torch no longer warns here: drop the filter"
import sam_train.strategies
with warnings.catch_warnings(record=True) as caught:
    _tree_flatten(1)
assert not caught, [str(w.message) for w in caught]
"""


@pytest.mark.slow
def test_lightnings_leafspec_deprecation_is_silenced_and_still_raised_without_us():
    done = subprocess.run([sys.executable, "-W", "always", "-c", _LEAFSPEC_PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
