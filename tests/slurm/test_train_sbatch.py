"""slurm/train.sbatch as SLURM runs it, on this machine: 2 "nodes" x 1 task over gloo, SIGUSR1 before
the time limit, `scontrol requeue` recorded, and the requeued job finishing the same run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sam_train.report import read_log
from tests.conftest import free_port, make_synth, process_env

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH = REPO_ROOT / "slurm" / "train.sbatch"
FAKE_SRUN = Path(__file__).with_name("fake_srun")


def test_train_sbatch_parses():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def training_ranks(marker: str) -> list[int]:
    """The training processes (srun's tasks), not the batch shell or srun: SLURM signals only those."""
    found = subprocess.run(["pgrep", "-f", f"sam_train.cli fit .*{marker}"], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split() if Path(f"/proc/{pid}/exe").resolve().name.startswith("python")]


@pytest.mark.slow
def test_train_sbatch_on_two_nodes_checkpoints_on_sigusr1_requeues_and_resumes(tmp_path):
    data = make_synth(tmp_path, 8, 2)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    port = free_port()
    steps = 16
    overrides = [
        f"output_root={tmp_path}", "run_dir=null", f"total_steps={steps}", "checkpoint_every=2",
        f"data.train=[{data}]", "data.val=[]", "data.synthesize=null", "data.num_workers=0", "data.batch_size=2",
        "data.sample.max_masks=3", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_time=null",
        "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    ]
    env = process_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        # The batch step's variables for 2 nodes x 1 task; MASTER_PORT free instead of one from the job id.
        SLURM_JOB_ID="777", SLURM_JOB_NAME="sam-train", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
        SLURM_CPUS_PER_TASK="1", SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
        MASTER_PORT=str(port),
        EXPERIMENT="quickstart", OVERRIDES=" ".join(overrides), SAM_TRAIN=f"{sys.executable} -m sam_train.cli",
    )
    run = tmp_path / "quickstart" / "777"  # keyed by SLURM_JOB_ID: the requeued job finds it
    job = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "epoch=0-step=2.ckpt").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-4000:]
        time.sleep(0.05)
    ranks = training_ranks(str(tmp_path))
    assert len(ranks) == 2, ranks
    for pid in ranks:  # --signal=SIGUSR1@90: SLURM signals every task of the step
        os.kill(pid, signal.SIGUSR1)
    log = job.communicate(timeout=240)[0]
    assert job.returncode == 0, log[-4000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 777\n", "rank 0 alone requeues"
    preempted = list((run / "checkpoints").glob("preempted-step=*.ckpt"))
    assert len(preempted) == 1, log[-4000:]
    stopped_at = torch.load(preempted[0], weights_only=True)["global_step"]
    assert 2 <= stopped_at < steps and not (run / "sam_tiny.pth").exists()

    rerun = subprocess.run(["bash", str(SBATCH)], env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert "restart 1" in rerun.stdout
    assert (run / "sam_tiny.pth").is_file(), "the requeued job finished the run"
    logged = sorted(int(r["step"]) for r in read_log(run) if "train/loss" in r)
    assert logged == list(range(steps)), "every step once across the two jobs"
