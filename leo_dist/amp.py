"""Mixed precision: ``torch.amp.GradScaler`` with the sharded optimizers.

GradScaler calls ``step()`` even when this rank saw an inf, so that every rank reaches the
collectives; the step decides to skip from the *averaged* gradients, on all ranks alike, and
writes that verdict back into the scaler so that ``scaler.update()`` backs off identically on
every rank (its own check saw only local gradients).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import Comm

__all__ = ["inverse_scale", "unscale_and_check"]


def inverse_scale(scaler: Any) -> Tensor | None:
    """``1/scale`` as float32 (computed in float64, as GradScaler does), or None when disabled."""
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._scale.double().reciprocal().float()


def unscale_and_check(scaler: Any, optimizer: Any, shards: list[Tensor], comm: Comm,
                      unscaled_by_hook: bool) -> bool:
    """Unscale the averaged shards in place unless the DDP hook already did; True when any
    rank's shard is non-finite. Sends one float (an all-reduce MAX)."""
    from torch.amp.grad_scaler import OptState

    record = scaler._per_optimizer_states[id(optimizer)]
    if not unscaled_by_hook and record["stage"] is OptState.READY:
        inv = inverse_scale(scaler)
        for s in shards:
            s.mul_(inv)
    bad = torch.zeros((), dtype=torch.float32, device=shards[0].device if shards else None)
    for s in shards:
        bad = torch.maximum(bad, (~torch.isfinite(s)).any().float())
    comm.all_reduce(bad, dist.ReduceOp.MAX)
    record["found_inf_per_device"] = {scaler._scale.device: bad.to(scaler._scale.device)}
    return bool(bad)
