"""The maths of Lion and Leo, written once.

Every other path in leo_dist (the single-process optimizers, the sharded optimizers, the Triton
kernels) is a parity test against the functions in this module. They compute in float32 whatever
the dtype of the parameter, gradient or momentum, and write results back in the stored dtype.

Definitions (docs/design.md, "The maths, once"), for momentum ``m``, gradient ``g``, lr ``η``, betas ``(β1, β2)``, decay ``λ``::

    c      = β1·m + (1−β1)·g                       (torch.lerp(g, m, β1))
    m      ← β2·m + (1−β2)·g                       (m.lerp_(g, 1−β2))
    Lion:    update = sign(c)
    Leo 2-D: u = c/(‖rows‖+ε) + c/(‖cols‖+ε);  update = align·u / (sqrt(mean(u²)+ε)+ε)
    Leo else: update = align·sign(c)
    p      ← p·(1 − η·λ) − η·update
    AdamW:   torch.optim.AdamW's rule (decoupled decay, bias correction; :func:`adamw_update_`)

``sign(0) = 0``. The decay-and-step arithmetic is one function, :func:`apply_update_`, used by every
path that touches parameters, so that replicas computed from the same update bytes are identical.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "lion_update",
    "leo_update",
    "interpolate",
    "update_momentum_",
    "leo_direction",
    "leo_scale",
    "apply_update_",
    "round_bf16_stochastic_",
    "adamw_update_",
]


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def interpolate(exp_avg: Tensor, grad: Tensor, beta1: float) -> Tensor:
    """``c = β1·exp_avg + (1−β1)·grad`` as a new float32 tensor of the same shape."""
    return torch.lerp(_f32(grad), _f32(exp_avg), beta1)


def update_momentum_(exp_avg: Tensor, grad: Tensor, beta2: float) -> None:
    """``exp_avg ← β2·exp_avg + (1−β2)·grad`` in place, computed in float32."""
    if exp_avg.dtype == torch.float32:
        exp_avg.lerp_(_f32(grad), 1.0 - beta2)
    else:
        exp_avg.copy_(exp_avg.float().lerp_(_f32(grad), 1.0 - beta2))


def leo_direction(c: Tensor, eps: float) -> Tensor:
    """Element-wise orthogonalised direction of a 2-D float32 ``c`` of shape (R, C).

    ``u = c/(r + eps) + c/(k + eps)`` with ``r`` the row norms (R, 1) and ``k`` the column
    norms (1, C). Returns a new (R, C) float32 tensor.
    """
    r = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    k = torch.linalg.vector_norm(c, dim=0, keepdim=True)
    return c / (r + eps) + c / (k + eps)


def leo_scale(sum_sq: float | Tensor, numel: int, align_const: float, eps: float) -> Tensor | float:
    """``align / (sqrt(sum_sq/numel + eps) + eps)``: the factor that gives ``u`` an RMS of ``align``.

    ``sum_sq`` is ``Σu²`` over the whole matrix (a 0-d tensor or a float); ``numel`` its size.
    """
    if isinstance(sum_sq, Tensor):
        return align_const / (torch.sqrt(sum_sq / numel + eps) + eps)
    return align_const / ((sum_sq / numel + eps) ** 0.5 + eps)


def apply_update_(param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float = 1.0,
                  rounding_seed: int | None = None, rounding_offset: int = 0) -> None:
    """``param ← param·(1 − lr·weight_decay) − lr·scale·update`` in place, in float32.

    ``update`` is float32 (or the parameter dtype), same numel as ``param``. This is the only
    arithmetic any leo_dist path uses to change a parameter. A bfloat16 ``param`` is rounded to
    nearest, or, given ``rounding_seed``, stochastically (see :func:`round_bf16_stochastic_`);
    ``rounding_offset`` is the flat index of ``param[0]`` in the whole parameter when ``param`` is
    a piece of it, so a parameter updated piece by piece rounds exactly as one updated at once.
    """
    p = _f32(param)
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update.view_as(p), alpha=-lr * scale)
    if p is not param:
        if rounding_seed is not None and param.dtype == torch.bfloat16:
            round_bf16_stochastic_(param, p, rounding_seed, rounding_offset)
        else:
            param.copy_(p)


def round_bf16_stochastic_(dst: Tensor, x: Tensor, seed: int, offset: int = 0) -> None:
    """``dst`` (bfloat16) ← ``x`` (float32, same shape) rounded up or down at random, with the
    probability that makes the result unbiased; ``x`` is overwritten.

    The randomness is a hash of ``(seed, offset + flat element index)``: every rank that rounds the same
    values with the same seed gets the same bits, so replicas stay bitwise identical, and a step
    too small for one bf16 ulp still moves a weight with probability ``step/ulp`` instead of never.
    Non-finite values round to nearest.
    """
    bits = x.view(torch.int32)
    idx = torch.arange(offset, offset + x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    h = idx * 0x9E3779B1 + (seed * 0x85EBCA77 + 0x165667B1)
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h = h ^ (h >> 12)
    noise = (h & 0xFFFF).to(torch.int32)
    finite = torch.isfinite(x)
    # adding uniform noise below the 16 bits bf16 drops, then truncating, rounds away from zero with
    # probability (dropped bits)/2^16: unbiased on the magnitude, hence on the value
    rounded = ((bits + noise) & ~0xFFFF).view(torch.float32)
    dst.copy_(torch.where(finite, rounded, x))


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: float, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, out: Tensor | None = None) -> None:
    """One ``torch.optim.AdamW`` step (``amsgrad=False``, ``maximize=False``) on one tensor, in float32.

    ``exp_avg`` (float32 or bfloat16) and ``exp_avg_sq`` (float32) are updated in place from
    ``grad``; ``step`` is the parameter's step count *after* this step (1 at the first), as torch
    counts it. The new parameter value ``p·(1−lr·λ) − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)``
    is written to ``out`` (default: ``param`` itself), rounded to nearest when ``out`` is not
    float32; ``out`` may alias ``grad``, which is read before it is written. All tensors hold the
    same number of elements. The float32 operations are torch's single-tensor AdamW's, in its
    order, so a float32 parameter gets torch's bits.
    """
    g = _f32(grad)
    m = _f32(exp_avg)
    m.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
    step_size = lr / (1.0 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1.0 - beta2 ** step) ** 0.5).add_(eps)
    out = param if out is None else out
    p = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    if p is not param:
        p.copy_(param.reshape(p.shape))  # grad (when out aliases it) is no longer needed
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.addcdiv_(m.view(p.shape), denom.view(p.shape), value=-step_size)
    if p is not out:
        out.copy_(p)


def _check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor]) -> None:
    if not (len(params) == len(grads) == len(exp_avgs)):
        raise ValueError(
            f"params, grads and exp_avgs must have the same length, got {len(params)}, {len(grads)}, {len(exp_avgs)}"
        )


def lion_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    sign_scale: float = 1.0,
) -> None:
    """One Lion step over lists of tensors. ``params`` and ``exp_avgs`` are modified in place.

    ``sign_scale`` multiplies the sign step (1 for Lion, ``align_const`` for Leo's sign rule).
    Shapes are arbitrary but paired; dtypes may be float32/bfloat16/float16 independently.
    """
    _check_lists(params, grads, exp_avgs)
    if not params:
        return
    gs = [_f32(g) for g in grads]
    ms = [_f32(m) for m in exp_avgs]
    cs = torch._foreach_lerp(gs, ms, beta1)
    torch._foreach_sign_(cs)
    ps = [_f32(p) for p in params]
    if weight_decay != 0.0:
        torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
    torch._foreach_add_(ps, cs, alpha=-lr * sign_scale)
    torch._foreach_lerp_(ms, gs, 1.0 - beta2)
    for dst, src in zip(params, ps):
        if dst is not src:
            dst.copy_(src)
    for dst, src in zip(exp_avgs, ms):
        if dst is not src:
            dst.copy_(src)


def leo_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    align_const: float,
    eps: float,
    orthogonalize: bool = True,
    update_dtype: torch.dtype | None = None,
) -> None:
    """One Leo step over lists of tensors. ``params`` and ``exp_avgs`` are modified in place.

    With ``orthogonalize`` true, every ``ndim == 2`` parameter takes the 2-D rule; all other
    parameters (and all of them when it is false) take ``align_const·sign(c)``. ``update_dtype``
    (e.g. ``torch.bfloat16``): the 2-D update of a float32 parameter is rounded to it (to nearest)
    before it is applied, as ``ShardedLeo(update_comm="bf16")`` sends it; None keeps it float32.
    """
    _check_lists(params, grads, exp_avgs)
    mat = [i for i, p in enumerate(params) if orthogonalize and p.ndim == 2]
    vec = [i for i, p in enumerate(params) if not (orthogonalize and p.ndim == 2)]
    if vec:
        lion_update(
            [params[i] for i in vec], [grads[i] for i in vec], [exp_avgs[i] for i in vec],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, sign_scale=align_const,
        )
    for i in mat:
        p, g, m = params[i], grads[i], exp_avgs[i]
        c = interpolate(m, g, beta1)
        u = leo_direction(c, eps)
        s = leo_scale(u.square().sum(), u.numel(), align_const, eps)
        u.mul_(s)
        if update_dtype is not None and p.dtype == torch.float32:
            u = u.to(update_dtype)
        apply_update_(p, u, lr, weight_decay)
        update_momentum_(m, g, beta2)
