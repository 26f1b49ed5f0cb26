"""Mixed precision: ``torch.amp.GradScaler`` with the sharded optimizers, through GradScaler's
current protocol and its public methods only.

The protocol (``torch.amp.GradScaler.step``, torch 2.13): an optimizer with
``_step_supports_amp_scaling = True`` whose ``step`` takes no ``grad_scaler`` keyword is called on
every rank, overflow or not, with two attributes set for the duration of the call:
``optimizer.grad_scale`` (this rank's loss scale as a tensor, or None when ``scaler.unscale_(opt)``
already unscaled ``.grad``) and ``optimizer.found_inf`` (this rank's own inf check of ``.grad``).
No deprecated keyword, no private scaler field, no warnings filter.

What a rank's loss scale means here. Every rank divides *its own* gradient by *its own* scale
before the gradients are averaged: the DDP hook while it copies each bucket (with the scaler given
to ``hooks.attach``; its scale read through the public ``scaler.scale``), standalone ``step()``
while it stages ``.grad`` (with ``grad_scale``). The averaged gradient is therefore right whatever
scale each rank holds. The decision to skip is global: the step's all-reduce of non-finite flags
covers every averaged shard and every rank's ``found_inf``, so all ranks skip together and replicas
stay bitwise identical. ``scaler.update()`` then reads only this rank's check (the protocol gives an
optimizer no way to write a verdict back), so a rank whose own gradients were finite keeps its
scale while the rank that overflowed backs off. Scales may thus differ across ranks; that costs
nothing, because no gradient is ever averaged while still scaled. (DDP's all-reduce averages scaled
gradients, which is why DDP needs equal scales.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["inverse_scale", "scaling_protocol"]


def _reciprocal(scale: Tensor) -> Tensor:
    # in float64, then float32, as GradScaler computes its own inv_scale: the hook's and the
    # standalone step's unscaling must give the same bits
    return scale.double().reciprocal().float().reshape(())


def inverse_scale(scaler: Any, device: torch.device) -> Tensor | None:
    """``1/scale`` of ``scaler`` as a float32 scalar tensor on ``device`` (the reciprocal taken in
    float64, as GradScaler takes it), or None without an enabled scaler. Uses only the public
    ``scaler.scale(tensor)``: no host sync."""
    if scaler is None or not scaler.is_enabled():
        return None
    return _reciprocal(scaler.scale(torch.ones(1, dtype=torch.float64, device=device)))


def scaling_protocol(optimizer: Any) -> tuple[bool, Tensor | None, Tensor | None]:
    """``(active, inv_scale, found_inf)`` from the attributes ``GradScaler.step`` sets on
    ``optimizer``: ``active`` is False outside ``scaler.step``; ``inv_scale`` is ``1/grad_scale``
    (float32, None when the gradients were already unscaled); ``found_inf`` this rank's own check."""
    if not hasattr(optimizer, "found_inf"):
        return False, None, None
    scale = getattr(optimizer, "grad_scale", None)
    return True, None if scale is None else _reciprocal(scale), optimizer.found_inf
