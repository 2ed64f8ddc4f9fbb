"""The `sam-train` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sam_train.model import build_sam, export_official
from tests.conftest import perturb_all_weights_


def sam_train(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("sam-train") or None
    cmd = [exe, *args] if exe else [sys.executable, "-m", "sam_train.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_writes_overlay_and_reports(tmp_path):
    out = tmp_path / "demo"
    result = sam_train("demo", f"out={out}", "seed=3")
    assert result.returncode == 0, result.stderr
    assert "tiny (3.18M parameters)" in result.stdout
    assert "mask IoU vs ground truth" in result.stdout
    image = np.asarray(Image.open(out / "demo.png"))
    assert image.shape == (360, 3 * 480, 3)


@pytest.mark.slow
def test_demo_with_trained_weights_uses_them(tmp_path):
    path = export_official(perturb_all_weights_(build_sam("tiny"), seed=1), tmp_path / "w.safetensors")
    result = sam_train("demo", f"out={tmp_path}", f"model.checkpoint={path}")
    assert result.returncode == 0, result.stderr
    assert f"weights: {path}" in result.stdout


def test_checkpoint_export_converts_and_validates(tmp_path):
    model = perturb_all_weights_(build_sam("tiny"), seed=2)
    src = export_official(model, tmp_path / "in.safetensors")
    result = sam_train("checkpoint", "export", str(src), str(tmp_path / "out.pth"), "--model", "tiny")
    assert result.returncode == 0, result.stderr
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert torch.equal(exported["image_encoder.blocks.0.mlp.lin1.weight"], model.image_encoder.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize(
    "args,message",
    [
        (("checkpoint", "export", "missing.pth", "out.pth", "--model", "tiny"), "missing.pth does not exist"),
        (("demo", "model=nope"), "Could not find 'model/nope'"),
    ],
)
def test_errors_are_one_clear_line_and_exit_2(tmp_path, args, message):
    result = sam_train(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_models_lists_official_parameter_counts():
    result = sam_train("models")
    assert result.returncode == 0, result.stderr
    for line in ("vit_b           93.7M", "vit_l          312.3M", "vit_h          641.1M"):
        assert line in result.stdout
