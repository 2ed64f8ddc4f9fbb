"""`sam-train validate`: a checkpoint evaluated on shards end to end, as a table and metrics.json."""

from __future__ import annotations

import json

import pytest
import torch

from sam_train.cli import main
from sam_train.config import load_config
from sam_train.model import build_sam, export_official
from sam_train.report import format_metrics
from sam_train.validate import validate
from tests.test_evaluation import known_output_sam

SMALL = ["data.num_workers=0", "data.batch_size=2", "data.sample.max_masks=4", "trainer.enable_progress_bar=false"]


def test_validate_prints_the_table_and_writes_metrics_json(tmp_path, synth_24, capsys):
    torch.manual_seed(0)
    checkpoint = export_official(build_sam("tiny"), tmp_path / "sam_tiny_random.pth")
    out = tmp_path / "eval"
    args = [f"model.checkpoint={checkpoint}", f"data.val=[{synth_24 / 'synth-000000.tar'}]", f"validate_out={out}", *SMALL]
    assert main(["validate", *args]) == 0
    printed = capsys.readouterr().out
    for row in ("mIoU 1 click", "mIoU 3 clicks", "mIoU 5 clicks", "mIoU box", "IoU head MAE", "IoU head corr"):
        assert row in printed, printed
    assert f"metrics: {out / 'metrics.json'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # written atomically: no temporary left
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"] == "tiny" and report["checkpoint"] == str(checkpoint)
    metrics = report["metrics"]
    names = {f"miou_{k}click{kind}" for k in (1, 3, 5) for kind in ("", "_oracle")}
    assert set(metrics) == names | {"miou_box", "iou_mae", "iou_corr", "masks"}
    assert 0 < metrics["masks"] <= 4 * 4  # 4 samples of at most 4 masks
    assert all(0.0 <= metrics[name] <= 1.0 for name in names | {"miou_box", "iou_mae"}), metrics
    assert metrics["iou_corr"] is None or -1.0 <= metrics["iou_corr"] <= 1.0


def test_validate_evaluates_the_given_checkpoint(tmp_path, synth_24):
    checkpoint = export_official(known_output_sam(), tmp_path / "sam_tiny_known.pth")
    cfg = load_config("fit", [f"model.checkpoint={checkpoint}", f"data.val=[{synth_24 / 'synth-000001.tar'}]",
                              f"validate_out={tmp_path / 'eval'}", "evaluation.clicks=[1,2]", *SMALL])
    metrics = validate(cfg)["metrics"]
    # That model's top-scored mask after one click is empty; its oracle, single and box outputs cover everything.
    assert metrics["miou_1click"] == 0.0
    full = metrics["miou_box"]
    assert 0.0 < full < 1.0
    for name in ("miou_1click_oracle", "miou_2click", "miou_2click_oracle"):
        assert metrics[name] == pytest.approx(full, abs=1e-6), name
    assert "miou_3click" not in metrics


def test_validate_reports_bad_input_without_a_traceback(tmp_path, synth_24, capsys):
    assert main(["validate", f"data.val=[{synth_24}]", *SMALL]) == 2
    assert "needs model.checkpoint=PATH" in capsys.readouterr().err
    checkpoint = export_official(build_sam("tiny"), tmp_path / "sam_tiny.pth")
    missing = tmp_path / "no_such_shards"
    assert main(["validate", f"model.checkpoint={checkpoint}", f"data.val=[{missing}]", *SMALL]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists(), "validate never synthesises data"


def test_the_table_has_a_row_per_prompt_and_the_calibration():
    metrics = {"miou_1click": 0.5, "miou_1click_oracle": 0.625, "miou_3click": 0.75, "miou_3click_oracle": 0.8,
               "miou_box": 0.7, "iou_mae": 0.1, "iou_corr": None, "masks": 12}
    assert format_metrics(metrics).splitlines() == [
        "metric            top-IoU   oracle",
        "mIoU 1 click        0.500    0.625",
        "mIoU 3 clicks       0.750    0.800",
        "mIoU box            0.700        -",
        "IoU head MAE        0.100        -",
        "IoU head corr           -        -",
        "(12 masks)",
    ]
