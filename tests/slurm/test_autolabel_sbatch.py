"""slurm/autolabel.sbatch as SLURM runs it, on this machine: the job's variables faked, `srun` replaced
by tests/slurm/fake_srun and `scontrol` by a recorder of its arguments."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sam_train.data.shards import read_manifest
from tests.conftest import process_env
from tests.engine.test_autolabel_distributed import FAST, samples_of, write_images

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH = REPO_ROOT / "slurm" / "autolabel.sbatch"
FAKE_SRUN = Path(__file__).with_name("fake_srun")


def test_scripts_parse():
    for script in (SBATCH, FAKE_SRUN):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_fake_srun_starts_tasks_as_srun_does():
    report = 'echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID $SLURM_NTASKS"; exit $((SLURM_PROCID == 2 ? 3 : 0))'

    def srun(*args: str, **variables: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(FAKE_SRUN), *args, "bash", "-c", report], capture_output=True, text=True,
                              env=process_env(**variables), timeout=60)

    blocks = srun("-N", "2", "--ntasks-per-node=2", "--gpus-per-task", "1", "--exclusive", SLURM_NTASKS="9")
    assert sorted(blocks.stdout.splitlines()) == ["0 0 0 4", "1 1 0 4", "2 0 1 4", "3 1 1 4"]
    assert blocks.returncode == 3, "a failed task fails the step"
    one = srun("--nodes=1", "-n", "1", SLURM_NTASKS="8", SLURM_NNODES="2")
    assert (one.returncode, one.stdout) == (0, "0 0 0 1\n")
    allocation = srun("--kill-on-bad-exit=0", SLURM_NTASKS="3", SLURM_NNODES="1")
    assert sorted(allocation.stdout.splitlines()) == ["0 0 0 3", "1 1 0 3", "2 2 0 3"]


@pytest.mark.slow
def test_the_job_requeues_itself_near_its_time_limit_and_resumes(tmp_path):
    images = tmp_path / "images"
    write_images(images, 6)
    out = tmp_path / "out"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = process_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        # The batch step's own variables: SLURM runs the script as task 0 of the whole allocation.
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="sam-autolabel", SLURM_NNODES="1", SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2", SLURM_CPUS_PER_TASK="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
        CHECKPOINT="builtin", MODEL="tiny", IMAGES=str(images), OUT=str(out),
        OVERRIDES=" ".join([*FAST, "output.samples_per_shard=1"]), SAM_TRAIN=f"{sys.executable} -m sam_train.cli",
    )
    job = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` sends 300 s before the time limit
    assert job.wait(timeout=60) == 0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)  # the requeue ends the job's tasks, wherever they are
    log = job.communicate(timeout=60)[0]
    assert "requeueing job 4242" in log
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert len(list(out.glob("*.tar"))) < 6, "the job finished before its requeue: nothing to resume"

    rerun = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "rank 0 of 2" in rerun.stdout and "rank 1 of 2" in rerun.stdout
    assert "6 images: 0 skipped; 6 samples in 6 shards" in rerun.stdout
    assert [e["name"] for e in read_manifest(out)["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert sorted(samples_of(out)) == [f"img{i}" for i in range(6)]  # each once: samples_of fails on a repeat
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", "no second requeue"
