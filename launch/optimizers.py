"""The optimizers the demo offers, their defaults per family, how they are built, and the lr schedule."""
from __future__ import annotations

import math
from typing import Any

import torch

import leo_dist

try:  # the sharded optimizers are the point of the demo, but keep the baselines usable without them
    from leo_dist import ShardedLeo, ShardedLion
except ImportError as _exc:  # pragma: no cover - depends on the installed leo_dist
    ShardedLeo = ShardedLion = None
    SHARDED_IMPORT_ERROR: ImportError | None = _exc
else:
    SHARDED_IMPORT_ERROR = None

OPTIMIZERS = ("sharded_leo", "sharded_lion", "leo", "lion", "adamw")
SHARDED = ("sharded_leo", "sharded_lion")
# Defaults per optimizer family. Sign optimizers take every coordinate a full step, so they want a
# smaller lr than AdamW; Lion's unit-size sign step is 1/align_const times Leo's.
DEFAULT_LR = {"leo": 1e-3, "lion": 3e-4, "adamw": 2e-3}
DEFAULT_WD = {"leo": 0.01, "lion": 0.1, "adamw": 0.1}
DEFAULT_BETAS = {"leo": (0.9, 0.99), "lion": (0.9, 0.99), "adamw": (0.9, 0.95)}


def family(optimizer: str) -> str:
    """``leo``, ``lion`` or ``adamw``: the optimizer name without its ``sharded_`` prefix."""
    return optimizer.removeprefix("sharded_")


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Leo's helper already splits "matrices" from "embeddings, norms, biases"; AdamW and Lion
    # want the same split for weight decay, without Leo's orthogonalize key.
    groups = leo_dist.leo_param_groups(model, weight_decay=weight_decay)
    return [{k: v for k, v in grp.items() if k != "orthogonalize"} for grp in groups]


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    fam = family(args.optimizer)
    betas = DEFAULT_BETAS[fam]
    if fam == "leo":
        groups = leo_dist.leo_param_groups(model, weight_decay=args.weight_decay)
    else:
        groups = _decay_groups(model, args.weight_decay)
    comm_kw: dict[str, Any] = dict(process_group=None, grad_comm=args.grad_comm, bucket_mb=args.bucket_mb)
    if args.grad_comm_warmup is not None:
        comm_kw["grad_comm_warmup"] = args.grad_comm_warmup
    if getattr(args, "warmup_grad_comm", None) is not None:
        comm_kw["warmup_grad_comm"] = args.warmup_grad_comm
    if getattr(args, "ranks_per_node", None) is not None:
        comm_kw["ranks_per_node"] = args.ranks_per_node
    if args.optimizer == "sharded_leo":
        return ShardedLeo(groups, update_comm=args.update_comm, lr=args.lr, betas=betas, **comm_kw)
    if args.optimizer == "sharded_lion":
        return ShardedLion(groups, lr=args.lr, betas=betas, **comm_kw)
    if fam == "leo":
        return leo_dist.Leo(groups, lr=args.lr, betas=betas)
    if fam == "lion":
        return leo_dist.Lion(groups, lr=args.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas)


def lr_factor(args, step: int) -> float:
    """Multiplier of the peak lr at (1-based) ``step``: a pure function of the step, so resume needs no state."""
    if args.warmup_steps and step <= args.warmup_steps:
        return step / args.warmup_steps
    if args.schedule == "constant" or args.steps <= args.warmup_steps:
        return 1.0
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
