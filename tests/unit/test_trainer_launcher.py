"""Several trainer processes per pod (the launcher) and gang failure (the peer watchdog), with real gloo
process groups on loopback: launchers start the way an Indexed Job starts pods, one per completion index."""

import json
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import trainer_support as support

from kiln import api
from kiln.api import constants
from kiln_trainer import checkpoint, errors, launcher

DATA = {"maxSamples": 600}
# Several real processes importing torch on two shared cores: more than the default per-test budget.
SLOW = pytest.mark.timeout(1800)
EPOCHS = 3
BATCH = 32
QUIET = ("--no-compile", "--metrics-port", "0", "--log-format", "json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_each_local_rank_gets_its_global_rank_from_the_pod_index_as_torchrun_gives_it() -> None:
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "JOB_COMPLETION_INDEX": "1"}
    assert launcher.processes(env) == 2
    ranks = [launcher.rank_env(env, local, 2) for local in (0, 1)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["GROUP_RANK"], r["WORLD_SIZE"]) for r in ranks] == [
        ("2", "0", "1", "4"), ("3", "1", "1", "4")
    ]  # fmt: skip
    # A process the launcher started is a trainer, not another launcher.
    assert launcher.processes(ranks[0]) == 1
    with pytest.raises(errors.ConfigError, match="RANK 4 .* >= WORLD_SIZE 4"):
        launcher.rank_env({**env, "GROUP_RANK": "2"}, 0, 2)


def best_accuracy(output: Path) -> float:
    best = checkpoint.load_checkpoint(checkpoint.best_checkpoint_path(output))
    return api.TrainingSummary.model_validate(best["summary"]).best_val_accuracy


def train_alone(tmp_path: Path, seed: int) -> float:
    body = support.spec_dict(data=DATA, training={"epochs": EPOCHS, "batchSize": BATCH, "seed": seed})
    config = support.write_config(tmp_path / f"alone-{seed}.yaml", body)
    result = support.run_trainer(config, tmp_path / f"alone-{seed}", "--no-compile", timeout=900)
    assert result.returncode == 0, result.stderr
    return best_accuracy(tmp_path / f"alone-{seed}")


@SLOW
def test_two_pods_of_two_processes_train_as_world_size_four_and_match_a_single_process(tmp_path: Path) -> None:
    # The same global batch as the single process (4 ranks x BATCH/4), so both take the same steps.
    body = support.spec_dict(data=DATA, training={"epochs": EPOCHS, "batchSize": BATCH // 4, "seed": 42})
    config = support.write_config(tmp_path / "job.yaml", body)
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    outputs = [tmp_path / "pod0", tmp_path / "pod1"]  # in a cluster one volume; apart, a write by pod 1 shows
    pods = [
        subprocess.Popen(
            support.trainer_command(config, output, *QUIET),
            env=support.trainer_env(JOB_COMPLETION_INDEX=str(index), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index, output in enumerate(outputs)
    ]
    try:
        results = [pod.communicate(timeout=1200) for pod in pods]
    finally:
        for pod in pods:
            pod.kill()
    for pod, (_, stderr) in zip(pods, results, strict=True):
        assert pod.returncode == 0, stderr
    assert "ranks 0, 1" in results[0][1] and "ranks 2, 3" in results[1][1]
    for rank in range(1, 4):
        assert f"rank {rank} of 4 joined (gloo, cpu)" in results[0][1] + results[1][1]
    # Rank 0 alone reported and wrote artifacts.
    epochs = [json.loads(line)["epoch"] for line in results[0][0].splitlines() if '"event": "epoch"' in line]
    assert epochs == list(range(1, EPOCHS + 1))
    assert results[1][0].strip() == "" and not outputs[1].exists()
    summary = checkpoint.load_checkpoint(checkpoint.best_checkpoint_path(outputs[0]))["summary"]
    assert summary["workers"] == 4

    # Accuracy: within the spread single-process runs show across seeds (never tighter than 10 points).
    alone = [train_alone(tmp_path, seed) for seed in (42, 7)]
    margin = max(0.10, 3 * (max(alone) - min(alone)))
    together = best_accuracy(outputs[0])
    assert abs(together - statistics.mean(alone)) <= margin, (together, alone, margin)


def gang(tmp_path: Path, config: Path, port: int, **env: str) -> list[subprocess.Popen[str]]:
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", **env}
    return [
        subprocess.Popen(
            support.trainer_command(
                config, tmp_path / "out", "--no-compile", "--metrics-port", "0", "--log-format", "json"
            ),
            env=support.trainer_env(RANK=str(rank), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]


def logged_epochs(stdout: str) -> list[int]:
    return [int(json.loads(line)["epoch"]) for line in stdout.splitlines() if '"event": "epoch"' in line]


@SLOW
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_worker_ends_its_peer_and_a_rerun_resumes_without_redoing_an_epoch(
    tmp_path: Path, victim: int
) -> None:
    epochs = 4
    body = support.spec_dict(data={"maxSamples": 1500}, training={"epochs": epochs, "batchSize": 16})
    config = support.write_config(tmp_path / "job.yaml", body)
    checkpoints = tmp_path / "out" / constants.CHECKPOINTS_DIR
    ranks = gang(tmp_path, config, _free_port(), KILN_PEER_TIMEOUT_SECONDS="5")
    try:
        # -- kill one worker mid-epoch, once the first epoch is checkpointed
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("epoch-*.pt")) and time.monotonic() < deadline:
            assert all(r.poll() is None for r in ranks), [r.communicate() for r in ranks]
            time.sleep(0.05)
        saved_before = sorted(p.name for p in checkpoints.glob("epoch-*.pt"))
        assert saved_before, "no checkpoint within 600 s"
        ranks[victim].send_signal(signal.SIGKILL)
        peer = ranks[1 - victim]
        # -- the peer notices and exits on its own, as retryable (generous bound: a loaded machine)
        stdout, stderr = peer.communicate(timeout=180)
        assert peer.returncode == constants.EXIT_PEER_LOST, stderr[-3000:]
        ranks[victim].wait(10)
    finally:
        for r in ranks:
            r.kill()
    first_run = logged_epochs(stdout) if victim == 1 else []
    last_saved = max(int(p.removeprefix("epoch-").removesuffix(".pt")) for p in saved_before)
    saved_at_kill = max(int(p.stem.removeprefix("epoch-")) for p in checkpoints.glob("epoch-*.pt"))
    assert saved_at_kill >= last_saved and saved_at_kill < epochs, "the kill came after training ended"

    # -- the whole group restarts and resumes after the last checkpoint: no epoch is trained twice
    rerun = gang(tmp_path, config, _free_port())
    results = [r.communicate(timeout=900) for r in rerun]
    for r, (_, err) in zip(rerun, results, strict=True):
        assert r.returncode == 0, err[-3000:]
    resumed = logged_epochs(results[0][0])
    assert resumed == list(range(saved_at_kill + 1, epochs + 1)), (resumed, saved_at_kill)
    assert not set(first_run) & set(resumed), (first_run, resumed)
