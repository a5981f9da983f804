"""Resuming where the writer's precision or GPU count differs: a checkpoint without a grad scaler (bf16,
fp32 or CPU runs) on an fp16 run, and per-GPU RNG states from a node with more GPUs than this one."""

import torch

from kiln_trainer import resume


def test_an_enabled_scaler_resumes_from_a_checkpoint_written_without_one() -> None:
    written = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert written == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    resume.load_scaler(scaler, written)
    assert scaler.get_scale() == 1024.0  # as a new run would start


def test_a_scaler_state_that_exists_is_restored() -> None:
    writer = torch.amp.GradScaler("cpu", enabled=True, init_scale=256.0)
    writer.scale(torch.ones(1))
    writer.update(new_scale=8.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    resume.load_scaler(scaler, writer.state_dict())
    assert scaler.get_scale() == 8.0


def test_a_node_with_fewer_gpus_takes_the_rng_states_of_the_gpus_it_has() -> None:
    saved = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    kept = resume.cuda_rng_states(saved, 2)
    assert [int(s[0]) for s in kept] == [0, 1]
    assert [int(s[0]) for s in resume.cuda_rng_states(saved[:1], 8)] == [0]
    assert resume.cuda_rng_states(saved, 0) == []
