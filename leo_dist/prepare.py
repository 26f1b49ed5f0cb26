"""One call from a model to a DDP model trained by a sharded Leo or Lion: :func:`prepare`.

It does what the manual recipe does, nothing more::

    ddp = DistributedDataParallel(model)                     # unless model already is one
    opt = ShardedLeo(leo_param_groups(model), **kwargs)     # or ShardedLion(...)
    leo_dist.hooks.attach(ddp, opt)

so everything it returns is the ordinary torch object, usable as usual (``ddp.no_sync()``,
``opt.param_groups``, LR schedulers, checkpoints).
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import hooks
from .optim import leo_param_groups
from .sharded import ShardedLeo, ShardedLion

__all__ = ["prepare"]

_OPTIMIZERS = {"leo": ShardedLeo, "lion": ShardedLion}


def _groups(module: nn.Module, optimizer: str, rest: dict[str, Any] | None, weight_decay: float):
    """Leo: matrices (2-D, not embeddings) take the 2-D rule, the rest the sign rule without decay
    (:func:`leo_dist.leo_param_groups`). Lion without ``rest``: one group. ``rest`` is merged into
    the group of embeddings, norms and biases."""
    if optimizer == "lion" and rest is None:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    groups = leo_param_groups(module, weight_decay=weight_decay)
    for g in groups:
        is_rest = g["orthogonalize"] is False
        if optimizer == "lion" or (is_rest and rest is not None and rest.get("algorithm") == "adamw"):
            del g["orthogonalize"]  # a Leo key, meaningless to Lion and AdamW
        if is_rest and rest is not None:
            g.update(rest)
    return groups


#: bucket sizes (MiB of fp32 gradient) of the DDP wrapper and optimizer that :func:`prepare` builds:
#: about :data:`MIN_BUCKETS` buckets, between 1 and 25 MiB (DDP's default). The hook can start a
#: bucket's exchange only once DDP hands all of it over, so a small model wants small buckets;
#: a large one wants few collectives. Measured on the slow-link harness (10.8M parameters, W=2,
#: bf16 gradients, 100 Mbit/s, docs/overlap.md): 25 MiB 2.43–2.47 s/step, 4 MiB 2.05–2.19 s,
#: 2 MiB 2.00–2.15 s.
MAX_BUCKET_MB, MIN_BUCKET_MB, MIN_BUCKETS = 25.0, 1.0, 16


def bucket_mb_for(model: nn.Module) -> float:
    """The bucket size :func:`prepare` uses for ``model``: its fp32 gradient bytes over
    :data:`MIN_BUCKETS`, clamped to [:data:`MIN_BUCKET_MB`, :data:`MAX_BUCKET_MB`] MiB."""
    mb = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) / 2**20
    return min(MAX_BUCKET_MB, max(MIN_BUCKET_MB, mb / MIN_BUCKETS))


def prepare(model: nn.Module, optimizer: str = "leo", *, rest: str | dict[str, Any] | None = None,
            grad_scaler: Any = None, **kwargs: Any) -> tuple[DistributedDataParallel, ShardedLeo | ShardedLion]:
    """Wrap ``model`` in DDP, build a sharded optimizer for it and attach the leo_dist DDP hook.

    Args:
        model: an ``nn.Module`` (wrapped as ``DistributedDataParallel(model)``, with
            ``device_ids=[its device]`` on CUDA and none on the CPU, ``process_group`` from
            ``kwargs``), or a ``DistributedDataParallel`` (used as it is: wrap it yourself for
            other DDP options). ``torch.distributed`` must be initialised.
        optimizer: ``"leo"`` (:class:`~leo_dist.ShardedLeo` over :func:`~leo_dist.leo_param_groups`:
            matrices take the 2-D rule; embeddings, norms and biases the sign rule with no weight
            decay) or ``"lion"`` (:class:`~leo_dist.ShardedLion`, one group).
        rest: how embeddings, norms, biases and other non-matrix parameters are trained:
            None (the optimizer's own rule, as above), ``"adamw"`` (an AdamW group: see
            :mod:`leo_dist.adamw` for its defaults; no weight decay, as above), or a dict of group
            keys merged into that group, e.g. ``{"algorithm": "adamw", "lr": 1e-3, "weight_decay": 0.0}``.
        grad_scaler: a ``torch.amp.GradScaler`` for the hook to unscale with (see :func:`leo_dist.hooks.attach`).
        **kwargs: the optimizer's own arguments (``lr``, ``weight_decay``, ``grad_comm``, ``bucket_mb``,
            ``process_group``, ...); ``weight_decay`` applies to the matrices. ``bucket_mb``
            defaults to :func:`bucket_mb_for` here, and the DDP wrapper prepare() builds gets the same
            ``bucket_cap_mb``: the hook can start a bucket's exchange only once DDP hands it over,
            so small DDP buckets start the exchange early in backward (docs/overlap.md measures it).

    Returns:
        ``(ddp_model, opt)``. Train as with DDP: ``loss = ...(ddp_model(x)); loss.backward();
        opt.step(); opt.zero_grad()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a str ('leo' or 'lion'), got {type(optimizer).__name__}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be 'leo' or 'lion', got {optimizer!r}")
    if isinstance(rest, str):
        if rest != "adamw":
            raise ValueError(f"rest must be None, 'adamw' or a dict of group keys, got {rest!r}")
        rest = {"algorithm": "adamw"}
    elif rest is not None and not isinstance(rest, dict):
        raise TypeError(f"rest must be None, 'adamw' or a dict of group keys, got {type(rest).__name__}")
    elif rest is not None and "params" in rest:
        raise ValueError("rest must not contain 'params': prepare() chooses the parameters of that group")
    if isinstance(model, DistributedDataParallel):
        ddp = model
    else:
        if not dist.is_initialized():
            raise RuntimeError("prepare() wraps the model in DistributedDataParallel, which needs "
                               "torch.distributed initialised (torchrun + dist.init_process_group)")
        devices = {p.device for p in model.parameters()}
        cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
        kwargs.setdefault("bucket_mb", bucket_mb_for(model))
        ddp = DistributedDataParallel(model, device_ids=[next(iter(devices))] if cuda else None,
                                      process_group=kwargs.get("process_group"), bucket_cap_mb=kwargs["bucket_mb"])
    default_wd = 0.01 if optimizer == "leo" else 0.0
    groups = _groups(ddp.module, optimizer, rest, kwargs.get("weight_decay", default_wd))
    opt = _OPTIMIZERS[optimizer](groups, **kwargs)
    hooks.attach(ddp, opt, grad_scaler=grad_scaler)
    return ddp, opt
