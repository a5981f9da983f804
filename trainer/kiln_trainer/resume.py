"""Resuming on a different machine than the one that wrote the checkpoint: another precision, fewer GPUs.

A checkpoint carries the grad scaler and the per-GPU RNG states of the run that wrote it. A bf16, fp32 or
CPU run saves a disabled scaler (an empty dict), and a node with 8 GPUs saves 8 RNG states; resuming that on
an fp16 GPU run, or on a node that sees fewer GPUs, must carry on instead of raising.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """Restore the grad scaler; a checkpoint written without one (empty state) leaves it freshly initialised,
    as it would be at the start of a run (GradScaler.load_state_dict refuses an empty state)."""
    if not saved:
        if scaler.is_enabled():
            log.info("resume: the checkpoint has no grad scaler state (written without fp16); starting a new one")
        return
    scaler.load_state_dict(saved)


def cuda_rng_states(saved: Sequence[torch.Tensor], device_count: int) -> list[torch.Tensor]:
    """The saved per-GPU RNG states this node can take: one per visible GPU, in order. With fewer GPUs than
    the writer had, the extra states are dropped; with more, the extra GPUs keep their current state."""
    if len(saved) > device_count:
        log.info("resume: the checkpoint holds RNG states of %d GPUs, %d visible here", len(saved), device_count)
    return list(saved[:device_count])


def restore_cuda_rng(saved: Sequence[torch.Tensor]) -> None:
    """Set each visible GPU's RNG state from the checkpoint (nothing where CUDA is absent)."""
    if not saved or not torch.cuda.is_available():
        return
    for device, state in enumerate(cuda_rng_states(saved, torch.cuda.device_count())):
        torch.cuda.set_rng_state(state, device)
