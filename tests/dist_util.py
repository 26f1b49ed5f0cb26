"""Shared pieces of the distributed parity tests: seeded models and gradients, the oracle."""
from __future__ import annotations

import hashlib

import torch

import leo_dist

# Shapes chosen so that shard boundaries fall inside rows, some parameters are smaller than the
# world size, and (with small buckets) some ranks own nothing but padding.
SHAPES = [(7, 13), (5,), (1, 33), (33, 1), (3,), (2, 3, 5), (16, 9), (1,), (11, 4), (2,)]


def make_params(shapes=SHAPES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def local_grad(step: int, rank: int, shape, dyadic: bool) -> torch.Tensor:
    """Rank ``rank``'s gradient at ``step``. Dyadic values (k/64, |k| ≤ 64) sum exactly in fp32."""
    g = torch.Generator().manual_seed(1000 * step + rank + 17)
    if dyadic:
        return torch.randint(-64, 65, shape, generator=g).float() / 64
    return torch.randn(shape, generator=g)


def feed_grads(params, step: int, rank: int, dyadic: bool, exchange=None) -> None:
    """Rank ``rank``'s gradients of ``step``: staged into ``exchange`` (``opt._attach_hook``, the
    DDP hook's path) when given, else set as ``.grad``."""
    for p in params:
        grad = local_grad(step, rank, p.shape, dyadic)
        if exchange is not None:
            exchange.stage(p, grad)
        else:
            p.grad = grad


def averaged_grad(step: int, world: int, shape, dyadic: bool, wire=torch.float32) -> torch.Tensor:
    """What the reduce-scatter produces: the wire-dtype gradients summed in fp32 in rank order, then /W."""
    total = local_grad(step, 0, shape, dyadic).to(wire).float()
    for r in range(1, world):
        total += local_grad(step, r, shape, dyadic).to(wire).float()
    return total / world if world > 1 else total


def groups_for(params, kind: str):
    """Two param groups with different hyperparameters (the second takes the sign rule in Leo)."""
    half = len(params) // 2
    if kind == "leo":
        return [{"params": params[:half]},
                {"params": params[half:], "lr": 2e-3, "betas": (0.8, 0.95), "weight_decay": 0.05,
                 "orthogonalize": False}]
    return [{"params": params[:half]},
            {"params": params[half:], "lr": 3e-4, "betas": (0.85, 0.98), "weight_decay": 0.1}]


def params_hash(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def oracle_run(kind: str, world: int, steps: int, dyadic: bool, shapes=SHAPES, wire=torch.float32, opt_kw=None,
               dtype=torch.float32):
    """Single-process Leo/Lion fed the averaged gradients: the reference trajectory."""
    params = make_params(shapes, dtype=dtype)
    cls = leo_dist.Leo if kind == "leo" else leo_dist.Lion
    opt = cls(groups_for(params, kind), **(opt_kw or {}))
    for step in range(steps):
        for p in params:
            p.grad = averaged_grad(step, world, p.shape, dyadic, wire).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bucket_grad(bucket, step: int, rank: int, dyadic: bool) -> torch.Tensor:
    """Rank ``rank``'s local gradient at ``step`` laid out as ``bucket`` (float32 ``[padded]``, zero padding)."""
    flat = torch.zeros(bucket.padded)
    for s in bucket.slots:
        flat[s.offset : s.offset + s.numel] = local_grad(step, rank, s.param.shape, dyadic).reshape(-1)
    return flat
