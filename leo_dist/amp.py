"""Mixed precision: ``torch.amp.GradScaler`` with the sharded optimizers.

GradScaler calls ``step()`` even when this rank saw an inf, so that every rank reaches the
collectives; the step decides to skip from the *averaged* gradients, on all ranks alike, and
writes that verdict back into the scaler so that ``scaler.update()`` backs off identically on
every rank (its own check saw only local gradients).

Which GradScaler protocol, and why the older one. ``torch.amp.GradScaler.step`` (torch 2.13) has
two contracts for an optimizer with ``_step_supports_amp_scaling = True``:

* ``step(..., grad_scaler=scaler)`` (what ``step`` uses here): GradScaler passes itself, with a
  ``FutureWarning`` announcing that it will stop doing so;
* the announced successor: when ``step`` takes no ``grad_scaler`` keyword, GradScaler sets
  ``optimizer.grad_scale`` and ``optimizer.found_inf`` (tensors) for the duration of ``step``.

The successor cannot keep the ranks' loss scales equal. ``found_inf`` there is a fresh tensor
(a sum over this rank's *local* per-device checks), not the record ``scaler.update()`` reads
(``scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]``), and nothing in it leads back to
the scaler. A rank whose local gradients were finite while another rank's were not would then
skip the step (the decision here comes from the averaged shards, agreed by an all-reduce) but
keep growing its scale: the scales diverge, and with them the next steps' gradients. So ``step``
keeps the keyword, and torch's ``FutureWarning`` is left to show: leo_dist installs no warnings
filter (a filter is process-wide; a user who wants silence can add one in their script). When
torch drops the keyword, the way forward is a scaler registered with the optimizer (the DDP hook
already holds one: ``attach(..., grad_scaler=)``).
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
