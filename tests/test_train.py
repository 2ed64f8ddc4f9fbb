"""`sam-train fit`: a real run folder from the Hydra config, checkpoints, resume=auto, official export."""

from __future__ import annotations

import csv

import torch

from sam_train.config import load_config
from sam_train.model import build_sam
from sam_train.train import fit


def overrides(tmp_path, synth_24, steps: int, resume: str | None = None) -> list[str]:
    return [
        "experiment=quickstart", f"output_root={tmp_path}", "run_id=test", f"total_steps={steps}", "checkpoint_every=2",
        f"data.train=[{synth_24}]", f"data.val=[{synth_24}]", "data.synthesize=null", "data.num_workers=0",
        "data.batch_size=2", "data.sample.max_masks=4", "trainer.limit_val_batches=1", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"resume={resume}" if resume else "resume=null",
    ]


def test_fit_writes_a_complete_run_folder_and_resumes(tmp_path, synth_24):
    run = fit(load_config("fit", overrides(tmp_path, synth_24, steps=4)))
    assert run == tmp_path / "quickstart" / "test"
    assert "total_steps: 4" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("val/miou_box") for r in rows) and any(r.get("train/loss") for r in rows)
    trained = build_sam("tiny", checkpoint=run / "sam_tiny.pth")  # official layout, strict load
    assert not torch.equal(trained.mask_decoder.iou_token.weight, build_sam("tiny").mask_decoder.iou_token.weight)

    fit(load_config("fit", overrides(tmp_path, synth_24, steps=6, resume="auto")))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "epoch=0-step=6.ckpt", names
    state = torch.load(run / "checkpoints" / "epoch=0-step=6.ckpt", weights_only=True)
    assert state["global_step"] == 6 and state["SA1BDataModule"]["batches"] == 6
