"""Multi-process training over gloo on CPU: DDP on one node, two "nodes" over 127.0.0.1, and SIGUSR1 preemption.

The distributed runs are real: separate processes, a real process group, Lightning's launcher
(or ours, for the nodes), `tests/training_probe.py` recording each rank's steps and weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from sam_train.config import load_config
from sam_train.train import fit
from tests.conftest import REPO_ROOT, free_port, make_synth, process_env
from tests.training_probe import StepRecorder

pytestmark = pytest.mark.slow  # multi-process training runs

# Noise-free boxes, no corrective clicks, two rounds feeding the logits back: prompts that do not
# depend on the rank's random stream, so one process and two see exactly the same sessions.
DETERMINISTIC_PROMPTS = ["prompts.point_prob=0.0", "prompts.box_noise_std=0.0", "prompts.corrective_rounds=0",
                         "prompts.empty_rounds=2"]


def fit_overrides(data: Path, out: Path, batch_size: int, steps: int) -> list[str]:
    """The quick start, shrunk; fp32 because bf16 autocast rounds a 4-image batch and two 2-image halves differently."""
    return [
        "experiment=quickstart", f"run_dir={out / 'run'}", f"total_steps={steps}", "checkpoint_every=1000",
        f"data.train=[{data}]", "data.val=[]", "data.synthesize=null", "data.num_workers=0",
        f"data.batch_size={batch_size}", "data.sample.max_masks=3", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.max_time=null", "trainer.limit_val_batches=0",
        "trainer.precision=32-true",
    ]


def probe(out: Path, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "training_probe.py"), str(out), *overrides],
                            cwd=REPO_ROOT, env=process_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(*processes: subprocess.Popen, timeout: float = 300) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, output[-4000:]


def steps_of(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"largest weight difference {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def synth_4(tmp_path_factory) -> Path:
    """4 images in 2 shards: one global batch per epoch, so any split of the batch over ranks holds the same samples."""
    return make_synth(tmp_path_factory.mktemp("synth4"), 4, 2)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, synth_4):
    steps = 3
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    finish(probe(one, fit_overrides(synth_4, one, 4, steps) + DETERMINISTIC_PROMPTS),
           probe(two, fit_overrides(synth_4, two, 2, steps) + DETERMINISTIC_PROMPTS + ddp,
                 env={"MASTER_PORT": str(free_port())}))

    single, rank0, rank1 = steps_of(one, 0), steps_of(two, 0), steps_of(two, 1)
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == list(range(steps))
    for a, b, whole in zip(rank0, rank1, single):
        assert not set(a["keys"]) & set(b["keys"]), "the ranks' batches overlap"
        assert sorted(a["keys"] + b["keys"]) == sorted(whole["keys"]), "two ranks together see the one-process batch"
        # the loss is normalised by the global mask count / ranks: DDP's averaged gradient is the one-process gradient
        assert a["grad_norm"] == b["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    w0, w1, w = (load_file(p) for p in (two / "rank0.safetensors", two / "rank1.safetensors", one / "rank0.safetensors"))
    assert_same_weights(w0, w1, atol=0.0)  # DDP: every rank applies the same averaged gradient
    assert_same_weights(w0, w, atol=2e-5)  # summation order differs, nothing else
    assert (two / "run" / "sam_tiny.pth").is_file(), "rank 0 exports the official checkpoint"


def test_two_nodes_of_one_process_each_train_over_loopback(tmp_path, synth_4):
    port = str(free_port())
    overrides = fit_overrides(synth_4, tmp_path, 2, 2) + ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1",
                                                          "trainer.num_nodes=2"]
    nodes = [probe(tmp_path, overrides, env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node),
                                             "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) for node in (0, 1)]
    finish(*nodes)
    rank0, rank1 = steps_of(tmp_path, 0), steps_of(tmp_path, 1)
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == [0, 1]
    assert all(not set(a["keys"]) & set(b["keys"]) for a, b in zip(rank0, rank1)), "each node reads its own samples"
    assert_same_weights(load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors"), atol=0.0)


class SignalAtStep(L.Callback):
    """Sends this process SIGUSR1 as step `step` starts: SLURM's warning arriving in the middle of a step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.parametrize("signal_step", [2, 5], ids=["mid-epoch", "last-step-of-epoch"])
def test_sigusr1_checkpoints_requeues_and_the_resumed_run_neither_repeats_nor_skips_samples(
        tmp_path, synth_24, monkeypatch, signal_step):
    steps = 9  # 24 images in batches of 4: 6 steps an epoch, so the run crosses into epoch 1
    overrides = fit_overrides(synth_24, tmp_path, 4, steps) + ["run_dir=null", f"output_root={tmp_path}", "resume=auto"]
    whole = tmp_path / "whole"
    whole.mkdir()
    fit(load_config("fit", overrides + ["run_id=whole"]), callbacks=[StepRecorder(whole)])

    # A SLURM job: the run folder is keyed by the job id, and scontrol (ours, on PATH) records the requeue.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    parts = tmp_path / "parts"
    parts.mkdir()
    run = fit(load_config("fit", overrides), callbacks=[StepRecorder(parts), SignalAtStep(signal_step)])
    assert run == tmp_path / "quickstart" / "4242"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    checkpoint = run / "checkpoints" / f"preempted-step={signal_step + 1}.ckpt"
    assert checkpoint.is_file() and not (run / "sam_tiny.pth").exists(), "stopped right after the checkpoint"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == signal_step + 1

    fit(load_config("fit", overrides), callbacks=[StepRecorder(parts)])  # the requeued job: same id, resume=auto
    expected, got = steps_of(whole, 0), steps_of(parts, 0)
    assert [s["step"] for s in got] == list(range(steps)), "every step once"
    assert [s["keys"] for s in got] == [s["keys"] for s in expected], "the same samples in the same order"
    assert (run / "sam_tiny.pth").is_file()
