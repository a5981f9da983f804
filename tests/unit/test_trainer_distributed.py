"""Distributed data parallel with two real local processes on gloo, started the way an Indexed Job starts
pods: MASTER_ADDR/MASTER_PORT/WORLD_SIZE, RANK for one and JOB_COMPLETION_INDEX for the other."""

import json
import subprocess
from pathlib import Path

import trainer_support as support

from kiln import api
from kiln_cluster.controlplane import free_port
from kiln_trainer import checkpoint

EPOCHS = 2


def test_two_gloo_processes_train_together_and_only_rank_0_writes_artifacts(tmp_path: Path) -> None:
    config = support.write_config(
        tmp_path / "job.yaml", support.spec_dict(data={"maxSamples": 400}, training={"epochs": EPOCHS})
    )
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    # Separate output folders (in a cluster they share one volume) make any write by rank 1 visible.
    outputs = [tmp_path / "rank0", tmp_path / "rank1"]
    envs = [support.trainer_env(RANK="0", **common), support.trainer_env(JOB_COMPLETION_INDEX="1", **common)]
    ranks = [
        subprocess.Popen(
            support.trainer_command(config, output, "--no-compile", "--metrics-port", "0", "--log-format", "json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for output, env in zip(outputs, envs, strict=True)
    ]
    try:
        results = [rank.communicate(timeout=600) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (_, stderr) in zip(ranks, results, strict=True):
        assert rank.returncode == 0, stderr
    assert "rank 1 of 2 joined (gloo, cpu)" in results[1][1]

    # Rank 0 evaluated, reported and checkpointed; rank 1 only trained.
    epochs = [json.loads(line)["epoch"] for line in results[0][0].splitlines() if '"event": "epoch"' in line]
    assert epochs == list(range(1, EPOCHS + 1))
    assert results[1][0].strip() == ""
    assert not outputs[1].exists()
    best = checkpoint.load_checkpoint(checkpoint.best_checkpoint_path(outputs[0]))
    summary = api.TrainingSummary.model_validate(best["summary"])
    assert summary.workers == 2 and summary.epochs_run == EPOCHS
    final = checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(outputs[0], EPOCHS))
    # The sampler gives each rank half the training split: 160 images, 5 full batches of 32 per epoch.
    train_size = 400 - round(400 * 0.2)
    assert final["step"] == EPOCHS * (train_size // 2 // 32)
