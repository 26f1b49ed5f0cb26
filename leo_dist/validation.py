"""Input checks shared by every optimizer. They raise ``ValueError``/``TypeError`` naming the argument."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["check_hyperparameters", "check_param", "check_grad", "check_momentum_dtype"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_hyperparameters(group: Mapping[str, Any]) -> None:
    """Validate the hyperparameters present in ``group`` (a defaults dict or a param group)."""
    if "lr" in group and _number("lr", group["lr"]) < 0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= _number(f"betas[{i}]", b) < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    if "weight_decay" in group and _number("weight_decay", group["weight_decay"]) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if "eps" in group and _number("eps", group["eps"]) <= 0:
        raise ValueError(f"eps must be > 0, got {group['eps']}")
    if "align_const" in group and _number("align_const", group["align_const"]) <= 0:
        raise ValueError(f"align_const must be > 0, got {group['align_const']}")
    if "orthogonalize" in group and not isinstance(group["orthogonalize"], bool):
        raise TypeError(f"orthogonalize must be a bool, got {type(group['orthogonalize']).__name__}")


def check_param(p: Any) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"params must contain tensors, got {type(p).__name__}")
    if p.is_complex() or not p.is_floating_point():
        raise TypeError(f"params must be real floating point tensors, got dtype {p.dtype}")


def check_grad(p: Tensor) -> None:
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError("sparse gradients are not supported (grad layout "
                        f"{g.layout}); use a dense embedding or another optimizer for it")
    if g.shape != p.shape:
        raise ValueError(f"grad of shape {tuple(g.shape)} does not match its parameter {tuple(p.shape)}")


def check_momentum_dtype(dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"momentum_dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype
